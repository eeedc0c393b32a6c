"""Weights & Biases logging of a pruning run, fed from the same result record as the tables.

Offline unless asked for online with an API key present. W&B is a convenience: every
failure inside it becomes one warning and the pruning run goes on.
"""
from __future__ import annotations

import functools
import netrc
import os
import warnings
from pathlib import Path
from urllib.parse import urlparse


def has_api_key() -> bool:
    """Whether W&B could authenticate: WANDB_API_KEY, or a netrc entry for the W&B host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        entry = netrc.netrc(path).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def resolve_mode(mode: str) -> str:
    """The W&B mode to use: "online" only when asked for and a key exists, else "offline" (or "disabled")."""
    if mode not in ("online", "offline", "disabled"):
        raise ValueError(f"logger.mode must be one of online | offline | disabled, got {mode!r}")
    if mode == "online" and not has_api_key():
        warnings.warn("logger.mode=online but no W&B API key (WANDB_API_KEY or netrc); logging offline instead")
        return "offline"
    return mode


def _never_raises(method):
    """A failing W&B call becomes one warning; the run goes on."""
    @functools.wraps(method)
    def safe(self, *args, **kwargs):
        if self.run is None:
            return None
        try:
            return method(self, *args, **kwargs)
        except Exception as err:  # noqa: BLE001 - whatever W&B raises, pruning must continue
            warnings.warn(f"W&B {method.__name__} failed, continuing without it: {err!r}")
            return None
    return safe


class WandbLogger:
    """One W&B run per pruning run: dense and per-shot metrics, then the final record."""

    def __init__(self, cfg_dict: dict, *, project="surgeon", mode="offline", run_name=None, dir=None, tags=None):
        self.run = None
        self.mode = resolve_mode(mode)
        try:
            import wandb

            if dir is not None:
                Path(dir).mkdir(parents=True, exist_ok=True)
            self.run = wandb.init(project=project, mode=self.mode, name=run_name, dir=dir, tags=tags,
                                  config=cfg_dict, settings=wandb.Settings(silent=True))
        except Exception as err:  # noqa: BLE001 - no W&B must not stop pruning
            warnings.warn(f"W&B init failed, running without W&B logging: {err!r}")

    @_never_raises
    def log_dense(self, ppl: float) -> None:
        """The dense model's perplexity, as step 0 of the perplexity curve."""
        self.run.summary["dense_ppl"] = ppl
        self.run.log({"ppl": ppl, "sparsity": 0.0}, step=0)

    @_never_raises
    def log_shot(self, point: dict, layers: list[dict]) -> None:
        """One shot's point of the record (step = shot); `layers` names the entries of point["layer_sparsity"]."""
        metrics = {"sparsity": point["sparsity"], "target": point["target"]}
        if point.get("ppl") is not None:
            metrics["ppl"] = point["ppl"]
        if point.get("peak_memory_mb") is not None:
            metrics["peak_memory_mb"] = point["peak_memory_mb"]
        metrics.update({f"seconds/{phase}": s for phase, s in (point.get("seconds") or {}).items()})
        for layer, sparsity in zip(layers, point.get("layer_sparsity") or []):
            metrics[f"layer_sparsity/{layer['name']}"] = sparsity
        for expert, tokens in (point.get("expert_tokens") or {}).items():  # routed experts' calibration tokens
            metrics[f"expert_tokens/{expert}"] = tokens
        for module, costs in (point.get("expert_costs") or {}).items():  # moe.whole_experts: each expert's cost
            for kind, values in costs.items():
                metrics.update({f"expert_cost/{kind}/{module}.{e}": v for e, v in enumerate(values)})
        damping = point.get("damping")  # curvature.damping=auto: the chosen damping and what the search measured
        if damping:
            metrics.update({f"damping/{key}": damping[key] for key in
                            ("chosen", "damping_a", "damping_g", "before", "heldout_loss", "predicted", "measured", "ratio")
                            if damping.get(key) is not None})
            metrics["damping/tries"] = len(damping["tried"])
        self.run.log(metrics, step=point["shot"])

    @_never_raises
    def log_final(self, record: dict) -> None:
        """Summary metrics, the per-layer allocation as a table and bar chart, and the allocation-by-depth figure."""
        import wandb

        summary = {key: record.get(key) for key in ("run_id", "dense_ppl", "final_ppl", "sparsity")}
        lm_eval = record.get("lm_eval") or {}
        dense = lm_eval.get("dense") or {}
        for prefix, tasks in (("lm_eval", lm_eval.get("tasks")), ("lm_eval_dense", dense.get("tasks", dense))):
            for task, result in (tasks or {}).items():
                summary[f"{prefix}/{task}/{result['metric']}"] = result["value"]
                if result.get("stderr") is not None:
                    summary[f"{prefix}/{task}/{result['metric']}_stderr"] = result["stderr"]
        compact = record.get("compact")
        if compact:
            summary.update({"compact/params": compact["params"], "compact/params_before": compact["params_before"],
                            "compact/ppl": compact["ppl"]})
        quantized = record.get("quantize")
        if quantized:
            summary.update({"quantize/ppl": quantized["ppl"], "quantize/before_ppl": quantized["before_ppl"],
                            "quantize/cost": quantized["cost"], "quantize/bits": quantized["bits"]})
            if quantized.get("export"):
                summary["quantize/bytes"] = quantized["export"]["bytes"]
            if quantized.get("baseline"):
                summary["quantize/rtn_ppl"] = quantized["baseline"]["ppl"]
        self.run.summary.update(summary)

        table = wandb.Table(columns=["name", "type", "block", "shape", "sparsity"],
                            data=[[layer["name"], layer["type"], layer["block"],
                                   "x".join(str(d) for d in layer["shape"]), layer["sparsity"]]
                                  for layer in record["layers"]])
        self.run.log({"allocation": table,
                      "allocation_bar": wandb.plot.bar(table, "name", "sparsity", title="sparsity per layer")})
        # remaining fraction per layer type against block depth, as a native W&B chart (no plotting library)
        series = {}
        for layer in record["layers"]:
            series.setdefault(layer["type"], []).append((layer["block"], 1 - layer["sparsity"]))
        lines = {kind: sorted(points) for kind, points in series.items()}
        self.run.log({"allocation_by_depth": wandb.plot.line_series(
            xs=[[b for b, _ in points] for points in lines.values()],
            ys=[[k for _, k in points] for points in lines.values()],
            keys=list(lines), title="remaining fraction per layer type by block", xname="block")})

    @_never_raises
    def finish(self, exit_code: int = 0) -> None:
        """Close the run (offline runs can be uploaded later with `wandb sync`)."""
        self.run.finish(exit_code=exit_code)
        self.run = None
