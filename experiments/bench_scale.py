"""Benchmark: one shot per structure on random-init models of real shapes, built from configs alone (no download).

    python -m experiments.bench_scale [--shapes opt-125m ...] [--n 8] [--seq-len 128] [--device auto]
                                      [--dtype float32] [--layers N] [--have-gib G]
                                      [--json reports/bench_scale/cpu.jsonl]

Per shape: the memory estimate (surgeon.memory) checked against the device first (a shape that does not fit is
refused in seconds, as run.py refuses it), then one plain forward+backward over the calibration batches, then one
shot per structure from the dense model: seconds per phase, their ratio to the plain pass, the peak memory of
the shot, the estimate beside it, and the shot's peak above model + factors as a multiple of the largest
layer's solver measured alone. CPU peaks are the process's resident memory sampled every millisecond (the
benchmark re-executes itself with a fixed malloc mmap threshold so freed tensors leave the resident set); CUDA
peaks are torch's allocator peaks. A table on stdout, one JSON line per row in --json.

`--layers N` keeps the first N blocks of each shape (real widths, fewer layers): the Llama-2-7B shape's layers and
solvers measured on a machine that cannot hold all 32 blocks. `--have-gib G` checks the estimate against G GiB
instead of the device's memory (would it fit on an 80 GB card?); a shape that fits is then still run here.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from surgeon import memory  # noqa: E402
from surgeon.adapters import adapter_for, weight_with_bias  # noqa: E402
from surgeon.config import resolve_device  # noqa: E402
from surgeon.obs import LayerOBS  # noqa: E402
from surgeon.prune import PruneState, ShotOptions, prune_shot  # noqa: E402

# the published architectures' hyperparameters (their config.json files), so nothing is downloaded
SHAPES = {
    # the testbed models' shapes (../shared/models/*/config.json), random weights
    "opt-tiny": ("opt", dict(hidden_size=256, ffn_dim=1024, num_hidden_layers=4, num_attention_heads=4,
                             vocab_size=4096, max_position_embeddings=2048, word_embed_proj_dim=256)),
    "llama-tiny": ("llama", dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                                 num_key_value_heads=4, vocab_size=4096, max_position_embeddings=2048)),
    "opt-125m": ("opt", dict(hidden_size=768, ffn_dim=3072, num_hidden_layers=12, num_attention_heads=12,
                             vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=768)),
    "opt-1.3b": ("opt", dict(hidden_size=2048, ffn_dim=8192, num_hidden_layers=24, num_attention_heads=32,
                             vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=2048)),
    "tinyllama-1.1b": ("llama", dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                                     num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                                     max_position_embeddings=2048)),
    "llama-2-7b": ("llama", dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                 num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                                 max_position_embeddings=4096)),
    # mixture-of-experts shapes (docs/moe.md): every routed expert's gate|up and down are layers of their own
    "mixtral-8x7b": ("mixtral", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                     num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
                                     num_experts_per_tok=2, vocab_size=32000, max_position_embeddings=32768)),
    "qwen3-30b-a3b": ("qwen3_moe", dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                                        num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                                        head_dim=128, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
                                        vocab_size=151936, max_position_embeddings=40960)),
}
DAMPING = {"structured": (0.01, 0.01), "unstructured": (0.01, 0.1), "semistructured": (0.01, 0.1)}
MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def make_config(shape: str, layers: int | None = None):
    """The shape's transformers config; with `layers`, only its first `layers` blocks."""
    from transformers import LlamaConfig, MixtralConfig, OPTConfig, Qwen3MoeConfig

    family, kwargs = SHAPES[shape]
    if layers is not None:
        if not 1 <= layers <= kwargs["num_hidden_layers"]:
            raise SystemExit(f"error: --layers {layers}: {shape} has 1 to {kwargs['num_hidden_layers']} layers")
        kwargs = {**kwargs, "num_hidden_layers": layers}
    classes = {"opt": OPTConfig, "llama": LlamaConfig, "mixtral": MixtralConfig, "qwen3_moe": Qwen3MoeConfig}
    return classes[family](**kwargs)


class PeakMemory:
    """Peak bytes over a `with` block: torch's allocator peak on CUDA, sampled resident memory on CPU."""

    def __init__(self, device: torch.device):
        self.device, self.peak, self._stop = device, 0, threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def now(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.memory_allocated(self.device)
        return self.rss()

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(0.001)

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.peak = 0
        else:
            self.peak = self.rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = max(self.peak, torch.cuda.max_memory_allocated(self.device))
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self.rss())


@contextlib.contextmanager
def split_after_pass(tracker: PeakMemory, pass_peak: list):
    """While prune_shot runs: the peak up to the end of its curvature pass goes to pass_peak, and the tracker
    starts again from the memory held then, so that its peak is that of the costs, selection and update."""
    import surgeon.prune as prune_mod

    original = prune_mod.estimate_curvature

    def wrapped(*args, **kwargs):
        factors = original(*args, **kwargs)
        if tracker.device.type == "cuda":
            torch.cuda.synchronize(tracker.device)
            pass_peak.append(torch.cuda.max_memory_allocated(tracker.device))
            torch.cuda.reset_peak_memory_stats(tracker.device)
        else:
            pass_peak.append(tracker.peak)
            tracker.peak = tracker.rss()
        return factors

    prune_mod.estimate_curvature = wrapped
    try:
        yield
    finally:
        prune_mod.estimate_curvature = original


class Rows(list):
    """The table's rows; each one also appended to the JSON-lines file as soon as it is measured, so that a run
    stopped part-way (a time limit) keeps the rows it finished."""

    def __init__(self, path: Path | None):
        super().__init__()
        self.path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, row: dict) -> None:
        super().append(row)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
                f.flush()
                os.fsync(f.fileno())


def plain_pass(model, batches, device) -> float:
    """One forward+backward over the calibration batches (mean next-token loss per sequence), no hooks."""
    t0 = time.perf_counter()
    for batch in batches:
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none").mean(1).sum()
        loss.backward()
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def largest_solver_peak(model, layers, device) -> tuple[str, int]:
    """Peak memory of the largest layer's solver alone (costs and a joint update at 50%), random SPD factors."""
    layer = max(layers, key=lambda l: l.weight.numel())
    W = weight_with_bias(layer.module).float()
    R, C = W.shape
    g = torch.Generator(device=device).manual_seed(0)
    A = torch.randn(C, 2 * C, generator=g, device=device)
    G = torch.randn(R, 2 * R, generator=g, device=device)
    A, G = A @ A.T / C, G @ G.T / R
    with PeakMemory(device) as peak:
        base = peak.now()
        solver = LayerOBS(W, A, G, damping_a=0.01, damping_g=0.1, has_bias=layer.bias is not None)
        costs = solver.element_costs()
        removed = costs <= costs.median()
        solver.update_elements_joint(removed, tol=1e-6, max_iter=50)
        del solver
    return layer.name, peak.peak - base


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["opt-125m"], choices=list(SHAPES))
    p.add_argument("--structures", nargs="+", default=["structured", "unstructured"])
    p.add_argument("--n", type=int, default=8, help="calibration sequences")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--target", type=float, default=0.1)
    p.add_argument("--dtype", default="float32", choices=list(memory.BYTES))
    p.add_argument("--precision", default="fp32", choices=["fp32", "tf32", "bf16"])
    p.add_argument("--device", default="auto")
    p.add_argument("--max-iter", type=int, default=2000, help="update.max_iter of the joint solve")
    p.add_argument("--tol", type=float, default=1e-8, help="update.tol of the joint solve")
    p.add_argument("--layers", type=int, default=None, help="keep only the first N blocks of each shape")
    p.add_argument("--have-gib", type=float, default=None, help="check the estimate against this much memory")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    if device.type == "cpu" and any(os.environ.get(k) != v for k, v in MALLOC.items()):
        os.execve(sys.executable, [sys.executable, "-m", "experiments.bench_scale", *sys.argv[1:]],
                  {**os.environ, **MALLOC})
    torch.backends.cuda.matmul.allow_tf32 = False
    have = memory.available_bytes(device) if args.have_gib is None else int(args.have_gib * 2**30)
    # the process before any model: what the estimate adds to (CUDA peaks count tensors only)
    runtime = PeakMemory.rss() if device.type == "cpu" else 0
    rows = Rows(args.json)
    for shape in args.shapes:
        config = make_config(shape, args.layers)
        t0 = time.perf_counter()
        settings = dict(dtype=args.dtype, calib_batch=args.batch_size, calib_seq_len=args.seq_len, calib_n=args.n,
                        eval_batch=args.batch_size, eval_seq_len=args.seq_len, runtime=runtime)
        estimates = {s: memory.estimate(config, structure=s, **settings) for s in args.structures}
        worst = max(estimates.values(), key=lambda e: e.peak)
        if have is not None and worst.peak > have:
            hints = memory.fix_hints(config, worst, have, **settings)
            row = {"shape": shape, "layers": config.num_hidden_layers, "device": str(device), "refused": True,
                   "estimate": worst.as_dict(), "have": have, "seconds_to_refuse": time.perf_counter() - t0, "hints": hints}
            where = f"{device} has" if args.have_gib is None else "--have-gib gives"
            print(f"{label(row)}: refused in {row['seconds_to_refuse']:.1f} s: needs about {worst.describe()}, "
                  f"{where} {have / 2**30:.1f} GiB; try {' or '.join(hints)}", flush=True)
            rows.append(row)
            continue
        torch.manual_seed(0)
        from transformers import AutoModelForCausalLM

        with torch.device(device):  # initialised where it runs, in its dtype: no float32 copy on the host
            dense = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa",
                                                     dtype=getattr(torch, args.dtype)).eval()
        ids = torch.randint(0, config.vocab_size, (args.n, args.seq_len), generator=torch.Generator().manual_seed(1))
        batches = list(ids.split(args.batch_size))
        plain_pass(dense, batches[:1], device)  # warm-up
        base = plain_pass(dense, batches, device)
        layers = adapter_for(config.model_type).layers(dense)
        solver_layer, solver_peak = largest_solver_peak(dense, layers, device)
        factors = memory.estimate(config, **settings).factors
        weights = {n: l.module.state_dict() for n, l in ((l.name, l) for l in layers)}
        for structure in args.structures:
            with torch.no_grad():  # every structure's shot from the dense weights
                for layer in layers:
                    layer.module.load_state_dict({k: v.clone() for k, v in weights[layer.name].items()})
            da, dg = DAMPING[structure]
            opts = ShotOptions(structure=structure, damping_a=da, damping_g=dg, tol=args.tol, max_iter=args.max_iter,
                               precision=args.precision)
            with PeakMemory(device) as shot:
                before = shot.now()
                pass_peak = []
                with split_after_pass(shot, pass_peak):
                    seconds, info = prune_shot(dense, layers, batches, PruneState.empty(layers), args.target, opts)
            est = estimates[structure]
            solve_peak = shot.peak  # the costs, selection and update phases (the pass's peak is pass_peak[0])
            shot.peak = max(shot.peak, pass_peak[0])
            above = solve_peak - before - factors
            row = {"shape": shape, "layers": config.num_hidden_layers, "structure": structure, "device": str(device),
                   "dtype": args.dtype, "precision": args.precision, "calib": [args.n, args.seq_len, args.batch_size],
                   "plain_pass_s": base, "seconds": seconds, "ratios": {k: v / base for k, v in seconds.items()},
                   "shot_ratio": sum(seconds.values()) / base, "model_bytes": before, "peak_bytes": shot.peak,
                   "pass_peak_bytes": pass_peak[0], "solve_peak_bytes": solve_peak,
                   "estimate": est.as_dict(), "estimate_error": shot.peak / est.shot_peak - 1, "factor_bytes": factors,
                   "largest_solver": solver_layer, "solver_peak_bytes": solver_peak,
                   "above_model_factors_per_solver": above / solver_peak,
                   "max_iterations": max((s["iterations"] for s in info.get("solves", {}).values()), default=0)}
            rows.append(row)
            print(f"{label(row)} {structure}: shot {row['shot_ratio']:.2f}x plain pass, peak {shot.peak / 2**30:.2f} GiB "
                  f"(estimate {est.shot_peak / 2**30:.2f})", flush=True)
        del dense, weights
    print_table(rows)


def label(row) -> str:
    """The shape's name, and how many of its blocks ran when --layers cut it."""
    full = SHAPES[row["shape"]][1]["num_hidden_layers"]
    layers = row.get("layers", full)
    return row["shape"] if layers == full else f"{row['shape']} ({layers} of {full} layers)"


def print_table(rows):
    g = 2**30
    print("\n| shape | structure | plain pass (s) | curvature | costs | update | shot | peak (GiB) | estimate (GiB) "
          "| est. error | (costs/update peak - model - factors) / largest solver |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r.get("refused"):
            print(f"| {label(r)} | refused in {r['seconds_to_refuse']:.1f} s | | | | | | | "
                  f"{r['estimate']['peak'] / g:.1f} | | |")
            continue
        q = r["ratios"]
        print(f"| {label(r)} | {r['structure']} | {r['plain_pass_s']:.2f} | {q['curvature']:.2f}x | {q['costs']:.2f}x "
              f"| {q['update']:.2f}x | {r['shot_ratio']:.2f}x | {r['peak_bytes'] / g:.2f} | {r['estimate']['shot_peak'] / g:.2f} "
              f"| {r['estimate_error']:+.0%} | {r['above_model_factors_per_solver']:.2f} |")


if __name__ == "__main__":
    main()
