"""Quantization (surgeon/quantize.py) against brute force: the sweep equals the sequential dense OBS solve under
F = G (x) A for its column order, its cost is the quadratic model's increase, weights lie on the grid, zeros stay."""
import itertools

import pytest
import torch

from surgeon.obs import damp
from surgeon.quantize import Grid, quantize_layer


def _spd(n, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 3 * n, dtype=torch.float64, generator=g)
    X[1] += 0.8 * X[0]  # correlated inputs: compensation matters
    return scale * X @ X.T / (3 * n)


def _layer(R, Cw, seed, zeros=0.3):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(R, Cw, dtype=torch.float64, generator=g)
    W[torch.rand(R, Cw, generator=g) < zeros] = 0
    return W


def _brute_force(W, bias, A, G, grid, damping):
    """Sequential OBS on the dense Fisher G (x) H (row-major vec): at column j, fix it to the grid point of its
    current value (0 where W was 0; the group's grid fitted on its current columns when entered) and re-solve every
    free entry (columns > j and the bias) exactly."""
    R, Cw = W.shape
    Wb = W.clone() if bias is None else torch.cat([W, bias[:, None]], 1)
    C = Wb.shape[1]
    F = torch.kron(G, damp(A, damping))
    w0 = Wb.reshape(-1).clone()
    cur = Wb.clone()
    width = grid.width(Cw)
    fixed = torch.zeros(R, C, dtype=torch.bool)
    for j in range(Cw):
        if j % width == 0:
            s, z = grid.fit(torch.where(W[:, j:j + width] == 0, 0, cur[:, j:min(j + width, Cw)]))
        cur[:, j] = torch.where(W[:, j] == 0, 0, grid.round(cur[:, j], s, z))
        fixed[:, j] = True
        fx, fr = fixed.reshape(-1), ~fixed.reshape(-1)
        w = cur.reshape(-1).clone()
        d_c = w[fx] - w0[fx]
        w[fr] = w0[fr] - torch.linalg.solve(F[fr][:, fr], F[fr][:, fx] @ d_c)
        cur = w.reshape(R, C)
    return cur


@pytest.mark.parametrize("bias,symmetric,group,blocksize", [
    (False, True, 4, 128), (True, True, 4, 3), (True, False, 0, 4), (False, False, 4, 8), (True, True, 10, 2)])
def test_sweep_equals_the_sequential_dense_obs_solve(bias, symmetric, group, blocksize):
    R, Cw = 5, 10
    W = _layer(R, Cw, 0)
    b = torch.randn(R, dtype=torch.float64) if bias else None
    C = Cw + bias
    A, G = _spd(C, 1), _spd(R, 2)
    grid = Grid(bits=3, symmetric=symmetric, group_size=group)
    out = quantize_layer(W, grid, A=A, G=G, bias=b, damping=0.05, blocksize=blocksize)
    want = _brute_force(W, b, A, G, grid, 0.05)
    torch.testing.assert_close(out.W, want[:, :Cw], rtol=1e-9, atol=1e-9)
    if bias:
        torch.testing.assert_close(out.bias, want[:, Cw], rtol=1e-9, atol=1e-9)
    # the cost is the quadratic model's increase 1/2 vec(D)^T (G (x) H) vec(D) of the whole change
    Wb = W if b is None else torch.cat([W, b[:, None]], 1)
    Qb = out.W if b is None else torch.cat([out.W, out.bias[:, None]], 1)
    D = (Qb - Wb).reshape(-1)
    assert out.cost == pytest.approx(0.5 * float(D @ torch.kron(G, damp(A, 0.05)) @ D), rel=1e-9)


def test_g_does_not_change_the_update_only_the_cost():
    W, A = _layer(6, 12, 3), _spd(12, 4)
    grid = Grid(bits=4, group_size=4)
    plain = quantize_layer(W, grid, A=A)
    weighted = quantize_layer(W, grid, A=A, G=_spd(6, 5, scale=7.0))
    assert torch.equal(plain.W, weighted.W)
    assert weighted.cost != pytest.approx(plain.cost)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_weights_on_the_grid_zeros_stay_zero(symmetric, method):
    W, A = _layer(8, 20, 6), _spd(20, 7)
    grid = Grid(bits=4, symmetric=symmetric, group_size=8)
    out = quantize_layer(W, grid, A=A, method=method)
    assert torch.equal(out.W[W == 0], torch.zeros(int((W == 0).sum()), dtype=W.dtype))
    for g in range(out.scale.shape[1]):
        cols = slice(8 * g, 8 * g + 8)
        q = out.W[:, cols] / out.scale[:, g, None] + out.zero[:, g, None]
        torch.testing.assert_close(q, q.round(), rtol=0, atol=1e-9)
        assert q.round().min() >= grid.qmin and q.round().max() <= grid.qmax
        assert torch.equal(out.zero[:, g], out.zero[:, g].round())


def test_rtn_is_the_nearest_grid_point():
    W = _layer(4, 6, 8, zeros=0.0)
    grid = Grid(bits=3, symmetric=False, group_size=3)
    out = quantize_layer(W, grid, method="rtn")
    for r, c in itertools.product(range(4), range(6)):
        s, z = out.scale[r, c // 3], out.zero[r, c // 3]
        points = (torch.arange(grid.qmin, grid.qmax + 1, dtype=W.dtype) - z) * s
        assert float(out.W[r, c]) == pytest.approx(float(points[(points - W[r, c]).abs().argmin()]), abs=1e-12)


def test_compensation_beats_round_to_nearest_on_correlated_inputs():
    g = torch.Generator().manual_seed(10)
    X = torch.randn(32, 8, dtype=torch.float64, generator=g) @ torch.randn(8, 200, dtype=torch.float64, generator=g)
    X += 0.1 * torch.randn(32, 200, dtype=torch.float64, generator=g)  # inputs close to an 8-dim subspace
    W, A, G = _layer(16, 32, 9, zeros=0.0), X @ X.T / 200, _spd(16, 11)
    grid = Grid(bits=3, group_size=8)
    gptq = quantize_layer(W, grid, A=A, G=G)
    rtn = quantize_layer(W, grid, A=A, G=G, method="rtn")
    assert gptq.cost < 0.8 * rtn.cost


def test_bad_settings_fail_clearly():
    with pytest.raises(ValueError, match="quantize.bits"):
        Grid(bits=1)
    with pytest.raises(ValueError, match="group_size"):
        Grid(bits=4, group_size=-1)
    with pytest.raises(ValueError, match="needs the input factor"):
        quantize_layer(_layer(2, 4, 0), Grid(bits=4))
    with pytest.raises(ValueError, match="quantize.method"):
        quantize_layer(_layer(2, 4, 0), Grid(bits=4), method="awq")
