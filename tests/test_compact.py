"""Compaction (surgeon/compact.py): every coupling that lets a unit go, alone and together, on tiny random OPT
and Llama (grouped-query attention) models — outputs equal before and after; the saved format and its loader;
and the runner's `compact=true` on the testbed models (perplexity equal to the zeroed model's, reloaded from
disk by `load_compact`, parameters below the zeroed count by at least the removed MLP units)."""
import copy
import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, OPTConfig

import surgeon
from conftest import ROOT, compose
from surgeon.adapters import adapter_for
from surgeon.compact import KEY, NotCompactModel, compact, load_compact, parameter_count

HIDDEN, HEADS, HEAD_DIM = 32, 4, 8


def tiny(family: str, dtype=torch.float64):
    torch.manual_seed(0)
    if family == "opt":
        config = OPTConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, ffn_dim=64, num_hidden_layers=2,
                           vocab_size=64, word_embed_proj_dim=HIDDEN, max_position_embeddings=64)
    else:
        config = LlamaConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, num_key_value_heads=2, head_dim=HEAD_DIM,
                             intermediate_size=48, num_hidden_layers=2, vocab_size=64, max_position_embeddings=64)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa").eval()
    with torch.no_grad():  # random biases: a bias left behind by a removed row would show
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def lin(model, block, role):
    adapter = adapter_for(model.config.model_type)
    return adapter.blocks(model)[block].get_submodule(adapter.layer_paths[role])


def zero_rows(model, role, rows, bias=True, block=0):
    layer = lin(model, block, role)
    layer.weight[rows] = 0
    if bias and layer.bias is not None:
        layer.bias[rows] = 0


def zero_cols(model, role, cols, block=0):
    lin(model, block, role).weight[:, cols] = 0


def dims(heads, ds):
    """Row indices of dimensions `ds` in each of `heads`."""
    return [h * HEAD_DIM + i for h in heads for i in ds]


# coupling -> (how to zero it, the block-0 shape it must give: heads, kv_heads, head_dim, mlp; None: unchanged)
OPT_COUPLINGS = {
    "mlp input rows": (lambda m: zero_rows(m, "fc1", slice(3, 20)), {"mlp": 47}),
    "mlp output columns": (lambda m: zero_cols(m, "fc2", slice(30, 40)), {"mlp": 54}),
    "mlp input weights, bias kept (folded)": (lambda m: zero_rows(m, "fc1", slice(5, 9), bias=False), {"mlp": 60}),
    "value rows of a head": (lambda m: zero_rows(m, "v", dims([1], range(8))), {"heads": 3, "kv_heads": 3}),
    "value weights of a head, bias kept (folded)": (lambda m: zero_rows(m, "v", dims([1], range(8)), bias=False),
                                                    {"heads": 3, "kv_heads": 3}),
    "output columns of a head": (lambda m: zero_cols(m, "out", dims([0], range(8))), {"heads": 3, "kv_heads": 3}),
    "query rows (partial dims, kept as zeros)": (lambda m: zero_rows(m, "q", dims(range(4), range(4))), {}),
    "query and value dims in every head": (lambda m: (zero_rows(m, "q", dims(range(4), range(4))),
                                                      zero_cols(m, "out", dims(range(4), range(4, 8)))),
                                           {"head_dim": 4}),
    "key weights, bias kept, and value dims": (lambda m: (zero_rows(m, "k", dims(range(4), range(5)), bias=False),
                                                          zero_rows(m, "v", dims(range(4), range(3, 8)))),
                                               {"head_dim": 3}),
    "query/key rows of a whole head (uniform attention stays)": (
        lambda m: (zero_rows(m, "q", dims([2], range(8))), zero_rows(m, "k", dims([2], range(8)))), {}),
}
LLAMA_COUPLINGS = {
    "gate rows": (lambda m: zero_rows(m, "gate", slice(0, 10)), {"mlp": 38}),
    "up rows": (lambda m: zero_rows(m, "up", slice(20, 25)), {"mlp": 43}),
    "down columns": (lambda m: zero_cols(m, "down", slice(40, 48)), {"mlp": 40}),
    "output columns of one query head (padded: its group keeps two)": (
        lambda m: zero_cols(m, "o", dims([1], range(8))), {}),
    "output columns of one query head per group": (
        lambda m: zero_cols(m, "o", dims([0, 3], range(8))), {"heads": 2, "kv_heads": 2}),
    "value rows of a key-value head": (lambda m: zero_rows(m, "v", dims([0], range(8))), {"heads": 2, "kv_heads": 1}),
    "output columns of a whole group": (lambda m: zero_cols(m, "o", dims([2, 3], range(8))),
                                        {"heads": 2, "kv_heads": 1}),
    "query rows of a head (rotary, kept as zeros)": (lambda m: zero_rows(m, "q", dims([2], range(8))), {}),
    "key rows of a head (rotary, kept as zeros)": (lambda m: zero_rows(m, "k", dims([1], range(8))), {}),
}
DENSE = {"opt": {"heads": 4, "kv_heads": 4, "head_dim": 8, "mlp": 64},
         "llama": {"heads": 4, "kv_heads": 2, "head_dim": 8, "mlp": 48}}
CASES = [("opt", k) for k in OPT_COUPLINGS] + [("llama", k) for k in LLAMA_COUPLINGS]


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family,coupling", CASES)
def test_each_coupling_alone_keeps_the_output(family, coupling):
    model = tiny(family)
    zero, expected = (OPT_COUPLINGS if family == "opt" else LLAMA_COUPLINGS)[coupling]
    with torch.no_grad():
        zero(model)
    ids = torch.randint(0, 64, (3, 20), generator=torch.Generator().manual_seed(1))
    before = logits(model, ids)
    report = compact(model)
    torch.testing.assert_close(logits(model, ids), before, rtol=1e-6, atol=1e-6)
    assert report["layers"][0] == {**DENSE[family], **expected}
    assert report["layers"][1] == DENSE[family]  # block 1 untouched
    assert report["params"] == parameter_count(model) <= report["params_before"]


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_all_couplings_together_then_save_and_load(family, tmp_path):
    model = tiny(family)
    couplings = OPT_COUPLINGS if family == "opt" else LLAMA_COUPLINGS
    with torch.no_grad():
        for block in (0, 1):
            for name, (zero, _) in couplings.items():
                if "whole group" in name or "key-value head" in name:
                    continue  # with them, every head of the Llama block would be dead
                zero(model) if block == 0 else _in_block(model, zero, 1)
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(2))
    before = logits(model, ids)
    zeros = sum(int((l.module.weight == 0).sum()) for l in adapter_for(model.config.model_type).layers(model))
    report = compact(model)
    after = logits(model, ids)
    torch.testing.assert_close(after, before, rtol=1e-6, atol=1e-6)
    assert report["zeros_before"] == zeros and report["zeros_left"] < zeros
    assert report["mlp_units"]["kept"] < report["mlp_units"]["total"]
    assert compact(model)["layers"] == report["layers"]  # a compacted model has nothing more to remove
    torch.testing.assert_close(logits(model, ids), before, rtol=1e-6, atol=1e-6)

    model.save_pretrained(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())[KEY]
    assert saved["layers"] == report["layers"]
    loaded = load_compact(tmp_path / "m")
    assert type(loaded) is type(model) and loaded.dtype == torch.float64
    assert loaded.generation_config.to_diff_dict() == model.generation_config.to_diff_dict()
    assert parameter_count(loaded) == report["params"]
    torch.testing.assert_close(logits(loaded, ids), before, rtol=1e-6, atol=1e-6)
    # generation with the key-value cache (layers of different widths)
    generated = loaded.generate(ids[:1, :5], max_new_tokens=6, do_sample=False)
    assert generated.shape == (1, 11)


def _in_block(model, zero, block):
    """Apply a block-0 coupling to another block: swap the blocks, zero, swap back."""
    blocks = adapter_for(model.config.model_type).blocks(model)
    blocks[0], blocks[block] = blocks[block], blocks[0]
    try:
        zero(model)
    finally:
        blocks[0], blocks[block] = blocks[block], blocks[0]


def test_uniform_shapes_load_with_stock_from_pretrained(tmp_path):
    model = tiny("llama")
    with torch.no_grad():
        for block in (0, 1):
            _in_block(model, lambda m: (zero_cols(m, "o", dims([1, 3], range(8))), zero_rows(m, "up", slice(0, 8))),
                      block)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(3))
    before = logits(model, ids)
    report = compact(model)
    assert report["stock_loadable"]
    model.save_pretrained(tmp_path / "m")
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float64).eval()
    assert stock.config.num_attention_heads == 2 and stock.config.intermediate_size == 40
    torch.testing.assert_close(logits(stock, ids), before, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_different_widths_load_stock_only_when_made_uniform(family, tmp_path):
    model = tiny(family)
    out, group = ("out", [1]) if family == "opt" else ("o", [0, 3])
    with torch.no_grad():
        zero_rows(model, "fc1" if family == "opt" else "up", slice(0, 10))  # block 0 only
        zero_cols(model, out, dims(group, range(8)))
        _in_block(model, lambda m: (zero_rows(m, "fc1" if family == "opt" else "up", slice(0, 4)),
                                    zero_cols(m, out, dims(group, range(8)))), 1)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(5))
    before = logits(model, ids)
    ragged = copy.deepcopy(model)
    ragged_report = compact(ragged)
    assert not ragged_report["stock_loadable"]
    ragged.save_pretrained(tmp_path / "ragged")
    config = json.loads((tmp_path / "ragged" / "config.json").read_text())
    dense_mlp = 64 if family == "opt" else 48
    assert config["ffn_dim" if family == "opt" else "intermediate_size"] == dense_mlp
    with pytest.raises(Exception):  # the config's own fields keep the dense sizes; the blocks are in KEY
        AutoModelForCausalLM.from_pretrained(tmp_path / "ragged")

    report = compact(model, uniform=True)
    assert report["stock_loadable"] and report["uniform"]
    mlp = dense_mlp - 4  # the wider block's
    heads = 4 if family == "opt" else 2        # OPT keeps whole attention; Llama one query head per group
    assert report["layers"] == [{**DENSE[family], "mlp": mlp, "heads": heads}] * 2
    assert ragged_report["params"] < report["params"] < report["params_before"]  # padding costs parameters
    model.save_pretrained(tmp_path / "uniform")
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "uniform", dtype=torch.float64).eval()
    torch.testing.assert_close(logits(stock, ids), before, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logits(load_compact(tmp_path / "uniform"), ids), before, rtol=1e-6, atol=1e-6)


def test_loader_names_what_is_missing(tmp_path):
    with pytest.raises(NotCompactModel, match="is not a directory"):
        load_compact(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NotCompactModel, match="no config.json"):
        load_compact(tmp_path / "empty")
    tiny("opt").save_pretrained(tmp_path / "foreign")  # a plain Hugging Face model
    with pytest.raises(NotCompactModel, match=f"no '{KEY}' entry.*python -m surgeon.compact"):
        load_compact(tmp_path / "foreign")

    model = tiny("opt")
    with torch.no_grad():
        zero_rows(model, "fc1", slice(0, 10))
    compact(model)
    model.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").rename(tmp_path / "weights.bak")
    with pytest.raises(NotCompactModel, match="no model.safetensors"):
        load_compact(tmp_path / "m")
    (tmp_path / "weights.bak").rename(tmp_path / "m" / "model.safetensors")
    config_path = tmp_path / "m" / "config.json"
    config = json.loads(config_path.read_text())
    config[KEY]["layers"][0]["mlp"] = 60
    config_path.write_text(json.dumps(config))
    with pytest.raises(NotCompactModel, match="fc1.weight"):
        load_compact(tmp_path / "m")
    config[KEY]["layers"] = config[KEY]["layers"][:1]
    config_path.write_text(json.dumps(config))
    with pytest.raises(NotCompactModel, match="lists 1 blocks, num_hidden_layers is 2"):
        load_compact(tmp_path / "m")


def test_compact_command_on_a_saved_model(tmp_path):
    model = tiny("llama", dtype=torch.float32)
    with torch.no_grad():
        zero_rows(model, "gate", slice(0, 16))
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(4))
    before = logits(model, ids)
    model.save_pretrained(tmp_path / "zeroed")
    out = subprocess.run([sys.executable, "-m", "surgeon.compact", str(tmp_path / "zeroed"), str(tmp_path / "small")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["mlp_units"] == {"kept": 48 * 2 - 16, "total": 96}
    torch.testing.assert_close(logits(load_compact(tmp_path / "small"), ids), before, rtol=1e-5, atol=1e-5)


# --- the runner: compact=true on the testbed models --------------------------------------------------------

def removed_mlp_units(run_dir, model_type):
    """MLP hidden units the shots removed, from the masks in the run's checkpoint (not from compaction): an
    input row (fc1; gate or up) or the output column (fc2; down) removed."""
    state = torch.load(run_dir / "checkpoint.pt", weights_only=False)["state"]
    adapter = adapter_for(model_type)
    removed = total = 0
    for i in range(len(state["rows"]) // len(adapter.layer_paths)):
        name = lambda role: f"{adapter.blocks_path}.{i}.{adapter.layer_paths[role]}"  # noqa: E731
        dead = state["cols"][name(adapter.mlp_out)].clone()
        for role in filter(None, (adapter.mlp_activated, adapter.mlp_multiplied)):
            dead |= state["rows"][name(role)]
        removed, total = removed + int(dead.sum()), total + dead.numel()
    return removed, total


def check_runner_compact(tmp_path, model, target, max_windows, shots):
    from surgeon import runner
    from surgeon.evaluate import perplexity

    cfg = compose(["calib.n=8", "calib.seq_len=64", "calib.batch_size=4", f"eval.max_windows={max_windows}",
                   f"results={tmp_path}/records.jsonl", f"model={model}", "structure=structured", f"target={target}",
                   f"shots={shots}", "compact=true", "save_model=true"])
    record = runner.run(cfg, tmp_path / "run")
    c = record["compact"]
    assert c["ppl"] == pytest.approx(record["final_ppl"], rel=1e-5)
    removed, total = removed_mlp_units(tmp_path / "run", "opt" if model.startswith("opt") else "llama")
    assert removed > 0 and c["mlp_units"] == {"kept": total - removed, "total": total}
    loaded = surgeon.load_compact(record["model_dir"])  # the documented call
    hidden = loaded.config.hidden_size
    per_unit = 2 * hidden + 1 if model.startswith("opt") else 3 * hidden  # OPT: fc1 row, its bias, fc2 column
    assert c["params_before"] - c["params"] >= removed * per_unit
    assert parameter_count(loaded) == c["params"] and loaded.config.use_cache  # saved for generation
    windows = runner.prepare_data(cfg).eval_windows
    assert perplexity(loaded, windows, 8) == pytest.approx(record["final_ppl"], rel=1e-5)
    return record


@pytest.mark.parametrize("model,target", [("opt-tiny", 0.3), ("opt-tiny", 0.5), ("llama-tiny", 0.3),
                                          ("llama-tiny", 0.5)])
def test_runner_compact_keeps_perplexity_and_reloads(model, target, tmp_path, shared):
    check_runner_compact(tmp_path, model, target, max_windows=16, shots=1)


@pytest.mark.slow
@pytest.mark.parametrize("target", [0.3, 0.5])
@pytest.mark.parametrize("model", ["opt-tiny", "llama-tiny", "smollm2-135m"])
def test_runner_compact_all_windows_and_real_model(model, target, tmp_path, shared):
    """All test windows of the testbed models; the real model (when installed) on its first 32 windows."""
    if model == "smollm2-135m":
        from test_real_model import needs_real_model

        needs_real_model()
    check_runner_compact(tmp_path, model, target, max_windows=32 if model == "smollm2-135m" else "null", shots=2)
