"""One pruning loop for every method (docs/algorithm.md section 5).

A shot: re-estimate the curvature on the current model, compute the cost of every
structure in every layer, pick what to remove with one global threshold, update the
remaining weights (OBS, jointly per layer), zero the removed structures. Baselines are
configurations of the same shot: magnitude = identity curvature + no update, L-OBD =
diag(A) + no update, K-OBD = KFAC + no update. SparseGPT and Wanda are layer-wise and
take their own path through `surgeon.baselines`.
"""
from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field, fields, replace

import torch
from tqdm.auto import tqdm

from . import distributed, models
from .adapters import PrunableLayer, set_weight_with_bias, weight_with_bias
from .config import LAYERWISE_METHODS, PROJECT_ROOT
from .curvature import estimate_curvature
from .moe import measure_rerouting
from .obs import LayerOBD, LayerOBS, NotConverged
from .selection import Split, select_nm, select_structured, select_unstructured


def _yaml_defaults() -> dict:
    """The settings a shot built directly (`ShotOptions()`) starts from: conf/config.yaml with the unstructured
    structure and surgeon method presets over it, as Hydra composes them; SparseGPT's own settings from its preset.
    Read from the YAML, so no default is written twice (tests/test_config.py compares with Hydra's composition)."""
    from omegaconf import OmegaConf

    conf = PROJECT_ROOT / "conf"
    base = OmegaConf.load(conf / "config.yaml")
    base.pop("defaults")
    base.pop("hydra")
    return {"base": OmegaConf.merge(base, OmegaConf.load(conf / "structure" / "unstructured.yaml"),
                                    OmegaConf.load(conf / "method" / "surgeon.yaml")),
            "sparsegpt": OmegaConf.load(conf / "method" / "sparsegpt.yaml")}


_DEFAULTS = _yaml_defaults()


def _setting(key: str, protocol: bool = False, preset: str = "base", default=None):
    """A shot setting read from config key `key`, its default from the YAML (`_yaml_defaults`) unless `default`
    is given; `protocol`: the record's protocol carries it under the field's name. Adding a setting: this field
    and its YAML line."""
    from omegaconf import OmegaConf

    if default is None:
        default = OmegaConf.select(_DEFAULTS[preset], key, throw_on_missing=True)
    return field(default=default, metadata={"config": key, "protocol": protocol})


@dataclass
class ShotOptions:
    """The parts of the config a shot needs, in the paper's vocabulary: the one mapping from config keys to shot
    settings (`from_config`), and the source of the record's protocol entries for them."""

    method: str = _setting("method.name", protocol=True)
    kind: str = _setting("curvature.kind")
    structure: str = _setting("structure.name", protocol=True)
    n: int = _setting("structure.n", protocol=True)
    m: int = _setting("structure.m", protocol=True)
    correlation: str = _setting("correlation", protocol=True)
    selection: str = _setting("selection", protocol=True)
    solver: str = _setting("update.solver")  # in the protocol only where element updates are made
    tol: float = _setting("update.tol")
    max_iter: int = _setting("update.max_iter")
    max_correlate: int = _setting("max_correlate")
    union: str = _setting("union", protocol=True)
    rank: int = _setting("curvature.rank", protocol=True)
    rank2_iters: int = _setting("curvature.rank2_iters")
    rank2_eps: float = _setting("curvature.rank2_eps", protocol=True)
    damping_a: float = _setting("curvature.damping_a", protocol=True)
    damping_g: float = _setting("curvature.damping_g", protocol=True)
    damping: str = _setting("curvature.damping", protocol=True)  # fixed | auto (search_damping)
    # curvature.damping=auto's search; the protocol holds them (with the held-out seed) as `auto_damping`
    heldout: int = _setting("curvature.auto_damping.heldout")
    step: float = _setting("curvature.auto_damping.step")
    tries: int = _setting("curvature.auto_damping.tries")
    choose: str = _setting("curvature.auto_damping.choose", default="within_se")  # within_se | lowest
    monotone: bool = _setting("curvature.auto_damping.monotone", default=False)  # after shot 1, no scale below the last
    every: int = _setting("curvature.auto_damping.every", default=1)  # search at shots 1, 1 + every, ... (runner)
    # the tries' joint element solves stop at this relative residual, the chosen one is refined to update.tol from
    # its solution; None: every try solved to update.tol
    try_tol: float | None = _setting("curvature.auto_damping.tol", default=None)
    fisher: str = _setting("curvature.fisher", protocol=True)
    undamped_numerators: bool = _setting("curvature.undamped_numerators")
    blocksize: int = _setting("method.blocksize", preset="sparsegpt")  # SparseGPT's; other presets have none
    percdamp: float = _setting("method.percdamp", preset="sparsegpt")
    precision: str = _setting("curvature.precision", protocol=True)
    offload: str = _setting("curvature.offload")
    # the YAML's `auto` is a run's decision from its memory estimate (config.resolve_accumulate, made by
    # from_config); a shot built directly has no estimate to decide from and sums in float32
    accumulate: str = _setting("curvature.accumulate", protocol=True, default="float32")
    min_tokens: int = _setting("moe.min_tokens", protocol=True)
    whole_experts: bool = _setting("moe.whole_experts", protocol=True, default=False)
    # what a whole expert costs: "reroute" (measured, its tokens sent to their next choice) or "zero" (KFAC cost
    # of its output set to zero); in the protocol only with whole_experts (protocol())
    whole_cost: str = _setting("moe.whole_cost", default="reroute")

    @classmethod
    def from_config(cls, cfg) -> "ShotOptions":
        from omegaconf import OmegaConf

        from .config import resolve_accumulate

        opts = cls(**{f.name: OmegaConf.select(cfg, f.metadata["config"], default=f.default) for f in fields(cls)})
        if opts.accumulate == "auto":
            opts.accumulate = resolve_accumulate(cfg)
        return opts

    def protocol(self) -> dict:
        """The shot settings a record's protocol carries (records.protocol adds the rest)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.metadata["protocol"]}
        if self.whole_experts and self.structure == "structured":  # what was used: no gradient pass, no measurement
            out["whole_cost"] = self.whole_cost if self.kind == "kfac" else "zero"
        return out

    @property
    def joint_solves(self) -> bool:
        """The update is the layer-joint element solve by conjugate gradients (`LayerOBS.update_elements_joint`)."""
        return (self.structure != "structured" and self.correlation not in ("none", "independent")
                and self.solver != "grouped" and self.method not in LAYERWISE_METHODS)

    @property
    def measures_rerouting(self) -> bool:
        """Whole experts cost what re-routing their tokens measurably costs: needs a pass with gradients (KFAC)."""
        return (self.whole_experts and self.structure == "structured" and self.whole_cost == "reroute"
                and self.kind == "kfac")


@dataclass
class PruneState:
    """What has been removed so far: element masks (R, Cw) for every layer; rows/columns when structured. Each
    layer's masks live on its weight's device."""

    removed: dict[str, torch.Tensor]
    rows: dict[str, torch.Tensor] = field(default_factory=dict)
    cols: dict[str, torch.Tensor] = field(default_factory=dict)
    # over several processes: seconds each layer's costs and update took in the last shot, on its owner (the
    # next shot divides the layers by them); empty in one process and before the first shot
    work: dict[str, float] = field(default_factory=dict)

    @classmethod
    def empty(cls, layers: list[PrunableLayer]) -> "PruneState":
        removed, rows, cols = {}, {}, {}
        for layer in layers:
            R, C = layer.weight.shape
            device = layer.weight.device
            removed[layer.name] = torch.zeros(R, C, dtype=torch.bool, device=device)
            rows[layer.name] = torch.zeros(R, dtype=torch.bool, device=device)
            cols[layer.name] = torch.zeros(C, dtype=torch.bool, device=device)
        return cls(removed, rows, cols)

    def state_dict(self) -> dict:
        return {"removed": {k: v.cpu() for k, v in self.removed.items()},
                "rows": {k: v.cpu() for k, v in self.rows.items()},
                "cols": {k: v.cpu() for k, v in self.cols.items()}, "work": dict(self.work)}

    @classmethod
    def from_state_dict(cls, sd: dict, layers: list[PrunableLayer]) -> "PruneState":
        """Masks saved on the host (`state_dict`), each back on its layer's device."""
        where = {layer.name: layer.weight.device for layer in layers}
        move = lambda d: {k: v.to(where[k]) for k, v in d.items()}  # noqa: E731
        return cls(move(sd["removed"]), move(sd["rows"]), move(sd["cols"]), dict(sd.get("work", {})))


@torch.no_grad()
def apply_masks(layers: list[PrunableLayer], state: PruneState) -> None:
    """Removed entries are exactly zero; a removed row takes its bias with it."""
    for layer in layers:
        layer.weight[state.removed[layer.name]] = 0
        if layer.bias is not None:
            layer.bias[state.rows[layer.name]] = 0


class NonFiniteWeights(RuntimeError):
    """A prunable layer holds NaN or inf: the run stops before anything is checkpointed or saved."""


@torch.no_grad()
def check_finite(layers: list[PrunableLayer], when: str) -> None:
    """Raise NonFiniteWeights naming the first layer whose weight or bias is not finite."""
    for layer in layers:
        for tensor in (layer.weight, layer.bias):
            if tensor is not None and not torch.isfinite(tensor).all():
                bad = (~torch.isfinite(tensor)).sum().item()
                raise NonFiniteWeights(f"layer {layer.name} has {bad} non-finite weights {when}; the last "
                                       "checkpoint holds the weights of the last good shot")


@torch.no_grad()
def layer_sparsity(layers: list[PrunableLayer]) -> list[float]:
    """Fraction of exactly-zero weight entries per layer (biases not counted)."""
    return [(layer.weight == 0).sum().item() / layer.weight.numel() for layer in layers]


@torch.no_grad()
def overall_sparsity(layers: list[PrunableLayer]) -> float:
    zeros = sum((layer.weight == 0).sum().item() for layer in layers)
    return zeros / sum(layer.weight.numel() for layer in layers)


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the OBS algebra: at least float32 (a bfloat16/float16 model's weights are read into float32 and
    written back in the model's dtype); a float64 model stays float64."""
    return torch.promote_types(dtype, torch.float32)


def _solver(layer: PrunableLayer, f, opts: ShotOptions) -> LayerOBS:
    """The layer's OBS solver under its damped factors (section 3)."""
    W = weight_with_bias(layer.module)
    f = f.to(W.device).dense()
    return LayerOBS(W.to(work_dtype(W.dtype)), f.A, f.G, damping_a=opts.damping_a, damping_g=opts.damping_g,
                    has_bias=layer.bias is not None, A2=f.A2, G2=f.G2, rank2_eps=opts.rank2_eps,
                    undamped_numerators=opts.undamped_numerators)


def _scorer(layer: PrunableLayer, f, opts: ShotOptions) -> LayerOBS | LayerOBD:
    """What computes the layer's costs: OBD at Kronecker rank 1 needs no inverse (LayerOBD), the rest a solver."""
    if opts.correlation == "none" and f.A2 is None:
        W = weight_with_bias(layer.module)
        f = f.to(W.device)
        return LayerOBD(W.to(work_dtype(W.dtype)), f.A, f.G, damping_a=opts.damping_a, damping_g=opts.damping_g,
                        has_bias=layer.bias is not None)
    return _solver(layer, f, opts)


def _sync(devices: list[torch.device]) -> None:
    """Wait for every GPU the model is on, so that a phase's seconds are its own."""
    for device in devices:
        if device.type == "cuda":
            torch.cuda.synchronize(device)


def prune_shot(model, layers: list[PrunableLayer], batches: list[torch.Tensor], state: PruneState,
               target: float, opts: ShotOptions, *, seed: int = 0, progress: bool = False,
               heldout: torch.Tensor | None = None, scale: float = 1.0,
               first: bool = True) -> tuple[dict[str, float], dict[str, dict]]:
    """Prune `model` in place to overall sparsity `target`; returns seconds per phase and what the record
    keeps of the layers' solvers: `solves` (per layer, how its joint element update was solved) and, at
    Kronecker rank 2, `beta` (per layer, the shrink factor of term 2); empty when there is none. Over several
    processes also `own_update_s`: this rank's update phase before it waits for the others' weights, and
    `balance`: what divided the layers over the processes ("R^3+C^3" in the first shot, then "previous shot":
    the seconds each layer's costs and update took in the shot before, kept in `state.work`).
    With `opts.damping == "auto"`, `heldout` (windows apart from `batches`), `scale` (the previous shot's
    choice) and `first` (no shot before this one): the damping search of `search_damping`, whose account is
    `damping` in the result."""
    devices = models.devices(model)
    if opts.method in LAYERWISE_METHODS:  # SparseGPT, Wanda: block by block on their own statistics
        from .baselines import prune_layerwise

        t0 = time.perf_counter()
        n, m = (opts.n, opts.m) if opts.structure == "semistructured" else (0, 0)
        state.removed.update(prune_layerwise(
            model, layers, batches, method=opts.method, sparsity=target, n=n, m=m, removed=state.removed,
            blocksize=opts.blocksize, percdamp=opts.percdamp, progress=progress, min_tokens=opts.min_tokens))
        apply_masks(layers, state)
        _sync(devices)
        return {"curvature": 0.0, "costs": 0.0, "update": time.perf_counter() - t0}, {}

    # Several processes (surgeon.distributed): each sums the statistics of its share of the batches, and costs and
    # updates are divided by layer, each layer's results broadcast from its owner; in one process rank 0 owns all.
    rank = distributed.rank()
    measured = all(layer.name in state.work for layer in layers)
    work = [state.work[l.name] if measured else _work(l) for l in layers]
    owner = dict(zip([l.name for l in layers], distributed.owners(work)))
    shot = _Shot(model, layers, devices, state, target, owner,
                 [layer for layer in layers if owner[layer.name] == rank], measured)
    t0 = time.perf_counter()
    with measure_rerouting(layers if opts.measures_rerouting else [], torch.float64) as rerouting:
        factors = estimate_curvature(model, layers, distributed.share(batches), fisher=opts.fisher, rank=opts.rank,
                                     kind=opts.kind, rank2_iters=opts.rank2_iters, seed=seed, progress=progress,
                                     precision=opts.precision, offload=opts.offload, accumulate=opts.accumulate,
                                     sum_=distributed.sum_ if distributed.active() else None)
    for r in rerouting.values():  # every rank the same costs: the sums over all processes' batches
        for tensor in (r.zero, r.reroute, r.tokens) if distributed.active() else ():
            tensor.copy_(distributed.sum_(tensor))
    shot.rerouting = {block: r.costs() for block, r in rerouting.items()}
    # a routed expert that fewer than moe.min_tokens calibration tokens reached keeps its weights this shot
    routed = {name: f.tokens for name, f in factors.items() if f.tokens is not None}
    shot.idle = {name for name, n in routed.items() if n < opts.min_tokens}
    for name in [name for name in factors if owner[name] != rank]:
        del factors[name]  # every rank has all factors; it keeps those of the layers it solves
    _sync(devices)
    seconds = {"curvature": time.perf_counter() - t0}
    if opts.damping == "auto":
        if heldout is None:
            raise ValueError("curvature.damping=auto needs the held-out windows (prune_shot(heldout=...))")
        more, info = search_damping(shot, factors, opts, heldout, scale, seq_len=batches[0].shape[1],
                                    progress=progress, first=first)
    else:
        more, info = shot.solve(factors, opts, keep=False, progress=progress)
    seconds.update(more)
    if opts.whole_experts and opts.structure == "structured":  # the search may have restored another try's masks
        from .moe import mask_routers

        mask_routers(layers, state.removed)
    experts = {name.rsplit(".", 1)[0]: n for name, n in routed.items() if name.endswith(".gate_up")}
    costs = _expert_costs(layers, shot)
    return seconds, {key: value for key, value in (("solves", info.pop("solves")), ("beta", info.pop("beta")),
                                                   ("expert_tokens", experts), ("expert_costs", costs)) if value} | info


@dataclass
class _Shot:
    """One shot's model, layers and division over processes: `solve` runs its costs, selection and update."""

    model: object
    layers: list[PrunableLayer]
    devices: list
    state: PruneState
    target: float
    owner: dict[str, int]
    mine: list[PrunableLayer]  # the layers this process solves
    measured: bool             # the division comes from the previous shot's seconds
    idle: set = field(default_factory=set)  # routed experts without enough tokens: untouched this shot
    # moe.whole_cost=reroute: per MoE block, (E,) measured costs of each expert re-routed and zeroed (moe.Rerouting)
    rerouting: dict = field(default_factory=dict)
    kfac_costs: dict = field(default_factory=dict)  # per MoE block, (E,) the KFAC cost of each whole expert

    def solve(self, factors: dict, opts: ShotOptions, *, keep: bool, progress: bool = False,
              warm: dict | None = None, keep_warm: bool = False, select: bool = True) -> tuple[dict[str, float], dict]:
        """Costs, selection and update under `opts` (its damping); `keep`: leave `factors` whole (for another
        try), else each layer's are dropped once used. Returns the seconds of the costs and update phases and
        `solves`, `beta` (and over several processes `own_update_s`, `balance`). Joint element solves start from
        `warm`'s solution of a layer where it solved the same system (obs.Warm); `keep_warm`: this process's
        layers' solutions in `warm` of the result; `select=False`: the state's masks are this solve's (no costs
        and selection: a try's, restored), only the update runs."""
        model, layers, state, owner, mine, idle = (self.model, self.layers, self.state, self.owner, self.mine,
                                                   self.idle)
        devices = self.devices
        rank = distributed.rank()
        took = dict.fromkeys([layer.name for layer in mine], 0.0)  # each own layer's costs and update, in seconds
        lap = _lap(devices) if distributed.active() else None
        seconds = {}
        # Costs layer by layer: each layer's solver lives only while its costs are computed, so the shot never
        # holds more than the model, the factors, the costs and one solver (section 5, memory).
        t0 = time.perf_counter()
        obd = opts.correlation == "none"
        whole = opts.whole_experts and opts.structure == "structured"  # routed experts: removed whole or kept
        beta: dict[str, float] = {}
        if select:
            costs = {}  # (layer name, "elements" | "rows" | "cols") -> costs
            for layer in mine:
                if whole and layer.expert is not None:
                    if layer.name in idle:
                        costs[layer.name, "zero"] = torch.full((1,), math.inf, device=layer.weight.device)
                    else:
                        scorer = _scorer(layer, factors[layer.name], opts)
                        cost = scorer.obd_element_costs().sum() if obd else scorer.zero_cost()
                        costs[layer.name, "zero"] = cost.reshape(1)
                        del scorer
                    continue
                if layer.name in idle:
                    inf = functools.partial(torch.full, fill_value=math.inf, device=layer.weight.device)
                    if opts.structure == "structured":
                        costs[layer.name, "rows"], costs[layer.name, "cols"] = inf((layer.out_features,)), inf(
                            (layer.in_features,))
                    else:
                        costs[layer.name, "elements"] = inf(layer.shape)
                    continue
                t1 = time.perf_counter()
                scorer = _scorer(layer, factors[layer.name], opts)
                if opts.structure == "structured":
                    costs[layer.name, "rows"] = scorer.obd_row_costs() if obd else scorer.row_costs()
                    costs[layer.name, "cols"] = scorer.obd_col_costs() if obd else scorer.col_costs()
                else:
                    costs[layer.name, "elements"] = scorer.obd_element_costs() if obd else scorer.element_costs()
                if opts.rank == 2:
                    beta[layer.name] = scorer.beta
                del scorer
                if lap:
                    took[layer.name] += lap(t1)
            if obd:
                if not keep:
                    factors.clear()  # no update: the factors are done
            beta = _in_layer_order(layers, distributed.gather_objects(beta))
            uniform = opts.selection == "uniform"
            if opts.structure == "structured":
                # R + C costs per layer: every rank gets them all and makes the same selection, hence the same masks
                units = [layer for layer in layers if not (whole and layer.expert is not None)]
                keys = [(layer.name, kind) for layer in units for kind in ("rows", "cols")]
                keys += [(layer.name, "zero") for layer in layers if whole and layer.expert is not None]
                costs = distributed.from_owners(costs, {key: owner[key[0]] for key in keys}, keys,
                                                models.input_device(model))
                row_costs = {layer.name: costs.pop((layer.name, "rows")) for layer in units}
                col_costs = {layer.name: costs.pop((layer.name, "cols")) for layer in units}
                groups = _whole_experts(layers, costs, state, self) if whole else None
                chosen = select_structured(row_costs, col_costs, {n: state.rows[n] for n in row_costs},
                                           {n: state.cols[n] for n in col_costs}, self.target, uniform=uniform,
                                           whole=groups)
                rows, cols = chosen[:2]
                del row_costs, col_costs
                state.rows.update(rows)
                state.cols.update(cols)
                for name in rows:
                    state.removed[name] = rows[name][:, None] | cols[name][None, :]
                for block, drop in (chosen[2] if groups else {}).items():
                    for e in drop.nonzero().squeeze(1).tolist():
                        for layer in groups[block].layers[e]:
                            for masks in (state.rows, state.cols, state.removed):
                                masks[layer.name] = torch.ones_like(masks[layer.name])
            else:
                # element costs stay with their owner: the threshold is found from counts combined over the ranks
                split = Split([l.name for l in layers], sum(l.weight.numel() for l in layers),
                              distributed.reduce_ints) if distributed.active() else None
                costs = {layer.name: costs.pop((layer.name, "elements")) for layer in mine}
                removed = {layer.name: state.removed[layer.name] for layer in mine}
                if opts.structure == "semistructured":
                    state.removed.update(select_nm(costs, removed, self.target, opts.n, opts.m, uniform=uniform,
                                                   split=split))
                else:
                    state.removed.update(select_unstructured(costs, removed, self.target, uniform=uniform, consume=True,
                                                             split=split))
                for layer in layers if split else ():  # every rank holds every mask (the checkpoint, the next shot)
                    mask = distributed.broadcast(state.removed[layer.name].to(torch.uint8), owner[layer.name])
                    state.removed[layer.name] = mask.bool()
            del costs
            _sync(devices)
        seconds["costs"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        solves, warms = {}, {}
        for layer in tqdm(mine, desc="update", leave=False, disable=not (progress and factors)):
            if obd or layer.name in idle or (whole and layer.expert is not None):  # an expert: whole or nothing
                if not keep:
                    factors.pop(layer.name, None)
                continue
            name = layer.name
            t1 = time.perf_counter()
            # rebuilt from the factors (the layer's weights have not changed since its costs): one solver at a time
            solver = _solver(layer, factors[name] if keep else factors.pop(name), opts)
            if opts.structure == "structured":
                mode = "independent" if opts.correlation == "independent" else ("union" if opts.union == "exact"
                                                                                else "additive")
                W = solver.update_rows_cols(state.rows[name], state.cols[name], mode=mode)
            elif opts.correlation == "independent":
                W = solver.update_elements_independent(state.removed[name])
            elif opts.solver == "grouped":
                W = solver.update_elements(state.removed[name], max_correlate=opts.max_correlate)
            else:
                try:
                    W, info = solver.update_elements_joint(state.removed[name], tol=opts.tol, max_iter=opts.max_iter,
                                                           warm=(warm or {}).get(name), keep=keep_warm)
                except NotConverged as err:
                    raise NotConverged(f"layer {name}: {err}; raise update.max_iter or update.tol and rerun with "
                                       "resume=true, or use update.solver=grouped") from None
                solves[name] = info.as_dict()
                if keep_warm:
                    warms[name] = info.warm
            set_weight_with_bias(layer.module, W)
            del solver, W
            if lap:
                took[name] += lap(t1)
        _sync(devices)
        own = {"own_update_s": time.perf_counter() - t0} if distributed.active() else {}  # before waiting on the others
        if distributed.active():  # every rank the same seconds, hence the same owners in the next shot
            state.work = _in_layer_order(layers, distributed.gather_objects(took))
            own["balance"] = "previous shot" if self.measured else "R^3+C^3"
        if not obd and distributed.active():
            for layer in layers:  # every rank holds the same model after the shot
                for tensor in (layer.module.weight, layer.module.bias):
                    if tensor is not None:
                        distributed.broadcast(tensor.data, owner[layer.name])
            solves = _in_layer_order(layers, distributed.gather_objects(solves))
        apply_masks(layers, state)
        if whole:
            from .moe import mask_routers

            mask_routers(layers, state.removed)  # no token reaches a removed expert: the rest share its weight
        _sync(devices)
        seconds["update"] = time.perf_counter() - t0
        return seconds, {"solves": solves, "beta": beta} | own | ({"warm": warms} if keep_warm else {})


def _whole_experts(layers: list[PrunableLayer], costs: dict, state: PruneState, shot: "_Shot") -> dict:
    """moe.whole_experts: per MoE block a selection.Whole over its routed experts (an expert's cost: with
    moe.whole_cost=reroute the measured cost of re-routing its tokens (`shot.rerouting`), else the sum of its
    layers' `zero` costs; those are removed from `costs` and kept in `shot.kfac_costs`; an expert with too few
    tokens costs inf; its size: its weights), the `layers` of each expert kept on it.
    The top_k most costly experts left in a block are no candidates: a block keeps at least the experts its
    router chooses per token."""
    from .selection import Whole

    per_block: dict[int, dict[int, list[PrunableLayer]]] = {}
    for layer in layers:
        if layer.expert is not None:
            per_block.setdefault(layer.block, {}).setdefault(layer.expert, []).append(layer)
    groups = {}
    for block, experts in per_block.items():
        members = [experts[e] for e in sorted(experts)]
        cost = torch.stack([sum(costs.pop((l.name, "zero")).double().sum() for l in ls) for ls in members]).cpu()
        shot.kfac_costs[block] = cost
        if block in shot.rerouting:
            cost = torch.where(cost.isinf(), cost, shot.rerouting[block][0].cpu())
        size = torch.tensor([sum(l.weight.numel() for l in ls) for ls in members])
        removed = torch.tensor([all(bool(state.removed[l.name].all()) for l in ls) for ls in members])
        top_k = members[0][0].module.experts.__dict__["_surgeon_router"].top_k
        alive = (~removed).nonzero().squeeze(1)
        cheap = alive[torch.sort(cost[alive].cpu(), stable=True).indices[:max(0, len(alive) - top_k)]]
        candidate = torch.zeros(len(members), dtype=torch.bool)
        candidate[cheap] = True
        parts = torch.tensor([min(l.in_features for l in ls) for ls in members])  # hidden units: down's inputs
        whole = Whole(cost.cpu(), size, removed, candidate, parts)
        whole.layers = members
        groups[block] = whole
    return groups


def _expert_costs(layers: list[PrunableLayer], shot: "_Shot") -> dict:
    """The record's per-shot whole-expert costs (moe.whole_experts): per experts module, the KFAC cost of each
    expert and, where measured, its re-routed and zeroed costs (moe.Rerouting)."""
    names = {layer.block: layer.name.rsplit(".", 2)[0] for layer in layers if layer.expert == 0}
    out = {}
    for block, kfac in shot.kfac_costs.items():
        entry = {"kfac": [float(c) for c in kfac]}
        if block in shot.rerouting:
            entry["reroute"], entry["zero"] = ([float(c) for c in t.cpu()] for t in shot.rerouting[block])
        out[names[block]] = entry
    return out


def search_damping(shot: _Shot, factors: dict, opts: ShotOptions, heldout: torch.Tensor, center: float, *,
                   seq_len: int, progress: bool = False, first: bool = True) -> tuple[dict[str, float], dict]:
    """curvature.damping=auto (docs/algorithm.md section 5): the shot solved under the dampings
    scale * (damping_a, damping_g) for scales center * step^k, k = 0, +1, -1, then further out on the side whose
    end is best while tries remain (`monotone` after the first shot: k = 0, +1, +2, ... only); the weights and
    masks of the try that `choose` picks are kept (`_choice`: the lowest held-out loss, or the largest scale
    within one standard error of it). Every try starts from the weights and masks the shot started from.
    With `try_tol` (looser than update.tol) and joint element solves, the tries solve to try_tol and the chosen
    one is solved once more to update.tol, starting from its try's solutions (`obs.Warm`). The
    account (`damping`): per try the scale, dampings, held-out loss, its increase over the shot, its
    standard error against the lowest and the joint solves' iterations; the chosen scale, and for its step the
    increase the quadratic model predicts (`predicted_increase`) and the measured / predicted ratio."""
    t0 = time.perf_counter()
    start = _Snapshot.take(shot.layers, shot.state)
    before = heldout_losses(shot.model, heldout)
    seconds = {"costs": 0.0, "update": 0.0}
    tried: dict[int, dict] = {}
    losses: dict[int, torch.Tensor] = {}  # per try, the held-out windows' losses
    infos: dict[int, dict] = {}
    loose = opts.joint_solves and opts.try_tol is not None and opts.try_tol > opts.tol
    warms: dict[int, dict] = {}  # loose: per try that may yet be chosen, its layers' solutions
    kept = None  # (k, snapshot) of the try the rule picked among those so far, while more tries may follow
    upward = opts.monotone and not first
    for k in _exponents(opts.tries, tried, upward=upward):
        scale = center * opts.step**k
        if tried:
            start.restore(shot.layers, shot.state)
        try_opts = replace(opts, damping_a=opts.damping_a * scale, damping_g=opts.damping_g * scale,
                           tol=opts.try_tol if loose else opts.tol)
        more, info = shot.solve(factors, try_opts, keep=True, progress=progress, keep_warm=loose)
        for phase in seconds:
            seconds[phase] += more[phase]
        losses[k] = heldout_losses(shot.model, heldout)
        tried[k] = {"scale": scale, "damping_a": try_opts.damping_a, "damping_g": try_opts.damping_g,
                    "heldout_loss": losses[k].mean().item(), "measured": (losses[k] - before).mean().item()}
        if info["solves"]:
            tried[k]["iterations"] = sum(s["iterations"] for s in info["solves"].values())
        if loose:  # its solutions and masks, for the refinement if it is chosen
            warms[k] = (info.pop("warm"), _Snapshot.masks(shot.state))
            for j in [j for j in warms if j != _choice(losses, opts.choose) and j != k]:
                del warms[j]  # neither the rule's pick so far nor the latest: solved afresh if chosen after all
        infos[k] = info
        if not loose and _choice(losses, opts.choose) == k and len(tried) < opts.tries:  # more tries may follow
            kept = (k, _Snapshot.take(shot.layers, shot.state))
    k = _choice(losses, opts.choose)
    if loose:  # the chosen try to update.tol: its masks (no second costs phase), from its solutions
        start.restore(shot.layers, shot.state)
        warm, masks = warms.get(k, (None, None))
        if masks is not None:
            masks.restore(shot.layers, shot.state)
        more, refined_info = shot.solve(factors, replace(opts, damping_a=tried[k]["damping_a"],
                                                         damping_g=tried[k]["damping_g"]), keep=True,
                                        progress=progress, warm=warm, select=masks is None)
        infos[k] = refined_info | {"beta": refined_info["beta"] or infos[k]["beta"]}  # beta: of its costs phase
        for phase in seconds:
            seconds[phase] += more[phase]
        del warms, warm, masks
        refined = heldout_losses(shot.model, heldout)  # the account's loss is the kept (refined) model's
    elif k != list(tried)[-1]:  # the model holds the last try: the chosen one's copy, or (a rule that picked it
        if kept is not None and kept[0] == k:  # only after later tries, as within_se can) solved once more
            kept[1].restore(shot.layers, shot.state)
        else:
            start.restore(shot.layers, shot.state)
            more, infos[k] = shot.solve(factors, replace(opts, damping_a=tried[k]["damping_a"],
                                                         damping_g=tried[k]["damping_g"]), keep=True,
                                        progress=progress)
            for phase in seconds:
                seconds[phase] += more[phase]
    info = infos[k]
    lowest = _choice(losses, "lowest")
    for j in tried:
        tried[j]["se"] = _paired_se(losses[j], losses[lowest])
    chosen = tried[k]
    if loose:
        chosen = chosen | {"heldout_loss": refined.mean().item(), "measured": (refined - before).mean().item()}
    predicted = predicted_increase(shot, factors, start, seq_len)  # of the chosen step only: it costs a costs phase
    factors.clear()
    seconds["damping"] = time.perf_counter() - t0 - seconds["costs"] - seconds["update"]
    account = {"before": before.mean().item(), "chosen": chosen["scale"], "damping_a": chosen["damping_a"],
               "damping_g": chosen["damping_g"], "heldout_loss": chosen["heldout_loss"],
               "measured": chosen["measured"], "predicted": predicted,
               "ratio": chosen["measured"] / predicted if predicted > 0 else None,
               "tried": [tried[j] for j in tried]}
    if loose:
        account["try_tol"] = opts.try_tol
    return seconds, info | {"damping": account}


def _paired_se(a: torch.Tensor, b: torch.Tensor) -> float:
    """The standard error of the mean of the paired per-window differences a - b (0 for one window)."""
    d = (a - b).double()
    return (d.std(unbiased=True) / math.sqrt(d.numel())).item() if d.numel() > 1 else 0.0


def _choice(losses: dict[int, torch.Tensor], choose: str) -> int:
    """The exponent k the rule picks among the tries so far: `lowest`, the lowest mean held-out loss (ties: the
    earlier try); `within_se`, the largest scale whose mean loss exceeds the lowest by at most one standard
    error of the paired per-window differences (the one-standard-error rule of model selection: of the
    candidates the held-out windows cannot tell apart, the most damped, the smallest step)."""
    lowest = min(losses, key=lambda j: losses[j].mean().item())
    if choose == "lowest":
        return lowest
    best = losses[lowest]
    return max(j for j in losses if (losses[j] - best).mean().item() <= _paired_se(losses[j], best))


def _exponents(tries: int, tried: dict, upward: bool = False):
    """The exponents k of the candidate scales center * step^k: 0, 1, -1, then one further out beyond the end
    whose held-out loss is lowest, while that end is the best and tries remain (read from `tried` as it fills).
    `upward`: 0, 1, then 2, 3, ... while the largest is the best (the damping never falls below the centre)."""
    for k in ((0, 1) if upward else (0, 1, -1))[:tries]:
        yield k
    while len(tried) < tries:
        best = min(tried, key=lambda j: tried[j]["heldout_loss"])
        if best == max(tried):
            yield best + 1
        elif best == min(tried) and not upward:
            yield best - 1
        else:
            return


@dataclass
class _Snapshot:
    """The prunable layers' weights (bias column included) and the masks, copied to the host."""

    weights: dict[str, torch.Tensor]
    state: dict

    @classmethod
    def take(cls, layers: list[PrunableLayer], state: PruneState) -> "_Snapshot":
        return cls({layer.name: weight_with_bias(layer.module).detach().cpu() for layer in layers},
                   cls.masks(state).state)

    @classmethod
    def masks(cls, state: PruneState) -> "_Snapshot":
        """The masks alone (`restore` then leaves the weights as they are)."""
        return cls({}, {key: {k: v.clone() for k, v in masks.items()} for key, masks in
                        (("removed", state.removed), ("rows", state.rows), ("cols", state.cols))})

    @torch.no_grad()
    def restore(self, layers: list[PrunableLayer], state: PruneState) -> None:
        for layer in layers if self.weights else ():
            set_weight_with_bias(layer.module, self.weights[layer.name].to(layer.weight.device))
        for key, masks in self.state.items():
            getattr(state, key).update({k: v.clone() for k, v in masks.items()})


def heldout_losses(model, windows: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Per window of `windows`, the mean next-token cross-entropy, float64 on the host (over several processes
    each takes a contiguous share of the batches; every process gets all of them, in window order)."""
    from .evaluate import window_losses

    mine = distributed.share(list(windows.split(batch_size)))
    losses = window_losses(model, torch.cat(mine), batch_size) if mine else torch.zeros(0, dtype=torch.float64)
    return distributed.gather_losses(losses)



@torch.no_grad()
def predicted_increase(shot: _Shot, factors: dict, start: _Snapshot, seq_len: int) -> float:
    """The increase of the mean token loss that the (undamped) quadratic model predicts for the shot's step
    D = W - W_start of every layer: 1/2 T (T-1) sum_layers <D, G D A> (+ G2 D A2 at rank 2), T = calib.seq_len
    (docs/algorithm.md section 5: G holds gradients of per-sequence means, so the per-token Fisher is
    T (T-1) G (x) A). Summed over the processes, each taking the layers whose factors it holds."""
    total = 0.0
    for layer in shot.mine:
        f = factors.get(layer.name)
        if f is None:
            continue
        W = weight_with_bias(layer.module)
        D = (W - start.weights[layer.name].to(W.device)).to(work_dtype(W.dtype))
        f = f.to(W.device)
        if f.diagonal:
            total += (D**2 * f.G[:, None] * f.A[None, :]).sum().item()
        else:
            total += (D * (f.G @ D @ f.A)).sum().item()
            if f.A2 is not None:
                total += (D * (f.G2 @ D @ f.A2)).sum().item()
    total = sum(distributed.gather_objects(total))
    return 0.5 * seq_len * (seq_len - 1) * total


def _lap(devices):
    """Seconds since a perf_counter reading, once the devices' queued work is done (a layer's own time)."""
    def lap(t0: float) -> float:
        _sync(devices)
        return time.perf_counter() - t0
    return lap


def _work(layer: PrunableLayer) -> float:
    """A layer's share of a shot's solves, for dividing layers over processes: its factorisations, R^3 + C^3."""
    R, C = layer.weight.shape
    return float(R) ** 3 + float(C) ** 3


def _in_layer_order(layers: list[PrunableLayer], parts: list[dict]) -> dict:
    """The per-layer entries of every process's dict, merged in layer order."""
    merged = {key: value for part in parts for key, value in part.items()}
    return {layer.name: merged[layer.name] for layer in layers if layer.name in merged}
