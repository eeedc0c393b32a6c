"""One small adapter per architecture family: which layers are prunable, and how their rows couple.

Everything model-specific lives here so the rest of the package never branches on the model type. A prunable
layer is an `nn.Linear` or a transformers `Conv1D` (GPT-2: weight stored transposed, (in, out)); the rest of the
package reads it through `PrunableLayer.weight`, always (out, in). A fused projection (Phi-3's `qkv_proj` and
`gate_up_proj`, GPT-2's `c_attn`, GPT-NeoX's `query_key_value`) is one prunable layer described once by `Fused`:
which roles its rows hold and in what order, which curvature, selection, update, compaction and save all read.
`FAMILIES` is the table of supported families (the README's list and the conformance tests read it).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn


def conv1d(module: nn.Module) -> bool:
    """A transformers `Conv1D` (GPT-2's Linear with its weight stored as (in, out))."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def matrix(module: nn.Module) -> Tensor:
    """The weight as (out, in), a view of the parameter (writes go through)."""
    return module.weight.T if conv1d(module) else module.weight


@dataclass(frozen=True)
class PrunableLayer:
    """One prunable Linear or Conv1D (or a routed expert's slice of a fused expert parameter, `surgeon.moe`):
    `name` is its module path in the model (an expert's: `...mlp.experts.<e>.gate_up`)."""

    name: str
    type: str  # short role name shared across families, e.g. "q", "fc1", "gate", "qkv", "expert_down"
    block: int
    module: nn.Module
    expert: int | None = None  # a routed expert's index: its inputs are only the tokens routed to it

    @property
    def weight(self) -> Tensor:
        """(out, in) view of the weight, whatever layout the module stores."""
        return matrix(self.module)

    @property
    def bias(self) -> Tensor | None:
        return self.module.bias

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]


@dataclass(frozen=True)
class Fused:
    """The rows of one fused projection: `parts` (roles) in order, either concatenated whole
    (Phi-3 q|k|v and gate|up, GPT-2 q|k|v) or `per_head` (GPT-NeoX: head 0's q|k|v, head 1's q|k|v, ...)."""

    parts: tuple[str, ...]
    per_head: bool = False

    def rows(self, sizes: dict[str, int], head_dim: int) -> dict[str, Tensor]:
        """Row indices of every part inside the fused weight, from each part's row count."""
        if self.per_head:
            heads = sizes[self.parts[0]] // head_dim
            grid = torch.arange(heads * len(self.parts) * head_dim).view(heads, len(self.parts), head_dim)
            return {role: grid[:, i].flatten() for i, role in enumerate(self.parts)}
        out, start = {}, 0
        for role in self.parts:
            out[role] = torch.arange(start, start + sizes[role])
            start += sizes[role]
        return out

    def join(self, selected: dict[str, Tensor], head_dim: int) -> Tensor:
        """The inverse of `rows` for a new, smaller layout: row indices into the old fused weight, given each part's
        kept rows (as old fused indices), laid out in this fusion's order."""
        if self.per_head:
            return torch.stack([selected[role].view(-1, head_dim) for role in self.parts], 1).flatten()
        return torch.cat([selected[role] for role in self.parts])


@dataclass
class Part:
    """The rows of one role (q, k, v, gate, up, ...) inside its module: all rows, or a fused module's share."""

    module: nn.Module
    rows: Tensor | None = None

    @property
    def weight(self) -> Tensor:
        W = matrix(self.module)
        return W if self.rows is None else W[self.rows.to(W.device)]

    @property
    def bias(self) -> Tensor | None:
        b = self.module.bias
        return b if b is None or self.rows is None else b[self.rows.to(b.device)]

    def index(self, mask: Tensor) -> Tensor:
        """Rows of the module selected by a mask over this part's rows."""
        where = torch.nonzero(mask.cpu()).flatten()
        return where if self.rows is None else self.rows[where]


class Adapter:
    """Finds the decoder blocks and their prunable layers of one model family, and knows how its attention and MLP
    couple rows to columns (for compaction, `surgeon.compact`)."""

    model_types: tuple[str, ...] = ()
    families: dict[str, str] = {}     # model_type -> what the family is (the README's table)
    blocks_path: str = ""
    layer_paths: dict[str, str] = {}  # role -> path inside one block
    summaries: dict[str, str] = {}    # model_type -> the family table's layer list, where layer_paths would mislead
    fused: dict[str, Fused] = {}      # role of a fused layer -> the roles its rows hold
    attention_path: str = ""
    attention_out: str = ""     # role of the attention output projection (its columns are value dimensions)
    mlp_activated: str = ""     # role whose output goes through the activation
    mlp_multiplied: str | None = None  # role multiplied elementwise with the activation (gated MLPs)
    mlp_out: str = ""           # role reading the hidden units
    mlp_path: str = "mlp"
    activation: str = "act_fn"  # attribute of the MLP module holding its activation
    rotary: bool = False        # rotary position embedding: query/key dimensions keep their frequencies

    def mlp_activation(self, block: nn.Module) -> nn.Module:
        return getattr(block.get_submodule(self.mlp_path) if self.mlp_path else block, self.activation)

    def heads(self, attention: nn.Module) -> tuple[int, int, int]:
        """(query heads, key-value heads, head dimension) of one attention module as it is now."""
        raise NotImplementedError

    def heads_removable(self, attention: nn.Module) -> bool:
        """Compaction may remove whole heads (False where a norm reads all of q or k at once)."""
        return True

    def set_heads(self, attention: nn.Module, heads: int, kv_heads: int, head_dim: int) -> None:
        """Tell a resized attention module its new head counts (its layers are already resized)."""
        raise NotImplementedError

    def uniform_shape(self, shapes: list[dict], dense: list[tuple[int, int, int]]) -> dict:
        """The smallest padding (kv_heads, per_group, head_dim, mlp) that gives every block the same shapes the
        stock config can describe; `dense` is each block's (heads, kv_heads, head_dim) before compaction."""
        raise NotImplementedError

    def stock_config(self, config, shapes: list[dict]) -> bool:
        """Write `shapes` (one dict per block: heads, kv_heads, head_dim, mlp) into the model's own config
        fields when the stock model class can hold them (the same in every block); False when it cannot."""
        raise NotImplementedError

    def text_config(self, config):
        """The config holding the decoder's sizes (a multimodal checkpoint's text tower: its text_config)."""
        return config

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

    def home(self, role: str) -> str:
        """The layer role that holds `role`'s rows: the fused layer's, or its own."""
        return next((fused for fused, spec in self.fused.items() if role in spec.parts), role)

    def sizes(self, block: nn.Module) -> dict[str, int]:
        """Rows of every part role of one block as it is now."""
        H, K, d = self.heads(block.get_submodule(self.attention_path))
        units = matrix(block.get_submodule(self.layer_paths[self.mlp_out])).shape[1]
        sizes = {"q": H * d, "k": K * d, "v": K * d, self.mlp_activated: units}
        if self.mlp_multiplied:
            sizes[self.mlp_multiplied] = units
        return sizes

    def part(self, block: nn.Module, role: str) -> Part:
        """The rows of `role` (q, k, v, the MLP's activated/multiplied inputs, or any layer role) in one block."""
        home = self.home(role)
        module = block.get_submodule(self.layer_paths[home])
        if home == role:
            return Part(module)
        _, _, d = self.heads(block.get_submodule(self.attention_path))
        return Part(module, self.fused[home].rows(self.sizes(block), d)[role])

    def row_groups(self, layer: PrunableLayer, block: nn.Module) -> dict[str, Tensor]:
        """Which rows of a layer belong to which part (for a fused layer), as index tensors; {} when unfused."""
        spec = self.fused.get(layer.type)
        if spec is None:
            return {}
        _, _, d = self.heads(block.get_submodule(self.attention_path))
        return spec.rows(self.sizes(block), d)


class _StockHeads(Adapter):
    """Families whose config derives head_dim from hidden_size / heads (OPT, GPT-2, GPT-NeoX): a stock config can
    only narrow the MLP, so the attention stays whole in a uniform (stock-loadable) compaction."""

    mlp_width: str = ""  # the config field of the MLP width

    def uniform_shape(self, shapes, dense):
        H, _, d = dense[0]
        return {"kv_heads": H, "per_group": 1, "head_dim": d, "mlp": max(s["mlp"] for s in shapes)}

    def stock_config(self, config, shapes):
        H = config.num_attention_heads
        d = config.hidden_size // H
        if any((s["heads"], s["head_dim"]) != (H, d) for s in shapes) or len({s["mlp"] for s in shapes}) != 1:
            return False
        setattr(config, self.mlp_width, shapes[0]["mlp"])
        return True


class OPTAdapter(_StockHeads):
    model_types = ("opt",)
    families = {"opt": "OPT: biases, ReLU, learned positions"}
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
    mlp_path = ""
    activation = "activation_fn"
    mlp_width = "ffn_dim"

    def heads(self, attention):
        return attention.num_heads, attention.num_heads, attention.head_dim

    def set_heads(self, attention, heads, kv_heads, head_dim):
        # the query scaling stays the original head_dim ** -0.5: removed dimensions contributed nothing
        attention.num_heads, attention.head_dim = heads, head_dim


class GPT2Adapter(_StockHeads):
    """GPT-2: Conv1D layers, q|k|v fused in `c_attn`, biases everywhere, learned positions (no rotary)."""

    model_types = ("gpt2",)
    families = {"gpt2": "GPT-2: Conv1D layers (weight stored (in, out)), q/k/v fused in c_attn, biases"}
    blocks_path = "transformer.h"
    layer_paths = {"qkv": "attn.c_attn", "out": "attn.c_proj", "fc": "mlp.c_fc", "proj": "mlp.c_proj"}
    fused = {"qkv": Fused(("q", "k", "v"))}
    attention_path = "attn"
    attention_out = "out"
    mlp_activated = "fc"
    mlp_out = "proj"
    activation = "act"
    mlp_width = "n_inner"

    def heads(self, attention):
        return attention.num_heads, attention.num_heads, attention.head_dim

    def set_heads(self, attention, heads, kv_heads, head_dim):
        # `scaling` keeps the original head_dim ** -0.5 (fixed when the module was built)
        attention.num_heads, attention.head_dim = heads, head_dim
        attention.split_size = attention.embed_dim = heads * head_dim


class GPTNeoXAdapter(_StockHeads):
    """GPT-NeoX (Pythia): q|k|v fused in `query_key_value`, interleaved per head; rotary on (a part of) each head;
    attention and MLP in parallel from two norms of one input (`use_parallel_residual`), which changes nothing here:
    each layer still has its own input."""

    model_types = ("gpt_neox",)
    families = {"gpt_neox": "GPT-NeoX / Pythia: q/k/v fused and interleaved per head, partial rotary, "
                            "parallel residual"}
    blocks_path = "gpt_neox.layers"
    layer_paths = {"qkv": "attention.query_key_value", "dense": "attention.dense",
                   "h_to_4h": "mlp.dense_h_to_4h", "4h_to_h": "mlp.dense_4h_to_h"}
    fused = {"qkv": Fused(("q", "k", "v"), per_head=True)}
    attention_path = "attention"
    attention_out = "dense"
    mlp_activated = "h_to_4h"
    mlp_out = "4h_to_h"
    activation = "act"
    rotary = True
    mlp_width = "intermediate_size"

    def heads(self, attention):
        d = attention.head_size
        H = attention.dense.in_features // d
        return H, H, d

    def set_heads(self, attention, heads, kv_heads, head_dim):
        if head_dim != attention.head_size:
            raise ValueError(f"a rotary attention keeps head_dim {attention.head_size}, got {head_dim}")
        # the forward reads the head count from the fused output's width


class LlamaAdapter(Adapter):
    """Llama-2/3 and the families with its layout: Mistral, Qwen2 (q/k/v biases), Qwen3 (q/k norms over head_dim),
    Gemma 2/3 (q/k norms, pre- and post-norms, explicit head_dim, GELU-tanh gated MLP, sliding-window layers)."""

    model_types = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text")
    families = {"llama": "Llama-2/3: grouped-query attention, SwiGLU, rotary",
                "mistral": "Mistral: Llama layout, sliding-window attention",
                "qwen2": "Qwen2/2.5: Llama layout with q/k/v biases",
                "qwen3": "Qwen3: Llama layout with q/k norms over head_dim",
                "gemma2": "Gemma 2: q/k/v/o, pre- and post-norms, soft-capping, explicit head_dim, GELU-tanh gated MLP",
                "gemma3_text": "Gemma 3 (text): as Gemma 2 with q/k norms and sliding-window layers"}
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

    def heads(self, attention):
        d = attention.head_dim
        return attention.o_proj.in_features // d, self._kv_heads(attention, d), d

    def _kv_heads(self, attention, d: int) -> int:
        return attention.k_proj.out_features // d

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
        config = self.text_config(config)
        config.head_dim = shapes[0]["head_dim"]  # explicit: it no longer equals hidden_size / heads
        config.num_attention_heads, config.num_key_value_heads = shapes[0]["heads"], shapes[0]["kv_heads"]
        config.intermediate_size = shapes[0]["mlp"]
        return True


class Gemma3Adapter(LlamaAdapter):
    """The text tower of a multimodal Gemma 3 checkpoint (`gemma3`); the vision tower is never pruned."""

    model_types = ("gemma3",)
    families = {"gemma3": "Gemma 3 multimodal checkpoint: its text tower (the vision tower is not pruned)"}
    blocks_path = "model.language_model.layers"

    def text_config(self, config):
        return config.text_config


class Phi3Adapter(LlamaAdapter):
    """Phi-3: q|k|v fused in `qkv_proj`, gate|up fused in `gate_up_proj` (gate first)."""

    model_types = ("phi3",)
    families = {"phi3": "Phi-3: q/k/v fused in qkv_proj, gate/up fused in gate_up_proj"}
    layer_paths = {"qkv": "self_attn.qkv_proj", "o": "self_attn.o_proj", "gate_up": "mlp.gate_up_proj",
                   "down": "mlp.down_proj"}
    fused = {"qkv": Fused(("q", "k", "v")), "gate_up": Fused(("gate", "up"))}
    activation = "activation_fn"

    def _kv_heads(self, attention, d):
        return attention.num_key_value_heads

    def set_heads(self, attention, heads, kv_heads, head_dim):
        super().set_heads(attention, heads, kv_heads, head_dim)
        # the forward splits q from k|v at config.num_attention_heads * head_dim: a block of its own width gets
        # a config of its own
        if attention.config.num_attention_heads != heads:
            attention.config = copy.copy(attention.config)
            attention.config.num_attention_heads = heads
        attention.num_key_value_heads = kv_heads


class MoEAdapter(LlamaAdapter):
    """Mixture-of-experts families (`surgeon.moe`): Llama-style attention; each block's MLP is a dense one or a
    sparse MoE block, whose routed experts' gate|up and down slices are prunable layers of their own (types
    `expert_gate_up`, fused gate then up, and `expert_down`), plus Qwen2-MoE's shared expert (`shared_gate`,
    `shared_up`, `shared_down`); the router and `shared_expert_gate` are never pruned."""

    model_types = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
    families = {"mixtral": "Mixtral: Llama attention, top-2 of 8 routed SwiGLU experts",
                "qwen2_moe": "Qwen2-MoE: q/k/v biases, routed experts and a gated shared expert",
                "qwen3_moe": "Qwen3-MoE: q/k norms over head_dim, routed experts",
                "olmoe": "OLMoE: q/k norms over the whole projection, routed experts"}
    layer_paths = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                   "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
                   "expert_gate_up": "mlp.experts.gate_up_proj", "expert_down": "mlp.experts.down_proj",
                   "shared_gate": "mlp.shared_expert.gate_proj", "shared_up": "mlp.shared_expert.up_proj",
                   "shared_down": "mlp.shared_expert.down_proj"}
    fused = {"expert_gate_up": Fused(("expert_gate", "expert_up"))}
    attention_roles = ("q", "k", "v", "o")
    _routed = ("`self_attn.{q,k,v,o}_proj`; per routed expert e: `mlp.experts.gate_up_proj[e]` (gate/up), "
               "`mlp.experts.down_proj[e]`")
    _dense = "; dense-MLP blocks (`mlp_only_layers`): `mlp.{gate,up,down}_proj`"
    summaries = {"mixtral": _routed, "olmoe": _routed, "qwen3_moe": _routed + _dense,
                 "qwen2_moe": _routed + ", `mlp.shared_expert.{gate,up,down}_proj`" + _dense}

    def layers(self, model):
        from . import moe

        out = []
        for i, block in enumerate(self.blocks(model)):
            prefix = f"{self.blocks_path}.{i}"
            roles = list(self.attention_roles)
            mlp = block.get_submodule(self.mlp_path)
            sparse = moe.is_moe(mlp)
            if not sparse:
                roles += ["gate", "up", "down"]
            for role in roles:
                path = self.layer_paths[role]
                out.append(PrunableLayer(f"{prefix}.{path}", role, i, block.get_submodule(path)))
            if not sparse:
                continue
            linears = moe.expert_linears(mlp.experts)
            moe.attach_router(mlp)
            for e in range(len(linears["expert_down"])):
                for role in ("expert_gate_up", "expert_down"):
                    out.append(PrunableLayer(f"{prefix}.{self.mlp_path}.experts.{e}.{role[len('expert_'):]}", role,
                                             i, linears[role][e], expert=e))
            if hasattr(mlp, "shared_expert"):
                for role in ("shared_gate", "shared_up", "shared_down"):
                    path = self.layer_paths[role]
                    out.append(PrunableLayer(f"{prefix}.{path}", role, i, block.get_submodule(path)))
        return out

    def row_groups(self, layer, block):
        if layer.type != "expert_gate_up":
            return {}
        units = layer.out_features // 2
        return self.fused["expert_gate_up"].rows({"expert_gate": units, "expert_up": units}, 1)

    def heads_removable(self, attention):
        # OLMoE normalises q and k over the whole projection: a head's rows change the others' scale
        norm = getattr(attention, "q_norm", None)
        return norm is None or norm.weight.numel() == attention.head_dim

    def uniform_shape(self, shapes, dense):
        out = {"kv_heads": max(s["kv_heads"] for s in shapes),
               "per_group": max(s["heads"] // s["kv_heads"] for s in shapes), "head_dim": dense[0][2]}
        for key in ("mlp", "experts", "shared"):  # dense-MLP blocks, routed experts, shared experts: each its width
            widths = [s[key] for s in shapes if key in s]
            if widths:
                out[key] = max(widths)
        return out

    def stock_config(self, config, shapes):
        widths = {key: {s[key] for s in shapes if key in s} for key in ("mlp", "experts", "shared")}
        count = "num_local_experts" if hasattr(config, "num_local_experts") else "num_experts"
        counts = {s.get("num_experts", getattr(config, count)) for s in shapes if "experts" in s}
        if (len({(s["heads"], s["kv_heads"]) for s in shapes}) != 1 or any(len(w) > 1 for w in widths.values())
                or len(counts) > 1):
            return False
        if counts:  # moe.whole_experts: every block kept as many experts
            setattr(config, count, counts.pop())
        config.head_dim = shapes[0]["head_dim"]
        config.num_attention_heads, config.num_key_value_heads = shapes[0]["heads"], shapes[0]["kv_heads"]
        fields = {"mlp": "intermediate_size", "shared": "shared_expert_intermediate_size",
                  "experts": "moe_intermediate_size" if hasattr(config, "moe_intermediate_size")
                  else "intermediate_size"}
        for key, width in widths.items():
            if width:
                setattr(config, fields[key], width.pop())
        return True


ADAPTERS = (OPTAdapter, LlamaAdapter, Gemma3Adapter, Phi3Adapter, GPT2Adapter, GPTNeoXAdapter, MoEAdapter)
# roles of separate layers that read one input tensor: they share one Kronecker factor A
SHARED_INPUTS = (("q", "k", "v"), ("gate", "up"), ("shared_gate", "shared_up"))


def supported_model_types() -> list[str]:
    return sorted(t for cls in ADAPTERS for t in cls.model_types)


def family_table() -> str:
    """The README's table of supported families (tests/test_families.py checks the README holds it)."""
    lines = ["| `model_type` | family | prunable layers per block (fused: parts) |", "|---|---|---|"]
    for cls in ADAPTERS:
        adapter = cls()
        layers = ", ".join(f"`{path}`" + (f" ({'/'.join(adapter.fused[role].parts)}"
                                         f"{', per head' if adapter.fused[role].per_head else ''})"
                                         if role in adapter.fused else "")
                           for role, path in adapter.layer_paths.items())
        for model_type in cls.model_types:
            listed = adapter.summaries.get(model_type, layers)
            lines.append(f"| `{model_type}` | {cls.families[model_type]} | {listed} |")
    return "\n".join(lines)


def adapter_for(model_type: str) -> Adapter:
    """The adapter for a transformers `config.model_type`, or a clear error."""
    for cls in ADAPTERS:
        if model_type in cls.model_types:
            return cls()
    raise ValueError(f"model type '{model_type}' is not supported; supported model types: "
                     f"{', '.join(supported_model_types())}")


def prunable_parameter_count(layers: list[PrunableLayer]) -> int:
    """Weight-matrix entries of all prunable layers (biases are never counted)."""
    return sum(layer.weight.numel() for layer in layers)


@torch.no_grad()
def weight_with_bias(layer: nn.Module) -> torch.Tensor:
    """W (out, in) with the bias appended as the last column (input 1), as the curvature sees it."""
    W = matrix(layer)
    if layer.bias is None:
        return W.clone()
    return torch.cat([W, layer.bias[:, None]], dim=1)


@torch.no_grad()
def set_weight_with_bias(layer: nn.Module, W: torch.Tensor) -> None:
    """Inverse of `weight_with_bias`."""
    weight = matrix(layer)
    C = weight.shape[1]
    weight.copy_(W[:, :C].to(weight.dtype))
    if layer.bias is not None:
        layer.bias.copy_(W[:, C].to(layer.bias.dtype))
