"""FFT helpers against an explicit DFT matrix; LinearOperator algebra."""

import math

import numpy as np
import pytest
import torch

from recon_core.fft import fft1c, fft2c, fftnc, ifft1c, ifft2c, ifftnc
from recon_core.linop import (ComposedOperator, Identity, LinearOperator, Multiply, NormalOperator,
                              ScaledOperator, SumOperator)
from tests.helpers import check_adjoint, check_autograd_is_adjoint, check_normal, check_operator, randc


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


class _CountingNormal(LinearOperator):
    """Multiply by w with an overridden normal that counts its calls (to see which normal is used)."""

    def __init__(self, w):
        super().__init__()
        self.w = w
        self.ishape = self.oshape = tuple(w.shape)
        self.normal_calls = 0

    def forward(self, x):
        return x * self.w

    def adjoint(self, y):
        return y * self.w.conj()

    def normal(self, x):
        self.normal_calls += 1
        return x * (self.w.abs() ** 2)


def test_sum_scaled_and_difference():
    shape = (2, 8, 6)
    A, B = _FFTOp(shape), Multiply(randc(shape, seed=1))
    x = randc(shape, seed=2)
    S = A + B
    assert isinstance(S, SumOperator) and S.ishape == shape and S.oshape == shape
    assert torch.allclose(S(x), A(x) + B(x))
    assert torch.allclose(S.adjoint(x), A.adjoint(x) + B.adjoint(x))
    assert len((S + A).ops) == 3  # nested sums flatten
    a = 0.5 - 2j
    for op in (a * A, A * a):
        assert isinstance(op, ScaledOperator)
        assert torch.allclose(op(x), a * A(x))
        assert torch.allclose(op.adjoint(x), a.conjugate() * A.adjoint(x))   # conj(a) in the adjoint
        assert op(x).dtype == torch.complex64
    assert torch.allclose((A - B)(x), A(x) - B(x))
    assert torch.allclose((-B)(x), -B(x)) and torch.allclose((B / 4)(x), B(x) / 4)
    assert (2 * (3 * B)).scale == 6 and isinstance((2 * (3 * B)).op, Multiply)   # folded
    for op in (S, a * A, A - B, (1j * A + B) @ A.H, 2 * A.N):
        check_operator(op)
    with pytest.raises(TypeError):
        A * B  # operators compose with @, not *
    with pytest.raises(TypeError):
        A * torch.ones(1)


def test_shape_checks_name_both_shapes():
    A, B = _FFTOp((2, 8, 6)), _FFTOp((2, 8, 5))
    with pytest.raises(ValueError, match=r"\(2, 8, 6\).*\(2, 8, 5\)"):
        A @ B
    with pytest.raises(ValueError, match=r"\(2, 8, 6\).*\(2, 8, 5\)"):
        A + B
    unknown = _FFTOp(())  # an operator without fixed shapes composes with anything
    comp = A @ unknown
    assert isinstance(comp, ComposedOperator) and comp.oshape == (2, 8, 6)
    assert (unknown + A).ishape == (2, 8, 6)


def test_normal_of_combinations_uses_parts_fast_normals():
    shape = (3, 8, 6)
    w = randc(shape, seed=4)
    inner = _FFTOp(shape)
    outer = _CountingNormal(w)
    comp = outer @ inner
    x = randc(shape, seed=5)
    check_normal(comp)
    assert outer.normal_calls == 1  # (A @ B).N = Bᴴ (A.N) B
    scaled = (2 - 1j) * outer
    assert torch.allclose(scaled.N(x), 5 * outer.normal(x), atol=1e-5)
    assert outer.normal_calls == 3
    check_normal(scaled)
    N = comp.N
    assert isinstance(N, NormalOperator) and N.H is N
    # batch axes flow through sums, scalings and compositions
    xb = randc((4,) + shape, seed=6)
    op = 3 * (outer @ inner) + Multiply(w)
    assert torch.allclose(op(xb)[2], op(xb[2]), atol=1e-5)


def test_algebra_is_differentiable():
    shape = (2, 8, 6)
    op = (1 + 1j) * (_FFTOp(shape) @ Multiply(randc(shape, seed=7))) - Identity(shape)
    check_autograd_is_adjoint(op)
    check_autograd_is_adjoint(op.N)


def test_operators_without_frames_refuse_select_frames():
    for op in (Identity((2, 8, 6)), Multiply(randc((2, 8, 6))), _FFTOp((2, 8, 6))):
        with pytest.raises(NotImplementedError, match=type(op).__name__):
            op.select_frames([0])
    with pytest.raises(NotImplementedError, match="SumOperator.*Identity"):
        (Identity((2, 8, 6)) + Identity((2, 8, 6))).select_frames([1])
