"""Loading a causal LM and its tokenizer: a local path, a Hugging Face hub name, or a GGUF file inside an
installed Python package (`model.name_or_path=pkg:NAME`, `model.gguf_file=FILE`); on one device, or placed over
several by accelerate's device map (`model.device_map`, docs/distributed.md)."""
from __future__ import annotations

import torch

from .paths import model_path


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


def placement(cfg) -> dict:
    """`from_pretrained`'s `device_map` and `max_memory` from `model.device_map` and `model.max_memory`; {} without
    a device map. A GPU given as a number (`0`, also "0" from the command line) is passed as the int accelerate
    wants."""
    from omegaconf import DictConfig, OmegaConf

    device_map = cfg.model.get("device_map")
    if device_map is None:
        return {}
    if isinstance(device_map, DictConfig):
        device_map = {str(k): device_key(v) for k, v in OmegaConf.to_container(device_map).items()}
    kwargs = {"device_map": device_map}
    if cfg.model.get("max_memory") is not None:
        kwargs["max_memory"] = {device_key(k): v for k, v in OmegaConf.to_container(cfg.model.max_memory).items()}
    return kwargs


def device_key(value) -> int | str:
    """A device as accelerate names it: a GPU index as int, else the string (`cpu`, `cuda:1`)."""
    return int(value) if str(value).isdigit() else str(value)


def as_device(value) -> torch.device:
    """A device of a placement (`0`, `cuda:1`, `cpu`) as torch's; ValueError for anything else."""
    key = device_key(value)
    try:
        device = torch.device("cuda", key) if isinstance(key, int) else torch.device(key)
    except RuntimeError:
        raise ValueError(f"{value!r} is not a device") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{value!r} is not a device")
    return device


def check_placement(device_map: dict) -> None:
    """Refuse what accelerate offloads: modules on `disk`, or on `cpu` next to GPUs, keep their weights elsewhere
    and copy them in for each forward, so pruning could not edit them in place."""
    from .paths import ConfigError

    places = {str(v) for v in device_map.values()}
    offloaded = sorted(p for p in places if p == "disk" or (p == "cpu" and places != {"cpu"}))
    if offloaded:
        raise ConfigError(f"model.device_map placed modules on {' and '.join(offloaded)} (offloaded: weights copied "
                          "in per forward, which pruning cannot edit); give the GPUs more room in model.max_memory, "
                          "or use more or larger GPUs")


def placed(model) -> dict[str, str]:
    """Module name -> device, as placed: accelerate's map when it spread the model over several devices, else
    {"": the one device} (transformers sets `hf_device_map` only then)."""
    spread = getattr(model, "hf_device_map", None)
    return {name: str(where) for name, where in spread.items()} if spread else {"": str(devices(model)[0])}


def input_device(model) -> torch.device:
    """Where token ids go: the input embeddings' device (under a device map the first block's GPU)."""
    return model.get_input_embeddings().weight.device


def devices(model) -> list[torch.device]:
    """The devices holding the model's parameters (one without a device map)."""
    return sorted({p.device for p in model.parameters()}, key=str)


def attention(path: str, kwargs: dict) -> str:
    """Attention through scaled_dot_product_attention (its memory-efficient kernels on CUDA) where the family's
    class supports it; "eager" where it does not (Gemma 2: soft-capped attention logits)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, **kwargs)
    cls = AutoModelForCausalLM._model_mapping.get(type(config), None)
    return "sdpa" if cls is None or getattr(cls, "_supports_sdpa", False) else "eager"


def load_model(cfg, device: torch.device):
    """Model in `model.dtype` (float32 for curvature) on `device` in eval mode, or placed by `model.device_map`
    (`placement`; then `device` is unused). A GGUF file is de-quantized into plain `nn.Linear` weights, and the
    model no longer claims to be quantized (see `drop_gguf_quantization`)."""
    from transformers import AutoModelForCausalLM

    path, kwargs = _source(cfg)
    if "gguf_file" in kwargs:
        from transformers import GgufConfig

        # dequantize=True: dense float weights, never GGUF blocks (with the `kernels` package transformers keeps
        # supported architectures packed); transformers then also drops its quantizer after loading
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    place = placement(cfg)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, cfg.model.dtype),
                                                 attn_implementation=attention(path, _source(cfg)[1]), **kwargs,
                                                 **place)
    drop_gguf_quantization(model)
    model.config.use_cache = False
    if place:
        check_placement(placed(model))
        return model.eval()
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
