"""Tests for recon_core.priors: wavelets, thresholding, finite differences / TV, SVT, temporal FFT."""

from __future__ import annotations

import math

import pytest
import torch

from recon_core.priors import (
    FiniteDifference,
    TemporalFFT,
    WaveletTransform,
    daubechies_filter,
    group_soft_threshold,
    schatten_p_shrink,
    smoothed_tv,
    soft_threshold,
    spatial_tv,
    spatial_tv_op,
    spatiotemporal_tv_op,
    svt,
    temporal_tv,
    temporal_tv_op,
    temporal_tv_prox,
    tv_value,
)
from tests.helpers import check_adjoint, check_autograd_is_adjoint, dense_matrix, randc


def _rel(a, b) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


# ------------------------------------------------------------------------------- wavelet filters

@pytest.mark.parametrize("n", [1, 2, 4, 6])
def test_daubechies_filter_properties(n):
    h = daubechies_filter(n)
    L = h.numel()
    assert L == 2 * n
    assert abs(float(h.sum()) - math.sqrt(2.0)) < 1e-12
    for m in range(n):  # orthonormal to even shifts
        s = float((h[: L - 2 * m] * h[2 * m:]).sum())
        assert abs(s - (1.0 if m == 0 else 0.0)) < 1e-10
    g = h.flip(0) * torch.tensor([(-1.0) ** j for j in range(L)], dtype=torch.float64)
    j = torch.arange(L, dtype=torch.float64)
    for k in range(n):  # n vanishing moments of the high-pass filter
        assert abs(float((g * j**k).sum())) < 1e-7 * max(1.0, float((j**k).abs().max()))
    if n >= 2:  # …and not one more (it is the shortest such filter)
        assert abs(float((g * j**n).sum())) > 1e-3


def test_haar_is_the_two_tap_average():
    h = daubechies_filter(1)
    assert torch.allclose(h, torch.full((2,), 1 / math.sqrt(2), dtype=torch.float64))


# ------------------------------------------------------------------------------- wavelet transform

@pytest.mark.parametrize("wavelet", ["haar", "db4"])
@pytest.mark.parametrize("shape", [(2, 16, 32), (24, 8), (1, 4, 4)])
def test_wavelet_perfect_reconstruction_adjoint_norm(wavelet, shape):
    W = WaveletTransform(shape, wavelet=wavelet, levels=3)
    x = randc(shape, seed=1)
    c = W(x)
    assert c.shape == x.shape and c.dtype == torch.complex64
    assert float((W.adjoint(c) - x).abs().max()) < 1e-5
    assert abs(float(torch.linalg.vector_norm(c) / torch.linalg.vector_norm(x)) - 1.0) < 1e-5
    check_adjoint(W)
    check_autograd_is_adjoint(W)


def test_wavelet_matrix_is_orthogonal_small():
    W = WaveletTransform((8, 4), wavelet="db4", levels=2)
    M = dense_matrix(W, (8, 4), dtype=torch.complex128)
    eye = torch.eye(32, dtype=torch.complex128)
    assert float((M.conj().T @ M - eye).abs().max()) < 1e-10
    assert float((M @ M.conj().T - eye).abs().max()) < 1e-10


def test_wavelet_levels_reduce_and_pad():
    W = WaveletTransform((3, 24, 20), wavelet="db4", levels=4)  # 24 = 8·3, 20 = 4·5 → 2 levels
    assert W.levels == 2 and W.oshape == (3, 24, 20)
    x = randc((3, 24, 20), seed=2)
    assert float((W.adjoint(W(x)) - x).abs().max()) < 1e-5
    W0 = WaveletTransform((5, 7), levels=3)  # odd sizes: no level possible → identity
    assert W0.levels == 0
    y = randc((5, 7), seed=3)
    assert torch.equal(W0(y), y)
    Wp = WaveletTransform((2, 10, 12), wavelet="db4", levels=3, mode="pad")
    assert Wp.levels == 3 and Wp.oshape == (2, 16, 16)
    check_adjoint(Wp)
    z = randc((2, 10, 12), seed=4)
    assert float((Wp.adjoint(Wp(z)) - z).abs().max()) < 1e-5  # isometry: AᴴA = I
    assert abs(float(torch.linalg.vector_norm(Wp(z)) / torch.linalg.vector_norm(z)) - 1.0) < 1e-5


def test_wavelet_batch_axes_and_errors():
    W = WaveletTransform((16, 16), wavelet="haar", levels=2)
    x = randc((3, 2, 16, 16), seed=5)
    c = W(x)
    assert c.shape == x.shape
    assert torch.allclose(c[1, 0], W(x[1, 0]), atol=1e-6)
    with pytest.raises(ValueError, match="wavelet"):
        WaveletTransform((8, 8), wavelet="sym9")
    with pytest.raises(ValueError, match="levels"):
        WaveletTransform((8, 8), levels=-1)
    with pytest.raises(ValueError, match="x must end in"):
        W(randc((16, 8)))


def test_wavelet_sparsifies_piecewise_constant_image():
    img = torch.zeros(32, 32)
    img[8:24, 4:20] = 1.0
    img[20:30, 14:30] = 0.5
    x = img.to(torch.complex64)
    for wavelet in ("haar", "db4"):
        c = WaveletTransform((32, 32), wavelet=wavelet, levels=3)(x).abs().flatten()
        energy = torch.sort(c**2, descending=True).values.cumsum(0) / (c**2).sum()
        n99 = int((energy < 0.99).sum()) + 1
        # a quarter of the coefficients or fewer hold 99 % of the energy; pixels need far more
        pix = torch.sort(x.abs().flatten() ** 2, descending=True).values.cumsum(0) / (x.abs() ** 2).sum()
        assert n99 < 0.25 * c.numel()
        assert n99 < 0.5 * (int((pix < 0.99).sum()) + 1)
    # Haar represents axis-aligned, dyadic-aligned blocks exactly with few coefficients
    block = torch.zeros(16, 16, dtype=torch.complex64)
    block[0:8, 8:16] = 1.0
    ch = WaveletTransform((16, 16), wavelet="haar", levels=3)(block)
    assert int((ch.abs() > 1e-5).sum()) <= 4


# ------------------------------------------------------------------------------- thresholding

def test_soft_threshold_complex_and_real():
    x = torch.tensor([3 + 4j, 0.3 - 0.4j, 0j, -1j], dtype=torch.complex64)
    out = soft_threshold(x, 1.0)
    ref = torch.tensor([(3 + 4j) * 4 / 5, 0, 0, 0], dtype=torch.complex64)
    assert torch.allclose(out, ref, atol=1e-6)
    assert torch.allclose(torch.angle(out[0]), torch.angle(x[0]))
    r = torch.tensor([-2.0, -0.5, 0.0, 0.5, 2.0])
    assert torch.allclose(soft_threshold(r, 1.0), torch.tensor([-1.0, 0.0, 0.0, 0.0, 1.0]))
    # it is the prox of λ|·|: compare with a brute-force minimisation on a grid (real case)
    grid = torch.linspace(-3, 3, 60001, dtype=torch.float64)
    for v in (-2.2, -0.3, 0.7, 1.9):
        obj = 0.5 * (grid - v) ** 2 + 0.8 * grid.abs()
        assert abs(float(grid[obj.argmin()]) - float(soft_threshold(torch.tensor(v), 0.8))) < 1e-3
    # tensor-valued λ broadcasts; negative λ is an error
    lam = torch.tensor([0.0, 10.0, 0.0, 0.0])
    assert torch.allclose(soft_threshold(x, lam), torch.stack([x[0], 0 * x[1], x[2], x[3]]))
    with pytest.raises(ValueError, match="lam"):
        soft_threshold(x, -0.1)


def test_group_soft_threshold():
    y = randc((2, 5, 6), seed=6)
    out = group_soft_threshold(y, 0.7, dim=0)
    n_in = torch.linalg.vector_norm(y, dim=0)
    n_out = torch.linalg.vector_norm(out, dim=0)
    assert torch.allclose(n_out, torch.clamp(n_in - 0.7, min=0), atol=1e-5)
    keep = n_in > 0.7
    cos = (out.conj() * y).sum(0).real / (n_in * n_out).clamp(min=1e-12)
    assert torch.allclose(cos[keep], torch.ones_like(cos[keep]), atol=1e-5)  # direction kept


# ------------------------------------------------------------------------------- finite differences

@pytest.mark.parametrize("boundary", ["periodic", "neumann"])
@pytest.mark.parametrize("dims", [(0,), (1, 2), (0, 1, 2)])
def test_finite_difference_adjoint(boundary, dims):
    D = FiniteDifference((4, 5, 6), dims=dims, boundary=boundary, weights=[1.0, 0.5, 0.303][: len(dims)])
    assert D.oshape == (len(dims), 4, 5, 6)
    check_adjoint(D)
    check_autograd_is_adjoint(D)


def test_finite_difference_values_and_nullspace():
    x = torch.arange(5, dtype=torch.float32).to(torch.complex64).reshape(1, 5) ** 2  # 0 1 4 9 16
    Dp = FiniteDifference((1, 5), dims=(1,), boundary="periodic")
    Dn = FiniteDifference((1, 5), dims=(1,), boundary="neumann")
    assert torch.allclose(Dp(x)[0, 0].real, torch.tensor([1.0, 3, 5, 7, -16]))
    assert torch.allclose(Dn(x)[0, 0].real, torch.tensor([1.0, 3, 5, 7, 0]))
    c = torch.full((3, 4, 5), 2 - 1j, dtype=torch.complex64)
    for b in ("periodic", "neumann"):
        assert float(FiniteDifference((3, 4, 5), dims=(0, 1, 2), boundary=b)(c).abs().max()) == 0.0
    # batch axes in front are allowed
    D = FiniteDifference((4, 5), dims=(0, 1))
    xb = randc((3, 4, 5), seed=7)
    assert D(xb).shape == (3, 2, 4, 5)
    assert torch.allclose(D(xb)[2], D(xb[2]))
    with pytest.raises(ValueError, match="boundary"):
        FiniteDifference((4, 5), dims=(0,), boundary="mirror")
    with pytest.raises(ValueError, match="dims"):
        FiniteDifference((4, 5), dims=(2,))


def test_finite_difference_per_axis_boundary():
    D = FiniteDifference((4, 5, 6), dims=(2, 1, 0), boundary=("periodic", "periodic", "neumann"),
                         weights=(1.0, 0.5, 0.303))
    assert D.boundary == ("periodic", "periodic", "neumann")
    check_adjoint(D)
    check_autograd_is_adjoint(D)
    x = randc((4, 5, 6), seed=3)
    space = FiniteDifference((4, 5, 6), dims=(2, 1), boundary="periodic", weights=(1.0, 0.5))(x)
    time = FiniteDifference((4, 5, 6), dims=(0,), boundary="neumann", weights=(0.303,))(x)
    assert torch.equal(D(x), torch.cat([space, time], dim=0))
    with pytest.raises(ValueError, match="boundary"):
        FiniteDifference((4, 5), dims=(0, 1), boundary=("periodic",))
    with pytest.raises(ValueError, match="boundary"):
        FiniteDifference((4, 5), dims=(0, 1), boundary=("periodic", "mirror"))


def test_spatiotemporal_tv_op():
    D = spatiotemporal_tv_op((3, 6, 7), weights=(1.0, 1.0, 0.303))
    assert D.oshape == (3, 3, 6, 7) and D.dims == (-1, -2, -3)
    check_adjoint(D)
    x = randc((3, 6, 7), seed=4)
    dx = D(x)
    assert torch.allclose(dx[2], 0.303 * temporal_tv_op((3, 6, 7))(x)[0])
    assert torch.allclose(dx[:2].flip(0), spatial_tv_op((3, 6, 7))(x))
    # a single frame has no temporal difference (Neumann), and the operator stays exact
    D1 = spatiotemporal_tv_op((1, 6, 7))
    assert float(D1(randc((1, 6, 7), seed=5))[2].abs().max()) == 0.0
    check_adjoint(D1)


def test_temporal_tv_prox_two_frames_closed_form():
    # prox of lam·|x1 − x0|: both move lam towards each other, or meet at the mean.
    v = randc((2, 6, 6), dtype=torch.complex128, seed=11)
    lam = 0.4
    x, p = temporal_tv_prox(v, lam, n_iter=300)
    d = v[1] - v[0]
    u = d / d.abs().clamp_min(1e-30)
    meet = d.abs() <= 2 * lam
    ref0 = torch.where(meet, 0.5 * (v[0] + v[1]), v[0] + lam * u)
    ref1 = torch.where(meet, 0.5 * (v[0] + v[1]), v[1] - lam * u)
    assert 0 < int(meet.sum()) < meet.numel()  # both regimes are exercised
    assert _rel(x, torch.stack([ref0, ref1])) < 1e-6
    assert p.shape == (1, 2, 6, 6) and float(p.abs().max()) <= lam * (1 + 1e-12)  # dual feasible


def test_temporal_tv_prox_properties():
    v = randc((5, 4, 4), dtype=torch.complex128, seed=12)
    lam = 0.3
    x, p = temporal_tv_prox(v, lam, n_iter=400)

    def objective(z):
        return 0.5 * float(torch.sum((z - v).abs() ** 2)) + lam * float(temporal_tv(z))

    f = objective(x)
    for k in range(5):  # a minimiser: no nearby point is better
        assert f <= objective(x + 1e-3 * randc(x.shape, dtype=torch.complex128, seed=30 + k)) + 1e-12
    # warm start from the returned dual continues the same iteration
    x2, _ = temporal_tv_prox(v, lam, n_iter=0, dual=p)
    assert torch.allclose(x2, x)
    # a huge threshold flattens each pixel's time course to its mean; lam = 0 and F = 1 are the identity
    flat, _ = temporal_tv_prox(v, 1e3, n_iter=2000)
    assert _rel(flat, v.mean(0, keepdim=True).expand_as(v)) < 1e-6
    assert torch.equal(temporal_tv_prox(v, 0.0)[0], v)
    assert torch.equal(temporal_tv_prox(v[:1], lam)[0], v[:1])
    with pytest.raises(ValueError):
        temporal_tv_prox(v, -1.0)
    with pytest.raises(ValueError, match="dual"):
        temporal_tv_prox(v, lam, dual=torch.zeros_like(v))


def test_tv_values():
    x = torch.zeros(3, 6, 6, dtype=torch.complex64)
    x[:, 2:4, 2:4] = 1.0  # a 2×2 square in each frame
    # anisotropic periodic spatial TV: 8 unit jumps per frame
    assert abs(float(spatial_tv(x, isotropic=False)) - 3 * 8) < 1e-5
    # isotropic: only pixel (3, 3) has both differences non-zero (√2), six others have one (1 each)
    assert abs(float(spatial_tv(x, isotropic=True)) - 3 * (6 + math.sqrt(2))) < 1e-4
    # temporal TV of a static series is zero; of a jump it is the jump size times the pixel count
    assert float(temporal_tv(x)) == 0.0
    x2 = x.clone()
    x2[2] *= 3.0
    assert abs(float(temporal_tv(x2)) - 4 * 2.0) < 1e-5
    assert abs(float(temporal_tv(x2, boundary="periodic")) - 2 * 4 * 2.0) < 1e-5
    # consistency of the helpers with the operator
    Ds = spatial_tv_op((3, 6, 6))
    assert abs(float(Ds(x2).abs().sum()) - float(spatial_tv(x2, isotropic=False))) < 1e-4
    Dt = temporal_tv_op((3, 6, 6))
    assert abs(float(Dt(x2).abs().sum()) - float(temporal_tv(x2))) < 1e-4
    assert abs(float(tv_value(x2, dims=(0,), boundary="neumann")) - float(temporal_tv(x2))) < 1e-6


@pytest.mark.parametrize("dims,boundary", [((-3,), "neumann"), ((-2, -1), "periodic")])
def test_smoothed_tv_gradient_matches_autograd(dims, boundary):
    x = randc((4, 5, 6), dtype=torch.complex128, seed=8)
    val, grad = smoothed_tv(x, dims=dims, eps=1e-6, boundary=boundary, weights=[0.7] * len(dims))
    xr = x.clone().requires_grad_(True)
    v2, _ = smoothed_tv(xr, dims=dims, eps=1e-6, boundary=boundary, weights=[0.7] * len(dims))
    (ga,) = torch.autograd.grad(v2, xr)
    assert _rel(grad, ga) < 1e-10
    # with tiny eps the value is the (isotropic) TV
    v0, _ = smoothed_tv(x, dims=dims, eps=1e-15, boundary=boundary)
    assert abs(float(v0) - float(tv_value(x, dims=dims, boundary=boundary))) < 1e-6 * float(v0)


# ------------------------------------------------------------------------------- low rank

def _rank2_series(F=20, ny=8, nx=8, seed=9):
    u = randc((ny * nx, 2), dtype=torch.complex128, seed=seed)
    v = randc((2, F), dtype=torch.complex128, seed=seed + 1)
    C = (u * torch.tensor([10.0, 4.0], dtype=torch.float64)) @ v  # Casorati (Ny·Nx) × F
    return C.T.reshape(F, ny, nx)


def test_svt_recovers_rank2():
    clean = _rank2_series()
    noise = 0.5 * randc(clean.shape, dtype=torch.complex128, seed=20)
    noisy = (clean + noise).to(torch.complex64)
    _, s_noisy = svt(noisy, 0.0)
    lam = 1.05 * float(s_noisy[2])  # just above the noise singular values, far below the signal ones
    low, s = svt(noisy, lam)
    assert low.shape == noisy.shape and low.dtype == torch.complex64 and s.dtype == torch.float32
    assert torch.all(s[:-1] >= s[1:])
    assert torch.linalg.matrix_rank(low.reshape(20, -1).to(torch.complex128), atol=1e-2) == 2
    err_low = _rel(low.to(torch.complex128), clean)
    assert err_low < 0.75 * _rel(noisy.to(torch.complex128), clean)
    # the recovered column space is the true one (projection of clean onto it loses almost nothing)
    U = torch.linalg.svd(low.reshape(20, -1).to(torch.complex128).T, full_matrices=False)[0][:, :2]
    C = clean.reshape(20, -1).T
    assert _rel(U @ (U.conj().T @ C), C) < 0.01
    # λ = 0 returns the input; huge λ returns zero
    same, _ = svt(noisy, 0.0)
    assert torch.allclose(same, noisy, atol=1e-5)
    zero, _ = svt(noisy, 1e6)
    assert float(zero.abs().max()) == 0.0
    # relative threshold = fraction of σ₁
    rel_low, _ = svt(noisy, lam / float(s[0]), relative=True)
    assert torch.allclose(rel_low, low, atol=1e-5)


def test_svt_is_nuclear_norm_prox_on_singular_values():
    x = randc((5, 4, 3), dtype=torch.complex128, seed=11)
    low, s = svt(x, 1.3)
    s_low = torch.linalg.svdvals(low.reshape(5, -1))
    assert torch.allclose(s_low, torch.clamp(s - 1.3, min=0), atol=1e-10)
    # batch axes
    xb = torch.stack([x, 2 * x])
    lb, sb = svt(xb, 1.3)
    assert torch.allclose(lb[0], low) and torch.allclose(sb[1], 2 * s)


def test_schatten_p_shrink_properties():
    s = torch.linspace(0.0, 5.0, 51, dtype=torch.float64)
    lam = 1.0
    assert torch.allclose(schatten_p_shrink(s, lam, p=1.0), torch.clamp(s - lam, min=0))
    for p in (0.1, 0.5, 0.9):
        out = schatten_p_shrink(s, lam, p=p)
        assert torch.all(out >= 0) and torch.all(out <= s)
        assert torch.all(out[1:] >= out[:-1])  # monotone
        # zero exactly below the threshold s^(2−p) ≤ λ, positive above it
        assert torch.all(out[s ** (2 - p) <= lam] == 0) and torch.all(out[s ** (2 - p) > lam] > 0)
        # large singular values are shrunk less than by the nuclear-norm rule, and less as s grows
        big = s > 1.5
        shrink = (s - out)[big]
        assert torch.all(shrink < lam) and torch.all(shrink[1:] <= shrink[:-1])
    with pytest.raises(ValueError, match="p must"):
        schatten_p_shrink(s, lam, p=1.5)
    with pytest.raises(ValueError, match="non-negative"):
        schatten_p_shrink(-s - 1, lam)


# ------------------------------------------------------------------------------- temporal FFT

def test_temporal_fft_unitary_and_sparsifying():
    T = TemporalFFT((6, 4, 5))
    check_adjoint(T)
    x = randc((6, 4, 5), seed=12)
    assert float((T.adjoint(T(x)) - x).abs().max()) < 1e-5
    assert abs(float(torch.linalg.vector_norm(T(x)) / torch.linalg.vector_norm(x)) - 1) < 1e-5
    # a static series has all its energy at zero temporal frequency (index F//2, centred)
    static = randc((1, 4, 5), seed=13).expand(6, 4, 5)
    X = T(static)
    assert torch.allclose(X[3], math.sqrt(6) * static[0], atol=1e-5)
    assert float(X[[0, 1, 2, 4, 5]].abs().max()) < 1e-5
