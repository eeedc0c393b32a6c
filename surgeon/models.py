"""Loading a causal LM and its tokenizer: a local path or a Hugging Face hub name."""
from __future__ import annotations

import torch


def load_tokenizer(cfg):
    """The model's tokenizer (cheap: loaded first, so that the data are checked before the model loads)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(cfg.model.name_or_path), revision=cfg.model.get("revision"))


def load_model(cfg, device: torch.device):
    """Model in `model.dtype` (float32 for curvature) on `device`, in eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(cfg.model.name_or_path), revision=cfg.model.get("revision"),
                                                 dtype=getattr(torch, cfg.model.dtype))
    model.config.use_cache = False
    return model.to(device).eval()
