"""Layer-wise baselines (docs/algorithm.md section 7): SparseGPT and Wanda.

Both give every layer the same sparsity and prune one decoder block at a time, from the
inputs that reach it through the blocks already pruned. W here is the weight matrix
alone: biases are never pruned, and SparseGPT's update leaves them unchanged.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn
from tqdm import tqdm

from .adapters import PrunableLayer, adapter_for

METHODS = ("sparsegpt", "wanda")


# ---------------------------------------------------------------- masks


def _check_structure(sparsity: float, n: int, m: int, Cw: int) -> None:
    if n == 0 and m == 0:
        if not 0.0 <= sparsity <= 1.0:
            raise ValueError(f"sparsity must lie in [0, 1], got {sparsity}")
        return
    if not 0 < n < m:
        raise ValueError(f"N:M keeps n of every m inputs and needs 0 < n < m, got n={n}, m={m} "
                         "(n=m=0 means unstructured)")
    if Cw % m:
        raise ValueError(f"N:M needs the input width to be a multiple of m; got width {Cw}, m={m}")


def _no_mask(W: Tensor, removed_before: Tensor | None) -> Tensor:
    if removed_before is None:
        return torch.zeros_like(W, dtype=torch.bool)
    return removed_before.to(device=W.device, dtype=torch.bool)


def _smallest(scores: Tensor, k: int) -> Tensor:
    """Mask of exactly the k smallest entries of `scores` (ties broken arbitrarily, count exact)."""
    flat = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    flat[scores.flatten().topk(k, largest=False).indices] = True
    return flat.view(scores.shape)


def _nm_mask(scores: Tensor, forced: Tensor, n: int, m: int) -> Tensor:
    """Per row, the m - n smallest scores of every m consecutive inputs, plus the forced entries."""
    R, C = scores.shape
    groups = scores.masked_fill(forced, -torch.inf).view(R, C // m, m)
    drop = groups.topk(m - n, dim=2, largest=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, drop, True)
    return mask.view(R, C) | forced


# ---------------------------------------------------------------- SparseGPT


def _inverse_hessian_cholesky(H: Tensor, percdamp: float) -> Tensor:
    """Upper U with U^T U = (H + percdamp mean(diag H) I)^-1 (Frantar & Alistarh sec. 3.3).

    Row c of U is the OBS update for removing input c while inputs < c stay fixed.
    """
    H = H + percdamp * H.diagonal().mean() * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    L, info = torch.linalg.cholesky_ex(H)
    if info:
        raise ValueError("SparseGPT: the damped Hessian is not positive definite; raise "
                         f"method.percdamp (now {percdamp}) or use more calibration data")
    return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)


Select = Callable[[int, Tensor, Tensor], Tensor]


def _obs_sweep(W: Tensor, H: Tensor, select: Select, group: int, blocksize: int,
               percdamp: float) -> tuple[Tensor, Tensor]:
    """Frantar & Alistarh Alg. 1: sequential OBS over the inputs with lazy column-block updates.

    When the sweep reaches input column j (every `group` columns), `select(j, W_cur, d)`
    returns the removed mask of the next `group` columns from their current weights W_cur
    and the diagonal d of U there (OBS saliency W_cur^2 / d^2).
    """
    if blocksize < 1 or blocksize % group:
        raise ValueError(f"method.blocksize must be a positive multiple of {group}, got {blocksize}")
    W, H = W.clone(), H.clone()
    # An input that is zero on all calibration data: its weights do nothing there (SparseGPT zeroes them).
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    U = _inverse_hessian_cholesky(H, percdamp)
    removed = torch.zeros_like(W, dtype=torch.bool)
    for i1 in range(0, W.shape[1], blocksize):
        i2 = min(i1 + blocksize, W.shape[1])
        W1, U1 = W[:, i1:i2], U[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            if i % group == 0:
                j = i1 + i
                width = min(group, i2 - j)
                removed[:, j:j + width] = select(j, W1[:, i:i + width], U1.diagonal()[i:i + width])
            err = torch.where(removed[:, i1 + i], W1[:, i], 0) / U1[i, i]
            W1[:, i:] -= torch.outer(err, U1[i, i:])
            Err1[:, i] = err
        # Lazy batch update: the block's removals reach the later columns in one product.
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return W.masked_fill_(removed, 0), removed


def sparsegpt_update_fixed_mask(W: Tensor, H: Tensor, removed: Tensor, *, blocksize: int = 128,
                                percdamp: float = 0.01) -> Tensor:
    """Frantar & Alistarh Alg. 1 with the mask given: remove `removed` (R, Cw) from W, H = X X^T."""
    removed = removed.to(device=W.device, dtype=torch.bool)
    W_new, _ = _obs_sweep(W, H, lambda j, W_cur, d: removed[:, j:j + W_cur.shape[1]],
                          blocksize, blocksize, percdamp)
    return W_new


def sparsegpt_layer(W: Tensor, H: Tensor, removed_before: Tensor | None, *, sparsity: float, n: int = 0,
                    m: int = 0, blocksize: int = 128, percdamp: float = 0.01) -> tuple[Tensor, Tensor]:
    """Frantar & Alistarh Alg. 1 (docs/algorithm.md sec. 7): prune W (R, Cw) given H = X X^T (Cw, Cw).

    Unstructured: exactly max(round(sparsity * numel), already removed) entries, chosen per
    column block by OBS saliency; N:M (n kept of every m inputs, `sparsity` ignored): chosen
    per group of m. Entries of `removed_before` stay removed. Returns (new W, removed mask).
    """
    R, Cw = W.shape
    _check_structure(sparsity, n, m, Cw)
    before = _no_mask(W, removed_before)
    if m:
        def select(j: int, W_cur: Tensor, d: Tensor) -> Tensor:
            return _nm_mask((W_cur / d).square(), before[:, j:j + W_cur.shape[1]], n, m)

        return _obs_sweep(W, H, select, m, blocksize, percdamp)

    # The new removals are spread over the columns in proportion to their free entries, so
    # each block takes its share (SparseGPT: the same fraction per block) and the layer
    # total is exact; integer floors keep each block's share within its free entries.
    free_before = [0] + (~before).sum(0).cumsum(0).tolist()  # free entries in the columns < j
    free_total = free_before[-1]
    new_total = max(round(sparsity * R * Cw) - (R * Cw - free_total), 0)

    def new_up_to(j: int) -> int:
        return new_total * free_before[j] // free_total if free_total else 0

    def select(j: int, W_cur: Tensor, d: Tensor) -> Tensor:
        j2 = j + W_cur.shape[1]
        forced = before[:, j:j2]
        k = int(forced.sum()) + new_up_to(j2) - new_up_to(j)
        return _smallest((W_cur / d).square().masked_fill(forced, -torch.inf), k)

    return _obs_sweep(W, H, select, blocksize, blocksize, percdamp)


# ---------------------------------------------------------------- Wanda


def wanda_scores(W: Tensor, x_norm: Tensor) -> Tensor:
    """Sun et al. 2023 (docs/algorithm.md sec. 7): |W_rc| * ||x_c||, the norm over all calibration tokens."""
    return W.abs() * x_norm[None, :]


def wanda_layer(W: Tensor, x_norm: Tensor, removed_before: Tensor | None, *, sparsity: float, n: int = 0,
                m: int = 0) -> tuple[Tensor, Tensor]:
    """Sun et al. 2023 (docs/algorithm.md sec. 7): remove the lowest `wanda_scores` within each output row.

    Unstructured: each row loses max(round(sparsity * Cw), already removed in it) entries;
    N:M (n kept of every m inputs, `sparsity` ignored). No update of the kept weights.
    """
    R, Cw = W.shape
    _check_structure(sparsity, n, m, Cw)
    before = _no_mask(W, removed_before)
    scores = wanda_scores(W, x_norm)
    if m:
        removed = _nm_mask(scores, before, n, m)
    else:
        order = scores.masked_fill(before, -torch.inf).argsort(dim=1, stable=True)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(Cw, device=W.device).expand(R, Cw))
        count = before.sum(1).clamp(min=round(sparsity * Cw))
        removed = rank < count[:, None]
    return W.masked_fill(removed, 0), removed


# ---------------------------------------------------------------- block by block through a model


class _StopForward(Exception):
    """Raised by the hook that catches the inputs of the first block."""


def _block_inputs(model: nn.Module, block: nn.Module, batches: list[Tensor]) -> list[tuple]:
    """(hidden states, other positional args, keyword args) each batch brings to `block`."""
    calls = []

    def catch(module, args, kwargs):
        calls.append((args[0], args[1:], kwargs))
        raise _StopForward

    device = model.get_input_embeddings().weight.device
    handle = block.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for input_ids in batches:
            try:
                model(input_ids.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return calls


def _run_block(block: nn.Module, calls: list[tuple]) -> list[tuple]:
    """The same calls with each batch's hidden states replaced by the block's output."""
    out = []
    for hidden, args, kwargs in calls:
        y = block(hidden, *args, **kwargs)
        out.append((y[0] if isinstance(y, tuple) else y, args, kwargs))
    return out


def _input_statistics(method: str, block: nn.Module, layers: list[PrunableLayer], calls: list[tuple],
                      min_tokens: int = 1) -> dict:
    """Per layer, H = sum of x x^T (sparsegpt) or sum of x^2 per input (wanda) over all tokens; a routed expert
    that fewer than `min_tokens` tokens reached gets H = I (ones): magnitude pruning to the layer's sparsity."""
    stats, handles, tokens = {}, [], {}
    for layer in layers:
        Cw = layer.in_features
        dtype = torch.promote_types(layer.weight.dtype, torch.float32)
        shape = (Cw, Cw) if method == "sparsegpt" else (Cw,)
        stat = stats[layer.name] = torch.zeros(shape, dtype=dtype, device=layer.weight.device)

        def accumulate(module, args, output, stat=stat, Cw=Cw, name=layer.name):
            x = args[0].reshape(-1, Cw).to(stat.dtype)
            tokens[name] = tokens.get(name, 0) + x.shape[0]
            if method == "sparsegpt":
                stat.addmm_(x.T, x)
            else:
                stat.add_(x.square().sum(0))

        handles.append(layer.module.register_forward_hook(accumulate))
    try:
        if layers:
            _run_block(block, calls)
    finally:
        for handle in handles:
            handle.remove()
    for layer in layers:
        if layer.expert is not None and tokens.get(layer.name, 0) < min_tokens:
            stat = stats[layer.name]
            stats[layer.name] = torch.eye(len(stat), dtype=stat.dtype, device=stat.device) if stat.dim() == 2 \
                else torch.ones_like(stat)
    return stats


@torch.no_grad()
def prune_layerwise(model: nn.Module, layers: list[PrunableLayer], batches: list[Tensor], *, method: str,
                    sparsity: float, n: int = 0, m: int = 0, removed: dict[str, Tensor] | None = None,
                    blocksize: int = 128, percdamp: float = 0.01, progress: bool = False,
                    min_tokens: int = 1) -> dict[str, Tensor]:
    """SparseGPT or Wanda through a model, block by block (docs/algorithm.md sec. 7), in place.

    Every layer of a block is pruned from the statistics of the same (dense-block) inputs;
    the block's outputs after pruning become the next block's inputs. `removed` holds
    masks (R, Cw) that stay removed. Returns the removed masks of all `layers`.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got '{method}'")
    removed = removed or {}
    blocks = adapter_for(model.config.model_type).blocks(model)
    last = max(layer.block for layer in layers)
    was_training = model.training
    model.eval()  # dropout off: the calibration statistics must be deterministic
    masks = {}
    try:
        calls = _block_inputs(model, blocks[0], batches)
        for i in tqdm(range(last + 1), desc=method, disable=not progress):
            block_layers = [layer for layer in layers if layer.block == i]
            stats = _input_statistics(method, blocks[i], block_layers, calls, min_tokens)
            for layer in block_layers:
                weight, stat, before = layer.weight, stats[layer.name], removed.get(layer.name)
                if method == "sparsegpt":
                    W, mask = sparsegpt_layer(weight.to(stat.dtype), stat, before, sparsity=sparsity, n=n, m=m,
                                              blocksize=blocksize, percdamp=percdamp)
                else:
                    W, mask = wanda_layer(weight.to(stat.dtype), stat.sqrt(), before, sparsity=sparsity, n=n, m=m)
                weight.copy_(W)
                masks[layer.name] = mask
            if i < last:
                calls = _run_block(blocks[i], calls)
    finally:
        model.train(was_training)
    return masks
