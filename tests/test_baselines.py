import copy
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, OPTConfig

from surgeon.adapters import adapter_for
from surgeon.baselines import (prune_layerwise, sparsegpt_layer, sparsegpt_update_fixed_mask, wanda_layer,
                               wanda_scores)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
R, C, T = 6, 12, 40
PERCDAMP = 0.01


def problem(seed, device="cpu"):
    """W (R, C), correlated inputs X (C, T), H = X X^T, float64."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(R, C, generator=g, dtype=torch.float64)
    X = torch.randn(C, C, generator=g, dtype=torch.float64) @ torch.randn(C, T, generator=g, dtype=torch.float64)
    return W.to(device), X.to(device), (X @ X.T).to(device)


def damped_inputs(X, percdamp=PERCDAMP):
    """Xa with Xa Xa^T = X X^T + percdamp * mean(diag) * I: least squares on Xa is OBS on the damped H."""
    lam = percdamp * (X * X).sum(1).mean()
    return torch.cat([X, lam.sqrt() * torch.eye(X.shape[0], dtype=X.dtype)], dim=1)


def error(W_new, W, Xa):
    return ((W_new - W) @ Xa).square().sum(1)


def sequential_obs(W, X, removed):
    """Per row, column by column: a removed weight goes to 0 and every later weight is re-fit by
    least squares given the earlier ones (SparseGPT's OBS sweep), without any Cholesky factor."""
    Xa = damped_inputs(X)
    out = W.clone()
    for r in range(W.shape[0]):
        e = torch.zeros(W.shape[1], dtype=W.dtype)
        for j in range(W.shape[1]):
            if removed[r, j]:
                e[j] = -W[r, j]
                if j + 1 < W.shape[1]:
                    target = -(Xa[: j + 1].T @ e[: j + 1])
                    e[j + 1:] = torch.linalg.lstsq(Xa[j + 1:].T, target[:, None]).solution[:, 0]
        out[r] += e
    return out


def global_obs(W, X, removed):
    """Per row, argmin ||(w' - w) Xa|| with the removed entries of w' at 0 (all kept weights free)."""
    Xa = damped_inputs(X)
    out = torch.zeros_like(W)
    for r in range(W.shape[0]):
        kept = ~removed[r]
        out[r, kept] = torch.linalg.lstsq(Xa[kept].T, (Xa.T @ W[r])[:, None]).solution[:, 0]
    return out


def random_mask(seed, p=0.5, shape=(R, C)):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < p


def nm_random_subset(seed, m, per_group, shape=(R, C)):
    """A mask with exactly `per_group` random entries in every group of m inputs."""
    scores = torch.rand(shape[0], shape[1] // m, m, generator=torch.Generator().manual_seed(seed))
    idx = scores.argsort(dim=2)[..., :per_group]
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(2, idx, True).view(shape)


def assert_nm(mask, n, m):
    assert (mask.view(mask.shape[0], -1, m).sum(2) == m - n).all()


# ---------------------------------------------------------------- SparseGPT, fixed mask


@pytest.mark.parametrize("device", DEVICES)
def test_fixed_mask_sweep_is_sequential_obs(device):
    W, X, H = problem(0, device)
    removed = random_mask(1)
    W_new = sparsegpt_update_fixed_mask(W, H, removed.to(device), blocksize=1, percdamp=PERCDAMP)
    assert W_new.device.type == device
    expected = sequential_obs(W.cpu(), X.cpu(), removed)
    torch.testing.assert_close(W_new.cpu(), expected, atol=1e-10, rtol=0)
    assert (W_new.cpu()[removed] == 0).all()


@pytest.mark.parametrize("blocksize", [3, 5, 12, 128])
def test_fixed_mask_lazy_blocks_are_exact(blocksize):
    # With the mask fixed, lazy batching only regroups the same updates: equal up to rounding.
    W, X, H = problem(2)
    removed = random_mask(3)
    one = sparsegpt_update_fixed_mask(W, H, removed, blocksize=1)
    torch.testing.assert_close(sparsegpt_update_fixed_mask(W, H, removed, blocksize=blocksize), one,
                               atol=1e-10, rtol=0)


def test_fixed_mask_is_global_obs_when_removed_inputs_come_first():
    # The sweep freezes a weight once passed, so it is the global layer-wise OBS optimum exactly
    # when no kept weight precedes a removed one in its row; otherwise it is only an upper bound.
    W, X, H = problem(4)
    Xa = damped_inputs(X)
    prefix = torch.arange(C)[None, :] < torch.tensor([0, 1, 3, 6, 9, 12])[:, None]
    torch.testing.assert_close(sparsegpt_update_fixed_mask(W, H, prefix, blocksize=1), global_obs(W, X, prefix),
                               atol=1e-10, rtol=0)

    removed = random_mask(5)
    sweep, best = error(sparsegpt_update_fixed_mask(W, H, removed), W, Xa), error(global_obs(W, X, removed), W, Xa)
    assert (sweep >= best * (1 - 1e-12)).all()
    assert (sweep > best * 1.01).any()


def test_dead_inputs_are_zeroed_not_nan():
    W, X, _ = problem(6)
    X[[2, 7]] = 0
    W_new, removed = sparsegpt_layer(W, X @ X.T, None, sparsity=0.5, blocksize=4)
    assert torch.isfinite(W_new).all()
    assert (W_new[:, [2, 7]] == 0).all()
    assert int(removed.sum()) == R * C // 2
    W_new, removed = sparsegpt_layer(W, torch.zeros(C, C, dtype=W.dtype), None, sparsity=0.5)
    assert (W_new == 0).all() and int(removed.sum()) == R * C // 2


# ---------------------------------------------------------------- SparseGPT, mask chosen


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("blocksize", [1, 5, 128])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.77, 1.0])
def test_sparsegpt_unstructured_count(sparsity, blocksize, device):
    W, _, H = problem(7, device)
    W_new, removed = sparsegpt_layer(W, H, None, sparsity=sparsity, blocksize=blocksize)
    assert int(removed.sum()) == round(sparsity * R * C)
    assert (W_new[removed] == 0).all() and (W_new[~removed] != 0).all()
    # the weights are the sweep's own update for the mask it chose
    torch.testing.assert_close(W_new, sparsegpt_update_fixed_mask(W, H, removed, blocksize=blocksize),
                               atol=1e-12, rtol=0)


def test_sparsegpt_single_block_mask_is_obs_saliency():
    # One block: the mask is chosen before any update, by w_c^2 / [(H_d[c:, c:])^-1]_00, the OBS
    # saliency of w_c with the earlier inputs frozen.
    W, _, H = problem(8)
    Hd = H + PERCDAMP * H.diagonal().mean() * torch.eye(C, dtype=H.dtype)
    hinv = torch.tensor([torch.linalg.inv(Hd[c:, c:])[0, 0] for c in range(C)], dtype=H.dtype)
    saliency = W.square() / hinv
    k = round(0.4 * R * C)
    expected = saliency <= saliency.flatten().sort().values[k - 1]
    _, removed = sparsegpt_layer(W, H, None, sparsity=0.4, blocksize=C)
    assert torch.equal(removed, expected)


def test_sparsegpt_blocks_share_the_new_removals():
    W, _, H = problem(9)
    _, removed = sparsegpt_layer(W, H, None, sparsity=0.5, blocksize=4)
    assert removed.view(R, 3, 4).sum((0, 2)).tolist() == [12, 12, 12]


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.9])
def test_sparsegpt_keeps_removed_before(sparsity):
    W, _, H = problem(10)
    before = random_mask(11, p=0.3)
    W = W.masked_fill(before, 0)
    W_new, removed = sparsegpt_layer(W, H, before, sparsity=sparsity, blocksize=5)
    assert (removed >= before).all()
    assert int(removed.sum()) == max(round(sparsity * R * C), int(before.sum()))
    assert (W_new[removed] == 0).all()


def test_sparsegpt_beats_magnitude_on_reconstruction():
    W, X, H = problem(12)
    Xa = damped_inputs(X)
    W_new, removed = sparsegpt_layer(W, H, None, sparsity=0.5, blocksize=4)
    magnitude = W.masked_fill(W.abs() <= W.abs().flatten().sort().values[R * C // 2 - 1], 0)
    assert error(W_new, W, Xa).sum() < 0.5 * error(magnitude, W, Xa).sum()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (3, 6)])
def test_sparsegpt_nm(n, m, device):
    W, _, H = problem(13, device)
    W_new, removed = sparsegpt_layer(W, H, None, sparsity=0.0, n=n, m=m, blocksize=12)
    assert_nm(removed, n, m)
    assert (W_new[removed] == 0).all()
    torch.testing.assert_close(W_new, sparsegpt_update_fixed_mask(W, H, removed, blocksize=12),
                               atol=1e-12, rtol=0)


def test_sparsegpt_nm_ties_and_removed_before():
    W, H = torch.ones(R, C, dtype=torch.float64), torch.eye(C, dtype=torch.float64)
    W_new, removed = sparsegpt_layer(W, H, None, sparsity=0.5, n=2, m=4, blocksize=4)
    assert_nm(removed, 2, 4)
    before = nm_random_subset(14, 4, 1)
    _, removed = sparsegpt_layer(W, H, before, sparsity=0.5, n=2, m=4, blocksize=8)
    assert_nm(removed, 2, 4)
    assert (removed >= before).all()


def test_sparsegpt_unstructured_ties():
    W, H = torch.ones(R, C, dtype=torch.float64), torch.eye(C, dtype=torch.float64)
    _, removed = sparsegpt_layer(W, H, None, sparsity=0.5, blocksize=5)
    assert int(removed.sum()) == R * C // 2


@pytest.mark.parametrize("kwargs", [dict(n=2, m=5), dict(n=4, m=4), dict(n=2, m=4, blocksize=6),
                                    dict(sparsity=1.5)])
def test_sparsegpt_rejects_bad_structure(kwargs):
    W, _, H = problem(15)
    with pytest.raises(ValueError):
        sparsegpt_layer(W, H, None, **{"sparsity": 0.5, **kwargs})


# ---------------------------------------------------------------- Wanda


def test_wanda_scores_by_hand():
    g = torch.Generator().manual_seed(16)
    W = torch.randn(3, 5, generator=g, dtype=torch.float64)
    inputs = torch.randn(7, 5, generator=g, dtype=torch.float64)  # 7 calibration tokens
    x_norm = torch.linalg.vector_norm(inputs, dim=0)
    scores = wanda_scores(W, x_norm)
    for r in range(3):
        for c in range(5):
            by_hand = abs(W[r, c].item()) * math.sqrt(sum(inputs[t, c].item() ** 2 for t in range(7)))
            assert scores[r, c].item() == pytest.approx(by_hand, rel=1e-14)


def wanda_problem(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(R, C, generator=g, dtype=torch.float64), torch.rand(C, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.6, 1.0])
def test_wanda_unstructured_per_row(sparsity, device):
    W, x_norm = wanda_problem(17)
    W_new, removed = wanda_layer(W.to(device), x_norm.to(device), None, sparsity=sparsity)
    W_new, removed = W_new.cpu(), removed.cpu()
    scores = W.abs() * x_norm
    for r in range(R):
        assert int(removed[r].sum()) == round(sparsity * C)
        if 0 < removed[r].sum() < C:
            assert scores[r][removed[r]].max() < scores[r][~removed[r]].min()
    torch.testing.assert_close(W_new, W.masked_fill(removed, 0), atol=0, rtol=0)


def test_wanda_keeps_removed_before():
    W, x_norm = wanda_problem(18)
    before = random_mask(19, p=0.4)
    _, removed = wanda_layer(W, x_norm, before, sparsity=0.5)
    assert (removed >= before).all()
    assert removed.sum(1).tolist() == before.sum(1).clamp(min=C // 2).tolist()


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (3, 6)])
def test_wanda_nm(n, m):
    W, x_norm = wanda_problem(20)
    _, removed = wanda_layer(W, x_norm, None, sparsity=0.0, n=n, m=m)
    assert_nm(removed, n, m)
    scores = (W.abs() * x_norm).view(R, -1, m)
    groups = removed.view(R, -1, m)
    for r in range(R):
        for b in range(C // m):
            assert scores[r, b][groups[r, b]].max() < scores[r, b][~groups[r, b]].min()


def test_wanda_nm_ties_and_removed_before():
    W, x_norm = torch.ones(R, C, dtype=torch.float64), torch.ones(C, dtype=torch.float64)
    _, removed = wanda_layer(W, x_norm, None, sparsity=0.5, n=2, m=4)
    assert_nm(removed, 2, 4)
    for per_group in (2, 3):  # 3: more already removed than N:M removes stays removed
        before = nm_random_subset(21, 4, per_group)
        _, removed = wanda_layer(W, x_norm, before, sparsity=0.5, n=2, m=4)
        assert torch.equal(removed, before)


# ---------------------------------------------------------------- through a model


def tiny_model(kind, device="cpu"):
    torch.manual_seed(0)
    if kind == "opt":
        config = OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                           max_position_embeddings=64, word_embed_proj_dim=32)
    else:
        config = LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    # float64: the checks below recompute statistics in another summation order
    return AutoModelForCausalLM.from_config(config).to(device=device, dtype=torch.float64).eval()


def tiny_batches():
    g = torch.Generator().manual_seed(22)
    return [torch.randint(0, 64, (2, 12), generator=g) for _ in range(3)]


def logits(model, batches):
    device = model.get_input_embeddings().weight.device
    with torch.no_grad():
        return [model(ids.to(device)).logits for ids in batches]


STRUCTURES = {"unstructured": dict(sparsity=0.5), "2:4": dict(sparsity=0.5, n=2, m=4)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("structure", list(STRUCTURES))
@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
@pytest.mark.parametrize("kind", ["opt", "llama"])
def test_prune_layerwise_runs(kind, method, structure, device):
    model = tiny_model(kind, device)
    layers = adapter_for(model.config.model_type).layers(model)
    biases = {layer.name: layer.module.bias.clone() for layer in layers if layer.module.bias is not None}
    masks = prune_layerwise(model, layers, tiny_batches(), method=method, blocksize=16, **STRUCTURES[structure])
    assert set(masks) == {layer.name for layer in layers}
    for layer in layers:
        mask, weight = masks[layer.name], layer.module.weight
        Rl, Cl = weight.shape
        if structure == "2:4":
            assert_nm(mask, 2, 4)
        elif method == "sparsegpt":
            assert int(mask.sum()) == round(0.5 * Rl * Cl)
        else:
            assert (mask.sum(1) == round(0.5 * Cl)).all()
        assert (weight[mask] == 0).all()
        if layer.name in biases:
            assert torch.equal(layer.module.bias, biases[layer.name])
    assert all(torch.isfinite(out).all() for out in logits(model, tiny_batches()))


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_prune_layerwise_low_precision_model(method):
    model = tiny_model("llama").to(torch.bfloat16)
    layers = adapter_for("llama").layers(model)
    masks = prune_layerwise(model, layers, tiny_batches(), method=method, sparsity=0.5, n=2, m=4)
    for layer in layers:
        assert layer.module.weight.dtype == torch.bfloat16
        assert_nm(masks[layer.name], 2, 4)
        assert (layer.module.weight[masks[layer.name]] == 0).all()
    assert all(torch.isfinite(out).all() for out in logits(model, tiny_batches()))


def capture_layer_inputs(model, layers, batches):
    """All tokens' inputs of each layer in a plain forward, as (tokens, Cw)."""
    seen = {layer.name: [] for layer in layers}
    handles = [layer.module.register_forward_hook(
        lambda mod, args, out, name=layer.name: seen[name].append(args[0].reshape(-1, args[0].shape[-1])))
        for layer in layers]
    logits(model, batches)
    for handle in handles:
        handle.remove()
    return {name: torch.cat(xs) for name, xs in seen.items()}


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
@pytest.mark.parametrize("kind", ["opt", "llama"])
def test_prune_layerwise_statistics_come_from_pruned_predecessors(kind, method):
    # Each block b must be pruned from the inputs a model with blocks < b pruned and blocks >= b
    # dense gives its layers: rebuild that model and prune block b's layers one by one here.
    dense = tiny_model(kind)
    pruned = copy.deepcopy(dense)
    adapter = adapter_for(dense.config.model_type)
    batches = tiny_batches()
    masks = prune_layerwise(pruned, adapter.layers(pruned), batches, method=method, sparsity=0.5, blocksize=8)
    for b in range(2):
        hybrid = copy.deepcopy(dense)
        for i in range(b):
            adapter.blocks(hybrid)[i].load_state_dict(adapter.blocks(pruned)[i].state_dict())
        block_layers = [layer for layer in adapter.layers(hybrid) if layer.block == b]
        inputs = capture_layer_inputs(hybrid, block_layers, batches)
        for layer in block_layers:
            x, W = inputs[layer.name], layer.module.weight.detach()
            if method == "sparsegpt":
                W_new, mask = sparsegpt_layer(W, x.T @ x, None, sparsity=0.5, blocksize=8)
            else:
                W_new, mask = wanda_layer(W, torch.linalg.vector_norm(x, dim=0), None, sparsity=0.5)
            assert torch.equal(masks[layer.name], mask)
            torch.testing.assert_close(pruned.get_submodule(layer.name).weight.detach(), W_new, atol=1e-9, rtol=0)


@pytest.mark.parametrize("kind", ["opt", "llama"])
def test_block_1_receives_pruned_block_0_output(kind):
    dense = tiny_model(kind)
    model = copy.deepcopy(dense)
    batches = tiny_batches()

    def record(model):
        seen = []
        block = adapter_for(model.config.model_type).blocks(model)[1]
        handle = block.register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()))
        return seen, handle

    during, handle = record(model)
    prune_layerwise(model, adapter_for(kind).layers(model), batches, method="sparsegpt", sparsity=0.5)
    handle.remove()
    after, handle = record(model)
    logits(model, batches)
    handle.remove()
    before, handle = record(dense)
    logits(dense, batches)
    handle.remove()
    for got, want, unpruned in zip(during[: len(batches)], after, before):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
        assert (got - unpruned).abs().max() > 1e-6


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_prune_layerwise_multi_shot_keeps_removed(method):
    model = tiny_model("opt")
    layers = adapter_for("opt").layers(model)
    first = prune_layerwise(model, layers, tiny_batches(), method=method, sparsity=0.25, blocksize=16)
    second = prune_layerwise(model, layers, tiny_batches(), method=method, sparsity=0.5, removed=first,
                             blocksize=16)
    for layer in layers:
        assert (second[layer.name] >= first[layer.name]).all()
        assert (layer.module.weight[second[layer.name]] == 0).all()
        Rl, Cl = layer.module.weight.shape
        if method == "sparsegpt":
            assert int(second[layer.name].sum()) == round(0.5 * Rl * Cl)
        else:
            assert (second[layer.name].sum(1) == round(0.5 * Cl)).all()


def test_prune_layerwise_rejects_unknown_method():
    model = tiny_model("opt")
    with pytest.raises(ValueError, match="method"):
        prune_layerwise(model, adapter_for("opt").layers(model), tiny_batches(), method="obs", sparsity=0.5)
