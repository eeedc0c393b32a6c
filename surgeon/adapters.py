"""One small adapter per architecture family: which Linear layers are prunable, and how.

Everything model-specific lives here so the rest of the package never branches on
the model type.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class PrunableLayer:
    """One prunable `nn.Linear`: `name` is its module path in the model."""

    name: str
    type: str  # short role name shared across families, e.g. "q", "fc1", "gate"
    block: int
    module: nn.Linear

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.module.weight.shape)


class Adapter:
    """Finds the decoder blocks and their prunable Linear layers of one model family."""

    model_types: tuple[str, ...] = ()
    blocks_path: str = ""
    layer_paths: dict[str, str] = {}  # role -> path inside one block

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.blocks_path)

    def layers(self, model: nn.Module) -> list[PrunableLayer]:
        out = []
        for i, block in enumerate(self.blocks(model)):
            for role, path in self.layer_paths.items():
                module = block.get_submodule(path)
                name = f"{self.blocks_path}.{i}.{path}"
                out.append(PrunableLayer(name=name, type=role, block=i, module=module))
        return out


class OPTAdapter(Adapter):
    model_types = ("opt",)
    blocks_path = "model.decoder.layers"
    layer_paths = {
        "q": "self_attn.q_proj",
        "k": "self_attn.k_proj",
        "v": "self_attn.v_proj",
        "out": "self_attn.out_proj",
        "fc1": "fc1",
        "fc2": "fc2",
    }


class LlamaAdapter(Adapter):
    model_types = ("llama", "mistral", "qwen2", "qwen3")
    blocks_path = "model.layers"
    layer_paths = {
        "q": "self_attn.q_proj",
        "k": "self_attn.k_proj",
        "v": "self_attn.v_proj",
        "o": "self_attn.o_proj",
        "gate": "mlp.gate_proj",
        "up": "mlp.up_proj",
        "down": "mlp.down_proj",
    }


ADAPTERS = (OPTAdapter, LlamaAdapter)
# roles that read one input tensor in every family: they share one Kronecker factor A
SHARED_INPUTS = (("q", "k", "v"), ("gate", "up"))


def adapter_for(model_type: str) -> Adapter:
    """The adapter for a transformers `config.model_type`, or a clear error."""
    for cls in ADAPTERS:
        if model_type in cls.model_types:
            return cls()
    known = sorted(t for cls in ADAPTERS for t in cls.model_types)
    raise ValueError(f"model type '{model_type}' is not supported; supported model types: {known}")


def prunable_parameter_count(layers: list[PrunableLayer]) -> int:
    """Weight-matrix entries of all prunable layers (biases are never counted)."""
    return sum(layer.module.weight.numel() for layer in layers)


@torch.no_grad()
def weight_with_bias(layer: nn.Linear) -> torch.Tensor:
    """W with the bias appended as the last column (input 1), as the curvature sees it."""
    W = layer.weight
    if layer.bias is None:
        return W.clone()
    return torch.cat([W, layer.bias[:, None]], dim=1)


@torch.no_grad()
def set_weight_with_bias(layer: nn.Linear, W: torch.Tensor) -> None:
    """Inverse of `weight_with_bias`."""
    C = layer.weight.shape[1]
    layer.weight.copy_(W[:, :C].to(layer.weight.dtype))
    if layer.bias is not None:
        layer.bias.copy_(W[:, C].to(layer.bias.dtype))
