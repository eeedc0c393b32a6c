"""Compaction: a structured-pruned model made physically smaller, exactly (docs/algorithm.md section 9).

Structured pruning leaves whole rows and columns of zeros. A unit goes when its removal cannot change the
output, read from the weights themselves (so any saved model can be compacted, not only one with masks):
- an MLP hidden unit when its activated input row is zero (with its bias, and the activation maps 0 to 0),
  its multiplied input row is zero (gated MLPs: the product is zero), or its output column is zero;
- a value dimension of a query head when its value row (with bias) or its output-projection column is zero;
  a query head when all its value dimensions are; a key-value head when all the query heads it serves are;
- a query/key dimension when its query row (with bias) is zero or its key row's weights are (a key bias
  shifts all scores of a query alike), only where the attention has no rotary embedding (a rotary
  dimension's frequency is fixed by its place in the head).
A row whose weights are zero but whose bias is not (its input columns were all removed) gives every token the
same value: a value row, or an MLP unit whose input rows all are, is folded into the next layer's bias first.
The stock attention needs one head dimension for query, key and value in a layer and, with grouped-query
attention, as many query heads for every key-value head: a layer keeps the largest count any kept head needs
and pads the others with dead heads or dimensions of their own group, left as zeros and counted
(`zeros_left`). The residual stream (embedding width) is never narrowed: the layer norms read all of it.

A compacted model is a Hugging Face directory (`save_pretrained`) whose config carries the per-block shapes
under `surgeon_compact`; `load_compact(path)` returns the stock transformers class with resized modules. When
every block has the same shapes the config's own size fields are rewritten too, and a plain
`AutoModelForCausalLM.from_pretrained(path)` loads it (`stock_loadable`).

`python -m surgeon.compact SRC DST` compacts a saved (zeroed) model directory.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .adapters import Adapter, Part, adapter_for, conv1d, matrix

KEY = "surgeon_compact"   # config.json entry of a compacted model
FORMAT = 1


@torch.no_grad()
def _live_rows(part: Part) -> Tensor:
    live = (part.weight != 0).any(1)
    return live | (part.bias != 0) if part.bias is not None else live


@torch.no_grad()
def _live_cols(part: Part) -> Tensor:
    return (part.weight != 0).any(0)


def _keep(live: Tensor, n: int) -> Tensor:
    """Indices of the live entries padded with the first dead ones to n entries, in their original order."""
    order = torch.argsort((~live).to(torch.int8), stable=True)  # live first, each part in original order
    return order[:n].sort().values


@dataclass
class BlockPlan:
    """What one decoder block keeps, as indices into its current modules."""

    heads: Tensor     # kept query heads, grouped by the kept key-value head they read
    kv_heads: Tensor  # kept key-value heads
    q_dims: Tensor    # (kept heads, head_dim') dimensions kept in each kept query head's rows
    k_dims: Tensor    # (kept kv heads, head_dim') in each kept key head's rows
    v_dims: Tensor    # (kept kv heads, head_dim') in each kept value head's rows
    o_dims: Tensor    # (kept heads, head_dim') output-projection columns of each kept query head
    mlp: Tensor | None  # kept MLP hidden units (None: the block's MLP is a sparse MoE block)
    experts: Tensor | None = None  # (experts, units') kept hidden units of each routed expert (surgeon.moe)
    shared: Tensor | None = None   # kept hidden units of the MoE block's shared expert
    routed: Tensor | None = None   # kept routed experts, where moe.whole_experts removed some (None: all kept)

    def shape(self) -> dict:
        out = {"heads": len(self.heads), "kv_heads": len(self.kv_heads), "head_dim": self.q_dims.shape[1]}
        if self.mlp is not None:
            out["mlp"] = len(self.mlp)
        if self.experts is not None:
            out["experts"] = self.experts.shape[1]
        if self.shared is not None:
            out["shared"] = len(self.shared)
        if self.routed is not None:
            out["num_experts"] = len(self.routed)
        return out


def _part(block: nn.Module, adapter: Adapter, role: str) -> Part:
    return adapter.part(block, role)


def _maps_zero_to_zero(activation: nn.Module) -> bool:
    return bool(activation(torch.zeros(1)) == 0)


@torch.no_grad()
def _fold_constants(adapter: Adapter, block: nn.Module) -> None:
    """Rows with zero weights but a bias give every token the same value: add what they contribute to the next
    layer's bias and zero them, so that they are dead rows. Exact for value rows because attention weights sum
    to one, and for MLP units whose every input row is constant."""
    lin = lambda role: _part(block, adapter, role)  # noqa: E731
    v, out = lin("v"), lin(adapter.attention_out)
    if v.bias is not None and out.bias is not None:
        H, K, d = adapter.heads(block.get_submodule(adapter.attention_path))
        v_bias = v.bias
        const = ~(v.weight != 0).any(1) & (v_bias != 0)
        if const.any():
            values = torch.where(const, v_bias, 0).view(K, d)[torch.arange(H, device=const.device) // (H // K)]
            out.module.bias += out.weight @ values.flatten()
            v.module.bias[v.index(const).to(v_bias.device)] = 0
    if _sparse(adapter, block):  # routed and shared experts have no biases
        return
    inputs = [lin(adapter.mlp_activated)] + ([lin(adapter.mlp_multiplied)] if adapter.mlp_multiplied else [])
    down = lin(adapter.mlp_out)
    if down.bias is None or any(m.bias is None for m in inputs):
        return
    const = ~torch.stack([(m.weight != 0).any(1) for m in inputs]).any(0)
    value = adapter.mlp_activation(block)(inputs[0].bias)
    for m in inputs[1:]:
        value = value * m.bias
    const &= torch.stack([m.bias != 0 for m in inputs]).any(0)
    if const.any():
        down.module.bias += down.weight[:, const] @ value[const]
        for m in inputs:
            m.module.bias[m.index(const).to(const.device)] = 0


@torch.no_grad()
def plan_block(adapter: Adapter, block: nn.Module, at_least: dict | None = None) -> BlockPlan:
    """The units of one block whose removal cannot change its output (module docstring), and the padding the
    stock modules need; `at_least` (kv_heads, per_group, head_dim, mlp) pads further, to shapes shared by all
    blocks."""
    at_least = at_least or {}
    lin = lambda role: _part(block, adapter, role)  # noqa: E731
    H, K, d = adapter.heads(block.get_submodule(adapter.attention_path))
    G = H // K
    kv_of = torch.arange(H) // G
    v_live = _live_rows(lin("v")).view(K, d).cpu()
    out_live = v_live[kv_of] & _live_cols(lin(adapter.attention_out)).view(H, d).cpu()
    head_live = out_live.any(1)
    kv_live = head_live.view(K, G).any(1)
    kv_heads = _keep(kv_live, max(1, int(kv_live.sum()), at_least.get("kv_heads", 0)))
    per_group = max(1, int(head_live.view(K, G)[kv_heads].sum(1).max()), at_least.get("per_group", 0))
    heads = torch.cat([k * G + _keep(head_live[k * G:(k + 1) * G], per_group) for k in kv_heads.tolist()])

    if not adapter.heads_removable(block.get_submodule(adapter.attention_path)):  # a norm over all of q or k
        heads, kv_heads = torch.arange(H), torch.arange(K)
    if adapter.rotary or G > 1:  # dimensions stay: rotary frequencies, or a key head shared by several heads
        q_dims = torch.arange(d).expand(len(heads), d)
        k_dims = v_dims = torch.arange(d).expand(len(kv_heads), d)
        o_dims = q_dims
    else:
        # a key bias adds the same amount to every key's score of one query: softmax ignores it
        qk_live = _live_rows(lin("q")).view(H, d).cpu() & (lin("k").weight != 0).any(1).view(K, d).cpu()
        width = max(1, int(qk_live[heads].sum(1).max()), int(out_live[heads].sum(1).max()),
                    at_least.get("head_dim", 0))
        q_dims = k_dims = torch.stack([_keep(qk_live[h], width) for h in heads.tolist()])
        v_dims = o_dims = torch.stack([_keep(out_live[h], width) for h in heads.tolist()])

    if not _sparse(adapter, block):
        mlp = _mlp_units(block, adapter, adapter.mlp_activated, adapter.mlp_multiplied, adapter.mlp_out,
                         adapter.mlp_activation(block), at_least.get("mlp", 0))
        return BlockPlan(heads, kv_heads, q_dims, k_dims, v_dims, o_dims, mlp)
    moe = block.get_submodule(adapter.mlp_path)
    shared = None
    if hasattr(moe, "shared_expert"):
        shared = _mlp_units(block, adapter, "shared_gate", "shared_up", "shared_down", moe.shared_expert.act_fn,
                            at_least.get("shared", 0))
    removed = moe.gate.__dict__.get("_surgeon_removed")  # experts moe.whole_experts removed: no token reaches them
    routed = None if removed is None else (~removed.cpu()).nonzero().squeeze(1)
    return BlockPlan(heads, kv_heads, q_dims, k_dims, v_dims, o_dims, None,
                     _expert_units(moe.experts, at_least.get("experts", 0), routed), shared, routed)


def _sparse(adapter: Adapter, block: nn.Module) -> bool:
    """The block's MLP is a sparse mixture-of-experts block (surgeon.moe)."""
    from .moe import is_moe

    return bool(adapter.mlp_path) and is_moe(block.get_submodule(adapter.mlp_path))


@torch.no_grad()
def _mlp_units(block: nn.Module, adapter: Adapter, activated: str, multiplied: str | None, out: str,
               activation: nn.Module, at_least: int) -> Tensor:
    """Kept hidden units of one MLP (by its layer roles), padded to at least `at_least`."""
    lin = lambda role: _part(block, adapter, role)  # noqa: E731
    unit_live = _live_cols(lin(out)).cpu()
    if _maps_zero_to_zero(activation):
        unit_live &= _live_rows(lin(activated)).cpu()
    if multiplied:
        unit_live &= _live_rows(lin(multiplied)).cpu()
    return _keep(unit_live, max(1, int(unit_live.sum()), at_least))


@torch.no_grad()
def _expert_units(experts: nn.Module, at_least: int, routed: Tensor | None = None) -> Tensor:
    """(experts, width) kept hidden units of every kept routed expert (`routed`, None: all): a unit lives where
    its down column, its up row and (unless the activation maps 0 elsewhere) its gate row do; one width for all
    experts of the block, the narrower ones padded with dead units of their own, and the width a multiple of 16
    bytes of weights."""
    gate_up, down = experts.gate_up_proj, experts.down_proj
    if routed is not None:
        gate_up, down = gate_up[routed.to(gate_up.device)], down[routed.to(down.device)]
    units = down.shape[2]
    live = (down != 0).any(1) & (gate_up[:, units:] != 0).any(2)
    if _maps_zero_to_zero(experts.act_fn):
        live &= (gate_up[:, :units] != 0).any(2)
    live = live.cpu()
    width = max(1, int(live.sum(1).max()), at_least)
    align = max(1, 16 // down.element_size())  # transformers' grouped_mm kernel: rows of a multiple of 16 bytes
    width = min(units, -(-width // align) * align)
    return torch.stack([_keep(row, width) for row in live])


def _flat(heads: Tensor, dims: Tensor, d: int) -> Tensor:
    """Row (or column) indices of `dims` inside each of `heads`, heads of width d."""
    return (heads[:, None] * d + dims).flatten()


@torch.no_grad()
def _linear(old: nn.Module, rows: Tensor | None = None, cols: Tensor | None = None,
            shape: tuple[int, int] | None = None) -> nn.Module:
    """A new layer of `old`'s class (Linear or Conv1D) holding rows/cols of `old` (bias follows the rows), or an
    empty one of `shape` (out, in)."""
    W = matrix(old)
    out_f, in_f = shape or (len(rows) if rows is not None else W.shape[0],
                            len(cols) if cols is not None else W.shape[1])
    if conv1d(old):
        new = type(old)(out_f, in_f).to(device=old.weight.device, dtype=old.weight.dtype)
    else:
        new = nn.Linear(in_f, out_f, bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype)
    if shape is None:
        W = W[rows.to(W.device)] if rows is not None else W
        W = W[:, cols.to(W.device)] if cols is not None else W
        matrix(new).copy_(W)
        if old.bias is not None:
            new.bias.copy_(old.bias[rows.to(W.device)] if rows is not None else old.bias)
    return new


def _replace(block: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(block.get_submodule(parent) if parent else block, name, module)


def _rows_per_layer(adapter: Adapter, block: nn.Module, part_rows: dict[str, Tensor], d: int) -> dict[str, Tensor]:
    """Each layer role's kept rows (indices into its module) from each part role's kept rows (indices into the
    part): a fused layer's parts are joined in its own layout."""
    out = {}
    for role, rows in part_rows.items():
        home = adapter.home(role)
        if home == role:
            out[role] = rows
    for home, spec in adapter.fused.items():
        if not all(role in part_rows for role in spec.parts):  # a routed expert's gate|up: _set_experts
            continue
        selected = {role: _part(block, adapter, role).rows[part_rows[role]] for role in spec.parts}
        out[home] = spec.join(selected, d)
    return out


def _apply(adapter: Adapter, block: nn.Module, plan: BlockPlan) -> None:
    attention = block.get_submodule(adapter.attention_path)
    H, K, d = adapter.heads(attention)
    part_rows = {"q": _flat(plan.heads, plan.q_dims, d), "k": _flat(plan.kv_heads, plan.k_dims, d),
                 "v": _flat(plan.kv_heads, plan.v_dims, d)}
    cols = {adapter.attention_out: _flat(plan.heads, plan.o_dims, d)}
    if plan.mlp is not None:
        part_rows[adapter.mlp_activated] = cols[adapter.mlp_out] = plan.mlp
        if adapter.mlp_multiplied:
            part_rows[adapter.mlp_multiplied] = plan.mlp
    if plan.shared is not None:
        part_rows["shared_gate"] = part_rows["shared_up"] = cols["shared_down"] = plan.shared
    if plan.routed is not None:  # whole experts removed: their slices and router rows go
        _drop_experts(block.get_submodule(adapter.mlp_path), plan.routed)
    if plan.experts is not None:
        experts = block.get_submodule(adapter.mlp_path).experts
        units = experts.down_proj.shape[2]
        rows = torch.cat([plan.experts, plan.experts + units], 1).to(experts.down_proj.device)
        keep = plan.experts.to(experts.down_proj.device)
        gate_up = torch.stack([experts.gate_up_proj[e, rows[e]] for e in range(len(rows))])
        down = torch.stack([experts.down_proj[e][:, keep[e]] for e in range(len(keep))])
        _set_experts(experts, gate_up, down)
    rows = _rows_per_layer(adapter, block, part_rows, plan.q_dims.shape[1])
    new = {role: _linear(block.get_submodule(adapter.layer_paths[role]), rows=rows.get(role), cols=cols.get(role))
           for role in (*rows, *cols)}
    for role, module in new.items():
        _replace(block, adapter.layer_paths[role], module)
    shape = plan.shape()
    adapter.set_heads(attention, shape["heads"], shape["kv_heads"], shape["head_dim"])


def _resize_empty(adapter: Adapter, block: nn.Module, shape: dict) -> None:
    """Give one block the module sizes of `shape` (uninitialized weights), for loading a compacted model."""
    attention = block.get_submodule(adapter.attention_path)
    hd = shape["head_dim"]
    rows = {"q": shape["heads"] * hd, "k": shape["kv_heads"] * hd, "v": shape["kv_heads"] * hd}
    cols = {adapter.attention_out: shape["heads"] * hd}
    if "mlp" in shape:
        rows[adapter.mlp_activated] = cols[adapter.mlp_out] = shape["mlp"]
        if adapter.mlp_multiplied:
            rows[adapter.mlp_multiplied] = shape["mlp"]
    if "shared" in shape:
        rows["shared_gate"] = rows["shared_up"] = cols["shared_down"] = shape["shared"]
    if "experts" in shape:
        moe = block.get_submodule(adapter.mlp_path)
        experts = moe.experts
        (E, _, C), w = experts.gate_up_proj.shape, experts.gate_up_proj
        empty = lambda *size: torch.empty(size, dtype=w.dtype, device=w.device)  # noqa: E731
        if "num_experts" in shape:  # moe.whole_experts removed some: fewer experts and router rows
            E = shape["num_experts"]
            moe.gate.weight = nn.Parameter(empty(E, moe.gate.weight.shape[1]))
            _set_expert_count(moe, E)
        _set_experts(experts, empty(E, 2 * shape["experts"], C), empty(E, C, shape["experts"]))
    out_rows = {}
    for role, n in rows.items():
        home = adapter.home(role)
        out_rows[home] = out_rows.get(home, 0) + n
    for role in (*out_rows, *cols):
        old = block.get_submodule(adapter.layer_paths[role])
        R, C = matrix(old).shape
        _replace(block, adapter.layer_paths[role], _linear(old, shape=(out_rows.get(role, R), cols.get(role, C))))
    adapter.set_heads(attention, shape["heads"], shape["kv_heads"], hd)


def _drop_experts(moe: nn.Module, kept: Tensor) -> None:
    """Keep only the routed experts `kept` of a MoE block: their fused slices, their router rows (the router's
    softmax and top-k then run over them alone: what the router mask computed), the experts' counts."""
    experts, router = moe.experts, moe.gate
    keep = kept.to(experts.down_proj.device)
    _set_experts(experts, experts.gate_up_proj[keep], experts.down_proj[keep])
    router.weight = nn.Parameter(router.weight[kept.to(router.weight.device)].contiguous(),
                                 requires_grad=router.weight.requires_grad)
    _set_expert_count(moe, len(kept))
    router.__dict__["_surgeon_removed"] = None


def _set_expert_count(moe: nn.Module, n: int) -> None:
    """A MoE block's modules told they hold `n` routed experts (surgeon's per-expert layers are made anew)."""
    moe.experts.num_experts = moe.gate.num_experts = n
    for key in ("_surgeon_linears", "forward"):  # surgeon.moe.expert_linears rebuilds them for the new count
        moe.experts.__dict__.pop(key, None)


def _set_experts(experts: nn.Module, gate_up: Tensor, down: Tensor) -> None:
    """New fused expert parameters (surgeon's per-expert layers read them through, surgeon.moe)."""
    experts.gate_up_proj = nn.Parameter(gate_up.contiguous(), requires_grad=experts.gate_up_proj.requires_grad)
    experts.down_proj = nn.Parameter(down.contiguous(), requires_grad=experts.down_proj.requires_grad)
    if hasattr(experts, "intermediate_dim"):
        experts.intermediate_dim = down.shape[2]


def _units(adapter: Adapter, block: nn.Module) -> int:
    """MLP hidden units of one block: its MLP's, or its routed experts' and shared expert's together."""
    if not _sparse(adapter, block):
        return _part(block, adapter, adapter.mlp_out).weight.shape[1]
    moe = block.get_submodule(adapter.mlp_path)
    shared = moe.shared_expert.down_proj.in_features if hasattr(moe, "shared_expert") else 0
    return moe.experts.down_proj.shape[0] * moe.experts.down_proj.shape[2] + shared


def _kept_units(shape: dict, experts: int) -> int:
    return shape.get("mlp", 0) + shape.get("shared", 0) + experts * shape.get("experts", 0)


def parameter_count(model: nn.Module) -> int:
    """Distinct parameters (tied embeddings once)."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def _zeros(adapter: Adapter, model: nn.Module) -> tuple[int, int]:
    layers = adapter.layers(model)
    return (sum(int((l.weight == 0).sum()) for l in layers), sum(l.weight.numel() for l in layers))


@torch.no_grad()
def compact(model: nn.Module, uniform: bool = False) -> dict:
    """Remove, in place, every unit of every block whose removal cannot change the model's output; write the
    per-block shapes into `model.config` (and its own size fields when every block agrees). `uniform` pads every
    block to the shapes the stock config can describe (the widest block's), so that a plain `from_pretrained`
    loads the result. Returns a report: parameters before and after, kept/total heads and MLP units, and the zero
    weight entries left."""
    adapter = adapter_for(model.config.model_type)
    blocks = adapter.blocks(model)
    before = parameter_count(model)
    zeros_before, _ = _zeros(adapter, model)
    heads_total = sum(adapter.heads(b.get_submodule(adapter.attention_path))[0] for b in blocks)
    mlp_total = sum(_units(adapter, b) for b in blocks)
    n_experts = [b.get_submodule(adapter.mlp_path).experts.down_proj.shape[0] if _sparse(adapter, b) else 0
                 for b in blocks]
    for block in blocks:
        _fold_constants(adapter, block)
    dense = [adapter.heads(b.get_submodule(adapter.attention_path)) for b in blocks]
    plans = [plan_block(adapter, block) for block in blocks]
    if uniform:
        at_least = adapter.uniform_shape([p.shape() for p in plans], dense)
        plans = [plan_block(adapter, block, at_least) for block in blocks]
    for block, plan in zip(blocks, plans):
        _apply(adapter, block, plan)
    shapes = [p.shape() for p in plans]
    if any(n_experts):
        # save_pretrained would write the experts back in their original per-expert checkpoint layout (a
        # transformers conversion, reverted on save), which load_compact cannot resize: keep the fused tensors,
        # which both load_compact and the stock from_pretrained read as they are
        model._weight_conversions = []
    stock = adapter.stock_config(model.config, shapes)
    setattr(model.config, KEY, {"format": FORMAT, "layers": shapes, "stock_loadable": stock})
    zeros_left, prunable = _zeros(adapter, model)
    return {"params_before": before, "params": parameter_count(model),
            "heads": {"kept": sum(s["heads"] for s in shapes), "total": heads_total},
            "mlp_units": {"kept": sum(_kept_units(s, s.get("num_experts", e)) for s, e in zip(shapes, n_experts)),
                          "total": mlp_total},
            **({"experts": {"kept": sum(s.get("num_experts", e) for s, e in zip(shapes, n_experts)),
                            "total": sum(n_experts)}} if any(n_experts) else {}),
            "zeros_before": zeros_before, "zeros_left": zeros_left, "prunable_params": prunable,
            "stock_loadable": stock, "uniform": uniform, "layers": shapes}


class NotCompactModel(ValueError):
    """A directory `load_compact` cannot read: the message names what is missing."""


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
    elif (path / "model.safetensors").exists():
        files = [path / "model.safetensors"]
    else:
        raise NotCompactModel(f"{path} has no model.safetensors (or model.safetensors.index.json): save the model "
                              "with save_pretrained (safetensors)")
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise NotCompactModel(f"{path} lacks the weight files {missing} named in model.safetensors.index.json")
    return files


def _read_config(path: Path) -> dict:
    if not path.is_dir():
        raise NotCompactModel(f"{path} is not a directory (a compacted model is a Hugging Face model directory)")
    if not (path / "config.json").exists():
        raise NotCompactModel(f"{path} has no config.json: not a Hugging Face model directory")
    config = json.loads((path / "config.json").read_text())
    entry = config.get(KEY)
    if not isinstance(entry, dict) or "layers" not in entry:
        raise NotCompactModel(f"{path}/config.json has no '{KEY}' entry with per-block shapes: not a model compacted "
                              f"by surgeon; compact a saved model with: python -m surgeon.compact {path} <out dir>")
    if entry.get("format") != FORMAT:
        raise NotCompactModel(f"{path}/config.json: {KEY} format {entry.get('format')} is not the format this "
                              f"version reads ({FORMAT})")
    n = next((c["num_hidden_layers"] if "num_hidden_layers" in c else c.get("n_layer")
              for c in (config.get("text_config") or config, config) if "num_hidden_layers" in c or "n_layer" in c),
             None)
    if len(entry["layers"]) != n:
        raise NotCompactModel(f"{path}/config.json: {KEY} lists {len(entry['layers'])} blocks, num_hidden_layers "
                              f"is {n}")
    return config


def _renamed(state: dict, model: nn.Module) -> dict:
    """Checkpoint keys as the model names them: transformers' own renamings for the family (GPT-NeoX saves its
    `lm_head` as `embed_out`), as `from_pretrained` applies them."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming

    renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    out = {}
    for key, value in state.items():
        for renaming in renamings:
            key, _ = renaming.rename_source_key(key)
        out[key] = value
    return out


def load_compact(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """A compacted model directory as its stock transformers class with resized modules, in eval mode.
    A malformed or foreign directory raises NotCompactModel naming what is missing."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    shapes = _read_config(path)[KEY]["layers"]
    files = _weight_files(path)
    config = AutoConfig.from_pretrained(path)
    dtype = dtype or getattr(config, "dtype", None) or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    adapter = adapter_for(config.model_type)
    for block, shape in zip(adapter.blocks(model), shapes):
        _resize_empty(adapter, block, shape)
    model.to_empty(device=device)
    state = {}
    for f in files:
        state.update(load_file(f, device=str(device)))
    state = _renamed(state, model)
    expected = model.state_dict()
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    missing = sorted(set(expected) - set(state) - tied)
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise NotCompactModel(f"{path}: the weights do not match the shapes in config.json {KEY}: missing "
                              f"{missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}")
    wrong = [f"{k} {tuple(v.shape)} (config says {tuple(expected[k].shape)})" for k, v in state.items()
             if v.shape != expected[k].shape]
    if wrong:
        raise NotCompactModel(f"{path}: tensor shapes disagree with config.json {KEY}: {wrong[:3]}")
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    if (path / "generation_config.json").exists():  # as from_pretrained does: generate()'s defaults
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(path)
    for module in model.modules():  # buffers not in the checkpoint (rotary frequencies) from the config
        if any(name in module._non_persistent_buffers_set for name, _ in module.named_buffers(recurse=False)):
            loaded = {name: p.detach().clone() for name, p in module.named_parameters(recurse=False)}
            model._init_weights(module)  # also draws the module's parameters (Gemma's scaled embedding): put back
            with torch.no_grad():
                for name, p in module.named_parameters(recurse=False):
                    p.copy_(loaded[name])
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m surgeon.compact", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="a saved (zeroed) model directory, e.g. <run dir>/model")
    parser.add_argument("dst", help="where the compacted model directory is written")
    parser.add_argument("--uniform", action="store_true",
                        help="pad every block to the widest one, so that AutoModelForCausalLM.from_pretrained loads it")
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = Path(args.src)
    if not (src / "config.json").exists():
        raise SystemExit(f"{src} has no config.json: give a saved model directory (save_model=true writes "
                         "<run dir>/model)")
    model = AutoModelForCausalLM.from_pretrained(src, dtype="auto")
    report = compact(model, uniform=args.uniform)
    model.save_pretrained(args.dst)
    try:
        AutoTokenizer.from_pretrained(src).save_pretrained(args.dst)
    except (OSError, ValueError):
        print(f"note: no tokenizer in {src}; {args.dst} holds the model only", file=sys.stderr)
    print(json.dumps({k: v for k, v in report.items() if k != "layers"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
