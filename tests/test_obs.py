"""surgeon.obs against brute-force OBS on the dense F (docs/algorithm.md section 8).

The reference solves min 1/2 dθ^T F dθ s.t. (θ + dθ)_Q = 0 by a dense KKT system and
takes costs from dense inv(F); it never uses the Kronecker formulas.
"""
import pytest
import torch

from surgeon.obs import LayerOBS, NotConverged, damp

DA, DG = 0.01, 0.1
R, CW = 5, 7


def spd(n, gen):
    X = torch.randn(3 * n, n, dtype=torch.float64, generator=gen)
    return X.T @ X / (3 * n)


def sym(n, scale, gen):
    X = torch.randn(n, n, dtype=torch.float64, generator=gen)
    return scale * (X + X.T) / 2


def layer(seed, has_bias, cw=CW, dead_rows=(), dead_cols=(), zero_g=()):
    """Random W (R, cw + bias), SPD A and G; dead rows/cols all-zero in W, zero_g rows with G_rr = 0."""
    gen = torch.Generator().manual_seed(seed)
    C = cw + has_bias
    W = torch.randn(R, C, dtype=torch.float64, generator=gen)
    A, G = spd(C, gen), spd(R, gen)
    W[list(dead_rows), :] = 0
    W[:, list(dead_cols)] = 0
    for r in zero_g:
        G[r, :] = G[:, r] = 0
    return W, A, G, gen


class Dense:
    """Brute force on the live set: dense F from independently damped live sub-factors."""

    def __init__(self, W, A, G, A2=None, G2=None, beta=1.0):
        self.W = W
        self.rows = [r for r in range(W.shape[0]) if W[r].abs().sum() > 0 and G[r, r] > 0]
        self.cols = [c for c in range(W.shape[1]) if W[:, c].abs().sum() > 0 and A[c, c] > 0]
        Al, Gl = A[self.cols][:, self.cols], G[self.rows][:, self.rows]
        Ad = Al + DA * Al.trace() / len(self.cols) * torch.eye(len(self.cols), dtype=W.dtype)
        Gd = Gl + DG * Gl.trace() / len(self.rows) * torch.eye(len(self.rows), dtype=W.dtype)
        self.F = torch.kron(Gd, Ad)
        if A2 is not None:
            self.F = self.F + beta * torch.kron(G2[self.rows][:, self.rows], A2[self.cols][:, self.cols])
        self.Ad, self.Gd, self.Al, self.Gl = Ad, Gd, Al, Gl
        self.theta = W[self.rows][:, self.cols].reshape(-1)
        self.nc = len(self.cols)

    def q_mask(self, full_mask):
        """Flat live-coordinate Q from a full (R, C) bool mask."""
        return full_mask[self.rows][:, self.cols].reshape(-1)

    def cost(self, Q):
        if not Q.any():
            return 0.0
        B = torch.linalg.inv(self.F)[Q][:, Q]
        return 0.5 * self.theta[Q] @ torch.linalg.solve(B, self.theta[Q])

    def obd_cost(self, Q):
        return 0.5 * self.theta[Q] @ self.F[Q][:, Q] @ self.theta[Q]

    def delta(self, Q, theta=None):
        """KKT: [[F, E], [E^T, 0]] [dθ; λ] = [0; -θ_Q]."""
        theta = self.theta if theta is None else theta
        n, q = len(theta), int(Q.sum())
        E = torch.eye(n, dtype=theta.dtype)[:, Q]
        K = torch.zeros(n + q, n + q, dtype=theta.dtype)
        K[:n, :n], K[:n, n:], K[n:, :n] = self.F, E, E.T
        rhs = torch.cat([torch.zeros(n, dtype=theta.dtype), -theta[Q]])
        return torch.linalg.solve(K, rhs)[:n]

    def full(self, theta, removed):
        W = self.W.clone()
        W[torch.tensor(self.rows)[:, None], torch.tensor(self.cols)] = theta.reshape(len(self.rows), self.nc)
        W[removed] = 0
        return W


def with_bias(mask, has_bias):
    return torch.cat([mask, torch.zeros(mask.shape[0], 1, dtype=torch.bool)], 1) if has_bias else mask


def obs(W, A, G, has_bias, **kw):
    return LayerOBS(W, A, G, damping_a=DA, damping_g=DG, has_bias=has_bias, **kw)


def structure_masks(R, C, cw):
    """Full (R, C) masks of every element, row and weight column."""
    elements = {}
    for r in range(R):
        for c in range(cw):
            m = torch.zeros(R, C, dtype=torch.bool)
            m[r, c] = True
            elements[r, c] = m
    rows = [torch.zeros(R, C, dtype=torch.bool).index_fill_(0, torch.tensor([r]), True) for r in range(R)]
    cols = [torch.zeros(R, C, dtype=torch.bool).index_fill_(1, torch.tensor([c]), True) for c in range(cw)]
    return elements, rows, cols


CASES = [
    dict(seed=0, has_bias=True),
    dict(seed=1, has_bias=False),
    dict(seed=2, has_bias=True, dead_rows=(1,), dead_cols=(3,)),
    dict(seed=3, has_bias=False, dead_rows=(0, 4), dead_cols=(6,), zero_g=(2,)),
]


@pytest.mark.parametrize("case", CASES)
def test_costs_match_brute_force(case):
    W, A, G, _ = layer(**case)
    has_bias = case["has_bias"]
    o, d = obs(W, A, G, has_bias), Dense(W, A, G)
    elements, rows, cols = structure_masks(R, W.shape[1], CW)
    el = torch.zeros(R, CW, dtype=W.dtype)
    el_obd = torch.zeros(R, CW, dtype=W.dtype)
    for (r, c), m in elements.items():
        el[r, c], el_obd[r, c] = d.cost(d.q_mask(m)), d.obd_cost(d.q_mask(m))
    row = torch.tensor([d.cost(d.q_mask(m)) for m in rows], dtype=W.dtype)
    col = torch.tensor([d.cost(d.q_mask(m)) for m in cols], dtype=W.dtype)
    row_obd = torch.tensor([d.obd_cost(d.q_mask(m)) for m in rows], dtype=W.dtype)
    col_obd = torch.tensor([d.obd_cost(d.q_mask(m)) for m in cols], dtype=W.dtype)
    for got, want in [(o.element_costs(), el), (o.row_costs(), row), (o.col_costs(), col),
                      (o.obd_element_costs(), el_obd), (o.obd_row_costs(), row_obd), (o.obd_col_costs(), col_obd)]:
        assert got.shape == want.shape and got.dtype == torch.float64
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    dead = [r for r in range(R) if r not in d.rows]
    assert (o.row_costs()[dead] == 0).all() and (o.element_costs()[dead] == 0).all()


def test_undamped_numerators():
    W, A, G, _ = layer(seed=4, has_bias=True, dead_cols=(2,))
    o, d = obs(W, A, G, True, undamped_numerators=True), Dense(W, A, G)
    Wl = W[d.rows][:, d.cols]
    Ginv, Ainv = torch.linalg.inv(d.Gd), torch.linalg.inv(d.Ad)
    row = torch.stack([Wl[i] @ d.Al @ Wl[i] / (2 * Ginv[i, i]) for i in range(len(d.rows))])
    col = torch.zeros(W.shape[1], dtype=W.dtype)
    col[d.cols] = torch.stack([Wl[:, j] @ d.Gl @ Wl[:, j] / (2 * Ainv[j, j]) for j in range(d.nc)])
    torch.testing.assert_close(o.row_costs(), row, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(o.col_costs(), col[:CW], rtol=1e-12, atol=1e-12)
    # the damped (default) numerators differ: the option is not a no-op
    assert not torch.allclose(o.row_costs(), obs(W, A, G, True).row_costs())


def groups_of(counts, max_correlate):
    """Reference greedy grouping: whole consecutive rows, a group's count stays <= max_correlate."""
    if max_correlate == 0:
        return [list(range(len(counts)))]
    groups = [[]]
    for i, n in enumerate(counts):
        if groups[-1] and sum(counts[j] for j in groups[-1]) + n > max_correlate:
            groups.append([])
        groups[-1].append(i)
    return groups


def brute_elements(d, removed_full, max_correlate):
    live = removed_full[d.rows][:, d.cols]
    theta = d.theta.clone()
    for g in groups_of(live.sum(1).tolist(), max_correlate):
        Q = torch.zeros_like(live)
        Q[g] = live[g]
        if Q.any():
            theta = theta + d.delta(Q.reshape(-1), theta)
    return d.full(theta, removed_full)


def random_removed(W, gen, cw, frac=0.5):
    removed = torch.rand(W.shape[0], cw, generator=gen) < frac
    removed[2, 1] = True  # earlier shots' zeros are in Q with θ = 0 and must stay 0
    W[2, 1] = 0
    return removed


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("max_correlate", [0, 1, 3, 7, 2000])
def test_element_update_groups(case, max_correlate):
    W, A, G, gen = layer(**case)
    removed = random_removed(W, gen, CW)
    o, d = obs(W, A, G, case["has_bias"]), Dense(W, A, G)
    got = o.update_elements(removed, max_correlate=max_correlate)
    want = brute_elements(d, with_bias(removed, case["has_bias"]), max_correlate)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert (got[:, :CW][removed] == 0).all()


def test_element_update_nm_pattern():
    """2:4 masks: the two smallest |W| of every 4 consecutive inputs of a row."""
    W, A, G, gen = layer(seed=5, has_bias=True, cw=8)
    blocks = W[:, :8].abs().reshape(R, 2, 4)
    removed = torch.zeros_like(blocks, dtype=torch.bool).scatter_(2, blocks.argsort(2)[..., :2], True).reshape(R, 8)
    o, d = obs(W, A, G, True), Dense(W, A, G)
    for mc in (0, 2, 4, 5):
        got = o.update_elements(removed, max_correlate=mc)
        torch.testing.assert_close(got, brute_elements(d, with_bias(removed, True), mc), rtol=1e-12, atol=1e-12)


def brute_joint(d, removed_full):
    """The layer-joint OBS update: every removed entry of the layer in one dense KKT solve."""
    return d.full(d.theta + d.delta(d.q_mask(removed_full)), removed_full)


@pytest.mark.parametrize("case", CASES)
def test_element_update_joint(case):
    """Conjugate gradients on [F^-1]_QQ = the dense KKT solve of the whole layer (issue 14, acceptance 1)."""
    W, A, G, gen = layer(**case)
    removed = random_removed(W, gen, CW)
    o, d = obs(W, A, G, case["has_bias"]), Dense(W, A, G)
    want = brute_joint(d, with_bias(removed, case["has_bias"]))
    for formulation in ("dual", "primal", None):
        got, info = o.update_elements_joint(removed, formulation=formulation)
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-8)
        assert (got[:, :CW][removed] == 0).all()
        assert info.converged and 0 < info.iterations and info.residual <= 1e-9
        assert info.formulation == (formulation or "dual")
    assert info.removed == int(with_bias(removed, case["has_bias"])[d.rows][:, d.cols].sum())
    # a group that splits the layer is a different (worse) answer: the test can tell them apart
    grouped = o.update_elements(removed, max_correlate=3)
    assert (grouped - want).abs().max() > 1e-6


@pytest.mark.parametrize("rank2", [False, True])
def test_element_update_joint_most_removed(rank2):
    """A layer almost wholly removed (the global threshold does that) is solved on the kept entries."""
    W, A, G, gen = layer(seed=14, has_bias=False)
    removed = torch.ones(R, CW, dtype=torch.bool)
    removed[0, 2] = removed[3, 5] = False
    kw = dict(A2=sym(CW, 0.15, gen), G2=sym(R, 0.15, gen)) if rank2 else {}
    o, d = obs(W, A, G, False, **kw), Dense(W, A, G, **kw)
    want = brute_joint(d, removed)
    got, info = o.update_elements_joint(removed)
    assert info.formulation == "primal"
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(o.update_elements_joint(removed, formulation="dual")[0], want, rtol=1e-8, atol=1e-8)


def test_element_update_joint_is_the_lowest_loss():
    """The joint update has the least quadratic loss 1/2 dθ^T F dθ of all updates that zero Q."""
    W, A, G, gen = layer(seed=11, has_bias=True)
    removed = random_removed(W, gen, CW)
    o, d = obs(W, A, G, True), Dense(W, A, G)
    full = with_bias(removed, True)

    def loss(W_new):
        dt = (W_new - W)[d.rows][:, d.cols].reshape(-1)
        return 0.5 * dt @ d.F @ dt

    joint = loss(o.update_elements_joint(removed)[0])
    for other in (o.update_elements(removed, 1), o.update_elements(removed, 4), o.update_elements_independent(removed)):
        assert joint < loss(other)
    torch.testing.assert_close(joint, d.cost(d.q_mask(full)), rtol=1e-8, atol=1e-12)


def test_element_update_joint_nothing_new_removed():
    """w_Q = 0 (every removed entry already zero): a zero update, no NaN."""
    W, A, G, gen = layer(seed=12, has_bias=True)
    removed = random_removed(W, gen, CW)
    W[:, :CW][removed] = 0
    got, info = obs(W, A, G, True).update_elements_joint(removed)
    assert torch.equal(got, W) and info.iterations == 0 and info.converged
    got, info = obs(W, A, G, True).update_elements_joint(torch.zeros(R, CW, dtype=torch.bool))
    assert torch.equal(got, W) and info.removed == 0


def test_element_update_joint_not_converged():
    W, A, G, gen = layer(seed=13, has_bias=True)
    removed = random_removed(W, gen, CW)
    with pytest.raises(NotConverged, match="update.tol"):
        obs(W, A, G, True).update_elements_joint(removed, tol=1e-14, max_iter=2)
    with pytest.raises(ValueError, match="valid: primal, dual"):
        obs(W, A, G, True).update_elements_joint(removed, formulation="kkt")


def test_element_update_joint_nm_pattern():
    W, A, G, gen = layer(seed=5, has_bias=True, cw=8)
    blocks = W[:, :8].abs().reshape(R, 2, 4)
    removed = torch.zeros_like(blocks, dtype=torch.bool).scatter_(2, blocks.argsort(2)[..., :2], True).reshape(R, 8)
    got, _ = obs(W, A, G, True).update_elements_joint(removed)
    torch.testing.assert_close(got, brute_joint(Dense(W, A, G), with_bias(removed, True)), rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("case", CASES)
def test_element_update_independent(case):
    W, A, G, gen = layer(**case)
    removed = random_removed(W, gen, CW)
    o, d = obs(W, A, G, case["has_bias"]), Dense(W, A, G)
    want = brute_independent(d, with_bias(removed, case["has_bias"]))
    torch.testing.assert_close(o.update_elements_independent(removed), want, rtol=1e-12, atol=1e-12)


def brute_independent(d, full):
    """Each removed element's dense OBS update computed alone, summed."""
    theta = d.theta.clone()
    live = full[d.rows][:, d.cols].reshape(-1)
    for i in live.nonzero().squeeze(1):
        Q = torch.zeros_like(live)
        Q[i] = True
        theta = theta + d.delta(Q)
    return d.full(theta, full)


def row_col_masks(W, has_bias, rows, cols):
    rm = torch.zeros(R, dtype=torch.bool)
    rm[list(rows)] = True
    cm = torch.zeros(CW, dtype=torch.bool)
    cm[list(cols)] = True
    return rm, cm, rm[:, None] | with_bias(cm[None, :].expand(R, CW), has_bias)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("rows, cols", [((1, 3), ()), ((), (0, 4, 5)), ((2,), (1, 6)), ((0, 3), (2, 3, 4)),
                                        (tuple(range(R)), ()), ((), tuple(range(CW)))])
def test_rows_cols_update(case, rows, cols):
    W, A, G, _ = layer(**case)
    has_bias = case["has_bias"]
    o, d = obs(W, A, G, has_bias), Dense(W, A, G)
    rm, cm, full = row_col_masks(W, has_bias, rows, cols)
    _, _, full_rows = row_col_masks(W, has_bias, rows, ())
    _, _, full_cols = row_col_masks(W, has_bias, (), cols)

    union = d.full(d.theta + d.delta(d.q_mask(full)), full)
    torch.testing.assert_close(o.update_rows_cols(rm, cm), union, rtol=1e-12, atol=1e-12)
    if has_bias and rows:
        assert (o.update_rows_cols(rm, cm)[list(rows), -1] == 0).all()  # a removed row takes its bias

    additive = d.theta + d.delta(d.q_mask(full_rows)) + d.delta(d.q_mask(full_cols))
    torch.testing.assert_close(o.update_rows_cols(rm, cm, mode="additive"), d.full(additive, full),
                               rtol=1e-12, atol=1e-12)

    independent = d.theta.clone()
    for r in rows:
        independent += d.delta(d.q_mask(row_col_masks(W, has_bias, (r,), ())[2]))
    for c in cols:
        independent += d.delta(d.q_mask(row_col_masks(W, has_bias, (), (c,))[2]))
    torch.testing.assert_close(o.update_rows_cols(rm, cm, mode="independent"), d.full(independent, full),
                               rtol=1e-12, atol=1e-12)


def test_damp():
    M = spd(4, torch.Generator().manual_seed(6))
    torch.testing.assert_close(damp(M, 0.3), M + 0.3 * M.trace() / 4 * torch.eye(4, dtype=M.dtype))


# --- Kronecker rank 2 ------------------------------------------------------------------

def rank2_layer(seed, scale, **kw):
    W, A, G, gen = layer(seed=seed, has_bias=True, **kw)
    return W, A, G, sym(A.shape[0], scale, gen), sym(R, scale, gen), gen


@pytest.mark.parametrize("dead", [{}, dict(dead_rows=(3,), dead_cols=(0,))])
def test_rank2_matches_dense(dead):
    W, A, G, A2, G2, gen = rank2_layer(7, 0.15, **dead)
    o, d = obs(W, A, G, True, A2=A2, G2=G2), Dense(W, A, G, A2, G2)
    assert o.beta == 1.0
    assert torch.linalg.eigvalsh(A2).min() < 0 < torch.linalg.eigvalsh(A2).max()  # indefinite term 2
    assert torch.linalg.eigvalsh(d.F).min() > 0
    tol = dict(rtol=1e-10, atol=1e-10)

    X = torch.randn(len(d.rows), d.nc, dtype=W.dtype, generator=gen)
    torch.testing.assert_close(o._inverse(X).reshape(-1), torch.linalg.solve(d.F, X.reshape(-1)), **tol)

    elements, rows, cols = structure_masks(R, W.shape[1], CW)
    el = torch.zeros(R, CW, dtype=W.dtype)
    el_obd = torch.zeros(R, CW, dtype=W.dtype)
    for (r, c), m in elements.items():
        el[r, c], el_obd[r, c] = d.cost(d.q_mask(m)), d.obd_cost(d.q_mask(m))
    torch.testing.assert_close(o.element_costs(), el, **tol)
    torch.testing.assert_close(o.obd_element_costs(), el_obd, **tol)
    torch.testing.assert_close(o.row_costs(), torch.tensor([d.cost(d.q_mask(m)) for m in rows]), **tol)
    torch.testing.assert_close(o.col_costs(), torch.tensor([d.cost(d.q_mask(m)) for m in cols]), **tol)
    torch.testing.assert_close(o.obd_row_costs(), torch.tensor([d.obd_cost(d.q_mask(m)) for m in rows]), **tol)
    torch.testing.assert_close(o.obd_col_costs(), torch.tensor([d.obd_cost(d.q_mask(m)) for m in cols]), **tol)

    removed = random_removed(W, gen, CW)
    d = Dense(W, A, G, A2, G2)
    o = obs(W, A, G, True, A2=A2, G2=G2)
    for mc in (0, 1, 6):
        want = brute_elements(d, with_bias(removed, True), mc)
        torch.testing.assert_close(o.update_elements(removed, mc), want, **tol)
    torch.testing.assert_close(o.update_elements_independent(removed), brute_independent(d, with_bias(removed, True)),
                               **tol)
    torch.testing.assert_close(o.update_elements_joint(removed)[0], brute_joint(d, with_bias(removed, True)),
                               rtol=1e-8, atol=1e-8)

    rm, cm, full = row_col_masks(W, True, (1, 4), (2, 5))
    _, _, full_rows = row_col_masks(W, True, (1, 4), ())
    _, _, full_cols = row_col_masks(W, True, (), (2, 5))
    torch.testing.assert_close(o.update_rows_cols(rm, cm), d.full(d.theta + d.delta(d.q_mask(full)), full), **tol)
    additive = d.theta + d.delta(d.q_mask(full_rows)) + d.delta(d.q_mask(full_cols))
    torch.testing.assert_close(o.update_rows_cols(rm, cm, "additive"), d.full(additive, full), **tol)
    independent = d.theta.clone()
    for r in (1, 4):
        independent += d.delta(d.q_mask(row_col_masks(W, True, (r,), ())[2]))
    for c in (2, 5):
        independent += d.delta(d.q_mask(row_col_masks(W, True, (), (c,))[2]))
    torch.testing.assert_close(o.update_rows_cols(rm, cm, "independent"), d.full(independent, full), **tol)


def test_rank2_shrinks_term2():
    W, A, G, A2, G2, gen = rank2_layer(8, 3.0)
    eps = 1e-3
    o = obs(W, A, G, True, A2=A2, G2=G2, rank2_eps=eps)
    assert 0 < o.beta < 1
    assert o.S.min() >= eps * (1 - 1e-9)
    torch.testing.assert_close(o.S.min(), torch.tensor(eps, dtype=W.dtype), rtol=1e-9, atol=0)
    unshrunk = Dense(W, A, G, A2, G2)
    assert torch.linalg.eigvalsh(unshrunk.F).min() < 0  # term 2 at full size makes F indefinite
    d = Dense(W, A, G, A2, G2, beta=o.beta)
    assert torch.linalg.eigvalsh(d.F).min() > 0
    rows = structure_masks(R, W.shape[1], CW)[1]
    torch.testing.assert_close(o.row_costs(), torch.tensor([d.cost(d.q_mask(m)) for m in rows]), rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(o.obd_row_costs(), torch.tensor([d.obd_cost(d.q_mask(m)) for m in rows]),
                               rtol=1e-10, atol=1e-10)
    rm, cm, full = row_col_masks(W, True, (0,), (3, 4))
    torch.testing.assert_close(o.update_rows_cols(rm, cm), d.full(d.theta + d.delta(d.q_mask(full)), full),
                               rtol=1e-8, atol=1e-8)
    removed = random_removed(W, gen, CW)
    d = Dense(W, A, G, A2, G2, beta=o.beta)
    o = obs(W, A, G, True, A2=A2, G2=G2, rank2_eps=eps)
    torch.testing.assert_close(o.update_elements(removed, 0), brute_elements(d, with_bias(removed, True), 0),
                               rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(o.update_elements_joint(removed)[0], brute_joint(d, with_bias(removed, True)),
                               rtol=1e-8, atol=1e-8)


def test_errors():
    W, A, G, A2, G2, _ = rank2_layer(9, 0.1)
    with pytest.raises(ValueError, match="positive definite"):
        obs(W, A, torch.eye(R, dtype=W.dtype) + 3 * (torch.ones(R, R, dtype=W.dtype) - torch.eye(R)), True)
    with pytest.raises(ValueError, match="finite"):
        obs(W, A, G, True, A2=A2, G2=G2 * float("nan"))
    with pytest.raises(ValueError, match="symmetric"):
        obs(W, A + torch.triu(torch.ones_like(A), 1), G, True)
    with pytest.raises(ValueError, match="both A2 and G2"):
        obs(W, A, G, True, A2=A2)
    with pytest.raises(ValueError, match="must be"):
        obs(W, A[:-1, :-1], G, True)
    with pytest.raises(ValueError, match="undamped_numerators"):
        obs(W, A, G, True, A2=A2, G2=G2, undamped_numerators=True)
    o = obs(W, A, G, True)
    with pytest.raises(ValueError, match="valid modes"):
        o.update_rows_cols(torch.zeros(R, dtype=torch.bool), torch.zeros(CW, dtype=torch.bool), mode="joint")
    with pytest.raises(ValueError, match="shape"):
        o.update_elements(torch.zeros(R, CW + 1, dtype=torch.bool))


@pytest.mark.parametrize("rank2", [False, True])
def test_float32_runs_and_agrees(rank2):
    W, A, G, A2, G2, gen = rank2_layer(10, 0.15)
    removed = random_removed(W, gen, CW)
    kw64 = dict(A2=A2, G2=G2) if rank2 else {}
    kw32 = dict(A2=A2.float(), G2=G2.float()) if rank2 else {}
    o64, o32 = obs(W, A, G, True, **kw64), obs(W.float(), A.float(), G.float(), True, **kw32)
    rm, cm = torch.tensor([0, 1, 0, 0, 1], dtype=torch.bool), torch.tensor([1, 0, 0, 1, 0, 0, 0], dtype=torch.bool)
    for name, args in [("element_costs", ()), ("row_costs", ()), ("col_costs", ()), ("obd_element_costs", ()),
                       ("obd_row_costs", ()), ("obd_col_costs", ()), ("update_elements", (removed, 3)),
                       ("update_elements_independent", (removed,)), ("update_rows_cols", (rm, cm)),
                       ("update_elements_joint", (removed,))]:
        got, want = getattr(o32, name)(*args), getattr(o64, name)(*args)
        if name == "update_elements_joint":
            (got, _), (want, _) = got, want
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


@pytest.mark.parametrize("scale32", [1.0, 1.5])
def test_refined_cg_reaches_the_float64_solution(scale32):
    """float32 rounds refined in float64 reach the float64 tolerance; when the float32 rounds cannot (here their
    operator is deliberately 1.5x off), float64 conjugate gradients finish from where they got to."""
    from surgeon.obs import _pcg_refined

    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 60, generator=g, dtype=torch.float64)
    M = X @ X.T / 60 + 1e-3 * torch.eye(40, dtype=torch.float64)
    b = torch.randn(40, 3, generator=g, dtype=torch.float64)
    apply = lambda V: M @ V  # noqa: E731
    apply32 = lambda V: (M.float() * scale32) @ V  # noqa: E731
    x, iterations, residual, converged = _pcg_refined(apply, apply32, b, 1 / M.diagonal()[:, None].expand(40, 3),
                                                      1e-12, 2000)
    assert converged and residual <= 1e-12 and iterations > 0
    torch.testing.assert_close(x, torch.linalg.solve(M, b), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("formulation", ["dual", "primal"])
def test_a_loose_joint_solve_refined_from_its_solution_is_the_tight_solve(formulation):
    """curvature.auto_damping.tol: a solve to 1e-3 kept (info.warm), then the same system to 1e-10 from it, equals
    the cold solve to 1e-10 in fewer iterations than the cold one; a different mask's solution is not used."""
    gen = torch.Generator().manual_seed(5)
    R_, C_ = 24, 40
    X = torch.randn(200, C_, generator=gen, dtype=torch.float64)
    Y = torch.randn(200, R_, generator=gen, dtype=torch.float64)
    X[:, 1:] += 0.8 * X[:, :-1]  # correlated inputs: CG needs many iterations
    A, G = X.T @ X / 200, Y.T @ Y / 200
    W = torch.randn(R_, C_, generator=gen, dtype=torch.float64)
    removed = torch.rand(R_, C_, generator=gen) < 0.5
    o = LayerOBS(W, A, G, damping_a=1e-3, damping_g=1e-3, has_bias=False)
    cold, cold_info = o.update_elements_joint(removed, tol=1e-10, formulation=formulation)
    _, loose = o.update_elements_joint(removed, tol=1e-3, formulation=formulation, keep=True)
    assert loose.warm is not None and loose.warm.x.dtype == torch.float32 and "warm" not in loose.as_dict()
    got, info = o.update_elements_joint(removed, tol=1e-10, formulation=formulation, warm=loose.warm)
    torch.testing.assert_close(got, cold, rtol=1e-7, atol=1e-7)
    assert info.converged and info.residual <= 1e-10
    assert info.iterations < cold_info.iterations, (info.iterations, cold_info.iterations)
    other = removed.clone()
    other[0, ~other[0]] = True  # another system: its solution is no start for this one
    _, elsewhere = o.update_elements_joint(other, tol=1e-3, formulation=formulation, keep=True)
    _, again = o.update_elements_joint(removed, tol=1e-10, formulation=formulation, warm=elsewhere.warm)
    assert again.iterations == cold_info.iterations
