"""The memory-lean shot (one solver at a time, per-layer threshold search, shared and diagonal factors) picks
the same masks and leaves the same weights as the shot before it, which held every layer's solver at once and
sorted all costs in one tensor: every method and structure, on the testbed model (issue 10, acceptance 1)."""
import copy

import pytest
import torch

from surgeon import data as data_mod
from surgeon import selection
from surgeon.adapters import adapter_for, set_weight_with_bias, weight_with_bias
from surgeon.curvature import estimate_curvature
from surgeon.evaluate import perplexity
from surgeon.obs import LayerOBS
from surgeon.prune import PruneState, ShotOptions, apply_masks, prune_shot
from test_selection import concat_sort_selection as concat_sort


def shot_before(model, layers, batches, state, target, opts):
    """The shot as it was: dense factors, every layer's LayerOBS built before the selection and kept until its
    update, costs of all layers sorted at once."""
    factors = estimate_curvature(model, layers, batches, rank=opts.rank, kind=opts.kind)
    obd = opts.correlation == "none"
    solvers, costs, row_costs, col_costs = {}, {}, {}, {}
    for layer in layers:
        f = factors[layer.name].dense()
        solver = LayerOBS(weight_with_bias(layer.module), f.A, f.G, damping_a=opts.damping_a,
                          damping_g=opts.damping_g, has_bias=layer.module.bias is not None)
        if opts.structure == "structured":
            row_costs[layer.name] = solver.obd_row_costs() if obd else solver.row_costs()
            col_costs[layer.name] = solver.obd_col_costs() if obd else solver.col_costs()
        else:
            costs[layer.name] = solver.obd_element_costs() if obd else solver.element_costs()
        solvers[layer.name] = solver
    if opts.structure == "structured":
        rows, cols = selection.select_structured(row_costs, col_costs, state.rows, state.cols, target)
        state.rows.update(rows)
        state.cols.update(cols)
        for name in rows:
            state.removed[name] = rows[name][:, None] | cols[name][None, :]
    elif opts.structure == "semistructured":
        state.removed.update(selection.select_nm(costs, state.removed, target, opts.n, opts.m))
    else:
        state.removed.update(selection.select_unstructured(costs, state.removed, target))
    for layer in layers:
        if obd:
            break
        solver, name = solvers[layer.name], layer.name
        if opts.structure == "structured":
            W = solver.update_rows_cols(state.rows[name], state.cols[name])
        else:
            W, _ = solver.update_elements_joint(state.removed[name], tol=opts.tol, max_iter=opts.max_iter)
        set_weight_with_bias(layer.module, W)
    apply_masks(layers, state)


METHODS = {"surgeon": dict(kind="kfac", correlation="layer"), "kobd": dict(kind="kfac", correlation="none"),
           "lobd": dict(kind="diag_a", correlation="none"), "magnitude": dict(kind="identity", correlation="none")}
STRUCTURES = {"structured": dict(target=0.2, damping_g=0.01), "unstructured": dict(target=0.4, damping_g=0.1),
              "semistructured": dict(target=0.5, damping_g=0.1)}


@pytest.fixture(scope="module")
def testbed():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from surgeon.config import shared_dir

    path = shared_dir() / "models/opt-tiny-wt2"
    if not path.is_dir():
        pytest.skip(f"testbed not found at {path}")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = data_mod.tokenize(tokenizer, (shared_dir() / "data/wikitext-2/valid.txt").read_text())
    calib = data_mod.calibration_windows(ids, 8, 64, 100)
    return model, data_mod.batches(calib, 4), data_mod.eval_windows(ids, 64, 16)


@pytest.mark.parametrize("structure", list(STRUCTURES))
@pytest.mark.parametrize("method", list(METHODS))
def test_lean_shot_equals_the_shot_before(testbed, monkeypatch, method, structure):
    dense, batches, windows = testbed
    s = STRUCTURES[structure]
    # both shots run the same joint solve: a loose tolerance and a stronger damping (fewer iterations) keep the
    # test short without weakening the comparison
    opts = ShotOptions(method=method, structure=structure, damping_a=0.1, damping_g=s["damping_g"], tol=1e-3,
                       **METHODS[method])
    results = []
    for lean in (True, False):
        model = copy.deepcopy(dense)
        layers = adapter_for(model.config.model_type).layers(model)
        state = PruneState.empty(layers)
        with monkeypatch.context() as m:
            if not lean:
                m.setattr(selection, "_remove_cheapest", concat_sort)
            for target in (s["target"] / 2, s["target"]):  # two shots: the second starts from pruned weights
                (prune_shot if lean else shot_before)(model, layers, batches, state, target, opts)
        results.append((state, [weight_with_bias(l.module) for l in layers], perplexity(model, windows)))
    (state, weights, ppl), (state_before, weights_before, ppl_before) = results
    for name in state.removed:
        assert torch.equal(state.removed[name], state_before.removed[name]), name
    for W, W_before in zip(weights, weights_before):
        torch.testing.assert_close(W, W_before, rtol=0, atol=1e-6 * W_before.abs().max().item())
    assert abs(ppl - ppl_before) <= 1e-6 * ppl_before
