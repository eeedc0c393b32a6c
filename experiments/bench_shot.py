"""Benchmark: the phases of one shot as ratios to one plain forward+backward pass, measured in the same run.

    python -m experiments.bench_shot [--models opt-tiny llama-tiny] [--n 128] [--seq-len 256] [--repeats 3]
                                     [--shots 5 --target 0.5 --methods surgeon kobd magnitude]

The plain pass runs over the same calibration batches as the curvature pass, with no hooks
(median of `--repeats`). Each structure's shot starts from the dense model, at `--target`,
with the structure preset's damping; evaluation is not part of a shot. With `--shots N` every structure and
method runs N shots to `--target` (the linear schedule), a row per shot.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from surgeon import data as data_mod  # noqa: E402
from surgeon.adapters import adapter_for  # noqa: E402
from surgeon.config import resolve_device, shared_dir  # noqa: E402
from surgeon.prune import PruneState, ShotOptions, prune_shot  # noqa: E402
from surgeon.schedule import shot_targets  # noqa: E402

METHODS = {"surgeon": dict(kind="kfac", correlation="layer"), "kobd": dict(kind="kfac", correlation="none"),
           "lobd": dict(kind="diag_a", correlation="none"), "magnitude": dict(kind="identity", correlation="none")}

MODELS = {"opt-tiny": "models/opt-tiny-wt2", "llama-tiny": "models/llama-tiny-wt2"}
DAMPING = {"structured": (0.01, 0.01), "unstructured": (0.01, 0.1), "semistructured": (0.01, 0.1)}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_pass(model, batches, device) -> float:
    """One forward+backward over the calibration batches, mean next-token loss per sequence, no hooks."""
    sync(device)
    t0 = time.perf_counter()
    for batch in batches:
        batch = batch.to(device)
        logits = model(input_ids=batch).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                                 reduction="none").view(batch.shape[0], -1).mean(1).sum()
        loss.backward()
    model.zero_grad(set_to_none=True)
    sync(device)
    return time.perf_counter() - t0


def peak_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--structures", nargs="+", default=["structured", "unstructured"])
    p.add_argument("--n", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--target", type=float, default=0.1, help="target of the (last) shot; 0.1: the first of 5 to 50%%")
    p.add_argument("--shots", type=int, default=1, help="shots of the linear schedule to --target")
    p.add_argument("--methods", nargs="+", default=["surgeon"], choices=list(METHODS))
    p.add_argument("--max-correlate", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    rows = []
    for name in args.models:
        path = shared_dir() / MODELS[name]
        tokenizer = AutoTokenizer.from_pretrained(path)
        dense = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
        ids = data_mod.tokenize(tokenizer, (shared_dir() / "data/wikitext-2/valid.txt").read_text())
        batches = data_mod.batches(data_mod.calibration_windows(ids, args.n, args.seq_len, 100), args.batch_size)
        plain_pass(dense, batches[:1], device)  # warm-up
        base = statistics.median(plain_pass(dense, batches, device) for _ in range(args.repeats))
        for structure, method in itertools.product(args.structures, args.methods):
            model = copy.deepcopy(dense)
            layers = adapter_for(model.config.model_type).layers(model)
            da, dg = DAMPING[structure]
            opts = ShotOptions(method=method, structure=structure, damping_a=da, damping_g=dg,
                               max_correlate=args.max_correlate, **METHODS[method])
            state = PruneState.empty(layers)
            for shot, target in enumerate(shot_targets(args.target, args.shots), 1):
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                seconds, _ = prune_shot(model, layers, batches, state, target, opts)
                total = sum(seconds.values())
                label = structure if args.shots == 1 else f"{structure} {method} shot {shot} ({target:.2f})"
                rows.append((name, label, base, seconds, total, peak_mb(device)))
                print(f"{name} {label}: pass {base:.2f}s, shot {total:.2f}s", flush=True)
            del model

    print(f"\nOne shot to target {args.target} at {args.n} x {args.seq_len} calibration tokens on {device} "
          f"(ratios to one plain forward+backward pass, median of {args.repeats})\n")
    print("| model | structure | plain pass (s) | curvature | costs+selection | updates | whole shot | peak memory (MB) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, structure, base, s, total, mem in rows:
        print(f"| {name} | {structure} | {base:.2f} | {s['curvature'] / base:.2f}x | {s['costs'] / base:.2f}x | "
              f"{s['update'] / base:.2f}x | {total / base:.2f}x | {mem:.0f} |")


if __name__ == "__main__":
    main()
