"""Diagnostic: does the curvature's predicted loss increase rank layers the way the true loss does?

    python -m experiments.diagnose_allocation --model opt-tiny [--target 0.5] [--n 128] [--out reports/diagnose]

One unstructured LLM Surgeon shot from the dense model, selected once with the global
threshold and once per layer (`selection=uniform`). For every layer, alone, the OBS
update of that layer's selected weights is applied to the dense model and the change of
the mean token NLL is measured on held-out windows and on calibration windows; the
prediction of the same change is 1/2 vec(dW)^T (G (x) A) vec(dW) with the UNDAMPED factors
(the loss the costs stand for), scaled by (T-1)^2 to the mean-token-NLL scale. The global threshold is only right when the ratio
actual / predicted is the same for every layer: a layer type whose loss the curvature
underestimates is over-pruned by the global threshold and left alone by uniform selection.
Prints a table by layer and by layer type, and writes it as JSON (--out).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from surgeon import data as data_mod  # noqa: E402
from surgeon.adapters import adapter_for, set_weight_with_bias, weight_with_bias  # noqa: E402
from surgeon.config import shared_dir  # noqa: E402
from surgeon.curvature import estimate_curvature  # noqa: E402
from surgeon.evaluate import window_losses  # noqa: E402
from surgeon.obs import LayerOBS  # noqa: E402
from surgeon.records import write_json_atomic  # noqa: E402
from surgeon.selection import select_unstructured  # noqa: E402

MODELS = {"opt-tiny": "models/opt-tiny-wt2", "llama-tiny": "models/llama-tiny-wt2"}
DATA = "data/wikitext-2"


def mean_nll(model, windows) -> float:
    return window_losses(model, windows).mean().item()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=list(MODELS), default="opt-tiny")
    p.add_argument("--target", type=float, default=0.5)
    p.add_argument("--n", type=int, default=128, help="calibration sequences for the curvature")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--windows", type=int, default=64, help="held-out and calibration windows for the loss change")
    p.add_argument("--damping-a", type=float, default=0.01)
    p.add_argument("--damping-g", type=float, default=0.1)
    p.add_argument("--max-correlate", type=int, default=2000)
    p.add_argument("--out", default=None, help="write the result here as JSON")
    args = p.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = shared_dir() / MODELS[args.model]
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    layers = adapter_for(model.config.model_type).layers(model)
    calib_ids = data_mod.tokenize(tokenizer, (shared_dir() / DATA / "valid.txt").read_text())
    calib = data_mod.calibration_windows(calib_ids, args.n, args.seq_len, 100)
    heldout = data_mod.eval_windows(data_mod.tokenize(tokenizer, (shared_dir() / DATA / "test.txt").read_text()),
                                    args.seq_len, args.windows)
    calib_sub = calib[: args.windows]
    base = {"heldout": mean_nll(model, heldout), "calib": mean_nll(model, calib_sub)}

    factors = estimate_curvature(model, layers, data_mod.batches(calib, 8), progress=True)
    solvers, costs, raw = {}, {}, {}
    for layer in layers:
        f = factors.pop(layer.name)
        raw[layer.name] = (f.A.double(), f.G.double())
        solvers[layer.name] = LayerOBS(weight_with_bias(layer.module), f.A, f.G, damping_a=args.damping_a,
                                       damping_g=args.damping_g, has_bias=layer.module.bias is not None)
        costs[layer.name] = solvers[layer.name].element_costs()
    empty = {name: torch.zeros_like(c, dtype=torch.bool) for name, c in costs.items()}

    result = {"model": args.model, "target": args.target, "n": args.n, "seq_len": args.seq_len,
              "windows": args.windows, "damping_a": args.damping_a, "damping_g": args.damping_g,
              "dense_nll": base, "selections": {}}
    for selection in ("global", "uniform"):
        masks = select_unstructured(costs, empty, args.target, uniform=selection == "uniform")
        rows, updates = [], {}
        for layer in layers:
            name = layer.name
            W0 = weight_with_bias(layer.module).clone()
            W1 = solvers[name].update_elements(masks[name], max_correlate=args.max_correlate)
            dW = (W1 - W0).double()
            A, G = raw[name]
            # the factors are of the per-sequence MEAN loss's gradients: (T-1)^2 puts the quadratic on
            # the scale of the mean token NLL (section 2's per-token Fisher)
            predicted = 0.5 * torch.sum((G @ dW) * (dW @ A)).item() * (args.seq_len - 1) ** 2
            set_weight_with_bias(layer.module, W1)
            actual = {k: mean_nll(model, w) - base[k] for k, w in (("heldout", heldout), ("calib", calib_sub))}
            set_weight_with_bias(layer.module, W0)
            updates[name] = W1
            rows.append({"layer": name, "type": layer.type, "block": layer.block,
                         "removed": masks[name].float().mean().item(),
                         "selection_cost": costs[name][masks[name]].double().sum().item(),
                         "predicted": predicted, "actual_heldout": actual["heldout"], "actual_calib": actual["calib"]})
            print(f"{selection:>7} {name:<40} removed {rows[-1]['removed']:.3f} predicted {predicted:.3e} "
                  f"actual {actual['heldout']:.3e}", flush=True)
        originals = {l.name: weight_with_bias(l.module).clone() for l in layers}
        for layer in layers:
            set_weight_with_bias(layer.module, updates[layer.name])
        together = {k: mean_nll(model, w) - base[k] for k, w in (("heldout", heldout), ("calib", calib_sub))}
        for layer in layers:
            set_weight_with_bias(layer.module, originals[layer.name])
        result["selections"][selection] = {"layers": rows, "all_layers": together}

    print(report(result))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / f"allocation_{args.model}_{args.target}.json", result)
        (out / f"allocation_{args.model}_{args.target}.md").write_text(report(result) + "\n")
    return result


def by_type(rows: list[dict]) -> dict[str, dict]:
    out = {}
    for t in dict.fromkeys(r["type"] for r in rows):
        sel = [r for r in rows if r["type"] == t]
        pred, act = sum(r["predicted"] for r in sel), sum(r["actual_heldout"] for r in sel)
        out[t] = {"removed": statistics.fmean(r["removed"] for r in sel), "predicted": pred, "actual": act,
                  "ratio": act / pred if pred > 0 else float("nan")}
    return out


def report(result: dict) -> str:
    g, u = result["selections"]["global"], result["selections"]["uniform"]
    lines = [f"## {result['model']}: one unstructured shot to {result['target']} from the dense model",
             f"(curvature from {result['n']} x {result['seq_len']} calibration tokens, damping A {result['damping_a']}, "
             f"G {result['damping_g']}; NLL changes on {result['windows']} held-out windows)", "",
             "| layer type | removed (global) | predicted (global) | actual (global) | actual / predicted "
             "| removed (uniform) | actual (uniform) |", "|---|---|---|---|---|---|---|"]
    tg, tu = by_type(g["layers"]), by_type(u["layers"])
    for t in tg:
        lines.append(f"| {t} | {tg[t]['removed']:.3f} | {tg[t]['predicted']:.2e} | {tg[t]['actual']:.2e} | "
                     f"{tg[t]['ratio']:.2f} | {tu[t]['removed']:.3f} | {tu[t]['actual']:.2e} |")
    for name, s in (("global", g), ("uniform", u)):
        pred = sum(r["predicted"] for r in s["layers"])
        alone = sum(r["actual_heldout"] for r in s["layers"])
        lines.append(f"\n{name}: predicted sum {pred:.3e}; actual, each layer alone, summed {alone:.3e}; "
                     f"actual, all layers together {s['all_layers']['heldout']:.3e} (held-out NLL), "
                     f"{s['all_layers']['calib']:.3e} (calibration NLL)")
    ratios = [r["actual_heldout"] / r["predicted"] for r in g["layers"] if r["predicted"] > 0]
    if ratios:
        lines.append(f"per-layer actual/predicted (global): min {min(ratios):.2f}, median "
                     f"{statistics.median(ratios):.2f}, max {max(ratios):.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
