"""Benchmark: the layer-joint element update (update.solver=joint) against the grouped one (grouped, the
published code's solve), layer by layer, on the same shots of one run.

    python -m experiments.bench_update [--models opt-tiny llama-tiny] [--n 128] [--shots 5] [--target 0.5]

Each shot re-estimates KFAC on the current model, selects with the global threshold, then updates
every layer with both solvers from the same weights and masks: their seconds and their quadratic
loss 1/2 vec(dW)^T F vec(dW) under the layer's damped F (the OBS objective both minimise; the joint
update is its minimum). The run continues from the joint update. Printed: per shot, the update
phase of each solver and their ratio, and the ratio of losses (grouped / joint) over the layers.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from surgeon import data as data_mod  # noqa: E402
from surgeon.adapters import adapter_for, set_weight_with_bias, weight_with_bias  # noqa: E402
from surgeon.config import shared_dir  # noqa: E402
from surgeon.curvature import estimate_curvature  # noqa: E402
from surgeon.obs import LayerOBS  # noqa: E402
from surgeon.prune import PruneState, apply_masks  # noqa: E402
from surgeon.schedule import shot_targets  # noqa: E402
from surgeon.selection import select_nm, select_unstructured  # noqa: E402

MODELS = {"opt-tiny": "models/opt-tiny-wt2", "llama-tiny": "models/llama-tiny-wt2"}


def quadratic_loss(solver: LayerOBS, W_new: torch.Tensor) -> float:
    """1/2 vec(dW)^T F vec(dW) on the layer's live block, F the damped factors the solver uses."""
    dW = (W_new - solver.W_full)[solver.live_rows][:, solver.live_cols].double()
    return 0.5 * sum(((G.double() @ dW @ A.double()) * dW).sum() for G, A in solver.terms).item()


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def bench_model(name: str, args) -> list[dict]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = shared_dir() / MODELS[name]
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    layers = adapter_for(model.config.model_type).layers(model)
    ids = data_mod.tokenize(tokenizer, (shared_dir() / "data/wikitext-2/valid.txt").read_text())
    batches = data_mod.batches(data_mod.calibration_windows(ids, args.n, args.seq_len, 100), 8)
    state = PruneState.empty(layers)
    rows = []
    for shot, target in enumerate(shot_targets(args.target, args.shots, "linear"), 1):
        factors = estimate_curvature(model, layers, batches, fisher="empirical", rank=1, kind="kfac", seed=shot)
        solvers, costs = {}, {}
        for layer in layers:
            f = factors.pop(layer.name)
            solvers[layer.name] = LayerOBS(weight_with_bias(layer.module), f.A, f.G, damping_a=0.01, damping_g=0.1,
                                           has_bias=layer.module.bias is not None)
            costs[layer.name] = solvers[layer.name].element_costs()
        if args.nm:
            state.removed.update(select_nm(costs, state.removed, target, 2, 4))
        else:
            state.removed.update(select_unstructured(costs, state.removed, target))
        for layer in layers:
            solver, removed = solvers.pop(layer.name), state.removed[layer.name]
            W_g, t_g = timed(lambda: solver.update_elements(removed, max_correlate=args.max_correlate))
            (W_j, info), t_j = timed(lambda: solver.update_elements_joint(removed))
            rows.append({"model": name, "shot": shot, "target": target, "layer": layer.name,
                         "removed_fraction": removed.float().mean().item(), "grouped_s": t_g, "joint_s": t_j,
                         "grouped_loss": quadratic_loss(solver, W_g), "joint_loss": quadratic_loss(solver, W_j),
                         **{f"joint_{k}": v for k, v in info.as_dict().items()}})
            set_weight_with_bias(layer.module, W_j)
        apply_masks(layers, state)
        shot_rows = [r for r in rows if r["model"] == name and r["shot"] == shot]
        print(f"{name} shot {shot}: update grouped {sum(r['grouped_s'] for r in shot_rows):.1f}s, "
              f"joint {sum(r['joint_s'] for r in shot_rows):.1f}s", flush=True)
    return rows


def loss_ratio(r: dict) -> float:
    """grouped / joint quadratic loss (1 when both are zero: nothing new removed)."""
    return r["grouped_loss"] / r["joint_loss"] if r["joint_loss"] > 0 else 1.0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--n", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--target", type=float, default=0.5)
    p.add_argument("--nm", action="store_true", help="2:4 instead of unstructured (target 0.5)")
    p.add_argument("--max-correlate", type=int, default=2000)
    p.add_argument("--out", default="reports/bench_update", help="directory for the per-layer JSON")
    args = p.parse_args(argv)

    rows = [r for name in args.models for r in bench_model(name, args)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    kind = "2:4" if args.nm else f"unstructured {args.target}"
    (out / f"layers-{'nm' if args.nm else args.target}.json").write_text(json.dumps(rows, indent=1))

    print(f"\nUpdate phase of a {args.shots}-shot {kind} run, {args.n} x {args.seq_len} calibration, "
          f"grouped max_correlate={args.max_correlate} vs joint (ratios in this run; loss ratio grouped/joint "
          "over the layers)\n")
    print("| model | shot | grouped (s) | joint (s) | time grouped/joint | loss ratio min | median | max | "
          "layers joint > grouped | CG iterations max |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        for shot in range(1, args.shots + 1):
            rs = [r for r in rows if r["model"] == name and r["shot"] == shot]
            g, j = sum(r["grouped_s"] for r in rs), sum(r["joint_s"] for r in rs)
            ratios = [loss_ratio(r) for r in rs]
            worse = sum(r["joint_loss"] > r["grouped_loss"] * (1 + 1e-9) for r in rs)
            print(f"| {name} | {shot} | {g:.1f} | {j:.1f} | {g / j:.2f}x | {min(ratios):.3f} | "
                  f"{statistics.median(ratios):.3f} | {max(ratios):.3f} | {worse} | "
                  f"{max(r['joint_iterations'] for r in rs)} |")
        rs = [r for r in rows if r["model"] == name]
        g, j = sum(r["grouped_s"] for r in rs), sum(r["joint_s"] for r in rs)
        print(f"| {name} | all | {g:.1f} | {j:.1f} | {g / j:.2f}x | | | | "
              f"{sum(r['joint_loss'] > r['grouped_loss'] * (1 + 1e-9) for r in rs)} | |")


if __name__ == "__main__":
    main()
