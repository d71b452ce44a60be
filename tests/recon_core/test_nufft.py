"""NUFFT backends: exact NUDFT agreement, Cartesian-grid = fft2c, adjointness, autograd, selection."""

import math

import numpy as np
import pytest
import torch

from recon_core.fft import fft2c, ifft2c
from recon_core.nufft import (AutoBackend, FinufftBackend, NufftBackend, TorchKbNufftBackend,
                              available_backends, get_backend)
from tests.helpers import randc, vdot

BACKENDS = ["torchkbnufft", "finufft", "auto"]
SHAPES = [(8, 6), (7, 5), (6, 9)]


def random_traj(batch: int, m: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return ((torch.rand(batch, 2, m, generator=g) * 2 - 1) * math.pi).to(torch.float32)


def nudft_matrix(traj: np.ndarray, shape) -> np.ndarray:
    """[M, Ny*Nx] float64 matrix exp(-i (ky (y - Ny//2) + kx (x - Nx//2))) / sqrt(Ny Nx)."""
    ny, nx = shape
    ry = np.arange(ny) - ny // 2
    rx = np.arange(nx) - nx // 2
    ph = traj[0][:, None, None] * ry[None, :, None] + traj[1][:, None, None] * rx[None, None, :]
    return (np.exp(-1j * ph) / math.sqrt(ny * nx)).reshape(traj.shape[1], ny * nx)


def cartesian_traj(shape) -> torch.Tensor:
    ny, nx = shape
    ky = 2 * np.pi * (np.arange(ny) - ny // 2) / ny
    kx = 2 * np.pi * (np.arange(nx) - nx // 2) / nx
    KY, KX = np.meshgrid(ky, kx, indexing="ij")
    return torch.tensor(np.stack([KY.ravel(), KX.ravel()])[None], dtype=torch.float32)


def rel(a, b) -> float:
    a = np.asarray(a, dtype=np.complex128)
    b = np.asarray(b, dtype=np.complex128)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def tol(name: str) -> float:
    return 1e-5 if name == "finufft" or (name == "auto" and "finufft" in available_backends()) else 1e-3


# ---------------------------------------------------------------------------------------------
# selection


def test_available_and_selection():
    names = available_backends()
    assert "torchkbnufft" in names and "auto" in names and "finufft" in names
    assert isinstance(get_backend(), AutoBackend)           # the default: finufft when installed
    assert isinstance(get_backend("finufft", eps=1e-4), FinufftBackend)
    assert get_backend("finufft", eps=1e-4).eps == 1e-4
    assert isinstance(get_backend("auto"), AutoBackend)
    be = get_backend("torchkbnufft")
    assert get_backend(be) is be


def test_unknown_backend_lists_names():
    with pytest.raises(ValueError, match="torchkbnufft"):
        get_backend("bart")
    with pytest.raises(ValueError, match="eps"):
        get_backend("finufft", eps=-1.0)
    with pytest.raises(ValueError, match="options"):
        get_backend("finufft", bogus=1)


def test_auto_uses_finufft_on_cpu():
    auto = get_backend("auto")
    x = randc((1, 1, 8, 6))
    assert isinstance(auto._pick(x), FinufftBackend)


@pytest.mark.parametrize("name", ["torchkbnufft", "finufft"])
def test_bad_inputs(name):
    be = get_backend(name)
    traj = random_traj(2, 10)
    with pytest.raises(TypeError, match="images"):
        be.forward(randc((2, 1, 8, 6), dtype=torch.complex128), traj)
    with pytest.raises(ValueError, match="traj"):
        be.forward(randc((2, 1, 8, 6)), traj[:, :1])
    with pytest.raises(ValueError, match="batch"):
        be.forward(randc((3, 1, 8, 6)), traj)
    with pytest.raises(TypeError, match="traj"):
        be.forward(randc((2, 1, 8, 6)), traj.to(torch.complex64))
    with pytest.raises(ValueError, match="samples"):
        be.adjoint(randc((2, 1, 11)), traj, (8, 6))
    with pytest.raises(ValueError, match="image_shape"):
        be.adjoint(randc((2, 1, 10)), traj, (8,))


# ---------------------------------------------------------------------------------------------
# exactness


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_adjoint_match_explicit_nudft(name, shape):
    be = get_backend(name)
    B, C, M = 2, 3, 40
    traj = random_traj(B, M, seed=sum(shape))
    x = randc((B, C) + shape, seed=1)
    y = randc((B, C, M), seed=2)
    fwd = be.forward(x, traj)
    adj = be.adjoint(y, traj, shape)
    assert fwd.shape == (B, C, M) and fwd.dtype == torch.complex64
    assert adj.shape == (B, C) + shape and adj.dtype == torch.complex64
    for b in range(B):
        A = nudft_matrix(traj[b].double().numpy(), shape)
        ref_f = x[b].reshape(C, -1).numpy().astype(np.complex128) @ A.T
        ref_a = (y[b].numpy().astype(np.complex128) @ A.conj()).reshape((C,) + shape)
        assert rel(fwd[b].numpy(), ref_f) < tol(name)
        assert rel(adj[b].numpy(), ref_a) < tol(name)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_cartesian_grid_equals_fft2c(name, shape):
    be = get_backend(name)
    x = randc((2, 3) + shape, seed=3)
    traj = cartesian_traj(shape)  # batch 1: shared by both items
    y = be.forward(x, traj).reshape(x.shape)
    assert rel(y.numpy(), fft2c(x).numpy()) < tol(name)
    back = be.adjoint(fft2c(x).reshape(2, 3, -1), traj, shape)
    assert rel(back.numpy(), ifft2c(fft2c(x)).numpy()) < tol(name)


def test_finufft_and_torchkbnufft_agree():
    x = randc((3, 2, 12, 10), seed=4)
    traj = random_traj(3, 100, seed=5)
    y = randc((3, 2, 100), seed=6)
    a, b = get_backend("torchkbnufft"), get_backend("finufft")
    assert rel(a.forward(x, traj).numpy(), b.forward(x, traj).numpy()) < 1e-3
    assert rel(a.adjoint(y, traj, (12, 10)).numpy(), b.adjoint(y, traj, (12, 10)).numpy()) < 1e-3


def test_finufft_eps_controls_accuracy():
    x = randc((1, 1, 16, 16), seed=7)
    traj = random_traj(1, 200, seed=8)
    A = nudft_matrix(traj[0].double().numpy(), (16, 16))
    ref = x[0].reshape(1, -1).numpy().astype(np.complex128) @ A.T
    coarse = rel(FinufftBackend(eps=1e-2).forward(x, traj)[0].numpy(), ref)
    fine = rel(FinufftBackend(eps=1e-6, nthreads=1).forward(x, traj)[0].numpy(), ref)
    assert fine < 1e-5 < coarse


# ---------------------------------------------------------------------------------------------
# adjointness and autograd


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("shape", [(8, 6), (7, 5)])
def test_dot_product(name, shape):
    be = get_backend(name)
    traj = random_traj(2, 30, seed=9)
    u = randc((2, 3) + shape, seed=10)
    v = randc((2, 3, 30), seed=11)
    lhs = vdot(be.forward(u, traj), v)
    rhs = vdot(u, be.adjoint(v, traj, shape))
    assert float(abs(lhs - rhs) / abs(lhs)) < 1e-5


@pytest.mark.parametrize("name", BACKENDS)
def test_autograd_forward_and_adjoint(name):
    be = get_backend(name)
    shape = (7, 6)
    traj = random_traj(2, 25, seed=12)
    x = randc((2, 2) + shape, seed=13).requires_grad_(True)
    v = randc((2, 2, 25), seed=14)
    (g,) = torch.autograd.grad(torch.real(vdot(v, be.forward(x, traj))), x)
    assert rel(g.numpy(), be.adjoint(v, traj, shape).numpy()) < 1e-5
    y = randc((2, 2, 25), seed=15).requires_grad_(True)
    u = randc((2, 2) + shape, seed=16)
    (g,) = torch.autograd.grad(torch.real(vdot(u, be.adjoint(y, traj, shape))), y)
    assert rel(g.numpy(), be.forward(u, traj).numpy()) < 1e-5


def test_finufft_double_backward():
    """The backward of the finufft forward is itself differentiable (it is the adjoint Function)."""
    be = get_backend("finufft")
    traj = random_traj(1, 20, seed=17)
    x = randc((1, 1, 6, 6), seed=18).requires_grad_(True)
    v = randc((1, 1, 20), seed=19).requires_grad_(True)
    (g,) = torch.autograd.grad(torch.real(vdot(v, be.forward(x, traj))), x, create_graph=True)
    u = randc((1, 1, 6, 6), seed=20)
    (gv,) = torch.autograd.grad(torch.real(vdot(u, g)), v)
    # g = Aᴴ v (conjugate-linear in the convention), so d Re<u, Aᴴv>/dv = A u
    assert rel(gv.resolve_conj().numpy(), be.forward(u, traj).detach().numpy()) < 1e-5


def test_torchkbnufft_module_cache():
    be = TorchKbNufftBackend()
    traj = random_traj(1, 10)
    be.forward(randc((1, 1, 8, 6)), traj)
    be.adjoint(randc((1, 1, 10)), traj, (8, 6))
    be.forward(randc((1, 1, 7, 5)), traj)
    assert len(be._cache) == 2
    assert isinstance(be, NufftBackend)


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["torchkbnufft", "auto"])
def test_cpu_cuda_agree(name):
    be = get_backend(name)
    traj = random_traj(2, 50, seed=21)
    x = randc((2, 3, 9, 8), seed=22)
    y = randc((2, 3, 50), seed=23)
    dev = torch.device("cuda")
    f_cuda = be.forward(x.to(dev), traj.to(dev))
    a_cuda = be.adjoint(y.to(dev), traj.to(dev), (9, 8))
    assert f_cuda.device.type == "cuda" and a_cuda.device.type == "cuda"
    assert rel(f_cuda.cpu().numpy(), be.forward(x, traj).numpy()) < 1e-3
    assert rel(a_cuda.cpu().numpy(), be.adjoint(y, traj, (9, 8)).numpy()) < 1e-3


@pytest.mark.parametrize("M", [20, 200])   # k-space smaller / larger than the 8x6 image: both scaling sides
def test_finufft_strided_and_conjugate_views_equal_contiguous(M):
    """Scaling on the smaller side, in-place outputs: strided, conjugate and batch-1-trajectory inputs
    agree exactly with contiguous ones."""
    be = FinufftBackend()
    shape, B, C = (8, 6), 3, 2
    traj = random_traj(B, M, seed=M)
    x = randc((C, B) + shape, seed=3).transpose(0, 1)                       # non-contiguous [B, C, ...]
    y = randc((B, M, C), seed=4).transpose(1, 2).conj()                      # strided and lazily conjugated
    assert not x.is_contiguous() and not y.is_contiguous() and y.is_conj()
    torch.testing.assert_close(be.forward(x, traj), be.forward(x.contiguous(), traj), rtol=0, atol=0)
    dense = y.resolve_conj().contiguous()
    torch.testing.assert_close(be.adjoint(y, traj, shape), be.adjoint(dense, traj, shape), rtol=0, atol=0)
    one = traj[:1]
    ref = torch.stack([be.forward(x[b:b + 1].contiguous(), one)[0] for b in range(B)])
    torch.testing.assert_close(be.forward(x, one), ref, rtol=0, atol=0)
