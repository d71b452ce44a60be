"""Our ADMM against ``bart pics`` ADMM on the same small radial temporal-TV problem (skipped without BART).

Problem: ``simulate_scan`` golden-angle radial 32², 6 frames, 4 coils, 6 spokes per frame, 1 % noise,
true coil maps, unweighted data term: ``½‖E x − y‖² + λ‖D_t x‖₁``. BART runs ``pics -m -w 1 -u 0.5
-C 10 -i K -R T:1024:0:λ`` (``-w 1``: no data scaling, so λ means the same; no ``-S``); its NUFFT is
``s ×`` ours (measured with :meth:`bench.bart.BartSession.nufft_scale`), so its image is rescaled by
``s`` and its λ by ``|s|``. One function computes the objective of both outputs with our operator.
Our ADMM gets the same budget of normal-operator applications (BART's ``-i`` counts CG iterations
across the ADMM loop) and BART's ρ, CG steps, over-relaxation and start (zero); ours balances ρ.
Measured at the time of writing (objective from 1678.8 at x = 0): 30 iterations ours 4.866, BART 4.794
(+1.5 %); 100 iterations ours 1.290, BART 1.317 (−2.1 %).
"""

from __future__ import annotations

import pytest
import torch

from bench import bart as B
from recon_core.methods import make_problem
from recon_core.phantoms import simulate_scan
from recon_core.priors import temporal_tv_op
from recon_core.solvers import admm_l1

pytestmark = pytest.mark.skipif(not B.bart_available(), reason="bart not on PATH")

N, F, C = 32, 6, 4


def _objective(problem, x, lam: float) -> float:
    r = problem.operator(x) - problem.kspace
    D = temporal_tv_op(tuple(x.shape))
    return float(0.5 * torch.sum(r.abs().double() ** 2) + lam * torch.sum(D(x).abs().double()))


@pytest.mark.parametrize("iters", [30, 100])
def test_same_objective_as_bart_pics_admm(iters):
    torch.set_num_threads(1)
    s = simulate_scan("radial", matrix=N, n_frames=F, n_coils=C, spokes_per_frame=6, noise_std=0.01, seed=2)
    p = make_problem(s.kspace, s.coil_maps, trajectory=s.trajectory, nufft_backend="finufft")
    x_adj = p.operator.adjoint(p.kspace)
    lam = 0.02 * float(x_adj.abs().max())
    with B.BartSession(threads=1) as sess:
        from recon_core.operators import Nufft

        ours_nufft = Nufft(s.trajectory, (N, N))(s.ground_truth[:, None])[:, 0]
        scale, err = sess.nufft_scale(s.ground_truth, s.trajectory, ours_nufft)
        assert err < 0.05
        xb, _ = sess.pics(p.kspace, s.coil_maps, ("-m", "-w", "1", "-u", "0.5", "-C", "10",
                                                  "-R", f"T:1024:0:{lam * abs(scale):.8g}"),
                          traj=s.trajectory, iters=iters, tag="admm", rescale=False)
    xb = xb * complex(scale)
    x, info = admm_l1(p.operator.normal, x_adj, temporal_tv_op((F, N, N)), lam, torch.zeros_like(x_adj),
                      rho=0.5, max_iter=iters, cg_iters=10, rel_tol=0.0, max_cg_total=iters)
    f_ours, f_bart = _objective(p, x, lam), _objective(p, xb, lam)
    f0 = _objective(p, torch.zeros_like(x), lam)
    assert f_ours < f0 and f_bart < f0
    assert f_ours <= 1.05 * f_bart, f"ours {f_ours:.6g} vs BART {f_bart:.6g} ({iters} iterations)"
