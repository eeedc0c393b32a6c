"""Config vocabulary and validation: every user mistake is caught here, before any heavy work."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from . import paths
from .paths import (PACKAGE_PREFIX, PROJECT_ROOT, ConfigError, install_line, model_path,  # noqa: F401 - re-exported
                    package_dir, shared_dir)
from .schedule import SCHEDULES

METHODS = ("surgeon", "kobd", "lobd", "magnitude", "sparsegpt", "wanda")
STRUCTURES = ("unstructured", "semistructured", "structured")
CORRELATIONS = ("none", "independent", "layer")
SELECTIONS = ("global", "uniform")
CURVATURE_KINDS = ("kfac", "diag_a", "identity", "none")
FISHERS = ("empirical", "sampled")
UNIONS = ("exact", "additive")
SOLVERS = ("joint", "grouped")
PRECISIONS = ("fp32", "tf32", "bf16")
LAYERWISE_METHODS = ("sparsegpt", "wanda")
PAPER_SETTING = "python run.py model=opt-125m data=wikitext2"


def _shared_resolver(rel: str) -> str:
    return str(shared_dir() / rel)


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("shared"):
        OmegaConf.register_new_resolver("shared", _shared_resolver)


def compose(overrides=(), return_hydra_config: bool = False) -> DictConfig:
    """The config `python run.py <overrides>` would run, composed from conf/ without running it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_resolvers()
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides), return_hydra_config=return_hydra_config)


def _one_of(key: str, value, valid) -> None:
    if value not in valid:
        raise ConfigError(f"{key}={value!r} is not valid; valid values: {', '.join(map(str, valid))}")


def _is_local(path: str) -> bool:
    return Path(path).expanduser().exists()


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _hub_cached(repo: str, revision: str | None) -> bool:
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(repo, revision=revision, local_files_only=True)
        return True
    except Exception:  # noqa: BLE001 - any failure means "not in the cache"
        return False


def _check_gguf(cfg: DictConfig, path: str) -> None:
    """model.gguf_file: the gguf package transformers reads it with, and the file itself when local."""
    gguf_file = str(cfg.model.gguf_file)
    if paths.package_dir("gguf") is None:  # looked up at call time (tests replace it)
        raise ConfigError(f"model.gguf_file={gguf_file} needs the Python package gguf, which is not installed; "
                          f"install it with: {install_line(cfg)}")
    if _is_local(path) and not (Path(path) / gguf_file).is_file() and not Path(gguf_file).is_file():
        found = sorted(p.name for p in Path(path).glob("*.gguf"))
        raise ConfigError(f"model.gguf_file={gguf_file} is not in {path}; "
                          f"GGUF files there: {', '.join(found) or 'none'}")


def check_model_source(cfg: DictConfig) -> str:
    """'local', 'cache' or 'hub'; a clear error when a hub model is asked for while offline, or a model
    package (`pkg:NAME`) or the gguf package is not installed."""
    name = model_path(cfg)
    if cfg.model.get("gguf_file"):
        _check_gguf(cfg, name)
    if _is_local(name):
        return "local"
    if not _looks_like_repo(name):
        hint = ""
        if str(shared_dir()) in name:
            hint = (f" (the testbed lives in {shared_dir()}; set SURGEON_SHARED, or run the paper setting: "
                    f"{PAPER_SETTING})")
        raise ConfigError(f"model.name_or_path={name!r} does not exist{hint}")
    if _hub_cached(name, cfg.model.get("revision")):
        return "cache"
    if not _hub_reachable():
        raise ConfigError(
            f"model.name_or_path={name!r} is a Hugging Face hub model, but the hub cannot be reached (offline); "
            "download it where there is network, or point model.name_or_path at a local copy "
            "(model.name_or_path=/path/to/model), or use a testbed preset: model=opt-tiny or model=llama-tiny"
        )
    return "hub"


def _looks_like_repo(name: str) -> bool:
    """`org/name` or `name`, as on the hub; anything else is meant as a local path."""
    parts = name.split("/")
    return len(parts) <= 2 and all(parts) and not name.startswith((".", "~"))


def validate(cfg: DictConfig, check_sources: bool = True) -> None:
    """Raise ConfigError on the first invalid value; touches no model and no data beyond file existence."""
    _one_of("method", cfg.method.name, METHODS)
    _one_of("structure", cfg.structure.name, STRUCTURES)
    _one_of("schedule", cfg.schedule, SCHEDULES)
    _one_of("correlation", cfg.correlation, CORRELATIONS)
    _one_of("selection", cfg.selection, SELECTIONS)
    _one_of("union", cfg.union, UNIONS)
    _one_of("curvature.kind", cfg.curvature.kind, CURVATURE_KINDS)
    _one_of("curvature.fisher", cfg.curvature.fisher, FISHERS)
    _one_of("curvature.precision", cfg.curvature.precision, PRECISIONS)
    _one_of("curvature.offload", cfg.curvature.offload, ("none", "cpu"))
    _one_of("curvature.accumulate", cfg.curvature.accumulate, ("auto", "float32", "float64"))
    if cfg.curvature.offload == "cpu" and cfg.curvature.rank != 1:
        raise ConfigError("curvature.offload=cpu keeps Kronecker rank 1 factors only; use curvature.rank=1")
    _one_of("curvature.rank", cfg.curvature.rank, (1, 2))
    _one_of("logger", cfg.logger.name, ("none", "wandb"))

    target = cfg.target
    if not isinstance(target, (int, float)) or not 0 < target < 1:
        raise ConfigError(f"target={target!r} must be a fraction of prunable weights strictly between 0 and 1")
    quantizing = cfg.get("quantize") is not None and cfg.quantize.bits is not None
    if not isinstance(cfg.shots, int) or cfg.shots < (0 if quantizing else 1):
        raise ConfigError(f"shots={cfg.shots!r} must be a positive integer"
                          + ("" if quantizing else " (shots=0, quantization alone, needs quantize.bits)"))
    for key in ("damping_a", "damping_g"):
        if cfg.curvature[key] < 0:
            raise ConfigError(f"curvature.{key}={cfg.curvature[key]} must be >= 0")
    update = cfg["update"]  # not cfg.update: that is DictConfig's own dict method
    _one_of("update.solver", update.solver, SOLVERS)
    if not isinstance(update.tol, (int, float)) or not 0 < update.tol < 1:
        raise ConfigError(f"update.tol={update.tol!r} must be a relative residual in (0, 1)")
    if not isinstance(update.max_iter, int) or update.max_iter < 1:
        raise ConfigError(f"update.max_iter={update.max_iter!r} must be a positive integer")
    if cfg.max_correlate < 0:
        raise ConfigError(f"max_correlate={cfg.max_correlate} must be >= 0 (0: whole layer)")
    for key in ("n", "seq_len", "batch_size"):
        if cfg.calib[key] < 1:
            raise ConfigError(f"calib.{key}={cfg.calib[key]} must be a positive integer")
    if cfg.eval.every < 0:
        raise ConfigError(f"eval.every={cfg.eval.every} must be >= 0 (0: only dense and final)")
    if cfg.eval.max_windows is not None and cfg.eval.max_windows < 1:
        raise ConfigError(f"eval.max_windows={cfg.eval.max_windows} must be a positive integer or null")

    structure, method = cfg.structure.name, cfg.method.name
    if structure == "semistructured":
        n, m = cfg.structure.n, cfg.structure.m
        if not (isinstance(n, int) and isinstance(m, int) and 0 < n < m):
            raise ConfigError(f"structure.n={n} and structure.m={m}: need integers with 0 < structure.n < structure.m")
        if abs(target - (m - n) / m) > 1e-9:
            raise ConfigError(f"target={target} must equal (m-n)/m={(m - n) / m} for structure=semistructured {n}:{m}")
    if method in LAYERWISE_METHODS:
        if structure == "structured":
            raise ConfigError(f"method={method} cannot do structure=structured; valid: unstructured, semistructured")
        if cfg.curvature.kind != "none":
            raise ConfigError(f"method={method} gathers its own layer-wise statistics: curvature.kind must be none "
                              "(set by its preset)")
        if cfg.curvature.rank != 1:
            raise ConfigError(f"method={method} has no Kronecker rank; use curvature.rank=1")
        if structure == "semistructured" and cfg.shots != 1:
            raise ConfigError(f"shots={cfg.shots}: method={method} with structure=semistructured prunes every "
                              "block to N:M at once; use shots=1")
    elif cfg.curvature.kind == "none":
        raise ConfigError(f"curvature.kind=none is only for method=sparsegpt|wanda, not method={method}")
    if cfg.curvature.rank == 2 and cfg.curvature.kind != "kfac":
        raise ConfigError(f"curvature.rank=2 needs curvature.kind=kfac, not {cfg.curvature.kind}")
    _check_auto_damping(cfg)
    _check_quantize(cfg)
    eps = cfg.curvature.rank2_eps
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
        raise ConfigError(f"curvature.rank2_eps={eps!r} must lie in (0, 1): the least curvature of the rank-2 "
                          "Fisher relative to its damped first term")

    _check_settings(cfg)
    _check_distributed(cfg)
    _check_device_map(cfg)
    if not str(cfg.device) == "auto" and not str(cfg.device).startswith(("cpu", "cuda")):
        raise ConfigError(f"device={cfg.device!r}; valid values: auto, cpu, cuda, cuda:N")
    if str(cfg.device).startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"device={cfg.device} but CUDA is not available; use device=auto or device=cpu")

    if check_sources:
        if cfg.data.name in ("testbed", "text"):
            for key in ("calib_path", "eval_path"):
                path = cfg.data[key]
                if not Path(path).is_file():
                    hint = ""
                    if cfg.data.name == "testbed":
                        hint = (f"; the testbed lives in ../shared or $SURGEON_SHARED (now {shared_dir()}); "
                                f"to run the paper setting: {PAPER_SETTING}")
                    raise ConfigError(f"data.{key}={path} does not exist{hint}")
                if Path(path).stat().st_size == 0:
                    raise ConfigError(f"data.{key}={path} is empty")
        check_model_source(cfg)
        check_model_type(cfg)
        cfg.curvature.accumulate = resolve_accumulate(cfg)  # the record and the passes see the value, never "auto"
        check_memory(cfg)
        if cfg.eval.lm_eval.tasks:
            _check_lm_eval_tasks(cfg)


DTYPES = ("float32", "bfloat16", "float16", "float64")
# top-level groups whose every key is in config.yaml (presets only set them): a key outside them is a typo
CLOSED_GROUPS = ("update", "curvature", "calib", "eval", "lora", "distributed", "quantize")


def _positive_int(key: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key}={value!r} must be a positive integer" + (" or null" if allow_none else ""))


def _check_auto_damping(cfg: DictConfig) -> None:
    """curvature.damping=auto: a method whose costs or updates the KFAC damping moves, and sane search settings."""
    _one_of("curvature.damping", cfg.curvature.damping, ("fixed", "auto"))
    if cfg.curvature.damping != "auto":
        return
    method = cfg.method.name
    if method in LAYERWISE_METHODS:
        raise ConfigError(f"curvature.damping=auto sets the KFAC damping; method={method} has none (SparseGPT keeps "
                          "its own method.percdamp); use curvature.damping=fixed")
    if cfg.curvature.kind == "identity":
        raise ConfigError(f"curvature.damping=auto: method={method} has identity curvature, which no damping "
                          "changes; use curvature.damping=fixed")
    if cfg.curvature.damping_a == 0 and cfg.curvature.damping_g == 0:
        raise ConfigError("curvature.damping=auto scales curvature.damping_a and curvature.damping_g, which are "
                          "both 0; give them a starting value (e.g. 0.01)")
    auto = cfg.curvature.auto_damping
    _positive_int("curvature.auto_damping.heldout", auto.heldout)
    if not isinstance(auto.step, (int, float)) or isinstance(auto.step, bool) or not auto.step > 1:
        raise ConfigError(f"curvature.auto_damping.step={auto.step!r} must be a factor > 1")
    if isinstance(auto.tries, bool) or not isinstance(auto.tries, int) or auto.tries < 2:
        raise ConfigError(f"curvature.auto_damping.tries={auto.tries!r} must be an integer >= 2 (the current scale "
                          "and at least one other)")
    _one_of("curvature.auto_damping.choose", auto.choose, ("lowest", "within_se"))
    _positive_int("curvature.auto_damping.every", auto.every)
    if not isinstance(auto.monotone, bool):
        raise ConfigError(f"curvature.auto_damping.monotone={auto.monotone!r} must be true or false")
    tol = auto.get("tol")
    if tol is not None and (isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 < tol < 1):
        raise ConfigError(f"curvature.auto_damping.tol={tol!r} must be a relative residual in (0, 1), or null (the "
                          "tries solve to update.tol)")


def _check_quantize(cfg: DictConfig) -> None:
    """quantize.*: the grid and the update (surgeon.quantize), before anything is loaded."""
    q = cfg.get("quantize")
    if q is None or q.bits is None:
        return
    from .quantize import METHODS, OBSERVERS, ORDERS

    if not isinstance(q.bits, int) or isinstance(q.bits, bool) or not 2 <= q.bits <= 8:
        raise ConfigError(f"quantize.bits={q.bits!r} must be null (no quantization) or an integer from 2 to 8")
    if not isinstance(q.group_size, int) or isinstance(q.group_size, bool) or q.group_size < 0:
        raise ConfigError(f"quantize.group_size={q.group_size!r} must be a non-negative integer (0: one scale per row)")
    _one_of("quantize.method", q.method, METHODS)
    _one_of("quantize.order", q.order, ORDERS)
    _one_of("quantize.observer", q.get("observer", "minmax"), OBSERVERS)
    for key in ("symmetric", "export", "sequential", "baseline"):
        if not isinstance(q[key], bool):
            raise ConfigError(f"quantize.{key}={q[key]!r} must be true or false")
    if not isinstance(q.damping, (int, float)) or isinstance(q.damping, bool) or q.damping <= 0:
        raise ConfigError(f"quantize.damping={q.damping!r} must be positive (A + damping mean(diag A) I)")
    _positive_int("quantize.blocksize", q.blocksize)
    if q.budget is None:
        return
    widths = list(q.widths) if q.widths is not None else []
    if not widths or any(isinstance(b, bool) or not isinstance(b, int) or not 2 <= b <= 8 for b in widths):
        raise ConfigError(f"quantize.widths={widths!r} must be a list of integer widths from 2 to 8")
    if isinstance(q.budget, bool) or not isinstance(q.budget, (int, float)) or not min(widths) <= q.budget <= max(widths):
        raise ConfigError(f"quantize.budget={q.budget!r} must be average bits per weight between the narrowest and "
                          f"widest of quantize.widths ({min(widths)}..{max(widths)})")
    if q.method != "gptq":
        raise ConfigError(f"quantize.budget allocates widths by the KFAC costs of the OBS update; quantize.method="
                          f"{q.method} has none: use quantize.method=gptq")


def _check_settings(cfg: DictConfig) -> None:
    """Keys not covered by the checks above: unknown keys (also when added with +), LoRA, the layer-wise
    baselines' settings, the rank-2 iterations and the model dtype."""
    base = OmegaConf.load(PROJECT_ROOT / "conf" / "config.yaml")
    known = set(base) - {"defaults", "hydra"} | {"model", "data", "method", "structure", "logger"}
    unknown = sorted(set(cfg) - known)
    for group in CLOSED_GROUPS:
        unknown += sorted(f"{group}.{k}" for k in _flat_keys(cfg[group]) - _flat_keys(base[group]))
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(unknown)}; the keys are listed in conf/config.yaml "
                          "and the README (a typo? `+key=value` adds a key, it does not check it)")
    _one_of("model.dtype", cfg.model.get("dtype", "float32"), DTYPES)
    if not isinstance(cfg.save_model, bool):
        raise ConfigError(f"save_model={cfg.save_model!r} must be true or false")
    if not (isinstance(cfg.compact, bool) or cfg.compact == "uniform"):
        raise ConfigError(f"compact={cfg.compact!r}; valid values: false, true, uniform")
    if cfg.compact and cfg.structure.name != "structured":
        raise ConfigError(f"compact={str(cfg.compact).lower()} needs structure=structured: {cfg.structure.name} zeros are not whole rows "
                          "and columns, nothing would get smaller")
    _positive_int("curvature.rank2_iters", cfg.curvature.rank2_iters)
    _positive_int("moe.min_tokens", cfg.moe.min_tokens)
    _check_whole_experts(cfg)
    lora = cfg.lora
    if not isinstance(lora.enabled, bool):
        raise ConfigError(f"lora.enabled={lora.enabled!r} must be true or false")
    _positive_int("lora.rank", lora.rank)
    _positive_int("lora.steps", lora.steps, allow_none=True)
    if not isinstance(lora.lr, (int, float)) or lora.lr <= 0:
        raise ConfigError(f"lora.lr={lora.lr!r} must be a positive learning rate")
    if not isinstance(lora.fraction, (int, float)) or not 0 < lora.fraction <= 1:
        raise ConfigError(f"lora.fraction={lora.fraction!r} must be a fraction of the calibration set in (0, 1]")
    if "blocksize" in cfg.method:
        _positive_int("method.blocksize", cfg.method.blocksize)
    if "percdamp" in cfg.method and (not isinstance(cfg.method.percdamp, (int, float)) or cfg.method.percdamp < 0):
        raise ConfigError(f"method.percdamp={cfg.method.percdamp!r} must be >= 0")


def _check_distributed(cfg: DictConfig) -> None:
    """Settings a run over several processes (WORLD_SIZE > 1, set by torchrun or SLURM) does not split yet."""
    timeout = cfg.distributed.timeout_s
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ConfigError(f"distributed.timeout_s={timeout!r} must be a positive number of seconds")
    from .distributed import env_world_size

    world = env_world_size()
    if world <= 1:
        return
    one = "run it in one process (python run.py)"
    if cfg.method.name in LAYERWISE_METHODS:
        raise ConfigError(f"method={cfg.method.name} is not split over processes (WORLD_SIZE={world}); {one}")
    if cfg.lora.enabled:
        raise ConfigError(f"lora.enabled=true is not split over processes (WORLD_SIZE={world}); {one}")
    if cfg.curvature.offload != "none":
        raise ConfigError(f"curvature.offload={cfg.curvature.offload} is not supported over processes "
                          f"(WORLD_SIZE={world}); use curvature.offload=none, or {one}")
    if cfg.curvature.fisher == "sampled":
        raise ConfigError(f"curvature.fisher=sampled draws its labels batch after batch from one generator, which "
                          f"processes cannot share (WORLD_SIZE={world}); use curvature.fisher=empirical, or {one}")
    batches = -(-cfg.calib.n // cfg.calib.batch_size)
    if cfg.curvature.kind != "identity" and batches < world:
        raise ConfigError(f"calib.n={cfg.calib.n} with calib.batch_size={cfg.calib.batch_size} makes {batches} "
                          f"calibration batches, fewer than the {world} processes; lower calib.batch_size")


DEVICE_MAPS = ("auto", "balanced", "sequential")


def _check_device_map(cfg: DictConfig) -> None:
    """model.device_map (accelerate's placement of one model over several GPUs, in one process) and
    model.max_memory; refused with what the placement does not support."""
    device_map, max_memory = cfg.model.get("device_map"), cfg.model.get("max_memory")
    if device_map is None:
        if max_memory is not None:
            raise ConfigError("model.max_memory is read only with model.device_map; set model.device_map=auto, "
                              "or model.max_memory=null")
        return
    mapping = isinstance(device_map, DictConfig)
    shown = f"model.device_map={OmegaConf.to_container(device_map) if mapping else device_map}"
    if mapping:
        if not len(device_map):
            raise ConfigError(f"{shown} is empty; map module names to devices, e.g. {{'': 0}}")
        for name, where in device_map.items():
            _check_placed_device(f"model.device_map: {name!r} ->", where)
    elif device_map not in DEVICE_MAPS:
        raise ConfigError(f"model.device_map={device_map!r} is not valid; valid values: null, "
                          f"{', '.join(DEVICE_MAPS)}, or a mapping module name -> device")
    if max_memory is not None:
        from accelerate.utils import convert_file_size_to_int

        if not isinstance(max_memory, DictConfig) or not len(max_memory):
            raise ConfigError(f"model.max_memory={max_memory!r} must map devices to sizes, e.g. {{0: 20GiB, 1: 20GiB}}")
        for where, size in max_memory.items():
            _check_placed_device("model.max_memory:", where)
            try:
                convert_file_size_to_int(size)
            except ValueError:
                raise ConfigError(f"model.max_memory: {where}: {size!r} is not a size; use e.g. 20GiB") from None
    from .distributed import env_world_size

    world = env_world_size()
    clash = ((world > 1, f"torchrun or srun (WORLD_SIZE={world}): a device map is one process; run python run.py"),
             (cfg.lora.enabled, "lora.enabled=true; set lora.enabled=false"),
             (cfg.curvature.offload == "cpu", "curvature.offload=cpu; set curvature.offload=none"),
             (bool(cfg.compact), f"compact={str(cfg.compact).lower()}; set compact=false"))
    for refused, why in clash:
        if refused:
            raise ConfigError(f"{shown} does not work with {why}, or model.device_map=null")


def _check_placed_device(where: str, device) -> None:
    """A device of model.device_map or model.max_memory: a GPU index, cuda:N or cpu (the GPU must exist)."""
    import torch

    from .models import as_device

    try:
        parsed = as_device(device)
    except ValueError:
        parsed = None
    if parsed is None or (parsed.type == "cuda" and parsed.index is None):
        raise ConfigError(f"{where} {device!r} is not a device; use a GPU index (0), cuda:N or cpu")
    gpu = parsed.index if parsed.type == "cuda" else None
    if gpu is not None and gpu >= torch.cuda.device_count():
        raise ConfigError(f"{where} {device!r} is GPU {gpu}, but this machine has {torch.cuda.device_count()}; "
                          "use cpu or an existing GPU")


def _flat_keys(node, prefix: str = "") -> set[str]:
    if not isinstance(node, DictConfig):
        return set()
    out = set()
    for key in node:
        out.add(prefix + str(key))
        out |= _flat_keys(node[key], f"{prefix}{key}.")
    return out


def _check_lm_eval_tasks(cfg: DictConfig) -> None:
    """Resolve eval.lm_eval.tasks in the task index now, not after all shots."""
    from .downstream import check_task_names

    try:
        check_task_names(list(cfg.eval.lm_eval.tasks), cfg.eval.lm_eval.include_path)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def check_memory(cfg: DictConfig) -> None:
    """Refuse, in one line with the numbers and settings that would fit, a run whose estimated peak memory
    (surgeon.memory, from the model's config: nothing is loaded) exceeds the device's memory, or with
    model.device_map the sum of its devices' memory (or of model.max_memory)."""
    from . import memory
    from .models import placement

    have, room, devices, place = _room(cfg)
    if have is None:
        return
    config = _model_config(cfg)
    if config is None:  # no config to read (a hub model not cached yet): the preset's parameter count
        params = cfg.model.get("params")
        need = 4.0 * float(params) * 1.5 if params else 0
        if need > have:
            raise ConfigError(f"model={cfg.model.name} needs about {need / 2**30:.1f} GiB in float32 but {room}; "
                              "use a larger device or a smaller model preset")
        return
    positions = getattr(config, "max_position_embeddings", None)
    for key in ("calib.seq_len", "eval.seq_len"):
        value = OmegaConf.select(cfg, key)
        if positions and value > positions:
            raise ConfigError(f"{key}={value} is longer than the model's max_position_embeddings={positions}")
    settings = {**run_settings(cfg), "runtime": sum(memory.RUNTIME.get(d.type, 0) for d in devices)}
    need = memory.estimate(config, **settings)
    if need.peak > have:
        hints = memory.fix_hints(config, need, have, offload_ok=not place, **settings)
        raise ConfigError(f"model={cfg.model.name} needs about {need.describe()} but {room}; "
                          f"try {' or '.join(hints)}")


def _room(cfg: DictConfig, shared: bool = True):
    """(bytes the run may use or None when unknown, those words for a message, the devices, the device map):
    a device map's devices together (or model.max_memory), else the device's memory, on CPU divided among the
    processes of the machine unless not `shared`."""
    from . import memory
    from .models import placement

    place = placement(cfg)
    if place:  # a device map: the estimate against the memory of all its devices together
        have, devices = memory.placement_bytes(place["device_map"], place.get("max_memory"))
        source = "model.max_memory gives" if "max_memory" in place else "together have"
        room = f"the device map's devices ({', '.join(map(str, devices))}) {source} {(have or 0) / 2**30:.1f} GiB"
        return have, room, devices, place
    devices = [resolve_device(cfg.device)]
    have = memory.available_bytes(devices[0])
    if have is None:
        return None, "", devices, place
    sharing = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if devices[0].type == "cpu" and shared else 1
    have //= sharing  # processes of one machine on CPU share its memory (torchrun; each GPU is its own)
    room = f"{devices[0]} has {have / 2**30:.1f} GiB" + (f" for each of its {sharing} processes" if sharing > 1
                                                         else "")
    return have, room, devices, place


def resolve_accumulate(cfg: DictConfig) -> str:
    """curvature.accumulate, with `auto` decided: float64 sums (exact, so any number of processes gives the
    one-process factors bit for bit) when the run's memory estimate with them fits the device's whole memory,
    float32 otherwise (a large model, whose float64 sums would not fit; or one whose config cannot be read
    before it loads). The whole memory, never a process's share: 1 and K processes of a machine decide alike."""
    from . import memory

    value = cfg.curvature.accumulate
    if value != "auto":
        return value
    if cfg.model.dtype == "float64" or cfg.curvature.kind in ("identity", "none"):
        return "float64"  # float64 statistics already, or no sums at all: either is the same run
    config = _model_config(cfg)
    have, _, devices, _ = _room(cfg, shared=False)
    if config is None or have is None:
        return "float32"
    settings = {**run_settings(cfg), "accumulate": "float64",
                "runtime": sum(memory.RUNTIME.get(d.type, 0) for d in devices)}
    return "float64" if memory.estimate(config, **settings).peak <= have else "float32"


WHOLE_COSTS = ("reroute", "zero")  # moe.whole_cost: measured re-routing cost, or the KFAC cost of a zeroed output


def _check_whole_experts(cfg: DictConfig) -> None:
    """moe.whole_experts: routed experts removed whole, their router rows masked (surgeon.moe.mask_routers)."""
    whole = cfg.moe.get("whole_experts", False)
    if not isinstance(whole, bool):
        raise ConfigError(f"moe.whole_experts={whole!r} must be true or false")
    cost = cfg.moe.get("whole_cost", "reroute")
    if cost not in WHOLE_COSTS:
        raise ConfigError(f"moe.whole_cost={cost!r} is not supported; valid values: {list(WHOLE_COSTS)}")
    if not whole:
        return
    if cfg.structure.name != "structured" or cfg.method.name in LAYERWISE_METHODS:
        raise ConfigError(f"moe.whole_experts=true removes whole experts in structured pruning: it needs "
                          f"structure=structured and a method with structured costs (surgeon, kobd, lobd, magnitude), "
                          f"not structure={cfg.structure.name} method={cfg.method.name}")
    if cfg.selection == "uniform":
        raise ConfigError("moe.whole_experts=true with selection=uniform: an expert is removed whole or not at all, it "
                          "has no ratio of its own to keep; use selection=global")
    if cfg.compact == "uniform":
        raise ConfigError("moe.whole_experts=true with compact=uniform: blocks may keep different numbers of experts "
                          "and a padded expert would still be routed to; use compact=true (surgeon.compact.load_compact "
                          "reads it; the stock class does where every block keeps as many)")
    if cfg.save_model and not cfg.compact:
        raise ConfigError("moe.whole_experts=true with save_model=true needs compact=true: the stock class cannot mask "
                          "a router row, so a removed expert is saved removed (router row and weights gone)")


def check_model_type(cfg: DictConfig) -> None:
    """Refuse a model family without an adapter from its config alone (config.json's `model_type`, or a GGUF
    file's header), before the tokenizer or any weight is read; a config that cannot be read without a download
    is checked when the model loads."""
    from .adapters import adapter_for

    config = _model_config(cfg)
    model_type = getattr(config, "model_type", None)
    path = Path(model_path(cfg)) / "config.json"
    if model_type is None and path.is_file():  # a type transformers itself does not know
        try:
            model_type = json.loads(path.read_text()).get("model_type")
        except (OSError, ValueError):
            raise ConfigError(f"model.name_or_path: {path} is not readable JSON") from None
    if model_type is None:
        return
    try:
        adapter = adapter_for(model_type)
    except ValueError as err:
        raise ConfigError(f"model.name_or_path={cfg.model.name_or_path}: {err}") from None
    from .adapters import MoEAdapter

    if cfg.get("moe", {}).get("whole_experts") and not isinstance(adapter, MoEAdapter):
        raise ConfigError(f"moe.whole_experts=true but model_type {model_type} has no routed experts (the families "
                          f"with them: mixtral, qwen2_moe, qwen3_moe, olmoe)")


def run_settings(cfg: DictConfig) -> dict:
    """The settings of surgeon.memory.estimate that a config sets."""
    return dict(dtype=cfg.model.dtype, kind=cfg.curvature.kind, rank=cfg.curvature.rank, structure=cfg.structure.name,
                calib_batch=cfg.calib.batch_size, calib_seq_len=cfg.calib.seq_len, eval_batch=cfg.eval.batch_size,
                eval_seq_len=cfg.eval.seq_len, calib_n=cfg.calib.n, layerwise=cfg.method.name in LAYERWISE_METHODS,
                offload=cfg.curvature.offload == "cpu", accumulate=cfg.curvature.accumulate)


def _model_config(cfg: DictConfig):
    """The model's transformers config if it can be read without a download, else None."""
    from transformers import AutoConfig

    kwargs = {"gguf_file": str(cfg.model.gguf_file)} if cfg.model.get("gguf_file") else {}
    try:
        path = model_path(cfg)  # a ConfigError (pkg: not installed, ...) is the loader's to report
        return AutoConfig.from_pretrained(path, revision=cfg.model.get("revision"), local_files_only=True, **kwargs)
    except Exception:  # noqa: BLE001 - not local, not cached, or unreadable: the loader reports it later
        return None


def resolve_device(device: str):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not str(device).startswith(("cpu", "cuda")):  # before validate: a run joins its process group first
        raise ConfigError(f"device={device!r}; valid values: auto, cpu, cuda, cuda:N")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ConfigError(f"device={device!r}; valid values: auto, cpu, cuda, cuda:N") from None


def to_container(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)
