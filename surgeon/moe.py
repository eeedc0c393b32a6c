"""Mixture-of-experts blocks: every routed expert's matrices are prunable layers.

transformers 5 keeps a block's routed experts as two fused 3-D parameters, `experts.gate_up_proj` (E, 2I, H),
gate rows first, and `experts.down_proj` (E, H, I), and runs them in one loop over the experts that received
tokens (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE alike). Here each expert's slice of each parameter is an
`ExpertLinear`: a bias-free Linear whose weight is a view of the slice (every write goes to the model's own
parameter, so the saved model is the stock layout), and `route` gives the experts module a forward that runs
the same loop through those modules, so the curvature hooks, SparseGPT/Wanda statistics and LoRA see each
expert as a layer: its input is the tokens routed to it, its output gradient includes the router weight the
forward multiplies its output by. The forward is the stock eager one op for op (tests/test_moe.py compares).
The router (`gate`) and the Qwen2-MoE `shared_expert_gate` are never pruned; the shared expert is ordinary
Linear layers.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PARAMETERS = {"expert_gate_up": "gate_up_proj", "expert_down": "down_proj"}  # layer type -> fused parameter


class ExpertLinear(nn.Module):
    """Expert `expert`'s slice of the fused parameter `param` of an experts module, as a bias-free Linear."""

    def __init__(self, experts: nn.Module, param: str, expert: int):
        super().__init__()
        object.__setattr__(self, "experts", experts)  # a reference, not a submodule
        self.param, self.expert = param, expert
        self.bias = None

    @property
    def weight(self) -> Tensor:
        """(out, in) view of the slice: writes go through to the model's parameter."""
        return getattr(self.experts, self.param)[self.expert]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)

    def state_dict(self, *args, **kwargs) -> dict:  # the checkpoint's per-layer weights
        return {"weight": self.weight.detach()}

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict, strict: bool = True, assign: bool = False):
        self.weight.copy_(state_dict["weight"])

    def extra_repr(self) -> str:
        return f"{self.param}[{self.expert}], in_features={self.in_features}, out_features={self.out_features}"


def is_moe(mlp: nn.Module) -> bool:
    """A sparse MoE block (router `gate` and fused `experts`), not a dense MLP."""
    experts = getattr(mlp, "experts", None)
    return experts is not None and all(hasattr(experts, p) for p in PARAMETERS.values())


def expert_linears(experts: nn.Module) -> dict[str, list[ExpertLinear]]:
    """The experts module's ExpertLinear modules per layer type (made once, kept on the module; its forward is
    `route`d through them)."""
    linears = experts.__dict__.get("_surgeon_linears")
    if linears is None:
        E = getattr(experts, PARAMETERS["expert_down"]).shape[0]
        linears = {kind: [ExpertLinear(experts, param, e) for e in range(E)] for kind, param in PARAMETERS.items()}
        experts.__dict__["_surgeon_linears"] = linears  # a plain attribute: not in modules() or the state dict
        experts.__dict__["forward"] = route.__get__(experts)
    return linears


def route(self: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
    """The stock eager experts forward (transformers 5, Mixtral/Qwen-MoE/OLMoE) through the ExpertLinear modules."""
    linears = self.__dict__["_surgeon_linears"]
    gate_up, down = linears["expert_gate_up"], linears["expert_down"]
    E = len(down)
    final = torch.zeros_like(hidden_states)
    with torch.no_grad():
        expert_mask = F.one_hot(top_k_index, num_classes=E + 1).permute(2, 1, 0)
        expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
    rerouting = self.__dict__.get("_surgeon_rerouting") if torch.is_grad_enabled() else None
    outputs = []  # with a Rerouting measurement: (tokens, top-k position, expert output before its router weight)
    for expert_idx in expert_hit:
        e = int(expert_idx[0])
        if e == E:  # tokens sent to no local expert (expert parallelism)
            continue
        top_k_pos, token_idx = torch.where(expert_mask[e])
        gate, up = gate_up[e](hidden_states[token_idx]).chunk(2, dim=-1)
        raw = down[e](self.act_fn(gate) * up)
        out = raw * top_k_weights[token_idx, top_k_pos, None]
        final.index_add_(0, token_idx, out.to(final.dtype))
        if rerouting is not None:
            outputs.append((token_idx, top_k_pos, raw.detach()))
    if rerouting is not None and final.requires_grad:
        rerouting.observe(self, hidden_states.detach(), top_k_index, outputs, final)
    return final


# ------------------------------------------------------------------ whole experts removed (moe.whole_experts)
def attach_router(mlp: nn.Module) -> None:
    """Remember the MoE block's router on its experts module (a plain attribute), for `mask_routers`."""
    mlp.experts.__dict__["_surgeon_router"] = mlp.gate


def masked_route(self: nn.Module, hidden_states: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The stock top-k router (transformers 5, Mixtral/Qwen-MoE/OLMoE) with the removed experts' logits at -inf:
    softmax, top-k and the renormalisation run over the experts left, as the family's forward does for a model
    that has only those (tests/test_moe.py compares with the stock forward and with the compacted model)."""
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    router_logits = F.linear(hidden_states, self.weight)
    removed = self.__dict__.get("_surgeon_removed")
    logits = router_logits if removed is None else router_logits.masked_fill(removed, float("-inf"))
    probs = F.softmax(logits, dtype=torch.float, dim=-1)
    top, index = torch.topk(probs, self.top_k, dim=-1)
    norm = getattr(self, "norm_topk_prob", None)
    if norm is None or norm:  # Mixtral always renormalises (and keeps float32 scores)
        top = top / top.sum(dim=-1, keepdim=True)
    if norm is not None:
        top = top.to(router_logits.dtype)
    return router_logits, top, index


def whole_removed(layers, removed: dict[str, Tensor]) -> dict[int, Tensor]:
    """Per MoE block index, (E,) bool: the routed experts whose every gate|up entry is removed (with
    moe.whole_experts the selection removes an expert whole or not at all)."""
    out: dict[int, list] = {}
    for layer in layers:
        if layer.type == "expert_gate_up":
            out.setdefault(layer.block, []).append(bool(removed[layer.name].all()))
    return {block: torch.tensor(flags) for block, flags in out.items()}


def mask_routers(layers, removed: dict[str, Tensor]) -> None:
    """Route no token to a removed expert (moe.whole_experts): each block's router gets the mask of its removed
    experts (none: the stock result), from the masks alone, so it follows resume and the damping search."""
    flags = whole_removed(layers, removed)
    for layer in layers:
        if layer.type != "expert_gate_up" or layer.expert != 0:
            continue
        router = layer.module.experts.__dict__["_surgeon_router"]
        mask = flags[layer.block]
        if "forward" not in router.__dict__:
            router.__dict__["forward"] = masked_route.__get__(router)
        router.__dict__["_surgeon_removed"] = mask.to(router.weight.device) if mask.any() else None


class Rerouting:
    """What removing each routed expert of one block whole costs (moe.whole_cost=reroute), measured in the
    curvature pass: the router then sends the expert's tokens to their next choice among the experts left and
    renormalises as the family does (masked_route), so the block's routed output changes by delta_t at every
    token it reaches, and the cost is the empirical Fisher's second-order term of that change,
    1/2 (1/N) sum_t (g_t . delta_t)^2 over the N calibration tokens, g_t the loss gradient at the block's routed
    output (docs/moe.md, "Whole experts"). `zero` holds the same sum for the expert's output set to zero (what the
    KFAC cost of its layers models). Both come from scalars: with s_tj = g_t . y_tj for the outputs y of a token's
    top-k experts and of its next choice (one extra expert per token, computed in the backward hook without
    gradient), g_t . delta_t is a weighted sum of the s_tj; no output change is stored."""

    def __init__(self, experts: int, dtype: torch.dtype, device):
        self.zero = torch.zeros(experts, dtype=torch.float64, device=device)
        self.reroute = torch.zeros(experts, dtype=torch.float64, device=device)
        self.tokens = torch.zeros((), dtype=torch.float64, device=device)
        self.dtype = dtype

    def costs(self) -> tuple[Tensor, Tensor]:
        """(E,) float64: 1/2 (1/N) sum_t (g . delta)^2 with the expert re-routed, and with its output zeroed."""
        n = self.tokens.clamp_min(1)
        return 0.5 * self.reroute / n, 0.5 * self.zero / n

    @torch.no_grad()
    def observe(self, experts: nn.Module, h: Tensor, index: Tensor, outputs: list, final: Tensor) -> None:
        """From one forward: the router's probabilities over the experts left, each token's next choice and its
        output; the sums are added in the backward hook of `final` (the block's routed output)."""
        router = experts.__dict__["_surgeon_router"]
        linears = experts.__dict__["_surgeon_linears"]
        dt = self.dtype
        logits = F.linear(h, router.weight)
        removed = router.__dict__.get("_surgeon_removed")
        if removed is not None:
            logits = logits.masked_fill(removed, float("-inf"))
        p = torch.softmax(logits, dim=-1, dtype=torch.float).to(dt)  # (T, E) as the router's; 0 where removed
        k, E = index.shape[1], p.shape[1]
        alive = E - (0 if removed is None else int(removed.sum()))
        p_top = p.gather(1, index)  # (T, k): the forward's choices
        nxt = None
        if alive > k:  # each token's next choice: its best expert left outside its top k
            rest = p.scatter(1, index, -1.0)
            if removed is not None:
                rest = rest.masked_fill(removed, -1.0)
            nxt = rest.argmax(dim=1)
            p_next = p.gather(1, nxt[:, None]).squeeze(1)
        norm = getattr(router, "norm_topk_prob", None)
        normalised = norm is None or bool(norm)  # as masked_route: Mixtral always renormalises

        @torch.no_grad()
        def hook(grad: Tensor) -> None:
            g = grad.detach().reshape(h.shape).to(dt)
            s = torch.zeros(index.shape, dtype=dt, device=h.device)  # s[t, q] = g_t . y of its q-th expert
            for token_idx, pos, raw in outputs:
                s[token_idx, pos] = (g[token_idx] * raw.to(dt)).sum(dim=-1)
            total = p_top.sum(dim=1)
            w = p_top / total[:, None] if normalised else p_top
            old = (w * s).sum(dim=1)  # g . (routed output)
            self.zero.index_add_(0, index.reshape(-1), ((w * s) ** 2).reshape(-1).double())
            self.tokens += h.shape[0]
            if nxt is None:
                return
            # g . (output of the next choice), computed here so that no (T, H) output waits for the backward
            s_next = torch.zeros(h.shape[0], dtype=dt, device=h.device)
            gate_up, down = linears["expert_gate_up"], linears["expert_down"]
            for e in nxt.unique().tolist():
                tok = (nxt == e).nonzero().squeeze(1)
                # the weights, not the modules: the curvature hooks must not see this extra forward
                gate, up = F.linear(h[tok], gate_up[e].weight).chunk(2, dim=-1)
                y = F.linear(experts.act_fn(gate) * up, down[e].weight)
                s_next[tok] = (g[tok] * y.to(dt)).sum(dim=-1)
            raw_sum = (p_top * s).sum(dim=1)
            for q in range(k):  # the expert at position q removed: its share goes to the next choice
                kept = raw_sum - p_top[:, q] * s[:, q] + p_next * s_next
                denom = (total - p_top[:, q] + p_next) if normalised else (1 - p_top[:, q])
                delta = kept / denom.clamp_min(1e-30) - old
                self.reroute.index_add_(0, index[:, q], (delta ** 2).double())
            if not normalised:  # an expert outside the top k: the softmax over the rest scales every weight
                scale = p / (1 - p).clamp_min(1e-30)
                scale = scale.scatter(1, index, 0.0)
                self.reroute += ((scale * old[:, None]) ** 2).sum(dim=0).double()

        final.register_hook(hook)


@contextlib.contextmanager
def measure_rerouting(layers, dtype: torch.dtype):
    """While open, the curvature pass measures every MoE block's Rerouting; yields {block: Rerouting}."""
    found: dict[int, Rerouting] = {}
    modules = []
    for layer in layers:
        if layer.type == "expert_down" and layer.expert == 0:
            experts = layer.module.experts
            found[layer.block] = Rerouting(getattr(experts, PARAMETERS["expert_down"]).shape[0], dtype,
                                           layer.weight.device)
            experts.__dict__["_surgeon_rerouting"] = found[layer.block]
            modules.append(experts)
    try:
        yield found
    finally:
        for experts in modules:
            experts.__dict__.pop("_surgeon_rerouting", None)
