"""Weight-only integer quantization with the OBS error-compensating update (docs/algorithm.md section 10).

A layer's weights are quantized one input column at a time (GPTQ's order, Frantar et al. 2023); after each column
the not yet quantized columns (and the bias, which is never quantized) take the OBS update that compensates the
column's rounding error under the run's curvature F = G (x) A. Fixing a whole column at once makes the update
independent of G (the constraint covers every row alike, so G cancels, section 10), which is why A alone drives it;
G weighs the cost (the predicted loss increase) by which layers are compared. Entries that are exactly zero when
quantization starts (every pruned entry) are quantized to zero, which is on every grid, so sparsity is kept.
Round-to-nearest (`method="rtn"`) is the baseline on the same grid.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .obs import damp

METHODS = ("gptq", "rtn")
ORDERS = ("natural", "act")
OBSERVERS = ("minmax", "mse", "cost")
# the range search of observer=mse/cost: llmcompressor's memoryless MSE observer's defaults (its range shrunk by
# 1 - i / SHRINK_GRID for i < SHRINK_MAX * SHRINK_GRID, the error |w - q|^MSE_NORM, stopped after SHRINK_PATIENCE
# shrinks that improve no row)
SHRINK_GRID, SHRINK_MAX, SHRINK_PATIENCE, MSE_NORM = 100, 0.2, 5, 2.4


@dataclass(frozen=True)
class Grid:
    """Signed `bits`-bit integers q in [-2^(bits-1), 2^(bits-1) - 1], one scale s (and, asymmetric, an integer zero
    point z) per output row and group of `group_size` input columns (0: the whole row); a weight is (q - z) s, so 0
    is always on the grid. The integer range and the rounding q = clamp(round(w / s + z)) are compressed-tensors'."""

    bits: int
    symmetric: bool = True
    group_size: int = 128
    observer: str = "minmax"  # how `fit` sets a group's range: minmax | mse | cost (`fit`)

    def __post_init__(self):
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"quantize.bits={self.bits!r} must be an integer from 2 to 8")
        if not isinstance(self.group_size, int) or self.group_size < 0:
            raise ValueError(f"quantize.group_size={self.group_size!r} must be a non-negative integer (0: per row)")
        if self.observer not in OBSERVERS:
            raise ValueError(f"quantize.observer={self.observer!r} must be one of {OBSERVERS}")

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    def width(self, columns: int) -> int:
        """Columns per group of a layer with `columns` inputs: the largest divisor of `columns` that is at most
        `group_size` (576 inputs at group_size 128: groups of 96), so every group is whole, as compressed-tensors'
        group format needs; all of them with group_size 0."""
        if not 0 < self.group_size < columns:
            return columns
        return next(w for w in range(self.group_size, 0, -1) if columns % w == 0)

    def fit(self, W: Tensor, weight: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Scale and zero point (R,) of the rows of W (R, c). observer=minmax: from their range, 0 included, as
        compressed-tensors' min-max observer and GPTQ fit them: symmetric, max |w| / ((qmax - qmin) / 2) (int4:
        max |w| / 7.5, so the largest positive weight may be clipped to 7 steps, a finer grid than max / 7);
        asymmetric, (max - min) / (qmax - qmin) with the zero point rounded to an integer. An all-zero row gets
        scale 1. observer=mse: per row the range shrunk by the factor (1, 0.99, ..., 0.81) whose rounding error
        sum |w - q|^2.4 is least (llmcompressor's MSE observer; clipping a few large weights buys a finer grid for
        the rest); observer=cost: the same search by sum_c weight_c (w_c - q_c)^2, `weight` (c,) the columns'
        diag A, the diagonal KFAC cost of the rounding (uniform without `weight`)."""
        lo = W.min(dim=1).values.clamp(max=0)
        hi = W.max(dim=1).values.clamp(min=0)
        if self.observer == "minmax":
            return self._range(lo, hi)
        if self.observer == "cost":
            w = torch.ones(W.shape[1], dtype=W.dtype, device=W.device) if weight is None else weight.to(W)
            error = lambda D: (D**2 * w).sum(1)  # noqa: E731
        else:
            error = lambda D: D.abs().pow(MSE_NORM).sum(1)  # noqa: E731
        scale, zero = self._range(lo, hi)
        best = error(self.round(W, scale, zero) - W)
        stale = 0
        for i in range(1, int(SHRINK_MAX * SHRINK_GRID)):
            p = 1 - i / SHRINK_GRID
            s, z = self._range(p * lo, p * hi)
            err = error(self.round(W, s, z) - W)
            better = err < best
            if better.any():
                stale = 0
                best = torch.where(better, err, best)
                scale, zero = torch.where(better, s, scale), torch.where(better, z, zero)
            else:
                stale += 1
                if stale >= SHRINK_PATIENCE:
                    break
        return scale, zero

    def _range(self, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        """Scale and zero point (R,) of the ranges [lo, hi] (lo <= 0 <= hi), min-max style."""
        if self.symmetric:
            scale = torch.maximum(hi, -lo) / ((self.qmax - self.qmin) / 2)
        else:
            scale = (hi - lo) / (self.qmax - self.qmin)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        if self.symmetric:
            zero = torch.zeros_like(scale)
        else:
            zero = (self.qmin - lo / scale).round().clamp(self.qmin, self.qmax)
        return scale, zero

    def integers(self, w: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
        """q = clamp(round(w / s + z), qmin, qmax) for w (R,) or (R, c) and per-row s, z (R,)."""
        if w.dim() == 2:
            scale, zero = scale[:, None], zero[:, None]
        return (w / scale + zero).round().clamp(self.qmin, self.qmax)

    def round(self, w: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
        """The grid point (q - z) s that w rounds to."""
        q = self.integers(w, scale, zero)
        if w.dim() == 2:
            scale, zero = scale[:, None], zero[:, None]
        return (q - zero) * scale


@dataclass
class Quantized:
    """One layer's result: the weight on the grid, its bias (updated, never quantized), the grid's scales and zero
    points (R, groups), and the cost 1/2 sum_j e_j^T G e_j of its columns' steps (units of the pruning costs)."""

    W: Tensor
    bias: Tensor | None
    scale: Tensor
    zero: Tensor
    cost: float
    bits: int
    column_weight: Tensor | None = None  # (Cw,) the damped diag A that observer=cost weighed the columns by


def quantize_layer(W: Tensor, grid: Grid, *, A: Tensor | None = None, G: Tensor | None = None,
                   bias: Tensor | None = None, method: str = "gptq", damping: float = 0.01,
                   blocksize: int = 128, order: str = "natural", column_weight: Tensor | None = None) -> Quantized:
    """Quantize W (R, Cw) to `grid`, keeping its exact zeros zero.

    gptq: A (C, C) is the input factor, C = Cw + 1 with a bias (its trailing constant-1 input, as
    curvature.with_bias_input builds it), else Cw; H = A + damping mean(diag A) I and U upper with U^T U = H^-1 (of
    H in the sweep's column order). In that order, column by column: target t_j = 0 where W was zero, else the grid
    point of the current column; e_j = (w_j - t_j) / U_jj; the later columns and the bias take -e_j U_j,>j
    (sequential OBS with the columns done so far fixed). order="natural": columns 0..Cw-1, each group's grid fitted
    on its current columns when the sweep enters it; "act": columns by decreasing diag(A) (GPTQ's activation
    order), every group's grid fitted first on the original weights ("static groups", so a group's columns may be
    anywhere in the order). G (R, R) or its diagonal only weighs the cost (None: I, GPTQ's squared error). rtn:
    each entry to its nearest grid point (grid fitted on the original weights), no update; the cost is still
    reported when A is given. `column_weight` (Cw,): the columns' weights of observer=cost where A is not given
    (the round-to-nearest twin of an update, `Quantized.column_weight`); with A, diag H.
    """
    if method not in METHODS:
        raise ValueError(f"quantize.method={method!r} must be one of {METHODS}")
    if order not in ORDERS:
        raise ValueError(f"quantize.order={order!r} must be one of {ORDERS}")
    R, Cw = W.shape
    work = torch.float64 if W.dtype == torch.float64 else torch.float32
    zero_before = W == 0
    Wb = W.to(work) if bias is None else torch.cat([W.to(work), bias.to(work)[:, None]], dim=1)
    width = grid.width(Cw)
    groups = -(-Cw // width)
    scales = torch.empty(R, groups, dtype=work, device=W.device)
    zeros = torch.empty_like(scales)
    H = None
    if A is not None:
        if A.shape != (Wb.shape[1], Wb.shape[1]):
            raise ValueError(f"A has shape {tuple(A.shape)}; the layer needs ({Wb.shape[1]}, {Wb.shape[1]})")
        H = damp(A.to(device=W.device, dtype=torch.float64), damping)
    Gw = None if G is None else G.to(device=W.device, dtype=work)
    if H is not None:
        column_weight = H.diagonal()[:Cw]
    weight = None if column_weight is None else column_weight.to(device=W.device, dtype=work)

    def fit(g: int, cols: Tensor) -> None:  # group g's grid from `cols` (its columns), pruned entries as 0
        diag = None if weight is None else weight[g * width:(g + 1) * width]  # observer=cost's column weights
        s, z = grid.fit(torch.where(zero_before[:, g * width:(g + 1) * width], 0, cols), diag)
        scales[:, g], zeros[:, g] = s, z

    def target(j: int, w: Tensor) -> Tensor:  # j: the column's index in W
        g = j // width
        return torch.where(zero_before[:, j], 0, grid.round(w, scales[:, g], zeros[:, g]))

    if method == "rtn" or H is None:
        if method == "gptq":
            raise ValueError("quantize.method=gptq needs the input factor A")
        Q = Wb.clone()
        for g in range(groups):
            fit(g, Q[:, g * width:min((g + 1) * width, Cw)])
            for j in range(g * width, min((g + 1) * width, Cw)):
                Q[:, j] = target(j, Q[:, j])
        cost = _cost(Wb - Q, H, Gw) if H is not None else float("nan")
        return Quantized(Q[:, :Cw].to(W.dtype), bias, scales, zeros, cost, grid.bits, weight)

    C = Wb.shape[1]
    if order == "act":
        perm = torch.argsort(-H.diagonal()[:Cw], stable=True).to(W.device)
        for g in range(groups):  # static groups: every grid from the original weights
            fit(g, Wb[:, g * width:min((g + 1) * width, Cw)])
    else:
        perm = torch.arange(Cw, device=W.device)
    full = torch.cat([perm, torch.arange(Cw, C, device=W.device)])  # the bias stays last, never fixed
    H = H[full][:, full]
    L, info = torch.linalg.cholesky_ex(H)
    if info:
        raise ValueError(f"quantize: the damped input factor is not positive definite; raise quantize.damping "
                         f"(now {damping})")
    U = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True).to(work)
    index = perm.tolist()
    Q = Wb[:, full].clone()  # in the sweep's order
    cost = 0.0
    if order == "natural" and width < Cw:  # a group never spans two blocks: fitted on columns with all updates
        blocksize = max(width, blocksize - blocksize % width)
    for i1 in range(0, Cw, blocksize):
        i2 = min(i1 + blocksize, Cw)
        W1, U1 = Q[:, i1:i2], U[i1:i2, i1:i2]
        E1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            k = i1 + i
            j = index[k]
            if order == "natural" and j % width == 0:  # the group's grid from its current columns
                fit(j // width, Q[:, :Cw] if width == Cw else W1[:, i:i + width])
            t = target(j, W1[:, i])
            e = (W1[:, i] - t) / U1[i, i]
            W1[:, i:] -= torch.outer(e, U1[i, i:])
            W1[:, i] = t  # exactly on the grid (the subtraction leaves rounding error)
            E1[:, i] = e
            cost += 0.5 * float(e @ (e if Gw is None else Gw @ e if Gw.dim() == 2 else Gw * e))
        Q[:, i2:] -= E1 @ U[i1:i2, i2:]  # lazy batch update of the later columns and the bias
    out = torch.empty_like(Q)
    out[:, full] = Q
    new_bias = None if bias is None else out[:, Cw].to(bias.dtype)
    return Quantized(out[:, :Cw].to(W.dtype), new_bias, scales, zeros, cost, grid.bits, weight)


def _cost(D: Tensor, H: Tensor, G: Tensor | None) -> float:
    """1/2 vec(D)^T (G (x) H) vec(D) of a change D (R, C) (rtn's cost on the same scale as gptq's)."""
    Dd = D.double()
    M = Dd @ H.double() @ Dd.T  # (R, R)
    if G is None:
        return 0.5 * float(M.trace())
    G = G.double()
    return 0.5 * float((G * M).sum() if G.dim() == 2 else (G * M.diagonal()).sum())


def quantize_model(model, layers, batches, q, opts, *, seed: int = 0, progress: bool = False
                   ) -> tuple[dict, dict[str, Quantized]]:
    """Quantize every prunable layer of `model` in place (section 10): `q` the quantize.* settings, `opts` the run's
    prune.ShotOptions (fisher, precision, offload, accumulate, min_tokens of the curvature pass). gptq: one KFAC
    pass over `batches` on the model as it is now (pruned, compacted) gives each layer's A (its update) and G (its
    cost); a layer with no usable A (a routed expert fewer than moe.min_tokens calibration tokens reached, or an A
    not positive definite after damping) is rounded to nearest, named in the report. With `q.budget` (average bits
    per weight) each layer's width comes from `q.widths` by `allocate_bits` over the layers' costs at every width
    (each layer swept once per width, then once more at its own). Returns the report (per-layer method, bits, group
    width and cost; seconds) and each layer's result (for `export`)."""
    import time

    from . import distributed
    from .curvature import estimate_curvature

    seconds = {}
    t0 = time.perf_counter()
    factors = {}
    if q.method == "gptq" or q.get("observer") == "cost":  # rtn with observer=cost: diag A weighs the range
        factors = estimate_curvature(model, layers, distributed.share(batches), fisher=opts.fisher, rank=1,
                                     kind="kfac", seed=seed, progress=progress, precision=opts.precision,
                                     offload=opts.offload, accumulate=opts.accumulate,
                                     sum_=distributed.sum_ if distributed.active() else None)
    seconds["curvature"] = time.perf_counter() - t0

    def solve(layer, bits: int) -> tuple[Quantized, str, str | None]:
        grid = Grid(bits, q.symmetric, q.group_size, q.get("observer", "minmax"))
        W, bias = layer.weight.detach(), None if layer.bias is None else layer.bias.detach()
        f = factors.get(layer.name)
        if f is not None and f.tokens is not None and f.tokens < opts.min_tokens:
            note = f"{f.tokens} routed calibration tokens (< moe.min_tokens)"
            return quantize_layer(W, grid, bias=bias, method="rtn"), "rtn", note
        A = G = None
        if f is not None:
            f = f.to(W.device)
            A, G = f.A, f.G
        try:
            return quantize_layer(W, grid, A=A, G=G, bias=bias, method=q.method, damping=q.damping,
                                  blocksize=q.blocksize, order=q.order), q.method, None
        except ValueError as err:
            if q.method != "gptq":
                raise
            return quantize_layer(W, grid, bias=bias, method="rtn"), "rtn", str(err)

    budget = q.get("budget")
    bits_of = {layer.name: q.bits for layer in layers}
    t0 = time.perf_counter()
    if budget is not None:
        widths = sorted(set(q.widths))
        costs = {layer.name: {b: solve(layer, b)[0].cost for b in widths} for layer in layers}
        sizes = {layer.name: layer.weight.numel() for layer in layers}
        bits_of = allocate_bits(costs, sizes, budget)
        seconds["allocate"] = time.perf_counter() - t0
        t0 = time.perf_counter()
    results, entries = {}, []

    def apply(layer) -> None:
        res, method, note = solve(layer, bits_of[layer.name])
        with torch.no_grad():
            layer.weight.copy_(res.W)
            if layer.bias is not None:
                layer.bias.copy_(res.bias)
        results[layer.name] = res
        entries.append({"name": layer.name, "method": method, "bits": res.bits,
                        "group": Grid(res.bits, q.symmetric, q.group_size).width(layer.in_features),
                        "cost": res.cost, **({"fallback": note} if note else {})})

    if q.method == "gptq" and q.get("sequential", False):
        # each block's A from its inputs through the blocks already quantized (G stays the KFAC pass's)
        for block_layers in _sequential_inputs(model, layers, distributed.share(batches), factors,
                                               sum_=distributed.sum_ if distributed.active() else None,
                                               progress=progress):
            for layer in block_layers:
                apply(layer)
    else:
        for layer in layers:
            apply(layer)
    seconds["quantize"] = time.perf_counter() - t0
    costs = [e["cost"] for e in entries if e["cost"] == e["cost"]]
    sizes = [layer.weight.numel() for layer in layers]
    mean_bits = sum(e["bits"] * n for e, n in zip(entries, sizes)) / sum(sizes)
    report = {"bits": q.bits, "group_size": q.group_size, "symmetric": bool(q.symmetric), "method": q.method,
              "damping": q.damping, "order": q.order, "observer": q.get("observer", "minmax"), "budget": budget,
              "mean_bits": mean_bits, "cost": sum(costs) if costs else None,
              "seconds": seconds, "fallbacks": sum("fallback" in e for e in entries), "layers": entries}
    return report, results


@torch.no_grad()
def _sequential_inputs(model, layers, batches, factors: dict, *, sum_=None, progress: bool = False):
    """Block by block: replace each of the block's layers' A in `factors` by the mean x x^T (with the bias input)
    of its inputs now, the blocks before it already quantized, then yield the block's layers for quantizing; the
    block's outputs after that are the next block's inputs (SparseGPT's pipeline, surgeon.baselines). Token
    counts of routed experts are updated too."""
    from tqdm.auto import tqdm

    from .adapters import adapter_for
    from .baselines import _block_inputs, _run_block
    from .curvature import Factors

    blocks = adapter_for(model.config.model_type).blocks(model)
    was_training = model.training
    model.eval()
    try:
        calls = _block_inputs(model, blocks[0], batches)
        for i in tqdm(range(len(blocks)), desc="quantize (sequential)", disable=not progress):
            block_layers = [layer for layer in layers if layer.block == i]
            sums, counts, handles = {}, {}, []
            for layer in block_layers:
                C = layer.in_features + (layer.bias is not None)
                sums[layer.name] = torch.zeros(C, C, dtype=torch.float64, device=layer.weight.device)
                counts[layer.name] = torch.zeros((), dtype=torch.float64, device=layer.weight.device)

                def hook(module, args, output, layer=layer):
                    x = args[0].reshape(-1, layer.in_features).double()
                    if layer.bias is not None:
                        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
                    sums[layer.name].addmm_(x.T, x)
                    counts[layer.name] += x.shape[0]

                handles.append(layer.module.register_forward_hook(hook))
            try:
                if block_layers:
                    _run_block(blocks[i], calls)
            finally:
                for handle in handles:
                    handle.remove()
            for layer in block_layers:
                if sum_ is not None:
                    sum_(sums[layer.name])
                    sum_(counts[layer.name])
                n = float(counts[layer.name])
                old = factors.get(layer.name)
                A = (sums[layer.name] / max(n, 1.0)).to(layer.weight.dtype if layer.weight.dtype == torch.float64
                                                         else torch.float32)
                factors[layer.name] = Factors(A=A, G=old.G if old is not None else None,
                                              tokens=int(n) if layer.expert is not None else None)
            yield block_layers
            if i < len(blocks) - 1:
                calls = _run_block(blocks[i], calls)
    finally:
        model.train(was_training)


def allocate_bits(costs: dict[str, dict[int, float]], sizes: dict[str, int], budget: float) -> dict[str, int]:
    """Per-layer widths that minimise the summed cost under the budget sum(bits * size) <= budget * sum(size):
    every layer starts at its narrowest width; then the upgrade with the largest cost decrease per added bit is
    taken while it fits, along each layer's lower convex hull of (bits, cost) (a point above the hull is never the
    better buy). For convex costs this is the optimum of the budget it spends (the greedy solution of the
    multiple-choice knapsack); a layer whose cost is unknown (NaN: no curvature) gets its widest width first."""
    total = budget * sum(sizes.values())
    chosen, hulls = {}, {}
    for name, by_bits in costs.items():
        points = sorted(by_bits.items())
        if any(c != c for _, c in points):
            chosen[name] = points[-1][0]
            continue
        hull = []
        for b, c in points:  # lower convex hull, cost decreasing in bits
            if hull and c >= hull[-1][1]:
                continue
            while len(hull) >= 2 and ((hull[-1][1] - hull[-2][1]) * (b - hull[-2][0])
                                      >= (c - hull[-2][1]) * (hull[-1][0] - hull[-2][0])):
                hull.pop()
            hull.append((b, c))
        hulls[name] = hull
        chosen[name] = hull[0][0]
    used = sum(chosen[n] * sizes[n] for n in costs)
    if used > total + 1e-9 * total:
        raise ValueError(f"quantize.budget={budget}: the narrowest widths already use {used / sum(sizes.values()):.3f} "
                         "bits per weight")
    step = {name: 0 for name in hulls}

    def rate(name):
        (b0, c0), (b1, c1) = hulls[name][step[name]], hulls[name][step[name] + 1]
        return (c0 - c1) / ((b1 - b0) * sizes[name])

    open_ = {name for name in hulls if len(hulls[name]) > 1}
    while open_:
        name = max(sorted(open_), key=rate)
        b0, b1 = hulls[name][step[name]][0], hulls[name][step[name] + 1][0]
        extra = (b1 - b0) * sizes[name]
        if used + extra > total + 1e-9 * total:
            open_.discard(name)  # this upgrade does not fit; smaller ones of other layers may
            continue
        used += extra
        step[name] += 1
        chosen[name] = b1
        if step[name] + 1 >= len(hulls[name]):
            open_.discard(name)
    return chosen


def config_groups(layers, bits_of: dict[str, int], q, observer: str | None = None) -> dict:
    """compressed-tensors config groups for `layers`: one per (bits, group width), each layer's width from
    Grid.width, per-row scales (`channel`) with group_size 0; used by `export` and experiments.library_gptq, so the
    library quantizes to the same grid layout; `observer`: the library's observer name (its default without)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    by_grid: dict[tuple[int, int], list[str]] = {}
    for layer in layers:
        bits = bits_of[layer.name]
        width = Grid(bits, q.symmetric, q.group_size).width(layer.in_features)
        by_grid.setdefault((bits, width), []).append(layer.name)
    per_row = q.group_size == 0
    return {f"group_{i}": QuantizationScheme(targets=names, weights=QuantizationArgs(
        num_bits=bits, type="int", symmetric=bool(q.symmetric), strategy="channel" if per_row else "group",
        group_size=None if per_row else width, **({"observer": observer} if observer else {})))
        for i, ((bits, width), names) in enumerate(sorted(by_grid.items()))}


def export(model, layers, results: dict[str, Quantized], q, out_dir) -> dict:
    """Save `model` (its layers already on the grid) packed with compressed-tensors: one config group per group
    width, each layer's own scales and zero points, so packing is exact and transformers (with compressed-tensors
    installed) loads the folder with the same weights. Symmetric grids are saved `pack-quantized` (8 int4 values
    per int32); asymmetric ones `int-quantized` (one int8 per weight), because the packed zero points of
    pack-quantized do not reload in transformers 5 (their shape is checked against the unpacked one). The model is
    compressed in place (compressed-tensors decompresses it on its next forward). Returns the format and the folder
    size in bytes."""
    from pathlib import Path

    try:
        from compressed_tensors.compressors import ModelCompressor
        from compressed_tensors.quantization import (QuantizationConfig, QuantizationStatus,
                                                     apply_quantization_config)
    except ImportError as err:
        raise RuntimeError("quantize.export needs the compressed-tensors package: pip install -e '.[quantize]' "
                           "(or set quantize.export=false)") from err
    mods = dict(model.named_modules())
    foreign = [layer.name for layer in layers if not isinstance(mods.get(layer.name), torch.nn.Linear)]
    if foreign:
        raise ValueError(f"quantize.export: compressed-tensors packs nn.Linear layers only; {foreign[0]} (and "
                         f"{len(foreign) - 1} more) is not one; set quantize.export=false to save float weights")
    schemes = config_groups(layers, {name: res.bits for name, res in results.items()}, q)
    config = QuantizationConfig(config_groups=schemes, quantization_status=QuantizationStatus.FROZEN)
    apply_quantization_config(model, config, show_progress=False)
    with torch.no_grad():
        for layer in layers:
            mod, res = mods[layer.name], results[layer.name]
            mod.weight_scale.copy_(res.scale.reshape(mod.weight_scale.shape).to(mod.weight_scale.dtype))
            if hasattr(mod, "weight_zero_point"):
                mod.weight_zero_point.copy_(res.zero.reshape(mod.weight_zero_point.shape).to(
                    mod.weight_zero_point.dtype))
    fmt = "pack-quantized" if q.symmetric else "int-quantized"
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=fmt)
    from compressed_tensors.offload.utils import as_single_threaded

    with as_single_threaded():  # under torchrun only rank 0 saves: compressed-tensors must not split the work
        compressor.compress_model(model)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    compressor.update_config(str(out_dir))
    size = sum(p.stat().st_size for p in out_dir.rglob("*") if p.is_file())
    return {"format": fmt, "bytes": size}
