"""Figures from result records: perplexity against model size and against the shot count, and the per-layer
allocation.

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


STRUCTURE_ORDER = ("structured", "unstructured", "semistructured")
MINOR_LABEL_SPAN = 100.0  # a log axis over at most this ratio labels its minor ticks too


def _dense_ppls(records: list[dict]) -> dict[str, float]:
    """model -> the newest record's dense perplexity."""
    return {model_name(r): r["dense_ppl"] for r in sorted(records, key=lambda r: r.get("finished") or "")
            if r.get("dense_ppl") is not None}


def _perplexity_axis(ax, dense_ppl: float | None) -> None:
    """A log perplexity axis with plain tick numbers and the dense perplexity as a dotted line."""
    from matplotlib.ticker import FormatStrFormatter, FuncFormatter
    if dense_ppl is not None:
        ax.axhline(dense_ppl, color="black", linestyle=":", linewidth=1)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))  # plain numbers, not 9x10^1, on a log axis

    def minor_label(value: float, _position) -> str:
        # minor ticks (2..9 x 10^k) are labelled only while the axis spans at most two decades;
        # over more (magnitude pruning's 1e9 next to 40) their labels would overlap each other
        low, high = ax.get_ylim()
        return "%g" % value if high <= MINOR_LABEL_SPAN * low else ""

    ax.yaxis.set_minor_formatter(FuncFormatter(minor_label))
    ax.tick_params(axis="y", which="minor", labelsize="x-small")


def _row_legend(row) -> None:
    """One legend for a row of panels, each label once, to the right of the last panel."""
    handles = {}
    for ax in row:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    row[-1].legend(handles.values(), handles.keys(), fontsize="x-small", loc="upper left",
                   bbox_to_anchor=(1.02, 1.0), borderaxespad=0)


def _structure_name(protocol: dict) -> str:
    if protocol["structure"] == "semistructured":
        return f"{protocol['n']}:{protocol['m']}"
    return protocol["structure"]


def size_series(records: list[dict]) -> dict[str, dict[str, dict[str, list[tuple[float, float]]]]]:
    """{structure: {model: {series label: [(size, ppl), ...] by size}}}: a structured run gives every
    evaluated shot; other runs their final point, joined with the runs of the same label (method, variant,
    shots) at other targets."""
    labels = run_labels(records)
    series = {}
    for record in sorted(records, key=lambda r: STRUCTURE_ORDER.index(r["protocol"]["structure"])
                         if r["protocol"]["structure"] in STRUCTURE_ORDER else len(STRUCTURE_ORDER)):
        protocol = record["protocol"]
        label = labels[record["run_id"]]
        if protocol["structure"] == "structured":
            points = [(1 - p["sparsity"], p["ppl"]) for p in record.get("points", []) if p.get("ppl") is not None]
        else:
            shots = protocol["shots"]
            label = f"{label}, {shots} shot" + ("s" if shots != 1 else "")
            points = [(1 - record["sparsity"], record["final_ppl"])] if record.get("final_ppl") is not None else []
        own = series.setdefault(_structure_name(protocol), {}).setdefault(model_name(record), {})
        own[label] = sorted(own.get(label, []) + points)
    return series


def _line_styles(labels: list[str]) -> tuple[dict, dict]:
    """A distinct (colour, line style) per series: 10 colours, 20 beyond ten series, then dashed variants."""
    from matplotlib import colormaps

    palette = [f"C{i}" for i in range(10)] if len(labels) <= 10 else [colormaps["tab20"](i) for i in range(20)]
    colours = {label: palette[i % len(palette)] for i, label in enumerate(labels)}
    styles = {label: ("-", "--", "-.", ":")[i // len(palette) % 4] for i, label in enumerate(labels)}
    return colours, styles


def plot_ppl_vs_size(records: list[dict], path) -> Path:
    """Perplexity (log scale) against model size (1 - sparsity): a row of panels per structure, a panel per
    model, a line per method variant (colours shared along a row, the legend to its right)."""
    series = size_series(records)
    models = list(dict.fromkeys(model_name(r) for r in records))
    dense = _dense_ppls(records)
    rows, cols = max(len(series), 1), max(len(models), 1)
    figure = _figure(figsize=(4.5 * cols + 3.5, 3.6 * rows), layout="constrained")
    axes = figure.subplots(rows, cols, squeeze=False)
    for row, (structure, by_model) in zip(axes, series.items()):
        colours, styles = _line_styles(list(dict.fromkeys(label for own in by_model.values() for label in own)))
        for ax, model in zip(row, models):
            for label, points in by_model.get(model, {}).items():
                sizes, ppls = zip(*points)
                ax.plot(sizes, ppls, styles[label], marker="o", color=colours[label], label=label, markersize=3)
            _perplexity_axis(ax, dense.get(model))
            ax.set_xlabel("model size (fraction of prunable weights kept)")
            ax.set_ylabel("test perplexity")
            ax.set_title(f"{model}, {structure} (dotted: dense)", fontsize="medium")
            sizes = {size for points in by_model.get(model, {}).values() for size, _ in points}
            if sizes and max(sizes) - min(sizes) < 0.02:  # one size (2:4, an ablation): a readable axis around it
                middle = (max(sizes) + min(sizes)) / 2
                ax.set_xlim(middle - 0.05, middle + 0.05)
            ax.ticklabel_format(axis="x", useOffset=False)  # sizes as they are, never "1e-5 + 0.7"
            ax.invert_xaxis()  # as in the paper: compression increases to the right
        _row_legend(row)
    return _save(figure, path)


def shot_series(records: list[dict]) -> dict[tuple[str, float], dict[str, dict[str, list[tuple[int, float]]]]]:
    """{(structure, sparsity): {model: {series label: [(shots, final ppl), ...]}}}, only the series that have
    runs at two or more shot counts (a shot-count sweep: the unstructured table, the shots ablation)."""
    labels = run_labels(records, shots=False)
    series = {}
    for record in records:
        if record.get("final_ppl") is None:
            continue
        protocol = record["protocol"]
        place = (_structure_name(protocol), round(protocol["target"], 6))
        own = series.setdefault(place, {}).setdefault(model_name(record), {})
        own.setdefault(labels[record["run_id"]], []).append((protocol["shots"], record["final_ppl"]))
    swept = {}
    for place, by_model in sorted(series.items(), key=lambda item: (
            STRUCTURE_ORDER.index(item[0][0]) if item[0][0] in STRUCTURE_ORDER else len(STRUCTURE_ORDER), item[0])):
        for model, by_label in by_model.items():
            for label, points in by_label.items():
                if len({shots for shots, _ in points}) > 1:
                    # one point per shot count: the newest record's (records are selected, newest last)
                    swept.setdefault(place, {}).setdefault(model, {})[label] = sorted(dict(points).items())
    return swept


def plot_ppl_vs_shots(records: list[dict], path) -> Path | None:
    """Final perplexity (log) against the number of shots (log): a row per structure and sparsity, a panel per
    model, a line per method variant; None (nothing drawn) when no runs differ only in their shot count."""
    series = shot_series(records)
    if not series:
        return None
    models = list(dict.fromkeys(model_name(r) for r in records))
    dense = _dense_ppls(records)
    figure = _figure(figsize=(4.5 * len(models) + 3.5, 3.6 * len(series)), layout="constrained")
    from matplotlib.ticker import FixedLocator, FormatStrFormatter, NullLocator
    axes = figure.subplots(len(series), len(models), squeeze=False)
    for row, ((structure, sparsity), by_model) in zip(axes, series.items()):
        colours, styles = _line_styles(list(dict.fromkeys(label for own in by_model.values() for label in own)))
        for ax, model in zip(row, models):
            shot_counts = set()
            for label, points in by_model.get(model, {}).items():
                shots, ppls = zip(*points)
                shot_counts.update(shots)
                ax.plot(shots, ppls, styles[label], marker="o", color=colours[label], label=label, markersize=3)
            _perplexity_axis(ax, dense.get(model))
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(FixedLocator(sorted(shot_counts) or [1]))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.xaxis.set_major_formatter(FormatStrFormatter("%d"))
            ax.set_xlabel("shots")
            ax.set_ylabel("final test perplexity")
            ax.set_title(f"{model}, {structure} {sparsity:.0%} sparsity (dotted: dense)", fontsize="medium")
        _row_legend(row)
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


def expert_allocation(record: dict) -> list[dict]:
    """Per routed expert of a record: its calibration tokens summed over the shots, and its final remaining
    fraction (gate|up and down together); [] for a model without routed experts."""
    tokens: dict[str, int] = {}
    for point in record.get("points", []):
        for expert, n in (point.get("expert_tokens") or {}).items():
            tokens[expert] = tokens.get(expert, 0) + n
    out = []
    for expert, n in tokens.items():
        own = [layer for layer in record["layers"] if layer["name"].startswith(expert + ".")]
        size = sum(layer["shape"][0] * layer["shape"][1] for layer in own)
        kept = sum((1 - layer["sparsity"]) * layer["shape"][0] * layer["shape"][1] for layer in own)
        out.append({"expert": expert, "block": own[0]["block"], "tokens": n, "remaining": kept / size})
    return out


def plot_expert_allocation(record: dict, path) -> Path | None:
    """Remaining fraction of every routed expert against the calibration tokens routed to it (summed over the
    shots), one colour per block: what the global threshold takes from rarely routed experts."""
    rows = expert_allocation(record)
    if not rows:
        return None
    figure = _figure(figsize=(6, 4), layout="constrained")
    ax = figure.subplots()
    for block in sorted({r["block"] for r in rows}):
        own = [r for r in rows if r["block"] == block]
        ax.scatter([r["tokens"] for r in own], [r["remaining"] for r in own], label=f"block {block}", s=14)
    protocol = record["protocol"]
    ax.set_xlabel("calibration tokens routed to the expert (all shots)")
    ax.set_ylabel("remaining fraction of the expert")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"{model_name(record)}, {method_name(protocol['method'])} {protocol['structure']}, "
                 f"size {1 - record['sparsity']:.0%}", fontsize="medium")
    ax.legend(fontsize="small", ncols=2)
    return _save(figure, path)
