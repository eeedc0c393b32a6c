"""The memory estimate before loading (surgeon.memory): exact where it counts tensors the run holds, and a refusal
in one line naming the memory and the settings that would fit."""
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, OPTConfig

from conftest import compose
from surgeon import config as config_mod
from surgeon import memory
from surgeon.adapters import adapter_for
from surgeon.config import ConfigError
from surgeon.curvature import estimate_curvature

CONFIGS = {
    "opt": OPTConfig(vocab_size=64, hidden_size=32, word_embed_proj_dim=32, ffn_dim=48, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=16),
    "llama": LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16),
}
LLAMA_7B = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)


def unique_bytes(factors):
    seen = {}
    for f in factors.values():
        for t in (f.A, f.G, f.A2, f.G2):
            if t is not None:
                seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())


@pytest.mark.parametrize("family", list(CONFIGS))
@pytest.mark.parametrize("kind", ["kfac", "diag_a", "identity"])
def test_factor_estimate_is_the_bytes_the_curvature_holds(family, kind):
    """The estimate's factors are exactly what estimate_curvature returns (shared A counted once)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[family]).eval()
    layers = adapter_for(model.config.model_type).layers(model)
    ids = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(0))
    factors = estimate_curvature(model, layers, list(ids.split(2)), kind=kind)
    assert memory.estimate(CONFIGS[family], kind=kind).factors == unique_bytes(factors)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert memory.estimate(CONFIGS[family]).weights == weights


def test_estimate_grows_with_batch_and_shrinks_with_half_precision():
    small = memory.estimate(LLAMA_7B, calib_batch=1, calib_seq_len=2048)
    big = memory.estimate(LLAMA_7B, calib_batch=8, calib_seq_len=2048)
    half = memory.estimate(LLAMA_7B, calib_batch=8, calib_seq_len=2048, dtype="bfloat16")
    assert small.activations < big.activations and half.weights * 2 == big.weights
    # Llama-2-7B: ~6.7e9 parameters; factors ~64 GB in float32 (A of q/k/v and gate/up shared)
    assert 6.5e9 < big.weights / 4 < 6.9e9 and 55 * 2**30 < big.factors < 70 * 2**30


def test_a_model_too_large_is_refused_before_loading(tmp_path, monkeypatch):
    LLAMA_7B.save_pretrained(tmp_path)  # config.json only: no weights exist, none are needed
    cfg = compose([f"model.name_or_path={tmp_path}", "model.name=llama-2-7b-shape", "model.params=null",
                   "device=cpu"])
    monkeypatch.setattr(memory, "available_bytes", lambda device: 24 * 2**30)
    with pytest.raises(ConfigError, match=r"needs about [0-9.]+ GiB \(weights 25\.\d.* but cpu has 24\.0 GiB; try"):
        config_mod.check_memory(cfg)
    monkeypatch.setattr(memory, "available_bytes", lambda device: 141 * 2**30)
    config_mod.check_memory(compose([f"model.name_or_path={tmp_path}", "model.name=x", "model.params=null",
                                     "device=cpu", "model.dtype=bfloat16", "structure=structured"]))
    # at 2048 tokens it fits 100 GiB only with fewer sequences per micro-batch and the factors in host memory
    monkeypatch.setattr(memory, "available_bytes", lambda device: 100 * 2**30)
    with pytest.raises(ConfigError, match=r"try calib.batch_size=[1-4] curvature.offload=cpu$"):
        config_mod.check_memory(compose([f"model.name_or_path={tmp_path}", "model.name=x", "model.params=null",
                                         "device=cpu", "calib.seq_len=2048", "eval.seq_len=2048"]))


def test_offload_moves_the_factors_off_the_device():
    on, off = (memory.estimate(LLAMA_7B, dtype="bfloat16", offload=o) for o in (False, True))
    assert off.factors < on.factors / 100 and off.peak < on.peak
