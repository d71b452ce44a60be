"""GRASP-style reconstruction: temporal total variation with a (density-weighted) SENSE data term.

Solves (Feng et al. 2014)

    min_x  ½‖W^½(E x − y)‖²  +  λ Σ_t |x[t+1] − x[t]|

``W`` is the density compensation for non-Cartesian data (as in GRASP; ``density_weighting=False``
gives the unweighted SENSE term) and the identity for Cartesian data. Two solvers:

* ``solver="admm"`` (default): :func:`recon_core.solvers.admm_l1`, the algorithm ``bart pics -R T``
  uses — split ``z = D_t x``, x-update by CG on the (Toeplitz) normal operator plus ``ρD_tᴴD_t``
  warm-started, soft-threshold z-update, scaled multiplier, over-relaxation 1.6, residual-balancing
  ρ and a stop on the relative primal/dual residuals or on the relative change of the image
  (``x_tol``). ``ρ = rho·L`` with ``L = ‖W^½E‖²``. The x-update's CG is preconditioned by
  ``(aI + ρD_tᴴD_t)⁻¹``, exact by a DCT along the frames (``precond="dct"``), and carries ``AᴴA x``
  along, so each CG step costs one normal-operator application.
* ``solver="ncg"``: the paper's solver, nonlinear conjugate gradients (Fletcher–Reeves) on the
  smoothed TV ``√(|x[t+1] − x[t]|² + ε)`` with a backtracking Armijo line search (α = 0.01,
  β = 0.6, ≤ 150 steps, ε = 1e-15 — the settings of the GRASP demonstration code as summarised in
  BRIEFS §6), restarted in ``rounds`` rounds of ``iters_per_round`` iterations (3 × 8); the data
  term is exact along each search direction (one normal-operator application per iteration).

Before either solver the data and maps are SVD-compressed to the virtual coils that keep
``coil_compress`` (0.99) of the k-space energy (:func:`recon_core.methods.data_term.compress_coils`):
the normal operator's cost is proportional to the coils; on the validation family 8–16 coils compress
to 4–6 (rad_b 12 → 5, cart_c 16 → 6, spir_b 14 → 4).

The start point is ``x_ref``, the least-squares-scaled gridding image
(:mod:`recon_core.methods.data_term`). ADMM is the default because on the validation family
(``python -m bench.validation``) it reached higher PSNR per second than ``ncg`` (numbers in the
README section "Validation family").

λ that means the same on any data
---------------------------------
``λ = lam · σ · √(2L)`` with ``σ`` the k-space noise standard deviation per real/imaginary part and
``L = ‖W^½E‖²`` (power iteration). σ = 1 for prewhitened data (the noise gadget ran;
``problem.extra["prewhitened"]``), else it is estimated from the data
(:func:`recon_core.methods.data_term.noise_sigma`).

Derivation. At the true image ``x*`` the optimality condition is
``0 ∈ (W^½E)ᴴ(W^½E x − W^½y) + λ D_tᴴ ∂‖·‖₁(D_t x)`` and the first term is ``−(W^½E)ᴴ W^½ n``, noise.
Along a unit image direction ``v`` its standard deviation is ``σ·√2·‖W^½E v‖`` (complex noise of
variance 2σ²); for the best-encoded directions (‖W^½E v‖² = L, e.g. a fully sampled k-space
centre) that is ``σ√(2L)``. The ℓ1 subgradient is bounded by λ per difference, so ``λ ∝ σ√(2L)``
is the one weight that compares the same two things on any data:

* data scale ``y → c·y``: ``σ → c·σ`` (estimated; prewhitened data are in noise units by
  definition), ``L`` unchanged, ``λ → c·λ``, and the minimiser scales exactly, ``x → c·x``
  (``½c²‖·‖² + cλ·c‖·‖₁ = c²·(…)``);
* matrix size and frame count: both terms are sums over pixels and frames, orthonormal transforms
  keep ``L`` and the per-pixel noise independent of the number of pixels and frames, so the
  per-pixel balance does not change;
* coil count: unit-RSS coil maps keep ``L`` fixed while the image (in noise units after
  prewhitening) grows with the coils' SNR, so λ relative to the image falls as the SNR rises;
* acceleration: the curvature of the data term falls with the sampled fraction ``f`` while λ does
  not, so the shrinkage in image units (``λ``/curvature) grows like ``1/f`` — it covers the noise
  and the incoherent aliasing that undersampling adds. (The alternative ``λ ∝ RMS((W^½E)ᴴW^½n) ∝
  σ√f``, tried first, needed a 3× larger ``lam`` at 8 radial spokes than at 8 of 32 spiral
  interleaves on the validation family; with ``σ√(2L)`` the best ``lam`` was 0.7–1.5 on both.)

The earlier rule ``λ = lam·L·max|x₀|`` tied λ to the image's brightest pixel, not to the noise, and
was tuned on one phantom; ``lam = 1.5`` (default) is tuned on the validation family only.

References
----------
Feng L, Grimm R, Block KT, Chandarana H, Kim S, Xu J, Axel L, Sodickson DK, Otazo R. Golden-angle
radial sparse parallel MRI: combination of compressed sensing, parallel imaging, and golden-angle
radial sampling for fast and flexible dynamic volumetric MRI. Magn Reson Med 2014;72:707–717.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from recon_core.methods.base import MethodParams, ProgressCallback, ReconMethod, ReconProblem
from recon_core.methods.data_term import compress_coils, noise_sigma, prepare_data_term
from recon_core.priors import smoothed_tv, temporal_tv_op
from recon_core.solvers import LineSearch, admm_l1, nonlinear_cg, temporal_dct_preconditioner

Tensor = torch.Tensor

__all__ = ["GRASPParams", "GRASP"]


@dataclass
class GRASPParams(MethodParams):
    """Parameters of :class:`GRASP`.

    Attributes
    ----------
    lam
        λ in units of ``σ·√(2L)``, the noise level of the data-term gradient (see module docstring).
    solver
        ``"admm"`` (BART-like ADMM, default) or ``"ncg"`` (the paper's nonlinear CG).
    admm_iters, cg_iters, rho
        ADMM: at most ``admm_iters`` iterations (see ``x_tol``) of at most ``cg_iters`` CG steps,
        initial ``ρ = rho·L`` (then residual-balanced).
    rounds, iters_per_round
        ``ncg``: restarted rounds of nonlinear CG (GRASP: 3 × 8).
    tol
        ``admm``: stop when the relative primal and dual residuals are both below ``tol``;
        ``ncg``: stop when a round's relative change ``‖xₖ₊₁ − xₖ‖/‖xₖ₊₁‖`` falls below ``tol``.
    x_tol
        ``admm``: also stop when an iteration changes the image by less than ``x_tol`` (relative,
        ``‖xₖ₊₁ − xₖ‖/‖xₖ₊₁‖``); 0 disables it. The problems that converge fast stop early and the
        slow ones (high acceleration) use up to ``admm_iters``.
    eps
        TV smoothing (GRASP: 1e-15, relative here to ``max|x₀|²``).
    density_weighting
        ``W = DCF`` for non-Cartesian data (GRASP); False gives the unweighted SENSE term.
    coil_compress
        Fraction of the k-space energy kept by SVD coil compression of data and maps before the
        solve (:func:`recon_core.methods.data_term.compress_coils`; the cost of every normal-operator
        application is proportional to the coils); 0 or 1 = no compression.
    power_iters
        Power-iteration steps for ``L`` (started from ``Aᴴy``, whose first step is shared with ``x₀``).
    precond
        ``"none"`` or ``"dct"``: CG in the ADMM x-update preconditioned by ``(aI + ρD_tᴴD_t)⁻¹``,
        applied exactly by a DCT along the frames (``a`` = Rayleigh quotient of ``AᴴA`` at ``Aᴴy``).
    ls_alpha, ls_beta, ls_max
        Backtracking line-search settings (GRASP: 0.01, 0.6, 150).
    """

    lam: float = 1.5
    solver: Literal["admm", "ncg"] = "admm"
    admm_iters: int = 24
    cg_iters: int = 4
    rho: float = 0.03
    rounds: int = 3
    iters_per_round: int = 8
    tol: float = 1e-3
    x_tol: float = 0.01
    eps: float = 1e-15
    density_weighting: bool = True
    coil_compress: float = 0.99
    power_iters: int = 8
    precond: Literal["none", "dct"] = "dct"
    ls_alpha: float = 0.01
    ls_beta: float = 0.6
    ls_max: int = 150


class GRASP(ReconMethod[GRASPParams]):
    """Temporal-TV reconstruction (GRASP's model) by ADMM (default) or restarted nonlinear CG.

    Presets
    -------
    ``paper`` = ``fast`` (the dataclass defaults). The numbers below were measured for the ``ncg``
    solver with the earlier λ rule (``lam·L·max|x₀|``) and are kept as its record; the ADMM
    defaults (at most 24 × 4 DCT-preconditioned CG steps, stop at a relative change of 1 %,
    ``lam = 1.5``, coils compressed to 99 % energy) were set on the validation family
    (``bench.validation``; README "Classical methods against BART in half its time").
    ``ncg``: 3 rounds × 8 iterations: 2 rounds lost 0.79 dB on the 32² radial case
    (29.77 → 28.98 dB; Cartesian 19.40 → 19.17 dB; 0.41 → 0.27 s) and 1.74 dB at 64² (radial
    39.28 → 37.54 dB, Cartesian 24.75 → 24.12 dB; 4.8 → 3.7 s); 3 × 5 lost 0.49 / 0.62 dB at 32²;
    all beyond the 0.5 dB allowed.
    Cases, metric and command: "Presets" in :mod:`recon_core.methods.data_term`.

    References
    ----------
    Feng L, et al. Magn Reson Med 2014;72:707–717.
    """

    name = "grasp"
    Params = GRASPParams
    quick_params = {"rounds": 1, "iters_per_round": 2, "admm_iters": 2, "cg_iters": 2}
    #: fast = paper (fewer iterations cost > 0.5 dB; see the class docstring).
    presets = {"fast": {}}

    def reconstruct(self, problem: ReconProblem, progress: ProgressCallback | None = None) -> Tensor:
        """Return complex64 images ``[F, Ny, Nx]`` on the problem's device."""
        p = self.params
        if p.lam < 0:
            raise ValueError(f"{self.name}: lam must be >= 0, got {p.lam}")
        if p.solver not in ("admm", "ncg"):
            raise ValueError(f"{self.name}: solver must be 'admm' or 'ncg', got {p.solver!r}")
        if p.rounds < 1 or p.iters_per_round < 1 or p.admm_iters < 1 or p.cg_iters < 1:
            raise ValueError(f"{self.name}: rounds, iters_per_round, admm_iters and cg_iters must be >= 1")
        if p.rho <= 0:
            raise ValueError(f"{self.name}: rho must be > 0, got {p.rho}")
        if p.x_tol < 0:
            raise ValueError(f"{self.name}: x_tol must be >= 0, got {p.x_tol}")
        if not 0.0 <= p.coil_compress <= 1.0:
            raise ValueError(f"{self.name}: coil_compress must be in [0, 1], got {p.coil_compress}")
        if p.precond not in ("none", "dct"):
            raise ValueError(f"{self.name}: precond must be 'none' or 'dct', got {p.precond!r}")
        self.virtual_coils = problem.n_coils
        if 0.0 < p.coil_compress < 1.0:
            problem, self.virtual_coils = compress_coils(problem, energy=p.coil_compress)
        # L sets the scale of λ and ρ (ρ is balanced on the fly): 8 power steps give it within ~10 %
        dt = prepare_data_term(problem, p.density_weighting, power_iters=max(1, p.power_iters),
                               power_start="rhs")
        sigma, source = noise_sigma(problem)
        lam = p.lam * sigma * math.sqrt(2.0 * dt.lipschitz)
        self.last_lambda = (lam, sigma, source)
        if p.solver == "admm":
            return self._admm(dt, lam, progress)
        return self._ncg(dt, lam, progress)

    def _admm(self, dt, lam: float, progress: ProgressCallback | None) -> Tensor:
        p = self.params
        x = dt.x_ref.clone()
        if x.shape[0] < 2 or lam == 0:
            # no temporal term: plain (weighted) least squares by CG from x_ref
            from recon_core.solvers import conjugate_gradient

            # CG's iteration count is then the only regulariser: keep the 12 × cg_iters steps of the former
            # fixed ADMM budget (24 × 4 = 96 steps lost 2.8 dB to noise on test_static_frame's 32² case)
            x, _ = conjugate_gradient(dt.op.normal, dt.rhs, x0=x, max_iter=min(p.admm_iters, 12) * p.cg_iters,
                                      tol=1e-4)
            return x.to(torch.complex64)
        D = temporal_tv_op(tuple(x.shape))

        def callback(it: int, _x: Tensor, rel: float) -> bool:
            self._report(progress, it, p.admm_iters, "admm", rel_change=rel)
            self.admm_iterations = it
            return self.out_of_time(it, p.admm_iters) or rel < p.x_tol

        precond = None
        if p.precond == "dct":
            # a: the curvature of AᴴA along the start image (its Rayleigh quotient), its typical diagonal
            xx = float(torch.sum(dt.x_ref.abs() ** 2))
            a = float(torch.sum(torch.real(dt.x_ref.conj() * dt.normal_x_ref))) / xx if xx > 0 else 0.0
            a = a if math.isfinite(a) and a > 0 else dt.lipschitz
            precond = temporal_dct_preconditioner(x.shape[0], a, x.device)
        x, _info = admm_l1(dt.op.normal, dt.rhs, D, lam, x, rho=p.rho * dt.lipschitz, max_iter=p.admm_iters,
                           cg_iters=p.cg_iters, rel_tol=p.tol, callback=callback, normal_x0=dt.normal_x_ref,
                           precond=precond)
        return x.to(torch.complex64)

    def _ncg(self, dt, lam: float, progress: ProgressCallback | None) -> Tensor:
        p = self.params
        op, rhs = dt.op, dt.rhs
        x = dt.x_ref.clone()
        xmax = float(x.abs().max())
        eps = p.eps * max(xmax * xmax, 1e-30)
        use_tv = lam > 0 and x.shape[0] > 1
        # nonlinear_cg's quadratic is ‖W^½(Ex − y)‖² (no ½): the TV weight doubles to keep the objective's λ
        w_tv = 2.0 * lam

        def tv(v: Tensor) -> tuple[float, Tensor]:
            value, grad = smoothed_tv(v, dims=(0,), eps=eps)
            return w_tv * float(value), w_tv * grad

        t0 = 1.0 / dt.lipschitz
        total = p.rounds * p.iters_per_round
        done = 0
        for rnd in range(p.rounds):
            def callback(it: int, _x: Tensor, rel: float, offset: int = done,
                         stage: str = f"round {rnd + 1}/{p.rounds}") -> bool:
                self._report(progress, offset + it, total, stage, rel_change=rel)
                return self.out_of_time(offset + it, total)

            ls = LineSearch(alpha=p.ls_alpha, beta=p.ls_beta, max_ls=p.ls_max, t0=t0)
            x, info = nonlinear_cg(tv if use_tv else None, x, max_iter=p.iters_per_round, tol=p.tol,
                                   line_search=ls, callback=callback, quadratic=(op.normal, rhs))
            done += info.iterations
            if info.extra["trial_step"]:
                t0 = info.extra["trial_step"][-1]
            # converged, line search failed, or out of time: no further round
            if info.converged or info.iterations < p.iters_per_round or self.stopped_early:
                break
        return x.to(torch.complex64)
