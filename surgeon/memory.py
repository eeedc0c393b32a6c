"""How much memory a run needs, estimated from the model's config alone, before anything is loaded.

The peak of a shot is the model plus the largest of its phases (docs/algorithm.md section 5, memory):
  curvature pass:  factors + activations of one calibration micro-batch (forward and backward)
  costs, update:   factors + the selection (costs of every layer, masks) + one layer's solver
  evaluation:      activations of one evaluation batch
The numbers are bytes; `bench_scale` prints them beside the measured peaks.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}
GiB = 2**30


@dataclass
class LayerShape:
    name: str
    type: str
    block: int
    rows: int   # R: outputs
    cols: int   # C: inputs, +1 with a bias
    shares_input_with: str | None = None  # the layer whose A this one shares (q/k/v, gate/up)


@dataclass
class Estimate:
    """Bytes of each part and the peak they add up to."""

    weights: int
    factors: int
    activations: int
    solver: int
    selection: int
    evaluation: int

    runtime: int = 0  # the process itself: torch and transformers on a CPU, the CUDA context on a GPU

    @property
    def shot_peak(self) -> int:
        """Peak of a shot: model, factors and the larger of the pass and the costs/update phases."""
        return self.runtime + self.weights + max(self.factors + self.activations,
                                                 self.factors + self.selection + self.solver)

    @property
    def peak(self) -> int:
        return max(self.shot_peak, self.runtime + self.weights + self.evaluation)

    def as_dict(self) -> dict:
        return {**asdict(self), "shot_peak": self.shot_peak, "peak": self.peak}

    def describe(self) -> str:
        parts = ", ".join(f"{k} {v / GiB:.1f}" for k, v in asdict(self).items())
        return f"{self.peak / GiB:.1f} GiB ({parts} GiB)"


def layer_shapes(config) -> list[LayerShape]:
    """The prunable layers of a transformers config's model, from a model built on the meta device (no weights)."""
    from transformers import AutoModelForCausalLM

    from .adapters import SHARED_INPUTS, adapter_for

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    out, owners = [], {}
    for layer in adapter_for(config.model_type).layers(model):
        R, C = layer.weight.shape
        bias = layer.bias is not None
        group = next((g for g in SHARED_INPUTS if layer.type in g), None)
        owner = owners.setdefault((layer.block, group, C, bias), layer.name) if group else layer.name
        out.append(LayerShape(layer.name, layer.type, layer.block, R, C + bias,
                              owner if owner != layer.name else None))
    return out


def parameter_count(config) -> int:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def solver_bytes(R: int, C: int, work: int = 4, rank: int = 1, joint: bool = True) -> int:
    """One layer's OBS solver at its peak: weights (2 copies), damped factors and inverses in the work dtype, and
    the larger of the float64 Cholesky work of the larger factor (matrix, factor, identity, inverse) and what
    the update adds: with `joint` (element updates: the layer-joint conjugate-gradient solve) its float64
    vectors, the float64 inverses restricted to the rows and columns it touches and their float32 copies, as
    measured (113 RC + 29 (R^2 + C^2) bytes in all, float32 work, primal or dual); otherwise (rows and columns)
    the row/column update's float64 work."""
    held = work * (2 * R * C + 2 * (R * R + C * C)) * rank
    cholesky = 8 * 4 * max(R, C) ** 2
    solve = 8 * (13 * R * C + 3 * (R * R + C * C)) if joint else 8 * (10 * R * C + R * R + C * C)
    return held + max(cholesky, solve)


def estimate(config, *, dtype: str = "float32", kind: str = "kfac", rank: int = 1, structure: str = "unstructured",
             calib_batch: int = 8, calib_seq_len: int = 256, eval_batch: int = 8, eval_seq_len: int = 256,
             calib_n: int = 128, layerwise: bool = False, runtime: int = 0, offload: bool = False,
             accumulate: str = "float32") -> Estimate:
    """Bytes a run of the model `config` needs on its device (see the module docstring); `runtime`: the process's
    own; `offload`: the factors live in host memory, one layer's on the device at a time; `accumulate="float64"`:
    the curvature pass sums in float64 (counted for every phase: an upper bound)."""
    w = BYTES[dtype]
    stats = 8 if dtype == "float64" else 4  # statistics and OBS algebra: float32 at least
    from .adapters import adapter_for

    shapes = layer_shapes(config)
    sizes = adapter_for(config.model_type).text_config(config)  # a multimodal checkpoint: its text tower's
    d, V, L = sizes.hidden_size, sizes.vocab_size, sizes.num_hidden_layers
    ffn = getattr(sizes, "intermediate_size", None) or getattr(sizes, "ffn_dim", None) or 4 * d
    weights = parameter_count(config) * w

    if layerwise:  # SparseGPT/Wanda: one block's statistics; calibration hidden states in and out of a block
        per_block = max(sum(s.cols ** 2 for s in shapes if s.block == b) for b in range(L))
        factors = stats * per_block
        activations = 2 * calib_n * calib_seq_len * d * w + _activations(config, 1, calib_seq_len, w, d, ffn, 1, V)
        solver = max(8 * 4 * s.cols ** 2 + stats * 3 * s.rows * s.cols for s in shapes)
        selection = sum(s.rows * s.cols for s in shapes)  # masks
        return Estimate(weights, factors, activations, solver, selection,
                        _activations(config, eval_batch, eval_seq_len, w, d, ffn, L, V, backward=False), runtime)

    if kind in ("identity", "diag_a"):
        shared = kind == "diag_a"  # identity's vectors need no pass, so nothing finds who shares
        factors = stats * sum(s.rows + (0 if shared and s.shares_input_with else s.cols) for s in shapes)
        solver = max(stats * 4 * s.rows * s.cols for s in shapes)  # LayerOBD: weights, live copy, costs
    else:
        a = sum(s.cols ** 2 for s in shapes if s.shares_input_with is None)
        g = sum(s.rows ** 2 for s in shapes)
        # rank 2: A2, G2 of every layer, and the half-step accumulators of the passes
        sums = 8 if accumulate == "float64" else stats
        factors = sums * (a + g + (2 * sum(s.rows ** 2 + s.cols ** 2 for s in shapes) if rank == 2 else 0))
        solver = max(solver_bytes(s.rows, s.cols, stats, rank, joint=structure != "structured") for s in shapes)
        if offload:  # on the device: one layer's factors (and one batch's products during the pass)
            factors = sums * max(s.rows ** 2 + s.cols ** 2 for s in shapes)
    masks = sum(s.rows * s.cols for s in shapes)  # bool, one byte each
    if structure == "structured":
        selection = masks + 8 * 4 * sum(s.rows + s.cols for s in shapes)
    else:  # costs of every layer (work dtype), turned into the threshold search's integer keys layer by layer
        selection = masks + stats * sum(s.rows * s.cols for s in shapes) + 3 * stats * max(s.rows * s.cols for s in shapes)
    activations = _activations(config, calib_batch, calib_seq_len, w, d, ffn, L, V) \
        + stats * 2 * calib_batch * calib_seq_len * max(ffn, d)  # a hook's float32 copies of one layer's a and g
    evaluation = _activations(config, eval_batch, eval_seq_len, w, d, ffn, L, V, backward=False)
    return Estimate(weights, factors, activations, solver, selection, evaluation, runtime)


def _activations(config, B: int, T: int, w: int, d: int, ffn: int, L: int, V: int, backward: bool = True) -> int:
    """A forward (+ backward) of B x T tokens: per block the tensors autograd keeps (about 8 d-wide and 3
    ffn-wide per token; attention runs through SDPA, which keeps no T x T scores), and the logits with their
    float32 loss copies."""
    tokens = B * T
    gated = config.model_type not in ("opt", "gpt2", "gpt_neox")  # gated MLPs keep gate, up, act(gate), product
    per_block = tokens * ((10 * d + 5 * ffn) if gated else (8 * d + 3 * ffn)) * w
    kept = L * per_block if backward else 2 * per_block
    logits = tokens * V * (w + 4 * (3 if backward else 2))
    return kept + logits


# the process without a model: torch and transformers imported (CPU), or a CUDA context
RUNTIME = {"cpu": int(0.3 * GiB), "cuda": 1 * GiB}


def available_bytes(device: torch.device) -> int | None:
    """Memory of the device: a GPU's total memory, or the host's physical memory (its cgroup limit if lower)."""
    import os

    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            limit = open(path).read().strip()
        except OSError:
            continue
        if limit.isdigit():
            have = min(have, int(limit))
    return have


def placement_bytes(device_map, max_memory: dict | None = None) -> tuple[int | None, list[torch.device]]:
    """Memory a device map may use, and its devices: the sum of `max_memory` when given, else of the devices a
    mapping names, else (auto, balanced, sequential) of every GPU, or the host without one. The estimate is
    compared with this sum: a device map splits the model by blocks, so a single device may still run short."""
    if max_memory:
        from accelerate.utils import convert_file_size_to_int

        names = [str(k) for k in max_memory if str(k) != "disk"]
        have = sum(convert_file_size_to_int(v) for k, v in max_memory.items() if str(k) != "disk")
    else:
        names = sorted({str(v) for v in device_map.values()}) if isinstance(device_map, dict) else \
            [str(i) for i in range(torch.cuda.device_count())] or ["cpu"]
        have = None
    from .models import as_device

    devices = [as_device(n) for n in names]
    if have is None:
        sizes = [available_bytes(device) for device in devices]
        have = None if None in sizes else sum(sizes)
    return have, devices


def fix_hints(config, need: Estimate, have: int, offload_ok: bool = True, **settings) -> list[str]:
    """The fewest changes (a smaller calibration micro-batch, bfloat16 weights, both; `curvature.offload=cpu`
    unless not `offload_ok`) that make the same estimate fit, each as command-line overrides; or a larger device."""
    B, dtype = settings.get("calib_batch", 8), settings.get("dtype", "float32")
    batches = sorted({b for b in (B, B // 2, B // 4, 1) if b >= 1}, reverse=True)
    dtypes = [dtype] + (["bfloat16"] if dtype in ("float32", "float64") else [])
    offloads = [settings.get("offload", False)] + ([True] if settings.get("rank", 1) == 1 and offload_ok else [])
    options = [(1, ["curvature.accumulate=float32"], {**settings, "accumulate": "float32"})] \
        if settings.get("accumulate") == "float64" else []
    for d in dtypes:
        for b in batches:
            for o in dict.fromkeys(offloads):
                changes = ([f"calib.batch_size={b}"] if b != B else []) + ([f"model.dtype={d}"] if d != dtype else []) \
                    + (["curvature.offload=cpu"] if o != settings.get("offload", False) else [])
                if changes:
                    options.append((len(changes), changes, {**settings, "calib_batch": b, "dtype": d, "offload": o}))
    for _, changes, fixed in sorted(options, key=lambda x: x[0]):  # stable: fewest changes, larger batches first
        if estimate(config, **fixed).peak <= have:
            return [" ".join(changes)]
    return ["a device with more memory"]
