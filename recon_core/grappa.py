"""GRAPPA (Griswold et al. 2002) for 2-D Cartesian data undersampled uniformly along ky.

The building blocks of :mod:`recon_core.methods.grappa`, in the form Gadgetron's generic Cartesian
GRAPPA uses them (the algorithm learned from ``toolboxes/mri_core/mri_core_grappa.cpp``; this is an
independent implementation):

1. :func:`detect_lattice` — acceleration ``R`` and line offset of a frame's mask (the fully
   sampled centre found by :func:`recon_core.trajectories.acs_region` is allowed on top of the
   lattice, anything else off the lattice is refused);
2. :func:`calibrate_kernel` — the k-space kernel from a fully sampled calibration block: every
   missing line ``ky + o`` (``o = 1 … R−1``) of every coil from ``kernel_e1`` acquired lines
   (``ky + R·j``) × ``kernel_ro`` readout neighbours of all coils, by Tikhonov-regularised least
   squares with ``λ · trace(AᴴA)/K`` on the diagonal (Gadgetron's ``SolveLinearSystem_Tikhonov``:
   the mean eigenvalue stands in for the largest, so one ``λ`` works across data scales). The
   result is one convolution kernel ``[C_dst, C_src, ky, kx]`` (identity at the centre tap for the
   acquired lines), so the filled k-space is ``K ⊛ s`` with ``s`` zero outside the lattice;
3. :func:`unmixing_weights` — ``K`` moved to the image domain (zero-padded, centred inverse FFT,
   × √(Ny·Nx)) and combined with the coil maps, ``U_c = Σ_d conj(S_d) K̂_dc / Σ_d |S_d|²``: the
   image is then ``Σ_c U_c · ifft2c(s_c)``, one multiply-add per coil and pixel for any number of
   frames (the SENSE-type normalisation by ``Σ|S|²`` gives the scaling of CG-SENSE and of the
   ``sense`` zero-filled combination);
4. the g-factor ``g = √(Σ_c |U_c|² · Σ_d |S_d|²) / R`` (Gadgetron's ``√Σ|U|² / R`` for unit-norm
   maps; ≥ 1 wherever the kernel unfolds exactly, 1 at R = 1) and the noise standard deviation of
   the image, ``√(f · Σ_c |U_c|²)`` with ``f`` the sampled fraction of the lattice data, for images
   in SNR units — valid for prewhitened data whose noise has unit variance in the real and in the
   imaginary part (the ``noise`` gadget's and Gadgetron's convention).

:func:`grappa_kspace` is the direct k-space reference: the same kernel applied by convolution in
k-space (circular boundary, so it agrees with the image-domain path to rounding).

Shapes: k-space ``[..., C, Ny, Nx]`` with ``Ny`` the phase-encode (E1) and ``Nx`` the readout (RO)
axis, DC at ``(Ny//2, Nx//2)``; complex64 in and out; every tensor stays on its input's device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from recon_core.fft import ifft2c
from recon_core.trajectories import acs_region

Tensor = torch.Tensor


@dataclass(frozen=True)
class Lattice:
    """Uniform ky sampling of one frame: rows ``r`` with ``r ≡ offset (mod accel)`` are acquired."""

    accel: int
    offset: int


def _rows_and_columns(mask2d: Tensor) -> tuple[Tensor, Tensor]:
    m = mask2d != 0
    return m.any(dim=1), m.any(dim=0)


def detect_lattice(mask2d: Tensor, accel: int = 0) -> Lattice:
    """Acceleration and line offset of a 2-D Cartesian mask ``[Ny, Nx]``.

    Rows inside the fully sampled centre (:func:`~recon_core.trajectories.acs_region`, embedded ACS)
    are not used to find the lattice; every other sampled row must lie on one lattice
    ``offset + accel·j``. ``accel = 0`` detects ``R`` (the gcd of the row spacings; 1 when every row
    is sampled); a given ``accel`` is checked against the rows. Undersampling along the readout
    (sampled rows with gaps between sampled columns) is refused: GRAPPA here accelerates ky only.

    Raises
    ------
    ValueError
        No sampled rows, rows off one lattice (random / variable-density masks), a given ``accel``
        that does not fit, or readout undersampling.
    """
    if mask2d.ndim != 2:
        raise ValueError(f"mask must be [Ny, Nx], got shape {tuple(mask2d.shape)}")
    rows, cols = _rows_and_columns(mask2d)
    ny = int(rows.numel())
    sampled = torch.nonzero(rows).flatten().cpu()
    if sampled.numel() == 0:
        raise ValueError("GRAPPA: the mask samples no k-space line")
    m = (mask2d != 0)[rows]
    c_idx = torch.nonzero(cols).flatten()
    c0, c1 = int(c_idx[0]), int(c_idx[-1]) + 1
    if not bool(m[:, c0:c1].any(dim=0).all()) or bool((m[:, c0:c1].sum(dim=1) < (c1 - c0) // 2).any()):
        raise ValueError("GRAPPA: the mask undersamples along the readout (kx); only ky acceleration "
                         "(uniform lines, every sampled line fully sampled along the readout) is supported")
    region = acs_region(mask2d)
    outside = sampled
    if region is not None:
        (y0, y1), _ = region
        outside = sampled[(sampled < y0) | (sampled >= y1)]
    if outside.numel() == 0:
        if sampled.numel() == ny:
            detected = 1
            base = 0
        else:
            raise ValueError("GRAPPA: only a fully sampled centre block is acquired; there is no "
                             "undersampled lattice to reconstruct")
    else:
        base = int(outside[0])
        diffs = (outside - base).tolist()
        detected = 0
        for d in diffs:
            detected = math.gcd(detected, int(d))
        if detected == 0:  # one row outside the centre: take the spacing to the centre block's rows
            inside = sampled[(sampled >= region[0][0]) & (sampled < region[0][1])] if region else sampled
            detected = max(1, min(abs(int(r) - base) for r in inside.tolist()))
    r = int(accel) if accel else detected
    if r < 1:
        raise ValueError(f"GRAPPA: acceleration must be >= 1, got {r}")
    if accel and any((int(x) - base) % r for x in outside.tolist()):
        raise ValueError(f"GRAPPA: acceleration {r} does not fit the sampled rows (detected {detected})")
    if r > 1 and ny // r < 2:
        raise ValueError(f"GRAPPA: acceleration {r} leaves fewer than 2 lines")
    lo, hi = int(sampled[0]), int(sampled[-1])
    lattice = torch.arange(lo + (base - lo) % r, hi + 1, r)
    missing = lattice[~rows.cpu()[lattice]]
    if missing.numel():
        raise ValueError("GRAPPA needs uniform undersampling along ky (every R-th line, plus an optional "
                         f"fully sampled centre): with R = {r} rows {missing[:8].tolist()} of the lattice "
                         "are not sampled (variable-density or random masks are not supported)")
    return Lattice(accel=r, offset=base % r)


def lattice_rows(ny: int, lattice: Lattice, device: torch.device | str | None = None) -> Tensor:
    """Boolean ``[Ny]``: the rows on ``lattice``."""
    return torch.remainder(torch.arange(ny, device=device) - lattice.offset, lattice.accel) == 0


def kernel_pattern(accel: int, kernel_e1: int) -> tuple[list[int], list[int]]:
    """Source row offsets (multiples of ``accel``, e.g. ``[-4, 0, 4, 8]`` for R = 4 and 4 lines) and
    target row offsets ``[1 … R−1]`` of the kernel (Gadgetron's pattern, acquired lines not refitted)."""
    if kernel_e1 < 1:
        raise ValueError(f"kernel_e1 must be >= 1, got {kernel_e1}")
    lo = -(kernel_e1 // 2 - 1) if kernel_e1 % 2 == 0 else -(kernel_e1 // 2)
    src = [(lo + j) * accel for j in range(kernel_e1)]
    return src, list(range(1, accel))


def fit_kernel_e1(accel: int, kernel_e1: int, calib_rows: int, calib_cols: int | None = None,
                  n_coils: int = 1, kernel_ro: int = 1, overdetermine: float = 3.0) -> int:
    """The largest number of kernel lines ``≤ kernel_e1`` whose footprint fits ``calib_rows``
    calibration rows and, given ``calib_cols``, leaves at least ``overdetermine`` × as many fitting
    equations as unknowns (``n_coils·lines·kernel_ro``): a short ACS block gets a shorter kernel."""
    kro = 2 * (int(kernel_ro) // 2) + 1
    for k in range(max(1, kernel_e1), 0, -1):
        src, tgt = kernel_pattern(accel, k)
        span = max(src[-1], tgt[-1] if tgt else 0) - src[0] + 1
        if span > calib_rows:
            continue
        if calib_cols is not None and k > 1:
            equations = (calib_rows - span + 1) * max(0, calib_cols - kro + 1)
            if equations < overdetermine * n_coils * k * kro:
                continue
        return k
    raise ValueError(f"GRAPPA: {calib_rows} calibration rows cannot calibrate R = {accel} "
                     f"(need at least {accel})")


def calibrate_kernel(calib: Tensor, accel: int, kernel_e1: int = 4, kernel_ro: int = 5,
                     lam: float = 5e-4, noise_var: float = 0.0) -> Tensor:
    """GRAPPA convolution kernel ``[C, C, 2·my+1, kernel_ro]`` from a fully sampled block ``[C, ny, nx]``.

    ``kernel_ro`` is made odd (centred on the target column). The fit solves
    ``(AᴴA + λ·tr(AᴴA)/K · I) W = AᴴB`` in double precision, ``A`` the source samples (``K =
    C·kernel_e1·kernel_ro`` columns) and ``B`` the ``C·(R−1)`` targets at every kernel position
    inside the block. ``accel = 1`` gives the identity kernel (nothing to fill).

    ``noise_var`` > 0 makes the Tikhonov weight at least ``M·noise_var`` (``M`` equations; pass the
    per-sample noise variance ``E|n|²`` times a weight): the noise energy of each source column of
    ``A``, so the kernel is not fitted below the noise — a noise-aware λ that a relative ``lam`` alone
    cannot give (too weak on noisy scans, too strong on clean ones).
    """
    if calib.ndim != 3:
        raise ValueError(f"calibration must be [C, ny, nx], got shape {tuple(calib.shape)}")
    if not calib.is_complex():
        raise ValueError("calibration must be complex")
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    n_c, ny, nx = (int(s) for s in calib.shape)
    hro = int(kernel_ro) // 2
    if hro < 0 or 2 * hro + 1 > nx:
        raise ValueError(f"kernel_ro {kernel_ro} does not fit {nx} calibration columns")
    if accel == 1:
        ker = torch.zeros(n_c, n_c, 1, 2 * hro + 1, dtype=torch.complex64, device=calib.device)
        ker[torch.arange(n_c), torch.arange(n_c), 0, hro] = 1.0
        return ker
    src, tgt = kernel_pattern(accel, kernel_e1)
    s0 = -src[0]
    e_last = ny - 1 - max(src[-1], tgt[-1])
    if e_last < s0:
        raise ValueError(f"GRAPPA: {ny} calibration rows are too few for R = {accel} with a "
                         f"{kernel_e1}-line kernel")
    ys = torch.arange(s0, e_last + 1, device=calib.device)
    xs = torch.arange(hro, nx - hro, device=calib.device)
    c = calib.to(torch.complex128)
    cols = []   # order: src coil, source line, readout tap
    for dy in src:
        rows = c[:, ys + dy]                                     # [C, nY, nx]
        for dx in range(-hro, hro + 1):
            cols.append(rows[:, :, xs + dx])                     # [C, nY, nX]
    a = torch.stack(cols, dim=1)                                 # [C, L·kro, nY, nX]
    a = a.reshape(n_c * len(cols), -1).transpose(0, 1)           # [M, K]
    b = torch.stack([c[:, ys + o][:, :, xs] for o in tgt], dim=0)  # [O, C, nY, nX]
    b = b.reshape(len(tgt) * n_c, -1).transpose(0, 1)           # [M, O·C]
    aha = a.conj().transpose(0, 1) @ a
    ahb = a.conj().transpose(0, 1) @ b
    k = aha.shape[0]
    reg = lam * float(torch.diagonal(aha).real.sum()) / k
    if noise_var > 0:
        reg = max(reg, float(a.shape[0]) * float(noise_var))
    eye = torch.eye(k, dtype=aha.dtype, device=aha.device)
    w = torch.linalg.solve(aha + reg * eye, ahb)                 # [K, O·C]
    w = w.reshape(n_c, len(src), 2 * hro + 1, len(tgt), n_c)    # [src, line, ro tap, target, dst]
    dys = [o - s for o in tgt for s in src]
    my = max(abs(d) for d in dys)
    ker = torch.zeros(n_c, n_c, 2 * my + 1, 2 * hro + 1, dtype=torch.complex128, device=calib.device)
    for oi, o in enumerate(tgt):
        for si, s in enumerate(src):
            # target (y+o, x) += w · s(y+s, x+dx)  →  convolution tap at (o−s, −dx)
            ker[:, :, my + o - s, :] += w[:, si, :, oi, :].permute(2, 0, 1).flip(-1)
    ker[torch.arange(n_c), torch.arange(n_c), my, hro] += 1.0
    return ker.to(torch.complex64)


def _taps(kernel: Tensor) -> list[tuple[int, int, Tensor]]:
    """Non-zero taps ``(dy, dx, K[:, :, dy, dx])`` of a convolution kernel."""
    _, _, ky, kx = kernel.shape
    my, mx = ky // 2, kx // 2
    nz = kernel.abs().flatten(0, 1).amax(dim=0) > 0
    return [(iy - my, ix - mx, kernel[:, :, iy, ix]) for iy, ix in torch.nonzero(nz).tolist()]


def grappa_kspace(kspace: Tensor, kernel: Tensor) -> Tensor:
    """Direct k-space GRAPPA: ``out_d = Σ_c K_dc ⊛ s_c`` over the last two axes (circular boundary).

    ``kspace`` ``[..., C, Ny, Nx]`` must be zero off the lattice the kernel was fitted for (any
    offset); the result holds the acquired lines unchanged and the missing lines filled.
    """
    out = torch.zeros_like(kspace)
    for dy, dx, w in _taps(kernel.to(kspace.device)):
        shifted = torch.roll(kspace, shifts=(dy, dx), dims=(-2, -1))
        out = out + torch.einsum("dc,...cyx->...dyx", w, shifted)
    return out


def grappa_rows(kspace: Tensor, kernel: Tensor, rows: Tensor) -> Tensor:
    """Rows ``rows`` (indices along ``Ny``) of :func:`grappa_kspace`'s result, ``[..., C, len(rows), Nx]``,
    computed from those rows' neighbours only (cheap when few rows are needed, e.g. embedded ACS lines)."""
    ny = kspace.shape[-2]
    rows = rows.to(kspace.device)
    out = torch.zeros(*kspace.shape[:-2], int(rows.numel()), kspace.shape[-1], dtype=kspace.dtype,
                      device=kspace.device)
    for dy, dx, w in _taps(kernel.to(kspace.device)):
        src = kspace.index_select(-2, torch.remainder(rows - dy, ny))
        out = out + torch.einsum("dc,...cyx->...dyx", w, torch.roll(src, shifts=dx, dims=-1))
    return out


def image_domain_kernel(kernel: Tensor, shape: tuple[int, int], src: Optional[int] = None) -> Tensor:
    """``√(Ny·Nx) · ifft2c`` of the kernel zero-padded (centred) to ``shape``: ``[C_dst, C_src, Ny, Nx]``
    (or ``[C_dst, Ny, Nx]`` for one source coil ``src``), so that
    ``ifft2c(K ⊛ s) = Σ_c K̂_c · ifft2c(s_c)``."""
    ny, nx = shape
    _, _, ky, kx = kernel.shape
    if ky > ny or kx > nx:
        raise ValueError(f"kernel {ky}×{kx} larger than the image {ny}×{nx}")
    k = kernel if src is None else kernel[:, src]
    pad = torch.zeros(*k.shape[:-2], ny, nx, dtype=torch.complex64, device=kernel.device)
    y0, x0 = ny // 2 - ky // 2, nx // 2 - kx // 2
    pad[..., y0:y0 + ky, x0:x0 + kx] = k
    return ifft2c(pad) * math.sqrt(ny * nx)


def unmixing_weights(kernel: Tensor, coil_maps: Tensor, accel: int, eps: float = 1e-8
                     ) -> tuple[Tensor, Tensor]:
    """Image-domain unmixing weights ``U [C, Ny, Nx]`` and g-factor ``[Ny, Nx]``.

    ``U_c = Σ_d conj(S_d) K̂_dc / Σ_d|S_d|²`` (zero where ``Σ|S|² ≤ eps``), ``g = √(Σ|U|²·Σ|S|²)/R``.
    Built one source coil at a time (memory ``C·Ny·Nx``, not ``C²·Ny·Nx``).
    """
    n_c, ny, nx = coil_maps.shape
    if kernel.shape[0] != n_c or kernel.shape[1] != n_c:
        raise ValueError(f"kernel has {tuple(kernel.shape[:2])} coils, the maps {n_c}")
    maps = coil_maps.to(torch.complex64)
    norm = (maps.abs() ** 2).sum(dim=0)
    inside = norm > eps
    inv = torch.where(inside, 1.0 / norm.clamp_min(eps), torch.zeros_like(norm))
    u = torch.empty(n_c, ny, nx, dtype=torch.complex64, device=maps.device)
    for c in range(n_c):
        u[c] = (maps.conj() * image_domain_kernel(kernel, (ny, nx), src=c)).sum(dim=0) * inv
    g = torch.sqrt((u.abs() ** 2).sum(dim=0) * norm) / float(accel)
    return u, torch.where(inside, g, torch.zeros_like(g))


def apply_unmixing(kspace: Tensor, weights: Tensor) -> Tensor:
    """``Σ_c U_c · ifft2c(s_c)``: images ``[..., Ny, Nx]`` from lattice k-space ``[..., C, Ny, Nx]``."""
    return (weights * ifft2c(kspace)).sum(dim=-3)


def noise_std(weights: Tensor, sampled_fraction: float) -> Tensor:
    """Per-pixel noise standard deviation (per real/imaginary part) of :func:`apply_unmixing`'s image
    for white k-space noise of unit variance per part on a ``sampled_fraction`` of the grid."""
    return torch.sqrt((weights.abs() ** 2).sum(dim=-3) * float(sampled_fraction))
