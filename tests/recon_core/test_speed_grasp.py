"""The speed levers of grasp's ADMM: the exact temporal DCT preconditioner, AᴴAx carried through CG, and
coil compression.

* ``temporal_dct_preconditioner`` inverts ``aI + ρD_tᴴD_t`` exactly (Neumann differences);
* ``admm_l1`` spends exactly ``cg_iters`` normal-operator applications per x-update (the initial
  residual is free) and, with the preconditioner, reaches the same minimiser;
* ``compress_coils`` keeps the stated energy with orthonormal rows, and grasp with its default
  compression stays within 0.3 dB of the uncompressed reconstruction on a radial problem;
* ``prepare_data_term(power_start="rhs")`` gives ``L`` within 15 % of a long power iteration (as
  the random 8-step start does) and reuses its first step for ``AᴴA x_ref``.
"""

from __future__ import annotations

import pytest
import torch

from recon_core.methods import make_method
from recon_core.methods.data_term import compress_coils, prepare_data_term
from recon_core.metrics import psnr, scale_to_reference
from recon_core.priors import temporal_tv_op
from recon_core.solvers import admm_l1, power_iteration, temporal_dct_preconditioner
from tests.helpers import prewhitened_radial_problem


@pytest.fixture(scope="module", autouse=True)
def _threads():
    torch.set_num_threads(1)


def _radial(n_coils: int = 12, n_frames: int = 6, n: int = 48):
    return prewhitened_radial_problem(n, n_frames, n_coils, seed=5)


def _psnr(x, gt, support) -> float:
    g = gt.abs()
    return float(psnr(scale_to_reference(x.abs(), g, support), g))


@pytest.mark.parametrize("F", [1, 2, 7, 16])
def test_dct_preconditioner_is_the_exact_inverse(F):
    g = torch.Generator().manual_seed(F)
    x = torch.complex(torch.randn(F, 5, 3, generator=g), torch.randn(F, 5, 3, generator=g))
    D = temporal_tv_op(tuple(x.shape))
    a, rho = 0.7, 2.5
    P = temporal_dct_preconditioner(F, a)
    y = a * x + rho * D.adjoint(D(x))
    assert torch.allclose(P(y, rho), x, atol=1e-5)
    # self-adjoint and positive
    v = torch.complex(torch.randn(F, 5, 3, generator=g), torch.randn(F, 5, 3, generator=g))
    lhs = torch.vdot(v.flatten(), P(x, rho).flatten())
    rhs = torch.vdot(P(v, rho).flatten(), x.flatten())
    assert abs(complex(lhs - rhs)) < 1e-5 * abs(complex(lhs))
    assert float(torch.vdot(x.flatten(), P(x, rho).flatten()).real) > 0


def _small_problem():
    g = torch.Generator().manual_seed(0)
    F, n = 6, 12
    A = torch.randn(F * n, F * n, generator=g) / (F * n) ** 0.5
    AhA = (A.T @ A + 0.05 * torch.eye(F * n)).to(torch.complex64)
    xt = torch.cumsum(torch.randn(F, n, 1, generator=g) * (torch.rand(F, n, 1, generator=g) > 0.7), 0)
    xt = xt.to(torch.complex64)
    calls = {"n": 0}

    def normal(v):
        calls["n"] += 1
        return (AhA @ v.reshape(-1)).reshape(v.shape)

    noise = torch.complex(torch.randn(F, n, 1, generator=g), torch.randn(F, n, 1, generator=g))
    rhs = normal(xt) + 0.01 * noise
    calls["n"] = 0
    return normal, rhs, temporal_tv_op((F, n, 1)), calls


def test_admm_spends_cg_iters_normal_applications_per_iteration():
    normal, rhs, D, calls = _small_problem()
    x0 = torch.zeros_like(rhs)
    _x, info = admm_l1(normal, rhs, D, 0.05, x0, rho=0.5, max_iter=7, cg_iters=3, cg_tol=0.0, rel_tol=0.0,
                       normal_x0=torch.zeros_like(rhs))
    assert info.iterations == 7
    assert calls["n"] == 7 * 3
    calls["n"] = 0
    admm_l1(normal, rhs, D, 0.05, x0, rho=0.5, max_iter=7, cg_iters=3, cg_tol=0.0, rel_tol=0.0)
    assert calls["n"] == 7 * 3 + 1          # AᴴAx₀ once when not given


def _objective(normal, rhs, D, lam, x):
    # ½‖Ax − y‖² up to a constant: ½⟨x, AᴴAx⟩ − Re⟨Aᴴy, x⟩
    return float(0.5 * torch.vdot(x.flatten(), normal(x).flatten()).real
                 - torch.vdot(rhs.flatten(), x.flatten()).real + lam * D(x).abs().sum())


def test_preconditioned_admm_reaches_the_same_minimiser():
    normal, rhs, D, _calls = _small_problem()
    lam = 0.05
    x0 = torch.zeros_like(rhs)
    ref, _ = admm_l1(normal, rhs, D, lam, x0, rho=0.5, max_iter=400, cg_iters=20, cg_tol=1e-7, rel_tol=0.0)
    P = temporal_dct_preconditioner(rhs.shape[0], 1.0)
    xp, _ = admm_l1(normal, rhs, D, lam, x0, rho=0.5, max_iter=400, cg_iters=20, cg_tol=1e-7, rel_tol=0.0,
                    precond=P)
    f_ref, f_p = _objective(normal, rhs, D, lam, ref), _objective(normal, rhs, D, lam, xp)
    assert abs(f_p - f_ref) < 1e-4 * abs(f_ref)
    assert float(torch.linalg.vector_norm(xp - ref) / torch.linalg.vector_norm(ref)) < 1e-2


def test_compress_coils_keeps_energy_with_orthonormal_rows():
    p, _gt, _sup = _radial(n_coils=12, n_frames=4, n=32)
    q, v = compress_coils(p, energy=0.995)
    assert 1 <= v < 12 and q.n_coils == v and q.coil_maps.shape[0] == v
    kept = float(q.kspace.abs().pow(2).sum() / p.kspace.abs().pow(2).sum())
    assert 0.995 <= kept <= 1.0 + 1e-6
    # the compressed operator is the original one followed by U: ‖E'x‖ ≤ ‖Ex‖ for any x
    x = torch.randn(4, 32, 32, dtype=torch.complex64)
    assert float(q.operator(x).abs().pow(2).sum()) <= float(p.operator(x).abs().pow(2).sum()) * (1 + 1e-5)
    same, c = compress_coils(p, n_virtual=12)
    assert same is p and c == 12


def test_power_iteration_from_rhs_matches_a_long_one():
    p, _gt, _sup = _radial(n_coils=6, n_frames=4, n=32)
    dt = prepare_data_term(p, True, power_iters=8, power_start="rhs")
    ref = power_iteration(dt.op.normal, tuple(dt.rhs.shape), n_iter=60, seed=1)
    rand8 = power_iteration(dt.op.normal, tuple(dt.rhs.shape), n_iter=8, seed=0)
    # measured: 1.68 (from rhs, 8 steps), 1.77 (random start, 8 steps), 1.91 (60 steps)
    assert dt.lipschitz <= ref * 1.001
    assert dt.lipschitz >= 0.85 * ref
    assert dt.lipschitz >= 0.9 * rand8
    n_ref = dt.op.normal(dt.x_ref)
    assert torch.allclose(dt.normal_x_ref, n_ref, rtol=1e-4, atol=1e-4 * float(n_ref.abs().max()))


def test_grasp_default_compression_costs_under_0p3_db():
    p, gt, sup = _radial()
    kw = {"admm_iters": 10}
    full = make_method("grasp", coil_compress=0.0, **kw)
    comp = make_method("grasp", **kw)
    v_full = _psnr(full.reconstruct(p), gt, sup)
    v_comp = _psnr(comp.reconstruct(p), gt, sup)
    cg = _psnr(make_method("cg_sense", max_iter=30).reconstruct(p), gt, sup)
    assert comp.virtual_coils < p.n_coils
    assert v_comp > v_full - 0.3, f"compressed to {comp.virtual_coils}: {v_comp:.2f} vs {v_full:.2f} dB"
    assert v_comp > cg + 8.0
