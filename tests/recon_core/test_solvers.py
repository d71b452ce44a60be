"""Tests for recon_core.solvers: CG, power iteration, FISTA, nonlinear CG (with a quadratic part)."""

from __future__ import annotations

import pytest
import torch

from recon_core.linop import LinearOperator, Multiply
from recon_core.priors import soft_threshold
from recon_core.solvers import (
    CGInfo,
    LineSearch,
    conjugate_gradient,
    fista,
    nonlinear_cg,
    power_iteration,
)
from tests.helpers import randc


class MatOp(LinearOperator):
    """A dense matrix acting on tensors of shape ``ishape`` (flattened)."""

    def __init__(self, M: torch.Tensor, ishape) -> None:
        super().__init__()
        self.M = M
        self.ishape = tuple(ishape)
        self.oshape = (M.shape[0],)

    def forward(self, x):
        return self.M @ x.reshape(-1)

    def adjoint(self, y):
        return (self.M.conj().T @ y).reshape(self.ishape)


def _hpd(n: int, dtype=torch.complex128, seed: int = 0, cond: float = 50.0) -> torch.Tensor:
    """A Hermitian positive-definite matrix with eigenvalues in [1, cond]."""
    Q, _ = torch.linalg.qr(randc((n, n), dtype=dtype, seed=seed))
    ev = torch.linspace(1.0, cond, n, dtype=torch.float64).to(dtype)
    return (Q * ev) @ Q.conj().T


def _rel(a, b) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


# ------------------------------------------------------------------------------- CG

def test_cg_real_spd():
    g = torch.Generator().manual_seed(1)
    B = torch.randn(30, 20, generator=g, dtype=torch.float64)
    N = B.T @ B + 0.5 * torch.eye(20, dtype=torch.float64)
    b = torch.randn(20, generator=g, dtype=torch.float64)
    x, info = conjugate_gradient(lambda v: N @ v, b, max_iter=100, tol=1e-10)
    assert isinstance(info, CGInfo) and info.converged
    assert _rel(x, torch.linalg.solve(N, b)) < 1e-8
    assert len(info.residual_norms) == info.iterations + 1
    assert info.residual_norms[-1] / float(torch.linalg.vector_norm(b)) < 1e-10


def test_cg_complex_hermitian_tensor_shape():
    N = _hpd(24, seed=2)
    shape = (2, 3, 4)
    b = randc(shape, dtype=torch.complex128, seed=3)
    op = lambda v: (N @ v.reshape(-1)).reshape(shape)  # noqa: E731
    x, info = conjugate_gradient(op, b, max_iter=200, tol=1e-9)
    ref = torch.linalg.solve(N, b.reshape(-1)).reshape(shape)
    assert x.shape == shape and x.dtype == torch.complex128
    assert info.converged and _rel(x, ref) < 1e-7


def test_cg_complex64_reaches_tolerance_and_callback():
    N = _hpd(16, dtype=torch.complex64, seed=4, cond=10.0)
    b = randc((16,), seed=5)
    seen = []
    x, info = conjugate_gradient(lambda v: N @ v, b, max_iter=50, tol=1e-5,
                                 callback=lambda it, xi, r: seen.append((it, r)))
    assert x.dtype == torch.complex64 and info.converged
    assert [s[0] for s in seen] == list(range(1, info.iterations + 1))
    assert seen[-1][1] < 1e-5
    true_res = torch.linalg.vector_norm(b - N @ x) / torch.linalg.vector_norm(b)
    assert float(true_res) < 1e-4


def test_cg_lam_tikhonov():
    N = _hpd(12, seed=6)
    b = randc((12,), dtype=torch.complex128, seed=7)
    lam = 3.5
    x, info = conjugate_gradient(lambda v: N @ v, b, lam=lam, max_iter=100, tol=1e-10)
    ref = torch.linalg.solve(N + lam * torch.eye(12, dtype=N.dtype), b)
    assert info.converged and _rel(x, ref) < 1e-8
    # and differs from the λ = 0 solution
    assert _rel(torch.linalg.solve(N, b), ref) > 1e-2


def test_cg_warm_start_reduces_iterations():
    N = _hpd(40, seed=8, cond=200.0)
    b = randc((40,), dtype=torch.complex128, seed=9)
    op = lambda v: N @ v  # noqa: E731
    _, cold = conjugate_gradient(op, b, max_iter=200, tol=1e-8)
    ref = torch.linalg.solve(N, b)
    x0 = ref + 1e-4 * randc((40,), dtype=torch.complex128, seed=10)
    xw, warm = conjugate_gradient(op, b, x0=x0, max_iter=200, tol=1e-8)
    assert cold.converged and warm.converged
    assert warm.iterations < cold.iterations
    assert _rel(xw, ref) < 1e-6


def test_cg_least_squares_with_operator():
    # min ‖Ax − y‖² + λ‖x‖² through a LinearOperator's normal and adjoint (the CG-SENSE call)
    M = randc((30, 12), dtype=torch.complex128, seed=11)
    A = MatOp(M, (3, 4))
    y = randc((30,), dtype=torch.complex128, seed=12)
    x, info = conjugate_gradient(A.normal, A.adjoint(y), lam=0.1, max_iter=100, tol=1e-10)
    ref = torch.linalg.solve(M.conj().T @ M + 0.1 * torch.eye(12, dtype=M.dtype), M.conj().T @ y)
    assert x.shape == (3, 4) and info.converged
    assert _rel(x.reshape(-1), ref) < 1e-8


def test_callback_returning_true_stops_each_solver():
    N = _hpd(20, seed=26, cond=30.0)
    b = randc((20,), dtype=torch.complex128, seed=27)
    stop_at_3 = lambda it, x, r: it >= 3  # noqa: E731
    x, info = conjugate_gradient(lambda v: N @ v, b, max_iter=100, tol=1e-12, callback=stop_at_3)
    assert info.iterations == 3 and not info.converged and torch.isfinite(x).all()
    x, info = fista(lambda v: N @ v - b, lambda v, s: v, torch.zeros_like(b), 1.0 / 30.0, max_iter=100,
                    tol=1e-14, callback=stop_at_3)
    assert info.iterations == 3 and not info.converged and len(info.history) == 3
    x, info = nonlinear_cg(None, torch.zeros_like(b), max_iter=100, tol=1e-14, callback=stop_at_3,
                           quadratic=(lambda v: N @ v, b))
    assert info.iterations == 3 and not info.converged and len(info.extra["objective"]) == 3


def test_cg_diagonal_linear_operator():
    w = torch.rand(3, 5, generator=torch.Generator().manual_seed(0)) + 0.5
    op = Multiply(w.to(torch.complex64))
    b = randc((3, 5), seed=13)
    x, info = conjugate_gradient(op, b, lam=0.25, max_iter=30, tol=1e-6)
    assert info.converged and _rel(x, b / (w + 0.25)) < 1e-5


def test_cg_zero_rhs_and_bad_input():
    x, info = conjugate_gradient(lambda v: 2 * v, torch.zeros(4, dtype=torch.complex64))
    assert info.converged and info.iterations == 0 and torch.all(x == 0)
    with pytest.raises(ValueError, match="lam"):
        conjugate_gradient(lambda v: v, torch.ones(3), lam=-1.0)
    with pytest.raises(ValueError, match="x0"):
        conjugate_gradient(lambda v: v, torch.ones(3), x0=torch.ones(4))
    with pytest.raises(TypeError, match="rhs"):
        conjugate_gradient(lambda v: v, [1.0, 2.0])


# ------------------------------------------------------------------------------- power iteration

def test_power_iteration_matches_eigvalsh():
    M = randc((25, 10), dtype=torch.complex128, seed=14)
    N = M.conj().T @ M
    ref = float(torch.linalg.eigvalsh(N)[-1])
    A = MatOp(M, (10,))
    est = power_iteration(A.normal, (10,), n_iter=200, dtype=torch.complex128)
    assert abs(est - ref) / ref < 1e-6
    est_op = power_iteration(A.N, (10,), n_iter=200, dtype=torch.complex128, seed=3)  # LinearOperator
    assert abs(est_op - ref) / ref < 1e-6


def test_power_iteration_complex64_operator():
    N = _hpd(8, dtype=torch.complex64, seed=15, cond=7.0)
    est = power_iteration(lambda v: N @ v, (8,), n_iter=100)
    assert abs(est - 7.0) / 7.0 < 1e-4
    with pytest.raises(ValueError, match="n_iter"):
        power_iteration(lambda v: v, (3,), n_iter=0)


# ------------------------------------------------------------------------------- FISTA

def _lasso(seed=16):
    A = randc((30, 40), dtype=torch.complex128, seed=seed) / 6.0
    x_true = torch.zeros(40, dtype=torch.complex128)
    x_true[[3, 11, 27]] = torch.tensor([1.0 + 1j, -2.0, 0.5j], dtype=torch.complex128)
    y = A @ x_true + 0.01 * randc((30,), dtype=torch.complex128, seed=seed + 1)
    lam = 0.05
    L = float(torch.linalg.eigvalsh(A.conj().T @ A)[-1])
    return A, y, lam, L


def _lasso_obj(A, y, lam, x):
    return float(0.5 * torch.linalg.vector_norm(A @ x - y) ** 2 + lam * x.abs().sum())


def test_fista_matches_long_ista_lasso():
    A, y, lam, L = _lasso()
    grad = lambda x: A.conj().T @ (A @ x - y)  # noqa: E731
    prox = lambda v, s: soft_threshold(v, lam * s)  # noqa: E731
    x0 = torch.zeros(40, dtype=torch.complex128)
    ref, ref_info = fista(grad, prox, x0, 1.0 / L, max_iter=20000, tol=1e-13, momentum=False)
    x, info = fista(grad, prox, x0, 1.0 / L, max_iter=2000, tol=1e-10)
    assert info.converged and info.iterations < 2000
    assert _rel(x, ref) < 1e-5
    assert _lasso_obj(A, y, lam, x) <= _lasso_obj(A, y, lam, ref) + 1e-9
    # momentum pays off: ISTA needs far more iterations for the same tolerance
    _, ista = fista(grad, prox, x0, 1.0 / L, max_iter=20000, tol=1e-10, momentum=False)
    assert ista.iterations > 2 * info.iterations
    # the solution is sparse on the right support
    assert set(torch.nonzero(x.abs() > 1e-3).flatten().tolist()) == {3, 11, 27}


def test_fista_restart_and_plain_both_converge():
    A, y, lam, L = _lasso(seed=20)
    grad = lambda x: A.conj().T @ (A @ x - y)  # noqa: E731
    prox = lambda v, s: soft_threshold(v, lam * s)  # noqa: E731
    x0 = torch.zeros(40, dtype=torch.complex128)
    x1, i1 = fista(grad, prox, x0, 1.0 / L, max_iter=5000, tol=1e-10, restart=True)
    x2, i2 = fista(grad, prox, x0, 1.0 / L, max_iter=5000, tol=1e-10, restart=False)
    assert i1.converged and i2.converged and i1.restarts > 0 and i2.restarts == 0
    assert _rel(x1, x2) < 1e-5
    with pytest.raises(ValueError, match="step"):
        fista(grad, prox, x0, 0.0)


# ------------------------------------------------------------------------------- nonlinear CG

@pytest.mark.parametrize("rule", ["fr", "pr"])
def test_nonlinear_cg_quadratic(rule):
    N = _hpd(20, seed=21, cond=20.0)
    b = randc((20,), dtype=torch.complex128, seed=22)

    def fg(x):
        Nx = N @ x
        return 0.5 * torch.real(torch.vdot(x, Nx)) - torch.real(torch.vdot(b, x)), Nx - b

    x, info = nonlinear_cg(fg, torch.zeros(20, dtype=torch.complex128), max_iter=500, tol=1e-12,
                           beta_rule=rule, restart_every=50)
    assert _rel(x, torch.linalg.solve(N, b)) < 1e-5
    obj = info.extra["objective"]
    assert all(obj[i + 1] <= obj[i] + 1e-12 for i in range(len(obj) - 1))  # monotone decrease


def test_nonlinear_cg_smooth_l1():
    A = randc((15, 10), dtype=torch.complex128, seed=23)
    y = randc((15,), dtype=torch.complex128, seed=24)
    mu, eps = 0.3, 1e-3

    def fg(x):
        r = A @ x - y
        s = torch.sqrt(x.abs() ** 2 + eps)
        return 0.5 * torch.linalg.vector_norm(r) ** 2 + mu * s.sum(), A.conj().T @ r + mu * x / s

    x, info = nonlinear_cg(fg, torch.zeros(10, dtype=torch.complex128), max_iter=1000, tol=1e-14,
                           line_search=(0.01, 0.6, 150))
    g = fg(x)[1]
    g0 = fg(torch.zeros_like(x))[1]
    assert float(torch.linalg.vector_norm(g)) < 1e-5 * float(torch.linalg.vector_norm(g0))
    # the hand-written gradient is torch's convention (sanity of the test function itself)
    xr = randc((10,), dtype=torch.complex128, seed=25).requires_grad_(True)
    (ga,) = torch.autograd.grad(fg(xr)[0], xr)
    assert _rel(ga, fg(xr.detach())[1]) < 1e-10
    with pytest.raises(ValueError, match="beta"):
        LineSearch(beta=1.5)
    with pytest.raises(ValueError, match="beta_rule"):
        nonlinear_cg(fg, x, beta_rule="hs")


def test_nonlinear_cg_quadratic_part():
    # q(x) = Re⟨x, Nx⟩ − 2Re⟨x, b⟩ is minimised at N x = b; given as `quadratic` it needs no fun_and_grad
    N = _hpd(20, seed=28, cond=20.0)
    b = randc((20,), dtype=torch.complex128, seed=29)
    calls = []

    def normal(v):
        calls.append(1)
        return N @ v

    x, info = nonlinear_cg(None, torch.zeros(20, dtype=torch.complex128), max_iter=300, tol=1e-12,
                           quadratic=(normal, b), restart_every=50)
    assert _rel(x, torch.linalg.solve(N, b)) < 1e-5
    assert len(calls) == info.iterations + 1 + (not info.converged)  # one N per iteration (+ the start)
    obj = info.extra["objective"]
    ref = float(torch.real(torch.vdot(x, N @ x)) - 2 * torch.real(torch.vdot(x, b)))
    assert abs(obj[-1] - ref) < 1e-9 * abs(ref)  # tracked objective is the true q(x)
    assert all(obj[i + 1] <= obj[i] + 1e-12 for i in range(len(obj) - 1))
    assert len(info.extra["trial_step"]) == info.iterations
    with pytest.raises(ValueError, match="nothing to minimise"):
        nonlinear_cg(None, b)
    with pytest.raises(ValueError, match="shape"):
        nonlinear_cg(None, b, quadratic=(normal, b[:3]))


def test_nonlinear_cg_quadratic_plus_smooth_equals_folded_objective():
    # ‖Ax − y‖² + μ Σ √(|x|² + ε): the quadratic given separately or folded into fun_and_grad
    A = randc((15, 10), dtype=torch.complex128, seed=30)
    y = randc((15,), dtype=torch.complex128, seed=31)
    mu, eps = 0.3, 1e-3
    N, b = A.conj().T @ A, A.conj().T @ y

    def smooth(x):
        s = torch.sqrt(x.abs() ** 2 + eps)
        return mu * float(s.sum()), mu * x / s

    def folded(x):
        r = A @ x - y
        sv, sg = smooth(x)
        return float(torch.linalg.vector_norm(r) ** 2) + sv, 2.0 * (A.conj().T @ r) + sg

    x0 = torch.zeros(10, dtype=torch.complex128)
    xq, iq = nonlinear_cg(smooth, x0, max_iter=400, tol=1e-13, quadratic=(lambda v: N @ v, b))
    xf, i_f = nonlinear_cg(folded, x0, max_iter=400, tol=1e-13)
    assert _rel(xq, xf) < 1e-6
    g_end, g_start = folded(xq)[1], folded(x0)[1]
    assert float(torch.linalg.vector_norm(g_end)) < 1e-5 * float(torch.linalg.vector_norm(g_start))
