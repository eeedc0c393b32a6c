"""GGUF files of other families than SmolLM2's Llama run through surgeon with `model.gguf_file`: no such file exists
offline, so a tiny random-init model is written as GGUF here (gguf's own writer, llama.cpp's tensor names from gguf's
name map, the testbed tokenizer as a byte-level BPE "gpt2" GGUF tokenizer) and read back by transformers."""
import json

import pytest
import torch
import transformers as T

from conftest import compose

gguf = pytest.importorskip("gguf")

IDS = dict(pad_token_id=1, bos_token_id=0, eos_token_id=2)  # the testbed tokenizer's <pad>, <s>, </s>
SIZES = dict(vocab_size=4096, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, **IDS)
CONFIGS = {"qwen2": lambda: T.Qwen2Config(**SIZES), "phi3": lambda: T.Phi3Config(**SIZES)}


def write_gguf(model, path, tokenizer_json) -> None:
    """`model` as an unquantized (float32) GGUF file that transformers' GGUF reader loads back."""
    config = model.config
    arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == config.model_type)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    w = gguf.GGUFWriter(str(path), config.model_type)
    w.add_context_length(config.max_position_embeddings)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_embedding_length(config.hidden_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_freq_base(config.rope_parameters["rope_theta"])
    w.add_vocab_size(config.vocab_size)
    tok = json.loads(tokenizer_json.read_text())
    tokens = [None] * len(tok["model"]["vocab"])
    for token, i in tok["model"]["vocab"].items():
        tokens[i] = token
    added = {a["id"] for a in tok.get("added_tokens", [])}
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if i in added else 1 for i in range(len(tokens))])  # 3: control, 1: normal
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    w.add_bos_token_id(IDS["bos_token_id"])
    w.add_eos_token_id(IDS["eos_token_id"])
    w.add_pad_token_id(IDS["pad_token_id"])
    for hf_name, tensor in model.state_dict().items():
        name, suffix = hf_name.rsplit(".", 1)
        w.add_tensor(f"{names.get_name(name)}.{suffix}", tensor.float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def gguf_dirs(tmp_path_factory):
    from surgeon.config import shared_dir

    if not (shared_dir() / "models").is_dir():
        pytest.skip(f"testbed not found at {shared_dir()} (set SURGEON_SHARED)")
    out = {}
    for model_type, config in CONFIGS.items():
        torch.manual_seed(0)
        model = T.AutoModelForCausalLM.from_config(config()).eval()
        folder = tmp_path_factory.mktemp(model_type)
        tokenizer = shared_dir() / "models" / "llama-tiny-wt2" / "tokenizer.json"
        write_gguf(model, folder / f"tiny-{model_type}.gguf", tokenizer)
        out[model_type] = (folder, model)
    text = tmp_path_factory.mktemp("text")
    for split in ("valid", "test"):
        (text / f"{split}.txt").write_text((shared_dir() / "data" / "wikitext-2" / f"{split}.txt").read_text()[:20000])
    out["text"] = text
    return out


def overrides(dirs, model_type, tmp_path):
    folder, _ = dirs[model_type]
    text = dirs["text"]
    return [f"model.name_or_path={folder}", f"model.gguf_file=tiny-{model_type}.gguf", f"model.name={model_type}-gguf",
            "data=text", f"data.calib_path={text / 'valid.txt'}", f"data.eval_path={text / 'test.txt'}", "calib.n=4",
            "calib.seq_len=32", "calib.batch_size=4", "eval.seq_len=32", "eval.max_windows=2", "shots=2",
            "update.tol=1e-6", f"results={tmp_path}/records.jsonl"]


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_transformers_reads_the_written_gguf_back(model_type, gguf_dirs, shared):
    folder, source = gguf_dirs[model_type]
    loaded = T.AutoModelForCausalLM.from_pretrained(folder, gguf_file=f"tiny-{model_type}.gguf").eval()
    ids = torch.randint(0, 4096, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, source(ids).logits, rtol=1e-5, atol=1e-5)
    text = "The quick brown fox , said @-@ the <unk> fox ."
    tokenizer = T.AutoTokenizer.from_pretrained(folder, gguf_file=f"tiny-{model_type}.gguf")
    assert tokenizer(text).input_ids == T.AutoTokenizer.from_pretrained(shared / "models" / "llama-tiny-wt2")(
        text).input_ids


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_a_gguf_file_of_another_family_runs_with_model_gguf_file(model_type, gguf_dirs, tmp_path):
    """Unstructured: complete at the target, saved as a float checkpoint that a plain from_pretrained loads with the
    run's perplexity; structured with compact=true: the compacted model's perplexity is the zeroed one's."""
    from surgeon import runner
    from surgeon.evaluate import perplexity

    base = overrides(gguf_dirs, model_type, tmp_path)
    cfg = compose([*base, "structure=unstructured", "target=0.5", "save_model=true"])
    record = runner.run(cfg, tmp_path / "unstructured")
    assert record["status"] == "complete" and record["sparsity"] == pytest.approx(0.5, abs=1e-4)
    saved = T.AutoModelForCausalLM.from_pretrained(record["model_dir"], dtype=torch.float32).eval()
    windows = runner.prepare_data(cfg).eval_windows
    assert perplexity(saved, windows, 8) == pytest.approx(record["final_ppl"], rel=1e-6)

    record = runner.run(compose([*base, "structure=structured", "target=0.3", "compact=true"]), tmp_path / "structured")
    assert record["status"] == "complete" and record["compact"]["params"] < record["compact"]["params_before"]
    assert record["compact"]["ppl"] == pytest.approx(record["final_ppl"], rel=1e-5)
