"""Quantization (surgeon/quantize.py) against brute force: the sweep equals the sequential dense OBS solve under
F = G (x) A for its column order, its cost is the quadratic model's increase, weights lie on the grid, zeros stay."""
import itertools

import pytest
import torch

from surgeon.obs import damp
from surgeon.quantize import Grid, quantize_layer


def _spd(n, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 3 * n, dtype=torch.float64, generator=g)
    X[1] += 0.8 * X[0]  # correlated inputs: compensation matters
    return scale * X @ X.T / (3 * n)


def _layer(R, Cw, seed, zeros=0.3):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(R, Cw, dtype=torch.float64, generator=g)
    W[torch.rand(R, Cw, generator=g) < zeros] = 0
    return W


def _brute_force(W, bias, A, G, grid, damping, out, order="natural"):
    """Sequential OBS on the dense Fisher G (x) H (row-major vec), column by column in the given order, checking the
    sweep's result `out` step by step: each column, just before it is fixed, must round to the sweep's value there
    (0 where W was 0; a grid point within half a step, ties of the max |w| at exactly half a step either way), the
    group's grid fitted on its current columns when entered (natural order) or on the original weights (act) must
    be the sweep's; then the column is fixed to that value and every free entry (the columns not yet fixed and the
    bias) re-solved exactly. Returns the brute-force weights (with the bias column)."""
    R, Cw = W.shape
    Wb = W.clone() if bias is None else torch.cat([W, bias[:, None]], 1)
    C = Wb.shape[1]
    H = damp(A, damping)
    F = torch.kron(G, H)
    w0 = Wb.reshape(-1).clone()
    cur = Wb.clone()
    width = grid.width(Cw)
    if order == "act":
        columns = torch.argsort(-H.diagonal()[:Cw], stable=True).tolist()
        for g in range(-(-Cw // width)):
            s, z = grid.fit(torch.where(W[:, g * width:(g + 1) * width] == 0, 0, Wb[:, g * width:(g + 1) * width]),
                            H.diagonal()[g * width:(g + 1) * width])
            torch.testing.assert_close(s, out.scale[:, g], rtol=1e-9, atol=0)
    else:
        columns = list(range(Cw))
    fixed = torch.zeros(R, C, dtype=torch.bool)
    for j in columns:
        g = j // width
        if order == "natural" and j % width == 0:
            s, z = grid.fit(torch.where(W[:, j:j + width] == 0, 0, cur[:, j:min(j + width, Cw)]),
                            H.diagonal()[j:j + width])
            torch.testing.assert_close(s, out.scale[:, g], rtol=1e-9, atol=0)
            torch.testing.assert_close(z, out.zero[:, g], rtol=0, atol=0)
        s, z, t = out.scale[:, g], out.zero[:, g], out.W[:, j]
        pruned = W[:, j] == 0
        assert torch.equal(t[pruned], torch.zeros_like(t[pruned]))
        x, q = cur[:, j] / s + z, t / s + z  # the sweep's integer and the one the current value rounds to
        lo, hi = x.floor().clamp(grid.qmin, grid.qmax), x.ceil().clamp(grid.qmin, grid.qmax)
        tie = ((x - x.floor()) - 0.5).abs() < 1e-9
        nearest = (q - x.round().clamp(grid.qmin, grid.qmax)).abs() < 1e-9
        either = tie & (((q - lo).abs() < 1e-9) | ((q - hi).abs() < 1e-9))
        assert bool((nearest | either | pruned).all()), (j, cur[:, j], t)
        cur[:, j] = t
        fixed[:, j] = True
        fx, fr = fixed.reshape(-1), ~fixed.reshape(-1)
        w = cur.reshape(-1).clone()
        d_c = w[fx] - w0[fx]
        w[fr] = w0[fr] - torch.linalg.solve(F[fr][:, fr], F[fr][:, fx] @ d_c)
        cur = w.reshape(R, C)
    return cur


@pytest.mark.parametrize("bias,symmetric,group,blocksize,order,observer", [
    (False, True, 4, 128, "natural", "minmax"), (True, True, 5, 3, "natural", "minmax"),
    (True, False, 0, 4, "natural", "minmax"), (False, False, 4, 8, "natural", "minmax"),
    (True, True, 10, 2, "natural", "minmax"), (True, True, 5, 3, "act", "minmax"),
    (False, False, 4, 128, "act", "minmax"), (True, True, 0, 4, "act", "minmax"),
    (True, True, 5, 3, "act", "mse"), (False, False, 4, 8, "natural", "mse"), (True, True, 5, 3, "act", "cost"),
    (True, False, 4, 8, "natural", "cost")])
def test_sweep_equals_the_sequential_dense_obs_solve(bias, symmetric, group, blocksize, order, observer):
    R, Cw = 5, 10
    W = _layer(R, Cw, 0)
    b = torch.randn(R, dtype=torch.float64) if bias else None
    C = Cw + bias
    A, G = _spd(C, 1), _spd(R, 2)
    grid = Grid(bits=3, symmetric=symmetric, group_size=group, observer=observer)
    out = quantize_layer(W, grid, A=A, G=G, bias=b, damping=0.05, blocksize=blocksize, order=order)
    want = _brute_force(W, b, A, G, grid, 0.05, out, order)
    torch.testing.assert_close(out.W, want[:, :Cw], rtol=1e-9, atol=1e-9)
    if bias:
        torch.testing.assert_close(out.bias, want[:, Cw], rtol=1e-9, atol=1e-9)
    # the cost is the quadratic model's increase 1/2 vec(D)^T (G (x) H) vec(D) of the whole change
    Wb = W if b is None else torch.cat([W, b[:, None]], 1)
    Qb = out.W if b is None else torch.cat([out.W, out.bias[:, None]], 1)
    D = (Qb - Wb).reshape(-1)
    assert out.cost == pytest.approx(0.5 * float(D @ torch.kron(G, damp(A, 0.05)) @ D), rel=1e-9)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("observer", ["mse", "cost"])
def test_observer_range_is_the_best_shrink_by_brute_force(monkeypatch, symmetric, observer):
    """Each row's range is the shrink p in (1, 0.99, ..., 0.81) of its min-max range whose rounding error is least
    (|w - q|^2.4 summed, or the weighted squared error), searched here row by row over every p (no early stop)."""
    import surgeon.quantize as quantize

    monkeypatch.setattr(quantize, "SHRINK_PATIENCE", 1000)
    g = torch.Generator().manual_seed(12)
    W = torch.randn(12, 16, dtype=torch.float64, generator=g)
    W[:, 3] *= 6  # an outlier column: clipping it buys a finer grid for the rest
    W[0] = 0  # an all-zero row keeps its min-max grid (scale 1)
    weight = torch.rand(16, dtype=torch.float64, generator=g) + 0.05
    grid = Grid(bits=3, symmetric=symmetric, group_size=0, observer=observer)
    scale, zero = grid.fit(W, weight)
    minmax = Grid(bits=3, symmetric=symmetric, group_size=0)
    s0, z0 = minmax.fit(W)
    assert scale[0] == s0[0] == 1 and zero[0] == z0[0]
    error = (lambda D: (D**2 * weight).sum()) if observer == "cost" else (lambda D: D.abs().pow(2.4).sum())
    shrunk = 0
    for r in range(1, W.shape[0]):
        lo, hi = W[r].min().clamp(max=0), W[r].max().clamp(min=0)
        candidates = []
        for i in range(20):
            s, z = minmax._range((1 - i / 100) * lo[None], (1 - i / 100) * hi[None])
            candidates.append((float(error(minmax.round(W[r:r + 1], s, z) - W[r:r + 1])), i, s, z))
        best = min(candidates, key=lambda c: (c[0], c[1]))
        torch.testing.assert_close(scale[r:r + 1], best[2], rtol=1e-12, atol=0)
        torch.testing.assert_close(zero[r:r + 1], best[3], rtol=0, atol=0)
        assert best[0] <= candidates[0][0]  # never worse than min-max
        shrunk += best[1] > 0
        assert scale[r] <= s0[r] * (1 + 1e-12) or not symmetric
    assert shrunk >= 3  # the outlier column makes clipping pay in most rows


def test_the_cost_observer_weighs_columns_by_diag_a():
    """observer=cost fits the grid to the columns that carry input energy: a heavily weighted column is rounded
    more finely than under mse, which counts every column alike."""
    g = torch.Generator().manual_seed(13)
    W = torch.randn(64, 8, dtype=torch.float64, generator=g)
    W[:, 0] *= 5  # the large column ...
    weight = torch.full((8,), 0.01, dtype=torch.float64)
    weight[0] = 100.0  # ... carries the input energy: clipping it would cost the most
    cost = Grid(bits=3, group_size=0, observer="cost")
    mse = Grid(bits=3, group_size=0, observer="mse")
    err = lambda grid: ((grid.round(W, *grid.fit(W, weight)) - W)[:, 0] ** 2).sum()  # noqa: E731
    assert err(cost) < err(mse)


def test_g_does_not_change_the_update_only_the_cost():
    W, A = _layer(6, 12, 3), _spd(12, 4)
    grid = Grid(bits=4, group_size=4)
    plain = quantize_layer(W, grid, A=A)
    weighted = quantize_layer(W, grid, A=A, G=_spd(6, 5, scale=7.0))
    assert torch.equal(plain.W, weighted.W)
    assert weighted.cost != pytest.approx(plain.cost)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_weights_on_the_grid_zeros_stay_zero(symmetric, method):
    W, A = _layer(8, 20, 6), _spd(20, 7)
    grid = Grid(bits=4, symmetric=symmetric, group_size=8)
    out = quantize_layer(W, grid, A=A, method=method)
    assert torch.equal(out.W[W == 0], torch.zeros(int((W == 0).sum()), dtype=W.dtype))
    w = grid.width(20)
    assert w == 5 and out.scale.shape == (8, 4)
    for g in range(out.scale.shape[1]):
        cols = slice(w * g, w * g + w)
        q = out.W[:, cols] / out.scale[:, g, None] + out.zero[:, g, None]
        torch.testing.assert_close(q, q.round(), rtol=0, atol=1e-9)
        assert q.round().min() >= grid.qmin and q.round().max() <= grid.qmax
        assert torch.equal(out.zero[:, g], out.zero[:, g].round())


def test_rtn_is_the_nearest_grid_point():
    W = _layer(4, 6, 8, zeros=0.0)
    grid = Grid(bits=3, symmetric=False, group_size=3)
    out = quantize_layer(W, grid, method="rtn")
    for r, c in itertools.product(range(4), range(6)):
        s, z = out.scale[r, c // 3], out.zero[r, c // 3]
        points = (torch.arange(grid.qmin, grid.qmax + 1, dtype=W.dtype) - z) * s
        assert float(out.W[r, c]) == pytest.approx(float(points[(points - W[r, c]).abs().argmin()]), abs=1e-12)


def test_compensation_beats_round_to_nearest_on_correlated_inputs():
    g = torch.Generator().manual_seed(10)
    X = torch.randn(32, 8, dtype=torch.float64, generator=g) @ torch.randn(8, 200, dtype=torch.float64, generator=g)
    X += 0.1 * torch.randn(32, 200, dtype=torch.float64, generator=g)  # inputs close to an 8-dim subspace
    W, A, G = _layer(16, 32, 9, zeros=0.0), X @ X.T / 200, _spd(16, 11)
    grid = Grid(bits=3, group_size=8)
    gptq = quantize_layer(W, grid, A=A, G=G)
    rtn = quantize_layer(W, grid, A=A, G=G, method="rtn")
    assert gptq.cost < 0.8 * rtn.cost


def test_bad_settings_fail_clearly():
    with pytest.raises(ValueError, match="quantize.bits"):
        Grid(bits=1)
    with pytest.raises(ValueError, match="group_size"):
        Grid(bits=4, group_size=-1)
    with pytest.raises(ValueError, match="quantize.observer"):
        Grid(bits=4, observer="percentile")
    with pytest.raises(ValueError, match="needs the input factor"):
        quantize_layer(_layer(2, 4, 0), Grid(bits=4))
    with pytest.raises(ValueError, match="quantize.method"):
        quantize_layer(_layer(2, 4, 0), Grid(bits=4), method="awq")


def test_groups_are_whole_divisors_of_the_inputs():
    grid = Grid(bits=4, group_size=128)
    assert [grid.width(c) for c in (256, 576, 688, 100, 127 * 2)] == [128, 96, 86, 100, 127]
    assert Grid(bits=4, group_size=0).width(576) == 576


# ------------------------------------------------------------------ the runner: pruned + quantized, saved, reloaded
from conftest import compose  # noqa: E402

SMALL = ["calib.n=8", "calib.seq_len=64", "calib.batch_size=4", "eval.max_windows=8", "eval.seq_len=128"]


def _run(tmp_path, name, overrides):
    from surgeon import runner

    cfg = compose([*SMALL, f"results={tmp_path}/records.jsonl", *overrides])
    return runner.run(cfg, tmp_path / name)


@pytest.mark.parametrize("model,symmetric,fmt", [("llama-tiny", "true", "pack-quantized"),
                                                 ("opt-tiny", "false", "int-quantized")])
def test_pruned_then_quantized_model_saves_and_reloads_with_the_same_perplexity(tmp_path, shared, model, symmetric,
                                                                                fmt):
    """50% unstructured, then 4-bit group-128 weights: the saved compressed-tensors folder loads with the stock
    from_pretrained and gives the record's perplexity on the same windows; pruned entries are zero after reload."""
    from transformers import AutoModelForCausalLM

    from surgeon.adapters import adapter_for
    from surgeon.runner import perplexity, prepare_data

    record = _run(tmp_path, "run", [f"model={model}", "structure=unstructured", "target=0.5", "shots=1",
                                    "quantize=w4g128", f"quantize.symmetric={symmetric}", "save_model=true"])
    q = record["quantize"]
    assert record["protocol"]["quantize"] == {"bits": 4, "group_size": 128, "symmetric": symmetric == "true",
                                              "method": "gptq", "damping": 0.01, "order": "act",
                                              "sequential": False, "observer": "cost"}
    assert q["export"]["format"] == fmt and q["export"]["bytes"] > 0
    assert record["final_ppl"] == q["ppl"] and q["before_ppl"] == record["points"][-1]["ppl"]
    assert q["fallbacks"] == 0 and all(e["method"] == "gptq" for e in q["layers"])
    from surgeon.runner import summary_table

    assert f"ppl {q['before_ppl']:.3f} -> {q['ppl']:.3f}, saved {fmt}" in summary_table(record)
    from experiments.tables import build_tables

    rows = {tuple(row["label"]): row["cells"][0]["ppl"] for row in build_tables([record])["quantized"]["rows"]}
    grid = "int4 g128" + ("" if symmetric == "true" else " asym")
    pruning = "LLM Surgeon unstructured 50%"
    assert rows == {("Dense (100%)", ""): record["dense_ppl"], (pruning, "float"): q["before_ppl"],
                    (pruning, f"{grid} OBS update (run's A), act order, cost observer"): q["ppl"]}
    reloaded = AutoModelForCausalLM.from_pretrained(record["model_dir"])
    data = prepare_data(compose([*SMALL, f"model={model}"]))
    assert perplexity(reloaded, data.eval_windows) == pytest.approx(q["ppl"], rel=1e-5)
    layers = adapter_for(reloaded.config.model_type).layers(reloaded)
    zeros = sum(int((layer.weight == 0).sum()) for layer in layers)
    assert zeros >= 0.5 * sum(layer.weight.numel() for layer in layers) - 1


def test_quantization_alone_and_round_to_nearest(tmp_path, shared):
    """shots=0 quantizes the dense model; the OBS update beats round-to-nearest on the same grid: its perplexity
    is lower (16k calibration tokens: 114.65 against 114.89, dense 114.52; with 4k the update overfits A and
    loses)."""
    common = ["model=opt-tiny", "shots=0", "quantize=w4g128", "quantize.bits=3", "calib.n=64", "calib.seq_len=256",
              "eval.max_windows=32", "quantize.observer=minmax"]  # the min-max range: rtn needs no curvature pass
    # quantize.baseline: the same run also rounds to nearest; the update's weights are what it saves
    gptq = _run(tmp_path, "gptq", [*common, "quantize.baseline=true", "save_model=true"])
    rtn = _run(tmp_path, "rtn", [*common, "quantize.method=rtn"])
    assert gptq["quantize"]["baseline"]["ppl"] == pytest.approx(rtn["quantize"]["ppl"], rel=1e-6)
    assert "baseline" not in rtn["quantize"]
    from transformers import AutoModelForCausalLM

    from surgeon.runner import perplexity, prepare_data

    data = prepare_data(compose([*SMALL, *common]))
    reloaded = AutoModelForCausalLM.from_pretrained(gptq["model_dir"])
    assert perplexity(reloaded, data.eval_windows) == pytest.approx(gptq["quantize"]["ppl"], rel=1e-5)
    assert gptq["points"] == [] and gptq["quantize"]["before_ppl"] == gptq["dense_ppl"]
    assert rtn["quantize"]["cost"] is None  # no curvature pass: nothing to weigh its change with
    assert gptq["quantize"]["ppl"] < rtn["quantize"]["ppl"]
    assert gptq["protocol"]["quantize"]["method"] == "gptq" and rtn["protocol"]["quantize"]["method"] == "rtn"
    # the report's own table for them, never the paper tables (a shots=0 run has no pruning to place)
    from experiments.tables import build_tables

    tables = build_tables([gptq, rtn])
    assert not tables["unstructured"]["rows"] and not tables["structured"]["rows"]
    rows = {tuple(row["label"]): row["cells"][0]["ppl"] for row in tables["quantized"]["rows"]}
    assert rows == {("Dense (100%)", ""): gptq["dense_ppl"],
                    ("none", "int3 g128 OBS update (run's A), act order"): gptq["final_ppl"],
                    ("none", "int3 g128 round to nearest"): rtn["final_ppl"]}
    # alone, the baseline fills the round-to-nearest row itself
    rows = {tuple(row["label"]): row["cells"][0]["ppl"] for row in build_tables([gptq])["quantized"]["rows"]}
    assert rows[("none", "int3 g128 round to nearest")] == gptq["quantize"]["baseline"]["ppl"]


def test_cost_observer_run_and_its_round_to_nearest_twin(tmp_path, shared):
    """quantize.observer=cost through run.py: the record and the table name it; the round-to-nearest twin of the
    update's run weighs the columns by the same diag A as a round-to-nearest run of its own (which makes the
    curvature pass for it), so the two agree; the grids differ from min-max ones."""
    common = ["model=llama-tiny", "shots=0", "quantize=w4g128", "quantize.bits=3", "calib.n=16", "eval.max_windows=16"]
    gptq = _run(tmp_path, "gptq", [*common, "quantize.observer=cost", "quantize.baseline=true"])
    rtn = _run(tmp_path, "rtn", [*common, "quantize.observer=cost", "quantize.method=rtn"])
    minmax = _run(tmp_path, "minmax", [*common, "quantize.method=rtn", "quantize.observer=minmax"])
    assert gptq["protocol"]["quantize"]["observer"] == "cost" and gptq["quantize"]["observer"] == "cost"
    from surgeon.runner import summary_table

    assert "(gptq, group 128, cost observer)" in summary_table(gptq)
    assert gptq["quantize"]["baseline"]["ppl"] == pytest.approx(rtn["quantize"]["ppl"], rel=1e-9)
    assert rtn["quantize"]["cost"] is not None  # its curvature pass: diag A for the range, the cost reported
    assert rtn["quantize"]["ppl"] != pytest.approx(minmax["quantize"]["ppl"], rel=1e-9)
    from experiments.tables import build_tables

    rows = {tuple(row["label"]): row["cells"][0]["ppl"] for row in build_tables([gptq])["quantized"]["rows"]}
    assert rows[("none", "int3 g128 OBS update (run's A), act order, cost observer")] == gptq["final_ppl"]
    assert rows[("none", "int3 g128 round to nearest, cost observer")] == gptq["quantize"]["baseline"]["ppl"]


def test_quantize_settings_are_checked_before_loading():
    from surgeon.config import ConfigError, validate

    for overrides, match in [(["quantize=w4", "quantize.bits=9"], "quantize.bits"),
                             (["quantize=w4", "quantize.method=awq"], "quantize.method"),
                             (["quantize=w4", "quantize.damping=0"], "quantize.damping"),
                             (["quantize=w4", "quantize.group_size=-8"], "quantize.group_size"),
                             (["quantize=w4", "quantize.observer=percentile"], "quantize.observer"),
                             (["shots=0"], "needs quantize.bits")]:
        with pytest.raises(ConfigError, match=match):
            validate(compose(overrides), check_sources=False)


def test_bit_allocation_is_the_brute_force_optimum_for_convex_costs():
    """Equal-size layers with convex costs (each bit divides a layer's cost by its own factor): the greedy
    allocation equals the best of all allocations within the budget; the budget is never exceeded."""
    from surgeon.quantize import allocate_bits

    g = torch.Generator().manual_seed(12)
    widths = [2, 3, 4, 6, 8]
    for trial in range(20):
        n = 4
        base = (torch.rand(n, generator=g) * 10 + 0.1).tolist()
        decay = (torch.rand(n, generator=g) * 3 + 1.5).tolist()
        costs = {f"l{i}": {b: base[i] * decay[i] ** -b for b in widths} for i in range(n)}
        sizes = {f"l{i}": 100 for i in range(n)}
        budget = [3.0, 3.5, 4.0, 4.5, 5.0][trial % 5]
        got = allocate_bits(costs, sizes, budget)
        assert sum(got[k] * sizes[k] for k in got) <= budget * sum(sizes.values())
        best = min((c for c in itertools.product(widths, repeat=n) if sum(c) <= budget * n),
                   key=lambda c: sum(costs[f"l{i}"][b] for i, b in enumerate(c)))
        got_cost = sum(costs[k][got[k]] for k in got)
        best_cost = sum(costs[f"l{i}"][b] for i, b in enumerate(best))
        # greedy on the hull is optimal up to the budget it cannot spend in whole steps: never worse than the
        # optimum at the budget one step (2 bits of one layer) lower
        lower = min((c for c in itertools.product(widths, repeat=n) if sum(c) <= budget * n - 2),
                    key=lambda c: sum(costs[f"l{i}"][b] for i, b in enumerate(c)))
        assert best_cost <= got_cost + 1e-12
        assert got_cost <= sum(costs[f"l{i}"][b] for i, b in enumerate(lower)) + 1e-12


def test_allocation_takes_bits_from_the_cheap_layers_and_refuses_an_impossible_budget():
    from surgeon.quantize import allocate_bits

    costs = {"cheap": {2: 1.0, 4: 0.1, 8: 0.01}, "dear": {2: 100.0, 4: 10.0, 8: 1.0}}
    assert allocate_bits(costs, {"cheap": 10, "dear": 10}, 5.0) == {"cheap": 2, "dear": 8}
    with pytest.raises(ValueError, match="narrowest widths"):
        allocate_bits(costs, {"cheap": 10, "dear": 10}, 1.5)


def test_mixed_precision_run_meets_its_budget_and_reloads(tmp_path, shared):
    from transformers import AutoModelForCausalLM

    from surgeon.runner import perplexity, prepare_data

    record = _run(tmp_path, "mixed", ["model=llama-tiny", "shots=0", "quantize=w4g128", "quantize.budget=3.5",
                                      "quantize.widths=[2,3,4,8]", "save_model=true"])
    q = record["quantize"]
    assert record["protocol"]["quantize"]["budget"] == 3.5 and record["protocol"]["quantize"]["bits"] is None
    assert q["mean_bits"] <= 3.5 and len({e["bits"] for e in q["layers"]}) > 1
    assert q["seconds"]["allocate"] > 0
    reloaded = AutoModelForCausalLM.from_pretrained(record["model_dir"])
    data = prepare_data(compose([*SMALL, "model=llama-tiny"]))
    assert perplexity(reloaded, data.eval_windows) == pytest.approx(q["ppl"], rel=1e-5)


def test_sequential_inputs_are_those_through_the_blocks_already_changed():
    """quantize.sequential: block 0's A is the KFAC pass's; block 1's A is the mean x x^T of its layers' inputs
    computed by hand from a forward through the changed block 0 (bias input included)."""
    from transformers import OPTConfig, OPTForCausalLM

    from surgeon.adapters import adapter_for
    from surgeon.curvature import estimate_curvature
    from surgeon.quantize import _sequential_inputs

    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, ffn_dim=32,
                                     num_attention_heads=2, max_position_embeddings=32, word_embed_proj_dim=16))
    model = model.double().eval()
    layers = adapter_for("opt").layers(model)
    batches = [torch.randint(0, 64, (2, 8)) for _ in range(2)]
    factors = estimate_curvature(model, layers, batches, accumulate="float64")
    kfac_a = {name: f.A.clone() for name, f in factors.items()}
    steps = _sequential_inputs(model, layers, batches, factors)
    first = next(steps)
    assert {layer.block for layer in first} == {0}
    for layer in first:
        torch.testing.assert_close(factors[layer.name].A, kfac_a[layer.name], rtol=1e-9, atol=1e-12)
        with torch.no_grad():
            layer.weight.mul_(0.5)  # block 0 changes (as quantization changes it)
    # by hand: block 1's layers' inputs after the change
    seen = {}
    second_layers = [layer for layer in layers if layer.block == 1]
    hooks = [layer.module.register_forward_hook(
        lambda m, a, o, name=layer.name: seen.setdefault(name, []).append(a[0].reshape(-1, a[0].shape[-1])))
        for layer in second_layers]
    with torch.no_grad():
        for ids in batches:
            model(ids, use_cache=False)
    for h in hooks:
        h.remove()
    second = next(steps)
    assert [layer.name for layer in second] == [layer.name for layer in second_layers]
    for layer in second:
        X = torch.cat(seen[layer.name]).double()
        X = torch.cat([X, torch.ones_like(X[:, :1])], 1)  # OPT's layers have biases
        torch.testing.assert_close(factors[layer.name].A, X.T @ X / X.shape[0], rtol=1e-9, atol=1e-12)
        assert not torch.allclose(factors[layer.name].A, kfac_a[layer.name])
    assert next(steps, None) is None


def test_serving_benchmark_runs_on_the_cpu_and_writes_ratios(tmp_path, shared):
    """experiments.bench_serve (the GPU throughput measurement, prepared): on a CPU it loads saved folders, times
    prefill and decode, and writes each model's ratio to the first's; --semi is refused without CUDA."""
    from experiments import bench_serve

    dense = shared / "models" / "llama-tiny-wt2"
    out = tmp_path / "serve.jsonl"
    rows = bench_serve.main([f"dense={dense}", f"again={dense}", "--device", "cpu", "--dtype", "float32",
                             "--batch", "2", "--prompt", "16", "--new", "4", "--repeats", "1", "--out", str(out)])
    assert [r["name"] for r in rows] == ["dense", "again"] and rows[0]["prefill_ratio"] == 1.0
    assert all(r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 and r["folder_bytes"] > 0 for r in rows)
    assert len(out.read_text().splitlines()) == 2
    with pytest.raises(SystemExit):
        bench_serve.main([f"dense={dense}", "--device", "cpu", "--semi"])
