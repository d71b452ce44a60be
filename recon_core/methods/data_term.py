"""Shared pieces of the classical methods (cg_sense, l1_wavelet, l_plus_s, kt_slr, grasp).

The (optionally density-weighted) least-squares data term with its Lipschitz constant and an
image-scale reference, so that regularisation weights can be given relative to the data.

Density compensation has one source: ``problem.dcf``, which the buffer gadget supplies and
:func:`~recon_core.methods.base.make_problem` fills in (``recon_core.trajectories.default_dcf``) for
non-Cartesian data. Methods never compute a DCF of their own; a non-Cartesian problem without one
is an error.

Presets
-------
Each classical method documents its ``paper`` and ``fast`` presets with numbers measured the same
way: the seeded phantoms of ``tests/recon_core/test_classical_methods.py`` (32², 8 frames, 4 coils,
noise 0.01: Cartesian VD R = 6 + 4 ACS lines; golden-angle radial 8 spokes/frame with Pipe–Menon
DCF) and the same at 64², 12 frames, 8 coils (8 ACS lines, 13 spokes); PSNR from
``recon_core.metrics.psnr`` against the ground truth; time = wall time of
``get_method(name)(preset="paper", **override).run(problem)`` with ``torch.set_num_threads(1)`` on
the shared 2-core development CPU (noisy). ``fast`` may cost at most 0.5 dB against ``paper`` on
any of these cases (checked by the tests on the 32² ones); otherwise it equals ``paper``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from recon_core.linop import LinearOperator
from recon_core.methods.base import ReconProblem
from recon_core.solvers import power_iteration

Tensor = torch.Tensor

__all__ = ["DataTerm", "density_weights", "weighted_encoding", "prepare_data_term", "casorati_sigma_max",
           "relative_change", "noise_sigma", "estimate_noise_sigma", "compress_coils"]


@dataclass
class DataTerm:
    """The (optionally density-weighted) least-squares data term of a :class:`ReconProblem`.

    Attributes
    ----------
    op
        Encoding operator ``W^½E`` (``E`` itself when unweighted).
    y
        Data ``W^½y``.
    rhs
        ``(W^½E)ᴴ W^½ y``.
    lipschitz
        ``L = ‖W^½E‖²`` (largest eigenvalue of the normal operator, by power iteration).
    x_ref
        ``α·rhs`` with the least-squares scalar ``α``: an image-scale reference for relative
        regularisation weights and a start point.
    weighted
        Whether density weights are applied.
    normal_x_ref
        ``(W^½E)ᴴW^½E x_ref``, a by-product of computing ``α`` (solvers that track ``AᴴA x``
        start from it instead of applying the normal operator again).
    """

    op: LinearOperator
    y: Tensor
    rhs: Tensor
    lipschitz: float
    x_ref: Tensor
    weighted: bool
    normal_x_ref: Tensor | None = None


def density_weights(problem: ReconProblem) -> Tensor:
    """The problem's DCF ``[F, M]`` (float32, on the problem's device).

    Raises
    ------
    ValueError
        For a Cartesian problem, or a non-Cartesian one without ``dcf`` (methods do not invent one).
    """
    if problem.trajectory is None:
        raise ValueError("density weights are defined for non-Cartesian problems only")
    if problem.dcf is None:
        raise ValueError("this non-Cartesian problem has no density compensation (problem.dcf is None); "
                         "build it with make_problem(..., dcf=...) or from a buffer that carries one "
                         "(recon_core.trajectories.default_dcf is the project's rule)")
    return problem.dcf.to(device=problem.device, dtype=torch.float32)


def _sqrt_weights(problem: ReconProblem, density_weighting: bool) -> Tensor | None:
    if not (density_weighting and not problem.is_cartesian):
        return None
    w = density_weights(problem).clamp_min(0)
    return (w / w.mean().clamp_min(1e-30)).sqrt()


def weighted_encoding(problem: ReconProblem, density_weighting: bool) -> tuple[LinearOperator, Tensor, bool]:
    """The data term's operator and data, ``(W^½E, W^½y, weighted)``.

    ``W`` is the problem's DCF normalised to mean 1 (only relative weights matter) when
    ``density_weighting`` is set and the data are non-Cartesian, else the identity (``E``, ``y``).
    """
    y = problem.kspace
    w = _sqrt_weights(problem, density_weighting)
    if w is None:
        return problem.operator, y, False
    return problem.encoding(weights=w), y * w.unsqueeze(1).to(y.dtype), True


def prepare_data_term(problem: ReconProblem, density_weighting: bool, power_iters: int = 20,
                      power_start: str = "random") -> DataTerm:
    """Build the :class:`DataTerm` of ``problem``.

    Parameters
    ----------
    problem
        The reconstruction problem.
    density_weighting
        Use ``W = DCF`` for non-Cartesian data (ignored for Cartesian data); see
        :func:`weighted_encoding`.
    power_iters
        Power-iteration steps for ``L``.
    power_start
        ``"random"``: start vector seeded with ``problem.seed`` (:func:`recon_core.solvers.power_iteration`);
        ``"rhs"``: start from ``rhs`` itself, whose normal-operator image ``α`` needs anyway, so the
        ``power_iters`` steps cost ``power_iters − 1`` further normal-operator applications.
    """
    if power_start not in ("random", "rhs"):
        raise ValueError(f"power_start must be 'random' or 'rhs', got {power_start!r}")
    op, y, weighted = weighted_encoding(problem, density_weighting)
    rhs = op.adjoint(y)
    n_rhs = op.normal(rhs)
    rr = _vnorm(rhs) ** 2
    den = float(torch.sum(torch.view_as_real(rhs) * torch.view_as_real(n_rhs)))
    alpha = rr / den if den > 0 else 0.0
    if power_start == "random":
        lip = power_iteration(op.normal, tuple(rhs.shape), n_iter=power_iters, device=rhs.device,
                              seed=problem.seed)
    else:
        # power iteration from v = rhs/‖rhs‖: its first step N v = n_rhs/‖rhs‖ is already known
        lip = den / rr if rr > 0 else 0.0
        nv = n_rhs / math.sqrt(rr) if rr > 0 else n_rhs
        for _ in range(max(power_iters, 1) - 1):
            nn = _vnorm(nv)
            if nn == 0.0:
                break
            v = nv / nn
            nv = op.normal(v)
            lip = float(torch.sum(torch.view_as_real(v) * torch.view_as_real(nv)))
    return DataTerm(op=op, y=y, rhs=rhs, lipschitz=max(lip, 1e-30), x_ref=(alpha * rhs).to(torch.complex64),
                    weighted=weighted, normal_x_ref=(alpha * n_rhs).to(torch.complex64))


def compress_coils(problem: ReconProblem, energy: float | None = None,
                   n_virtual: int | None = None) -> tuple[ReconProblem, int]:
    """The problem in SVD-compressed virtual coils: ``y → U y``, maps ``S → U S``, operator rebuilt.

    ``U`` (``[V, C]``, orthonormal rows) holds the leading left singular vectors of the measured
    k-space (all frames and samples pooled; :func:`recon_core.coils.svd_compression_matrix`), the
    fewest that keep ``energy`` of it, or exactly ``n_virtual``. The same ``U`` compresses the data
    and the maps, so the compressed data term ``½‖U(Ex − y)‖²`` is the original one restricted to
    the kept coil subspace, and prewhitened noise stays white with σ = 1 (``U`` is orthonormal).
    Its cost is what the normal operator saves: it scales with the coils. Returns the problem
    (unchanged when nothing would be dropped) and the number of virtual coils.
    """
    from dataclasses import replace

    from recon_core.coils import apply_compression, svd_compression_matrix

    k = problem.kspace
    C = int(k.shape[1])
    if energy is None and n_virtual is None:
        raise ValueError("give energy or n_virtual")
    if n_virtual is not None:
        n_virtual = min(int(n_virtual), C)
    data = k.transpose(0, 1).reshape(C, -1)
    U = svd_compression_matrix(data, n_virtual=n_virtual, energy=None if n_virtual else energy)
    V = int(U.shape[0])
    if V >= C:
        return problem, C
    U = U.to(device=k.device, dtype=k.dtype)
    ky = apply_compression(k, U, coil_dim=1).contiguous()
    maps = apply_compression(problem.coil_maps.to(k.dtype), U, coil_dim=0).contiguous()
    calib = problem.calibration
    if calib is not None:
        calib = apply_compression(calib.to(k.dtype), U, coil_dim=0).contiguous()
    p2 = replace(problem, kspace=ky, coil_maps=maps, calibration=calib)
    p2 = replace(p2, operator=p2.encoding())
    return p2, V


def _vnorm(a: Tensor) -> float:
    """2-norm of all elements (complex via the real view, which is far faster on the CPU)."""
    return float(torch.linalg.vector_norm(torch.view_as_real(a) if a.is_complex() else a))


def casorati_sigma_max(x: Tensor) -> float:
    """Largest singular value of the Casorati matrix (pixels × frames) of ``x [F, Ny, Nx]``."""
    m = x.reshape(x.shape[0], -1)
    return float(torch.linalg.matrix_norm(m.to(torch.complex128), ord=2))


def relative_change(new: Tensor, old: Tensor) -> float:
    """``‖new − old‖ / ‖old‖`` (``‖new‖`` when ``old`` is zero)."""
    den = _vnorm(old)
    num = _vnorm(new - old)
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return num / den


#: median of |n| for circular complex Gaussian noise with unit variance per component (Rayleigh)
_RAYLEIGH_MEDIAN = math.sqrt(2.0 * math.log(2.0))


def estimate_noise_sigma(problem: ReconProblem, outer: float = 0.1) -> float:
    """Robust per-component noise σ of ``problem.kspace`` from its outer k-space.

    The samples farthest from the k-space centre carry almost no object signal: non-Cartesian,
    the ``outer`` fraction of samples with the largest ``|k|``; Cartesian, the sampled entries in
    the outer ``outer/2`` of the readout axis on each side. For circular Gaussian noise with
    standard deviation σ per real/imaginary part, ``|n|`` is Rayleigh with median ``σ·√(2 ln 2)``,
    so ``σ = median|y_outer| / √(2 ln 2)``. All coils are pooled: one σ, as prewhitening would make it.

    It is an upper bound: the object's edges still put signal into the outermost k-space. On the
    validation family's radial 128² case at 2 % noise (``bench.validation`` ``rad_b``, before
    prewhitening) it gave 0.0135 against a true 0.0055, and 0.012 on the same scan without noise;
    so data that were not prewhitened get up to ~2.5× more regularisation. Chains prewhiten (the
    noise gadget), where σ = 1 is exact and this estimate is not used.
    """
    k = problem.kspace
    if problem.is_cartesian:
        nx = int(k.shape[-1])
        edge = max(1, int(round(nx * outer / 2)))
        cols = torch.cat([k[..., :edge], k[..., nx - edge:]], dim=-1)
        mask = problem.mask
        if mask is not None:
            m = torch.broadcast_to(mask.to(k.device), (k.shape[0],) + tuple(k.shape[-2:]))
            m = torch.cat([m[..., :edge], m[..., nx - edge:]], dim=-1) > 0
            vals = cols.permute(1, 0, 2, 3)[:, m]
        else:
            vals = cols[cols != 0]
    else:
        traj = problem.trajectory.to(k.device)                # [F, 2, M]
        rad = torch.linalg.vector_norm(traj, dim=1)           # [F, M]
        thr = torch.quantile(rad.flatten().float(), 1.0 - outer)
        sel = rad >= thr
        vals = k.permute(1, 0, 2)[:, sel]
    vals = vals.reshape(-1).abs()
    vals = vals[vals > 0]
    if vals.numel() == 0:
        return 0.0
    return float(vals.float().median()) / _RAYLEIGH_MEDIAN


def noise_sigma(problem: ReconProblem) -> tuple[float, str]:
    """Per-component noise σ of the problem's k-space and where it came from.

    Prewhitened data (the noise gadget ran; ``problem.extra["prewhitened"]``) have unit noise
    variance in the real and imaginary part of every channel: σ = 1 ("prewhitened"). Otherwise σ is
    :func:`estimate_noise_sigma` ("estimated").
    """
    if problem.extra.get("prewhitened"):
        return 1.0, "prewhitened"
    return estimate_noise_sigma(problem), "estimated"
