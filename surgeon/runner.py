"""The runner: validate, then `_prepare` (load, restore a checkpoint or evaluate dense), `_shot` per shot
(prune, LoRA, evaluate, record, checkpoint) and `_finish` (compact, lm-eval, save, record).

Reads top to bottom like the paper's algorithm; everything numeric lives in the modules
it calls (curvature -> obs -> selection -> prune), everything about bookkeeping in
`records`. The record is rewritten atomically after every shot and a checkpoint lets an
interrupted run resume from its last finished shot.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import resource
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from . import data as data_mod
from . import distributed, models
from .adapters import adapter_for, prunable_parameter_count
from .config import ConfigError, resolve_device, to_container, validate
from .evaluate import window_losses
from .prune import (PruneState, ShotOptions, apply_masks, check_finite, layer_sparsity, overall_sparsity,
                    prune_shot)
from .records import (add_point, append_jsonl, find_complete, git_commit, new_run_id, now_iso, portable_config,
                      protocol, same_protocol, upgrade, versions, write_json_atomic)
from .schedule import shot_targets

log = logging.getLogger("surgeon")

CHECKPOINT = "checkpoint.pt"
RECORD = "record.json"


def _peak_memory_mb(devices: list[torch.device]) -> float:
    """CUDA peak, summed over the GPUs of a device map (an upper bound of their peak together), or on CPU the
    process's peak RSS."""
    gpus = [device for device in devices if device.type == "cuda"]
    if gpus:
        return sum(torch.cuda.max_memory_allocated(device) for device in gpus) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (KiB on Linux)


def _reset_peaks(devices: list[torch.device]) -> None:
    for device in devices:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)


def _write_record(path: Path, record: dict) -> None:
    """The record, written by rank 0 only (one record for a run over several processes)."""
    if distributed.is_main():
        write_json_atomic(path, record)


def perplexity(model, windows: torch.Tensor, batch_size: int = 8) -> float:
    """exp(mean window loss); over several processes each evaluates a contiguous share of the batches of windows
    (the same batches as one process) and the losses are gathered in window order."""
    mine = distributed.share(list(windows.split(batch_size)))
    losses = window_losses(model, torch.cat(mine), batch_size) if mine else torch.zeros(0, dtype=torch.float64)
    return math.exp(distributed.gather_losses(losses).mean().item())


def _make_logger(cfg, run_dir: Path):
    if cfg.logger.name != "wandb" or not distributed.is_main():
        return None
    try:
        from .wandb_logger import WandbLogger

        return WandbLogger(to_container(cfg), project=cfg.logger.project, mode=cfg.logger.mode,
                           run_name=cfg.logger.run_name, dir=str(run_dir), tags=list(cfg.logger.tags))
    except Exception as err:  # noqa: BLE001 - a failing W&B never kills the run
        log.warning("W&B disabled: %s", err)
        return None


def _lm_eval(cfg, model, tokenizer):
    from .downstream import run_lm_eval

    lm = cfg.eval.lm_eval
    return run_lm_eval(model, tokenizer, list(lm.tasks), include_path=lm.include_path, num_fewshot=lm.num_fewshot,
                       batch_size=lm.batch_size, limit=lm.limit)


def _save_checkpoint(path: Path, layers, state: PruneState, shot: int, record: dict) -> None:
    """Weights of the prunable layers, masks, RNG and loop state, written atomically (by rank 0)."""
    if not distributed.is_main():
        return
    payload = {
        "shot": shot,
        "weights": {l.name: {k: v.detach().cpu() for k, v in l.module.state_dict().items()} for l in layers},
        "state": state.state_dict(),
        "record": record,
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
    }
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def _load_checkpoint(path: Path, cfg, device) -> dict | None:
    if not path.exists():
        log.warning("resume=true but %s has no checkpoint: starting from shot 1", path.parent)
        return None
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    old, new = upgrade({"protocol": ckpt["record"]["protocol"]})["protocol"], protocol(cfg, str(device))
    changed = [k for k in new if k != "device" and not same_protocol({k: old.get(k)}, {k: new[k]})]
    if changed:
        raise ConfigError(f"resume=true but the run in {path.parent} was made with different "
                          f"{', '.join(changed)}; use a new hydra.run.dir or the same settings")
    return ckpt


def summary_table(record: dict) -> str:
    auto = any(p.get("damping") for p in record["points"])  # curvature.damping=auto: the damping each shot chose
    head = f" {'damping_a':>9} {'damping_g':>9} {'tried':>5}" if auto else ""
    lines = [f"{'shot':>4} {'target':>7} {'sparsity':>8} {'ppl':>10} {'seconds':>8}" + head,
             f"{'dense':>4} {'':>7} {0.0:>8.4f} {record['dense_ppl'] or float('nan'):>10.3f}"]
    for p in record["points"]:
        ppl = f"{p['ppl']:>10.3f}" if p["ppl"] is not None else f"{'-':>10}"
        d = p.get("damping")
        damping = f" {d['damping_a']:>9.4g} {d['damping_g']:>9.4g} {len(d['tried']):>5}" if d else ""
        lines.append(f"{p['shot']:>4} {p['target']:>7.4f} {p['sparsity']:>8.4f} {ppl} "
                     f"{sum(p['seconds'].values()):>8.1f}" + damping)
    c = record.get("compact")
    if c:
        experts = f", {c['experts']['kept']} of {c['experts']['total']} routed experts kept" if c.get("experts") else ""
        lines.append(f"compacted: {c['params_before']} -> {c['params']} parameters "
                     f"({c['params'] / c['params_before']:.3f}{experts}), ppl {c['ppl']:.3f}")
    q = record.get("quantize")
    if q:
        export = f", saved {q['export']['format']} {q['export']['bytes'] / 1e6:.1f} MB" if q.get("export") else ""
        observer = f", {q['observer']} observer" if q.get("observer") else ""  # records before it: the min-max range
        lines.append(f"quantized: {q['mean_bits']:.3g} bits per weight ({q['method']}, group {q['group_size']}"
                     f"{observer}), "
                     f"ppl {q['before_ppl']:.3f} -> {q['ppl']:.3f}{export}"
                     + (f" (round to nearest: {q['baseline']['ppl']:.3f})" if q.get("baseline") else ""))
    lm = record.get("lm_eval") or {}
    for task, result in lm.get("tasks", {}).items():
        dense = lm.get("dense", {}).get("tasks", {}).get(task)
        lines.append(f"lm-eval {task} {result['metric']}: " + (f"dense {dense['value']:.4f}, " if dense else "")
                     + f"final {result['value']:.4f}")
    return "\n".join(lines)


def find_resumable(cfg: DictConfig, roots=("outputs", "multirun")) -> Path:
    """The newest run folder under `roots` holding a checkpoint of an unfinished run with this protocol
    (`resume=true` without hydra.run.dir), or a ConfigError saying which folder to give."""
    new = protocol(cfg, str(resolve_device(cfg.device)))
    found = []
    for root in map(Path, roots):
        for record_path in root.glob("**/" + RECORD) if root.is_dir() else ():
            try:
                record = json.loads(record_path.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if (record.get("status") != "complete" and (record_path.parent / CHECKPOINT).exists()
                    and same_protocol(upgrade(record).get("protocol", {}), new)):
                found.append((record.get("started") or "", record_path.parent))
    if not found:
        raise ConfigError(f"resume=true: no unfinished run with these settings under {', '.join(roots)}; "
                          "name its folder: resume=true hydra.run.dir=<run directory>")
    return max(found)[1]


def run(cfg: DictConfig, run_dir: str | Path, resume_hint: str | None = None) -> dict:
    """Run one pruning job; returns its record (also in run_dir/record.json and cfg.results).
    `resume_hint`, the command that resumes this run, is printed with the run directory at start."""
    validate(cfg)  # before anything heavy: a bad input never loads a model
    if distributed.active():  # curvature.accumulate=auto decided alike by every rank: float64 where all chose it
        if not distributed.reduce_ints([int(cfg.curvature.accumulate == "float64")], "min")[0]:
            cfg.curvature.accumulate = "float32"
    run_dir = Path(run_dir)
    device = distributed.local_device(resolve_device(cfg.device))
    if cfg.skip_done and not cfg.resume:
        done = find_complete(cfg, str(device))
        wanted = not cfg.compact or (done or {}).get("compact") and done["compact"].get("uniform") == (
            cfg.compact == "uniform")
        if done is not None and wanted:
            log.info("skip_done: %s already holds complete run %s with this protocol (final ppl %s); not rerun",
                     cfg.results, done["run_id"], done["final_ppl"])
            return done
    data = prepare_data(cfg)  # data too short for the windows fails here, before any output
    run_dir.mkdir(parents=True, exist_ok=True)
    if distributed.is_main():
        workers = f" ({distributed.world_size()} processes)" if distributed.active() else ""
        resume = f"\nto resume if interrupted: {resume_hint}" if resume_hint else ""
        print(f"run directory: {run_dir}{workers}{resume}", file=sys.stderr, flush=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    ckpt = _load_checkpoint(run_dir / CHECKPOINT, cfg, device) if cfg.resume else None

    record = ckpt["record"] if ckpt else {
        "run_id": new_run_id(), "status": "running", "started": now_iso(), "finished": None,
        "resumed_from_shot": None, "config": portable_config(to_container(cfg)), "protocol": protocol(cfg, str(device)),
        "dense_ppl": None, "final_ppl": None, "sparsity": None, "points": [], "layers": [], "lm_eval": None,
        "versions": versions(), "git_commit": git_commit(), "model_dir": None, "compact": None, "quantize": None,
        "error": None,
    }
    if ckpt:
        record.update(status="running", resumed_from_shot=ckpt["shot"], config=portable_config(to_container(cfg)))
    record["processes"] = distributed.world_size()  # of the last start (timings and peak memory are rank 0's)
    record_path = run_dir / RECORD
    _write_record(record_path, record)
    wandb = _make_logger(cfg, run_dir)
    try:
        record = _run(cfg, run_dir, device, record, ckpt, wandb, data)
    except BaseException as err:
        error = f"{type(err).__name__}: {err}"
        stopped = isinstance(err, (KeyboardInterrupt, distributed.RankStopped))
        if distributed.active():  # the record names the rank whose error came first
            distributed.report_failure(err)
            here = f"rank {distributed.rank()}: {error}"
            origin = distributed.failure() if distributed.is_main() else None
            if origin and origin != here:
                error, stopped = f"{origin} (then {here})", False
            else:
                error = here
        record.update(status="interrupted" if stopped else "failed", finished=now_iso(), error=error)
        _write_record(record_path, record)
        if wandb:
            wandb.finish(exit_code=1)
        raise
    if wandb:
        wandb.log_final(record)
        wandb.finish()
    return record


@dataclass
class Data:
    tokenizer: object
    calib: torch.Tensor         # (calib.n, calib.seq_len) calibration windows
    batches: list[torch.Tensor]
    eval_windows: torch.Tensor  # (windows, eval.seq_len)
    heldout: torch.Tensor | None = None  # curvature.damping=auto: held-out calibration windows


def prepare_data(cfg) -> Data:
    """Tokenizer, calibration batches and evaluation windows (section 2 data; docs/protocol.md windows)."""
    tokenizer = models.load_tokenizer(cfg)
    texts = data_mod.load_texts(cfg.data)
    ids = data_mod.tokenize(tokenizer, texts.calib)
    calib = data_mod.calibration_windows(ids, cfg.calib.n, cfg.calib.seq_len, cfg.calib.seed)
    heldout = None
    if cfg.curvature.damping == "auto":
        starts = data_mod.calibration_starts(ids, cfg.calib.n, cfg.calib.seq_len, cfg.calib.seed)
        heldout = data_mod.heldout_windows(ids, cfg.curvature.auto_damping.heldout, cfg.calib.seq_len,
                                           data_mod.heldout_seed(cfg.calib.seed), starts)
    eval_w = data_mod.eval_windows(data_mod.tokenize(tokenizer, texts.eval), cfg.eval.seq_len, cfg.eval.max_windows)
    return Data(tokenizer, calib, data_mod.batches(calib, cfg.calib.batch_size), eval_w, heldout)


@dataclass
class Job:
    """One run in progress: what its steps share."""

    cfg: DictConfig
    run_dir: Path
    device: torch.device
    record: dict
    wandb: object
    data: Data
    model: object = None
    layers: list = None
    state: PruneState = None
    start: int = 1      # the first shot still to run
    devices: list = None  # where the model is: [device], or the GPUs of a device map
    quantized: tuple = None  # quantize.bits: (the quantized layers, their results), for the export

    @property
    def main(self) -> bool:
        return distributed.is_main()

    def ppl(self) -> float:
        return perplexity(self.model, self.data.eval_windows, self.cfg.eval.batch_size)

    def write(self) -> None:
        _write_record(self.run_dir / RECORD, self.record)


def _run(cfg, run_dir: Path, device, record: dict, ckpt: dict | None, wandb, data: Data) -> dict:
    """Prepare (load, restore or evaluate dense), the shots, finish (compact, lm-eval, save, record)."""
    job = _prepare(Job(cfg, run_dir, device, record, wandb, data), ckpt)
    targets = shot_targets(cfg.target, cfg.shots, cfg.schedule) if cfg.shots else []  # shots=0: quantization alone
    opts = ShotOptions.from_config(cfg)
    for shot in tqdm(range(job.start, cfg.shots + 1), desc="shots", initial=job.start - 1, total=cfg.shots,
                     disable=not job.main):
        _shot(job, shot, targets[shot - 1], opts)
    return _finish(job)


def _prepare(job: Job, ckpt: dict | None) -> Job:
    """Load the model; restore the checkpoint's weights, masks and RNG, or evaluate the dense model."""
    cfg, record = job.cfg, job.record
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    _reset_peaks([job.device])
    job.model = models.load_model(cfg, job.device)
    job.devices = models.devices(job.model)
    adapter = adapter_for(job.model.config.model_type)
    job.layers = adapter.layers(job.model)
    record["protocol"]["eval"]["windows"] = job.data.eval_windows.shape[0]
    record["protocol"]["prunable_params"] = prunable_parameter_count(job.layers)
    record["layers"] = [{"name": l.name, "type": l.type, "block": l.block, "shape": list(l.shape), "sparsity": 0.0}
                        for l in job.layers]
    blocks = adapter.blocks(job.model)
    for entry, layer in zip(record["layers"], job.layers):  # a fused layer: which of its rows are which part's
        if layer.type in adapter.fused:
            groups = adapter.row_groups(layer, blocks[layer.block])
            entry["parts"] = {"layout": "per_head" if adapter.fused[layer.type].per_head else "concat",
                              "rows": {role: len(rows) for role, rows in groups.items()}}
    if cfg.model.get("device_map") is not None:  # where accelerate put each module (per block, typically)
        record["device_map"] = models.placed(job.model)
    if ckpt:
        with torch.no_grad():
            for layer in job.layers:
                layer.module.load_state_dict(ckpt["weights"][layer.name])
        job.state = PruneState.from_state_dict(ckpt["state"], job.layers)
        if cfg.moe.get("whole_experts") and cfg.structure.name == "structured":  # removed experts: routed to none
            from .moe import mask_routers

            mask_routers(job.layers, job.state.removed)
        torch.set_rng_state(ckpt["rng"]["torch"])
        random.setstate(ckpt["rng"]["python"])
        if ckpt["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        job.start = ckpt["shot"] + 1
        log.info("resuming %s after shot %d (its checkpoint): shots %d..%d", job.run_dir, ckpt["shot"], job.start,
                 cfg.shots)
        return job
    job.state = PruneState.empty(job.layers)
    if cfg.eval.dense:
        record["dense_ppl"] = job.ppl()
        log.info("dense perplexity %.3f", record["dense_ppl"])
        if job.wandb:
            job.wandb.log_dense(record["dense_ppl"])
    if cfg.eval.lm_eval.tasks and cfg.eval.lm_eval.dense and job.main:
        record["lm_eval"] = {"dense": _lm_eval(cfg, job.model, job.data.tokenizer)}
    job.write()
    return job


def _test_pause(shot: int) -> None:
    """Test-only: with SURGEON_TEST_PAUSE_AFTER_SHOT=shot, write SURGEON_TEST_PAUSE_FILE once this shot's
    checkpoint is on disk and wait there (at most 10 minutes), so a test's signal arrives in a known state, never
    on timing. Unset (every real run): nothing."""
    if os.environ.get("SURGEON_TEST_PAUSE_AFTER_SHOT") != str(shot):
        return
    Path(os.environ["SURGEON_TEST_PAUSE_FILE"]).write_text(str(shot))
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        time.sleep(0.05)


def _shot(job: Job, shot: int, target: float, opts: ShotOptions) -> None:
    """One shot (prune.prune_shot), LoRA, evaluation when due; the record and checkpoint written after it."""
    cfg, layers = job.cfg, job.layers
    _reset_peaks(job.devices)
    check_finite(layers, f"before shot {shot}")
    # curvature.damping=auto searches around the scale the previous shot chose (the record's, also after resume)
    chosen = [p["damping"]["chosen"] for p in job.record["points"] if p.get("damping")]
    kept = None  # curvature.auto_damping.every > 1: between searches the shot keeps the last chosen damping
    if opts.damping == "auto" and chosen and (shot - 1) % opts.every:
        kept = {"chosen": chosen[-1], "damping_a": opts.damping_a * chosen[-1],
                "damping_g": opts.damping_g * chosen[-1], "tried": []}
        opts = replace(opts, damping="fixed", damping_a=kept["damping_a"], damping_g=kept["damping_g"])
    seconds, solver_info = prune_shot(job.model, layers, job.data.batches, job.state, target, opts,
                                      seed=cfg.seed + shot, progress=job.main, heldout=job.data.heldout,
                                      scale=chosen[-1] if chosen else 1.0, first=not chosen)
    own_update_s = solver_info.pop("own_update_s", None)
    point = {"shot": shot, "target": target, **solver_info} | ({"damping": kept} if kept else {})
    if cfg.lora.enabled:
        t0 = time.perf_counter()
        point["lora"] = _lora(cfg, job.model, layers, job.data.calib, job.state, shot)
        seconds["lora"] = time.perf_counter() - t0
    check_finite(layers, f"after shot {shot}")
    evaluate = shot == cfg.shots or (cfg.eval.every and shot % cfg.eval.every == 0)
    t0 = time.perf_counter()
    point["ppl"] = job.ppl() if evaluate else None
    seconds["eval"] = time.perf_counter() - t0 if evaluate else 0.0
    point.update(sparsity=overall_sparsity(layers), seconds=seconds, peak_memory_mb=_peak_memory_mb(job.devices),
                 layer_sparsity=layer_sparsity(layers))
    if distributed.active():  # `seconds` and the peak are rank 0's; every rank's, in rank order, and the seconds
        # of its own layers' updates before it waited for the others' (the load balance)
        point["ranks"] = distributed.gather_objects({"seconds": seconds, "own_update_s": own_update_s,
                                                     "peak_memory_mb": point["peak_memory_mb"]})
    add_point(job.record, point)
    job.write()
    _save_checkpoint(job.run_dir / CHECKPOINT, layers, job.state, shot, job.record)
    _test_pause(shot)
    if job.wandb:
        job.wandb.log_shot(point, job.record["layers"])
    if job.main:
        log.info("shot %d/%d: target %.4f sparsity %.4f ppl %s", shot, cfg.shots, point["target"],
                 point["sparsity"], f"{point['ppl']:.3f}" if point["ppl"] is not None else "-")


def _finish(job: Job) -> dict:
    """Compaction, lm-eval, the saved model; the complete record written and appended to the results."""
    cfg, record, model = job.cfg, job.record, job.model
    if cfg.compact:  # on every rank (they hold the same model): the compacted model's evaluation is split too
        record["compact"] = _compact(model, job.ppl, record["final_ppl"], uniform=cfg.compact == "uniform")
    if cfg.quantize.bits is not None:  # on every rank, like compaction; the final perplexity is the quantized one
        record["quantize"] = _quantize(job)
        record["final_ppl"] = record["quantize"]["ppl"]
        job.write()
    if not job.main:  # the other ranks' part ends with the last evaluation
        record.update(status="complete", finished=now_iso())
        return record
    if cfg.eval.lm_eval.tasks:
        record["lm_eval"] = {**(record["lm_eval"] or {}), **_lm_eval(cfg, model, job.data.tokenizer)}
    if cfg.save_model:
        model_dir = job.run_dir / "model"
        models.drop_gguf_quantization(model)  # a float checkpoint, also for a GGUF model not loaded by load_model
        model.config.use_cache = True  # off only for calibration and evaluation here; a user's generate wants it
        if record.get("quantize") and cfg.quantize.export:
            from .quantize import export

            record["quantize"]["export"] = export(model, *job.quantized, cfg.quantize, model_dir)
            log.info("saved %s (%s, %.1f MB)", model_dir, record["quantize"]["export"]["format"],
                     record["quantize"]["export"]["bytes"] / 1e6)
        else:
            model.save_pretrained(model_dir)
        job.data.tokenizer.save_pretrained(model_dir)
        record["model_dir"] = str(model_dir.resolve())
    record.update(status="complete", finished=now_iso())
    job.write()
    append_jsonl(cfg.results, record)
    print(summary_table(record))
    return record


def _quantize(job: Job) -> dict:
    """Weight-only quantization of the model as the shots (and compaction) left it (surgeon.quantize): the report
    with the perplexity before and after, on the same windows."""
    from .quantize import quantize_model

    cfg, record = job.cfg, job.record
    layers = adapter_for(job.model.config.model_type).layers(job.model)  # after compaction: the smaller layers
    before = (record["compact"] or {}).get("ppl") or record["final_ppl"] or record["dense_ppl"]
    floats = None
    if cfg.quantize.baseline and cfg.quantize.method != "rtn":  # the float weights, for the round-to-nearest twin
        floats = {layer.name: (layer.weight.detach().cpu().clone(),
                               None if layer.bias is None else layer.bias.detach().cpu().clone()) for layer in layers}
    report, results = quantize_model(job.model, layers, job.data.batches, cfg.quantize, ShotOptions.from_config(cfg),
                                     seed=cfg.seed, progress=job.main)
    job.quantized = (layers, results)
    t0 = time.perf_counter()
    report.update(before_ppl=before, ppl=job.ppl())
    report["seconds"]["eval"] = time.perf_counter() - t0
    if floats is not None:
        report["baseline"] = _rtn_baseline(job, layers, floats, results)
    if job.main:
        log.info("quantized to %.3g bits per weight (%s, group %d, %s): perplexity %.4f (before %s), %d layer(s) "
                 "rounded to nearest by fallback", report["mean_bits"], cfg.quantize.method, cfg.quantize.group_size,
                 "symmetric" if cfg.quantize.symmetric else "asymmetric", report["ppl"],
                 f"{before:.4f}" if before is not None else "-", report["fallbacks"])
    return report


def _rtn_baseline(job: Job, layers, floats: dict, results: dict) -> dict:
    """quantize.baseline: the same model rounded to nearest on the same grid, each layer at the width the update
    gave it (mixed precision: the same allocation), evaluated on the same windows; then the update's weights go
    back (they are what is saved). Returns {"method": "rtn", "ppl", "seconds"}."""
    from .quantize import Grid, quantize_layer

    q, t0 = job.cfg.quantize, time.perf_counter()
    with torch.no_grad():
        for layer in layers:
            W, bias = floats[layer.name]
            grid = Grid(results[layer.name].bits, q.symmetric, q.group_size, q.get("observer", "minmax"))
            bias = None if bias is None else bias.to(layer.weight.device)
            rtn = quantize_layer(W.to(layer.weight.device), grid, bias=bias, method="rtn",
                                 column_weight=results[layer.name].column_weight)  # observer=cost: the same diag A
            layer.weight.copy_(rtn.W)
            if layer.bias is not None:
                layer.bias.copy_(rtn.bias)
        ppl = job.ppl()
        for layer in layers:
            layer.weight.copy_(results[layer.name].W)
            if layer.bias is not None:
                layer.bias.copy_(results[layer.name].bias)
    if job.main:
        log.info("round to nearest on the same grid (quantize.baseline): perplexity %.4f", ppl)
    return {"method": "rtn", "ppl": ppl, "seconds": time.perf_counter() - t0}


def _compact(model, ppl, final_ppl: float | None, uniform: bool) -> dict:
    """Remove the pruned rows and columns physically (surgeon.compact) and evaluate the smaller model on the same
    windows: its perplexity equals the zeroed model's up to float rounding."""
    from .compact import compact

    t0 = time.perf_counter()
    report = compact(model, uniform=uniform)
    report["ppl"] = ppl()
    report["seconds"] = time.perf_counter() - t0
    if distributed.is_main():
        experts = (f", {report['experts']['kept']} of {report['experts']['total']} routed experts"
                   if "experts" in report else "")
        log.info("compacted: %d -> %d parameters (%d of %d MLP units, %d of %d heads%s kept), perplexity %.4f "
                 "(zeroed %s)", report["params_before"], report["params"], report["mlp_units"]["kept"],
                 report["mlp_units"]["total"], report["heads"]["kept"], report["heads"]["total"], experts,
                 report["ppl"], f"{final_ppl:.4f}" if final_ppl is not None else "-")
    return report


def _lora(cfg, model, layers, calib: torch.Tensor, state: PruneState, shot: int) -> dict:
    """Interleaved low-rank first-order correction on a seeded subset of the calibration data (section 6)."""
    from .lora import lora_correction

    gen = torch.Generator().manual_seed(cfg.seed * 1000 + shot)
    k = max(1, round(cfg.lora.fraction * calib.shape[0]))
    subset = calib[torch.randperm(calib.shape[0], generator=gen)[:k]]
    lora_batches = data_mod.batches(subset, 1)
    steps = cfg.lora.steps or len(lora_batches)
    before = window_losses(model, subset).mean().item()
    losses = lora_correction(model, layers, lora_batches, state.removed, rank=cfg.lora.rank, lr=cfg.lora.lr,
                             steps=steps, seed=cfg.seed * 1000 + shot)
    apply_masks(layers, state)
    after = window_losses(model, subset).mean().item()
    return {"steps": steps, "loss_before": before, "loss_after": after, "step_losses": losses}
