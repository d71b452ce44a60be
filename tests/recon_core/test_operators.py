"""Encoding operators: explicit (NU)DFT agreement, adjoint / normal / autograd, Toeplitz, factory."""

import math

import numpy as np
import pytest
import torch

from recon_core.linop import ComposedOperator, LinearOperator
from recon_core.operators import (FFT2, OPERATORS, CartesianSense, CoilMaps, NonCartesianSense, Nufft,
                                  SampleWeights, Sampling, make_encoding_operator)
from tests.helpers import (check_adjoint, check_autograd_is_adjoint, check_normal, check_select_frames,
                           dense_matrix, randc)

BACKENDS = ["torchkbnufft", "finufft"]
SHAPES = [(8, 6), (7, 5)]


def coil_maps(C: int, shape, seed: int = 0) -> torch.Tensor:
    s = randc((C,) + tuple(shape), seed=seed)
    return (s / torch.sqrt(torch.sum(s.abs() ** 2, dim=0, keepdim=True))).to(torch.complex64)


def random_traj(F: int, M: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return ((torch.rand(F, 2, M, generator=g) * 2 - 1) * math.pi).to(torch.float32)


def random_mask(F: int, shape, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand((F,) + tuple(shape), generator=g) > 0.4).to(torch.float32)


def centered_dft(n: int) -> np.ndarray:
    k = np.arange(n) - n // 2
    return np.exp(-2j * np.pi * np.outer(k, k) / n) / math.sqrt(n)


def nudft_matrix(traj: np.ndarray, shape) -> np.ndarray:
    ny, nx = shape
    ry = np.arange(ny) - ny // 2
    rx = np.arange(nx) - nx // 2
    ph = traj[0][:, None, None] * ry[None, :, None] + traj[1][:, None, None] * rx[None, None, :]
    return (np.exp(-1j * ph) / math.sqrt(ny * nx)).reshape(traj.shape[1], ny * nx)


def rel(a, b) -> float:
    a = np.asarray(a, dtype=np.complex128)
    b = np.asarray(b, dtype=np.complex128)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def tol(backend: str) -> float:
    return 1e-5 if backend == "finufft" else 1e-3


# ---------------------------------------------------------------------------------------------
# Cartesian SENSE


@pytest.mark.parametrize("shape", SHAPES + [(6, 9)])
def test_cartesian_sense_matches_explicit_dft(shape):
    F, C = 2, 3
    S = coil_maps(C, shape)
    mask = random_mask(F, shape, seed=1)
    op = CartesianSense(S, mask, F)
    # explicit float64 matrix: rows (f, c, ky, kx), columns (f, y, x)
    D = np.kron(centered_dft(shape[0]), centered_dft(shape[1]))            # [Ny*Nx, Ny*Nx]
    Sn = S.numpy().astype(np.complex128).reshape(C, -1)
    A = np.zeros((F, C, D.shape[0], F, D.shape[1]), dtype=np.complex128)
    for f in range(F):
        mf = mask[f].numpy().reshape(-1, 1).astype(np.float64)
        for c in range(C):
            A[f, c, :, f, :] = mf * D * Sn[c][None, :]
    A = A.reshape(F * C * D.shape[0], F * D.shape[1])
    dense = dense_matrix(op, op.ishape).numpy()
    assert np.max(np.abs(dense - A)) / np.max(np.abs(A)) < 1e-6
    dense_adj = dense_matrix(op.adjoint, op.oshape).numpy()
    assert np.max(np.abs(dense_adj - A.conj().T)) / np.max(np.abs(A)) < 1e-6


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mask_frames", [1, 3])
def test_cartesian_sense_adjoint_normal_autograd(shape, mask_frames):
    op = CartesianSense(coil_maps(4, shape), random_mask(mask_frames, shape, seed=2), 3)
    assert op.ishape == (3,) + shape and op.oshape == (3, 4) + shape
    check_adjoint(op)
    check_normal(op, rtol=1e-5)
    check_autograd_is_adjoint(op)
    check_adjoint(op.N)


@pytest.mark.parametrize("shape", SHAPES + [(6, 9)])
@pytest.mark.parametrize("mask_frames", [1, 3])
def test_cartesian_sense_normal_on_whole_readout_lines(shape, mask_frames):
    """Phase-encode lines sampled whole (the mask constant along Nx, with weights): the normal takes
    its one-axis path and still equals Aᴴ(A x) and the explicit DFT matrix's AᴴA; a mask with a
    single readout point removed falls back to the 2-D path, also exact; select_frames keeps it."""
    g = torch.Generator().manual_seed(5)
    lines = torch.rand(mask_frames, shape[0], 1, generator=g) * (torch.rand(mask_frames, shape[0], 1, generator=g) > 0.5)
    mask = lines.expand(mask_frames, *shape).contiguous()
    op = CartesianSense(coil_maps(3, shape), mask, 3)
    check_normal(op, rtol=1e-5)
    assert op._mask2_lines is not None                    # the one-axis path was taken
    dense_n = dense_matrix(op.normal, op.ishape).numpy()
    dense_a = dense_matrix(op, op.ishape).numpy()
    assert np.max(np.abs(dense_n - dense_a.conj().T @ dense_a)) / np.max(np.abs(dense_n)) < 1e-5
    check_adjoint(op.N)
    sub = op.select_frames([2, 0])
    x = randc((2,) + shape, seed=6)
    assert rel(sub.normal(x).numpy(), sub.adjoint(sub(x)).numpy()) < 1e-5
    holed = mask.clone()
    holed[0, int(torch.argmax(lines[0, :, 0])), 1] = 0.0        # one readout point of a sampled line
    op2 = CartesianSense(coil_maps(3, shape), holed, 3)
    check_normal(op2, rtol=1e-5)
    assert op2._mask2_lines is None


def test_cartesian_sense_batch_axes_and_weights():
    shape = (8, 6)
    w = torch.rand(2, *shape, generator=torch.Generator().manual_seed(3))  # non-binary weights
    op = CartesianSense(coil_maps(3, shape), w, 2)
    x = randc((4, 2) + shape, seed=4)
    y = op(x)
    assert y.shape == (4, 2, 3) + shape
    assert torch.allclose(y[1], op(x[1]), atol=1e-6)
    assert rel(op.normal(x).numpy(), op.adjoint(op(x)).numpy()) < 1e-5
    check_normal(op, rtol=1e-5)


def test_cartesian_sense_bad_inputs():
    S = coil_maps(2, (8, 6))
    with pytest.raises(ValueError, match="mask"):
        CartesianSense(S, torch.ones(2, 8, 5), 2)
    with pytest.raises(TypeError, match="mask"):
        CartesianSense(S, torch.ones(1, 8, 6, dtype=torch.complex64), 2)
    with pytest.raises(TypeError, match="coil_maps"):
        CartesianSense(S.to(torch.complex128), torch.ones(1, 8, 6), 2)
    with pytest.raises(ValueError, match="n_frames"):
        CartesianSense(S, torch.ones(1, 8, 6), 0)
    op = CartesianSense(S, torch.ones(1, 8, 6), 2)
    with pytest.raises(ValueError, match="x must have shape"):
        op(randc((3, 8, 6)))


# ---------------------------------------------------------------------------------------------
# non-Cartesian SENSE


def ncsense_reference(S, traj, weights, x) -> np.ndarray:
    """y[f, c, m] = w[f, m] Σ_r exp(-i k_m·r) S_c(r) x_f(r) / sqrt(N), float64."""
    F = traj.shape[0]
    C = S.shape[0]
    out = []
    for f in range(F):
        A = nudft_matrix(traj[f].double().numpy(), S.shape[-2:])
        coil_imgs = (S.numpy().astype(np.complex128) * x[f].numpy().astype(np.complex128)).reshape(C, -1)
        y = coil_imgs @ A.T
        if weights is not None:
            y = y * weights[f].double().numpy()[None]
        out.append(y)
    return np.stack(out)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("use_weights", [False, True])
def test_noncartesian_sense_matches_explicit_nudft(backend, shape, use_weights):
    F, C, M = 3, 2, 30
    S = coil_maps(C, shape, seed=5)
    traj = random_traj(F, M, seed=6)
    w = torch.rand(F, M, generator=torch.Generator().manual_seed(7)) + 0.5 if use_weights else None
    op = NonCartesianSense(S, traj, shape, backend=backend, weights=w)
    x = randc((F,) + shape, seed=8)
    ref = ncsense_reference(S, traj, w, x)
    assert rel(op(x).numpy(), ref) < tol(backend)
    # adjoint against the explicit conjugate transpose
    y = randc((F, C, M), seed=9)
    ref_adj = []
    for f in range(F):
        A = nudft_matrix(traj[f].double().numpy(), shape)
        yf = y[f].numpy().astype(np.complex128)
        if w is not None:
            yf = yf * w[f].double().numpy()[None]
        coil_imgs = (yf @ A.conj()).reshape((C,) + shape)
        ref_adj.append(np.sum(S.numpy().conj() * coil_imgs, axis=0))
    assert rel(op.adjoint(y).numpy(), np.stack(ref_adj)) < tol(backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_noncartesian_sense_adjoint_normal_autograd(backend, shape):
    w = torch.rand(2, 40, generator=torch.Generator().manual_seed(10)) + 0.1
    traj = random_traj(2, 40, seed=11)
    op = NonCartesianSense(coil_maps(3, shape), traj, shape, backend=backend, weights=w)
    assert op.ishape == (2,) + shape and op.oshape == (2, 3, 40)
    check_adjoint(op)
    check_normal(op)
    check_autograd_is_adjoint(op)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES + [(10, 12)])
@pytest.mark.parametrize("use_weights", [False, True])
def test_toeplitz_normal_matches_adjoint_forward(backend, shape, use_weights):
    F = 2
    traj = random_traj(F, 60, seed=12)
    w = torch.rand(F, 60, generator=torch.Generator().manual_seed(13)) + 0.1 if use_weights else None
    op = NonCartesianSense(coil_maps(3, shape), traj, shape, backend=backend, weights=w, toeplitz=True)
    assert op.toeplitz_kernel is None  # lazy
    err = check_normal(op, rtol=1e-3)
    assert op.toeplitz_kernel is not None
    assert op.toeplitz_kernel.shape == (F, 2 * shape[0], 2 * shape[1])
    assert op.toeplitz_kernel.dtype == torch.float32
    if backend == "finufft":
        assert err < 1e-5
    # the Toeplitz normal operator is self-adjoint and positive semi-definite
    check_adjoint(op.N, rtol=1e-5)
    x = randc(op.ishape, seed=14)
    assert float(torch.real(torch.sum(x.conj() * op.normal(x)))) > 0


def test_toeplitz_matches_exact_gram_matrix():
    """Toeplitz normal vs the float64 Gram matrix AᴴW²A of the explicit NUDFT."""
    shape, C, M = (7, 6), 2, 50
    S = coil_maps(C, shape, seed=15)
    traj = random_traj(1, M, seed=16)
    w = torch.rand(1, M, generator=torch.Generator().manual_seed(17)) + 0.2
    op = NonCartesianSense(S, traj, shape, backend="finufft", weights=w, toeplitz=True)
    A = nudft_matrix(traj[0].double().numpy(), shape) * w[0].double().numpy()[:, None]
    Sn = S.numpy().astype(np.complex128).reshape(C, -1)
    E = np.concatenate([A * Sn[c][None, :] for c in range(C)])         # [C*M, Ny*Nx]
    G = E.conj().T @ E
    x = randc((1,) + shape, seed=18)
    ref = (G @ x.numpy().reshape(-1).astype(np.complex128)).reshape((1,) + shape)
    assert rel(op.normal(x).numpy(), ref) < 1e-5


def test_toeplitz_with_batch_axes_and_explicit_precompute():
    shape = (8, 6)
    op = NonCartesianSense(coil_maps(2, shape), random_traj(3, 30, seed=19), shape,
                           backend="finufft", toeplitz=True)
    k = op.precompute_toeplitz()
    assert op.toeplitz_kernel is k
    x = randc((2, 3) + shape, seed=20)
    out = op.normal(x)
    assert out.shape == x.shape
    assert rel(out[1].numpy(), op.adjoint(op(x[1])).numpy()) < 1e-5
    # the kernel is a buffer, not part of the saved state (it is derived from the trajectory)
    assert "toeplitz_kernel" in dict(op.named_buffers())
    assert "toeplitz_kernel" not in op.state_dict()


def test_noncartesian_batch_axes_match_per_item():
    shape = (7, 5)
    op = NonCartesianSense(coil_maps(3, shape), random_traj(2, 20, seed=21), shape, backend="finufft")
    x = randc((4, 2) + shape, seed=22)
    y = op(x)
    assert y.shape == (4, 2, 3, 20)
    assert rel(y[2].numpy(), op(x[2]).numpy()) < 1e-6
    z = op.adjoint(y)
    assert z.shape == x.shape
    assert rel(z[3].numpy(), op.adjoint(y[3]).numpy()) < 1e-6


def test_noncartesian_bad_inputs():
    S = coil_maps(2, (8, 6))
    traj = random_traj(2, 10)
    with pytest.raises(ValueError, match="image_shape"):
        NonCartesianSense(S, traj, (8, 5))
    with pytest.raises(ValueError, match="trajectory"):
        NonCartesianSense(S, traj[:, :1], (8, 6))
    with pytest.raises(ValueError, match="weights"):
        NonCartesianSense(S, traj, (8, 6), weights=torch.ones(2, 11))
    with pytest.raises(TypeError, match="weights"):
        NonCartesianSense(S, traj, (8, 6), weights=torch.ones(2, 10, dtype=torch.complex64))
    with pytest.raises(ValueError, match="unknown NUFFT backend"):
        NonCartesianSense(S, traj, (8, 6), backend="nope")


# ---------------------------------------------------------------------------------------------
# raw NUFFT operator


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_nufft_operator(backend, shape):
    F, C, M = 2, 3, 25
    traj = random_traj(F, M, seed=23)
    op = Nufft(traj, shape, backend=backend, n_coils=C)
    assert op.ishape == (F, C) + shape and op.oshape == (F, C, M)
    check_adjoint(op)
    check_normal(op)
    check_autograd_is_adjoint(op)
    x = randc((F, C) + shape, seed=24)
    y = op(x)
    for f in range(F):
        A = nudft_matrix(traj[f].double().numpy(), shape)
        ref = x[f].reshape(C, -1).numpy().astype(np.complex128) @ A.T
        assert rel(y[f].numpy(), ref) < tol(backend)
    # any channel count and leading batch axes at call time
    x5 = randc((2, F, 5) + shape, seed=25)
    y5 = op(x5)
    assert y5.shape == (2, F, 5, M)
    assert rel(y5[1, :, 2].numpy(), op(x5[1, :, 2:3])[:, 0].numpy()) < 1e-6
    assert op.adjoint(y5).shape == x5.shape
    with pytest.raises(ValueError, match="frames"):
        op(randc((F + 1, C) + shape))


# ---------------------------------------------------------------------------------------------
# building blocks, compositions and select_frames


def test_sense_operators_are_compositions_with_their_attributes():
    shape = (8, 6)
    S, m = coil_maps(3, shape), random_mask(2, shape)
    cart = CartesianSense(S, m, 2)
    assert isinstance(cart, ComposedOperator) and isinstance(cart.inner, CoilMaps)
    assert isinstance(cart.outer.outer, Sampling) and isinstance(cart.outer.inner, FFT2)
    assert cart.coil_maps is S and torch.equal(cart.mask, m) and cart.n_frames == 2
    assert cart.ishape == (2,) + shape and cart.oshape == (2, 3) + shape and cart.image_shape == shape
    traj, w = random_traj(2, 20), torch.rand(2, 20) + 0.1
    nc = NonCartesianSense(S, traj, shape, backend="finufft", weights=w, toeplitz=True)
    assert isinstance(nc.inner, CoilMaps) and isinstance(nc.outer.outer, SampleWeights)
    assert isinstance(nc.outer.inner, Nufft) and nc.outer.inner.backend is nc.backend
    assert nc.coil_maps is S and torch.equal(nc.trajectory, traj) and torch.equal(nc.weights, w)
    assert nc.image_shape == shape and nc.n_frames == 2 and nc.toeplitz
    assert nc.backend.name == "finufft"
    plain = NonCartesianSense(S, traj, shape, backend="finufft")
    assert plain.weights is None and isinstance(plain.outer, Nufft) and not plain.toeplitz
    # each constant is one buffer of one part (moved by .to(), saved once)
    assert set(nc.state_dict()) == {"inner.coil_maps", "outer.inner.trajectory", "outer.outer.weights"}
    assert set(cart.state_dict()) == {"inner.coil_maps", "outer.outer.mask"}


def test_blocks_batch_axes_and_channel_counts():
    shape = (7, 5)
    op = Sampling(random_mask(1, shape), 2, 3)
    x = randc((4, 2, 5) + shape, seed=40)        # any channel count, leading batch axes
    assert torch.equal(op(x), op.mask.unsqueeze(-3) * x)
    w = SampleWeights(torch.rand(2, 9) + 0.5, 2, 3)
    y = randc((4, 2, 1, 9), seed=41)
    assert w(y).shape == y.shape and torch.allclose(w.normal(y), w(w(y)))
    maps_op = CoilMaps(coil_maps(3, shape), 2)
    x = randc((4, 2) + shape, seed=42)
    assert torch.allclose(maps_op.normal(x), maps_op.adjoint(maps_op(x)), atol=1e-6)
    assert torch.allclose(FFT2((2,) + shape).normal(x), x)


def test_blocks_bad_inputs():
    with pytest.raises(ValueError, match="mask"):
        Sampling(torch.ones(2, 8, 6), 3, 1)
    with pytest.raises(TypeError, match="mask"):
        Sampling(torch.ones(1, 8, 6, dtype=torch.complex64), 3, 1)
    with pytest.raises(ValueError, match="weights"):
        SampleWeights(torch.ones(2, 5, 1), 2, 1)
    with pytest.raises(ValueError, match="shape"):
        FFT2((5,))
    with pytest.raises(ValueError, match="x must have shape"):
        Sampling(torch.ones(2, 8, 6), 2, 1)(randc((3, 1, 8, 6)))
    with pytest.raises(ValueError, match="x must have shape"):
        CoilMaps(coil_maps(2, (8, 6)), 2)(randc((2, 8, 5)))
    with pytest.raises(ValueError, match=r"\(2, 3, 8, 6\).*\(2, 2, 8, 6\)"):
        Sampling(torch.ones(2, 8, 6), 2, 3) @ CoilMaps(coil_maps(2, (8, 6)), 2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("use_weights", [False, True])
def test_noncartesian_select_frames(backend, use_weights):
    shape, F = (8, 6), 4
    w = torch.rand(F, 30, generator=torch.Generator().manual_seed(43)) + 0.1 if use_weights else None
    op = NonCartesianSense(coil_maps(2, shape), random_traj(F, 30, seed=44), shape, backend=backend,
                           weights=w, toeplitz=True)
    op.precompute_toeplitz()
    sel = check_select_frames(op, [3, 1], rtol=1e-5)
    assert isinstance(sel, NonCartesianSense) and sel.backend is op.backend and sel.toeplitz
    assert torch.equal(sel.toeplitz_kernel, op.toeplitz_kernel[[3, 1]])
    if use_weights:
        assert torch.equal(sel.weights, op.weights[[3, 1]])
    # batch axes on the selected operator
    x = randc((2, 2) + shape, seed=45)
    assert rel(sel(x)[1].numpy(), sel(x[1]).numpy()) < 1e-6


@pytest.mark.parametrize("mask_frames", [1, 4])
def test_cartesian_select_frames(mask_frames):
    shape = (8, 6)
    op = CartesianSense(coil_maps(3, shape), random_mask(mask_frames, shape, seed=46), 4)
    sel = check_select_frames(op, torch.tensor([2, 0, 3]), rtol=1e-6)
    assert isinstance(sel, CartesianSense) and sel.mask.shape[0] == (1 if mask_frames == 1 else 3)
    one = op.select_frames([1])
    x = randc((1,) + shape, seed=47)
    full = torch.zeros((4,) + shape, dtype=torch.complex64)
    full[1] = x[0]
    assert torch.equal(one(x)[0], op(full)[1])        # exactly the same numbers


def test_nufft_select_frames_keeps_channels_and_backend():
    op = Nufft(random_traj(3, 25, seed=48), (7, 5), backend="finufft", n_coils=4)
    sel = check_select_frames(op, [2], rtol=1e-6)
    assert sel.ishape == (1, 4, 7, 5) and sel.backend is op.backend
    assert torch.equal(sel.trajectory, op.trajectory[2:3])


# ---------------------------------------------------------------------------------------------
# factory


def test_make_encoding_operator_choices():
    shape = (8, 6)
    S = coil_maps(2, shape)
    op = make_encoding_operator(S, shape, 3, mask=random_mask(3, shape))
    assert isinstance(op, CartesianSense) and op.ishape == (3,) + shape
    full = make_encoding_operator(S, shape, 3)
    assert isinstance(full, CartesianSense)
    x = randc((3,) + shape, seed=26)
    assert rel(full.normal(x).numpy(), x.numpy()) < 1e-5  # Σ|S|² = 1 and full sampling: AᴴA = I
    traj = random_traj(1, 20, seed=27)
    nc = make_encoding_operator(S, shape, 3, trajectory=traj, weights=torch.ones(1, 20),
                                backend="finufft", toeplitz=True)
    assert isinstance(nc, NonCartesianSense) and nc.toeplitz
    assert nc.trajectory.shape == (3, 2, 20) and nc.weights.shape == (3, 20)
    assert isinstance(nc, LinearOperator)
    check_adjoint(nc)
    assert set(OPERATORS) == {"cartesian", "noncartesian"}


def test_make_encoding_operator_errors():
    shape = (8, 6)
    S = coil_maps(2, shape)
    with pytest.raises(ValueError, match="not both"):
        make_encoding_operator(S, shape, 1, mask=torch.ones(1, 8, 6), trajectory=random_traj(1, 5))
    with pytest.raises(ValueError, match="weights"):
        make_encoding_operator(S, shape, 1, mask=torch.ones(1, 8, 6), weights=torch.ones(1, 5))
    with pytest.raises(ValueError, match="image_shape"):
        make_encoding_operator(S, (8, 7), 1)
    with pytest.raises(ValueError, match="frames"):
        make_encoding_operator(S, shape, 3, trajectory=random_traj(2, 5))


# ---------------------------------------------------------------------------------------------
# device


def test_operators_follow_input_device(device):
    shape = (8, 6)
    S = coil_maps(2, shape)
    ops = [CartesianSense(S, random_mask(1, shape), 2),
           NonCartesianSense(S, random_traj(2, 20), shape, backend="torchkbnufft", toeplitz=True),
           SampleWeights(torch.rand(2, 20), 2, 2) @ Nufft(random_traj(2, 20), shape, n_coils=2)
           @ CoilMaps(S, 2)]
    for op in ops:
        op = op.to(device)
        for o in (op, op.select_frames(torch.tensor([1], device=device)), 0.5j * op):
            x = randc(o.ishape, device=device)
            for out in (o(x), o.normal(x), o.adjoint(o(x))):
                assert out.device.type == device.type


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["torchkbnufft", "auto"])
def test_cpu_cuda_agree(backend):
    shape = (9, 8)
    S = coil_maps(3, shape)
    traj = random_traj(2, 40, seed=28)
    w = torch.rand(2, 40, generator=torch.Generator().manual_seed(29)) + 0.1
    cpu = NonCartesianSense(S, traj, shape, backend=backend, weights=w, toeplitz=True)
    x = randc(cpu.ishape, seed=30)
    ref_f, ref_n = cpu(x), cpu.normal(x)
    assert cpu.toeplitz_kernel.device.type == "cpu"
    gpu = cpu.to("cuda")
    assert gpu.toeplitz_kernel.device.type == "cuda"
    xg = x.to("cuda")
    assert rel(gpu(xg).cpu().numpy(), ref_f.numpy()) < 1e-3
    assert rel(gpu.normal(xg).cpu().numpy(), ref_n.numpy()) < 1e-3
    cart = CartesianSense(S, random_mask(2, shape), 2)
    y_cpu = cart.normal(x)
    assert rel(cart.to("cuda").normal(xg).cpu().numpy(), y_cpu.numpy()) < 1e-5
