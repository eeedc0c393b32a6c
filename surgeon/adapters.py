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
    """Finds the decoder blocks and their prunable Linear layers of one model family, and knows how its
    attention and MLP couple rows to columns (for compaction, `surgeon.compact`)."""

    model_types: tuple[str, ...] = ()
    blocks_path: str = ""
    layer_paths: dict[str, str] = {}  # role -> path inside one block
    attention_path: str = ""
    attention_out: str = ""     # role of the attention output projection (its columns are value dimensions)
    mlp_activated: str = ""     # role whose output goes through the activation
    mlp_multiplied: str | None = None  # role multiplied elementwise with the activation (gated MLPs)
    mlp_out: str = ""           # role reading the hidden units
    rotary: bool = False        # rotary position embedding: query/key dimensions keep their frequencies

    def mlp_activation(self, block: nn.Module) -> nn.Module:
        raise NotImplementedError

    def heads(self, attention: nn.Module) -> tuple[int, int, int]:
        """(query heads, key-value heads, head dimension) of one attention module as it is now."""
        raise NotImplementedError

    def set_heads(self, attention: nn.Module, heads: int, kv_heads: int, head_dim: int) -> None:
        """Tell a resized attention module its new head counts (its Linear layers are already resized)."""
        raise NotImplementedError

    def uniform_shape(self, shapes: list[dict], dense: list[tuple[int, int, int]]) -> dict:
        """The smallest padding (kv_heads, per_group, head_dim, mlp) that gives every block the same shapes the
        stock config can describe; `dense` is each block's (heads, kv_heads, head_dim) before compaction."""
        raise NotImplementedError

    def stock_config(self, config, shapes: list[dict]) -> bool:
        """Write `shapes` (one dict per block: heads, kv_heads, head_dim, mlp) into the model's own config
        fields when the stock model class can hold them (the same in every block); False when it cannot."""
        raise NotImplementedError

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
    attention_path = "self_attn"
    attention_out = "out"
    mlp_activated = "fc1"
    mlp_out = "fc2"

    def mlp_activation(self, block):
        return block.activation_fn

    def heads(self, attention):
        return attention.num_heads, attention.num_heads, attention.head_dim

    def set_heads(self, attention, heads, kv_heads, head_dim):
        # the query scaling stays the original head_dim ** -0.5: removed dimensions contributed nothing
        attention.num_heads, attention.head_dim = heads, head_dim

    def uniform_shape(self, shapes, dense):
        H, _, d = dense[0]  # OPT's config has one head count and derives head_dim: the attention stays whole
        return {"kv_heads": H, "per_group": 1, "head_dim": d, "mlp": max(s["mlp"] for s in shapes)}

    def stock_config(self, config, shapes):
        # OPTAttention derives head_dim from hidden_size / num_attention_heads: only the MLP width can change
        H, d = config.num_attention_heads, config.hidden_size // config.num_attention_heads
        if any((s["heads"], s["head_dim"]) != (H, d) for s in shapes) or len({s["mlp"] for s in shapes}) != 1:
            return False
        config.ffn_dim = shapes[0]["mlp"]
        return True


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
    attention_path = "self_attn"
    attention_out = "o"
    mlp_activated = "gate"
    mlp_multiplied = "up"
    mlp_out = "down"
    rotary = True

    def mlp_activation(self, block):
        return block.mlp.act_fn

    def heads(self, attention):
        d = attention.head_dim
        return attention.q_proj.out_features // d, attention.k_proj.out_features // d, d

    def set_heads(self, attention, heads, kv_heads, head_dim):
        if head_dim != attention.head_dim:
            raise ValueError(f"a rotary attention keeps head_dim {attention.head_dim}, got {head_dim}")
        attention.num_key_value_groups = heads // kv_heads

    def uniform_shape(self, shapes, dense):
        return {"kv_heads": max(s["kv_heads"] for s in shapes),
                "per_group": max(s["heads"] // s["kv_heads"] for s in shapes),
                "head_dim": dense[0][2], "mlp": max(s["mlp"] for s in shapes)}

    def stock_config(self, config, shapes):
        if len({(s["heads"], s["kv_heads"], s["mlp"]) for s in shapes}) != 1:
            return False
        config.head_dim = shapes[0]["head_dim"]  # explicit: it no longer equals hidden_size / heads
        config.num_attention_heads, config.num_key_value_heads = shapes[0]["heads"], shapes[0]["kv_heads"]
        config.intermediate_size = shapes[0]["mlp"]
        return True


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
