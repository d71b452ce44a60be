"""Tests for recon_core.solvers.admm_l1 (ADMM for a quadratic data term + λ‖Dx‖₁, as bart pics -R T)."""

from __future__ import annotations

import pytest
import torch

from recon_core.priors import temporal_tv_op
from recon_core.solvers import admm_l1
from tests.helpers import randc


def _problem(seed: int = 0, shape=(6, 5, 4)):
    """A small temporal-TV problem: A = random complex matrix (over-determined), x piecewise constant in t."""
    g = torch.Generator().manual_seed(seed)
    n = int(torch.tensor(shape).prod())
    A = randc((2 * n, n), dtype=torch.complex128, seed=seed) / n ** 0.5
    x_true = torch.zeros(shape, dtype=torch.complex128)
    x_true[: shape[0] // 2] = randc(shape[1:], dtype=torch.complex128, seed=seed + 1)
    x_true[shape[0] // 2:] = randc(shape[1:], dtype=torch.complex128, seed=seed + 2)
    y = A @ x_true.reshape(-1) + 0.05 * torch.randn(2 * n, generator=g, dtype=torch.complex128)
    N = A.conj().T @ A

    def normal(v):
        return (N @ v.reshape(-1)).reshape(shape)

    rhs = (A.conj().T @ y).reshape(shape)
    return A, y, normal, rhs, x_true


def _objective(A, y, D, lam, x) -> float:
    r = A @ x.reshape(-1) - y
    return float(0.5 * torch.sum(r.abs() ** 2) + lam * D(x).abs().sum())


def test_admm_reaches_the_kkt_point():
    """A long run ends at the minimiser: no small step in 20 random directions lowers the objective."""
    A, y, normal, rhs, _ = _problem()
    D = temporal_tv_op(tuple(rhs.shape))
    lam = 0.05
    x, info = admm_l1(normal, rhs, D, lam, torch.zeros_like(rhs), rho=1.0, max_iter=3000, cg_iters=30,
                      cg_tol=1e-12, rel_tol=1e-9, balance=None)
    # optimality of a convex objective: no small move in any direction lowers it
    f0 = _objective(A, y, D, lam, x)
    g = torch.Generator().manual_seed(5)
    for _ in range(20):
        d = torch.randn(rhs.shape, generator=g, dtype=torch.complex128)
        d = 1e-4 * d / torch.linalg.vector_norm(d)
        assert _objective(A, y, D, lam, x + d) >= f0 - 1e-9
    assert len(info.history) == info.iterations


def test_admm_matches_a_long_run_and_balancing_helps():
    """Default settings (residual balancing, over-relaxation) reach the objective of a 3000-iteration run
    within 1e-4 (relative) in far fewer iterations, and converge by the relative-residual rule."""
    A, y, normal, rhs, x_true = _problem(seed=3)
    D = temporal_tv_op(tuple(rhs.shape))
    lam = 0.05
    ref, _ = admm_l1(normal, rhs, D, lam, torch.zeros_like(rhs), rho=1.0, max_iter=3000, cg_iters=30,
                     cg_tol=1e-12, rel_tol=0.0, balance=None)
    f_ref = _objective(A, y, D, lam, ref)
    x, info = admm_l1(normal, rhs, D, lam, torch.zeros_like(rhs), rho=100.0, max_iter=400, cg_iters=10,
                      cg_tol=1e-8, rel_tol=1e-5)
    assert info.converged and info.iterations < 400
    assert abs(_objective(A, y, D, lam, x) - f_ref) / f_ref < 1e-4
    assert len(set(info.extra["rho"])) > 1          # ρ = 100 is far off: balancing changed it
    # the TV prior helps here: closer to the piecewise-constant truth than least squares
    x_ls = torch.linalg.solve(A.conj().T @ A, (A.conj().T @ y)).reshape(rhs.shape)
    assert torch.linalg.vector_norm(x - x_true) < torch.linalg.vector_norm(x_ls - x_true)


def test_admm_budget_callback_and_errors():
    A, y, normal, rhs, _ = _problem(seed=1)
    D = temporal_tv_op(tuple(rhs.shape))
    x, info = admm_l1(normal, rhs, D, 0.05, torch.zeros_like(rhs), rho=1.0, max_iter=100, cg_iters=4,
                      rel_tol=0.0, max_cg_total=12)
    assert sum(info.extra["cg_iters"]) >= 12 and info.iterations <= 3
    calls = []
    x, info = admm_l1(normal, rhs, D, 0.05, torch.zeros_like(rhs), rho=1.0, max_iter=50,
                      callback=lambda it, _x, rel: calls.append(it) or it == 2)
    assert calls == [1, 2] and info.iterations == 2
    with pytest.raises(ValueError):
        admm_l1(normal, rhs, D, 0.05, torch.zeros_like(rhs), rho=0.0)
    with pytest.raises(ValueError):
        admm_l1(normal, rhs, D, -1.0, torch.zeros_like(rhs), rho=1.0)
    with pytest.raises(ValueError):
        admm_l1(normal, rhs, D, 0.05, torch.zeros_like(rhs), rho=1.0, alpha=2.5)
    with pytest.raises(TypeError):
        admm_l1(normal, rhs, lambda v: v, 0.05, torch.zeros_like(rhs), rho=1.0)


def test_admm_scale_equivariance():
    """y → c·y with λ → c·λ gives x → c·x (what makes a noise-tied λ transfer across data scales)."""
    A, y, normal, rhs, _ = _problem(seed=2)
    D = temporal_tv_op(tuple(rhs.shape))
    x1, _ = admm_l1(normal, rhs, D, 0.05, torch.zeros_like(rhs), rho=1.0, max_iter=30)
    for c in (10.0, 0.1):
        xc, _ = admm_l1(normal, c * rhs, D, 0.05 * c, torch.zeros_like(rhs), rho=1.0, max_iter=30)
        assert float(torch.linalg.vector_norm(xc - c * x1) / torch.linalg.vector_norm(c * x1)) < 1e-6
