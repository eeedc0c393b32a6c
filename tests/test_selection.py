import itertools
import math

import pytest
import torch

from surgeon.selection import removed_count_structured, select_nm, select_structured, select_unstructured

SHAPES = {"a": (3, 8), "b": (5, 4), "c": (2, 12)}


def random_costs(seed, shapes=SHAPES, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return {name: torch.rand(shape, generator=g, dtype=dtype) for name, shape in shapes.items()}


def no_masks(values):
    return {name: torch.zeros(v.shape, dtype=torch.bool) for name, v in values.items()}


def random_masks(values, p, seed):
    g = torch.Generator().manual_seed(seed)
    return {name: torch.rand(v.shape, generator=g) < p for name, v in values.items()}


def count(masks):
    return sum(int(m.sum()) for m in masks.values())


# ---------------------------------------------------------------- unstructured


def unstructured_reference(costs, removed, k):
    """Forced entries, then free entries in (cost, layer order, row-major index) order, one at a time."""
    names = list(costs)
    free = [(costs[n].flatten()[i].item(), li, i) for li, n in enumerate(names)
            for i in range(costs[n].numel()) if not removed[n].flatten()[i]]
    out = {n: removed[n].clone().flatten() for n in names}
    for _, li, i in sorted(free)[:max(0, k - count(removed))]:
        out[names[li]][i] = True
    return {n: out[n].reshape(costs[n].shape) for n in names}


@pytest.mark.parametrize("target", [0.0, 0.13, 0.5, 0.77, 1.0])
def test_unstructured_matches_reference_and_global_order(target):
    costs = random_costs(0)
    removed = random_masks(costs, 0.1, 1)
    total = sum(c.numel() for c in costs.values())
    k = max(round(target * total), count(removed))
    out = select_unstructured(costs, removed, target)
    assert count(out) == k
    for n in costs:
        assert torch.equal(out[n], unstructured_reference(costs, removed, k)[n])
        assert (out[n] | ~removed[n]).all()
    newly = torch.cat([costs[n][out[n] & ~removed[n]] for n in costs])
    kept = torch.cat([costs[n][~out[n]] for n in costs])
    if len(newly) and len(kept):
        assert newly.max() <= kept.min()


def test_unstructured_nested_across_shots_with_new_costs():
    costs = random_costs(2)
    first = select_unstructured(costs, no_masks(costs), 0.3)
    second = select_unstructured(random_costs(3), first, 0.6)
    total = sum(c.numel() for c in costs.values())
    assert count(first) == round(0.3 * total)
    assert count(second) == round(0.6 * total)
    for n in first:
        assert (second[n] | ~first[n]).all()


def test_unstructured_removed_entries_cost_zero_even_when_others_are_cheaper():
    # A removed entry with a huge recorded cost must still count as removed, not push others out.
    costs = {"a": torch.tensor([[5.0, 1.0, 2.0, 3.0]], dtype=torch.float64)}
    removed = {"a": torch.tensor([[True, False, False, False]])}
    out = select_unstructured(costs, removed, 0.5)
    assert out["a"].tolist() == [[True, True, False, False]]


def test_unstructured_ties_exact_count_and_deterministic():
    costs = {n: torch.ones(s, dtype=torch.float64) for n, s in SHAPES.items()}
    total = sum(c.numel() for c in costs.values())
    out = select_unstructured(costs, no_masks(costs), 0.37)
    assert count(out) == round(0.37 * total)
    again = select_unstructured(costs, no_masks(costs), 0.37)
    assert all(torch.equal(out[n], again[n]) for n in costs)


def test_unstructured_uniform_per_layer():
    costs = random_costs(4)
    removed = random_masks(costs, 0.05, 5)
    out = select_unstructured(costs, removed, 0.4, uniform=True)
    for n, c in costs.items():
        k = max(round(0.4 * c.numel()), int(removed[n].sum()))
        assert int(out[n].sum()) == k
        assert torch.equal(out[n], unstructured_reference({n: c}, {n: removed[n]}, k)[n])


def test_unstructured_float32_costs():
    costs = random_costs(6, dtype=torch.float32)
    out = select_unstructured(costs, no_masks(costs), 0.5)
    assert count(out) == round(0.5 * sum(c.numel() for c in costs.values()))


def test_unstructured_errors():
    costs = random_costs(0)
    with pytest.raises(ValueError, match="target"):
        select_unstructured(costs, no_masks(costs), 1.2)
    bad = no_masks(costs)
    bad["a"] = torch.zeros(2, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="'a'"):
        select_unstructured(costs, bad, 0.5)


# ---------------------------------------------------------------- N:M


def nm_reference(costs, removed, target, n, m, uniform=False):
    """Python loops over blocks: block cost, sorted block list, m-n cheapest per chosen block."""
    k = m - n
    blocks = []  # (cost, layer index, row, block, element order)
    names = list(costs)
    for li, name in enumerate(names):
        R, Cw = costs[name].shape
        for r in range(R):
            for b in range(Cw // m):
                cols = range(b * m, (b + 1) * m)
                rem = [bool(removed[name][r, c]) for c in cols]
                eff = [0.0 if rem[j] else costs[name][r, c].item() for j, c in enumerate(cols)]
                order = sorted(range(m), key=lambda j: (not rem[j], eff[j], j))[:k]
                cost = 0.0 if any(rem) else sum(sorted(eff)[:k])
                blocks.append((any(rem), cost, li, r, b, order))
    out = {name: torch.zeros_like(removed[name]) for name in names}

    def choose(candidates, n_blocks):
        forced = [x for x in candidates if x[0]]
        free = sorted((x for x in candidates if not x[0]), key=lambda x: x[1:5])
        for _, _, li, r, b, order in forced + free[:max(0, n_blocks - len(forced))]:
            for j in order:
                out[names[li]][r, b * m + j] = True

    if uniform:
        for li, name in enumerate(names):
            choose([x for x in blocks if x[2] == li], round(target * costs[name].numel() / k))
    else:
        choose(blocks, round(target * sum(c.numel() for c in costs.values()) / k))
    return out


def nm_blocks(mask, m):
    return mask.reshape(mask.shape[0], -1, m).sum(-1)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (3, 8)])
@pytest.mark.parametrize("uniform", [False, True])
def test_nm_matches_reference(n, m, uniform):
    shapes = {"a": (3, 16), "b": (5, 8), "c": (2, 24)}
    costs = random_costs(10, shapes)
    target = 0.6 * (m - n) / m
    out = select_nm(costs, no_masks(costs), target, n, m, uniform=uniform)
    ref = nm_reference(costs, no_masks(costs), target, n, m, uniform=uniform)
    for name in costs:
        assert torch.equal(out[name], ref[name])
        assert set(nm_blocks(out[name], m).unique().tolist()) <= {0, m - n}


def test_nm_ties_exact_m_minus_n_per_block():
    costs = {n: torch.ones(s, dtype=torch.float64) for n, s in SHAPES.items()}
    total = sum(c.numel() for c in costs.values())
    out = select_nm(costs, no_masks(costs), 0.25, 2, 4)
    assert count(out) == 2 * round(0.25 * total / 2)
    assert all(set(nm_blocks(o, 4).unique().tolist()) <= {0, 2} for o in out.values())
    full = select_nm(costs, out, 0.5, 2, 4)
    assert all((nm_blocks(o, 4) == 2).all() for o in full.values())


def test_nm_nested_across_shots_ends_exactly_n_m():
    costs = random_costs(11)
    first = select_nm(costs, no_masks(costs), 0.2, 2, 4)
    # Re-estimated costs make some removed entries look expensive; they must stay removed.
    second_costs = random_costs(12)
    second = select_nm(second_costs, first, 0.35, 2, 4)
    assert all(torch.equal(second[n], nm_reference(second_costs, first, 0.35, 2, 4)[n]) for n in costs)
    last = select_nm(random_costs(13), second, 0.5, 2, 4)
    for n in costs:
        assert (second[n] | ~first[n]).all() and (last[n] | ~second[n]).all()
        assert (nm_blocks(last[n], 4) == 2).all()


def test_nm_partly_removed_block_is_completed_with_its_removed_entry():
    costs = {"a": torch.tensor([[0.1, 0.2, 0.3, 9.0, 1.0, 2.0, 3.0, 4.0]], dtype=torch.float64)}
    removed = {"a": torch.tensor([[False, False, False, True, False, False, False, False]])}
    out = select_nm(costs, removed, 0.25, 2, 4)
    assert out["a"].tolist() == [[True, False, False, True, False, False, False, False]]


def test_nm_zero_cost_free_entries_do_not_displace_removed_ones():
    # Weights that are already zero cost 0 without being removed; the removed entry must still be kept.
    costs = {"a": torch.tensor([[0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)}
    removed = {"a": torch.tensor([[False, False, True, False]])}
    out = select_nm(costs, removed, 0.5, 2, 4)
    assert out["a"].tolist() == [[True, False, True, False]]


def test_nm_errors():
    costs = {"q_proj": torch.rand(2, 6, dtype=torch.float64)}
    with pytest.raises(ValueError, match="q_proj"):
        select_nm(costs, no_masks(costs), 0.5, 2, 4)
    costs = random_costs(0)
    with pytest.raises(ValueError, match="target"):
        select_nm(costs, no_masks(costs), 0.6, 2, 4)
    removed = no_masks(costs)
    removed["a"][0, :3] = True
    with pytest.raises(ValueError, match="'a'"):
        select_nm(costs, removed, 0.5, 2, 4)


# ---------------------------------------------------------------- structured


def test_removed_count_structured_counts_the_union():
    g = torch.Generator().manual_seed(20)
    R, Cw = 6, 9
    for n_r, n_c in itertools.product(range(R + 1), range(Cw + 1)):
        rows = torch.randperm(R, generator=g)[:n_r]
        cols = torch.randperm(Cw, generator=g)[:n_c]
        mask = torch.zeros(R, Cw, dtype=torch.bool)
        mask[rows, :] = True
        mask[:, cols] = True
        assert removed_count_structured(R, Cw, n_r, n_c) == int(mask.sum())


def structured_reference(row_costs, col_costs, removed_rows, removed_cols, budget):
    """Walk every prefix of the merged order, recounting removed weights from explicit masks."""
    names = list(row_costs)
    items = []  # (forced first, cost, layer index, kind, index)
    for li, n in enumerate(names):
        for kind, costs, removed in (("row", row_costs[n], removed_rows[n]), ("col", col_costs[n], removed_cols[n])):
            for i in range(len(costs)):
                forced = bool(removed[i])
                items.append((not forced, 0.0 if forced else costs[i].item(), li, kind == "col", i))
    items.sort()
    n_forced = sum(1 for x in items if not x[0])
    best = None
    for length in range(len(items) + 1):
        masks = {n: torch.zeros(len(row_costs[n]), len(col_costs[n]), dtype=torch.bool) for n in names}
        for _, _, li, is_col, i in items[:length]:
            if is_col:
                masks[names[li]][:, i] = True
            else:
                masks[names[li]][i, :] = True
        if length >= n_forced and (length == n_forced or count(masks) <= budget):
            best = length
    rows = {n: torch.zeros(len(row_costs[n]), dtype=torch.bool) for n in names}
    cols = {n: torch.zeros(len(col_costs[n]), dtype=torch.bool) for n in names}
    for _, _, li, is_col, i in items[:best]:
        (cols if is_col else rows)[names[li]][i] = True
    return rows, cols


def structured_problem(seed):
    shapes = {"a": (4, 6), "b": (7, 3), "c": (5, 5)}
    g = torch.Generator().manual_seed(seed)
    # Cheaper columns in wide layers and cheaper rows in tall ones, so both kinds get chosen.
    row_costs = {n: torch.rand(R, generator=g, dtype=torch.float64) * Cw for n, (R, Cw) in shapes.items()}
    col_costs = {n: torch.rand(Cw, generator=g, dtype=torch.float64) * R for n, (R, Cw) in shapes.items()}
    return shapes, row_costs, col_costs


def structured_removed(rows, cols, shapes):
    return sum(removed_count_structured(R, Cw, int(rows[n].sum()), int(cols[n].sum())) for n, (R, Cw) in shapes.items())


@pytest.mark.parametrize("target", [0.0, 0.1, 0.29, 0.5, 0.8, 1.0])
def test_structured_matches_prefix_reference(target):
    shapes, row_costs, col_costs = structured_problem(21)
    total = sum(R * Cw for R, Cw in shapes.values())
    rows, cols = select_structured(row_costs, col_costs, no_masks(row_costs), no_masks(col_costs), target)
    ref_rows, ref_cols = structured_reference(row_costs, col_costs, no_masks(row_costs), no_masks(col_costs),
                                              math.floor(target * total + 1e-9))
    for n in shapes:
        assert torch.equal(rows[n], ref_rows[n]) and torch.equal(cols[n], ref_cols[n])
    assert structured_removed(rows, cols, shapes) <= target * total + 1e-9


def test_structured_nested_across_shots():
    shapes, row_costs, col_costs = structured_problem(22)
    total = sum(R * Cw for R, Cw in shapes.values())
    rows, cols = select_structured(row_costs, col_costs, no_masks(row_costs), no_masks(col_costs), 0.3)
    _, row_costs2, col_costs2 = structured_problem(23)
    rows2, cols2 = select_structured(row_costs2, col_costs2, rows, cols, 0.6)
    ref_rows, ref_cols = structured_reference(row_costs2, col_costs2, rows, cols, math.floor(0.6 * total))
    for n in shapes:
        assert torch.equal(rows2[n], ref_rows[n]) and torch.equal(cols2[n], ref_cols[n])
        assert (rows2[n] | ~rows[n]).all() and (cols2[n] | ~cols[n]).all()
    assert structured_removed(rows, cols, shapes) <= structured_removed(rows2, cols2, shapes) <= 0.6 * total


def test_structured_keeps_removed_structures_beyond_the_target():
    shapes, row_costs, col_costs = structured_problem(27)
    removed_rows = {n: (torch.arange(R) >= 1) & (torch.arange(R) < 3) for n, (R, Cw) in shapes.items()}
    removed_cols = {n: torch.arange(Cw) == 1 for n, (R, Cw) in shapes.items()}
    for n in shapes:  # free all-zero structures cost 0 too; they must not displace removed ones
        row_costs[n][0] = 0
        col_costs[n][0] = 0
    rows, cols = select_structured(row_costs, col_costs, removed_rows, removed_cols, 0.1)
    for n in shapes:
        assert torch.equal(rows[n], removed_rows[n]) and torch.equal(cols[n], removed_cols[n])


def test_structured_uniform_per_layer():
    shapes, row_costs, col_costs = structured_problem(24)
    rows, cols = select_structured(row_costs, col_costs, no_masks(row_costs), no_masks(col_costs), 0.45,
                                   uniform=True)
    for n, (R, Cw) in shapes.items():
        one = lambda d: {n: d[n]}  # noqa: E731
        ref_rows, ref_cols = structured_reference(one(row_costs), one(col_costs), one(no_masks(row_costs)),
                                                  one(no_masks(col_costs)), math.floor(0.45 * R * Cw))
        assert torch.equal(rows[n], ref_rows[n]) and torch.equal(cols[n], ref_cols[n])


def test_structured_many_layers_fast_and_within_budget():
    g = torch.Generator().manual_seed(25)
    names = [f"layer{i}" for i in range(200)]
    row_costs = {n: torch.rand(64, generator=g) for n in names}
    col_costs = {n: torch.rand(96, generator=g) for n in names}
    rows, cols = select_structured(row_costs, col_costs, no_masks(row_costs), no_masks(col_costs), 0.5)
    removed = sum(removed_count_structured(64, 96, int(rows[n].sum()), int(cols[n].sum())) for n in names)
    assert 0.5 * 200 * 64 * 96 - 96 <= removed <= 0.5 * 200 * 64 * 96


def test_structured_errors():
    _, row_costs, col_costs = structured_problem(26)
    with pytest.raises(ValueError, match="target"):
        select_structured(row_costs, col_costs, no_masks(row_costs), no_masks(col_costs), -0.1)
    bad = no_masks(col_costs)
    bad["b"] = torch.zeros(9, dtype=torch.bool)
    with pytest.raises(ValueError, match="'b'"):
        select_structured(row_costs, col_costs, no_masks(row_costs), bad, 0.5)


def concat_sort_selection(costs, removed, count_, consume=False, split=None):
    """The selection before the memory-lean one: one stable sort of every free cost concatenated (`consume`
    accepted and ignored, so that it can stand in for `selection._remove_cheapest`; one process: no `split`)."""
    assert split is None, "the reference holds every layer's costs"
    free = [costs[n][~removed[n]].double() for n in costs]
    sizes = [len(f) for f in free]
    n_new = max(0, min(count_ - count(removed), sum(sizes)))
    chosen = torch.zeros(sum(sizes), dtype=torch.bool)
    chosen[torch.sort(torch.cat(free), stable=True).indices[:n_new]] = True
    out = {}
    for n, part in zip(costs, chosen.split(sizes)):
        out[n] = removed[n].clone()
        out[n][~removed[n]] = part
    return out


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lean_selection_equals_one_sort_of_all_costs(seed, dtype):
    """The bisection over per-layer costs picks exactly what one sort of all costs picks, with heavy ties,
    negative costs, -0.0 against +0.0, infinities and masks already set."""
    from surgeon.selection import _remove_cheapest

    g = torch.Generator().manual_seed(seed)
    shapes = {"a": (7, 16), "b": (13, 8), "c": (4, 32), "d": (1, 5)}
    costs = {n: (torch.randint(-3, 4, s, generator=g).to(dtype) / 4) for n, s in shapes.items()}
    costs["a"][0, :3] = torch.tensor([-0.0, 0.0, -0.0], dtype=dtype)
    costs["b"][1, 1] = math.inf
    costs["c"][2, 2] = -math.inf
    costs["d"] = torch.rand(shapes["d"], generator=g, dtype=dtype) * 1e-30
    removed = random_masks(costs, 0.3, seed)
    total = sum(c.numel() for c in costs.values())
    for k in (0, count(removed), count(removed) + 1, total // 2, total - 1, total, total + 5):
        lean, reference = _remove_cheapest(costs, removed, k), concat_sort_selection(costs, removed, k)
        for n in costs:
            assert torch.equal(lean[n], reference[n]), (k, n)
