"""Tables and figures from result records.

    python -m experiments.report --records results/records.jsonl [more.jsonl ...] --out reports/

Writes tables.md, tables.tex, tables.json, ppl_vs_size.png (ppl_vs_size-2.png, ... for records measured
with another protocol), ppl_vs_shots.png (where runs differ only in their shot count) and allocation_<run>.png
(by default for every structured LLM Surgeon record; choose others with --allocation), and experts_<run>.png for
every record of a mixture-of-experts model (each expert's remaining fraction against its routed tokens). Figures of
an earlier report in --out that this one does not draw (records gone from the records files) are deleted.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from experiments.plots import plot_allocation, plot_expert_allocation, plot_ppl_vs_shots, plot_ppl_vs_size
from experiments.tables import NO_RECORDS, by_measurement, build_tables, load_records, to_latex, to_markdown


def write_report(records: list[dict], out, allocation_runs: list[str] | None = None) -> list[Path]:
    """Write the tables and figures for `records` into `out`; returns the files written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tables = build_tables(records)
    written = []
    for name, text in (("tables.md", to_markdown(tables)), ("tables.tex", to_latex(tables)),
                       ("tables.json", json.dumps(tables, indent=1))):
        (out / name).write_text(text)
        written.append(out / name)

    if allocation_runs is None:
        chosen = [r for r in records if r["protocol"]["structure"] == "structured"
                  and r["protocol"]["method"] == "surgeon" and r.get("points")]
    else:
        by_id = {r.get("run_id"): r for r in records}
        unknown = [run for run in allocation_runs if run not in by_id]
        if unknown:
            raise SystemExit(f"--allocation: no complete record with run_id {unknown}; known: {sorted(by_id)}")
        chosen = [by_id[run] for run in allocation_runs]
    try:
        # one figure per measurement protocol, as the tables: ppl_vs_size.png (most runs), ppl_vs_size-2.png, ...
        plain = [r for r in records if not r["protocol"].get("quantize")]  # quantized runs: their table only
        for i, (_, own) in enumerate(by_measurement(plain)):
            suffix = "" if i == 0 else f"-{i + 1}"
            written.append(plot_ppl_vs_size(own, out / f"ppl_vs_size{suffix}.png"))
            shots_figure = plot_ppl_vs_shots(own, out / f"ppl_vs_shots{suffix}.png")  # None: no shot sweep
            written += [shots_figure] if shots_figure else []
        written += [plot_allocation(r, out / f"allocation_{r['run_id']}.png") for r in chosen]
        experts = [plot_expert_allocation(r, out / f"experts_{r['run_id']}.png") for r in records]  # MoE records
        written += [path for path in experts if path]
    except ImportError as err:
        print(f"figures skipped: {err}", file=sys.stderr)  # the tables are still worth having
    else:
        remove_stale_figures(out, written)
    return written


def remove_stale_figures(out: Path, written: list[Path]) -> None:
    """Delete this report's own figures in `out` that this report did not draw.

    A figure of a record that left the records file, or of a measurement protocol with no records any more,
    would otherwise stay next to the new ones and look current. Other files in `out` are left alone.
    """
    keep = {p.resolve() for p in written}
    for pattern in ("ppl_vs_size.png", "ppl_vs_size-*.png", "ppl_vs_shots.png", "ppl_vs_shots-*.png",
                    "allocation_*.png", "experts_*.png"):
        for path in out.glob(pattern):
            if path.resolve() not in keep:
                path.unlink()
                print(f"removed stale {path}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.report", description=__doc__.split("\n")[0])
    parser.add_argument("--records", nargs="+", required=True, help="JSON-lines record files")
    parser.add_argument("--out", default="reports", help="output directory (default: reports)")
    parser.add_argument("--allocation", nargs="*", metavar="RUN_ID",
                        help="run ids to draw the allocation figure for (default: structured surgeon runs)")
    parser.add_argument("--readme", metavar="PATH",
                        help="also replace the block between the tables markers in this Markdown file")
    parser.add_argument("--block", metavar="NAME", default=None,
                        help="with --readme: the named block (markers '<!-- tables:start NAME -->' ... "
                             "'<!-- tables:end NAME -->', headings two levels down) instead of the testbed block")
    args = parser.parse_args(argv)
    records = load_records(args.records)
    for path in write_report(records, args.out, args.allocation):
        print(path)
    if args.readme:
        update_readme(args.readme, (Path(args.out) / "tables.md").read_text(), args.block)
        print(args.readme)


START, END = "<!-- tables:start (experiments.report --readme) -->", "<!-- tables:end -->"


def markers(block: str | None = None) -> tuple[str, str]:
    """The start and end markers of the testbed block (None) or of a named one."""
    return (START, END) if block is None else (f"<!-- tables:start {block} -->", f"<!-- tables:end {block} -->")


def update_readme(path, tables_md: str, block: str | None = None) -> None:
    """Replace a generated block of a README with `tables_md` (headings one level down, two in a named
    block), so its tables are never typed by hand."""
    start, end = markers(block)
    text = Path(path).read_text()
    if start not in text or end not in text:
        raise SystemExit(f"--readme: {path} has no '{start}' ... '{end}' block")
    head, rest = text.split(start, 1)
    tail = rest.split(end, 1)[1]
    Path(path).write_text(f"{head}{start}\n{readme_block(tables_md, 1 if block is None else 2)}\n{end}{tail}")


def readme_block(tables_md: str, levels: int = 1) -> str:
    """The README's generated block for `tables_md`: it sits under a section of its own, so its table
    headings go `levels` levels down; a table with no complete records is left out (a README shows what ran,
    the report's tables.md keeps every table)."""
    sections = re.split(r"(?m)^(?=## )", tables_md.strip())
    kept = [s.strip() for s in sections if s.strip() and s.strip().splitlines()[-1] != NO_RECORDS]
    return "\n".join("#" * levels + line if line.startswith("#") else line
                     for line in "\n\n".join(kept).splitlines())


def readme_tables(path, block: str | None = None) -> str:
    """The generated block currently in a README."""
    start, end = markers(block)
    return Path(path).read_text().split(start, 1)[1].split(end, 1)[0].strip()


if __name__ == "__main__":
    main()
