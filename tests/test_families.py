"""The conformance matrix: every supported family, built tiny from its own transformers config class (random
init, no download), through the real pipeline with every method and structure; plus brute-force checks of fused
layers and Conv1D."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers as T

import surgeon
from surgeon import adapters
from surgeon.adapters import adapter_for, family_table, supported_model_types
from surgeon import runner
from surgeon.compact import compact
from surgeon.evaluate import perplexity

from conftest import ROOT, compose

V = 4096  # the testbed tokenizer's vocabulary
IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
LLAMA_LIKE = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, **IDS)


def tiny_config(model_type: str):
    """A two-block model of the family, widths divisible by 4 (2:4 blocks)."""
    if model_type == "opt":
        return T.OPTConfig(vocab_size=V, hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
                           word_embed_proj_dim=64, max_position_embeddings=256, **IDS)
    if model_type == "gpt2":
        return T.GPT2Config(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=256, **IDS)
    if model_type == "gpt_neox":
        return T.GPTNeoXConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=4, max_position_embeddings=256, rotary_pct=0.5, **IDS)
    if model_type == "gemma3":
        text = T.Gemma3TextConfig(head_dim=24, **LLAMA_LIKE)
        vision = T.SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                                      image_size=28, patch_size=14)
        return T.Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
                              image_token_index=3, boi_token_index=4, eoi_token_index=5, **IDS)
    moe = {**{k: v for k, v in LLAMA_LIKE.items() if k != "intermediate_size"}, "num_experts_per_tok": 2}
    if model_type == "mixtral":
        return T.MixtralConfig(intermediate_size=32, num_local_experts=4, **moe)
    if model_type == "olmoe":
        return T.OlmoeConfig(intermediate_size=32, num_experts=4, **moe)
    if model_type == "qwen2_moe":  # block 1 a dense MLP; a shared expert beside the routed ones
        return T.Qwen2MoeConfig(intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                                num_experts=4, mlp_only_layers=[1], **moe)
    if model_type == "qwen3_moe":
        return T.Qwen3MoeConfig(intermediate_size=96, moe_intermediate_size=32, num_experts=4, head_dim=16, **moe)
    classes = {"llama": T.LlamaConfig, "mistral": T.MistralConfig, "qwen2": T.Qwen2Config, "qwen3": T.Qwen3Config,
               "gemma2": T.Gemma2Config, "gemma3_text": T.Gemma3TextConfig, "phi3": T.Phi3Config}
    extra = {"head_dim": 24} if model_type.startswith("gemma") else {"head_dim": 16} if model_type == "qwen3" else {}
    return classes[model_type](**LLAMA_LIKE, **extra)


FAMILIES = supported_model_types()


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    """model_type -> a saved tiny model folder with the testbed tokenizer."""
    from surgeon.config import shared_dir

    if not (shared_dir() / "models").is_dir():
        pytest.skip(f"testbed not found at {shared_dir()} (set SURGEON_SHARED)")
    tokenizer = T.AutoTokenizer.from_pretrained(shared_dir() / "models" / "llama-tiny-wt2")
    out = {}
    for model_type in FAMILIES:
        torch.manual_seed(0)
        model = T.AutoModelForCausalLM.from_config(tiny_config(model_type))
        path = tmp_path_factory.mktemp(model_type)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        out[model_type] = path
    text = tmp_path_factory.mktemp("text")  # a slice of the testbed texts: tokenized in milliseconds
    for split in ("valid", "test"):
        words = (shared_dir() / "data" / "wikitext-2" / f"{split}.txt").read_text()[:20000]
        (text / f"{split}.txt").write_text(words)
    out["text"] = text
    return out


def data(dirs):
    return ["data=text", f"data.calib_path={dirs['text'] / 'valid.txt'}", f"data.eval_path={dirs['text'] / 'test.txt'}"]


def run(dirs, model_type, tmp_path, name, *overrides):
    cfg = compose([f"model.name_or_path={dirs[model_type]}", "model.name=tiny", *data(dirs), "calib.n=4",
                   "calib.seq_len=32",
                   "calib.batch_size=4", "eval.seq_len=32", "eval.max_windows=2", "eval.dense=false", "shots=2",
                   "update.tol=1e-6",
                   f"results={tmp_path}/records.jsonl", *overrides])
    return runner.run(cfg, tmp_path / name)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


# method, structure, extra overrides: every method on every structure it can do
MATRIX = [
    ("surgeon", "unstructured", ()), ("surgeon", "semistructured", ()), ("surgeon", "structured", ()),
    ("surgeon", "unstructured", ("curvature.rank=2", "curvature.rank2_iters=1", "update.solver=grouped")),
    ("surgeon", "structured", ("curvature.rank=2", "curvature.rank2_iters=1")),
    ("surgeon", "structured", ("correlation=independent",)), ("surgeon", "unstructured", ("correlation=independent",)),
    ("surgeon", "unstructured", ("lora.enabled=true", "lora.steps=2")),
    ("kobd", "unstructured", ()), ("kobd", "structured", ()), ("lobd", "semistructured", ()),
    ("lobd", "structured", ()), ("magnitude", "unstructured", ()), ("magnitude", "structured", ()),
    ("sparsegpt", "unstructured", ()), ("sparsegpt", "semistructured", ("shots=1",)),
    ("wanda", "unstructured", ()), ("wanda", "semistructured", ("shots=1",)),
]


def target_of(structure):
    return {"unstructured": 0.5, "semistructured": 0.5, "structured": 0.3}[structure]


@pytest.mark.parametrize("model_type", FAMILIES)
def test_conformance(model_type, family_dirs, tmp_path):
    """Every method x structure runs; the achieved sparsity is the target (unstructured/N:M to one element, structured
    to one row or column); N:M masks hold; structured compaction keeps the logits (1e-5); the saved models reload
    with the run's perplexity and logits."""
    ids = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(0))
    for i, (method, structure, extra) in enumerate(MATRIX):
        target = target_of(structure)
        save = i < 3  # the three LLM Surgeon structures: save and reload
        record = run(family_dirs, model_type, tmp_path, f"run{i}", f"method={method}", f"structure={structure}",
                     f"target={target}", f"save_model={str(save).lower()}", *extra)
        where = f"{model_type} {method} {structure} {extra}"
        assert record["status"] == "complete", where
        largest = max(max(layer["shape"]) for layer in record["layers"])
        step = 1 / record["protocol"]["prunable_params"] * (largest if structure == "structured" else 1)
        assert abs(record["sparsity"] - target) <= step, where
        if not save:
            continue
        saved = T.AutoModelForCausalLM.from_pretrained(record["model_dir"], dtype=torch.float32).eval()
        layers = adapter_for(saved.config.model_type).layers(saved)
        zeros = sum(int((layer.weight == 0).sum()) for layer in layers)
        assert zeros / record["protocol"]["prunable_params"] == pytest.approx(record["sparsity"], abs=1e-12), where
        if structure == "semistructured":
            for layer in layers:
                blocks = (layer.weight != 0).reshape(layer.out_features, -1, 4).sum(-1)
                assert (blocks <= 2).all(), f"{where}: {layer.name} is not 2:4"
        windows = runner.prepare_data(compose([f"model.name_or_path={family_dirs[model_type]}", *data(family_dirs),
                                               "eval.seq_len=32", "eval.max_windows=2"])).eval_windows
        assert perplexity(saved, windows, 8) == pytest.approx(record["final_ppl"], rel=1e-6), where
        if structure == "structured":
            check_compaction(saved, ids, tmp_path / f"compact{i}", where)


def check_compaction(model, ids, out, where):
    """Compaction (per-block and uniform) is lossless; both reload with the same logits; uniform with the stock
    class. Beside what the run removed, block 0 loses its first key-value head's value rows and block 1 eight MLP
    units' activated rows (through the adapter's parts: inside a fused layer where the family fuses; every routed
    expert's in a mixture-of-experts block)."""
    adapter = adapter_for(model.config.model_type)
    blocks = adapter.blocks(model)
    _, _, d = adapter.heads(blocks[0].get_submodule(adapter.attention_path))
    with torch.no_grad():
        experts = getattr(blocks[1].get_submodule(adapter.mlp_path), "experts", None)
        if experts is not None:  # a mixture-of-experts block: every expert loses eight units' gate rows
            experts.gate_up_proj[:, :8] = 0
        for block, role, n in ((blocks[0], "v", d), (blocks[1], adapter.mlp_activated, 8))[:1 + (experts is None)]:
            part = adapter.part(block, role)
            rows = part.index(torch.arange(part.weight.shape[0]) < n)
            adapters.matrix(part.module)[rows] = 0
            if part.module.bias is not None:
                part.module.bias[rows] = 0
    before = logits(model, ids)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for uniform in (False, True):
        model.load_state_dict(state)
        fresh = T.AutoModelForCausalLM.from_config(model.config).eval()
        fresh.load_state_dict(state)
        report = compact(fresh, uniform=uniform)
        assert report["params"] < report["params_before"] or uniform, where  # uniform: as wide as the widest block
        torch.testing.assert_close(logits(fresh, ids), before, rtol=1e-5, atol=1e-5, msg=where)
        fresh.save_pretrained(out / str(uniform))
        loaded = surgeon.load_compact(out / str(uniform))
        torch.testing.assert_close(logits(loaded, ids), before, rtol=1e-5, atol=1e-5, msg=where)
        if uniform:
            assert report["stock_loadable"], where
            stock = T.AutoModelForCausalLM.from_pretrained(out / str(uniform)).eval()
            torch.testing.assert_close(logits(stock, ids), before, rtol=1e-5, atol=1e-5, msg=where)


def test_every_supported_family_has_a_conformance_config():
    for model_type in FAMILIES:
        assert tiny_config(model_type).model_type == model_type


def test_readme_lists_the_families_of_the_adapter_table():
    readme = (ROOT / "README.md").read_text()
    assert family_table() in readme, "README's family table differs from surgeon.adapters.family_table()"


def test_fused_layers_are_described_once_with_their_parts(family_dirs):
    """A fused layer is one prunable layer; its rows split into the parts the family's forward reads."""
    expect = {"phi3": {"qkv": {"q": 64, "k": 32, "v": 32}, "gate_up": {"gate": 96, "up": 96}},
              "gpt2": {"qkv": {"q": 64, "k": 64, "v": 64}}, "gpt_neox": {"qkv": {"q": 64, "k": 64, "v": 64}}}
    for model_type, fused in expect.items():
        model = T.AutoModelForCausalLM.from_pretrained(family_dirs[model_type])
        adapter = adapter_for(model_type)
        block = adapter.blocks(model)[0]
        for layer in adapter.layers(model)[:len(adapter.layer_paths)]:
            groups = adapter.row_groups(layer, block)
            assert {role: len(rows) for role, rows in groups.items()} == fused.get(layer.type, {})
            if groups:  # the parts tile the fused rows exactly once
                assert torch.equal(torch.cat(list(groups.values())).sort().values, torch.arange(layer.out_features))


def test_neox_parts_follow_its_head_interleaved_forward(family_dirs):
    """The per-head rows of query_key_value are the ones GPT-NeoX's forward reads as q, k and v."""
    model = T.AutoModelForCausalLM.from_pretrained(family_dirs["gpt_neox"])
    adapter = adapter_for("gpt_neox")
    block = adapter.blocks(model)[0]
    layer = adapter.layers(model)[0]
    attention = block.get_submodule(adapter.attention_path)
    x = torch.randn(1, 3, 64)
    out = layer.module(x)
    H, _, d = adapter.heads(attention)
    q, k, v = out.view(1, 3, H, 3 * d).transpose(1, 2).chunk(3, dim=-1)  # as GPTNeoXAttention.forward
    for role, want in zip("qkv", (q, k, v)):
        rows = adapter.part(block, role).rows
        torch.testing.assert_close(out[..., rows].view(1, 3, H, d).transpose(1, 2), want)


def test_unknown_model_type_is_refused_from_its_config(tmp_path):
    """A folder whose config.json names an unsupported family: exit 2, one line naming the type and the supported
    ones, no output folder, within 10 s."""
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    out = tmp_path / "out"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "run.py", f"model.name_or_path={tmp_path / 'bert'}",
                           f"hydra.run.dir={out}"], cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "'bert' is not supported" in lines[0] and "gpt_neox" in lines[0] and "phi3" in lines[0]
    assert not out.exists()
    assert seconds < 10 or pytest.skip(f"took {seconds:.1f} s on this machine (the refusal itself is checked)")


def test_memory_estimate_knows_fused_shapes():
    """The estimate's layer shapes are the model's prunable layers, a fused layer as one (rows of all its parts)."""
    from surgeon.memory import layer_shapes

    for model_type in ("phi3", "gpt2", "gpt_neox", "mixtral", "qwen2_moe"):
        config = tiny_config(model_type)
        model = T.AutoModelForCausalLM.from_config(config)
        layers = adapter_for(model_type).layers(model)
        shapes = layer_shapes(config)
        assert [(s.name, s.rows, s.cols) for s in shapes] == [
            (l.name, l.out_features, l.in_features + (l.bias is not None)) for l in layers]


def test_parts_cover_the_adapters_fused_roles():
    for cls in adapters.ADAPTERS:
        adapter = cls()
        for role, spec in adapter.fused.items():
            assert role in adapter.layer_paths and all(adapter.home(part) == role for part in spec.parts)


# --- brute force: fused layers and Conv1D (float64, small layers) -------------------------------------------------

def small(model_type: str) -> torch.nn.Module:
    """A float64 model small enough for a dense Fisher of its fused layer (hidden 8, two heads)."""
    ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    config = {
        "phi3": lambda: T.Phi3Config(vocab_size=32, hidden_size=8, intermediate_size=12, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, initializer_range=0.3, **ids),
        "gpt2": lambda: T.GPT2Config(vocab_size=32, n_embd=8, n_layer=1, n_head=2, n_positions=16,
                                     initializer_range=0.3, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids),
        "gpt_neox": lambda: T.GPTNeoXConfig(vocab_size=32, hidden_size=8, intermediate_size=12, num_hidden_layers=1,
                                            num_attention_heads=2, initializer_range=0.3, hidden_dropout=0.0,
                                            attention_dropout=0.0, **ids),
    }[model_type]()
    return T.AutoModelForCausalLM.from_config(config).to(torch.float64).eval()


@pytest.mark.parametrize("model_type", ["phi3", "gpt2", "gpt_neox"])
def test_fused_row_costs_and_updates_equal_the_dense_obs_solve(model_type):
    """The fused q/k/v layer is one Kronecker-factored layer: its row costs and the joint update of rows from every
    part (and a column) equal the brute-force OBS solve on kron(G_d, A_d); its factors equal the per-token sums
    (also checked for every layer in test_curvature.py's KFAC test)."""
    from test_curvature import outer_mean, per_token_vectors
    from test_obs import DA, DG, Dense

    from surgeon.adapters import weight_with_bias
    from surgeon.curvature import estimate_curvature
    from surgeon.obs import LayerOBS

    model = small(model_type)
    adapter = adapter_for(model_type)
    layer = adapter.layers(model)[0]
    assert layer.type == "qkv"
    ids = torch.randint(0, 32, (6, 8), generator=torch.Generator().manual_seed(1))
    f = estimate_curvature(model, [layer], list(ids.split(3)))[layer.name]
    a, g = per_token_vectors(model, [layer], ids)[layer.name]
    torch.testing.assert_close(f.A, outer_mean(a), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(f.G, outer_mean(g), rtol=1e-10, atol=1e-14)

    W = weight_with_bias(layer.module)
    has_bias = layer.bias is not None
    o, d = LayerOBS(W, f.A, f.G, damping_a=DA, damping_g=DG, has_bias=has_bias), Dense(W, f.A, f.G)
    R, C = W.shape
    rows = []
    for r in range(R):
        m = torch.zeros(R, C, dtype=torch.bool)
        m[r] = True
        rows.append(d.cost(d.q_mask(m)))
    torch.testing.assert_close(o.row_costs(), torch.tensor(rows, dtype=W.dtype), rtol=1e-10, atol=1e-12)

    groups = adapter.row_groups(layer, adapter.blocks(model)[0])
    removed_rows = torch.zeros(R, dtype=torch.bool)
    removed_rows[[int(groups[part][1]) for part in ("q", "k", "v")]] = True  # one row of each part
    removed_cols = torch.zeros(C - has_bias, dtype=torch.bool)
    removed_cols[2] = True
    full = removed_rows[:, None] | torch.cat([removed_cols, torch.zeros(int(has_bias), dtype=torch.bool)])[None, :]
    want = d.full(d.theta + d.delta(d.q_mask(full)), full)
    torch.testing.assert_close(o.update_rows_cols(removed_rows, removed_cols), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("model_type", ["phi3", "gpt2"])
def test_fused_row_costs_against_separate_layers(model_type):
    """What fusing changes in the row costs w_r^T A w_r / (2 [G^-1]_rr) (docs/algorithm.md, fused layers): with
    G's cross-part blocks zeroed (and no damping, which is relative to one mean diagonal over all parts) the fused
    layer's row costs are those of separate q/k/v (gate/up) layers with their own G; with them, they differ."""
    from surgeon.adapters import weight_with_bias
    from surgeon.curvature import estimate_curvature
    from surgeon.obs import LayerOBS

    model = small(model_type)
    adapter = adapter_for(model_type)
    layer = adapter.layers(model)[0]
    ids = torch.randint(0, 32, (8, 8), generator=torch.Generator().manual_seed(2))
    f = estimate_curvature(model, [layer], list(ids.split(4)))[layer.name]
    W = weight_with_bias(layer.module)
    has_bias = layer.bias is not None
    groups = adapter.row_groups(layer, adapter.blocks(model)[0])
    block = torch.zeros_like(f.G)
    for rows in groups.values():
        block[rows[:, None], rows[None, :]] = f.G[rows[:, None], rows[None, :]]
    costs = lambda W, G: LayerOBS(W, f.A, G, damping_a=0.01, damping_g=0.0, has_bias=has_bias).row_costs()  # noqa
    separate = torch.zeros(W.shape[0], dtype=W.dtype)
    for rows in groups.values():
        separate[rows] = costs(W[rows], f.G[rows[:, None], rows[None, :]])
    torch.testing.assert_close(costs(W, block), separate, rtol=1e-9, atol=1e-14)
    fused = costs(W, f.G)
    assert not torch.allclose(fused, separate, rtol=1e-3)
    # conditioning on the other parts' outputs can only raise [G^-1]_rr: a fused row never costs more
    assert (fused <= separate * (1 + 1e-9)).all()


def as_linear(model: torch.nn.Module) -> torch.nn.Module:
    """The same GPT-2 with every Conv1D replaced by the equivalent nn.Linear (weight transposed)."""
    import copy

    from surgeon.adapters import conv1d

    twin = copy.deepcopy(model)
    for name, module in list(twin.named_modules()):
        if conv1d(module):
            linear = torch.nn.Linear(module.weight.shape[0], module.weight.shape[1], dtype=module.weight.dtype)
            with torch.no_grad():
                linear.weight.copy_(module.weight.T)
                linear.bias.copy_(module.bias)
            parent, _, child = name.rpartition(".")
            setattr(twin.get_submodule(parent), child, linear)
    return twin


@pytest.mark.parametrize("method, structure", [("surgeon", "unstructured"), ("surgeon", "structured"),
                                               ("surgeon", "semistructured"), ("sparsegpt", "unstructured"),
                                               ("wanda", "semistructured")])
def test_conv1d_layers_prune_as_the_transposed_linear(method, structure):
    """GPT-2's Conv1D layers get exactly the masks and updates of the equivalent nn.Linear layers."""
    from surgeon.baselines import prune_layerwise
    from surgeon.prune import PruneState, ShotOptions, prune_shot

    conv = small("gpt2")
    linear = as_linear(conv)
    ids = torch.randint(0, 32, (6, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(linear(ids).logits, conv(ids).logits, rtol=1e-12, atol=1e-12)
    results = []
    for model in (conv, linear):
        layers = adapter_for("gpt2").layers(model)
        if method == "surgeon":
            opts = ShotOptions(structure=structure, n=2, m=4, damping_g=0.1, tol=1e-13)
            state = PruneState.empty(layers)
            # one shot: a second one would compare selections made from weights that differ by the CG tolerance
            prune_shot(model, layers, list(ids.split(3)), state, 0.5 if structure != "structured" else 0.3, opts)
            masks = state.removed
        else:
            masks = prune_layerwise(model, layers, list(ids.split(3)), method=method, sparsity=0.5,
                                    **({"n": 2, "m": 4} if structure == "semistructured" else {}))
        results.append((masks, {layer.name: (layer.weight.clone(), layer.bias.clone()) for layer in layers}))
    (conv_masks, conv_w), (lin_masks, lin_w) = results
    for name in conv_w:
        assert torch.equal(conv_masks[name], lin_masks[name]), name
        torch.testing.assert_close(conv_w[name], lin_w[name], rtol=1e-9, atol=1e-10, msg=name)


@pytest.mark.parametrize("model_type", ["phi3", "gpt2", "gpt_neox"])
def test_resume_of_a_fused_family_ends_with_the_uninterrupted_weights(model_type, family_dirs, tmp_path, monkeypatch):
    """Interrupted before its last shot and resumed from the checkpoint, a run of a family with fused layers (and
    GPT-2's Conv1D) ends with the masks and weights of the run that was never interrupted."""
    from test_invariants import Interrupted, spy_shots

    overrides = ("structure=unstructured", "target=0.5", "shots=3")
    run(family_dirs, model_type, tmp_path, "full", *overrides)
    calls = []
    spy_shots(monkeypatch, calls, interrupt_at=3)
    with pytest.raises(Interrupted):
        run(family_dirs, model_type, tmp_path, "resumed", *overrides)
    spy_shots(monkeypatch, calls)
    record = run(family_dirs, model_type, tmp_path, "resumed", *overrides, "resume=true")
    assert record["status"] == "complete" and record["resumed_from_shot"] == 2
    full, resumed = (torch.load(tmp_path / name / runner.CHECKPOINT, weights_only=False)
                     for name in ("full", "resumed"))
    for name, mask in full["state"]["removed"].items():
        assert torch.equal(resumed["state"]["removed"][name], mask), name
    for name, tensors in full["weights"].items():
        for key, value in tensors.items():
            torch.testing.assert_close(resumed["weights"][name][key], value, rtol=0, atol=1e-12)


def _family_shots(model_type: str, structure: str) -> dict:
    """Two shots of prune_shot on the small float64 model of a fused family: the final masks and weights."""
    from surgeon.prune import PruneState, ShotOptions, prune_shot

    model = small(model_type)
    layers = adapter_for(model_type).layers(model)
    batches = list(torch.randint(0, 32, (8, 8), generator=torch.Generator().manual_seed(4)).split(2))
    state = PruneState.empty(layers)
    opts = ShotOptions(structure=structure, damping_g=0.1, tol=1e-12, accumulate="float64")
    for shot, target in enumerate((0.15, 0.3) if structure == "structured" else (0.25, 0.5), start=1):
        prune_shot(model, layers, batches, state, target, opts, seed=shot)
    return {"masks": {k: v.tolist() for k, v in state.removed.items()},
            "weights": {layer.name: layer.weight.tolist() for layer in layers}}


def _family_worker(rank: int, port: int, out: str, model_type: str, structure: str) -> None:
    import os

    from surgeon import distributed

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    assert distributed.init(torch.device("cpu"), timeout_s=120)
    try:
        Path(f"{out}.{rank}").write_text(json.dumps(_family_shots(model_type, structure)))
    finally:
        distributed.close()


@pytest.mark.parametrize("model_type, structure", [("gpt2", "unstructured"), ("phi3", "structured")])
def test_two_processes_prune_a_fused_family_as_one(model_type, structure, tmp_path):
    """Layers divided over two gloo processes (as under torchrun): the masks and weights of one process."""
    import torch.multiprocessing as mp
    from test_distributed import _free_port

    threads = torch.get_num_threads()
    try:
        one = _family_shots(model_type, structure)
    finally:
        torch.set_num_threads(threads)
    mp.start_processes(_family_worker, args=(_free_port(), str(tmp_path / "out"), model_type, structure), nprocs=2,
                       start_method="spawn")
    for rank in (0, 1):
        got = json.loads((tmp_path / f"out.{rank}").read_text())
        assert got["masks"] == one["masks"]
        for name, weight in one["weights"].items():
            torch.testing.assert_close(torch.tensor(got["weights"][name]), torch.tensor(weight), rtol=1e-9, atol=1e-11)
