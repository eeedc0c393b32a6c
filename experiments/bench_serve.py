"""Token throughput of saved models against the dense one, in one run (issue 26's GPU measurement, prepared).

    python -m experiments.bench_serve dense=DIR [sparse24=DIR] [int4=DIR] [--semi] [--device cuda]
        [--dtype float16] [--batch 8] [--prompt 256] [--new 64] [--repeats 3] [--out FILE.jsonl]

Each NAME=DIR is a Hugging Face folder (a run's `model/`: float weights with zeros, or compressed-tensors'
pack-quantized / int-quantized with `quantize.export`), loaded with the stock `from_pretrained` (compressed-tensors
installed for the quantized ones). Per model: prefill tokens/s (one forward of batch x prompt tokens) and decode
tokens/s (greedy generate of `new` tokens after the prompt, every sequence to full length), the median of
`repeats` timed runs after one warm-up, and the ratio to the first model's (the baseline) measured in the same
run. `--semi` turns the Linear weights of every model whose name starts with "sparse" into
`torch.sparse.to_sparse_semi_structured` tensors (CUDA, float16/bfloat16, 2:4 masks; the layers whose weights
are not 2:4 stay dense, counted in the output), the path by which PyTorch's semi-structured kernels use a 2:4
pattern now that serving engines dropped 2:4 checkpoints. On a CPU it runs (no `--semi`) as a check of the script,
not as a measurement.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device, repeats: int) -> float:
    fn()  # warm-up (kernels, caches)
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def to_semi_structured(model) -> tuple[int, int]:
    """Linear weights holding a 2:4 pattern (along the input dimension) as semi-structured sparse tensors;
    returns (converted, left dense)."""
    import torch
    from torch.sparse import to_sparse_semi_structured

    converted = dense = 0
    for module in model.modules():
        if not isinstance(module, torch.nn.Linear) or module.weight.dim() != 2:
            continue
        W = module.weight.data
        R, C = W.shape
        two_four = C % 4 == 0 and bool(((W.view(R, C // 4, 4) != 0).sum(-1) <= 2).all())
        if not two_four or module.out_features == model.config.vocab_size:
            dense += 1
            continue
        module.weight = torch.nn.Parameter(to_sparse_semi_structured(W), requires_grad=False)
        converted += 1
    return converted, dense


def measure(name: str, path: str, args, device) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    semi = None
    if args.semi and name.startswith("sparse"):
        semi = dict(zip(("converted", "dense"), to_semi_structured(model)))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(10, model.config.vocab_size, (args.batch, args.prompt), generator=gen).to(device)

    def prefill():
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)

    def decode():
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new,
                           min_new_tokens=args.new, do_sample=False, pad_token_id=0)

    t_prefill = _timed(prefill, device, args.repeats)
    t_generate = _timed(decode, device, args.repeats)
    decode_s = max(t_generate - t_prefill, 1e-9)  # generate = one prefill + `new` decode steps
    size = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
    return {"name": name, "path": str(path), "device": str(device), "dtype": args.dtype, "batch": args.batch,
            "prompt": args.prompt, "new": args.new, "prefill_tok_s": args.batch * args.prompt / t_prefill,
            "decode_tok_s": args.batch * args.new / decode_s, "folder_bytes": size, "semi_structured": semi,
            "peak_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m experiments.bench_serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="NAME=DIR, the first the baseline (e.g. dense=...)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--semi", action="store_true", help="2:4 Linear weights of 'sparse*' models as "
                                                            "semi-structured sparse tensors (CUDA)")
    parser.add_argument("--out", help="append the rows to this JSON-lines file")
    args = parser.parse_args(argv)
    import torch

    pairs = []
    for item in args.models:
        name, sep, path = item.partition("=")
        if not sep or not (Path(path) / "config.json").is_file():
            parser.error(f"{item!r}: give NAME=DIR with DIR a saved model folder (config.json)")
        pairs.append((name, path))
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available (--device cpu checks the script)")
    if args.semi and device.type != "cuda":
        parser.error("--semi needs CUDA: PyTorch's semi-structured sparse kernels run on GPUs only")
    rows = [measure(name, path, args, device) for name, path in pairs]
    base = rows[0]
    print(f"{'model':<12} {'prefill tok/s':>14} {'x':>6} {'decode tok/s':>13} {'x':>6} {'MB':>8}")
    for row in rows:
        row["prefill_ratio"] = row["prefill_tok_s"] / base["prefill_tok_s"]
        row["decode_ratio"] = row["decode_tok_s"] / base["decode_tok_s"]
        print(f"{row['name']:<12} {row['prefill_tok_s']:>14.1f} {row['prefill_ratio']:>6.2f} "
              f"{row['decode_tok_s']:>13.1f} {row['decode_ratio']:>6.2f} {row['folder_bytes'] / 1e6:>8.1f}")
    if args.out:
        with open(args.out, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
