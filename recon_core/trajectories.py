"""Sampling patterns and density compensation: Cartesian masks, golden-angle radial, spirals, DCFs.

Conventions (DESIGN.md, BRIEFS §0), shared by every function here:

* Cartesian masks are ``[F, Ny, Nx]`` float32, 1 = sampled. Phase encoding runs along ``Ny``
  (axis -2), the readout along ``Nx`` (axis -1). k-space is centred: DC sits at index ``N // 2``.
* Non-Cartesian trajectories are ``[F, 2, M]`` float32 in **radians per voxel of the
  reconstruction grid**; component 0 is ``ky`` (image axis -2), component 1 is ``kx``
  (image axis -1); ``|k| = π`` is the Nyquist edge of that grid. A spoke or spiral arm at
  angle ``θ`` points along ``(ky, kx) = (sin θ, cos θ)``.
* Density compensation factors (DCF) are ``[F, M]`` float32 with the scale convention
  ``dcf_m = A_m · Ny·Nx / (2π)²`` where ``A_m`` is the k-space area (rad²) that sample ``m``
  represents. With an orthonormal NUFFT (``norm="ortho"``: ``y = Σ_r x(r) e^{-ik·r} / √(NyNx)``)
  this makes ``adjoint(dcf · forward(x)) ≈ x`` for objects whose spectrum lies inside the sampled
  region, and gives ``dcf = 1`` for a fully sampled Cartesian grid.

Everything is deterministic given ``seed``; random numbers come from a private
:class:`torch.Generator`, never from global state. Results are created on CPU and moved to
``device`` when given.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

Tensor = torch.Tensor

GOLDEN_RATIO = (1.0 + math.sqrt(5.0)) / 2.0
#: The radial golden angle π/φ (≈ 111.246°) in radians.
GOLDEN_ANGLE = math.pi / GOLDEN_RATIO

__all__ = [
    "GOLDEN_ANGLE",
    "GOLDEN_RATIO",
    "uniform_mask",
    "variable_density_mask",
    "poisson_disc_mask",
    "acs_region",
    "mask_acceleration",
    "radial_angles",
    "golden_angle_radial",
    "spiral_trajectory",
    "ramp_dcf",
    "pipe_menon_dcf",
    "default_dcf",
    "RADIAL_KINDS",
    "ismrmrd_to_radians",
    "radians_to_ismrmrd",
    "trajectory_from_acquisitions",
]


# ----------------------------------------------------------------------------------------------
# argument checks


def _pos_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _pos_float(name: str, value, minimum: float = 0.0, strict: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < minimum or (strict and value == minimum):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {minimum}, got {value}")
    return value


def _finish(x: Tensor, device) -> Tensor:
    return x if device is None else x.to(device)


def _acs_slice(n: int, width: int) -> slice:
    """The ``width`` central indices of an axis of length ``n`` (DC at ``n // 2``)."""
    start = n // 2 - width // 2
    return slice(start, start + width)


def _check_traj(traj: Tensor, name: str = "traj") -> Tensor:
    """Accept ``[2, M]`` or ``[F, 2, M]`` real tensors; return ``[F, 2, M]``."""
    if not isinstance(traj, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(traj).__name__}")
    if traj.is_complex():
        raise TypeError(f"{name} must be real (radians/voxel), got {traj.dtype}")
    if traj.ndim == 2:
        traj = traj[None]
    if traj.ndim != 3 or traj.shape[1] != 2:
        raise ValueError(f"{name} must have shape [F, 2, M] or [2, M], got {tuple(traj.shape)}")
    return traj


def _image_shape(image_shape) -> tuple[int, int]:
    if isinstance(image_shape, (int, np.integer)) and not isinstance(image_shape, bool):
        image_shape = (image_shape, image_shape)
    try:
        ny, nx = (int(s) for s in image_shape)
    except (TypeError, ValueError):
        raise ValueError(f"image_shape must be an int or (Ny, Nx), got {image_shape!r}") from None
    if ny < 1 or nx < 1:
        raise ValueError(f"image_shape must be positive, got {(ny, nx)}")
    return ny, nx


# ----------------------------------------------------------------------------------------------
# Cartesian masks


def uniform_mask(ny: int, nx: int, accel: int, acs_lines: int, n_frames: int = 1,
                 shift_per_frame: bool = True, device: torch.device | str | None = None) -> Tensor:
    """Regular Cartesian undersampling: every ``accel``-th phase-encode line plus a central ACS block.

    Line ``ky`` is sampled in frame ``f`` when ``(ky - Ny//2 - o_f) mod accel == 0`` with offset
    ``o_f = f mod accel`` if ``shift_per_frame`` (ky-t interleaving: the union over ``accel``
    consecutive frames is fully sampled) else 0. The ``acs_lines`` lines around ``Ny//2`` are
    always sampled, and every sampled line is fully sampled along the readout (``Nx``).

    Returns
    -------
    Tensor
        ``[n_frames, ny, nx]`` float32 mask.
    """
    ny, nx = _pos_int("ny", ny), _pos_int("nx", nx)
    accel = _pos_int("accel", accel)
    acs_lines = _pos_int("acs_lines", acs_lines, 0)
    n_frames = _pos_int("n_frames", n_frames)
    if acs_lines > ny:
        raise ValueError(f"acs_lines ({acs_lines}) must not exceed ny ({ny})")
    ky = torch.arange(ny) - ny // 2
    mask = torch.zeros(n_frames, ny, nx, dtype=torch.float32)
    for f in range(n_frames):
        offset = f % accel if shift_per_frame else 0
        lines = torch.remainder(ky - offset, accel) == 0
        lines[_acs_slice(ny, acs_lines)] = True
        mask[f, lines, :] = 1.0
    return _finish(mask, device)


def variable_density_mask(ny: int, nx: int, accel: float, acs_lines: int, n_frames: int = 1,
                          seed: int = 0, decay: float = 2.0,
                          device: torch.device | str | None = None) -> Tensor:
    """Random 1-D variable-density Cartesian mask, drawn independently for each frame.

    Each frame samples exactly ``round(ny / accel)`` phase-encode lines: the ``acs_lines``
    central lines plus lines drawn without replacement from the polynomial density
    ``p(ky) ∝ (1 - |ky - Ny//2| / (Ny/2))**decay + 1e-3`` (larger ``decay`` concentrates
    samples near the centre; the small floor keeps every line reachable).

    Returns
    -------
    Tensor
        ``[n_frames, ny, nx]`` float32 mask, identical for identical ``seed``.
    """
    ny, nx = _pos_int("ny", ny), _pos_int("nx", nx)
    accel = _pos_float("accel", accel, 1.0, strict=False)
    acs_lines = _pos_int("acs_lines", acs_lines, 0)
    n_frames = _pos_int("n_frames", n_frames)
    decay = _pos_float("decay", decay, 0.0, strict=False)
    n_lines = max(1, int(round(ny / accel)))
    if acs_lines > n_lines:
        raise ValueError(f"acs_lines ({acs_lines}) exceeds the line budget round(ny/accel) = {n_lines}")
    gen = torch.Generator().manual_seed(int(seed))
    dist = (torch.arange(ny, dtype=torch.float64) - ny // 2).abs() / (ny / 2.0)
    pdf = (1.0 - dist).clamp(min=0.0) ** decay + 1e-3
    acs = torch.zeros(ny, dtype=torch.bool)
    acs[_acs_slice(ny, acs_lines)] = True
    pdf[acs] = 0.0
    n_rand = n_lines - acs_lines
    mask = torch.zeros(n_frames, ny, nx, dtype=torch.float32)
    for f in range(n_frames):
        lines = acs.clone()
        if n_rand > 0:
            lines[torch.multinomial(pdf, n_rand, replacement=False, generator=gen)] = True
        mask[f, lines, :] = 1.0
    return _finish(mask, device)


def _disc_offsets(radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Integer offsets (dy, dx) with dy² + dx² < radius² (the points a sample of this radius blocks)."""
    r = int(math.ceil(radius))
    dy, dx = np.mgrid[-r:r + 1, -r:r + 1]
    keep = dy * dy + dx * dx < radius * radius
    return dy[keep], dx[keep]


def _poisson_fill(order: list[int], radius_q: np.ndarray, preset: np.ndarray, ny: int, nx: int,
                  scale: float, cache: dict) -> np.ndarray:
    """Random sequential addition on the grid: visit points in ``order``, accept a point unless an
    earlier accepted point ``p`` lies closer than ``scale · radius(p)``; return the boolean mask."""
    blocked = np.zeros((ny, nx), dtype=bool)
    taken = np.zeros((ny, nx), dtype=bool)
    flat_blocked = blocked.reshape(-1)

    def accept(i: int, j: int) -> None:
        key = round(scale * radius_q[i, j] * 8.0) / 8.0
        off = cache.get(key)
        if off is None:
            off = cache[key] = _disc_offsets(key)
        yy, xx = off[0] + i, off[1] + j
        ok = (yy >= 0) & (yy < ny) & (xx >= 0) & (xx < nx)
        blocked[yy[ok], xx[ok]] = True
        taken[i, j] = True

    for i, j in zip(*np.nonzero(preset)):
        accept(int(i), int(j))
    for q in order:
        if not flat_blocked[q]:
            accept(q // nx, q % nx)
    return taken


def poisson_disc_mask(ny: int, nx: int, accel: float, acs: Sequence[int] = (6, 6), n_frames: int = 1,
                      seed: int = 0, variable_density: float = 2.0, tol: float = 0.02,
                      device: torch.device | str | None = None) -> Tensor:
    """2-D variable-density Poisson-disc mask (kx–ky), a different pattern for each frame.

    The pattern of GIP's Cartesian experiments: points of the ``Ny × Nx`` grid are visited in a
    random order and kept unless a kept point lies within its exclusion radius
    ``r(ρ) = s · (1 + variable_density · ρ)``, ``ρ`` the normalised distance from the k-space
    centre (1 at the edge of each axis). The central ``acs = (ky, kx)`` block is always
    sampled. ``s`` is found per frame by bisection so that the number of samples is within
    ``tol`` (relative) of ``Ny·Nx / accel`` when the grid allows it.

    Returns
    -------
    Tensor
        ``[n_frames, ny, nx]`` float32 mask.
    """
    ny, nx = _pos_int("ny", ny), _pos_int("nx", nx)
    accel = _pos_float("accel", accel, 1.0, strict=False)
    n_frames = _pos_int("n_frames", n_frames)
    variable_density = _pos_float("variable_density", variable_density, 0.0, strict=False)
    tol = _pos_float("tol", tol)
    try:
        ay, ax = (int(a) for a in acs)
    except (TypeError, ValueError):
        raise ValueError(f"acs must be a pair (ky, kx) of ints, got {acs!r}") from None
    if not (0 <= ay <= ny and 0 <= ax <= nx):
        raise ValueError(f"acs {(ay, ax)} does not fit the grid {(ny, nx)}")
    target = ny * nx / accel
    if ay * ax > target:
        raise ValueError(f"acs block {ay}x{ax} alone exceeds the sample budget ny*nx/accel = {target:.0f}")
    yy = (np.arange(ny) - ny // 2)[:, None] / (ny / 2.0)
    xx = (np.arange(nx) - nx // 2)[None, :] / (nx / 2.0)
    radius = 1.0 + variable_density * np.sqrt(yy ** 2 + xx ** 2)
    preset = np.zeros((ny, nx), dtype=bool)
    preset[_acs_slice(ny, ay), _acs_slice(nx, ax)] = True
    gen = torch.Generator().manual_seed(int(seed))
    cache: dict = {}
    prev_s = None
    mask = torch.zeros(n_frames, ny, nx, dtype=torch.float32)
    for f in range(n_frames):
        order = torch.randperm(ny * nx, generator=gen).tolist()
        if accel == 1.0:
            mask[f] = 1.0
            continue
        # bisection on the radius scale s; later frames start near the previous frame's s
        full = (0.05, 2.0 * math.sqrt(accel) + 2.0)  # lo fills (nearly) every point, hi is sparse
        brackets = [full] if prev_s is None else [(prev_s / 1.15, prev_s * 1.15), full]
        best, best_err, best_s = None, math.inf, None
        for lo, hi in brackets:
            for _ in range(40):
                s = math.sqrt(lo * hi)
                taken = _poisson_fill(order, radius, preset, ny, nx, s, cache)
                n = int(taken.sum())
                err = abs(n - target) / target
                if err < best_err:
                    best, best_err, best_s = taken, err, s
                if err <= tol or hi / lo < 1.001:
                    break
                if n > target:
                    lo = s
                else:
                    hi = s
            if best_err <= tol:
                break
        prev_s = best_s
        mask[f] = torch.from_numpy(best.astype(np.float32))
    return _finish(mask, device)


def _clip_extent(lo: int, hi: int, centre: int, size: int | None) -> tuple[int, int]:
    """At most ``size`` indices of ``[lo, hi)``, centred on ``centre`` (DC at ``size // 2``) when possible."""
    if size is None or hi - lo <= size:
        return lo, hi
    start = min(max(centre - size // 2, lo), hi - size)
    return start, start + size


def acs_region(mask: Tensor, max_size: int | Sequence[int] | None = None
               ) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """The fully sampled calibration block around the k-space centre: THE rule of this project.

    Every part that needs "the fully sampled centre" (the buffer's calibration lines, the coil
    gadget's time-averaged k-space, :func:`recon_core.coils.calibration_region`, the phantom writer's
    ACS flags) calls this function, so they all agree on it.

    Rule: start from the centre sample ``(Ny//2, Nx//2)`` of the frame-wise AND of ``mask`` and grow
    the rectangle one row/column at a time on each side (top, bottom, left, right in turn) while the
    new edge is fully sampled. The result is a maximal fully sampled rectangle containing the centre;
    it need not be symmetric about it. With ``max_size = (sy, sx)`` (or one int for both) each side
    is then clipped to at most that many indices, centred on DC where the block allows it.

    Parameters
    ----------
    mask : Tensor
        ``[F, Ny, Nx]`` or ``[Ny, Nx]`` sampling mask (non-zero = sampled; any real or bool dtype).
    max_size : int or (int, int), optional
        Largest block to return along (Ny, Nx).

    Returns
    -------
    ((y0, y1), (x0, x1)) or None
        Half-open index ranges along ``Ny`` and ``Nx``; ``None`` if the centre is not sampled.
    """
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3:
        raise ValueError(f"mask must have shape [F, Ny, Nx] or [Ny, Nx], got {tuple(mask.shape)}")
    cap: tuple[int, int] | None = None
    if max_size is not None:
        if isinstance(max_size, (int, np.integer)) and not isinstance(max_size, bool):
            cap = (_pos_int("max_size", max_size),) * 2
        else:
            vals = tuple(max_size)
            if len(vals) != 2:
                raise ValueError(f"max_size must be an int or a pair of ints, got {max_size!r}")
            cap = (_pos_int("max_size[0]", vals[0]), _pos_int("max_size[1]", vals[1]))
    m = (mask != 0).all(dim=0).cpu().numpy()
    ny, nx = m.shape
    cy, cx = ny // 2, nx // 2
    if not m[cy, cx]:
        return None
    y0, y1, x0, x1 = cy, cy + 1, cx, cx + 1
    grown = True
    while grown:
        grown = False
        if y0 > 0 and m[y0 - 1, x0:x1].all():
            y0 -= 1
            grown = True
        if y1 < ny and m[y1, x0:x1].all():
            y1 += 1
            grown = True
        if x0 > 0 and m[y0:y1, x0 - 1].all():
            x0 -= 1
            grown = True
        if x1 < nx and m[y0:y1, x1].all():
            x1 += 1
            grown = True
    if cap is not None:
        y0, y1 = _clip_extent(y0, y1, cy, cap[0])
        x0, x1 = _clip_extent(x0, x1, cx, cap[1])
    return (y0, y1), (x0, x1)


def mask_acceleration(mask: Tensor) -> float:
    """Actual acceleration of a mask: number of grid points / number of sampled points."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    n = int((mask != 0).sum())
    if n == 0:
        raise ValueError("mask samples nothing")
    return mask.numel() / n


# ----------------------------------------------------------------------------------------------
# radial


def _angle_increment(angle: str | float) -> float | None:
    """Angle increment (radians) for ``angle``; None for ``"uniform"``."""
    if isinstance(angle, (int, float)) and not isinstance(angle, bool):
        return math.radians(float(angle))
    if not isinstance(angle, str):
        raise TypeError(f"angle must be a str or a number of degrees, got {type(angle).__name__}")
    a = angle.strip().lower()
    if a == "golden":
        return GOLDEN_ANGLE
    if a == "uniform":
        return None
    if a.startswith("tiny:"):
        try:
            n = int(a[5:])
        except ValueError:
            raise ValueError(f"angle {angle!r}: expected 'tiny:N' with an integer N") from None
        if not 2 <= n <= 10:
            raise ValueError(f"angle {angle!r}: tiny golden angle order N must be in 2..10")
        return math.pi / (GOLDEN_RATIO + n - 1)
    raise ValueError(f"unknown angle {angle!r}: expected 'golden', 'tiny:N' (N=2..10), 'uniform' "
                     "or an increment in degrees")


def radial_angles(n_spokes: int, n_frames: int = 1, angle: str | float = "golden",
                  device: torch.device | str | None = None) -> Tensor:
    """Spoke angles ``[n_frames, n_spokes]`` (radians, in [0, 2π)).

    ``"golden"``: spoke ``i`` overall (``i = f·n_spokes + s``, counting continues across frames)
    has angle ``i·π/φ`` (111.246°); ``"tiny:N"``: ``i·π/(φ + N - 1)``; a number: ``i·angle``
    degrees; ``"uniform"``: ``s·π/n_spokes`` in every frame.
    """
    n_spokes, n_frames = _pos_int("n_spokes", n_spokes), _pos_int("n_frames", n_frames)
    inc = _angle_increment(angle)
    i = torch.arange(n_frames * n_spokes, dtype=torch.float64).reshape(n_frames, n_spokes)
    if inc is None:
        theta = torch.remainder(i, n_spokes) * (math.pi / n_spokes)
    else:
        theta = torch.remainder(i * inc, 2 * math.pi)
    return _finish(theta.to(torch.float32), device)


def golden_angle_radial(n_spokes: int, n_readout: int, n_frames: int = 1, angle: str | float = "golden",
                        readout_oversampling: float = 2.0,
                        device: torch.device | str | None = None) -> Tensor:
    """Radial trajectory ``[n_frames, 2, n_spokes·n_readout]`` (ky, kx) in radians/voxel.

    Convention: the reconstruction grid has ``N = n_readout / readout_oversampling`` pixels
    across, and each spoke carries ``n_readout`` samples at radii
    ``r_j = (j - n_readout/2) · 2π / n_readout``, ``j = 0 … n_readout-1``: they cover
    ``[-π, π)`` with ``readout_oversampling`` times the Nyquist density of that grid
    (spacing ``2π / (os·N)``), and sample ``j = n_readout/2`` is exactly DC. The radii do not
    depend on ``readout_oversampling``; it only fixes (and checks) the relation to ``N``.
    Spoke ``s`` of frame ``f`` has angle ``radial_angles(...)[f, s]``; its samples are
    ``(ky, kx) = r_j · (sin θ, cos θ)``, samples ordered spoke-major. Components stay in
    ``[-π, π)`` up to float32 rounding.
    """
    n_readout = _pos_int("n_readout", n_readout, 2)
    os_ = _pos_float("readout_oversampling", readout_oversampling)
    n_grid = n_readout / os_
    if abs(n_grid - round(n_grid)) > 1e-6:
        raise ValueError(f"n_readout ({n_readout}) / readout_oversampling ({os_}) must be an integer "
                         "(the reconstruction matrix size)")
    theta = radial_angles(n_spokes, n_frames, angle).to(torch.float64)  # [F, S]
    r = (torch.arange(n_readout, dtype=torch.float64) - n_readout / 2) * (2 * math.pi / n_readout)
    ky = torch.sin(theta)[..., None] * r  # [F, S, R]
    kx = torch.cos(theta)[..., None] * r
    traj = torch.stack([ky, kx], dim=1).reshape(theta.shape[0], 2, -1)
    return _finish(traj.to(torch.float32), device)


# ----------------------------------------------------------------------------------------------
# spiral


def spiral_trajectory(n_interleaves: int, n_samples: int, n_frames: int = 1,
                      interleaves_per_frame: int | None = None, density_power: float = 1.5,
                      n_turns: float | None = None, golden_rotation: bool = True,
                      matrix_size: int = 128, device: torch.device | str | None = None) -> Tensor:
    """Variable-density Archimedean spiral ``[n_frames, 2, ipf·n_samples]`` (ky, kx) in radians/voxel.

    One interleaf: ``τ_j = j/(n_samples-1)``, radius ``r = π·τ**density_power`` (monotone,
    ``k(0) = 0``, ``|k| ≤ π``), phase ``φ = 2π·n_turns·τ``. Interleaf ``i`` is rotated by
    ``2π·i/n_interleaves``. ``density_power > 1`` samples the centre more densely. The radial
    gap between neighbouring arms at the edge is ``2π²·density_power/(2π·n_turns·n_interleaves)``;
    ``n_turns=None`` picks ``density_power·matrix_size/(2·n_interleaves)`` so that all
    ``n_interleaves`` arms together meet Nyquist (``2π/matrix_size``) at the edge.

    Frames: with ``interleaves_per_frame = p`` (must divide ``n_interleaves``; default all),
    frame ``f`` uses the ``p`` equally spaced arms ``o_f + j·K`` (``K = n_interleaves/p``).
    The offset is ``o_f = floor(K·frac(f/φ))`` (golden-ratio rotation, incoherent over time,
    staying on the ``n_interleaves`` design) when ``golden_rotation``, else ``f mod K``
    (sequential: any ``K`` consecutive frames together use every arm once).
    """
    n_interleaves = _pos_int("n_interleaves", n_interleaves)
    n_samples = _pos_int("n_samples", n_samples, 2)
    n_frames = _pos_int("n_frames", n_frames)
    density_power = _pos_float("density_power", density_power)
    matrix_size = _pos_int("matrix_size", matrix_size)
    if n_turns is None:
        n_turns = density_power * matrix_size / (2.0 * n_interleaves)
    n_turns = _pos_float("n_turns", n_turns)
    p = n_interleaves if interleaves_per_frame is None else _pos_int("interleaves_per_frame",
                                                                      interleaves_per_frame)
    if p > n_interleaves or n_interleaves % p != 0:
        raise ValueError(f"interleaves_per_frame ({p}) must divide n_interleaves ({n_interleaves})")
    k_groups = n_interleaves // p
    tau = torch.arange(n_samples, dtype=torch.float64) / (n_samples - 1)
    r = math.pi * tau ** density_power
    phi = 2 * math.pi * n_turns * tau
    arms = []
    for f in range(n_frames):
        if golden_rotation:
            offset = int(math.floor(k_groups * ((f / GOLDEN_RATIO) % 1.0))) % k_groups
        else:
            offset = f % k_groups
        idx = offset + k_groups * torch.arange(p, dtype=torch.float64)
        rot = 2 * math.pi * idx / n_interleaves  # [p]
        ang = phi[None, :] + rot[:, None]  # [p, n_samples]
        arms.append(torch.stack([r * torch.sin(ang), r * torch.cos(ang)], dim=0).reshape(2, -1))
    traj = torch.stack(arms, dim=0)
    return _finish(traj.to(torch.float32), device)


# ----------------------------------------------------------------------------------------------
# density compensation


def ramp_dcf(traj: Tensor, image_shape: int | Sequence[int] | None = None,
             readout_oversampling: float = 2.0) -> Tensor:
    """Analytic ramp (|k|) density compensation for radial trajectories, ``[F, M]`` float32.

    Per frame, the weight is proportional to ``|k|``; samples at ``k = 0`` get the value of
    ``|k| = Δk/4`` (``Δk`` the smallest non-zero ``|k|`` in the frame, the radial spacing), which
    is the exact share of the central disc of radius ``Δk/2`` when every spoke passes through DC.
    The weights are scaled so that they sum to the area ``π·max|k|²`` of the covered disc
    and then converted to the module's DCF convention ``A_m · Ny·Nx/(2π)²`` (see module doc).
    ``image_shape`` defaults to the square grid implied by the sample spacing,
    ``N = round(2π / (readout_oversampling·Δk))``, i.e. the :func:`golden_angle_radial` convention.
    """
    traj = _check_traj(traj)
    kabs = torch.linalg.vector_norm(traj.to(torch.float64), dim=1)  # [F, M]
    eps = 1e-6 * math.pi
    nonzero = torch.where(kabs > eps, kabs, torch.full_like(kabs, math.inf))
    dk = nonzero.min(dim=1, keepdim=True).values  # [F, 1]
    if not torch.isfinite(dk).all():
        raise ValueError("traj has a frame with all samples at k = 0")
    w = torch.where(kabs > eps, kabs, dk / 4.0)
    kmax = kabs.max(dim=1, keepdim=True).values
    area = w * (math.pi * kmax ** 2 / w.sum(dim=1, keepdim=True))
    if image_shape is None:
        os_ = _pos_float("readout_oversampling", readout_oversampling)
        n = int(round(2 * math.pi / (os_ * float(dk.median()))))
        ny, nx = n, n
    else:
        ny, nx = _image_shape(image_shape)
    return (area * (ny * nx / (4 * math.pi ** 2))).to(torch.float32)


def _kb_weights(u: Tensor, width: int, beta: float) -> tuple[Tensor, Tensor]:
    """Neighbour grid indices and Kaiser–Bessel weights for grid coordinates ``u`` (any shape).

    Returns integer indices ``[..., width]`` (unwrapped) and weights ``[..., width]``."""
    base = torch.floor(u - width / 2.0) + 1.0
    idx = base[..., None] + torch.arange(width, dtype=u.dtype, device=u.device)
    d = (u[..., None] - idx) * (2.0 / width)
    arg = torch.clamp(1.0 - d * d, min=0.0)
    w = torch.special.i0(beta * torch.sqrt(arg)) * (arg > 0)
    return idx.long(), w


def pipe_menon_dcf(traj: Tensor, image_shape: int | Sequence[int], n_iter: int = 20,
                   oversampling: float = 2.0, kernel_width: int = 6) -> Tensor:
    """Iterative density compensation (Pipe & Menon 1999) for any trajectory, ``[F, M]`` float32.

    Fixed-point iteration ``w ← w / (G Gᵀ w)`` where ``Gᵀ`` spreads sample weights onto an
    ``oversampling``× grid with a separable Kaiser–Bessel kernel (``kernel_width`` grid points,
    Beatty's β) and ``G`` interpolates back, until the weighted kernel sum is ~1 at every sample.
    The kernel is normalised to unit sum over the grid, so the converged ``w`` is the sample's
    area in grid cells; dividing by ``oversampling²`` gives the module's DCF convention
    (``A_m · Ny·Nx/(2π)²``, 1 on a fully sampled Cartesian grid). Own implementation (no
    torchkbnufft internals); runs on the device of ``traj``.
    """
    traj = _check_traj(traj)
    ny, nx = _image_shape(image_shape)
    n_iter = _pos_int("n_iter", n_iter)
    os_ = _pos_float("oversampling", oversampling, 1.0)
    width = _pos_int("kernel_width", kernel_width, 2)
    beta = math.pi * math.sqrt(max((width / os_) ** 2 * (os_ - 0.5) ** 2 - 0.8, 1e-3))
    grid = (int(math.ceil(os_ * ny)), int(math.ceil(os_ * nx)))
    t = traj.to(torch.float64)
    n_f, _, m = t.shape

    # unit-sum normalisation of the 1-D kernel (the grid sum barely depends on the sub-grid offset)
    frac = torch.linspace(0.0, 1.0, 33, dtype=torch.float64, device=t.device)[:-1]
    _, w1 = _kb_weights(frac, width, beta)
    norm1 = float(w1.sum(dim=-1).mean())

    idx_axes, w_axes = [], []
    for a, g in enumerate(grid):
        u = t[:, a, :] * (g / (2 * math.pi))  # grid units, DC at 0
        idx, w = _kb_weights(u, width, beta)
        idx_axes.append(torch.remainder(idx + g // 2, g))
        w_axes.append(w / norm1)
    flat = idx_axes[0][..., :, None] * grid[1] + idx_axes[1][..., None, :]  # [F, M, W, W]
    kern = w_axes[0][..., :, None] * w_axes[1][..., None, :]
    frame_off = (torch.arange(n_f, device=t.device) * (grid[0] * grid[1]))[:, None, None, None]
    flat = (flat + frame_off).reshape(-1)
    kern = kern.reshape(n_f, m, -1)

    weights = torch.ones(n_f, m, dtype=torch.float64, device=t.device)
    for _ in range(n_iter):
        spread = torch.zeros(n_f * grid[0] * grid[1], dtype=torch.float64, device=t.device)
        spread.index_add_(0, flat, (kern * weights[..., None]).reshape(-1))
        back = (spread[flat].reshape(n_f, m, -1) * kern).sum(dim=-1)
        weights = weights / back.clamp(min=1e-12)
    return (weights / (os_ * os_)).to(torch.float32)


#: Header trajectory names (ISMRMRD ``encoding/trajectory``) whose readouts are spokes through DC.
RADIAL_KINDS = ("radial", "goldenangle")


def default_dcf(traj: Tensor, image_shape: int | Sequence[int], kind: str | None = None,
                n_iter: int = 20) -> Tensor:
    """The project's density compensation for a trajectory, ``[F, M]`` float32: one rule for everyone.

    Radial trajectories (``kind`` one of :data:`RADIAL_KINDS`) get the analytic :func:`ramp_dcf`;
    any other (spiral, unknown, ``None``) the iterative :func:`pipe_menon_dcf` with ``n_iter``
    iterations, which is right for any trajectory. The buffer gadget supplies this as ``buf.dcf``;
    gadgets and methods that meet a missing DCF call this function rather than choosing their own.
    """
    if kind is not None and str(kind).strip().lower() in RADIAL_KINDS:
        return ramp_dcf(traj, image_shape)
    return pipe_menon_dcf(traj, image_shape, n_iter=n_iter)


# ----------------------------------------------------------------------------------------------
# unit and layout conversions


def _matrix_scale(matrix_size, like: Tensor) -> Tensor:
    """Per-component scale ``2π/N`` broadcastable against ``[..., 2, M]`` (or a scalar)."""
    if isinstance(matrix_size, (int, float, np.integer, np.floating)) and not isinstance(matrix_size, bool):
        if matrix_size <= 0:
            raise ValueError(f"matrix_size must be positive, got {matrix_size}")
        return torch.tensor(2 * math.pi / float(matrix_size), dtype=like.dtype, device=like.device)
    ny, nx = _image_shape(matrix_size)
    if like.ndim < 2 or like.shape[-2] != 2:
        raise ValueError("with matrix_size=(Ny, Nx) the trajectory must have the component axis "
                         f"(ky, kx) at position -2, got shape {tuple(like.shape)}")
    return torch.tensor([2 * math.pi / ny, 2 * math.pi / nx], dtype=like.dtype, device=like.device)[:, None]


def _as_float_tensor(traj, name: str = "traj") -> Tensor:
    if isinstance(traj, np.ndarray):
        traj = torch.from_numpy(traj)
    if not isinstance(traj, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(traj).__name__}")
    if traj.is_complex():
        raise TypeError(f"{name} must be real, got {traj.dtype}")
    return traj.to(torch.float32)


def ismrmrd_to_radians(traj: Tensor, matrix_size: int | Sequence[int]) -> Tensor:
    """Cycles/FOV (ISMRMRD ``traj`` units, ``[-N/2, N/2]``) → radians/voxel: ``k·2π/N``.

    ``matrix_size`` is ``N`` (one value for all components) or ``(Ny, Nx)``, in which case
    ``traj`` must be in this module's layout ``[..., 2, M]`` with components (ky, kx).
    """
    t = _as_float_tensor(traj)
    return t * _matrix_scale(matrix_size, t)


def radians_to_ismrmrd(traj: Tensor, matrix_size: int | Sequence[int]) -> Tensor:
    """Radians/voxel → cycles/FOV: the inverse of :func:`ismrmrd_to_radians`."""
    t = _as_float_tensor(traj)
    return t / _matrix_scale(matrix_size, t)


def trajectory_from_acquisitions(trajs: Sequence, matrix: int | Sequence[int],
                                 units: str = "cycles/fov") -> Tensor:
    """Stack per-acquisition ISMRMRD trajectories ``[M_i, D]`` into one ``[2, ΣM_i]`` (ky, kx) tensor.

    ISMRMRD stores columns ``(kx, ky[, kz])``; this swaps them into the module's (ky, kx)
    order and converts to radians/voxel. ``units``: ``"cycles/fov"`` (``[-N/2, N/2]``, needs
    ``matrix`` = N or (Ny, Nx)), ``"normalized"`` (``[-0.5, 0.5]``, scaled by 2π) or
    ``"radians"`` (unchanged). Extra columns (kz) are ignored.
    """
    if isinstance(trajs, (torch.Tensor, np.ndarray)) or not isinstance(trajs, Sequence) or len(trajs) == 0:
        raise TypeError("trajs must be a non-empty list of [M_i, D] arrays")
    parts = []
    for n, t in enumerate(trajs):
        t = _as_float_tensor(t, f"trajs[{n}]")
        if t.ndim != 2 or t.shape[1] < 2:
            raise ValueError(f"trajs[{n}] must have shape [M, D] with D >= 2 columns (kx, ky), "
                             f"got {tuple(t.shape)}")
        parts.append(torch.stack([t[:, 1], t[:, 0]], dim=0))
    out = torch.cat(parts, dim=1)
    u = units.strip().lower()
    if u in ("cycles/fov", "cycles_per_fov"):
        return ismrmrd_to_radians(out, matrix if isinstance(matrix, (int, np.integer)) else tuple(matrix))
    if u == "normalized":
        return out * (2 * math.pi)
    if u == "radians":
        return out
    raise ValueError(f"unknown units {units!r}: expected 'cycles/fov', 'normalized' or 'radians'")
