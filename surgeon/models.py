"""Loading a causal LM and its tokenizer: a local path, a Hugging Face hub name, or a GGUF file inside an
installed Python package (`model.name_or_path=pkg:NAME`, `model.gguf_file=FILE`)."""
from __future__ import annotations

import torch

from .config import model_path


def _source(cfg) -> tuple[str, dict]:
    """What `from_pretrained` is given: the resolved path and its keyword arguments."""
    kwargs = {"revision": cfg.model.get("revision")}
    if cfg.model.get("gguf_file"):
        kwargs["gguf_file"] = str(cfg.model.gguf_file)
    return model_path(cfg), kwargs


def load_tokenizer(cfg):
    """The model's tokenizer (cheap: loaded first, so that the data are checked before the model loads)."""
    from transformers import AutoTokenizer

    path, kwargs = _source(cfg)
    return AutoTokenizer.from_pretrained(path, **kwargs)


def load_model(cfg, device: torch.device):
    """Model in `model.dtype` (float32 for curvature) on `device`, in eval mode. A GGUF file is de-quantized into
    plain `nn.Linear` weights, and the model no longer claims to be quantized (see `drop_gguf_quantization`)."""
    from transformers import AutoModelForCausalLM

    path, kwargs = _source(cfg)
    if "gguf_file" in kwargs:
        from transformers import GgufConfig

        # dequantize=True: dense float weights, never GGUF blocks (with the `kernels` package transformers keeps
        # supported architectures packed); transformers then also drops its quantizer after loading
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    # attention through scaled_dot_product_attention (its memory-efficient kernels on CUDA)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, cfg.model.dtype), attn_implementation="sdpa",
                                                 **kwargs)
    drop_gguf_quantization(model)
    model.config.use_cache = False
    return model.to(device).eval()


def drop_gguf_quantization(model) -> None:
    """A model loaded from GGUF the default way keeps its quantizer (`model.hf_quantizer`) and
    `config.quantization_config` although its weights are de-quantized floats: `save_pretrained` then refuses it
    ("quantized with gguf and is not serializable") and a saved config would claim quantization. Drop both, with
    transformers' own `remove_quantization_config` (also `quantization_method` and the GGUF weight conversions, so
    saving uses the model class's own): `save_pretrained` then writes a float checkpoint that loads with a plain
    `from_pretrained(dir)`. A no-op for other models, and after a `GgufConfig(dequantize=True)` load, which does it."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and quantizer.quantization_config.quant_method == "gguf":
        quantizer.remove_quantization_config(model)
