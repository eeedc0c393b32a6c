"""Benchmark: one shot with 1 and with K processes (torchrun), on CPU (gloo) or on the GPUs, in one run.

    python -m experiments.bench_distributed [--model opt-tiny] [--structures structured unstructured]
        [--procs 2] [--n 32] [--seq-len 256] [--device cpu] [--out reports/bench_distributed/cpu.jsonl]

Each setting runs `run.py` from the dense model for one shot (no dense evaluation, 8 evaluation windows) as one
process with one thread, one process with K threads (the same cores for one process), and K processes of one
thread each under torchrun (`curvature.accumulate=float64` everywhere, so all give the same masks; the benchmark
checks that they do). It prints each phase's seconds from the records and the speed-ups over one process of one
thread: ratios measured in this run, on whatever else the machine is doing. On CUDA the rows are 1 process on
one GPU and K processes on K GPUs (threads do not apply).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
PHASES = ("curvature", "costs", "update")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_one(overrides: list[str], run_dir: Path, procs: int, threads: int) -> dict:
    """One shot through run.py (under torchrun when procs > 1); its record and its masks."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE", "WANDB_MODE": "disabled"}
    launcher = [sys.executable] if procs == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                    f"--nproc_per_node={procs}", "--master_port", str(_free_port())]
    proc = subprocess.run([*launcher, "run.py", *overrides, f"hydra.run.dir={run_dir}"], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"run.py failed ({procs} processes):\n{proc.stderr[-3000:]}")
    record = json.loads((run_dir / "record.json").read_text())
    masks = torch.load(run_dir / "checkpoint.pt", weights_only=False)["state"]["removed"]
    return {"record": record, "masks": masks}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="opt-tiny")
    p.add_argument("--structures", nargs="+", default=["structured", "unstructured"])
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--n", type=int, default=32, help="calibration sequences")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--target", type=float, default=None, help="default: 0.3 structured, 0.5 otherwise (2:4: 0.5)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--out", default=None, help="also append the rows as JSON lines here")
    args = p.parse_args(argv)

    K = args.procs
    if args.device == "cpu":
        settings = [("1 process x 1 thread", 1, 1), (f"1 process x {K} threads", 1, K),
                    (f"{K} processes x 1 thread", K, 1)]
    else:
        settings = [("1 process, 1 GPU", 1, 1), (f"{K} processes, {K} GPUs", K, 1)]
    rows = []
    print(f"One shot of {args.model}, {args.n} x {args.seq_len} calibration tokens (batches of {args.batch_size}), "
          f"on {args.device}; seconds per phase from the records, speed-up over the first row (in this run)\n")
    print("| structure | setting | curvature (s) | costs (s) | update (s) | shot (s) | speed-up | same masks "
          "| own updates per rank (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for structure in args.structures:
            target = args.target or (0.3 if structure == "structured" else 0.5)
            overrides = [f"model={args.model}", f"structure={structure}", f"target={target}", "shots=1",
                         f"calib.n={args.n}", f"calib.seq_len={args.seq_len}", f"calib.batch_size={args.batch_size}",
                         "eval.dense=false", "eval.max_windows=8", "curvature.accumulate=float64",
                         f"device={args.device}", f"results={tmp}/records.jsonl"]
            base = None
            for label, procs, threads in settings:
                out = run_one(overrides, Path(tmp) / f"{structure}-{procs}-{threads}", procs, threads)
                seconds = out["record"]["points"][0]["seconds"]
                shot = sum(seconds[k] for k in PHASES)
                base = base or (shot, out["masks"])
                same = all(torch.equal(m, base[1][name]) for name, m in out["masks"].items())
                # every rank's updates of its own layers, before it waits for the others': how evenly they were divided
                point = out["record"]["points"][0]
                ranks = [r["own_update_s"] for r in point["ranks"]] if "ranks" in point else [seconds["update"]]
                row = {"model": args.model, "structure": structure, "setting": label, "procs": procs,
                       "threads": threads, "device": args.device, **{k: seconds[k] for k in PHASES}, "shot": shot,
                       "speedup": base[0] / shot, "same_masks": same, "rank_update": ranks,
                       "calib": [args.n, args.seq_len, args.batch_size]}
                rows.append(row)
                print(f"| {structure} | {label} | " + " | ".join(f"{seconds[k]:.1f}" for k in PHASES)
                      + f" | {shot:.1f} | {row['speedup']:.2f}x | {'yes' if same else 'NO'} | "
                      + " / ".join(f"{t:.1f}" for t in ranks) + " |", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
