"""Choosing what to remove: one global threshold over all prunable layers (docs/algorithm.md section 4).

Every function takes dicts keyed by layer name and returns boolean "removed" masks that
contain the already-removed masks (masks are nested across shots). Already-removed
structures cost 0 and stay removed; ties are broken by position (layer order in the dict,
then row-major index), so results are deterministic. `uniform=True` applies the same
rule to each layer separately at its own ratio (the `selection=uniform` ablation).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


def removed_count_structured(R, Cw, n_rows, n_cols):
    """Weights removed by n_rows rows and n_cols columns of an R x Cw matrix (section 4); elementwise on tensors."""
    return n_rows * Cw + n_cols * R - n_rows * n_cols


def _check_target(target: float, upper: float = 1.0) -> None:
    if not 0.0 <= target <= upper:
        raise ValueError(f"target must be a fraction in [0, {upper}], got {target!r}")


def _check_masks(values: dict[str, Tensor], removed: dict[str, Tensor], what: str) -> None:
    if set(values) != set(removed):
        raise ValueError(f"{what} and removed masks must have the same layers; differing: "
                         f"{sorted(set(values) ^ set(removed))}")
    for name, value in values.items():
        if removed[name].shape != value.shape or removed[name].dtype != torch.bool:
            raise ValueError(f"layer '{name}': removed mask must be a bool tensor of shape "
                             f"{tuple(value.shape)}, got {removed[name].dtype} {tuple(removed[name].shape)}")


def _common_dtype(tensors) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _order_keys(c: Tensor) -> Tensor:
    """Integers ordered like the float values of `c` (IEEE bits, negatives flipped; -0.0 counted as +0.0), so that
    an exact k-th smallest value can be found by bisection over integers."""
    c = c + 0.0  # -0.0 -> +0.0: the two compare equal, as in a sort
    if c.dtype == torch.float64:
        bits, flip = c.view(torch.int64), 0x7FFFFFFFFFFFFFFF
    elif c.dtype == torch.float32:
        bits, flip = c.view(torch.int32), 0x7FFFFFFF
    else:
        raise ValueError(f"costs must be float32 or float64, got {c.dtype}")
    return torch.where(bits < 0, bits ^ flip, bits)


@dataclass
class Split:
    """The layers' costs held by several processes, each with the costs of some layers: `layers` names all of them
    in the global order, `numel` is their total size, and `reduce(values, op)` combines a list of integers over the
    processes ('sum', 'min' or 'max', elementwise). The selection then exchanges counts only, never costs."""

    layers: list[str]
    numel: int
    reduce: Callable[[list[int], str], list[int]]


def _one_process(values: list[int], op: str) -> list[int]:
    return values


def _remove_cheapest(costs: dict[str, Tensor], removed: dict[str, Tensor], count: int,
                     consume: bool = False, split: Split | None = None) -> dict[str, Tensor]:
    """Removed masks plus the cheapest free entries, so that `count` entries are removed in all.

    The same choice as one stable sort of all free costs concatenated in layer order (ties go to the earlier
    layer, then the earlier row-major index), found without building that tensor: the k-th smallest cost is
    found by bisection over the integers that order the floats (as wide as the costs), counted layer by layer:
    no tensor of all costs is built, and no float64 copy of them. `consume=True` empties `costs` as each layer's
    keys are made, so that the costs and the keys are never held whole at once. With `split`, `costs` are this
    process's layers and every count is combined over the processes: the same choice as one process with all
    costs (ties still go to the earlier layer in `split.layers`)."""
    reduce = split.reduce if split else _one_process
    order = split.layers if split else list(costs)
    dtype = _common_dtype(costs.values())
    if dtype not in (torch.float32, torch.float64):
        dtype = torch.float64
    names = list(costs)
    free_keys = {}
    for name in names:
        c = costs.pop(name) if consume else costs[name]
        free_keys[name] = _order_keys(c.to(dtype))[~removed[name]]
        del c
    costs = free_keys  # only the names and their order are used below
    keys = free_keys.__getitem__
    n_removed, n_free = reduce([sum(int(m.sum()) for m in removed.values()), sum(len(k) for k in free_keys.values())],
                               "sum")
    n_new = max(0, min(count - n_removed, n_free))
    out = {name: removed[name].clone() for name in costs}
    if n_new == 0:
        return out
    if n_new == n_free:
        return {name: torch.ones_like(m) for name, m in removed.items()}
    # smallest key k with #{free keys <= k} >= n_new; every count is an integer, so 64 halvings are exact
    lo = reduce([min((int(k.min()) for k in free_keys.values() if len(k)), default=2**63 - 1)], "min")[0]
    hi = reduce([max((int(k.max()) for k in free_keys.values() if len(k)), default=-2**63)], "max")[0]
    while lo < hi:
        mid = lo + (hi - lo) // 2
        if reduce([sum(int((keys(name) <= mid).sum()) for name in costs)], "sum")[0] >= n_new:
            hi = mid
        else:
            lo = mid + 1
    below = reduce([sum(int((keys(name) < lo).sum()) for name in costs)], "sum")[0]
    # the ties at the threshold go to the earlier layers: each layer takes what the ties before it left
    ties = reduce([int((keys(name) == lo).sum()) if name in free_keys else 0 for name in order], "sum")
    earlier = dict(zip(order, [0, *torch.tensor(ties).cumsum(0).tolist()]))
    for name in costs:
        k = keys(name)
        tie = k == lo
        ties_left = max(n_new - below - earlier[name], 0)
        take = (k < lo) | (tie & (tie.cumsum(0) <= ties_left))
        out[name][~removed[name]] = take.to(out[name].device)
    return out


def select_unstructured(costs: dict[str, Tensor], removed: dict[str, Tensor], target: float,
                        uniform: bool = False, consume: bool = False, split: Split | None = None) -> dict[str, Tensor]:
    """Remove the cheapest elements until round(target * total) are removed (section 4, unstructured);
    `consume=True` empties `costs` on the way (less memory); `split`: this process's layers of several (Split)."""
    _check_target(target)
    _check_masks(costs, removed, "costs")
    if uniform:
        return {name: _remove_cheapest({name: c}, {name: removed[name]}, round(target * c.numel()))[name]
                for name, c in costs.items()}
    total = split.numel if split else sum(c.numel() for c in costs.values())
    return _remove_cheapest(costs, removed, round(target * total), consume=consume, split=split)


def select_nm(costs: dict[str, Tensor], removed: dict[str, Tensor], target: float, n: int, m: int,
              uniform: bool = False, split: Split | None = None) -> dict[str, Tensor]:
    """Select the cheapest target*m/(m-n) of m-blocks and remove m-n entries in each (section 4, N:M);
    `split`: this process's layers of several (Split)."""
    if not 0 <= n < m:
        raise ValueError(f"N:M sparsity needs 0 <= n < m, got n={n}, m={m}")
    _check_target(target, (m - n) / m)
    _check_masks(costs, removed, "costs")
    k = m - n
    block_costs, pruned, order = {}, {}, {}
    for name, c in costs.items():
        R, Cw = c.shape
        if Cw % m:
            raise ValueError(f"layer '{name}' has {Cw} inputs, not a multiple of m={m}; "
                             f"N:M blocks must tile each row")
        rem = removed[name].reshape(R, Cw // m, m)
        if (rem.sum(-1) > k).any():
            raise ValueError(f"layer '{name}' already has blocks with more than m-n={k} removed entries")
        cost = c.reshape(R, Cw // m, m)
        if not cost.is_floating_point():
            cost = cost.double()
        # Removed entries first, so a pruned block keeps them among its m-n.
        order[name] = torch.sort(cost.masked_fill(rem, -math.inf), dim=-1, stable=True).indices[..., :k]
        pruned[name] = rem.any(-1)
        block_costs[name] = cost.gather(-1, order[name]).sum(-1)  # pruned blocks are forced, their cost unused
    if uniform:
        selected = {name: _remove_cheapest({name: b}, {name: pruned[name]}, round(target * costs[name].numel() / k))[name]
                    for name, b in block_costs.items()}
    else:
        total = split.numel if split else sum(c.numel() for c in costs.values())
        selected = _remove_cheapest(block_costs, pruned, round(target * total / k), consume=True, split=split)
    out = {}
    for name, c in costs.items():
        mask = torch.zeros(*selected[name].shape, m, dtype=torch.bool, device=c.device)
        mask.scatter_(-1, order[name], True)
        out[name] = (mask & selected[name][..., None]).reshape(c.shape)
    return out


@dataclass
class Whole:
    """Units removed whole or not at all (moe.whole_experts: a block's routed experts): per unit its cost, its
    weights, whether it is already removed (forced, cost -inf) and whether it may be removed at all. `parts`: how
    many candidates of the rows' and columns' granularity a unit stands for (an expert: its hidden units); it
    enters the merged order at its cost per part, so the threshold removes it when its hidden units, removed
    together, cost on average what the threshold's last row or column costs (None: at its whole cost)."""

    costs: Tensor      # (k,)
    sizes: Tensor      # (k,) int
    removed: Tensor    # (k,) bool
    candidate: Tensor  # (k,) bool; removed units stay removed whatever this says
    parts: Tensor | None = None  # (k,) > 0


def _structured_prefix(row_costs, col_costs, removed_rows, removed_cols, budget: int,
                       whole: dict[str, Whole] | None = None):
    """Largest prefix of the merged per-layer sorted row/column lists (and `whole` units, each adding its size,
    passed over where it does not fit) removing <= budget weights; returns rows, cols (and with `whole` the
    chosen units per group)."""
    whole = whole or {}
    device = next(iter([*row_costs.values(), *(w.costs for w in whole.values())])).device
    dtype = _common_dtype([*row_costs.values(), *col_costs.values(), *(w.costs for w in whole.values())])
    keys, deltas, ids, sizes = [], [], [], []
    offset, n_forced = 0, 0
    for name in row_costs:
        R, Cw = len(row_costs[name]), len(col_costs[name])
        # Already-removed structures sort first, so every prefix that keeps them also keeps the order.
        key = torch.cat([row_costs[name].to(device, dtype).masked_fill(removed_rows[name].to(device), -math.inf),
                         col_costs[name].to(device, dtype).masked_fill(removed_cols[name].to(device), -math.inf)])
        key, order = torch.sort(key, stable=True)
        is_row = order < R
        n_rows, n_cols = is_row.cumsum(0), (~is_row).cumsum(0)
        removed = removed_count_structured(R, Cw, n_rows, n_cols)
        keys.append(key)
        deltas.append(torch.diff(removed, prepend=removed.new_zeros(1)))
        ids.append(order + offset)
        sizes.append(R + Cw)
        offset += R + Cw
        n_forced += int(removed_rows[name].sum()) + int(removed_cols[name].sum())
    for name, w in whole.items():  # one list per group: its units by cost, each adding its own size
        removed = w.removed.to(device)
        live = (w.candidate.to(device) | removed).nonzero().squeeze(1)
        key = w.costs.to(device, dtype) if w.parts is None else w.costs.to(device, dtype) / w.parts.to(device, dtype)
        key = key.masked_fill(removed, -math.inf)[live]
        key, order = torch.sort(key, stable=True)
        keys.append(key)
        deltas.append(w.sizes.to(device)[live][order].to(torch.int64))
        ids.append(live[order] + offset)
        sizes.append(len(w.costs))
        offset += len(w.costs)
        n_forced += int(removed.sum())
    order = torch.sort(torch.cat(keys), stable=True).indices
    added = torch.cat(deltas)[order]
    cumulative = added.cumsum(0)
    # Each item adds >= 0 weights, so the cumulative count is sorted and the prefix is a search.
    length = max(n_forced, int(torch.searchsorted(cumulative, torch.tensor([budget], device=device), right=True)))
    take = torch.zeros(len(order), dtype=torch.bool, device=device)
    take[:length] = True
    if whole:
        # A unit that does not fit the budget left is passed over and the order goes on (a unit is far larger
        # than a row, so stopping there would leave up to a unit's weights of the target unremoved); the first
        # row or column that does not fit ends it, as without units (rows and columns are never passed over:
        # each one's count assumes the cheaper ones of its layer were taken).
        is_unit = torch.cat([torch.full((len(k),), i >= len(row_costs), dtype=torch.bool, device=device)
                             for i, k in enumerate(keys)])[order]
        total = int(cumulative[length - 1]) if length else 0
        p = length
        while p < len(order) and is_unit[p]:
            cum = total + added[p + 1:].cumsum(0)
            n = int(torch.searchsorted(cum, torch.tensor([budget], device=device), right=True))
            take[p + 1:p + 1 + n] = True
            total = int(cum[n - 1]) if n else total
            p += 1 + n
    chosen = torch.zeros(offset, dtype=torch.bool, device=device)
    chosen[torch.cat(ids)[order[take]]] = True
    rows, cols, units = {}, {}, {}
    parts = chosen.split(sizes)
    for name, part in zip(row_costs, parts):
        R = len(row_costs[name])
        rows[name] = part[:R].to(removed_rows[name].device)
        cols[name] = part[R:].to(removed_cols[name].device)
    for name, part in zip(whole, parts[len(row_costs):]):
        units[name] = part.to(whole[name].removed.device)
    return (rows, cols, units) if whole else (rows, cols)


def select_structured(row_costs: dict[str, Tensor], col_costs: dict[str, Tensor],
                      removed_rows: dict[str, Tensor], removed_cols: dict[str, Tensor], target: float,
                      uniform: bool = False, whole: dict[str, Whole] | None = None):
    """Rows and columns in the largest prefix of the merged cost order within target * total (section 4).
    `whole`: groups of units removed whole (moe.whole_experts), their weights counted in the total, in the same
    order; then returns (rows, cols, chosen units per group)."""
    _check_target(target)
    _check_masks(row_costs, removed_rows, "row costs")
    _check_masks(col_costs, removed_cols, "column costs")
    if set(row_costs) != set(col_costs):
        raise ValueError(f"row and column costs must have the same layers; differing: "
                         f"{sorted(set(row_costs) ^ set(col_costs))}")

    def budget(numel: int) -> int:
        # Counts are integers; the epsilon keeps e.g. 0.29 * 100 = 28.999... from losing a weight.
        return math.floor(target * numel + 1e-9)

    if uniform and whole:
        raise ValueError("selection=uniform keeps each layer's own ratio: whole units have none")
    if uniform:
        rows, cols = {}, {}
        for name in row_costs:
            numel = len(row_costs[name]) * len(col_costs[name])
            r, c = _structured_prefix({name: row_costs[name]}, {name: col_costs[name]},
                                      {name: removed_rows[name]}, {name: removed_cols[name]}, budget(numel))
            rows.update(r)
            cols.update(c)
        return rows, cols
    total = sum(len(row_costs[name]) * len(col_costs[name]) for name in row_costs)
    total += sum(int(w.sizes.sum()) for w in (whole or {}).values())
    return _structured_prefix(row_costs, col_costs, removed_rows, removed_cols, budget(total), whole)
