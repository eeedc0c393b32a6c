"""Result records -> the paper's three tables (LLM Surgeon, Tables 1-3) as Markdown, LaTeX and JSON.

Every number comes from a record; a cell without a measurement stays missing, never
filled or interpolated.
"""
from __future__ import annotations

import json
import math
import statistics
import warnings
from pathlib import Path

from surgeon.records import upgrade

METHOD_NAMES = {
    "magnitude": "Magnitude",
    "lobd": "L-OBD",
    "kobd": "K-OBD",
    "sparsegpt": "SparseGPT",
    "wanda": "Wanda",
    "surgeon": "LLM Surgeon",
}
DENSE = "Dense (100%)"
STRUCTURED_SIZES = (0.9, 0.8, 0.7, 0.6, 0.5)  # Table 1, read off one multi-shot run
FINAL_TARGET = 0.5  # Table 3 (2:4)
UNSTRUCTURED_TARGETS = (0.5, 0.7)  # Table 2 is at 50%; 70% shows where the methods part
MISSING_MD = "—"
MISSING_TEX = "--"
NO_RECORDS = "No complete records."  # the body of a table with nothing to show

# Protocol entries that place a run in a table (model, method, structure, target) or say how it was measured.
# Every other protocol entry is a setting that tells two runs of the same method apart (a row label names those
# that vary within a table, so that e.g. rank 1 and rank 2 runs never overwrite each other): a setting added to
# the protocol (prune.ShotOptions, records.protocol) is a table variant with nothing to add here.
PLACEMENT = {"model", "model_preset", "revision", "gguf_file", "method", "structure", "n", "m", "target", "calib",
             "eval", "quick", "device", "prunable_params", "processes"}


def variant_settings(records: list[dict]) -> list[str]:
    """The protocol's settings that can tell runs apart, in the order the newest record's protocol has them."""
    keys = dict.fromkeys(k for r in sorted(records, key=_newness, reverse=True) for k in r.get("protocol", {}))
    return [k for k in keys if k not in PLACEMENT]


# Settings that are None where they do not apply (a fixed damping has no search): they tell runs apart only
# among the runs they apply to (`damping=auto` already names the search)
APPLIES = {"auto_damping", "quantize"}
# The protocol settings summarised under each table: group -> (label, path in the protocol)
SUMMARY = {
    "calib": (("", ("calib", "source")), ("n", ("calib", "n")), ("seq_len", ("calib", "seq_len")),
              ("seed", ("calib", "seed"))),
    "eval": (("", ("eval", "dataset")), ("", ("eval", "split")), ("seq_len", ("eval", "seq_len")),
             ("max_windows", ("eval", "max_windows"))),
    "damping": (("lambda_A", ("damping_a",)), ("lambda_G", ("damping_g",))),
    "quick": (("", ("quick",)),),
}
# Settings of how a run was measured; records that differ in them never share a table
MEASUREMENT = ("calib", "eval", "quick")
TEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
               "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def _get(obj, path):
    for key in path:
        if not isinstance(obj, dict) or key not in obj:
            return None
        obj = obj[key]
    return obj


def _newness(record: dict) -> str:
    return record.get("finished") or record.get("started") or ""


def select_records(records: list[dict]) -> list[dict]:
    """Complete records only, the newest one per identical protocol (later in the list wins ties)."""
    newest = {}
    for record in records:
        if record.get("status") != "complete":
            continue
        key = json.dumps(record.get("protocol"), sort_keys=True)
        if key not in newest or _newness(record) >= _newness(newest[key]):
            newest[key] = record
    return list(newest.values())


def load_records(paths) -> list[dict]:
    """Read JSON-lines record files (in order) and keep the newest complete record per protocol."""
    records = []
    for path in [paths] if isinstance(paths, (str, Path)) else paths:
        for number, line in enumerate(Path(path).read_text().splitlines(), 1):
            if line.strip():
                try:
                    records.append(upgrade(json.loads(line)))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{number} is not a JSON record: {err}") from err
    return select_records(records)


def model_name(record: dict) -> str:
    """The model's preset name, or the last part of its path."""
    protocol = record["protocol"]
    return protocol.get("model_preset") or Path(str(protocol["model"]).rstrip("/")).name


def method_name(method: str) -> str:
    return METHOD_NAMES.get(method, method)


def _order(value):
    """Sort key for mixed setting values: numbers numerically, then everything else as text."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return (not number, value if number else 0, str(value))


def _method_order(method: str):
    methods = list(METHOD_NAMES)
    return (methods.index(method) if method in methods else len(methods), method)


def _variant_fields(records: list[dict], fields) -> dict[str, list[str]]:
    """Per method, the variant settings whose value differs between its records; a setting that is a dict
    (`auto_damping`) by the keys of it that differ (`auto_damping.heldout`)."""
    varying = {}
    for method in {r["protocol"]["method"] for r in records}:
        own = [r for r in records if r["protocol"]["method"] == method]
        varying[method] = []
        for f in fields:
            values = [r["protocol"].get(f) for r in own if f not in APPLIES or r["protocol"].get(f) is not None]
            if len({json.dumps(v, sort_keys=True) for v in values}) < 2:
                continue
            if all(isinstance(v, dict) for v in values):
                keys = dict.fromkeys(k for v in values for k in v)
                varying[method] += [f"{f}.{k}" for k in keys if len({json.dumps(v.get(k)) for v in values}) > 1]
            else:
                varying[method].append(f)
    return varying


def _method_key(record: dict, varying: dict[str, list[str]]) -> tuple:
    """(method, ((setting, value), ...)) for the settings that vary among the method's records."""
    method = record["protocol"]["method"]
    return method, tuple((f, _get(record["protocol"], f.split("."))) for f in varying[method])


def _row_label(method: str, variants: tuple) -> str:
    variants = tuple((f, v) for f, v in variants if v is not None)  # None: the setting does not apply to this run
    if not variants:
        return method_name(method)
    return f"{method_name(method)} ({', '.join(f'{f}={_format_setting(v)}' for f, v in variants)})"


def _format_setting(value) -> str:
    if value is None:
        return "all"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def run_labels(records: list[dict], shots: bool | None = None) -> dict[str, str]:
    """run_id -> method name plus the variant settings that tell it apart from same-method runs of its structure;
    the shots are named for structured runs only (figures name the others' shots themselves), or as `shots` says."""
    labels = {}
    for structure in {r["protocol"]["structure"] for r in records}:
        group = [r for r in records if r["protocol"]["structure"] == structure]
        named = structure == "structured" if shots is None else shots
        fields = [f for f in variant_settings(group) if named or f != "shots"]
        varying = _variant_fields(group, fields)
        labels.update({r["run_id"]: _row_label(*_method_key(r, varying)) for r in group})
    return labels


def protocol_summary(records: list[dict]) -> str:
    """One line: the calibration, evaluation, damping and quick settings behind a table (all values seen)."""
    groups = []
    for group, settings in SUMMARY.items():
        parts = []
        for label, path in settings:
            values = sorted({json.dumps(_get(r["protocol"], path)) for r in records})
            value = "/".join(_format_setting(json.loads(v)) for v in values)
            parts.append(f"{label}={value}" if label else value)
        groups.append(f"{group} {' '.join(parts)}")
    return "; ".join(groups)


def run_time(records: list[dict]) -> str:
    """How long a table's runs took: the sum of their recorded shot phases (curvature, costs, updates, LoRA,
    evaluation; model loading and the dense evaluation are not timed per shot), and on which devices."""
    seconds = sum(sum(point.get("seconds", {}).values()) for r in records for point in r.get("points", []))
    devices = "/".join(sorted({str(r["protocol"].get("device")) for r in records}))
    runs = f"{len(records)} run{'s' if len(records) != 1 else ''}"
    return f"{runs}, {seconds / 3600:.2f} h of shot phases on {devices}" if records else ""


def _cell(record: dict, ppl, shot, sparsity) -> dict | None:
    if ppl is None or (isinstance(ppl, float) and math.isnan(ppl)):
        return None
    return {"ppl": ppl, "run_id": record.get("run_id"), "shot": shot, "sparsity": sparsity}


def structured_point(record: dict, size: float) -> dict | None:
    """The point of the shot whose scheduled target is 1 - `size`, or None (never interpolated, never a nearby
    shot: a 5-shot run to 30% has no 90% point, though its shot at 12% is close)."""
    wanted = 1.0 - size
    near = [p for p in record.get("points", []) if p.get("target") is not None and abs(p["target"] - wanted) < 1e-6]
    return near[-1] if near else None


def _table(title, row_header, records, sizes, row_of, cells_of) -> dict:
    """Assemble one table: a dense row, then one row per method variant, columns models x sizes."""
    models = list(dict.fromkeys(model_name(r) for r in records))
    columns = [{"model": m, "size": s} for m in models for s in sizes]
    table = {"title": title, "protocol": protocol_summary(records) if records else "", "time": run_time(records),
             "row_header": row_header, "columns": columns, "rows": []}
    if not records:
        return table
    index = {(c["model"], c["size"]): i for i, c in enumerate(columns)}

    dense = [None] * len(columns)
    for model in models:
        own = sorted((r for r in records if model_name(r) == model), key=_newness)
        ppls = {r.get("dense_ppl") for r in own if r.get("dense_ppl") is not None}
        if len(ppls) > 1 and max(ppls) - min(ppls) > 1e-6 * max(ppls):
            warnings.warn(f"{title}: dense perplexities of {model} differ between records {sorted(ppls)}; "
                          "showing the newest record's")
        newest = next((r for r in reversed(own) if r.get("dense_ppl") is not None), None)
        if newest is not None:
            for size in sizes:
                dense[index[model, size]] = _cell(newest, newest["dense_ppl"], 0, 0.0)
    table["rows"].append({"label": [DENSE] + [""] * (len(row_header) - 1), "cells": dense})

    rows, labels, seeds = {}, {}, {}
    for record in sorted(records, key=_newness):
        key, label = row_of(record)
        labels[key] = label
        cells = rows.setdefault(key, [None] * len(columns))
        seed = record["protocol"].get("calib", {}).get("seed")
        for size, cell in cells_of(record):
            i = index[model_name(record), size]
            if cell is None:
                continue
            runs = seeds.setdefault((key, i), {})  # calibration seed -> cell
            if seed in runs:
                warnings.warn(f"{title}: records {runs[seed]['run_id']} and {cell['run_id']} fill the same cell "
                              f"({' '.join(label)}, {model_name(record)}); showing the newer {cell['run_id']}")
            runs[seed] = cell
            cells[i] = _over_seeds(list(runs.values()))
    for key in sorted(rows, key=lambda k: (_method_order(k[0]), [_order(v) for _, v in k[1]],
                                           [_order(v) for v in (k[2] if isinstance(k[2], tuple) else (k[2],))])):
        table["rows"].append({"label": labels[key], "cells": rows[key]})
    table["notes"] = _within_spread(table)
    return table


def _over_seeds(runs: list[dict]) -> dict:
    """One cell from runs that differ only in the calibration seed: mean perplexity, sample standard deviation."""
    if len(runs) == 1:
        return runs[0]
    ppls = [run["ppl"] for run in runs]
    return {**runs[-1], "ppl": statistics.mean(ppls), "std": statistics.stdev(ppls), "n": len(runs),
            "run_ids": [run["run_id"] for run in runs]}


def _within_spread(table: dict) -> list[str]:
    """Per column, the methods whose difference from the column's best is smaller than the spread over seeds
    (the sum of the two standard deviations): the seeds do not tell them apart."""
    notes = []
    for i, column in enumerate(table["columns"]):
        cells = [(row["label"], row["cells"][i]) for row in table["rows"][1:] if row["cells"][i] is not None]
        if not any(cell.get("n", 1) > 1 for _, cell in cells):
            continue
        best_label, best = min(cells, key=lambda lc: lc[1]["ppl"])
        name = lambda label: ", ".join([label[0]] + [f"{h.lower()} {v}" for h, v in zip(table["row_header"][1:],  # noqa: E731
                                                                                         label[1:])])
        for label, cell in cells:
            spread = best.get("std", 0.0) + cell.get("std", 0.0)
            if cell is not best and cell["ppl"] - best["ppl"] < spread:
                notes.append(f"{_column_label(column)}: {name(label)} ({_value(cell, '')}) and {name(best_label)} "
                             f"({_value(best, '')}) differ by {cell['ppl'] - best['ppl']:.2f}, less than their "
                             f"spread over calibration seeds ({spread:.2f})")
    return notes


def build_tables(records: list[dict]) -> dict:
    """The three paper tables from (selected) records: {"structured", "unstructured", "semistructured"}, and
    "other" for records that fit none of them (ablations at other targets, other N:M), so no run goes unseen."""
    # structured runs that reach one of the table's sizes (one read off at a size it never reached is an ablation)
    plain = [r for r in records if not r["protocol"].get("quantize")]  # quantized runs: their own table
    structured = [r for r in plain if r["protocol"]["structure"] == "structured"
                  and any(structured_point(r, size) is not None for size in STRUCTURED_SIZES)]
    at_final = [r for r in plain if abs(r["protocol"]["target"] - FINAL_TARGET) < 1e-9]
    unstructured = [r for r in plain if r["protocol"]["structure"] == "unstructured"
                    and any(abs(r["protocol"]["target"] - t) < 1e-9 for t in UNSTRUCTURED_TARGETS)]
    two_four = [r for r in at_final if r["protocol"]["structure"] == "semistructured"
                and r["protocol"].get("n") == 2 and r["protocol"].get("m") == 4]

    def rows_by(group, shots_column=False, placed=False):
        # with a shots column, the shots are part of the row rather than a variant in its label; placed rows
        # (runs outside the paper's tables: ablations) also carry their structure and target
        varying = _variant_fields(group, [f for f in variant_settings(group) if not (shots_column and f == "shots")])

        def row_of(record):
            method, variants = _method_key(record, varying)
            label = [_row_label(method, variants)]
            if shots_column:
                return (method, variants, record["protocol"]["shots"]), label + [str(record["protocol"]["shots"])]
            if placed:
                place = (structure_label(record), record["protocol"]["target"])
                return (method, variants, place), label + [place[0], f"{place[1]:.0%}"]
            return (method, variants, None), label
        return row_of

    def target_cell(record):
        target = next(t for t in UNSTRUCTURED_TARGETS if abs(record["protocol"]["target"] - t) < 1e-9)
        return [(target, _cell(record, record.get("final_ppl"), record["protocol"]["shots"], record.get("sparsity")))]

    def final_cell(record):
        return [(None, _cell(record, record.get("final_ppl"), record["protocol"]["shots"], record.get("sparsity")))]

    def structured_cells(record):
        for size in STRUCTURED_SIZES:
            point = structured_point(record, size)
            if point is None:
                yield size, None
            else:
                cell = _cell(record, point.get("ppl"), point.get("shot"), point.get("sparsity"))
                compact = record.get("compact")
                if cell and compact and point is record["points"][-1]:  # compacted after its last shot
                    cell["params"] = compact["params"] / compact["params_before"]
                yield size, cell

    quantized = [r for r in records if r["protocol"].get("quantize")]
    in_paper = {id(r) for r in structured + unstructured + two_four + quantized}
    other = [r for r in records if id(r) not in in_paper]

    tables = {}
    for name, title, header, group, sizes, shots_column, cells_of in (
            ("structured", "Structured compression (Table 1): test perplexity by model size", ["Method"],
             structured, STRUCTURED_SIZES, False, structured_cells),
            ("unstructured", "Unstructured compression (Table 2): test perplexity at 50% and 70% sparsity",
             ["Method", "Shots"], unstructured, UNSTRUCTURED_TARGETS, True, target_cell),
            ("semistructured", "Semi-structured 2:4 compression (Table 3): test perplexity", ["Method"],
             two_four, (None,), False, final_cell),
            ("other", "Other runs (ablations, settings outside Tables 1-3): final test perplexity",
             ["Method", "Structure", "Sparsity"], other, (None,), False, final_cell)):
        if name == "other" and not other:
            continue  # only shown when some record fits none of the paper's tables
        # one table per measurement protocol: cells and the dense row of one table are always comparable
        for i, (suffix, own) in enumerate(by_measurement(group) or [("", [])]):
            tables[name if i == 0 else f"{name}-{i + 1}"] = _table(
                title + suffix, header, own, sizes, rows_by(own, shots_column, placed=name == "other"), cells_of)
    if quantized:
        for i, (suffix, own) in enumerate(by_measurement(quantized)):
            tables["quantized" if i == 0 else f"quantized-{i + 1}"] = quantized_table(own, suffix)
    return tables


QUANT_METHODS = {"gptq": "OBS update (run's A)", "rtn": "round to nearest",
                 "llmcompressor-gptq": "llmcompressor GPTQ"}


def pruning_label(record: dict) -> str:
    """What the shots before quantization did: 'none' (shots=0), else method, structure and target."""
    p = record["protocol"]
    if not p["shots"]:
        return "none"
    place = structure_label(record) if p["structure"] == "semistructured" else f"{p['structure']} {p['target']:.0%}"
    return f"{method_name(p['method'])} {place}"


def weights_label(record: dict | None) -> str:
    """The grid and method of a quantized run, e.g. 'int4 g128 OBS update (run's A)'; 'float' for None."""
    if record is None:
        return "float"
    q = record["protocol"]["quantize"]
    bits = f"mixed {q['budget']:g} bits" if q.get("budget") is not None else f"int{q['bits']}"
    grid = f"{bits} " + (f"g{q['group_size']}" if q["group_size"] else "per row") + (
        "" if q["symmetric"] else " asym")
    extra = [name for name, on in (("act order", q.get("order") == "act"), ("sequential", q.get("sequential")))
             if on and q["method"] == "gptq"]
    if q.get("observer", "minmax") != "minmax":
        extra.append(f"{q['observer']} observer")
    return f"{grid} {QUANT_METHODS.get(q['method'], q['method'])}" + "".join(f", {e}" for e in extra)


def quantized_table(records: list[dict], suffix: str = "") -> dict:
    """Dense, pruned, quantized and both, per model: each quantized record gives its pruned model's float
    perplexity (`quantize.before_ppl`, the 'float' row of its pruning) and its quantized one (`final_ppl`)."""
    views, seen = [], set()  # (record, the record whose grid and method label the row or None for float, ppl)

    def cell_key(record, weights):
        return (pruning_label(record), weights_label(weights), model_name(record),
                record["protocol"]["calib"].get("seed"))

    measured = {cell_key(record, record) for record in records}
    for record in sorted(records, key=_newness):
        float_key = (pruning_label(record), model_name(record), record["protocol"]["calib"].get("seed"))
        if record["protocol"]["shots"] and float_key not in seen:  # the pruned model before quantization, once
            seen.add(float_key)
            views.append((record, None, record["quantize"]["before_ppl"]))
        views.append((record, record, record["quantize"]["ppl"]))
        baseline = record["quantize"].get("baseline")
        if baseline:  # quantize.baseline: the same model rounded to nearest in the same run, unless a run did it
            q = dict(record["protocol"]["quantize"], method=baseline["method"], order=None, sequential=None)
            twin = dict(record, protocol=dict(record["protocol"], quantize=q))
            if cell_key(twin, twin) not in measured:
                views.append((twin, twin, baseline["ppl"]))
    proxies = []  # one pseudo-record per row entry, carrying what _table reads
    for record, quantized, ppl in views:
        proxy = dict(record, final_ppl=ppl)
        proxy["_view"] = (record, quantized)
        proxies.append(proxy)

    def row_of(proxy):
        record, quantized = proxy["_view"]
        key = (pruning_label(record), weights_label(quantized))
        order = (0 if not record["protocol"]["shots"] else 1, key[0], 0 if quantized is None else 1, key[1])
        return ("", tuple(), order), list(key)

    def cells_of(proxy):
        return [(None, _cell(proxy, proxy["final_ppl"], proxy["protocol"]["shots"], proxy.get("sparsity")))]

    table = _table("Pruned and quantized: test perplexity" + suffix, ["Pruning", "Weights"], proxies, (None,),
                   row_of, cells_of)
    table["time"] = run_time(records)  # of the runs, not of their two rows each
    return table


def structure_label(record: dict) -> str:
    """'structured', 'unstructured' or 'N:M'."""
    protocol = record["protocol"]
    if protocol["structure"] == "semistructured":
        return f"{protocol.get('n')}:{protocol.get('m')}"
    return protocol["structure"]


def by_measurement(records: list[dict]) -> list[tuple[str, list[dict]]]:
    """Records split by measurement protocol (calibration data, evaluation, quick): [(title suffix, records)],
    the group with the most runs first, then the newest; the suffix names the settings that differ."""
    def key(record):  # runs that differ only in the calibration seed share a table (their cells: mean ± std)
        measured = {k: record["protocol"].get(k) for k in MEASUREMENT}
        measured["calib"] = {k: v for k, v in (measured["calib"] or {}).items() if k != "seed"}
        return json.dumps(measured, sort_keys=True)

    groups = {}
    for record in records:
        groups.setdefault(key(record), []).append(record)
    ordered = sorted(groups.values(), key=lambda g: (len(g), max(_newness(r) for r in g)), reverse=True)
    if len(ordered) < 2:
        return [("", g) for g in ordered]
    paths = [(group, label, path) for group in MEASUREMENT for label, path in SUMMARY[group] if label != "seed"]
    differ = [(group, label, path) for group, label, path in paths
              if len({json.dumps(_get(g[0]["protocol"], path)) for g in ordered}) > 1]

    def suffix(i, group):
        if not differ:  # they differ in a setting the protocol line does not show (e.g. the data file)
            return f" (measurement protocol {i + 1})"
        return " (" + ", ".join(f"{name} {label}={_format_setting(_get(group[0]['protocol'], path))}"
                                .replace(" =", " ") for name, label, path in differ) + ")"
    return [(suffix(i, g), g) for i, g in enumerate(ordered)]


def _value(cell: dict | None, missing: str) -> str:
    """Perplexity; for a compacted run also its parameters after compaction as a fraction of the model's."""
    if cell is None:
        return missing
    ppl = f"{cell['ppl']:.2f}" + (f" ± {cell['std']:.2f}" if cell.get("n", 1) > 1 else "")
    return ppl + (f" ({cell['params']:.0%} params)" if cell.get("params") else "")


def _column_label(column: dict) -> str:
    return column["model"] if column["size"] is None else f"{column['model']} {column['size']:.0%}"


def to_markdown(tables: dict) -> str:
    """The tables as Markdown: a heading, the protocol line, then the table."""
    out = []
    for table in tables.values():
        out += [f"## {table['title']}", ""]
        if not table["rows"]:
            out += [NO_RECORDS, ""]
            continue
        out += [f"Protocol: {table['protocol']}", ""] + ([f"Run time: {table['time']}", ""] if table.get("time") else [])
        header = table["row_header"] + [_column_label(c) for c in table["columns"]]
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "|".join([" --- "] * len(table["row_header"]) + [" ---: "] * len(table["columns"])) + "|")
        for row in table["rows"]:
            out.append("| " + " | ".join(row["label"] + [_value(c, MISSING_MD) for c in row["cells"]]) + " |")
        out.append("")
        if any(c.get("n", 1) > 1 for row in table["rows"] for c in row["cells"] if c):
            out += ["Cells over several calibration seeds: mean ± sample standard deviation.", ""]
        out += [f"- Not resolved: {note}." for note in table.get("notes", [])] + ([""] if table.get("notes") else [])
    return "\n".join(out)


def _tex(text: str) -> str:
    return "".join(TEX_ESCAPES.get(char, char) for char in text)


def to_latex(tables: dict) -> str:
    """The tables as LaTeX (booktabs); the protocol and run-time lines are the caption."""
    out = ["% Generated by experiments.report from result records; needs \\usepackage{booktabs}.", ""]
    for name, table in tables.items():
        if not table["rows"]:
            out += [f"% {table['title']}: no complete records.", ""]
            continue
        n_label, columns = len(table["row_header"]), table["columns"]
        out += [r"\begin{table}[t]", r"\centering",
                rf"\caption{{{_tex(table['title'])}. Protocol: {_tex(table['protocol'])}."
                + (rf" Run time: {_tex(table['time'])}." if table.get("time") else "") + "}",
                rf"\label{{tab:{name}}}",
                rf"\begin{{tabular}}{{{'l' * n_label}{'r' * len(columns)}}}", r"\toprule"]
        if any(c["size"] is not None for c in columns):
            models = list(dict.fromkeys(c["model"] for c in columns))
            width = len(columns) // len(models)
            out.append(" & ".join([""] * n_label + [rf"\multicolumn{{{width}}}{{c}}{{{_tex(m)}}}" for m in models])
                       + r" \\")
            out.append(" ".join(rf"\cmidrule(lr){{{n_label + 1 + i * width}-{n_label + (i + 1) * width}}}"
                                for i in range(len(models))))
            sizes = [_tex(f"{c['size']:.0%}") for c in columns]
            out.append(" & ".join([_tex(h) for h in table["row_header"]] + sizes) + r" \\")
        else:
            out.append(" & ".join([_tex(h) for h in table["row_header"]] + [_tex(c["model"]) for c in columns])
                       + r" \\")
        out.append(r"\midrule")
        for i, row in enumerate(table["rows"]):
            cells = [_tex(label) for label in row["label"]] + [
                _tex(_value(c, MISSING_TEX)).replace("±", r"$\pm$") for c in row["cells"]]
            out.append(" & ".join(cells) + r" \\")
            if i == 0:
                out.append(r"\midrule")  # the dense baseline stands apart
        out += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    return "\n".join(out)
