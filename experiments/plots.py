"""Figures from result records: perplexity against model size, and the per-layer allocation.

matplotlib is optional: it is imported when a figure is drawn, and drawn with the Agg
canvas directly, so no global backend is switched.
"""
from __future__ import annotations

from pathlib import Path

from experiments.tables import method_name, model_name, run_labels


def _figure(**kwargs):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError("plots need matplotlib: pip install matplotlib") from err
    figure = Figure(**kwargs)
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=150, bbox_inches="tight")
    return path


def plot_ppl_vs_size(records: list[dict], path) -> Path:
    """Perplexity (log scale) against model size (1 - sparsity), one panel per model, one series per run.

    Structured runs contribute every point with a perplexity; other runs their final point.
    """
    models = list(dict.fromkeys(model_name(r) for r in records))
    labels = run_labels(records)
    figure = _figure(figsize=(5 * max(len(models), 1), 4), layout="constrained")
    from matplotlib.ticker import FormatStrFormatter  # after _figure has said what to install
    axes = figure.subplots(1, max(len(models), 1), squeeze=False)[0]
    for ax, model in zip(axes, models):
        dense = None
        for record in (r for r in records if model_name(r) == model):
            protocol = record["protocol"]
            if record.get("dense_ppl") is not None:
                dense = record["dense_ppl"]
            if protocol["structure"] == "structured":
                points = [(1 - p["sparsity"], p["ppl"]) for p in record.get("points", []) if p.get("ppl") is not None]
                label, style = f"{labels[record['run_id']]}, structured", "-o"
            else:
                points = [(1 - record["sparsity"], record["final_ppl"])] if record.get("final_ppl") is not None else []
                structure = (f"{protocol['n']}:{protocol['m']}" if protocol["structure"] == "semistructured"
                             else protocol["structure"])
                shots = f"{protocol['shots']} shot" + ("s" if protocol["shots"] != 1 else "")
                label, style = f"{labels[record['run_id']]}, {structure}, {shots}", "s"
            if points:
                sizes, ppls = zip(*sorted(points))
                ax.plot(sizes, ppls, style, label=label, markersize=3)
        if dense is not None:
            ax.axhline(dense, color="black", linestyle=":", linewidth=1, label="dense")
        ax.set_yscale("log")
        for axis_format in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            axis_format(FormatStrFormatter("%g"))  # plain numbers, not 9x10^1, on a log axis
        ax.set_xlabel("model size (fraction of prunable weights kept)")
        ax.set_ylabel("test perplexity")
        ax.set_title(model)
        ax.invert_xaxis()  # as in the paper: compression increases to the right
        ax.legend(fontsize="small")
    return _save(figure, path)


def plot_allocation(record: dict, path) -> Path:
    """Remaining fraction (1 - sparsity) per layer type against block depth, for one record's final model."""
    layers = record["layers"]
    types = list(dict.fromkeys(layer["type"] for layer in layers))
    figure = _figure(figsize=(6, 4), layout="constrained")
    ax = figure.subplots()
    for kind in types:
        own = sorted((layer["block"], 1 - layer["sparsity"]) for layer in layers if layer["type"] == kind)
        blocks, kept = zip(*own)
        ax.plot(blocks, kept, "-o", label=kind, markersize=3)
    protocol = record["protocol"]
    ax.set_xticks(sorted({layer["block"] for layer in layers}))
    ax.set_xlabel("block (depth)")
    ax.set_ylabel("remaining fraction")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"{model_name(record)}, {method_name(protocol['method'])} {protocol['structure']}, "
                 f"size {1 - record['sparsity']:.0%}")
    ax.legend(title="layer", fontsize="small", ncols=2)
    return _save(figure, path)
