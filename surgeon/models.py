"""Loading a causal LM and its tokenizer: a local path or a Hugging Face hub name."""
from __future__ import annotations

import torch


def load_model(cfg, device: torch.device):
    """Model in `model.dtype` (float32 for curvature) on `device`, in eval mode, and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = str(cfg.model.name_or_path)
    revision = cfg.model.get("revision")
    dtype = getattr(torch, cfg.model.dtype)
    tokenizer = AutoTokenizer.from_pretrained(name, revision=revision)
    model = AutoModelForCausalLM.from_pretrained(name, revision=revision, dtype=dtype)
    model.config.use_cache = False
    return model.to(device).eval(), tokenizer
