"""KFAC factors from hooks against per-token gradients computed one sequence at a time."""
import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, LlamaConfig, OPTConfig, Phi3Config

from surgeon.adapters import adapter_for
from surgeon.curvature import estimate_curvature, sequence_loss

N, T, V = 6, 8, 64


def tiny_model(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "opt":
        config = OPTConfig(
            vocab_size=V, hidden_size=32, word_embed_proj_dim=32, ffn_dim=48, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=T, enable_bias=True, init_std=0.2,
            dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        )
    elif family == "llama":
        config = LlamaConfig(
            vocab_size=V, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=T, initializer_range=0.2,
        )
    else:  # the fused layers: Phi-3 qkv_proj and gate_up_proj, GPT-2 Conv1D c_attn, GPT-NeoX query_key_value
        ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
        config = {
            "phi3": lambda: Phi3Config(vocab_size=V, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=T,
                                       initializer_range=0.2, **ids),
            "gpt2": lambda: GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=T,
                                       initializer_range=0.2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids),
            "gpt_neox": lambda: GPTNeoXConfig(vocab_size=V, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                              num_attention_heads=4, max_position_embeddings=T, initializer_range=0.2,
                                              hidden_dropout=0.0, attention_dropout=0.0, **ids),
        }[family]()
    return AutoModelForCausalLM.from_config(config).to(torch.float64)


@pytest.fixture(scope="module", params=["opt", "llama", "phi3", "gpt2", "gpt_neox"])
def setup(request):
    model = tiny_model(request.param)
    layers = adapter_for(model.config.model_type).layers(model)
    ids = torch.randint(0, V, (N, T), generator=torch.Generator().manual_seed(1))
    return model, layers, ids, per_token_vectors(model, layers, ids)


def per_token_vectors(model, layers, ids):
    """{layer name: (a (N*T, C'), g (N*T, R))}: inputs captured by hooks, g by autograd of each
    sequence's own mean next-token CE w.r.t. each layer's output, read off position by position."""
    inputs, outputs = {}, {}

    def capture(name):
        def hook(module, args, output):
            inputs[name], outputs[name] = args[0].detach(), output
        return hook

    handles = [layer.module.register_forward_hook(capture(layer.name)) for layer in layers]
    a = {layer.name: [] for layer in layers}
    g = {layer.name: [] for layer in layers}
    try:
        for seq in ids:
            logits = model(input_ids=seq[None]).logits[0]
            logp = torch.log_softmax(logits[:-1], dim=-1)
            loss = -sum(logp[t, seq[t + 1]] for t in range(T - 1)) / (T - 1)
            grads = torch.autograd.grad(loss, [outputs[layer.name] for layer in layers])
            for layer, grad in zip(layers, grads):
                # OPT feeds its MLP (T, width) instead of (1, T, width)
                x_seq, g_seq = inputs[layer.name].reshape(T, -1), grad.reshape(T, -1)
                for t in range(T):
                    x = x_seq[t]
                    if layer.module.bias is not None:
                        x = torch.cat([x, x.new_ones(1)])
                    a[layer.name].append(x)
                    g[layer.name].append(g_seq[t])
    finally:
        for handle in handles:
            handle.remove()
    model.zero_grad(set_to_none=True)
    return {name: (torch.stack(a[name]), torch.stack(g[name])) for name in a}


def outer_mean(vectors):
    return sum(torch.outer(v, v) for v in vectors) / len(vectors)


def dense_fisher(a, g):
    """(1/n) sum_t (g g^T) (x) (a a^T), vec(W) row-major."""
    return sum(torch.kron(torch.outer(gt, gt), torch.outer(at, at)) for at, gt in zip(a, g)) / len(a)


def test_kfac_factors_match_per_token_gradients(setup):
    model, layers, ids, vectors = setup
    factors = estimate_curvature(model, layers, list(ids.split(3)))
    assert set(factors) == {layer.name for layer in layers}
    for layer in layers:
        a, g = vectors[layer.name]
        f = factors[layer.name]
        assert f.A.dtype == torch.float64 and f.A2 is None and f.G2 is None
        torch.testing.assert_close(f.A, outer_mean(a), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(f.G, outer_mean(g), rtol=1e-10, atol=1e-14)
        assert f.G.abs().max() > 1e-6  # gradients are not trivially zero


def test_bias_folded_as_trailing_constant_input(setup):
    model, layers, ids, _ = setup
    factors = estimate_curvature(model, layers, [ids])
    for layer in layers:
        A = factors[layer.name].A
        C = layer.in_features
        if layer.module.bias is None:
            assert A.shape == (C, C)
            continue
        assert A.shape == (C + 1, C + 1)
        assert A[-1, -1].item() == pytest.approx(1.0, abs=1e-12)
        # the bias row of A is the mean input, read off the layer's inputs independently
        x = []
        handle = layer.module.register_forward_hook(lambda m, i, o: x.append(i[0].detach()) and None)
        try:
            with torch.no_grad():
                model(input_ids=ids)
        finally:
            handle.remove()
        torch.testing.assert_close(A[-1, :C], x[0].reshape(-1, C).mean(0), rtol=1e-10, atol=1e-12)


def test_batching_invariance(setup):
    model, layers, ids, _ = setup
    for rank in (1, 2):
        one = estimate_curvature(model, layers, list(ids.split(1)), rank=rank)
        three = estimate_curvature(model, layers, list(ids.split(3)), rank=rank)
        for layer in layers:
            for key in ("A", "G", "A2", "G2") if rank == 2 else ("A", "G"):
                torch.testing.assert_close(
                    getattr(one[layer.name], key), getattr(three[layer.name], key), rtol=1e-9, atol=1e-13
                )


def test_diag_a_and_identity_kinds(setup):
    model, layers, ids, vectors = setup
    diag = estimate_curvature(model, layers, list(ids.split(2)), kind="diag_a")
    # identity curvature needs no pass: batches that would fail in a forward are never used
    ident = estimate_curvature(model, layers, [torch.full((1, T), V + 5)], kind="identity")
    for layer in layers:
        a, _ = vectors[layer.name]
        R, C = layer.out_features, a.shape[1]
        # diagonal curvatures are kept as their diagonals, never as C x C matrices
        torch.testing.assert_close(diag[layer.name].A, (a * a).mean(0), rtol=1e-10, atol=1e-12)
        assert torch.equal(diag[layer.name].G, torch.ones(R, dtype=torch.float64))
        assert torch.equal(ident[layer.name].A, torch.ones(C, dtype=torch.float64))
        assert torch.equal(ident[layer.name].G, torch.ones(R, dtype=torch.float64))
        assert torch.equal(ident[layer.name].dense().A, torch.eye(C, dtype=torch.float64))
        assert torch.equal(diag[layer.name].dense().G, torch.eye(R, dtype=torch.float64))


@pytest.mark.parametrize("kind", ["kfac", "diag_a"])
def test_layers_reading_one_input_share_one_A(setup, kind):
    """q/k/v (and Llama's gate/up) read the same tensor: their A is accumulated once and stored once, and
    equals what each layer's own inputs give."""
    model, layers, ids, vectors = setup
    factors = estimate_curvature(model, layers, list(ids.split(2)), kind=kind)
    groups = {}
    for layer in layers:
        groups.setdefault(factors[layer.name].A.data_ptr(), []).append(layer.type)
        a, _ = vectors[layer.name]
        expected = (a * a).mean(0) if kind == "diag_a" else a.T @ a / len(a)
        torch.testing.assert_close(factors[layer.name].A, expected, rtol=1e-10, atol=1e-12)
    shared = sorted(sorted(types) for types in groups.values() if len(types) > 1)
    if model.config.model_type == "opt":
        assert shared == [["k", "q", "v"]] * 2
    elif model.config.model_type == "llama":
        assert shared == [["gate", "up"]] * 2 + [["k", "q", "v"]] * 2
    else:  # a fused layer is one layer with one A
        assert shared == []


def test_sampled_fisher_is_seeded_and_differs_from_empirical(setup):
    model, layers, ids, _ = setup
    batches = list(ids.split(3))
    empirical = estimate_curvature(model, layers, batches)
    first = estimate_curvature(model, layers, batches, fisher="sampled", seed=3)
    again = estimate_curvature(model, layers, batches, fisher="sampled", seed=3)
    other = estimate_curvature(model, layers, batches, fisher="sampled", seed=4)
    for layer in layers:
        name = layer.name
        assert torch.equal(first[name].G, again[name].G)
        torch.testing.assert_close(first[name].A, empirical[name].A, rtol=1e-12, atol=1e-14)
        scale = empirical[name].G.abs().max()
        assert (first[name].G - empirical[name].G).abs().max() > 1e-3 * scale
        assert (first[name].G - other[name].G).abs().max() > 1e-3 * scale


def rearranged(M, R, C):
    """Van Loan-Pitsianis: M[(i,k),(j,l)] -> M~[(i,j),(k,l)], so kron(G, A) -> vec(G) vec(A)^T."""
    return M.reshape(R, C, R, C).permute(0, 2, 1, 3).reshape(R * R, C * C)


def test_rank2_term_fits_the_per_token_fisher(setup):
    model, layers, ids, vectors = setup
    layer = next(layer for layer in layers if layer.type in ("k", "qkv"))  # qkv: fused
    a, g = vectors[layer.name]
    R, C = g.shape[1], a.shape[1]
    batches = list(ids.split(3))
    few = estimate_curvature(model, [layer], batches, rank=2, rank2_iters=3)[layer.name]
    many = estimate_curvature(model, [layer], batches, rank=2, rank2_iters=100)[layer.name]
    residual = dense_fisher(a, g) - torch.kron(few.G, few.A)
    # best Kronecker term of the residual: leading singular pair of its rearrangement
    sigma = torch.linalg.svdvals(rearranged(residual, R, C))
    optimum = (torch.linalg.matrix_norm(residual) ** 2 - sigma[0] ** 2).sqrt()
    for f, slack in ((few, 0.05), (many, 1e-6)):
        torch.testing.assert_close(f.G2, f.G2.T, rtol=0, atol=0)
        torch.testing.assert_close(f.A2, f.A2.T, rtol=0, atol=0)
        torch.testing.assert_close(torch.linalg.matrix_norm(f.G2), torch.linalg.matrix_norm(f.A2))
        fit = torch.linalg.matrix_norm(residual - torch.kron(f.G2, f.A2))
        assert fit < torch.linalg.matrix_norm(residual)
        assert fit <= optimum * (1 + slack)
    # the second term is indefinite, as the rank-2 inverse must allow
    eigenvalues = torch.linalg.eigvalsh(many.A2)
    assert eigenvalues.min() < 0 < eigenvalues.max()


def test_hooks_removed_and_requires_grad_restored(setup):
    model, layers, ids, _ = setup
    model.train()
    flags = {name: i % 3 != 0 for i, (name, _) in enumerate(model.named_parameters())}
    for name, p in model.named_parameters():
        p.requires_grad_(flags[name])

    def clean():
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
        assert all(p.grad is None for p in model.parameters())
        assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
        assert model.training

    estimate_curvature(model, layers, [ids], rank=2, rank2_iters=1, fisher="sampled")
    clean()
    with pytest.raises(IndexError):
        estimate_curvature(model, layers, [torch.full((1, T), V + 5)])
    clean()
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()


def test_bad_arguments_raise(setup):
    model, layers, ids, _ = setup
    with pytest.raises(ValueError, match=r"curvature\.rank.*\[1, 2\]"):
        estimate_curvature(model, layers, [ids], rank=3)
    with pytest.raises(ValueError, match=r"curvature\.kind"):
        estimate_curvature(model, layers, [ids], kind="full")
    with pytest.raises(ValueError, match=r"curvature\.fisher"):
        estimate_curvature(model, layers, [ids], fisher="true")


def test_float32_model_gives_float32_factors():
    model = tiny_model("opt").float()
    layers = adapter_for("opt").layers(model)
    ids = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(3))
    f = estimate_curvature(model, layers, [ids], rank=2, rank2_iters=1)[layers[0].name]
    assert {t.dtype for t in (f.A, f.G, f.A2, f.G2)} == {torch.float32}


def test_sequence_loss_sums_per_sequence_means(setup):
    model, _, ids, _ = setup
    with torch.no_grad():
        # transformers computes its loss in float32 even for a float64 model
        expected = sum(model(input_ids=seq[None], labels=seq[None]).loss.double() for seq in ids[:3])
        torch.testing.assert_close(sequence_loss(model, ids[:3]), expected, rtol=1e-6, atol=0)



def test_rank2_of_a_fully_pruned_layer_is_zero_not_nan():
    """A layer whose weights are all removed has no gradient signal: its second term is 0, not NaN."""
    model = tiny_model("opt")
    layers = adapter_for(model.config.model_type).layers(model)
    q = layers[0].module
    with torch.no_grad():  # rows removed with their biases: the output of q is exactly zero
        q.weight.zero_()
        q.bias.zero_()
    k = next(l for l in layers if l.block == 0 and l.type == "k").module
    with torch.no_grad():
        k.weight.zero_()
        k.bias.zero_()
    ids = torch.randint(0, V, (N, T), generator=torch.Generator().manual_seed(1))
    factors = estimate_curvature(model, layers, [ids], rank=2, rank2_iters=2)
    for f in factors.values():
        assert torch.isfinite(f.A2).all() and torch.isfinite(f.G2).all()
    # zeroing q and k makes attention uniform: no gradient flows into either
    assert torch.count_nonzero(factors[layers[0].name].G2) == 0


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_pass_precision_changes_matmuls_not_statistics(setup, precision):
    """bf16 autocast changes the factors by bfloat16 rounding only (statistics stay float32); tf32 is a no-op off
    CUDA; both leave the TF32 flags as they were."""
    model, layers, ids, _ = setup
    model = model.float()
    layers = adapter_for(model.config.model_type).layers(model)
    batches = list(ids.split(3))
    flags = torch.backends.cuda.matmul.allow_tf32
    exact = estimate_curvature(model, layers, batches)
    fast = estimate_curvature(model, layers, batches, precision=precision)
    assert torch.backends.cuda.matmul.allow_tf32 == flags
    changed = []
    for layer in layers:
        for key in ("A", "G"):
            got, want = getattr(fast[layer.name], key), getattr(exact[layer.name], key)
            assert got.dtype == torch.float32
            if precision == "tf32":
                assert torch.equal(got, want)
            else:
                torch.testing.assert_close(got, want, rtol=0.1, atol=0.05 * want.abs().max().item())
                changed.append(not torch.equal(got, want))
    assert precision == "tf32" or sum(changed) > len(changed) / 2  # the matmuls did run in bfloat16
    with pytest.raises(ValueError, match="precision"):
        estimate_curvature(model, layers, batches, precision="fp8")
    model.double()


def test_offloaded_factors_are_summed_on_the_host(setup):
    """curvature.offload=cpu: the same factors, held in host memory (on a GPU machine the pass runs on the device)."""
    model, layers, ids, _ = setup
    batches = list(ids.split(3))
    on_device, offloaded = (estimate_curvature(model, layers, batches, offload=o) for o in ("none", "cpu"))
    for layer in layers:
        assert offloaded[layer.name].A.device.type == "cpu"
        torch.testing.assert_close(offloaded[layer.name].A, on_device[layer.name].A, rtol=0, atol=0)
        torch.testing.assert_close(offloaded[layer.name].G, on_device[layer.name].G, rtol=0, atol=0)
    with pytest.raises(ValueError, match="rank 1"):
        estimate_curvature(model, layers, batches, offload="cpu", rank=2)
