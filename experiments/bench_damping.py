"""Benchmark: a shot with curvature.damping=auto against the same shot at fixed damping, measured in one run.

    python -m experiments.bench_damping [--models opt-tiny llama-tiny | smollm2-135m ...] [--structures ...]
                                        [--methods surgeon kobd] [--n 128] [--heldout 8] [--tries 4]
                                        [--every 8] [--tols none 1e-3]

For every model, structure and method: from the dense model, one shot at `--target` with the structure preset's
damping (fixed), then the same shot from the same weights with the damping search (auto). Prints the seconds
of each phase and the ratio auto / fixed of the whole shot, with the number of candidates the search solved
and the held-out evaluations' share (evaluation of the test text is not part of a shot), and the mean shot's
ratio with curvature.auto_damping.every=N: one searched shot and N - 1 at the chosen damping, from the two
shots measured. `--tols`: one auto shot per curvature.auto_damping.tol (none: every try to update.tol; a value:
the tries' joint solves to it, the chosen one refined), each against the same fixed shot.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from experiments.bench_shot import DAMPING, METHODS, MODELS  # noqa: E402
from surgeon import data as data_mod  # noqa: E402
from surgeon.adapters import adapter_for  # noqa: E402
from surgeon.config import resolve_device, shared_dir  # noqa: E402
from surgeon.prune import PruneState, ShotOptions, prune_shot  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--structures", nargs="+", default=["structured", "unstructured"])
    p.add_argument("--methods", nargs="+", default=["surgeon", "kobd"], choices=["surgeon", "kobd", "lobd"])
    p.add_argument("--n", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--target", type=float, default=0.1, help="the shot's target; 0.1: the first of 5 to 50%%")
    p.add_argument("--heldout", type=int, default=8)
    p.add_argument("--tries", type=int, default=4)
    p.add_argument("--every", type=int, default=8, help="curvature.auto_damping.every for the amortised column: "
                   "one searched shot and every - 1 fixed-damping shots, from the two shots measured here")
    p.add_argument("--tols", nargs="+", default=["none"], help="curvature.auto_damping.tol values (none: null)")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(args.device)
    rows = []
    for name in args.models:
        if name in MODELS:
            path = shared_dir() / MODELS[name]
            tokenizer = AutoTokenizer.from_pretrained(path)
            dense = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
        else:  # a model preset (conf/model), e.g. smollm2-135m: loaded as run.py loads it
            from surgeon import models
            from surgeon.config import compose

            cfg = compose([f"model={name}"])
            tokenizer, dense = models.load_tokenizer(cfg), models.load_model(cfg, device).eval()
        ids = data_mod.tokenize(tokenizer, (shared_dir() / "data/wikitext-2/valid.txt").read_text())
        starts = data_mod.calibration_starts(ids, args.n, args.seq_len, 100)
        batches = data_mod.batches(data_mod.calibration_windows(ids, args.n, args.seq_len, 100), 8)
        heldout = data_mod.heldout_windows(ids, args.heldout, args.seq_len, data_mod.heldout_seed(100), starts)
        for structure, method in itertools.product(args.structures, args.methods):
            da, dg = DAMPING[structure]
            seconds = {}
            tols = [None if t == "none" else float(t) for t in args.tols]
            for damping, try_tol in [("fixed", None), *[("auto", t) for t in tols]]:
                model = copy.deepcopy(dense)
                layers = adapter_for(model.config.model_type).layers(model)
                opts = ShotOptions(method=method, structure=structure, damping_a=da, damping_g=dg, tol=1e-8,
                                   damping=damping, heldout=args.heldout, tries=args.tries, try_tol=try_tol,
                                   **METHODS[method])
                s, info = prune_shot(model, layers, batches, PruneState.empty(layers), args.target, opts,
                                     heldout=heldout)
                seconds[damping, try_tol] = (s, len(info["damping"]["tried"]) if "damping" in info else 1)
                print(f"{name} {structure} {method} {damping} tol={try_tol}: {sum(s.values()):.1f} s", flush=True)
                if "damping" in info:  # what the search saw: per try scale, held-out loss, CG iterations
                    d = info["damping"]
                    print("  chosen", d["chosen"], "held-out", f"{d['heldout_loss']:.6f};", "; ".join(
                        f"{t['scale']:.4g}: {t['heldout_loss']:.6f} ({t.get('iterations', '-')} it)"
                        for t in d["tried"]), flush=True)
                del model
            rows.extend((name, structure, method, t, seconds[("fixed", None)], seconds[("auto", t)]) for t in tols)

    print(f"\nOne shot to {args.target} from the dense model, {args.n} x {args.seq_len} calibration tokens, "
          f"{args.heldout} held-out windows, tries {args.tries}, on {device}; seconds, ratio auto / fixed; "
          f"every={args.every}: (auto + (every - 1) fixed) / (every fixed)\n")
    print(f"| model | structure | method | tries' tol | fixed shot (s) | auto shot (s) | candidates | curvature | "
          f"costs+update (auto) | held-out evals etc. | auto / fixed | every={args.every} |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, structure, method, try_tol, (fixed, _), (auto, tries) in rows:
        f, a = sum(fixed.values()), sum(auto.values())
        print(f"| {name} | {structure} | {method} | {try_tol or 'update.tol'} | {f:.1f} | {a:.1f} | {tries} | "
              f"{auto['curvature']:.1f} | "
              f"{auto['costs'] + auto['update']:.1f} | {auto['damping']:.1f} | {a / f:.2f}x | "
              f"{(a + (args.every - 1) * f) / (args.every * f):.2f}x |")


if __name__ == "__main__":
    main()
