"""Optimal Brain Surgeon costs and updates under a Kronecker-factored Fisher.

docs/algorithm.md sections 2 and 3. A layer's W is (R, C), vec(W) row-major, F ~ G (x) A
(RK=1) or G1 (x) A1 + G2 (x) A2 (RK=2). With a bias, the last column of W is the bias:
it is never removed on its own, and a removed row takes it along. All work happens on
the live sub-factors; dead rows and columns cost 0 and are never updated.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
from torch import Tensor

UPDATE_MODES = ("union", "additive", "independent")


# the joint element update solves on the kept entries when more than this fraction of a layer's live
# entries is removed (measured on the testbed's real factors: the dual stalls above ~0.95, the primal
# below ~0.8)
PRIMAL_ABOVE = 0.9


class NotConverged(RuntimeError):
    """The joint element solve stopped at its iteration cap above its residual tolerance."""


@dataclass
class Warm:
    """A joint element solve's solution (host float32): the multipliers on Q (dual) or the update on the kept
    entries (primal), with the removed mask it solved for; `update_elements_joint(warm=...)` starts from it when
    the mask and formulation are the same (the curvature.auto_damping.tol search refines its chosen try)."""

    formulation: str
    removed: Tensor  # (R', C') live-coordinate mask Q
    x: Tensor

    def start(self, formulation: str, Q: Tensor, shape, device) -> Tensor | None:
        """x as the start of a solve of `formulation` on Q (of the sub-system's `shape`), or None: another system."""
        if self.formulation != formulation or tuple(self.x.shape) != tuple(shape) \
                or self.removed.shape != Q.shape or not torch.equal(self.removed, Q.cpu()):
            return None
        return self.x.to(device=device, dtype=torch.float64)


@dataclass
class SolveInfo:
    """How one layer's joint element update was solved (recorded per layer and shot)."""

    removed: int           # |Q|: removed live entries, earlier shots' zeros included
    iterations: int
    residual: float        # final true relative residual of the system solved (0 when w_Q = 0)
    converged: bool
    formulation: str = ""  # "dual" (on Q) or "primal" (on the kept entries); "" when nothing was solved
    # the system's solution, for a later solve of the same system to a tighter tol to start from (not recorded)
    warm: Warm | None = field(default=None, repr=False, compare=False)

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "warm"}  # no tensor copies


def damp(M: Tensor, lam: float) -> Tensor:
    """M + lam * mean(diag M) * I (section 2, damping)."""
    eye = torch.eye(M.shape[0], dtype=M.dtype, device=M.device)
    return M + lam * M.diagonal().mean() * eye


def _cholesky(M: Tensor, what: str) -> Tensor:
    """float64 lower Cholesky factor of M, or a ValueError naming `what`."""
    L, info = torch.linalg.cholesky_ex(M.double())
    if info != 0 or not torch.isfinite(L.diagonal()).all():  # a NaN anywhere reaches the diagonal
        raise ValueError(
            f"{what} is not positive definite: curvature factors must be finite, symmetric and "
            "positive semi-definite (raise curvature.damping_a / curvature.damping_g if they are "
            "near-singular)"
        )
    return L


def congruence(M1: Tensor, M2: Tensor | None, what: str) -> tuple[Tensor, Tensor | None]:
    """float64 K, s with K^T M1 K = I and K^T M2 K = diag(s); K = L^-T, s = None without M2 (section 2)."""
    L = _cholesky(M1, what)
    eye = torch.eye(L.shape[0], dtype=L.dtype, device=L.device)
    L_inv = torch.linalg.solve_triangular(L, eye, upper=False)
    if M2 is None:
        return L_inv.T, None
    C = L_inv @ M2.double() @ L_inv.T
    s, E = torch.linalg.eigh((C + C.T) / 2)
    return L_inv.T @ E, s


def shrink_factor(sigma: Tensor, tau: Tensor, eps: float) -> float:
    """Largest beta <= 1 with min_ij 1 + beta sigma_i tau_j >= eps (section 2, damping at RK=2)."""
    if sigma.numel() == 0 or tau.numel() == 0:
        return 1.0
    ends = torch.stack([sigma.min(), sigma.max()])[:, None] * torch.stack([tau.min(), tau.max()])
    m = ends.min().item()
    return 1.0 if 1 + m >= eps else (1 - eps) / -m


def _sub(M: Tensor, idx: Tensor, dtype: torch.dtype) -> Tensor:
    """The principal sub-block M[idx, idx]."""
    return M[idx][:, idx].to(dtype)


def _check_factor(M: Tensor, name: str) -> None:
    if not torch.isfinite(M).all():
        raise ValueError(f"curvature factor {name} must be finite (NaN or inf found)")
    tol = torch.finfo(M.dtype).eps ** 0.5 * M.abs().max().clamp_min(1e-30)
    if (M - M.T).abs().max() > tol:
        raise ValueError(f"curvature factor {name} must be symmetric")


class LayerOBS:
    """OBS costs and updates of one layer under its damped KFAC (section 3)."""

    def __init__(self, W, A, G, *, damping_a, damping_g, has_bias, A2=None, G2=None,
                 rank2_eps=1e-6, undamped_numerators=False):
        """W (R,C) current weights (bias column last if has_bias); A (C,C), G (R,R) UNDAMPED factors;
        A2, G2 the RK=2 second term (symmetric, possibly indefinite). Damps and inverts the live
        sub-factors (section 2); for RK=2 builds the congruence basis K_G, K_A, S, shrinking term 2
        by self.beta < 1 if needed so that min S >= rank2_eps (self.beta = 1.0 when not shrunk)."""
        R, C = W.shape
        if A.shape != (C, C) or G.shape != (R, R):
            raise ValueError(f"W is {R}x{C}: A must be {C}x{C} and G {R}x{R}, "
                             f"got {tuple(A.shape)} and {tuple(G.shape)}")
        if (A2 is None) != (G2 is None):
            raise ValueError("Kronecker rank 2 needs both A2 and G2")
        if A2 is not None and (A2.shape != A.shape or G2.shape != G.shape):
            raise ValueError("A2, G2 must have the shapes of A, G")
        if A2 is not None and undamped_numerators:
            raise ValueError("undamped_numerators is the official RK=1 variant; use curvature.rank=1")
        if not 0 < rank2_eps < 1:
            raise ValueError(f"rank2_eps must lie in (0, 1), got {rank2_eps}")
        for M, name in ((A, "A"), (G, "G"), (A2, "A2"), (G2, "G2")):
            if M is not None:
                _check_factor(M, name)

        self.shape, self.has_bias, self.undamped_numerators = (R, C), has_bias, undamped_numerators
        nonzero = W != 0
        self.live_rows = (nonzero.any(1) & (G.diagonal() > 0)).nonzero().squeeze(1)
        self.live_cols = (nonzero.any(0) & (A.diagonal() > 0)).nonzero().squeeze(1)
        self.W_full = W
        self.W = W[self.live_rows][:, self.live_cols]
        A_raw, G_raw = _sub(A, self.live_cols, W.dtype), _sub(G, self.live_rows, W.dtype)
        if undamped_numerators:  # kept only when needed: a real layer's A is hundreds of MB
            self.A_raw, self.G_raw = A_raw, G_raw
        A1, G1 = damp(A_raw, damping_a), damp(G_raw, damping_g)
        self.terms = [(G1, A1)]
        self.beta = 1.0
        if A2 is None:
            # the inverses are formed when first used (costs, the dual joint solve), not for a structured or
            # primal update of a solver rebuilt for it; a factor that is not positive definite fails here
            self._chol = {"G": _cholesky(G1, "damped G"), "A": _cholesky(A1, "damped A")}
            self.S = None
            return
        A2, G2 = _sub(A2, self.live_cols, W.dtype), _sub(G2, self.live_rows, W.dtype)
        K_G, sigma = congruence(G1, G2, "damped G1")
        K_A, tau = congruence(A1, A2, "damped A1")
        self.beta = shrink_factor(sigma, tau, rank2_eps)
        S = 1 + self.beta * sigma[:, None] * tau[None, :]
        if S.numel() and not S.min() > 0:
            raise ValueError("G1 (x) A1 + G2 (x) A2 is not positive definite (non-finite factors?)")
        self.terms.append((self.beta * G2, A2))
        self.K_G, self.K_A, self.S = K_G.to(W.dtype), K_A.to(W.dtype), S.to(W.dtype)

    @property
    def Ginv(self) -> Tensor:
        """(G_d)^-1 on the live rows (rank 1), formed once."""
        if "_Ginv" not in self.__dict__:
            self._Ginv = self._inverse_of("G")
        return self._Ginv

    @property
    def Ainv(self) -> Tensor:
        """(A_d)^-1 on the live columns (rank 1), formed once."""
        if "_Ainv" not in self.__dict__:
            self._Ainv = self._inverse_of("A")
        return self._Ainv

    def _inverse_of(self, which: str) -> Tensor:
        """M^-1 = L^-T L^-1 from the Cholesky factor the constructor checked M with (then dropped)."""
        L = self._chol.pop(which)
        eye = torch.eye(L.shape[0], dtype=L.dtype, device=L.device)
        K = torch.linalg.solve_triangular(L, eye, upper=False).T
        return (K @ K.T).to(self.W.dtype)

    # --- F, F^-1 and the per-structure precisions, all in live coordinates ---------------

    def _F(self, X: Tensor) -> Tensor:
        """F X = sum_t G_t X A_t."""
        return sum(G @ X @ A for G, A in self.terms)

    def _inverse(self, X: Tensor, rows=slice(None)) -> Tensor:
        """F^-1 X for X nonzero only on `rows` (section 2: G^-1 X A^-1, or K_G ((K_G^T X K_A) / S) K_A^T)."""
        if self.S is None:
            return self.Ginv[:, rows] @ (X @ self.Ainv)  # cheap when X has few rows
        return self.K_G @ ((self.K_G[rows].T @ X @ self.K_A) / self.S) @ self.K_A.T

    def _inverse_diag(self) -> Tensor:
        """diag F^-1 as an R x C array (section 2: (K_G o K_G) (1/S) (K_A o K_A)^T)."""
        if self.S is None:
            return self.Ginv.diagonal()[:, None] * self.Ainv.diagonal()[None, :]
        return (self.K_G**2) @ (1 / self.S) @ (self.K_A**2).T

    def _row_precision(self, X: Tensor) -> Tensor:
        """Row r of the result is ([F^-1]_{row r})^-1 x_r (section 3, row r: A_d x_r / [G_d^-1]_rr)."""
        if self.S is None:
            return X @ self.terms[0][1] / self.Ginv.diagonal()[:, None]
        A1 = self.terms[0][1]
        D = (self.K_G**2) @ (1 / self.S)  # [F^-1]_{row r} = K_A diag(D_r) K_A^T
        return (X @ A1 @ self.K_A / D) @ self.K_A.T @ A1

    def _col_precision(self, X: Tensor) -> Tensor:
        """Column c of the result is ([F^-1]_{col c})^-1 x_c (section 3, column c: G_d x_c / [A_d^-1]_cc)."""
        if self.S is None:
            return self.terms[0][0] @ X / self.Ainv.diagonal()[None, :]
        G1 = self.terms[0][0]
        E = (1 / self.S) @ (self.K_A**2).T  # [F^-1]_{col c} = K_G diag(E_c) K_G^T
        return G1 @ self.K_G @ (self.K_G.T @ G1 @ X / E)

    def _inverse_block(self, r: Tensor, c: Tensor) -> Tensor:
        """[F^-1]_QQ for the entries Q = {(r_a, c_a)} (section 3, element update)."""
        if self.S is None:
            return self.Ginv[r[:, None], r] * self.Ainv[c[:, None], c]
        # [F^-1]_ab = sum_j K_A[c_a, j] K_A[c_b, j] H_j[r_a, r_b], H_j = K_G diag(1/S_:j) K_G^T
        urows, which = torch.unique(r, return_inverse=True)
        K_A = self.K_A[c]
        block = K_A.new_empty(len(r), len(r))
        for k, row in enumerate(urows):
            H = (self.K_G[row] * self.K_G[urows]) @ (1 / self.S)
            a = which == k
            block[a] = K_A[a] @ (H[which] * K_A).T
        return block

    # --- coordinates -------------------------------------------------------------------

    def _full(self, X: Tensor) -> Tensor:
        """A live-coordinate (R', C') array placed into a zero (R, C) array."""
        out = X.new_zeros(self.shape)
        out[self.live_rows[:, None], self.live_cols] = X
        return out

    def _weights(self, X: Tensor) -> Tensor:
        """Drop the bias column: costs and masks cover weight columns only."""
        return X[..., :-1] if self.has_bias else X

    def _with_bias(self, mask: Tensor) -> Tensor:
        """A weight-column mask extended with a False bias column (biases are never removed alone)."""
        if not self.has_bias:
            return mask
        return torch.cat([mask, mask.new_zeros(mask.shape[:-1] + (1,))], dim=-1)

    def _result(self, W_live: Tensor, removed: Tensor) -> Tensor:
        """The full new W: updated live block, dead entries unchanged, removed (R, C) entries exactly 0."""
        W = self.W_full.clone()
        W[self.live_rows[:, None], self.live_cols] = W_live
        W[removed] = 0
        return W

    def _check_mask(self, mask: Tensor, shape: tuple, name: str) -> Tensor:
        if mask.dtype != torch.bool or tuple(mask.shape) != shape:
            raise ValueError(f"{name} must be a bool tensor of shape {shape}, got {mask.dtype} {tuple(mask.shape)}")
        return mask

    # --- costs (section 3) ---------------------------------------------------------------

    def element_costs(self) -> Tensor:
        """(R, Cw) OBS costs W_rc^2 / (2 [F^-1]_(rc)(rc)) (section 3, element)."""
        return self._weights(self._full(self.W**2 / (2 * self._inverse_diag())))

    def row_costs(self) -> Tensor:
        """(R,) OBS costs w_r^T A_d w_r / (2 [G_d^-1]_rr) of removing whole rows, bias included (section 3)."""
        if self.undamped_numerators:  # official code's variant (docs/algorithm.md Decision)
            quad = ((self.W @ self.A_raw) * self.W).sum(1) / self.Ginv.diagonal()
        else:
            quad = (self._row_precision(self.W) * self.W).sum(1)
        out = self.W.new_zeros(self.shape[0])
        out[self.live_rows] = quad / 2
        return out

    def col_costs(self) -> Tensor:
        """(Cw,) OBS costs w_c^T G_d w_c / (2 [A_d^-1]_cc) of removing weight columns (section 3)."""
        if self.undamped_numerators:
            quad = ((self.G_raw @ self.W) * self.W).sum(0) / self.Ainv.diagonal()
        else:
            quad = (self._col_precision(self.W) * self.W).sum(0)
        out = self.W.new_zeros(self.shape[1])
        out[self.live_cols] = quad / 2
        return self._weights(out)

    def zero_cost(self) -> Tensor:
        """() 1/2 <W, F W>: the OBS cost of removing every weight of the layer (nothing left to update; exact
        under the damped curvature), a routed expert removed whole (moe.whole_experts)."""
        return (self.W * self._F(self.W)).sum() / 2

    def obd_element_costs(self) -> Tensor:
        """(R, Cw) OBD costs 1/2 W_rc^2 F_(rc)(rc) (section 3, correlation=none)."""
        F_diag = sum(G.diagonal()[:, None] * A.diagonal()[None, :] for G, A in self.terms)
        return self._weights(self._full(self.W**2 * F_diag / 2))

    def obd_row_costs(self) -> Tensor:
        """(R,) OBD costs 1/2 G_rr w_r^T A w_r, bias included (section 3, correlation=none)."""
        quad = sum(G.diagonal() * ((self.W @ A) * self.W).sum(1) for G, A in self.terms)
        out = self.W.new_zeros(self.shape[0])
        out[self.live_rows] = quad / 2
        return out

    def obd_col_costs(self) -> Tensor:
        """(Cw,) OBD costs 1/2 A_cc w_c^T G w_c (section 3, correlation=none)."""
        quad = sum(A.diagonal() * ((G @ self.W) * self.W).sum(0) for G, A in self.terms)
        out = self.W.new_zeros(self.shape[1])
        out[self.live_cols] = quad / 2
        return self._weights(out)

    # --- updates (section 3) -------------------------------------------------------------

    def update_elements(self, removed: Tensor, max_correlate: int = 2000) -> Tensor:
        """New W after removing the (R, Cw) mask `removed`, groups of whole rows solved jointly in turn:
        M_Q = ([F^-1]_QQ)^-1 w_Q, dW = -F^-1 M (section 3, correlation=layer)."""
        removed = self._with_bias(self._check_mask(removed, (self.shape[0], self.shape[1] - self.has_bias), "removed"))
        live = removed[self.live_rows][:, self.live_cols]
        W = self.W.clone()
        for a, b in _row_groups(live.sum(1).tolist(), max_correlate):
            r, c = live[a:b].nonzero(as_tuple=True)
            if not len(r):
                continue
            r = r + a
            L = _cholesky(self._inverse_block(r, c), "[F^-1]_QQ")
            M = W.new_zeros(b - a, W.shape[1])
            M[r - a, c] = torch.cholesky_solve(W[r, c].double()[:, None], L)[:, 0].to(W.dtype)
            W -= self._inverse(M, slice(a, b))
        return self._result(W, removed)

    def update_elements_joint(self, removed: Tensor, tol: float = 1e-10, max_iter: int = 2000,
                              formulation: str | None = None, warm: Warm | None = None,
                              keep: bool = False) -> tuple[Tensor, SolveInfo]:
        """New W after removing the (R, Cw) mask `removed`, all of the layer's removed entries Q at once
        (section 3, correlation=layer, the exact layer-joint solve), by Jacobi-preconditioned conjugate
        gradients in float64 on one of two equivalent systems:
          dual,   on Q: [F^-1]_QQ m = w_Q,                  dW = -F^-1 M;
          primal, on the kept entries K: F_KK dW_K = (F Theta)_K,  dW_Q = -w_Q  (Theta = W on Q, 0 elsewhere).
        The dual's conditioning approaches F^-1's as Q grows to the whole layer (the global threshold removes
        ~100% of some layers), the primal's approaches F's as K grows; each is solved where it is the smaller
        system (PRIMAL_ABOVE), the other tried when it does not converge; `formulation` forces one. Raises
        NotConverged when none reaches the relative residual `tol` within `max_iter` iterations.
        `warm`: an earlier solve's solution of the same mask (its `info.warm`), the start of the same
        formulation's iteration (a looser solve refined to `tol`); `keep`: return this solve's in `info.warm`."""
        removed = self._with_bias(self._check_mask(removed, (self.shape[0], self.shape[1] - self.has_bias), "removed"))
        Q = removed[self.live_rows][:, self.live_cols]
        info = SolveInfo(removed=int(Q.sum()), iterations=0, residual=0.0, converged=True)
        theta = torch.where(Q, self.W.double(), 0)
        if theta.norm() == 0:  # nothing new removed: the update is zero (CG would divide 0 by 0)
            return self._result(self.W, removed), info
        if formulation is not None:
            order = [self._check_formulation(formulation)]
        else:
            order = ["primal", "dual"] if info.removed > PRIMAL_ABOVE * Q.numel() else ["dual", "primal"]
        if warm is not None and warm.formulation in order:  # the formulation that solved it before goes first
            order = [warm.formulation] + [f for f in order if f != warm.formulation]
        for info.formulation in order:
            solve = self._joint_primal if info.formulation == "primal" else self._joint_dual
            dW, x, info.iterations, info.residual, info.converged = solve(Q, theta, tol, max_iter, warm)
            if info.converged:
                if keep:
                    info.warm = Warm(info.formulation, Q.cpu(), x.float().cpu())
                return self._result(self.W + dW.to(self.W.dtype), removed), info
        raise NotConverged(f"joint element update: relative residual {info.residual:.2e} after {max_iter} "
                           f"iterations ({' and '.join(order)}), above update.tol={tol:g}")

    @staticmethod
    def _check_formulation(formulation: str) -> str:
        if formulation not in ("primal", "dual"):
            raise ValueError(f"formulation={formulation!r}; valid: primal, dual (None: chosen per layer)")
        return formulation

    def _joint_dual(self, Q: Tensor, theta: Tensor, tol: float, max_iter: int, warm: Warm | None = None
                    ) -> tuple[Tensor, Tensor, int, float, bool]:
        """dW and m from [F^-1]_QQ m = w_Q: [F^-1]_QQ v = (G^-1 V A^-1)_Q (rank 2: K_G ((K_G^T V K_A) / S) K_A^T),
        on the rows and columns that hold a removed entry; Jacobi diag (G^-1)_rr (A^-1)_cc; from `warm`'s m
        when it solved this system."""
        rq, cq = Q.any(1).nonzero().squeeze(1), Q.any(0).nonzero().squeeze(1)
        Qs, b = Q[rq][:, cq], theta[rq][:, cq]
        if self.S is None:
            Gi, Ai = self.Ginv.double(), self.Ainv.double()
            Gs, As = Gi[rq][:, rq], Ai[cq][:, cq]
            make = lambda Gs, As: lambda V: torch.where(Qs, Gs @ V @ As, 0)  # noqa: E731
            apply, apply32 = make(Gs, As), make(Gs.float(), As.float())
        else:
            K_G, K_A, S = self.K_G.double(), self.K_A.double(), self.S.double()
            KGq, KAq = K_G[rq], K_A[cq]
            make = lambda KG, KA, S: lambda V: torch.where(Qs, KG @ ((KG.T @ V @ KA) / S) @ KA.T, 0)  # noqa: E731
            apply, apply32 = make(KGq, KAq, S), make(KGq.float(), KAq.float(), S.float())
        diag = self._inverse_diag()[rq][:, cq].double()
        x0 = warm.start("dual", Q, b.shape, b.device) if warm is not None else None
        m, *stats = _pcg_refined(apply, apply32, b, torch.where(Qs, 1 / diag, 0), tol, max_iter, x0=x0)
        if self.S is None:
            return -(Gi[:, rq] @ m @ Ai[cq]), m, *stats
        return -(K_G @ ((KGq.T @ m @ KAq) / S) @ K_A.T), m, *stats

    def _joint_primal(self, Q: Tensor, theta: Tensor, tol: float, max_iter: int, warm: Warm | None = None
                      ) -> tuple[Tensor, Tensor, int, float, bool]:
        """dW and dW_K from F_KK dW_K = (F Theta)_K on the kept entries K (F V = sum_t G_t V A_t); Jacobi diag F;
        from `warm`'s dW_K when it solved this system."""
        K = ~Q
        dW = -theta
        rk, ck = K.any(1).nonzero().squeeze(1), K.any(0).nonzero().squeeze(1)
        Ks = K[rk][:, ck]
        terms = [(G.double(), A.double()) for G, A in self.terms]
        b = torch.where(Ks, sum(G[rk] @ theta @ A[:, ck] for G, A in terms), 0)
        sub = [(G[rk][:, rk], A[ck][:, ck]) for G, A in terms]
        make = lambda sub: lambda V: torch.where(Ks, sum(G @ V @ A for G, A in sub), 0)  # noqa: E731
        apply, apply32 = make(sub), make([(G.float(), A.float()) for G, A in sub])
        diag = sum(G.diagonal()[:, None] * A.diagonal()[None, :] for G, A in sub)
        x0 = warm.start("primal", Q, b.shape, b.device) if warm is not None else None
        x, *stats = _pcg_refined(apply, apply32, b, torch.where(Ks, 1 / diag, 0), tol, max_iter, x0=x0)
        dW[rk[:, None], ck] += x
        return dW, x, *stats

    def update_elements_independent(self, removed: Tensor) -> Tensor:
        """New W after removing `removed` (R, Cw), each element's OBS update computed alone and summed
        (section 3, correlation=independent)."""
        removed = self._with_bias(self._check_mask(removed, (self.shape[0], self.shape[1] - self.has_bias), "removed"))
        live = removed[self.live_rows][:, self.live_cols]
        M = torch.where(live, self.W / self._inverse_diag(), 0)
        return self._result(self.W - self._inverse(M), removed)

    def update_rows_cols(self, rows: Tensor, cols: Tensor, mode: str = "union") -> Tensor:
        """New W after removing whole rows (R,) (bias included) and weight columns (Cw,) (section 3):
        "union" exact joint solve, "additive" row solve + column solve, "independent" per structure."""
        R, C = self.shape
        self._check_mask(rows, (R,), "rows")
        cols = self._with_bias(self._check_mask(cols, (C - self.has_bias,), "cols"))
        live_r, live_c = rows[self.live_rows], cols[self.live_cols]
        none_r, none_c = torch.zeros_like(live_r), torch.zeros_like(live_c)
        if mode == "union":
            dW = self._remove_rows_cols(live_r, live_c)
        elif mode == "additive":
            dW = self._remove_rows_cols(live_r, none_c) + self._remove_rows_cols(none_r, live_c)
        elif mode == "independent":
            M = (torch.where(live_r[:, None], self._row_precision(self.W), 0)
                 + torch.where(live_c[None, :], self._col_precision(self.W), 0))
            dW = -self._inverse(M)
        else:
            raise ValueError(f"unknown update mode '{mode}'; valid modes: {UPDATE_MODES}")
        return self._result(self.W + dW, rows[:, None] | cols[None, :])

    def _remove_rows_cols(self, rows: Tensor, cols: Tensor) -> Tensor:
        """Exact OBS dW for removing live rows and columns together: dW = -Theta on them and
        dW[K, Kc] = (F_KK)^-1 (F Theta)[K, Kc] on the kept block (section 3, rows and columns together)."""
        theta = torch.where(rows[:, None] | cols[None, :], self.W, 0)
        keep_r, keep_c = (~rows).nonzero().squeeze(1), (~cols).nonzero().squeeze(1)
        Y = self._F(theta)[keep_r][:, keep_c]
        sub = [(G[keep_r][:, keep_r], A[keep_c][:, keep_c]) for G, A in self.terms]
        second = sub[1] if len(sub) == 2 else (None, None)
        # a principal sub-block of a positive definite F is positive definite: no shrinking here
        K_G, sigma = congruence(sub[0][0], second[0], "kept block of damped G")
        K_A, tau = congruence(sub[0][1], second[1], "kept block of damped A")
        K_G, K_A = K_G.to(Y.dtype), K_A.to(Y.dtype)
        X = K_G.T @ Y @ K_A
        if sigma is not None:
            X = X / (1 + sigma[:, None] * tau[None, :]).to(Y.dtype)
        dW = -theta
        dW[keep_r[:, None], keep_c] = K_G @ X @ K_A.T
        return dW


class LayerOBD:
    """OBD costs of one layer (section 3, correlation=none) from its damped factors' diagonals, and for rows and
    columns the damped factors themselves: nothing is inverted. The same numbers as LayerOBS's obd_* costs at
    Kronecker rank 1; factors may be vectors (the diagonal curvatures of magnitude and L-OBD)."""

    def __init__(self, W, A, G, *, damping_a, damping_g, has_bias):
        R, C = W.shape
        if A.shape[0] != C or G.shape[0] != R:
            raise ValueError(f"W is {R}x{C}: A must be {C} wide and G {R}, got {tuple(A.shape)} and {tuple(G.shape)}")
        for M, name in ((A, "A"), (G, "G")):
            if not torch.isfinite(M).all():
                raise ValueError(f"curvature factor {name} must be finite (NaN or inf found)")
        diag = lambda M: M if M.dim() == 1 else M.diagonal()  # noqa: E731
        nonzero = W != 0
        self.shape, self.has_bias = (R, C), has_bias
        self.live_rows = (nonzero.any(1) & (diag(G) > 0)).nonzero().squeeze(1)
        self.live_cols = (nonzero.any(0) & (diag(A) > 0)).nonzero().squeeze(1)
        self.W = W[self.live_rows][:, self.live_cols]
        self.A1 = self._damp(A, self.live_cols, damping_a, W.dtype)
        self.G1 = self._damp(G, self.live_rows, damping_g, W.dtype)

    @staticmethod
    def _damp(M: Tensor, idx: Tensor, lam: float, dtype: torch.dtype) -> Tensor:
        """The damped live sub-factor (section 2), a vector when M is one."""
        if M.dim() == 2:
            return damp(_sub(M, idx, dtype), lam)
        d = M[idx].to(dtype)
        return d + lam * d.mean() if len(d) else d

    _full, _weights = LayerOBS._full, LayerOBS._weights

    @staticmethod
    def _diag(M: Tensor) -> Tensor:
        return M if M.dim() == 1 else M.diagonal()

    def _quad_rows(self, X: Tensor) -> Tensor:
        """x_r^T A1 x_r for every row."""
        if self.A1.dim() == 1:
            return (X * self.A1 * X).sum(1)
        return ((X @ self.A1) * X).sum(1)

    def _quad_cols(self, X: Tensor) -> Tensor:
        """x_c^T G1 x_c for every column."""
        if self.G1.dim() == 1:
            return (self.G1[:, None] * X * X).sum(0)
        return ((self.G1 @ X) * X).sum(0)

    def obd_element_costs(self) -> Tensor:
        """(R, Cw) 1/2 W_rc^2 F_(rc)(rc)."""
        F_diag = self._diag(self.G1)[:, None] * self._diag(self.A1)[None, :]
        return self._weights(self._full(self.W**2 * F_diag / 2))

    def obd_row_costs(self) -> Tensor:
        """(R,) 1/2 G_rr w_r^T A w_r, bias included."""
        out = self.W.new_zeros(self.shape[0])
        out[self.live_rows] = self._diag(self.G1) * self._quad_rows(self.W) / 2
        return out

    def obd_col_costs(self) -> Tensor:
        """(Cw,) 1/2 A_cc w_c^T G w_c."""
        out = self.W.new_zeros(self.shape[1])
        out[self.live_cols] = self._diag(self.A1) * self._quad_cols(self.W) / 2
        return self._weights(out)


def _pcg(apply, b: Tensor, precond: Tensor, tol: float, max_iter: int) -> tuple[Tensor, int, float, bool]:
    """x with apply(x) = b (apply symmetric positive definite) by conjugate gradients with the diagonal
    preconditioner `precond` (elementwise); stops at relative residual `tol` or `max_iter` iterations.
    Returns x, the iterations, the true relative residual ||b - apply(x)|| / ||b|| and whether the
    iteration's residual reached `tol`."""
    b_norm = b.norm()
    x, r = torch.zeros_like(b), b.clone()
    if b_norm == 0:
        return x, 0, 0.0, True
    z = r * precond
    p, rz = z.clone(), (r * z).sum()
    iterations = 0
    while iterations < max_iter and r.norm() > tol * b_norm:
        Ap = apply(p)
        alpha = rz / (p * Ap).sum()
        x += alpha * p
        r -= alpha * Ap
        z = r * precond
        rz, rz_old = (r * z).sum(), rz
        p = z + (rz / rz_old) * p
        iterations += 1
    converged = bool(r.norm() <= tol * b_norm)
    return x, iterations, ((b - apply(x)).norm() / b_norm).item(), converged


# float32 rounds of the joint solve: each reduces the float64 residual by this much (float32 CG reaches ~1e-6)
REFINE_TOL = 1e-5


def _pcg_refined(apply, apply32, b: Tensor, precond: Tensor, tol: float, max_iter: int, rounds: int = 6,
                 x0: Tensor | None = None) -> tuple[Tensor, int, float, bool]:
    """`_pcg` to `tol` at about half the cost: conjugate gradients in float32 on the float64 residual, refined
    (x += float32 solve of b - apply(x), residual recomputed in float64) until the float64 residual reaches
    `tol`; when a float32 round stalls, float64 conjugate gradients finish from where the rounds got to.
    Same returns as `_pcg`, iterations counted over all rounds. `x0`: the start (an earlier, looser solution)."""
    b_norm = b.norm()
    x, r = torch.zeros_like(b), b.clone()
    if b_norm == 0:
        return x, 0, 0.0, True
    if x0 is not None:
        x = x0.to(b.dtype).clone()
        r = b - apply(x)
    iterations, precond32 = 0, precond.float()
    for _ in range(rounds):
        rel = (r.norm() / b_norm).item()
        if rel <= tol or iterations >= max_iter:
            break
        scale = r.norm()
        d, its, _, ok = _pcg(apply32, (r / scale).float(), precond32, max(REFINE_TOL, tol / rel), max_iter - iterations)
        iterations += its
        x += d.double() * scale
        r = b - apply(x)
        if not ok:
            break  # float32 stalled: finish in float64
    rel = (r.norm() / b_norm).item()
    if rel > tol and iterations < max_iter:  # the float64 fallback, warm-started from the rounds' x
        d, its, _, _ = _pcg(apply, r, precond, tol * (b_norm / r.norm()).item(), max_iter - iterations)
        iterations += its
        x += d
        r = b - apply(x)
        rel = (r.norm() / b_norm).item()
    return x, iterations, rel, rel <= tol


def _row_groups(counts: list[int], max_correlate: int) -> list[tuple[int, int]]:
    """Row ranges [a, b): consecutive whole rows while a group's removed count stays <= max_correlate
    (a row never splits; max_correlate=0: one group) (section 3, correlation level)."""
    if max_correlate == 0:
        return [(0, len(counts))]
    groups, start, total = [], 0, 0
    for i, n in enumerate(counts):
        if i > start and total + n > max_correlate:
            groups.append((start, i))
            start, total = i, 0
        total += n
    groups.append((start, len(counts)))
    return groups

