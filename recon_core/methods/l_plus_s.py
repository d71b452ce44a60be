"""Low-rank plus sparse (L+S) dynamic reconstruction (Otazo, Candès & Sodickson 2015).

Model: the series ``M = L + S`` with ``L`` low rank (its Casorati matrix, pixels × frames) and
``S`` sparse in a temporal transform ``T``:

    min_{L,S}  ½‖W^½(E(L + S) − d)‖²  +  λ_L‖L‖_*  +  λ_S‖T S‖₁

Iteration (as described in the paper's algorithm and BRIEFS §6), from ``M₀ = x_ref``, ``S₀ = 0``,
``L₋₁ = M₀``:

1. ``L = SVT_{λ_L}(M − S)`` (soft threshold of the singular values of the Casorati matrix);
2. ``S = Tᴴ soft_{λ_S}(T(M − L_prev))``, with ``T`` the unitary temporal FFT (default) or, with
   ``sparsity="temporal_tv"``, ``S = prox_{λ_S TV_t}(M − L_prev)`` (temporal total variation,
   :func:`recon_core.priors.temporal_tv_prox`: projected gradient on the dual, warm-started, as in
   the radial DCE variant);
3. ``M = L + S − t·Eᴴ(E(L + S) − d)`` with ``t = 1/‖W^½E‖²`` (power iteration; ``t ≈ 1`` for
   Cartesian SENSE with unit-RSS maps, so this is the paper's step there);
4. stop when ``‖M − M_prev‖ < tol·‖M_prev‖`` or after ``max_iter`` iterations. The output is ``L + S``.

Threshold convention (logged here as BRIEFS §6 asks): **fixed absolute thresholds set from the data
once**, convention (b) for the low-rank part — ``λ_L = lam_l · σ₁`` with ``σ₁`` the largest
singular value of the Casorati matrix of ``x_ref`` — and, for the sparse part, a fraction of the
largest temporal-transform coefficient, ``λ_S = lam_s · max|T x_ref|`` (for ``temporal_tv``:
``lam_s · max|x_ref|``), as in the radial DCE example of the Otazo/Moore code. A fraction of
``max|T x_ref|`` keeps the same meaning across matrix sizes, which ``lam_s·σ₁`` would not.
``x_ref = α·Eᴴd`` is the least-squares-scaled adjoint (see :mod:`recon_core.methods.l1_wavelet`); for
Cartesian SENSE ``α ≈ 1`` so this is ``Eᴴd`` of the paper.

Non-Cartesian data use the DCF-weighted data term by default (``W = DCF``, as in the torchkbnufft
port of the radial example; the Toeplitz normal operator is used for ``EᴴE``). Defaults
(``lam_l = 0.005``, ``lam_s = 0.002``, 50 iterations, tol 0.0025 — the paper's tolerance) are our tuning
on the project's cardiac phantom: at 128², 16 frames, 12 coils with estimated ESPIRiT maps they beat
CG-SENSE by ≥ 5.8 dB on golden-angle radial 13/21 spokes, Cartesian VD R = 8 and spiral 4/32
(the earlier 0.02/0.01 over-smoothed and biased the intensity, losing to CG-SENSE on radial).

References
----------
Otazo R, Candès E, Sodickson DK. Low-rank plus sparse matrix decomposition for accelerated dynamic
MRI with separation of background and dynamic components. Magn Reson Med 2015;73:1125–1136.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from recon_core.methods.base import MethodParams, ProgressCallback, ReconMethod, ReconProblem
from recon_core.methods.data_term import casorati_sigma_max, prepare_data_term, relative_change
from recon_core.priors import TemporalFFT, soft_threshold, svt, temporal_tv_prox

Tensor = torch.Tensor

__all__ = ["LPlusSParams", "LPlusS"]


@dataclass
class LPlusSParams(MethodParams):
    """Parameters of :class:`LPlusS`.

    Attributes
    ----------
    lam_l
        Singular-value threshold as a fraction of σ₁(Casorati(x_ref)) (fixed for the run).
    lam_s
        Sparse threshold as a fraction of ``max|T x_ref|`` (``max|x_ref|`` for temporal TV).
    sparsity
        ``"temporal_fft"`` (the cine model) or ``"temporal_tv"`` (the DCE variant).
    max_iter, tol
        Stop when ``‖ΔM‖ < tol·‖M‖`` (paper: 0.0025) or after ``max_iter`` iterations.
    density_weighting
        DCF-weighted data term for non-Cartesian data.
    tv_iters
        Dual iterations of the temporal-TV prox (warm-started across outer iterations).
    """

    lam_l: float = 0.005
    lam_s: float = 0.002
    sparsity: Literal["temporal_fft", "temporal_tv"] = "temporal_fft"
    max_iter: int = 50
    tol: float = 0.0025
    density_weighting: bool = True
    tv_iters: int = 20


class LPlusS(ReconMethod[LPlusSParams]):
    """Low-rank + sparse reconstruction (Otazo 2015) for 2-D+time data on any encoding operator.

    Presets
    -------
    ``paper`` = ``fast`` = at most 50 iterations, tol 0.0025: 30 iterations lost 1.2 dB (Cartesian
    19.71 → 18.53 dB) and 2.8 dB (radial 30.13 → 27.29 dB) at 32²; at 64² 35 iterations or tol 0.005
    lost 2.1 dB on Cartesian (26.57 → 24.49 dB; radial 38.09 → 38.09 / 37.28 dB) — all more than the
    0.5 dB allowed (paper time: 0.33 / 0.49 s at 32², 2.5 / 4.2 s at 64²).
    Cases, metric and command: "Presets" in :mod:`recon_core.methods.data_term`.

    References
    ----------
    Otazo R, Candès E, Sodickson DK. Magn Reson Med 2015;73:1125–1136.
    """

    name = "l_plus_s"
    Params = LPlusSParams
    quick_params = {"max_iter": 3, "tv_iters": 3}
    #: fast = paper (fewer iterations cost > 0.5 dB; see the class docstring).
    presets = {"fast": {}}

    def reconstruct(self, problem: ReconProblem, progress: ProgressCallback | None = None) -> Tensor:
        """Return complex64 images ``[F, Ny, Nx]`` (``L + S``) on the problem's device."""
        p = self.params
        if p.lam_l < 0 or p.lam_s < 0:
            raise ValueError(f"{self.name}: lam_l and lam_s must be >= 0, got {p.lam_l}, {p.lam_s}")
        if p.sparsity not in ("temporal_fft", "temporal_tv"):
            raise ValueError(f"{self.name}: sparsity must be 'temporal_fft' or 'temporal_tv', "
                             f"got {p.sparsity!r}")
        dt = prepare_data_term(problem, p.density_weighting)
        op, rhs = dt.op, dt.rhs
        step = 1.0 / dt.lipschitz
        x_ref = dt.x_ref
        T = TemporalFFT(tuple(x_ref.shape))
        thr_l = p.lam_l * casorati_sigma_max(x_ref)
        if p.sparsity == "temporal_fft":
            thr_s = p.lam_s * float(T(x_ref).abs().max())
        else:
            thr_s = p.lam_s * float(x_ref.abs().max())

        M = x_ref.clone()
        S = torch.zeros_like(M)
        L_prev = M.clone()
        dual: Tensor | None = None
        for it in range(1, p.max_iter + 1):
            L, _ = svt(M - S, thr_l)
            if p.sparsity == "temporal_fft":
                S = T.adjoint(soft_threshold(T(M - L_prev), thr_s))
            else:
                S, dual = temporal_tv_prox(M - L_prev, thr_s, p.tv_iters, dual)
            X = L + S
            M_new = X - step * (op.normal(X) - rhs)
            rel = relative_change(M_new, M)
            M = M_new
            L_prev = L
            self._report(progress, it, p.max_iter, "l+s", rel_change=rel)
            if rel < p.tol or self.out_of_time(it, p.max_iter):
                break
        return (L + S).to(torch.complex64)
