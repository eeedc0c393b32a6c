"""Reproduce the paper's tables on the testbed: run the table presets on both testbed models, then
write tables and plots from the records.

    python -m experiments.reproduce                 # full protocol (hours on 2 CPU cores)
    python -m experiments.reproduce --quick         # reduced budget, recorded as quick=true (< 45 min)
    python -m experiments.reproduce --only structured semistructured --out reports/testbed

Each table is one `python run.py -m +experiment=...` multirun; records are appended to
`--records` and `experiments.report` rebuilds every table from them. Jobs run with
`skip_done=true`: a job whose complete record (same protocol) is already in `--records`
is not rerun, so an interrupted reproduction is continued by running the same command
again (`--rerun` forces every job); `--only` picks tables, `--report-only` just redraws and
`--readme README.md` also rewrites the README's generated tables; `--status` lists which jobs
are complete and which are missing.
"""
from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import time
from pathlib import Path

# imported now, with the rest of experiments/, not after hours of runs: a report module edited meanwhile
# would meet the stale tables/plots modules already in this process
from experiments.report import main as report

ROOT = Path(__file__).resolve().parent.parent

TABLES = {
    "structured": ["+experiment=structured_table"],
    "unstructured": ["+experiment=unstructured_table"],
    "unstructured_layerwise": ["+experiment=unstructured_table_layerwise"],
    "semistructured": ["+experiment=semistructured_table"],
    # the engine's ordering checks beyond the tables: 70% unstructured and single-shot LLM Surgeon
    "unstructured70": ["+experiment=unstructured_table", "target=0.7", "shots=5", "method=magnitude,kobd,surgeon"],
    # single-shot LLM Surgeon at the sizes the tables show (Table 1 at 70% and 50% size, Table 2 at 50% and 70%)
    "single_shot": ["method=surgeon", "shots=1", "structure=structured", "target=0.3,0.5"],
    "single_shot_unstructured": ["method=surgeon", "shots=1", "structure=unstructured", "target=0.5,0.7"],
    # the ablation presets, run only when named (--only); their records belong in a file of their own (--records)
    "ablation_damping": ["+experiment=ablation_damping"],
    "ablation_shots": ["+experiment=ablation_shots"],
    "ablation_rank": ["+experiment=ablation_rank"],
    "ablation_correlation": ["+experiment=ablation_correlation"],
}
DEFAULT = ["structured", "unstructured", "unstructured_layerwise", "semistructured", "unstructured70", "single_shot",
           "single_shot_unstructured"]
QUICK_DEFAULT = ["structured", "unstructured", "unstructured_layerwise", "semistructured"]
# Quick: fewer calibration sequences and evaluation windows, fewer shots, smaller correlated groups
# (the Cholesky work of the element updates grows with max_correlate^2); quick=true in every record.
QUICK = ["quick=true", "calib.n=32", "eval.max_windows=128", "max_correlate=512"]
QUICK_TABLE = {
    "structured": ["shots=20", "eval.every=4"],  # sizes 90..50% at shots 4..20
    "unstructured": ["shots=5"],
}


# settings shared by a reproduction's jobs, left out when a missing job is listed
_COMMON = {"data", "results", "skip_done", "quick", "calib.n", "eval.max_windows", "max_correlate", "+experiment"}


def table_overrides(table: str, models: str, records: Path, out: Path, quick: bool, rerun: bool, extra=()) -> list[str]:
    """The Hydra overrides of one table's multirun."""
    overrides = [*TABLES[table], f"model={models}", "data=testbed", f"results={records}",
                 f"hydra.sweep.dir={out}/runs/{table}", f"skip_done={str(not rerun).lower()}"]
    if quick:
        overrides += QUICK + QUICK_TABLE.get(table, [])
    return [*overrides, *extra]


def expand(overrides: list[str]) -> list[list[str]]:
    """The single-run overrides a `run.py -m` multirun with `overrides` launches: the preset's
    hydra.sweeper.params crossed with the command line's sweeps, the command line winning on a key
    (as Hydra's basic sweeper does)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from surgeon.config import compose

    parser = OverridesParser.create()
    command = [o for o in overrides if not o.startswith("hydra.")]
    parsed = parser.parse_overrides(command)
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    sweeps = {o.get_key_element(): list(o.sweep_string_iterator()) for o in parsed if o.is_sweep_override()}
    first = [*fixed, *(f"{k}={v[0]}" for k, v in sweeps.items())]
    params = compose(first, return_hydra_config=True).hydra.sweeper.params or {}
    fixed_keys = {o.get_key_element() for o in parsed if not o.is_sweep_override()}
    dims = {}
    for key, value in params.items():
        if key not in fixed_keys and key not in sweeps:
            dims[key] = list(parser.parse_overrides([f"{key}={value}"])[0].sweep_string_iterator())
    dims.update(sweeps)
    return [[*fixed, *(f"{k}={v}" for k, v in zip(dims, values))] for values in itertools.product(*dims.values())]


def job_status(overrides: list[str]) -> list[tuple[list[str], dict | None]]:
    """(job overrides, its complete record in the results file or None) for every job of a multirun."""
    from surgeon.config import compose
    from surgeon.records import find_complete

    return [(job, find_complete(compose(job), "cpu")) for job in expand(overrides)]


def print_status(tables: list[str], overrides_of) -> None:
    """Print, per table, how many jobs are complete and which are missing."""
    for table in tables:
        status = job_status(overrides_of(table))
        todo = [job for job, record in status if record is None]
        print(f"{table}: {len(status) - len(todo)}/{len(status)} jobs complete", flush=True)
        for job in todo:
            print("    missing:", " ".join(o for o in job if o.split("=")[0] not in _COMMON), flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--models", default="opt-tiny,llama-tiny")
    p.add_argument("--only", nargs="+", choices=list(TABLES), default=None,
                   help=f"tables to run (default {' '.join(DEFAULT)}; with --quick {' '.join(QUICK_DEFAULT)})")
    p.add_argument("--records", default=None, help="records file (default results/testbed[-quick].jsonl)")
    p.add_argument("--out", default=None, help="report directory (default reports/testbed[-quick])")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--status", action="store_true",
                   help="only print, per table, which jobs are complete in --records and which are missing")
    p.add_argument("--readme", metavar="PATH", help="also rewrite the generated tables block of this Markdown file")
    p.add_argument("--block", metavar="NAME", help="with --readme: the named block (see experiments.report)")
    p.add_argument("--rerun", action="store_true",
                   help="rerun every job (default: skip_done=true, jobs already complete in --records are not rerun)")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = p.parse_args(argv)
    suffix = "-quick" if args.quick else ""
    records = Path(args.records or ROOT / f"results/testbed{suffix}.jsonl").resolve()
    out = Path(args.out or ROOT / f"reports/testbed{suffix}").resolve()
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}

    tables = args.only or (QUICK_DEFAULT if args.quick else DEFAULT)

    def overrides_of(table):
        return table_overrides(table, args.models, records, out, args.quick, args.rerun, args.overrides)

    if args.status:
        print_status(tables, overrides_of)
        return 0
    if not args.report_only:
        for table in tables:
            cmd = [sys.executable, "run.py", "-m", *overrides_of(table)]
            print("+", " ".join(cmd[1:]), flush=True)
            t0 = time.time()
            rc = subprocess.call(cmd, cwd=ROOT, env=env)
            print(f"{table}: exit {rc} after {(time.time() - t0) / 60:.1f} min", flush=True)
            if rc != 0:
                return rc
    report(["--records", str(records), "--out", str(out), *(["--readme", args.readme] if args.readme else []),
            *(["--block", args.block] if args.block else [])])
    return 0


if __name__ == "__main__":
    sys.exit(main())
