"""FFT helpers against an explicit DFT matrix; LinearOperator algebra."""

import math

import numpy as np
import pytest
import torch

from recon_core.fft import fft1c, fft2c, fftnc, ifft1c, ifft2c, ifftnc
from recon_core.linop import Identity, LinearOperator, Multiply
from tests.helpers import check_adjoint, check_autograd_is_adjoint, randc


def centered_dft_matrix(n: int) -> np.ndarray:
    """Unitary DFT with the origin at index n//2 in both domains."""
    k = np.arange(n) - n // 2
    return np.exp(-2j * np.pi * np.outer(k, k) / n) / math.sqrt(n)


@pytest.mark.parametrize("shape", [(8, 6), (7, 5), (6, 9)])
def test_fft2c_matches_explicit_dft(shape):
    x = randc((3,) + shape, dtype=torch.complex128)
    Fy, Fx = centered_dft_matrix(shape[0]), centered_dft_matrix(shape[1])
    ref = np.einsum("ky,byx,lx->bkl", Fy, x.numpy(), Fx)
    out = fft2c(x).numpy()
    assert np.max(np.abs(out - ref)) < 1e-12
    back = ifft2c(torch.from_numpy(ref)).numpy()
    assert np.max(np.abs(back - x.numpy())) < 1e-12


def test_fft2c_complex64_accuracy_and_dtype():
    x = randc((2, 8, 6))
    y = fft2c(x)
    assert y.dtype == torch.complex64
    ref = np.einsum("ky,byx,lx->bkl", centered_dft_matrix(8), x.numpy().astype(np.complex128), centered_dft_matrix(6))
    assert np.max(np.abs(y.numpy() - ref)) < 1e-6


def test_fft_unitary_and_inverse():
    x = randc((4, 16, 12))
    assert torch.allclose(ifft2c(fft2c(x)), x, atol=1e-5)
    assert abs(torch.linalg.vector_norm(fft2c(x)) / torch.linalg.vector_norm(x) - 1) < 1e-5
    assert torch.allclose(ifft1c(fft1c(x, 0), 0), x, atol=1e-5)


def test_uncentered_convention_has_dc_at_zero():
    x = torch.ones(1, 4, 4, dtype=torch.complex64)
    y = fftnc(x, centered=False, norm="backward")
    assert abs(y[0, 0, 0] - 16) < 1e-5 and float(y.abs().sum() - 16) < 1e-4
    yc = fft2c(x)
    assert abs(yc[0, 2, 2] - 4) < 1e-5
    assert torch.allclose(ifftnc(y, centered=False, norm="backward"), x)


class _FFTOp(LinearOperator):
    def __init__(self, shape):
        super().__init__()
        self.ishape = self.oshape = shape

    def forward(self, x):
        return fft2c(x)

    def adjoint(self, y):
        return ifft2c(y)


def test_linop_algebra_adjoint_and_autograd():
    op = _FFTOp((2, 8, 6))
    check_adjoint(op)
    check_autograd_is_adjoint(op)
    w = randc((2, 8, 6), seed=3)
    comp = Multiply(w) @ op @ Identity((2, 8, 6))
    check_adjoint(comp)
    check_adjoint(comp.H)
    x = randc((2, 8, 6), seed=5)
    assert torch.allclose(comp.N(x), comp.H(comp(x)), atol=1e-4)
    assert comp.H.H is comp
