"""Mixture-of-experts families (surgeon/moe.py): the routed forward equals transformers' own; each routed expert's
Kronecker factors equal the sums over the tokens routed to it, computed by hand from the same forward and
backward; its element and row updates equal the dense OBS solve; an expert no token reaches is kept, never NaN."""
import copy

import pytest
import torch
import torch.nn.functional as F
import transformers as T

from surgeon.adapters import adapter_for
from surgeon.curvature import estimate_curvature

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
SEQ = 8


def tiny(model_type: str, dtype=torch.float64, hidden: int = 8, units: int = 4, experts: int = 4):
    """A one-block model: 4 experts of `units` hidden units, top-2 routing, eager experts (float64 runs eager)."""
    ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    common = dict(vocab_size=32, hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                  max_position_embeddings=32, num_experts_per_tok=2, initializer_range=0.3, **ids)
    config = {
        "mixtral": lambda: T.MixtralConfig(intermediate_size=units, num_local_experts=experts, **common),
        "olmoe": lambda: T.OlmoeConfig(intermediate_size=units, num_experts=experts, **common),
        "qwen2_moe": lambda: T.Qwen2MoeConfig(intermediate_size=12, moe_intermediate_size=units,
                                              shared_expert_intermediate_size=6, num_experts=experts, **common),
        "qwen3_moe": lambda: T.Qwen3MoeConfig(intermediate_size=12, moe_intermediate_size=units, num_experts=experts,
                                              head_dim=4, **common),
    }[model_type]()
    if dtype == torch.float64:
        config._experts_implementation = "eager"  # transformers' grouped_mm kernel has no float64
    torch.manual_seed(0)
    return T.AutoModelForCausalLM.from_config(config).to(dtype).eval()


def ids(n=6, seed=1):
    return torch.randint(0, 32, (n, SEQ), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("model_type", FAMILIES)
def test_routed_forward_equals_transformers_own(model_type):
    """Once surgeon has made the experts prunable layers, the model computes what transformers' stock experts
    forward computes (its default grouped_mm kernel in float32 to 1e-6, its eager loop in float64 exactly); the
    state dict (what save_pretrained writes) keeps its stock keys."""
    for dtype, tol in ((torch.float32, 1e-6), (torch.float64, 0.0)):
        model = tiny(model_type, dtype)
        stock = copy.deepcopy(model)
        keys = list(model.state_dict())
        layers = adapter_for(model_type).layers(model)
        experts = [layer for layer in layers if layer.expert is not None]
        assert len(experts) == 8 and {layer.type for layer in experts} == {"expert_gate_up", "expert_down"}
        with torch.no_grad():
            got, want = model(input_ids=ids()).logits, stock(input_ids=ids()).logits
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
        assert list(model.state_dict()) == keys
        # an expert layer's weight is a view of the fused parameter: writes go through
        fused = model.model.layers[0].mlp.experts
        for layer, param in zip(experts[2:4], (fused.gate_up_proj, fused.down_proj)):  # expert 1's two layers
            with torch.no_grad():
                layer.weight[0, 0] = 7.0
            assert param[1, 0, 0] == 7.0 and (param[0] != 7.0).all(), layer.name


def by_hand(model, batch):
    """Per expert e: (inputs of its tokens, gate|up output gradients, hidden units, down output gradients) over all
    sequences, from a forward written out here (not through surgeon's modules) and autograd of each sequence's
    mean next-token CE; and the total token count."""
    experts = model.model.layers[0].mlp.experts
    E = experts.gate_up_proj.shape[0]
    rec = {e: {"x": [], "gu": [], "h": [], "y": []} for e in range(E)}
    kept = []

    def forward(hidden, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden)
        for e in range(E):
            tok, pos = torch.where(top_k_index == e)
            if len(tok) == 0:
                continue
            x = hidden[tok]
            gu = F.linear(x, experts.gate_up_proj[e])
            gate, up = gu.chunk(2, dim=-1)
            h = experts.act_fn(gate) * up
            y = F.linear(h, experts.down_proj[e])
            kept.append((e, x, gu, h, y))
            out.index_add_(0, tok, y * top_k_weights[tok, pos, None])
        return out

    experts.__dict__["forward"] = forward
    try:
        for seq in batch:
            kept.clear()
            logits = model(input_ids=seq[None]).logits[0]
            loss = F.cross_entropy(logits[:-1], seq[1:])
            grads = torch.autograd.grad(loss, [t for k in kept for t in (k[2], k[4])])
            for i, (e, x, gu, h, y) in enumerate(kept):
                rec[e]["x"].append(x.detach())
                rec[e]["h"].append(h.detach())
                rec[e]["gu"].append(grads[2 * i])
                rec[e]["y"].append(grads[2 * i + 1])
    finally:
        del experts.__dict__["forward"]
    return {e: {k: torch.cat(v) if v else None for k, v in r.items()} for e, r in rec.items()}, batch.numel()


@pytest.mark.parametrize("model_type", FAMILIES)
def test_expert_factors_are_sums_over_the_routed_tokens(model_type):
    """A = sum over the n_e routed tokens of a a^T / N (N: all tokens; the expert's share n_e / N of the loss's
    Fisher sits on A), G = sum of g g^T / n_e, g the gradient at the expert's output (the router weight
    included); for gate|up and for down; the recorded token count is n_e."""
    model = tiny(model_type)
    batch = ids()
    want, N = by_hand(copy.deepcopy(model), batch)
    layers = adapter_for(model_type).layers(model)
    factors = estimate_curvature(model, layers, list(batch.split(3)))
    seen = 0
    for layer in (l for l in layers if l.expert is not None):
        r, f = want[layer.expert], factors[layer.name]
        a, g = (r["x"], r["gu"]) if layer.type == "expert_gate_up" else (r["h"], r["y"])
        n = 0 if a is None else len(a)
        assert f.tokens == n
        if n == 0:
            assert (f.A == 0).all() and (f.G == 0).all()
            continue
        seen += 1
        torch.testing.assert_close(f.A, a.T @ a / N, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(f.G, g.T @ g / n, rtol=1e-10, atol=1e-15)
        assert f.G.abs().max() > 1e-8
    assert seen >= 6


def test_expert_updates_equal_the_dense_obs_solve():
    """An expert's element update (joint solve) and row/column update under its factors equal the brute-force
    OBS solve on kron(G_d, A_d) of that expert alone."""
    from test_obs import DA, DG, Dense

    from surgeon.adapters import weight_with_bias
    from surgeon.obs import LayerOBS

    model = tiny("mixtral")
    layers = adapter_for("mixtral").layers(model)
    factors = estimate_curvature(model, layers, list(ids().split(3)))
    for layer in [l for l in layers if l.expert == 1]:
        f = factors[layer.name]
        W = weight_with_bias(layer.module)
        o, d = LayerOBS(W, f.A, f.G, damping_a=DA, damping_g=DG, has_bias=False), Dense(W, f.A, f.G)
        R, C = W.shape
        removed = torch.zeros(R, C, dtype=torch.bool)
        removed[0, 1] = removed[2, 0] = removed[R - 1, C - 1] = True
        want = d.full(d.theta + d.delta(d.q_mask(removed)), removed)
        got, _ = o.update_elements_joint(removed, tol=1e-13, max_iter=500)
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)
        rows, cols = torch.zeros(R, dtype=torch.bool), torch.zeros(C, dtype=torch.bool)
        rows[1], cols[2] = True, True
        full = rows[:, None] | cols[None, :]
        want = d.full(d.theta + d.delta(d.q_mask(full)), full)
        torch.testing.assert_close(o.update_rows_cols(rows, cols), want, rtol=1e-10, atol=1e-12)


def starve(model, expert: int) -> None:
    """Route no token to `expert` (a model change for the test): the family's own router forward, with the
    expert's logit from its F.linear set to -inf."""
    router = model.model.layers[0].mlp.gate
    original, weight = type(router).forward, router.weight

    def forward(hidden_states):
        real = F.linear

        def linear(x, w, b=None):
            out = real(x, w, b)
            return out.index_fill(-1, torch.tensor([expert]), -torch.inf) if w is weight else out

        F.linear = linear
        try:
            return original(router, hidden_states)
        finally:
            F.linear = real

    router.__dict__["forward"] = forward


@pytest.mark.parametrize("method", ["surgeon", "kobd", "sparsegpt", "wanda"])
def test_an_expert_no_token_reaches_is_kept_and_nothing_is_nan(method):
    """With expert 3 never routed, LLM Surgeon / K-OBD keep it as it is (the global threshold takes the target
    from the others) and SparseGPT/Wanda prune it by magnitude to the layer's sparsity; no NaN anywhere; the
    shot records the experts' token counts (0 for expert 3)."""
    from surgeon.prune import PruneState, ShotOptions, prune_shot

    model = tiny("mixtral")
    starve(model, 3)
    layers = adapter_for("mixtral").layers(model)
    before = {l.name: l.weight.clone() for l in layers}
    opts = ShotOptions(method=method, kind={"kobd": "kfac", "surgeon": "kfac"}.get(method, "none"),
                       correlation="none" if method == "kobd" else "layer", damping_g=0.1, tol=1e-10)
    _, info = prune_shot(model, layers, list(ids().split(3)), PruneState.empty(layers), 0.5, opts)
    starved = [l for l in layers if l.expert == 3]
    for layer in layers:
        assert torch.isfinite(layer.weight).all(), layer.name
    if method in ("surgeon", "kobd"):
        for layer in starved:
            assert torch.equal(layer.weight, before[layer.name])
        assert info["expert_tokens"]["model.layers.0.mlp.experts.3"] == 0
        assert info["expert_tokens"]["model.layers.0.mlp.experts.0"] > 0
    else:
        for layer in starved:  # magnitude: what is kept is what it was, and no smaller than what went
            W, W0 = layer.weight, before[layer.name]
            kept = W != 0
            assert torch.equal(W[kept], W0[kept])  # H = I: no update either
            # SparseGPT chooses over the layer's (one) column block, Wanda within each row
            for keep, old in ([(kept, W0)] if method == "sparsegpt" else zip(kept, W0)):
                assert keep.float().mean() == pytest.approx(0.5) and old[keep].abs().min() >= old[~keep].abs().max()
    zeros = sum(int((l.weight == 0).sum()) for l in layers)
    assert zeros / sum(l.weight.numel() for l in layers) == pytest.approx(0.5, abs=0.01)


def _saved_tiny(tmp_path, model_type: str) -> list[str]:
    """A saved tiny random-init `model_type` model (tests/test_families.py's config) with the testbed tokenizer and
    20 kB of the testbed text: run.py's model and data overrides for it (skips without the testbed)."""
    from surgeon.config import shared_dir

    if not (shared_dir() / "models").is_dir():
        pytest.skip(f"testbed not found at {shared_dir()} (set SURGEON_SHARED)")
    from test_families import data, tiny_config

    tokenizer = T.AutoTokenizer.from_pretrained(shared_dir() / "models" / "llama-tiny-wt2")
    torch.manual_seed(0)
    T.AutoModelForCausalLM.from_config(tiny_config(model_type)).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    text = tmp_path / "text"
    text.mkdir()
    for split in ("valid", "test"):
        (text / f"{split}.txt").write_text((shared_dir() / "data" / "wikitext-2" / f"{split}.txt").read_text()[:20000])
    return [f"model.name_or_path={tmp_path / 'model'}", "model.name=tiny", *data({"text": text}), "calib.n=4",
            "calib.seq_len=32", "calib.batch_size=4", "eval.seq_len=32"]


def test_a_moe_run_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    """A qwen2_moe run (routed and shared experts) stopped after shot 2 of 3 resumes from its checkpoint: the
    experts' weights come back from it (their slices of the fused parameters) and the result is the
    uninterrupted run's; the record keeps each shot's expert token counts."""
    from conftest import compose

    from surgeon import runner

    args = [*_saved_tiny(tmp_path, "qwen2_moe"), "eval.max_windows=2", "shots=3",
            "structure=unstructured", "target=0.5", f"results={tmp_path}/records.jsonl"]
    full = runner.run(compose(args), tmp_path / "full")

    def stop(shot):
        if shot == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(runner, "_test_pause", stop)
    with pytest.raises(KeyboardInterrupt):
        runner.run(compose(args), tmp_path / "stopped")
    monkeypatch.undo()
    resumed = runner.run(compose([*args, "resume=true"]), tmp_path / "stopped")
    assert resumed["status"] == "complete" and resumed["resumed_from_shot"] == 2
    assert resumed["final_ppl"] == pytest.approx(full["final_ppl"], rel=1e-9)
    tokens = [p["expert_tokens"] for p in resumed["points"]]
    assert len(tokens) == 3 and all(len(t) == 4 for t in tokens)  # block 0's four experts (block 1 is dense)
    assert all(sum(t.values()) == 2 * 4 * 32 for t in tokens)  # top-2 of every calibration token


def test_upcycled_testbed_moe_starts_as_the_dense_model():
    """experiments/train_moe.py's starting point: every expert a copy of the block's MLP behind top-2 normalised
    routing computes the dense Llama testbed model (without the noise that lets the experts part)."""
    from surgeon.config import shared_dir

    if not (shared_dir() / "models").is_dir():
        pytest.skip(f"testbed not found at {shared_dir()} (set SURGEON_SHARED)")
    from experiments.train_moe import upcycle

    dense = T.AutoModelForCausalLM.from_pretrained(shared_dir() / "models" / "llama-tiny-wt2").eval()
    moe = upcycle(dense, 4, seed=0, noise=0.0).eval()
    batch = torch.randint(0, dense.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(moe(input_ids=batch).logits, dense(input_ids=batch).logits, rtol=1e-4, atol=1e-4)


def test_expert_allocation_reads_tokens_and_remaining_fractions_off_the_record():
    from experiments.plots import expert_allocation

    layers = [{"name": "model.layers.0.mlp.experts.0.gate_up", "block": 0, "shape": [4, 2], "sparsity": 0.5},
              {"name": "model.layers.0.mlp.experts.0.down", "block": 0, "shape": [2, 2], "sparsity": 1.0},
              {"name": "model.layers.0.mlp.experts.1.gate_up", "block": 0, "shape": [4, 2], "sparsity": 0.0},
              {"name": "model.layers.0.mlp.experts.1.down", "block": 0, "shape": [2, 2], "sparsity": 0.0},
              {"name": "model.layers.0.self_attn.q_proj", "block": 0, "shape": [2, 2], "sparsity": 0.25}]
    record = {"layers": layers, "points": [{"expert_tokens": {"model.layers.0.mlp.experts.0": 3,
                                                              "model.layers.0.mlp.experts.1": 5}},
                                           {"expert_tokens": {"model.layers.0.mlp.experts.0": 1,
                                                              "model.layers.0.mlp.experts.1": 7}}]}
    rows = {r["expert"]: r for r in expert_allocation(record)}
    assert rows["model.layers.0.mlp.experts.0"]["tokens"] == 4 and rows["model.layers.0.mlp.experts.1"]["tokens"] == 12
    assert rows["model.layers.0.mlp.experts.0"]["remaining"] == pytest.approx(4 / 12)
    assert rows["model.layers.0.mlp.experts.1"]["remaining"] == 1.0
    assert expert_allocation({"layers": layers[4:], "points": [{}]}) == []


def _moe_shots():
    """Two unstructured shots on a tiny Mixtral with expert 3 starved: the masks and expert token counts."""
    from surgeon.prune import PruneState, ShotOptions, prune_shot

    model = tiny("mixtral", torch.float32)
    starve(model, 3)
    layers = adapter_for("mixtral").layers(model)
    state, out = PruneState.empty(layers), []
    opts = ShotOptions(damping_g=0.1, tol=1e-8, max_iter=500, accumulate="float64")
    for shot in (1, 2):
        _, info = prune_shot(model, layers, list(ids(8).split(2)), state, 0.25 * shot, opts, seed=shot)
        out.append({"tokens": info["expert_tokens"], "masks": {k: v.tolist() for k, v in state.removed.items()}})
    return out


def test_two_processes_divide_the_experts_and_give_the_one_process_masks(tmp_path):
    """Two gloo processes, each with half the batches (an expert may see tokens in one share and none in the
    other; expert 3 sees none anywhere): the token counts add up over the ranks, nothing waits on a sum a rank
    did not make, and the masks are those of one process."""
    import json

    import torch.multiprocessing as mp
    from test_distributed import _balance_worker, _free_port

    mp.start_processes(_balance_worker, args=(_free_port(), str(tmp_path / "out"), _moe_shots), nprocs=2,
                       start_method="spawn")
    ranks = [json.loads((tmp_path / f"out.{rank}").read_text()) for rank in (0, 1)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = _moe_shots()
    finally:
        torch.set_num_threads(threads)
    for shots in ranks:
        for shot, alone in zip(shots, one):
            assert shot["tokens"] == alone["tokens"] and shot["tokens"]["model.layers.0.mlp.experts.3"] == 0
            assert shot["masks"] == alone["masks"]


# ------------------------------------------------------------------ moe.whole_experts: experts removed whole
@pytest.mark.parametrize("model_type", FAMILIES)
def test_masked_router_is_the_stock_router_over_the_experts_left(model_type):
    """surgeon.moe.masked_route with no mask is the family's router; with experts masked it is the router of a
    model holding only the others (its weight rows alone: softmax, top-k and renormalisation over them)."""
    from surgeon.moe import masked_route

    model = tiny(model_type, experts=6)
    router = model.model.layers[0].mlp.gate
    h = torch.randn(20, router.hidden_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    want = router(h)
    got = masked_route(router, h)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    removed = torch.tensor([False, True, False, False, True, False])
    router.__dict__["_surgeon_removed"] = removed
    logits, scores, index = masked_route(router, h)
    kept = (~removed).nonzero().squeeze(1)
    small = copy.deepcopy(router)
    small.__dict__.pop("_surgeon_removed")
    small.weight = torch.nn.Parameter(router.weight[kept])
    _, scores_small, index_small = small(h)
    assert torch.equal(index, kept[index_small]) and not removed[index].any()
    torch.testing.assert_close(scores, scores_small, rtol=1e-12, atol=1e-12)


def test_whole_expert_cost_is_the_quadratic_of_removing_every_weight():
    """LayerOBS.zero_cost = 1/2 vec(W)^T (G_d (x) A_d) vec(W), the dense quadratic (nothing left to update)."""
    from surgeon.obs import LayerOBS, damp

    g = torch.Generator().manual_seed(0)
    W = torch.randn(5, 7, dtype=torch.float64, generator=g)
    X, Y = torch.randn(7, 7, dtype=torch.float64, generator=g), torch.randn(5, 5, dtype=torch.float64, generator=g)
    A, G = X @ X.T, Y @ Y.T
    obs = LayerOBS(W, A, G, damping_a=0.01, damping_g=0.1, has_bias=False)
    F = torch.kron(damp(G, 0.1), damp(A, 0.01))
    w = W.flatten()
    assert obs.zero_cost().item() == pytest.approx(0.5 * (w @ F @ w).item(), rel=1e-12)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_rerouting_cost_equals_the_fisher_term_of_the_rerouted_output(model_type):
    """moe.Rerouting, measured in the curvature pass (two batches; one expert already removed, its router row
    masked) equals by brute force, per expert e left: 1/2 (1/N) sum_t (g_t . delta_t)^2 with g_t the gradient of
    the summed sequence losses at the block's routed output and delta_t the change of that output when the router
    also masks e (the stock experts forward on the re-routed choices), and with e's output zeroed instead. Covers
    renormalised (Mixtral, Qwen3-MoE) and plain top-k weights (Qwen2-MoE, OLMoE: every token's weights change)."""
    from surgeon.curvature import _next_token_loss
    from surgeon.moe import masked_route, measure_rerouting

    model = tiny(model_type, experts=6)
    layers = adapter_for(model_type).layers(model)
    mlp = model.model.layers[0].mlp
    router, experts = mlp.gate, mlp.experts
    removed = torch.tensor([False, False, False, True, False, False])
    with torch.no_grad():
        experts.gate_up_proj[3] = 0
        experts.down_proj[3] = 0
    router.__dict__["forward"] = masked_route.__get__(router)
    router.__dict__["_surgeon_removed"] = removed
    batches = [ids(6, 1), ids(5, 2)]

    seen = []
    def keep(module, inputs, out):
        if torch.is_grad_enabled():  # the loss's forward, not the re-routed ones below
            out.retain_grad()
            seen.append((inputs[0].detach(), out))

    handle = experts.register_forward_hook(keep)
    want_reroute, want_zero, N = torch.zeros(6, dtype=torch.float64), torch.zeros(6, dtype=torch.float64), 0
    for batch in batches:
        seen.clear()
        embeds = model.get_input_embeddings()(batch).detach().requires_grad_(True)
        logits = model(inputs_embeds=embeds, use_cache=False).logits
        _next_token_loss(logits, batch[:, 1:]).backward()
        (h, out), = seen
        g = out.grad
        N += h.shape[0]
        with torch.no_grad():
            _, top, index = masked_route(router, h)
            for e in (~removed).nonzero().squeeze(1).tolist():
                router.__dict__["_surgeon_removed"] = removed | (torch.arange(6) == e)
                _, top2, index2 = masked_route(router, h)
                router.__dict__["_surgeon_removed"] = removed
                delta = experts(h, index2, top2) - out
                want_reroute[e] += ((g * delta).sum(dim=1) ** 2).sum()
                saved = experts.down_proj[e].clone()
                experts.down_proj[e] = 0
                delta = experts(h, index, top) - out
                experts.down_proj[e] = saved
                want_zero[e] += ((g * delta).sum(dim=1) ** 2).sum()
    handle.remove()
    model.zero_grad(set_to_none=True)

    with measure_rerouting(layers, torch.float64) as found:
        estimate_curvature(model, layers, batches)
    assert "_surgeon_rerouting" not in experts.__dict__  # the measurement ends with the pass
    reroute, zero = found[0].costs()
    assert found[0].tokens.item() == N
    # the routers compute their probabilities in float32 even in a float64 model: the re-routed weights
    # (renormalised here, recomputed by the router there) agree to float32 rounding (a wrong weight is off by O(1))
    torch.testing.assert_close(reroute, 0.5 * want_reroute / N, rtol=1e-6, atol=1e-15)
    torch.testing.assert_close(zero, 0.5 * want_zero / N, rtol=1e-6, atol=1e-15)  # Mixtral keeps float32 weights
    assert reroute[3] == 0 and zero[3] == 0 and (reroute[~removed] > 0).all()
    assert not torch.allclose(reroute, zero)


def _prefix_by_hand(rows, cols, whole, budget):
    """The largest prefix of all candidates by cost (rows and columns per layer, whole units per group), in a
    plain loop: each row adds its unremoved columns' weights, each column its unremoved rows', each unit its size."""
    items = []
    for name in rows:
        items += [(c, 0, name, "row", i) for i, c in enumerate(rows[name].tolist())]
        items += [(c, 0, name, "col", j) for j, c in enumerate(cols[name].tolist())]
    for name, w in whole.items():
        per = w.costs if w.parts is None else w.costs / w.parts  # a unit at its cost per part
        items += [(c, 1, name, "unit", k) for k, c in enumerate(per.tolist()) if w.candidate[k]]
    items.sort(key=lambda t: t[0])
    taken = {(n, kind): set() for n in rows for kind in ("row", "col")} | {(n, "unit"): set() for n in whole}
    total = 0
    for cost, _, name, kind, i in items:
        if kind == "unit":
            add = int(whole[name].sizes[i])
        else:
            R, C = len(rows[name]), len(cols[name])
            other = len(taken[name, "col" if kind == "row" else "row"])
            add = (C if kind == "row" else R) - other
        if total + add > budget:
            if kind == "unit":  # a unit that does not fit is passed over; a row or column ends the order
                continue
            break
        total += add
        taken[name, kind].add(i)
    return taken


def test_whole_units_join_the_global_threshold_as_a_prefix_by_cost():
    """select_structured with `whole` groups: the rows, columns and units chosen are the largest prefix of the
    merged cost order (checked by a plain loop); units that are no candidates are never chosen."""
    from surgeon.selection import Whole, select_structured

    g = torch.Generator().manual_seed(5)
    rows = {"a": torch.rand(6, generator=g, dtype=torch.float64), "b": torch.rand(4, generator=g, dtype=torch.float64)}
    cols = {"a": torch.rand(5, generator=g, dtype=torch.float64), "b": torch.rand(3, generator=g, dtype=torch.float64)}
    whole = {"e": Whole(torch.rand(5, generator=g, dtype=torch.float64), torch.tensor([9, 14, 9, 20, 9]),
                        torch.zeros(5, dtype=torch.bool), torch.tensor([True, True, False, True, True]))}
    no = lambda d: {k: torch.zeros(len(v), dtype=torch.bool) for k, v in d.items()}  # noqa: E731
    total = 6 * 5 + 4 * 3 + 61
    targets = [t / 20 for t in range(1, 20)]
    chosen, passed_over = [], 0
    for parts in (None, torch.tensor([3, 3, 3, 3, 3])):  # at its whole cost, or per part (an expert's units)
        whole["e"].parts = parts
        whole["e"].costs = whole["e"].costs if parts is None else whole["e"].costs * 3  # same order per part
        for target in targets:
            r, c, u = select_structured(rows, cols, no(rows), no(cols), target, whole=whole)
            want = _prefix_by_hand(rows, cols, whole, int(target * total + 1e-9))
            for name in rows:
                assert set(r[name].nonzero().squeeze(1).tolist()) == want[name, "row"]
                assert set(c[name].nonzero().squeeze(1).tolist()) == want[name, "col"]
            assert set(u["e"].nonzero().squeeze(1).tolist()) == want["e", "unit"] and not u["e"][2]
            chosen.append(u["e"].clone())
            # a unit passed over: one cheaper than the dearest row or column taken is left
            dearest = max([rows[n][r[n]].max().item() for n in rows if r[n].any()]
                          + [cols[n][c[n]].max().item() for n in cols if c[n].any()], default=-1)
            per = whole["e"].costs / (1 if parts is None else parts)
            passed_over += int(((per < dearest) & ~u["e"] & whole["e"].candidate).any())
    assert passed_over > 0  # the case is exercised
    n = len(targets)
    assert all(torch.equal(a, b) for a, b in zip(chosen[:n], chosen[n:]))  # 3x the cost over 3 parts: the same


def test_whole_experts_run_compacts_saves_reloads_and_resumes(tmp_path, monkeypatch, capsys):
    """Mixtral, two MoE blocks of 4 experts, structured to 70% size with moe.whole_experts: each removed expert is
    all zero and routed to by no token; the shot's record names them; compaction drops them (and their router
    rows) at the zeroed model's perplexity; the saved folder loads (the stock class where every block keeps as
    many experts, else load_compact) with the record's perplexity; a run stopped after shot 1 resumes to the
    same result."""
    from conftest import compose

    from surgeon import runner
    from surgeon.compact import load_compact
    from surgeon.runner import perplexity, prepare_data

    args = [*_saved_tiny(tmp_path, "mixtral"), "eval.max_windows=4", "shots=2",
            "structure=structured", "target=0.6", "moe.whole_experts=true", f"results={tmp_path}/records.jsonl"]
    full = runner.run(compose([*args, "compact=true", "save_model=true"]), tmp_path / "full")
    assert full["protocol"]["whole_experts"] is True and full["protocol"]["whole_cost"] == "reroute"
    costs = full["points"][0]["expert_costs"]  # per experts module: KFAC, re-routed and zeroed cost per expert
    assert len(costs) == 2 and all(len(v[k]) == 4 for v in costs.values() for k in ("kfac", "reroute", "zero"))
    assert all(0 < r < float("inf") for v in costs.values() for r in v["reroute"])
    c = full["compact"]
    assert c["experts"]["kept"] < c["experts"]["total"] == 8
    assert f"{c['experts']['kept']} of 8 routed experts kept" in capsys.readouterr().out  # the printed summary
    assert c["ppl"] == pytest.approx(full["points"][-1]["ppl"], rel=1e-5)
    removed = {name for name in (layer["name"] for layer in full["layers"]) if ".experts." in name
               and next(l for l in full["layers"] if l["name"] == name)["sparsity"] == 1.0}
    assert len(removed) == 2 * (c["experts"]["total"] - c["experts"]["kept"])  # gate_up and down of each
    counts = [s["num_experts"] for s in c["layers"] if "num_experts" in s]
    assert counts and all(n >= 2 for n in counts)  # top-2 routing: a block keeps at least 2
    data_ = prepare_data(compose(args))
    path = full["model_dir"]
    if c["stock_loadable"]:
        reloaded = T.AutoModelForCausalLM.from_pretrained(path)
    else:
        reloaded = load_compact(path)
    assert perplexity(reloaded, data_.eval_windows) == pytest.approx(c["ppl"], rel=1e-5)

    def stop(shot):
        if shot == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(runner, "_test_pause", stop)
    with pytest.raises(KeyboardInterrupt):
        runner.run(compose(args), tmp_path / "stopped")
    monkeypatch.undo()
    resumed = runner.run(compose([*args, "resume=true"]), tmp_path / "stopped")
    assert resumed["resumed_from_shot"] == 1
    assert resumed["final_ppl"] == pytest.approx(full["final_ppl"], rel=1e-9)


def test_whole_expert_settings_are_refused_clearly():
    from conftest import compose

    from surgeon.config import ConfigError, validate

    for extra, words in ((["structure=unstructured"], "structure=structured"),
                         (["selection=uniform"], "selection=uniform"),
                         (["compact=uniform"], "compact=uniform"),
                         (["save_model=true"], "needs compact=true"),
                         (["model=opt-tiny"], "no routed experts")):
        with pytest.raises(ConfigError, match=words):
            validate(compose(["moe.whole_experts=true", *extra]))


@pytest.mark.parametrize("model_type", FAMILIES)
def test_whole_experts_removed_compact_to_the_stock_class(model_type, tmp_path):
    """One structured shot with moe.whole_experts on a one-block model of 6 experts: the removed experts get no
    token (the router mask) and are all zero; compaction drops them and their router rows with the same logits,
    writes the count into the config, and the stock from_pretrained reloads the folder with those logits."""
    from surgeon.compact import compact
    from surgeon.prune import PruneState, ShotOptions, prune_shot

    model = tiny(model_type, experts=6)
    layers = adapter_for(model_type).layers(model)
    state = PruneState.empty(layers)
    opts = ShotOptions(method="surgeon", kind="kfac", structure="structured", correlation="layer", damping_g=0.1,
                       tol=1e-10, whole_experts=True)
    prune_shot(model, layers, list(ids().split(3)), state, 0.4, opts)
    mask = model.model.layers[0].mlp.gate.__dict__["_surgeon_removed"]
    assert mask is not None and 1 <= int(mask.sum()) <= 4
    for layer in layers:
        if layer.expert is not None:
            assert bool((layer.weight == 0).all()) == bool(mask[layer.expert]), layer.name
    _, info = prune_shot(model, layers, list(ids().split(3)), state, 0.4, opts)  # again: nothing reaches them
    for e in mask.nonzero().squeeze(1).tolist():
        assert info["expert_tokens"][f"model.layers.0.mlp.experts.{e}"] == 0
    with torch.no_grad():
        before = model(input_ids=ids()).logits
    report = compact(model)
    assert report["experts"] == {"kept": 6 - int(mask.sum()), "total": 6} and report["stock_loadable"]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids()).logits, before, rtol=1e-10, atol=1e-10)
    model.save_pretrained(tmp_path)
    reloaded = T.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64,
                                                     experts_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids()).logits, before, rtol=1e-10, atol=1e-10)


@pytest.mark.slow
def test_whole_experts_under_torchrun_match_one_process(tmp_path):
    """Two processes (torchrun) on the tiny Mixtral with whole experts: the re-routing sums are added over the
    ranks' batches, so the costs, the experts removed, the masks and the weights are those of one process."""
    from test_distributed import ENV, _assert_same_run, _python, _torchrun

    overrides = [*_saved_tiny(tmp_path, "mixtral"), "eval.max_windows=4", "shots=2", "structure=structured",
                 "target=0.6", "moe.whole_experts=true", "calib.n=8", f"results={tmp_path}/records.jsonl"]
    single = _python(tmp_path / "one", overrides)
    assert single.returncode == 0, single.stderr[-3000:]
    double = _torchrun(tmp_path / "two", overrides)
    assert double.returncode == 0, double.stderr[-3000:]
    one, two = _assert_same_run(tmp_path / "one", tmp_path / "two")
    assert (one["processes"], two["processes"]) == (1, 2)
    for a, b in zip(one["points"], two["points"]):
        for module, costs in a["expert_costs"].items():
            assert b["expert_costs"][module]["reroute"] == pytest.approx(costs["reroute"], rel=1e-9)
