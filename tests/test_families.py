"""The conformance matrix: every supported family, built tiny from its own transformers config class (random
init, no download), through the real pipeline with every method and structure; plus brute-force checks of fused
layers and Conv1D."""
import json
import subprocess
import sys
import time

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
                   "calib.batch_size=4", "eval.seq_len=32", "eval.max_windows=2", "eval.dense=false", "shots=2", "update.tol=1e-6",
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
        record = run(family_dirs, model_type, tmp_path, f"run{i}", f"method={method}", f"structure={structure}", f"target={target}",
                     f"save_model={str(save).lower()}", *extra)
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
    units' activated rows (through the adapter's parts: inside a fused layer where the family fuses)."""
    adapter = adapter_for(model.config.model_type)
    blocks = adapter.blocks(model)
    _, _, d = adapter.heads(blocks[0].get_submodule(adapter.attention_path))
    with torch.no_grad():
        for block, role, n in ((blocks[0], "v", d), (blocks[1], adapter.mlp_activated, 8)):
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

    for model_type in ("phi3", "gpt2", "gpt_neox"):
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
