"""Invariants of the method on tiny random models, each small enough to run in seconds (docs/mutations.md).

The pipeline tests compare `prune_shot` with a reference assembled from dense matrices, independently
of `surgeon.obs`: curvature re-estimated on the current model, F^-1 = kron(G_d^-1, A_d^-1) on the live
rows and columns with the damping written out, costs W^2 / (2 diag F^-1), one global threshold, and the
OBS update by a dense solve of each group against the current weights. The runner tests drive
`runner.run` on a tiny model with a character tokenizer, so they need no testbed.
"""
import copy
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, OPTConfig

from conftest import compose
from surgeon import models, runner
from surgeon.adapters import adapter_for, set_weight_with_bias, weight_with_bias
from surgeon.curvature import estimate_curvature
from surgeon.prune import PruneState, ShotOptions, prune_shot
from surgeon.schedule import shot_targets
from surgeon.selection import select_nm, select_unstructured

V, T = 32, 12


def tiny_model(family="opt", dtype=torch.float64):
    """2 decoder blocks of width 16 (MLP 32): every input width is a multiple of 4 for N:M."""
    torch.manual_seed(0)
    if family == "opt":
        config = OPTConfig(vocab_size=V, hidden_size=16, word_embed_proj_dim=16, ffn_dim=32, num_hidden_layers=2,
                           num_attention_heads=2, max_position_embeddings=64, enable_bias=True, init_std=0.2,
                           dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    else:
        config = LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                             initializer_range=0.2)
    return AutoModelForCausalLM.from_config(config).to(dtype).eval()


def setup(family="opt"):
    model = tiny_model(family)
    layers = adapter_for(model.config.model_type).layers(model)
    ids = torch.randint(0, V, (4, T), generator=torch.Generator().manual_seed(1))
    return model, layers, list(ids.split(2))


def zeros(layers):
    return sum(int((layer.module.weight == 0).sum()) for layer in layers)


def numel(layers):
    return sum(layer.module.weight.numel() for layer in layers)


# --- the dense reference of one shot ------------------------------------------------------------

def damped(M, lam):
    """M + lam * mean(diag M) * I, written out (docs/algorithm.md section 2)."""
    return M + lam * M.trace() / len(M) * torch.eye(len(M), dtype=M.dtype)


def row_groups(counts, max_correlate):
    """Consecutive whole rows while a group's removed count stays <= max_correlate; 0: one group."""
    groups = [[]]
    for i, n in enumerate(counts):
        if max_correlate and groups[-1] and sum(counts[j] for j in groups[-1]) + n > max_correlate:
            groups.append([])
        groups[-1].append(i)
    return groups


def reference_shot(model, layers, batches, removed, target, opts):
    """One shot from dense pieces (sections 2-5); prunes `model` in place, returns the removed masks and costs."""
    factors = estimate_curvature(model, layers, batches)  # on the current model, as every shot must
    dense, costs = {}, {}
    for layer in layers:
        W, f = weight_with_bias(layer.module), factors[layer.name]
        rows = ((W != 0).any(1) & (f.G.diagonal() > 0)).nonzero().squeeze(1)
        cols = ((W != 0).any(0) & (f.A.diagonal() > 0)).nonzero().squeeze(1)
        A_d = damped(f.A[cols][:, cols], opts.damping_a)
        G_d = damped(f.G[rows][:, rows], opts.damping_g)
        F_inv = torch.kron(torch.linalg.inv(G_d), torch.linalg.inv(A_d))
        theta = W[rows][:, cols]
        cost = torch.zeros_like(W)
        cost[rows[:, None], cols] = theta**2 / (2 * F_inv.diagonal().view_as(theta))
        costs[layer.name] = cost[:, :layer.module.in_features]
        dense[layer.name] = W, rows, cols, F_inv
    if opts.structure == "semistructured":
        removed = select_nm(costs, removed, target, opts.n, opts.m)
    else:
        removed = select_unstructured(costs, removed, target)
    max_correlate = opts.max_correlate if opts.solver == "grouped" else 0  # joint: the whole layer at once
    for layer in layers:
        W, rows, cols, F_inv = dense[layer.name]
        full = torch.zeros_like(W, dtype=torch.bool)
        full[:, :layer.module.in_features] = removed[layer.name]
        Q = full[rows][:, cols]
        theta = W[rows][:, cols].reshape(-1)
        for group in row_groups(Q.sum(1).tolist(), max_correlate):
            in_group = torch.zeros_like(Q)
            in_group[group] = Q[group]
            q = in_group.reshape(-1)
            if q.any():  # OBS: dθ = -F^-1 E_Q ([F^-1]_QQ)^-1 θ_Q, θ including earlier groups' updates
                theta = theta - F_inv[:, q] @ torch.linalg.solve(F_inv[q][:, q], theta[q])
        W = W.clone()
        W[rows[:, None], cols] = theta.view(len(rows), len(cols))
        W[full] = 0
        set_weight_with_bias(layer.module, W)
    return removed, costs


def assert_same_weights(layers, ref_layers):
    for layer, ref in zip(layers, ref_layers):
        want = weight_with_bias(ref.module)
        scale = want.abs().max().item()
        torch.testing.assert_close(weight_with_bias(layer.module), want, rtol=0, atol=1e-7 * scale,
                                   msg=f"{layer.name} differs from the dense reference")


@pytest.mark.parametrize("family, opts", [
    ("opt", ShotOptions()),
    ("llama", ShotOptions()),
    ("opt", ShotOptions(solver="grouped", max_correlate=20)),
    ("opt", ShotOptions(structure="semistructured", n=1, m=4)),
    ("llama", ShotOptions(structure="semistructured", n=2, m=4)),  # grouped-query attention: k, v 8 x 16
], ids=["opt-joint", "llama-joint", "opt-grouped", "opt-nm-1:4", "llama-nm-2:4"])
def test_shots_equal_the_dense_reference(family, opts):
    """Every shot: fresh curvature, damped KFAC costs, one global threshold, OBS update applied."""
    model, layers, batches = setup(family)
    state = PruneState.empty(layers)
    final = (opts.m - opts.n) / opts.m if opts.structure == "semistructured" else 0.5
    for target in shot_targets(final, 2):
        # each shot from the weights prune_shot left, so differences cannot pile up across shots
        ref_model = copy.deepcopy(model)
        ref_layers = adapter_for(model.config.model_type).layers(ref_model)
        ref_removed, costs = reference_shot(ref_model, ref_layers, batches, dict(state.removed), target, opts)
        before = dict(state.removed)
        prune_shot(model, layers, batches, state, target, opts)
        for layer in layers:
            assert torch.equal(state.removed[layer.name], ref_removed[layer.name]), layer.name
            assert (state.removed[layer.name] | ~before[layer.name]).all()  # masks are nested
        assert_same_weights(layers, ref_layers)
        assert zeros(layers) == sum(int(m.sum()) for m in state.removed.values())
        if opts.structure == "unstructured":
            # one threshold over all layers: no kept weight is cheaper than a newly removed one
            new = torch.cat([costs[n][state.removed[n] & ~before[n]] for n in costs])
            kept = torch.cat([costs[n][~state.removed[n]] for n in costs])
            assert not len(new) or new.max() <= kept.min()


# --- N:M and structured granularity -----------------------------------------------------------

@pytest.mark.parametrize("n, m", [(1, 4), (3, 4)])
def test_nm_blocks_hold_exactly_m_minus_n_zeros(n, m):
    """N:M: every block has 0 or m-n zeros at each shot, and exactly m-n at the final target (not n)."""
    model, layers, batches = setup()
    opts = ShotOptions(structure="semistructured", n=n, m=m)
    state = PruneState.empty(layers)
    total, k = numel(layers), m - n
    for target in shot_targets(k / m, 2):
        prune_shot(model, layers, batches, state, target, opts)
        assert zeros(layers) == k * round(target * total / k)
        for layer in layers:
            W = layer.module.weight
            per_block = (W == 0).view(W.shape[0], -1, m).sum(-1)
            assert set(per_block.unique().tolist()) <= {0, k}, layer.name
    for layer in layers:
        W = layer.module.weight
        assert ((W == 0).view(W.shape[0], -1, m).sum(-1) == k).all(), layer.name


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_structured_sparsity_within_one_structure_every_shot(family):
    """Structured: |achieved - target| * total <= the largest row/column, at every shot; zeros stay zero."""
    model, layers, batches = setup(family)
    opts = ShotOptions(structure="structured", damping_g=0.01)
    state = PruneState.empty(layers)
    total = numel(layers)
    largest = max(max(layer.shape) for layer in layers)  # a row holds Cw weights, a column R
    previous = {layer.name: torch.zeros(layer.shape, dtype=torch.bool) for layer in layers}
    for target in shot_targets(0.5, 3):
        prune_shot(model, layers, batches, state, target, opts)
        assert 0 <= target * total - zeros(layers) <= largest  # the largest prefix within the target
        for layer in layers:
            zero = layer.module.weight == 0
            assert torch.equal(zero, zero.all(1)[:, None] | zero.all(0)[None, :])  # whole rows and columns
            assert (zero | ~previous[layer.name]).all()
            previous[layer.name] = zero


# --- the runner: schedule and resume ----------------------------------------------------------

class CharTokenizer:
    """One token per character: enough for the runner's calibration and evaluation windows."""

    def __call__(self, text, return_attention_mask=False):
        return {"input_ids": [ord(c) % V for c in text]}


class Interrupted(Exception):
    """Stands in for a killed job: raised between two shots, after the checkpoint of the earlier one."""


@pytest.fixture
def job(tmp_path, monkeypatch):
    """Compose a 3-shot surgeon job to 50% on a tiny OPT (float64) read from local text files."""
    rng = random.Random(0)
    for name in ("calib", "eval"):
        (tmp_path / f"{name}.txt").write_text("".join(rng.choice("abcdefgh ") for _ in range(2000)))
    monkeypatch.setattr(models, "load_tokenizer", lambda cfg: CharTokenizer())
    monkeypatch.setattr(models, "load_model", lambda cfg, device: tiny_model("opt"))
    small = ["data=text", f"data.calib_path={tmp_path}/calib.txt", f"data.eval_path={tmp_path}/eval.txt",
             f"model.name_or_path={tmp_path}", "structure=unstructured", "target=0.5", "shots=3", "calib.n=4",
             f"calib.seq_len={T}", "calib.batch_size=2", f"eval.seq_len={T}", "eval.max_windows=2",
             f"results={tmp_path}/records.jsonl"]
    return lambda *overrides: compose([*small, *overrides])


def spy_shots(monkeypatch, calls, interrupt_at=None):
    """Record (shot, target) of every prune_shot the runner makes; raise instead of running `interrupt_at`."""
    def spy(model, layers, batches, state, target, opts, *, seed, **kw):
        shot = seed  # the runner passes seed = cfg.seed + shot, and cfg.seed = 0
        if shot == interrupt_at:
            raise Interrupted(f"interrupted before shot {shot}")
        calls.append((shot, target))
        return prune_shot(model, layers, batches, state, target, opts, seed=seed, **kw)

    monkeypatch.setattr(runner, "prune_shot", spy)


def test_runner_prunes_each_shot_to_its_scheduled_target(job, tmp_path, monkeypatch):
    """Shot t of T prunes to the linear schedule's s t / T, not to the final target s."""
    calls = []
    spy_shots(monkeypatch, calls)
    record = runner.run(job(), tmp_path / "run")
    expected = [0.5 / 3, 1.0 / 3, 0.5]
    assert [shot for shot, _ in calls] == [1, 2, 3]
    assert [target for _, target in calls] == pytest.approx(expected, abs=1e-12)
    total = record["protocol"]["prunable_params"]
    assert [p["sparsity"] for p in record["points"]] == pytest.approx(expected, abs=1 / total)


def test_runner_resume_runs_only_the_shots_after_the_checkpoint(job, tmp_path, monkeypatch):
    """Resume continues at shot k+1 after k finished shots and ends with the uninterrupted run's weights."""
    runner.run(job(), tmp_path / "full")
    calls = []
    spy_shots(monkeypatch, calls, interrupt_at=3)
    with pytest.raises(Interrupted):
        runner.run(job(), tmp_path / "resumed")
    assert [shot for shot, _ in calls] == [1, 2]
    calls.clear()
    spy_shots(monkeypatch, calls)
    record = runner.run(job("resume=true"), tmp_path / "resumed")
    assert [shot for shot, _ in calls] == [3]
    assert record["status"] == "complete" and record["resumed_from_shot"] == 2
    assert [p["shot"] for p in record["points"]] == [1, 2, 3]
    full = torch.load(tmp_path / "full" / runner.CHECKPOINT, weights_only=False)["weights"]
    resumed = torch.load(tmp_path / "resumed" / runner.CHECKPOINT, weights_only=False)["weights"]
    for name, tensors in full.items():
        for key, value in tensors.items():
            torch.testing.assert_close(resumed[name][key], value, rtol=0, atol=1e-12)
