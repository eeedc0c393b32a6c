"""Benchmark: the joint element update solved in float64 against float32 rounds refined in float64, layer by
layer, on a testbed model's real factors, in one run.

    python -m experiments.bench_refine [--model opt-tiny] [--target 0.5] [--n 32] [--seq-len 256]

One shot's selection at `--target` (global threshold, unstructured), then each layer's joint update twice: plain
float64 conjugate gradients and `obs._pcg_refined`; prints iterations, seconds, the refined residual and the
relative difference of the updated weights, and the total time ratio.
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from surgeon import data as data_mod  # noqa: E402
from surgeon import obs  # noqa: E402
from surgeon.adapters import adapter_for, weight_with_bias  # noqa: E402
from surgeon.config import shared_dir  # noqa: E402
from surgeon.curvature import estimate_curvature  # noqa: E402
from surgeon.selection import select_unstructured  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="opt-tiny", choices=["opt-tiny", "llama-tiny"])
    p.add_argument("--target", type=float, default=0.5)
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    args = p.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = shared_dir() / f"models/{args.model}-wt2"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = data_mod.tokenize(AutoTokenizer.from_pretrained(path), (shared_dir() / "data/wikitext-2/valid.txt").read_text())
    batches = data_mod.batches(data_mod.calibration_windows(ids, args.n, args.seq_len, 100), 8)
    layers = adapter_for(model.config.model_type).layers(model)
    factors = estimate_curvature(model, layers, batches)

    def solver(layer):
        f = factors[layer.name]
        return obs.LayerOBS(weight_with_bias(layer.module), f.A, f.G, damping_a=0.01, damping_g=0.1,
                            has_bias=layer.module.bias is not None)

    costs = {layer.name: solver(layer).element_costs() for layer in layers}
    removed = select_unstructured(costs, {k: torch.zeros_like(c, dtype=torch.bool) for k, c in costs.items()},
                                  args.target)
    refined = obs._pcg_refined
    plain = lambda apply, apply32, b, precond, tol, max_iter: obs._pcg(apply, b, precond, tol, max_iter)  # noqa: E731
    total = {"float64": 0.0, "refined": 0.0}
    print("| layer | removed | formulation | float64 its | s | refined its | s | residual | weights rel. diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    try:
        for layer in layers:
            s = solver(layer)
            s.Ginv, s.Ainv  # formed before timing  # noqa: B018
            out = {}
            for key, fn in (("float64", plain), ("refined", refined)):
                obs._pcg_refined = fn
                t0 = time.perf_counter()
                W, info = s.update_elements_joint(removed[layer.name])
                out[key] = W, info, time.perf_counter() - t0
                total[key] += out[key][2]
            (W64, i64, t64), (W32, i32, t32) = out["float64"], out["refined"]
            diff = ((W64 - W32).norm() / W64.norm()).item()
            print(f"| {layer.name} | {i64.removed / removed[layer.name].numel():.2f} | {i64.formulation} | "
                  f"{i64.iterations} | {t64:.2f} | {i32.iterations} | {t32:.2f} | {i32.residual:.1e} | {diff:.1e} |",
                  flush=True)
    finally:
        obs._pcg_refined = refined
    print(f"\nall layers: float64 {total['float64']:.1f} s, refined {total['refined']:.1f} s, "
          f"ratio {total['float64'] / total['refined']:.2f}x")


if __name__ == "__main__":
    main()
