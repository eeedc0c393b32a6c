"""Curvature estimation (docs/algorithm.md section 2): per-layer Kronecker factors F ~ G (x) A.

Hooks on every prunable Linear collect, per token, the layer input a (with a trailing 1
when the Linear has a bias) and the output gradient g, as batched matmuls over the
(B*T, width) activations. Parameters are frozen during the passes and the gradient is
taken w.r.t. the embedding output, so no weight gradient is ever computed or stored.
At rank 2 the second Kronecker term of (per-token Fisher - G (x) A) is found by
alternating power iteration, one pass over the batches per half-step, never forming F.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from surgeon.adapters import PrunableLayer
from surgeon.models import input_device

FISHERS = ("empirical", "sampled")
KINDS = ("kfac", "diag_a", "identity")
RANKS = (1, 2)
PRECISIONS = ("fp32", "tf32", "bf16")
OFFLOADS = ("none", "cpu")
ACCUMULATES = ("float32", "float64")


@dataclass
class Factors:
    """One layer's undamped curvature F ~ G (x) A [+ G2 (x) A2], vec(W) row-major (section 2)."""

    A: Tensor  # (C, C) inputs; bias folded in as a trailing constant-1 input; (C,) when diagonal
    G: Tensor  # (R, R) output gradients; (R,) when diagonal
    A2: Tensor | None = None  # rank-2 second term: symmetric, generally indefinite
    G2: Tensor | None = None
    tokens: int | None = None  # a routed expert's calibration tokens (None: every token reaches the layer)

    @property
    def diagonal(self) -> bool:
        """The magnitude and L-OBD curvatures are diagonal and kept as vectors, never as C x C matrices."""
        return self.A.dim() == 1

    def to(self, device) -> "Factors":
        """The factors on `device` (from host memory under curvature.offload=cpu); self when already there."""
        if self.A.device == torch.device(device):
            return self
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Factors(A=move(self.A), G=move(self.G), A2=move(self.A2), G2=move(self.G2), tokens=self.tokens)

    def dense(self) -> "Factors":
        """The same factors as matrices (for an OBS solver, which needs them whole)."""
        if not self.diagonal:
            return self
        return Factors(A=torch.diag(self.A), G=torch.diag(self.G), A2=self.A2, G2=self.G2, tokens=self.tokens)


def sequence_loss(model: nn.Module, input_ids: Tensor, labels: Tensor | None = None) -> Tensor:
    """Sum over sequences of each sequence's mean next-token cross-entropy (section 2's L).

    `labels` follows the transformers convention (same shape as `input_ids`, shifted
    inside); by default the true next tokens.
    """
    logits = model(input_ids=input_ids, use_cache=False).logits
    targets = (input_ids if labels is None else labels)[:, 1:]
    return _next_token_loss(logits, targets)


def _next_token_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Sum over sequences of the mean CE of logits[:, :-1] against targets (B, T-1)."""
    logits = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))
    ce = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # (B, T-1)
    return ce.mean(dim=1).sum()


def with_bias_input(X: Tensor, bias: bool) -> Tensor:
    """Rows are per-token inputs a; append the constant-1 input of the bias (section 1)."""
    if not bias:
        return X
    return torch.cat([X, X.new_ones(X.shape[0], 1)], dim=1)


def residual_half_step(S: Tensor, n: int, X_other: Tensor, K_other: Tensor, K: Tensor) -> Tensor:
    """One alternating power-iteration half-step on the residual Fisher (section 2, RK=2).

    With S = sum_t (b_t^T X_other b_t) c_t c_t^T over n tokens (b, c the per-token vectors on
    the other side and on this side) this is (F - K (x) K_other) applied to X_other:
    S/n - <K_other, X_other> K, symmetrised against rounding.
    """
    M = S / n - torch.sum(K_other * X_other) * K
    return (M + M.T) / 2


class _LayerStats:
    """One layer's accumulators, filled by its hooks during a pass over the batches."""

    def __init__(self, layer: PrunableLayer, dtype: torch.dtype, store: torch.device | None = None,
                 accumulate: torch.dtype | None = None):
        self.layer = layer
        self.dtype = dtype
        self.accumulate = accumulate or dtype  # dtype of the sums; each batch's products are in `dtype`
        self.store = store  # where the sums live: the layer's device, or the host (curvature.offload=cpu)
        self.bias = layer.bias is not None
        self.n = 0  # tokens seen in the current pass
        self.A: Tensor | None = None
        self.G: Tensor | None = None
        self.A2: Tensor | None = None
        self.G2: Tensor | None = None
        self.S: Tensor | None = None  # running half-step sum_t (b_t^T X b_t) c_t c_t^T
        # the layer that reads the same input (q/k/v, gate/up) and accumulates the A both share
        self.a_owner: _LayerStats | None = None

    def _add(self, name: str, value: Tensor) -> None:
        current = getattr(self, name)
        if self.store is not None:
            value = value.to(self.store)
        value = value.to(self.accumulate)
        setattr(self, name, value if current is None else current + value)

    def zero_sums(self, mode: str) -> None:
        """The sums a pass in `mode` makes, as zeros where the pass has not started them."""
        R, C = self.layer.out_features, self.layer.in_features + self.bias
        shapes = {"diag": {"A": (C,)}, "kfac": {"A": (C, C), "G": (R, R)},
                  "kfac+g2": {"A": (C, C), "G": (R, R), "S": (R, R)}, "g2": {"S": (R, R)}, "a2": {"S": (C, C)}}
        where = self.store or self.layer.weight.device
        for name, shape in shapes[mode].items():
            if getattr(self, name) is None and not (name == "A" and self.a_owner is not None):
                setattr(self, name, torch.zeros(shape, dtype=self.accumulate, device=where))

    def forward_hook(self, mode: str):
        """Hook for one pass. mode: 'diag' (diag of A only), 'kfac' (A, G), 'kfac+g2' (A, G
        and the G2 half-step from A2), 'g2' or 'a2' (one rank-2 half-step)."""

        def hook(module: nn.Linear, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            with torch.autocast(output.device.type, enabled=False):  # statistics in float32 under a bf16 pass
                self._forward(mode, module, inputs, output)

        return hook

    def _forward(self, mode: str, module: nn.Linear, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        """The forward half of the hook (see forward_hook)."""
        X = inputs[0].detach().reshape(-1, self.layer.in_features).to(self.dtype)
        X = with_bias_input(X, self.bias)
        self.n += X.shape[0]
        if mode == "diag":
            if self.a_owner is None:
                self._add("A", (X * X).sum(dim=0))
            return
        if mode.startswith("kfac") and self.a_owner is None:
            self._add("A", X.T @ X)
        if mode.endswith("g2"):
            output.register_hook(self._g_hook(mode, ((X @ self.A2) * X).sum(dim=1, keepdim=True)))
        elif mode == "a2":
            output.register_hook(self._a2_hook(X))
        else:
            output.register_hook(self._g_hook(mode, None))

    def _g_hook(self, mode: str, w: Tensor | None):
        """Backward hook: G and/or the G2 half-step, whose token weights w = a^T A2 a came from the forward."""

        def hook(grad: Tensor) -> None:
            Y = grad.detach().reshape(-1, self.layer.out_features).to(self.dtype)
            if mode.startswith("kfac"):
                self._add("G", Y.T @ Y)
            if w is not None:
                self._add("S", Y.T @ (w * Y))

        return hook

    def _a2_hook(self, X: Tensor):
        """Backward hook of the A2 half-step: token weights g^T G2 g on the forward's inputs X."""

        def hook(grad: Tensor) -> None:
            Y = grad.detach().reshape(-1, self.layer.out_features).to(self.dtype)
            self._add("S", X.T @ (((Y @ self.G2) * Y).sum(dim=1, keepdim=True) * X))

        return hook


def estimate_curvature(
    model: nn.Module,
    layers: list[PrunableLayer],
    batches: list[Tensor],
    *,
    fisher: str = "empirical",
    rank: int = 1,
    kind: str = "kfac",
    rank2_iters: int = 3,
    seed: int = 0,
    progress: bool = False,
    precision: str = "fp32",
    offload: str = "none",
    accumulate: str = "float32",
    sum_=None,
) -> dict[str, Factors]:
    """KFAC factors of every layer from one forward+backward per batch (section 2; RK=2 term).

    L = sum over the sequences of a batch of each sequence's mean next-token CE, so each
    sequence's gradient is its own; A = sum a a^T / (N*T), G = sum g g^T / (N*T) over all
    N sequences and T tokens. fisher: "empirical" (true next tokens) or "sampled" (labels
    drawn from the model's predictive distribution, seeded by `seed`). kind: "kfac";
    "diag_a" (L-OBD: diag(A) over all sequences, G = I; forward passes only); "identity"
    (magnitude: A = I, G = I, no pass). rank=2 adds (G2, A2), the leading Kronecker term of
    the residual per-token Fisher, by alternating power iteration: the first G2 half-step,
    from a seeded random symmetric A2, rides along the KFAC pass, then `rank2_iters` more
    passes over `batches` each make one half-step (A2, G2, A2, ...). Factors are float64 for a float64 model,
    float32 otherwise, on the device of their layer's weight (`offload="cpu"`: summed in host memory, each batch's
    product computed on the device and added on the host); `precision` is that of the passes' matmuls ("fp32"; "tf32": TF32 on
    CUDA; "bf16": autocast), the statistics are accumulated in float32 whatever it is. `accumulate="float64"` sums
    each batch's float32 products in float64, exactly in practice, so the sums do not depend on how the batches are
    ordered or split; the factors are still float32. `sum_` (in place, e.g. `distributed.sum_`) adds up the sums and
    token counts of each pass over the processes that each saw a share of the batches. The model's requires_grad
    flags and train/eval mode are restored and all hooks removed on exit.
    """
    if rank not in RANKS:
        raise ValueError(f"curvature.rank={rank} is not supported; valid values: {list(RANKS)}")
    if kind not in KINDS:
        raise ValueError(f"curvature.kind='{kind}' is not supported; valid values: {list(KINDS)}")
    if fisher not in FISHERS:
        raise ValueError(f"curvature.fisher='{fisher}' is not supported; valid values: {list(FISHERS)}")
    if rank == 2 and kind != "kfac":
        raise ValueError(f"curvature.rank=2 needs curvature.kind='kfac', got '{kind}'")
    if rank2_iters < 1:
        raise ValueError(f"curvature.rank2_iters={rank2_iters} must be >= 1")
    if offload not in OFFLOADS:
        raise ValueError(f"curvature.offload='{offload}' is not supported; valid values: {list(OFFLOADS)}")
    if offload == "cpu" and rank != 1:
        raise ValueError("curvature.offload=cpu keeps Kronecker rank 1 factors only; use curvature.rank=1")
    if precision not in PRECISIONS:
        raise ValueError(f"curvature.precision='{precision}' is not supported; valid values: {list(PRECISIONS)}")
    if accumulate not in ACCUMULATES:
        raise ValueError(f"curvature.accumulate='{accumulate}' is not supported; valid values: {list(ACCUMULATES)}")
    if not batches and kind != "identity":
        raise ValueError("estimate_curvature needs at least one calibration batch")

    # statistics live on their layer's weight's device (several under a device map), token ids go to the embeddings'
    dtype = torch.float64 if next(model.parameters()).dtype == torch.float64 else torch.float32
    device = input_device(model)
    store = torch.device("cpu") if offload == "cpu" else None
    sums = torch.float64 if accumulate == "float64" else dtype
    stats = {layer.name: _LayerStats(layer, dtype, store, sums) for layer in layers}
    finish = lambda *names: _finish_pass(stats, names, sum_, dtype, device)  # noqa: E731

    ones = lambda n, s: torch.ones(n, dtype=dtype, device=s.layer.weight.device)  # noqa: E731 - diagonal of I
    if kind == "identity":
        return {s.layer.name: Factors(A=ones(s.layer.in_features + s.bias, s),
                                      G=ones(s.layer.out_features, s)) for s in stats.values()}

    _share_inputs(model, stats, batches[0].to(device))
    if kind == "diag_a":
        _run_pass(model, stats, batches, "diag", fisher, seed, device, progress, precision)
        finish("A")
        _alias_shared(stats, lambda s: s.A / max(s.n, 1))
        _routed_share(stats)
        return {name: Factors(A=s.A, G=ones(s.layer.out_features, s), tokens=_tokens(s)) for name, s in stats.items()}

    if rank == 2:
        generators = {}  # one seeded stream per device: on one device the same draws as ever
        for s in stats.values():
            C, where = s.layer.in_features + s.bias, s.layer.weight.device
            if where not in generators:
                generators[where] = torch.Generator(device=where).manual_seed(seed)
            X = torch.randn(C, C, generator=generators[where], device=where, dtype=dtype)
            s.A2 = (X + X.T) / torch.linalg.matrix_norm(X + X.T)
    _run_pass(model, stats, batches, "kfac+g2" if rank == 2 else "kfac", fisher, seed, device, progress, precision)
    finish("A", "G", "S")
    _alias_shared(stats, lambda s: s.A / max(s.n, 1))
    for s in stats.values():
        s.G = s.G / max(s.n, 1)
    if rank == 2:
        _rank2_iterations(model, stats, batches, fisher, seed, device, progress, rank2_iters, precision, finish)
    _routed_share(stats)
    return {name: Factors(A=s.A, G=s.G, A2=s.A2, G2=s.G2, tokens=_tokens(s)) for name, s in stats.items()}


def _tokens(s: _LayerStats) -> int | None:
    return s.n if s.layer.expert is not None else None


def _routed_share(stats: dict[str, _LayerStats]) -> None:
    """A routed expert's factors are means over the n_e tokens routed to it, but its share of the loss's Fisher
    is the sum over those tokens alone: n_e / N of what the means give for a layer every one of the N tokens
    reaches. The A side (A, A2) takes that factor, so costs compare across experts and layers under one
    threshold, and an expert no token reached has zero curvature (prune.py keeps it as it is)."""
    everyone = max((s.n for s in stats.values() if s.layer.expert is None), default=0)
    for s in stats.values():
        if s.layer.expert is None or everyone == 0:
            continue
        share = s.n / everyone
        s.A = s.A * share
        if s.A2 is not None:
            s.A2 = s.A2 * share


def _share_inputs(model: nn.Module, stats: dict[str, _LayerStats], input_ids: Tensor) -> None:
    """Find the layers that read the very same input tensor as the layer called just before them (q/k/v,
    gate/up) with one short forward, and let them share that layer's A: accumulated once, stored once."""
    last: list = [None, None]  # the previous hooked layer's input tensor and its A's owner
    handles = []

    def probe(s: _LayerStats):
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            x, owner = last
            s.a_owner = owner if inputs[0] is x and owner.bias == s.bias else None
            last[:] = inputs[0], s.a_owner or s

        return hook

    try:
        handles = [s.layer.module.register_forward_hook(probe(s)) for s in stats.values()]
        with torch.no_grad():
            model(input_ids=input_ids[:1, : min(8, input_ids.shape[1])], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()


def _alias_shared(stats: dict[str, _LayerStats], finish) -> None:
    """Owners' accumulated A -> finish(A); sharing layers point at their owner's tensor."""
    for s in stats.values():
        if s.a_owner is None:
            s.A = finish(s)
    for s in stats.values():
        if s.a_owner is not None:
            s.A = s.a_owner.A


def _rank2_iterations(
    model: nn.Module,
    stats: dict[str, _LayerStats],
    batches: list[Tensor],
    fisher: str,
    seed: int,
    device: torch.device,
    progress: bool,
    rank2_iters: int,
    precision: str,
    finish,
) -> None:
    """Half-steps G2 <- R(A2) (accumulated in the KFAC pass), A2 <- R^T(G2), G2 <- R(A2), ...

    Iterates keep unit norm; the last half-step is the best factor given the other
    (unit) one, and its norm is split so that both end with equal Frobenius norms.
    """
    side = "g2"
    for step in range(rank2_iters + 1):
        for s in stats.values():
            if side == "g2":
                s.G2 = residual_half_step(s.S, max(s.n, 1), s.A2, s.A, s.G)
                s.G2, s.A2 = _normalise(s.G2, s.A2, last=step == rank2_iters)
            else:
                s.A2 = residual_half_step(s.S, max(s.n, 1), s.G2, s.G, s.A)
                s.A2, s.G2 = _normalise(s.A2, s.G2, last=step == rank2_iters)
            s.S = None
        if step == rank2_iters:
            return
        side = "a2" if side == "g2" else "g2"
        _run_pass(model, stats, batches, side, fisher, seed, device, progress, precision)
        finish("S")


def _finish_pass(stats: dict[str, _LayerStats], names: tuple[str, ...], sum_, dtype: torch.dtype,
                 device: torch.device) -> None:
    """After a pass: the sums it made (`names`) and the token counts added up over the processes (`sum_`, when
    several share the batches), the sums in the factors' dtype (a float64 sum is rounded once, here)."""
    for s in stats.values():
        for name in names:
            value = getattr(s, name)
            if value is None or (name == "A" and s.a_owner is not None):
                continue
            if sum_ is not None:
                value = sum_(value)
            setattr(s, name, value.to(dtype))
        if sum_ is not None:
            s.n = int(sum_(torch.tensor([s.n], dtype=torch.int64, device=device)).item())


def _normalise(M: Tensor, other: Tensor, last: bool) -> tuple[Tensor, Tensor]:
    """Unit-norm iterate; after the last half-step M (x) other is kept and split to equal norms."""
    norm = torch.linalg.matrix_norm(M)
    if norm == 0:  # no residual left (e.g. a fully pruned layer): the second term is zero
        return torch.zeros_like(M), torch.zeros_like(other)
    if not last:
        return M / norm, other
    return M / norm.sqrt(), other * norm.sqrt()


@contextlib.contextmanager
def forward_precision(precision: str, device: torch.device):
    """Matmuls of a calibration forward in `precision`: "fp32" (TF32 off), "tf32" (CUDA TF32 matmuls and
    convolutions), "bf16" (autocast to bfloat16); the TF32 flags are restored on exit."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
    try:
        if precision == "bf16":
            with torch.autocast(device.type, dtype=torch.bfloat16):
                yield
        else:
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def _run_pass(
    model: nn.Module,
    stats: dict[str, _LayerStats],
    batches: list[Tensor],
    mode: str,
    fisher: str,
    seed: int,
    device: torch.device,
    progress: bool,
    precision: str = "fp32",
) -> None:
    """One forward (+ backward unless mode == 'diag') per batch with every layer's hook in `mode`."""
    requires_grad = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    handles = []
    leaves: list[Tensor] = []

    def embedding_leaf(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        leaves.append(output.detach().requires_grad_(True))
        return leaves[-1]

    try:
        model.eval()  # dropout off: the curvature of the deterministic model
        for p in model.parameters():
            p.requires_grad_(False)
        for s in stats.values():
            s.n = 0
            if s.layer.expert is not None:
                s.zero_sums(mode)  # an expert may see no token here: its sums still exist (and are summed over ranks)
            handles.append(s.layer.module.register_forward_hook(s.forward_hook(mode)))
        if mode != "diag":
            # parameters are frozen and gradients start at the embedding output, so the
            # backward reaches every layer output without computing any weight gradient
            handles.append(model.get_input_embeddings().register_forward_hook(embedding_leaf))
        # re-seeded every pass: every rank-2 pass must see the same sampled labels (drawn where the logits are)
        generator = None
        for input_ids in tqdm(batches, desc=f"curvature ({mode})", disable=not progress):
            input_ids = input_ids.to(device)
            if mode == "diag":
                with torch.no_grad(), forward_precision(precision, device):
                    model(input_ids=input_ids, use_cache=False)
                continue
            leaves.clear()
            with forward_precision(precision, device):  # the backward follows the forward's dtypes
                logits = model(input_ids=input_ids, use_cache=False).logits
            targets = input_ids[:, 1:].to(logits.device)
            if fisher == "sampled":
                generator = generator or torch.Generator(device=logits.device).manual_seed(seed)
                scores = logits[:, :-1].detach().to(torch.promote_types(logits.dtype, torch.float32))
                probs = torch.softmax(scores, dim=-1).reshape(-1, logits.shape[-1])
                targets = torch.multinomial(probs, 1, generator=generator).reshape(targets.shape)
            torch.autograd.grad(_next_token_loss(logits, targets), leaves)
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in zip(model.parameters(), requires_grad):
            p.requires_grad_(flag)
        model.train(was_training)
