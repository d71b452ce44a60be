"""Dynamic multi-coil cardiac phantom with analytic k-space, and acquisition simulation.

The object is a sum of ellipses (body, fat ring, lungs, LV blood pool and myocardium, RV, aorta,
spine, small vessels …) whose centres and semi-axes move smoothly over one cardiac cycle (LV/RV
contraction, optional respiratory shift). Coil sensitivities ``S_c`` and a smooth background phase
``P`` are *defined* as low-order 2-D Fourier series

    S_c(r) = Σ_j a_cj · exp(i ω_j · r),          P(r) = Σ_l p_l · exp(i ω_l · r),

so that the coil image ``S_c · P · f`` has the exact Fourier transform ``Σ_j b_cj · F(k − ω_j)``
(``b_c = a_c ⊛ p``, ``F`` the closed-form transform of the ellipse sum, a J1 Bessel "jinc").
K-space is therefore evaluated analytically at any k-locations (Cartesian grid, radial, spiral),
never with a reconstruction operator.

Units and scaling (DESIGN conventions)
--------------------------------------
* Image coordinates ``r = (y, x)`` are in pixels of the ``N × N`` reconstruction grid relative to
  the pixel with index ``N // 2``; k in radians/voxel, component 0 = ky, 1 = kx.
* A k-space sample is ``F(k) / sqrt(n_pix)`` where ``F(k) = ∫ f(r) e^{-i k·r} dr`` and ``n_pix``
  is the number of pixels of the encoded grid (``N·N`` for non-Cartesian data and the ground
  truth, ``N · os·N`` for Cartesian data with readout oversampling ``os``). With this "ortho"
  scaling ``ifft2c`` of fully sampled Cartesian data gives the pixel values of the object.
* The series frequencies are ``ω = 2π (m, n) / (2N)`` (period two fields of view), which is
  commensurate with every Cartesian grid used here; Cartesian k-space is computed on a grid of
  half the k-space spacing once per frame and combined by shifted sums (exact, and fast).

Normalisation of the coil maps: each coil's series is fitted (weighted least squares, once,
in matrix-independent FOV units) to Biot–Savart-like maps of loops placed around the body that
were pixel-wise normalised to unit root-sum-of-squares; afterwards *all* coil coefficients are
multiplied by one global factor chosen so that the mean of ``Σ_c |S_c|²`` over the body is
exactly 1. The pixel-wise sum of squares then stays within a few percent of 1 inside the body
(not exactly 1: a per-pixel normalisation would break the exact k-space model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from recon_core.fft import ifft2c

Tensor = torch.Tensor

__all__ = [
    "ellipse_kspace",
    "ellipse_image",
    "CardiacPhantom",
    "AnatomyVariation",
    "PhantomScan",
    "noise_covariance_matrix",
    "simulate_scan",
]

#: Series period in fields of view: frequencies are multiples of 2π / (SERIES_PERIOD · N).
SERIES_PERIOD = 2
_CHUNK = 1 << 18  # elements of the [points, ellipses] work arrays evaluated at once


# ----------------------------------------------------------------------------------------------
# ellipses


def _check_ellipses(ellipses: Tensor, name: str = "ellipses") -> Tensor:
    if not isinstance(ellipses, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(ellipses).__name__}")
    if ellipses.ndim != 2 or ellipses.shape[1] != 6:
        raise ValueError(f"{name} must have shape [E, 6] (cy, cx, ay, ax, angle, intensity), "
                         f"got {tuple(ellipses.shape)}")
    if ellipses.is_complex():
        raise TypeError(f"{name} must be real, got {ellipses.dtype}")
    return ellipses


def ellipse_kspace(k: Tensor, ellipses: Tensor) -> Tensor:
    """Continuous Fourier transform ``F(k) = ∫ f(r) e^{-i k·r} dr`` of a sum of ellipses.

    An ellipse with centre ``c``, semi-axes ``(a_y, a_x)``, rotation ``θ`` and intensity ``ρ``
    is the set ``r = c + a_x u (sin θ, cos θ) + a_y v (cos θ, -sin θ)`` with ``u² + v² ≤ 1``, i.e.
    its x-semi-axis is rotated by ``θ`` from the x axis towards +y. Its transform is
    ``ρ π a_y a_x · 2 J1(κ)/κ · e^{-i k·c}`` with ``κ = |(a_x k_∥, a_y k_⊥)|``. Overlapping
    ellipses add (Shepp–Logan style).

    Parameters
    ----------
    k : Tensor
        ``[2, M]`` (ky, kx) in radians per pixel.
    ellipses : Tensor
        ``[E, 6]`` rows ``(cy, cx, ay, ax, angle, intensity)``; lengths in pixels relative to the
        pixel ``N // 2``, angle in radians.

    Returns
    -------
    Tensor
        ``[M]`` complex64 (complex128 if ``k`` is float64).
    """
    if not isinstance(k, torch.Tensor) or k.is_complex():
        raise TypeError("k must be a real torch.Tensor")
    if k.ndim != 2 or k.shape[0] != 2:
        raise ValueError(f"k must have shape [2, M] (ky, kx), got {tuple(k.shape)}")
    ell = _check_ellipses(ellipses).to(device=k.device, dtype=k.dtype)
    cy, cx, ay, ax, th, rho = ell.unbind(1)
    cos, sin = torch.cos(th), torch.sin(th)
    # κ² = qxx kx² + qyy ky² + qxy kx ky (the rotated, scaled frequency of each ellipse)
    qxx = (ax * cos) ** 2 + (ay * sin) ** 2
    qyy = (ax * sin) ** 2 + (ay * cos) ** 2
    qxy = 2 * cos * sin * (ax ** 2 - ay ** 2)
    amp2 = 2 * rho * math.pi * ay * ax  # amplitude times the 2 of 2·J1(κ)/κ
    m, e = k.shape[1], ell.shape[0]
    re = torch.empty(m, dtype=k.dtype, device=k.device)
    im = torch.empty(m, dtype=k.dtype, device=k.device)
    qxx, qyy, qxy, amp2, cy, cx = (v[:, None] for v in (qxx, qyy, qxy, amp2, cy, cx))
    step = max(1, _CHUNK // max(e, 1))
    for s in range(0, m, step):  # work arrays are [E, chunk]: long contiguous inner axis
        ky = k[0, None, s:s + step]
        kx = k[1, None, s:s + step]
        kappa = (kx * kx) * qxx
        kappa.addcmul_(ky * ky, qyy).addcmul_(kx * ky, qxy).sqrt_().clamp_(min=1e-6)
        w = torch.special.bessel_j1(kappa).div_(kappa).mul_(amp2)  # → ρπ·ay·ax at κ = 0
        arg = ky * cy
        arg.addcmul_(kx, cx)
        re[s:s + step] = (w * torch.cos(arg)).sum(dim=0)
        im[s:s + step] = (w * torch.sin(arg)).sum(dim=0).neg_()
    return torch.complex(re, im)


def ellipse_image(ellipses: Tensor, ny: int, nx: int, supersample: int = 1) -> Tensor:
    """Indicator-sum image of the ellipses on an ``ny × nx`` pixel grid, ``[ny, nx]`` float32.

    With ``supersample = s`` each pixel is the mean over ``s × s`` sub-pixel samples (a simple
    area-weighted rasterisation, used for display and for checking :func:`ellipse_kspace`).
    """
    ell = _check_ellipses(ellipses).to(torch.float64)
    if supersample < 1:
        raise ValueError(f"supersample must be >= 1, got {supersample}")
    sub = (torch.arange(supersample, dtype=torch.float64) + 0.5) / supersample - 0.5
    yy = ((torch.arange(ny, dtype=torch.float64) - ny // 2)[:, None] + sub[None, :]).reshape(-1)
    xx = ((torch.arange(nx, dtype=torch.float64) - nx // 2)[:, None] + sub[None, :]).reshape(-1)
    img = torch.zeros(yy.numel(), xx.numel(), dtype=torch.float64)
    for cy, cx, ay, ax, th, rho in ell.tolist():
        dy, dx = yy[:, None] - cy, xx[None, :] - cx
        u = dx * math.cos(th) + dy * math.sin(th)
        v = dy * math.cos(th) - dx * math.sin(th)
        img += rho * (((u / ax) ** 2 + (v / ay) ** 2) <= 1.0)
    img = img.reshape(ny, supersample, nx, supersample).mean(dim=(1, 3))
    return img.to(torch.float32)


# ----------------------------------------------------------------------------------------------
# anatomy (all lengths in fields of view; y points down/posterior, x to the image right)

_BODY = (0.0, 0.0, 0.33, 0.44)  # cy, cx, ay, ax of the outer body outline


def _contraction(tau: Tensor) -> Tensor:
    """Smooth periodic contraction state in [0, 1] over the cardiac phase ``tau`` ∈ [0, 1)."""
    d = torch.remainder(tau - 0.35 + 0.5, 1.0) - 0.5
    return torch.exp(-(d / 0.16) ** 2)


def _anatomy(times: Tensor, rr_s: float, resp_period_s: float, resp_amplitude: float,
             contraction: float = 1.0) -> Tensor:
    """Ellipse table ``[F, E, 6]`` in FOV units for the frame times (seconds); ``contraction``
    scales the cardiac wall motion (1 = the standard phantom)."""
    t = times.to(torch.float64)
    c = contraction * _contraction(torch.remainder(t / rr_s, 1.0))
    resp = resp_amplitude * torch.sin(2 * math.pi * t / resp_period_s) if resp_period_s > 0 else t * 0
    rows = []

    def add(cy, cx, ay, ax, th, rho):
        f = t.numel()
        parts = [torch.as_tensor(v, dtype=torch.float64).expand(f) if not torch.is_tensor(v)
                 else v.to(torch.float64).expand(f) for v in (cy, cx, ay, ax, th, rho)]
        rows.append(torch.stack(parts, dim=-1))

    by, bx, bay, bax = _BODY
    add(by, bx, bay, bax, 0.0, 1.15)                       # subcutaneous fat (outer outline)
    add(by, bx, bay - 0.028, bax - 0.03, 0.0, -0.70)       # muscle / soft tissue -> 0.45
    add(-0.272, 0.0, 0.014, 0.055, 0.0, -0.25)             # sternum
    add(0.215, 0.0, 0.038, 0.046, 0.0, -0.22)              # vertebral body
    add(0.262, 0.0, 0.014, 0.014, 0.0, 0.55)               # spinal canal (CSF)
    add(0.17, 0.045, 0.021, 0.021, 0.0, 0.60)              # descending aorta
    for sx in (-1.0, 1.0):                                 # lungs breathe: shift and stretch
        add(-0.015 + 0.5 * resp, sx * 0.255, 0.19 * (1 + 0.4 * resp), 0.105, sx * 0.18, -0.40)
        for vy, vx, vr in ((-0.09, 0.23, 0.009), (0.04, 0.29, 0.011), (0.10, 0.22, 0.008)):
            add(vy + 0.5 * resp, sx * vx, vr, vr, 0.0, 0.38)  # pulmonary vessels
    for sx in (-1.0, 1.0):
        add(-0.255, sx * 0.06, 0.007, 0.007, 0.0, 0.5)    # internal mammary vessels
    hy, hx = 0.025 + resp, 0.045                           # LV centre follows respiration
    r_out = 0.088 - 0.010 * c
    r_in = 0.062 - 0.026 * c
    add(hy, hx, r_out, r_out * 1.04, 0.3, -0.12)           # LV myocardium -> 0.33
    add(hy, hx, r_in, r_in * 1.06, 0.3, 0.72)              # LV blood pool -> 1.05
    for py, px in ((0.55, 0.35), (0.65, -0.25)):           # papillary muscles move with the wall
        add(hy + py * r_in, hx + px * r_in, 0.011, 0.013, 0.0, -0.55)
    s = 1.0 - 0.32 * c                                     # RV: crescent-ish ellipse, contracts
    add(hy - 0.01, hx - 0.145 + 0.02 * c, 0.072 * s, 0.040 * s, 0.55, 0.52)
    add(hy - 0.005, hx - 0.085, 0.012, 0.012, 0.0, 0.3)    # septal coronary / fat dot
    return torch.stack(rows, dim=1)


# ----------------------------------------------------------------------------------------------
# Fourier-series coil maps and background phase (matrix independent, FOV units)


def _series_basis(yy: Tensor, xx: Tensor, order: int) -> Tensor:
    """``[P, (2K+1)²]`` basis exp(i 2π (m y + n x) / SERIES_PERIOD) at points in FOV units."""
    idx = torch.arange(-order, order + 1, dtype=torch.float64)
    m = idx[:, None].expand(-1, idx.numel()).reshape(-1)
    n = idx[None, :].expand(idx.numel(), -1).reshape(-1)
    arg = (2 * math.pi / SERIES_PERIOD) * (yy[:, None] * m + xx[:, None] * n)
    return torch.polar(torch.ones_like(arg), arg)


def _fit_points(n: int = 48) -> tuple[Tensor, Tensor, Tensor]:
    g = (torch.arange(n, dtype=torch.float64) + 0.5) / n - 0.5
    yy, xx = torch.meshgrid(g, g, indexing="ij")
    yy, xx = yy.reshape(-1), xx.reshape(-1)
    inside = (yy / (_BODY[2] + 0.03)) ** 2 + (xx / (_BODY[3] + 0.03)) ** 2 <= 1.0
    w = torch.where(inside, 1.0, 0.02).to(torch.float64)
    return yy, xx, w


def _weighted_fit(target: Tensor, basis: Tensor, w: Tensor, ridge: float = 1e-4) -> Tensor:
    sw = torch.sqrt(w).to(basis.dtype)
    a = basis * sw[:, None]
    b = target * sw[:, None]
    lhs = a.conj().T @ a + ridge * torch.eye(a.shape[1], dtype=a.dtype)
    return torch.linalg.solve(lhs, a.conj().T @ b)


@lru_cache(maxsize=16)
def _coil_series(n_coils: int, order: int) -> Tensor:
    """Fitted coil coefficients ``[C, 2K+1, 2K+1]`` complex128 (before the global scaling)."""
    return _coil_series_placed(n_coils, order, 0.0, 0.50, 0.60)


@lru_cache(maxsize=64)
def _coil_series_placed(n_coils: int, order: int, rotation: float, ring_y: float, ring_x: float) -> Tensor:
    """:func:`_coil_series` for loops on an elliptical ring of semi-axes ``(ring_y, ring_x)`` FOV,
    rotated by ``rotation`` radians (the standard array: 0, 0.50, 0.60)."""
    yy, xx, w = _fit_points()
    alpha = 2 * math.pi * (torch.arange(n_coils, dtype=torch.float64) + 0.5) / n_coils + rotation
    py, px = ring_y * torch.sin(alpha), ring_x * torch.cos(alpha)  # loops on a ring around the body
    dy, dx = yy[:, None] - py, xx[:, None] - px
    dist2 = dy ** 2 + dx ** 2
    mag = (1.0 + dist2 / 0.30 ** 2) ** -1.5                          # on-axis Biot–Savart fall-off
    tang = dx * (-torch.sin(alpha)) + dy * torch.cos(alpha)         # tangential offset
    phase = 1.6 * tang + 2 * math.pi * torch.arange(n_coils, dtype=torch.float64) * 0.37
    maps = torch.polar(mag, phase)
    maps = maps / torch.sqrt((maps.abs() ** 2).sum(dim=1, keepdim=True))
    coef = _weighted_fit(maps.to(torch.complex128), _series_basis(yy, xx, order), w)  # [J, C]
    return coef.T.reshape(n_coils, 2 * order + 1, 2 * order + 1).contiguous()


@lru_cache(maxsize=4)
def _phase_series(order: int, strength: float) -> Tensor:
    """Background phase coefficients ``[2K+1, 2K+1]`` fitted to exp(i φ), φ smooth (≈ ±1 rad)."""
    yy, xx, w = _fit_points()
    phi = strength * (1.5 * xx - 0.9 * yy + 2.0 * (xx ** 2 + 0.6 * yy ** 2) - 0.2)
    coef = _weighted_fit(torch.polar(torch.ones_like(phi), phi)[:, None], _series_basis(yy, xx, order), w)
    return coef.reshape(2 * order + 1, 2 * order + 1)


def _conv_full(a: Tensor, p: Tensor) -> Tensor:
    """Full 2-D convolution of coefficient arrays ``a [C, A, A]`` and ``p [B, B]``."""
    c, na, _ = a.shape
    nb = p.shape[0]
    out = torch.zeros(c, na + nb - 1, na + nb - 1, dtype=a.dtype)
    for i in range(nb):
        for j in range(nb):
            out[:, i:i + na, j:j + na] += a * p[i, j]
    return out


# ----------------------------------------------------------------------------------------------
# anatomy variation (for varied training data; the standard phantom has none)


@dataclass(frozen=True)
class AnatomyVariation:
    """A reproducible random deviation from the standard anatomy and coil array.

    Used to make training data varied (:class:`recon_core.training.data.PhantomDataset`); the
    standard phantom is ``variation=None``. All draws come from ``seed``:

    * ``body_scale``: (y, x) stretch of the whole anatomy (body shape and organ positions);
    * ``shape_jitter``: per ellipse, relative jitter of the centre (in units of its own semi-axes),
      the semi-axes and the angle (radians) — the same for every frame, so motion stays smooth;
    * ``contrast_jitter``: per ellipse, relative change of its intensity (tissue contrast);
    * ``n_blobs``: extra small ellipses (vessels, lesions) at random places inside the body;
    * ``contraction``: scale of the cardiac wall motion;
    * ``coil_rotation`` (radians) and ``coil_ring`` (semi-axes of the ring of loops, FOV units).
    """

    seed: int = 0
    body_scale: tuple[float, float] = (1.0, 1.0)
    shape_jitter: float = 0.0
    contrast_jitter: float = 0.0
    n_blobs: int = 0
    contraction: float = 1.0
    coil_rotation: float = 0.0
    coil_ring: tuple[float, float] = (0.50, 0.60)

    @classmethod
    def random(cls, seed: int, strength: float = 1.0) -> "AnatomyVariation":
        """A draw of every kind of variation; ``strength`` scales the ranges (0 = standard shapes)."""
        g = torch.Generator().manual_seed(int(seed))

        def u(lo: float, hi: float) -> float:
            return lo + (hi - lo) * float(torch.rand((), generator=g, dtype=torch.float64))

        s = float(strength)
        sy, sx = 1.0 + s * u(-0.18, 0.08), 1.0 + s * u(-0.18, 0.05)
        ring = (0.50 + s * u(-0.05, 0.08), 0.60 + s * u(-0.05, 0.05))
        return cls(seed=int(seed), body_scale=(sy, sx), shape_jitter=0.12 * s, contrast_jitter=0.25 * s,
                   n_blobs=int(round(s * u(0, 6))), contraction=1.0 + s * u(-0.4, 0.3),
                   coil_rotation=s * u(-math.pi, math.pi), coil_ring=ring)

    def changes_coils(self) -> bool:
        return self.coil_rotation != 0.0 or tuple(self.coil_ring) != (0.50, 0.60)

    def body(self) -> tuple[float, float, float, float]:
        """The outer body outline (cy, cx, ay, ax) after the stretch."""
        return (_BODY[0] * self.body_scale[0], _BODY[1] * self.body_scale[1], _BODY[2] * self.body_scale[0],
                _BODY[3] * self.body_scale[1])

    def apply(self, ell: Tensor) -> Tensor:
        """The varied ellipse table ``[F, E', 6]`` (FOV units) from the standard one ``[F, E, 6]``."""
        g = torch.Generator().manual_seed(int(self.seed) + 7_777)
        f, e, _ = ell.shape
        out = ell.clone()
        sy, sx = self.body_scale
        out[..., 0] *= sy
        out[..., 2] *= sy
        out[..., 1] *= sx
        out[..., 3] *= sx
        if self.shape_jitter > 0:
            j = float(self.shape_jitter)
            r = (2 * torch.rand(e, 5, generator=g, dtype=torch.float64) - 1) * j
            r[:2] = 0.0                                     # the outer outline keeps its shape
            out[..., 0] += r[:, 0] * out[..., 2]
            out[..., 1] += r[:, 1] * out[..., 3]
            out[..., 2] *= 1 + r[:, 2]
            out[..., 3] *= 1 + r[:, 3]
            out[..., 4] += r[:, 4] * 3.0
        if self.contrast_jitter > 0:
            c = 1 + (2 * torch.rand(e, generator=g, dtype=torch.float64) - 1) * float(self.contrast_jitter)
            out[..., 5] *= c
        if self.n_blobs > 0:
            by, bx, bay, bax = self.body()
            n = int(self.n_blobs)
            rad = torch.sqrt(torch.rand(n, generator=g, dtype=torch.float64)) * 0.75
            ang = torch.rand(n, generator=g, dtype=torch.float64) * 2 * math.pi
            cy, cx = by + rad * bay * torch.sin(ang), bx + rad * bax * torch.cos(ang)
            ay = 0.006 + 0.03 * torch.rand(n, generator=g, dtype=torch.float64)
            ax = ay * (0.6 + 0.8 * torch.rand(n, generator=g, dtype=torch.float64))
            th = torch.rand(n, generator=g, dtype=torch.float64) * math.pi
            rho = (torch.rand(n, generator=g, dtype=torch.float64) - 0.4) * 1.2
            # slow drift over the cycle
            drift = (torch.rand(n, 2, generator=g, dtype=torch.float64) - 0.5) * 0.02
            tt = torch.linspace(0.0, 1.0, f, dtype=torch.float64)[:, None]
            blobs = torch.stack([cy + drift[:, 0] * tt, cx + drift[:, 1] * tt, ay.expand(f, n),
                                 ax.expand(f, n), th.expand(f, n), rho.expand(f, n)], dim=-1)
            out = torch.cat([out, blobs], dim=1)
        return out


# ----------------------------------------------------------------------------------------------
# the phantom


class CardiacPhantom:
    """Analytic multi-coil 2D+time cardiac phantom on an ``N × N`` reconstruction grid.

    Parameters
    ----------
    matrix : int
        Reconstruction matrix ``N`` (square FOV).
    n_frames : int
        Frames spread evenly over one cardiac cycle (``n_frames = 1``: a static end-diastolic
        image).
    n_coils : int
        Receive coils on a ring around the body.
    heart_rate_bpm : float
        Sets the cardiac period and therefore the frame times.
    resp_amplitude : float
        Respiratory shift of heart and lungs in FOVs (0 disables); the period is ``resp_period_s``.
    coil_order, phase_order : int
        Series orders ``K``: ``(2K+1)²`` coefficients per coil map / for the background phase.
    phase_strength : float
        Scales the background phase (0 gives a real-valued object).
    variation : AnatomyVariation, optional
        A drawn deviation from the standard anatomy, wall motion and coil array (training data);
        ``None`` (default) is the standard phantom.
    """

    def __init__(self, matrix: int = 128, n_frames: int = 16, n_coils: int = 12, *,
                 heart_rate_bpm: float = 60.0, resp_amplitude: float = 0.012, resp_period_s: float = 4.0,
                 coil_order: int = 2, phase_order: int = 1, phase_strength: float = 1.0,
                 variation: "AnatomyVariation | None" = None) -> None:
        for name, val, lo in (("matrix", matrix, 8), ("n_frames", n_frames, 1), ("n_coils", n_coils, 1),
                              ("coil_order", coil_order, 0), ("phase_order", phase_order, 0)):
            if isinstance(val, bool) or not isinstance(val, int):
                raise TypeError(f"{name} must be an int, got {type(val).__name__}")
            if val < lo:
                raise ValueError(f"{name} must be >= {lo}, got {val}")
        if not heart_rate_bpm > 0:
            raise ValueError(f"heart_rate_bpm must be positive, got {heart_rate_bpm}")
        self.matrix = matrix
        self.n_frames = n_frames
        self.n_coils = n_coils
        self.rr_s = 60.0 / float(heart_rate_bpm)
        self.frame_times_s = torch.arange(n_frames, dtype=torch.float64) * (self.rr_s / n_frames)
        n = float(matrix)
        self.variation = variation
        self._body = _BODY if variation is None else variation.body()
        ell = _anatomy(self.frame_times_s, self.rr_s, resp_period_s, resp_amplitude,
                       1.0 if variation is None else variation.contraction)
        if variation is not None:
            ell = variation.apply(ell)
        ell[..., :4] *= n                                   # FOV units -> pixels
        self.ellipses = ell                                 # [F, E, 6] float64
        self.phase_coeffs = _phase_series(phase_order, float(phase_strength)).clone()
        raw = (_coil_series(n_coils, coil_order) if variation is None or not variation.changes_coils()
               else _coil_series_placed(n_coils, coil_order, float(variation.coil_rotation),
                                        float(variation.coil_ring[0]), float(variation.coil_ring[1])))
        # one global factor: mean over the body of Σ_c |S_c|² = 1
        sos = (self._eval_series(raw).abs() ** 2).sum(dim=0)
        scale = 1.0 / math.sqrt(float(sos[self.body_mask()].mean()))
        self.coil_coeffs = raw * scale                      # [C, 2Kc+1, 2Kc+1] complex128
        self.combined_coeffs = _conv_full(self.coil_coeffs, self.phase_coeffs)  # coil × phase

    # -- image-domain quantities -------------------------------------------------------------
    def _eval_series(self, coeffs: Tensor) -> Tensor:
        """Evaluate ``[..., K, K]`` series at the pixel centres → ``[..., N, N]`` complex128."""
        n = self.matrix
        order = (coeffs.shape[-1] - 1) // 2
        pos = (torch.arange(n, dtype=torch.float64) - n // 2) / n
        idx = torch.arange(-order, order + 1, dtype=torch.float64)
        e = torch.polar(torch.ones(n, idx.numel(), dtype=torch.float64),
                        (2 * math.pi / SERIES_PERIOD) * pos[:, None] * idx[None, :])  # [N, K]
        return torch.einsum("ym,...mn,xn->...yx", e, coeffs.to(torch.complex128), e)

    def body_mask(self) -> Tensor:
        """``[N, N]`` bool: pixel centres inside the outer body outline (fixed over time)."""
        n = self.matrix
        pos = (torch.arange(n, dtype=torch.float64) - n // 2) / n
        body = self._body
        return ((pos[:, None] - body[0]) / body[2]) ** 2 + ((pos[None, :] - body[1]) / body[3]) ** 2 <= 1.0

    def coil_maps(self) -> Tensor:
        """True sensitivities ``[C, N, N]`` complex64 (the coil series at the pixel centres)."""
        return self._eval_series(self.coil_coeffs).to(torch.complex64)

    def background_phase(self) -> Tensor:
        """The background phase series ``P`` at the pixel centres, ``[N, N]`` complex64 (|P| ≈ 1)."""
        return self._eval_series(self.phase_coeffs).to(torch.complex64)

    def ground_truth(self) -> Tensor:
        """``[F, N, N]`` complex64: ``ifft2c`` of the analytic single-coil (``P · f``) k-space on
        the ``N × N`` Cartesian grid, i.e. the band-limited object with background phase."""
        n = self.matrix
        k = self.cartesian_kspace(n, 1, coeffs=self.phase_coeffs[None])  # [F, 1, N, N]
        return ifft2c(k[:, 0])

    # -- k-space ------------------------------------------------------------------------------
    def _shifts(self, order: int) -> Tensor:
        """Series frequencies ``[(2K+1)², 2]`` (ky, kx) in radians per pixel."""
        idx = torch.arange(-order, order + 1, dtype=torch.float64)
        base = 2 * math.pi / (SERIES_PERIOD * self.matrix)
        m = idx[:, None].expand(-1, idx.numel()).reshape(-1)
        nn_ = idx[None, :].expand(idx.numel(), -1).reshape(-1)
        return torch.stack([m, nn_], dim=1) * base

    def kspace(self, traj: Tensor, coeffs: Tensor | None = None) -> Tensor:
        """Analytic multi-coil k-space at arbitrary locations.

        Parameters
        ----------
        traj : Tensor
            ``[F, 2, M]`` (ky, kx) radians/voxel, one set of points per frame.
        coeffs : Tensor, optional
            ``[C, K, K]`` series to use (default: coil × background phase).

        Returns
        -------
        Tensor
            ``[F, C, M]`` complex64, ``F(k)/N`` (the ortho scaling of the ``N × N`` grid).
        """
        if not isinstance(traj, torch.Tensor) or traj.is_complex():
            raise TypeError("traj must be a real torch.Tensor")
        if traj.ndim != 3 or traj.shape[0] != self.n_frames or traj.shape[1] != 2:
            raise ValueError(f"traj must have shape [F={self.n_frames}, 2, M], got {tuple(traj.shape)}")
        coeffs = self.combined_coeffs if coeffs is None else coeffs
        kk = coeffs.shape[-1]
        shifts = self._shifts((kk - 1) // 2).to(torch.float32)        # [J, 2]
        a = coeffs.reshape(coeffs.shape[0], -1).to(torch.complex64)   # [C, J]
        dev = traj.device
        out = []
        for f in range(self.n_frames):
            k = traj[f].to(torch.float32).cpu()                       # [2, M]
            pts = (k.T[:, None, :] - shifts[None, :, :]).reshape(-1, 2).T.contiguous()  # [2, M·J]
            g = ellipse_kspace(pts, self.ellipses[f]).reshape(k.shape[1], -1)  # [M, J]
            out.append((a @ g.T) / self.matrix)
        return torch.stack(out).to(dev)

    def cartesian_kspace(self, ny: int, readout_oversampling: int = 1, rows: Tensor | None = None,
                         coeffs: Tensor | None = None) -> Tensor:
        """Analytic multi-coil k-space on the centred Cartesian grid ``[F, C, ny, os·N]``.

        Row ``i`` has ``ky = 2π (i − ny//2)/ny`` and column ``j`` has
        ``kx = 2π (j − Nx//2)/Nx``, ``Nx = os·N`` (readout oversampling = denser kx = wider FOV
        along x). Values are ``F(k)/sqrt(ny·Nx)``. ``rows`` (``[F, ny]`` bool) restricts the
        computation to sampled lines; other rows are zero. Requires ``ny == N``.
        """
        n = self.matrix
        if ny != n:
            raise ValueError(f"ny must equal the phantom matrix {n}, got {ny}")
        os_ = int(readout_oversampling)
        if os_ < 1 or os_ != readout_oversampling:
            raise ValueError(f"readout_oversampling must be a positive integer, got {readout_oversampling}")
        coeffs = self.combined_coeffs if coeffs is None else coeffs
        order = (coeffs.shape[-1] - 1) // 2
        nc = coeffs.shape[0]
        nx = os_ * n
        lx = math.lcm(SERIES_PERIOD, os_)
        gx, tx = lx // os_, lx // SERIES_PERIOD       # grid and series steps in fine x units
        gy = SERIES_PERIOD                            # fine y unit = series step, grid step = L
        dy, dxu = 2 * math.pi / (SERIES_PERIOD * n), 2 * math.pi / (lx * n)
        m_idx = torch.arange(-order, order + 1)
        a = coeffs.reshape(nc, -1).to(torch.complex64)
        if rows is None:
            rows = torch.ones(self.n_frames, ny, dtype=torch.bool)
        rows = rows.to(torch.bool).cpu()
        if rows.shape != (self.n_frames, ny):
            raise ValueError(f"rows must have shape [{self.n_frames}, {ny}], got {tuple(rows.shape)}")
        u_col = (torch.arange(nx) - nx // 2) * gx
        xs = torch.arange(int(u_col[0]) - order * tx, int(u_col[-1]) + order * tx + 1)
        xi = (u_col[:, None] - m_idx[None, :] * tx) - xs[0]            # [nx, K] into xs
        out = torch.zeros(self.n_frames, nc, ny, nx, dtype=torch.complex64)
        norm = math.sqrt(ny * nx)
        for f in range(self.n_frames):
            lines = torch.nonzero(rows[f]).reshape(-1)
            if lines.numel() == 0:
                continue
            u_row = (lines - ny // 2) * gy
            need = (u_row[:, None] - m_idx[None, :])                   # [I, K] fine y units
            ys, yi = torch.unique(need, return_inverse=True)
            ky = (ys.to(torch.float64) * dy).to(torch.float32)
            kx = (xs.to(torch.float64) * dxu).to(torch.float32)
            pts = torch.stack([ky[:, None].expand(-1, kx.numel()), kx[None, :].expand(ky.numel(), -1)])
            g = ellipse_kspace(pts.reshape(2, -1), self.ellipses[f]).reshape(ky.numel(), kx.numel())
            # gathered[(m, n), i, j] = g[yi[i, m], xi[j, n]]
            gathered = g[yi.T[:, None, :, None], xi.T[None, :, None, :]]  # [K, K, I, nx]
            vals = a @ gathered.reshape(a.shape[1], -1)
            out[f, :, lines, :] = vals.reshape(nc, lines.numel(), nx) / norm
        return out


# ----------------------------------------------------------------------------------------------
# noise


def noise_covariance_matrix(n_coils: int, seed: int = 0, correlation: float = 0.3) -> Tensor:
    """A reproducible Hermitian positive-definite coil noise covariance ``[C, C]`` complex64.

    Built as ``Ψ = B Bᴴ`` with ``B = I + correlation · G / sqrt(C)`` (``G`` complex Gaussian) and
    then scaled to a mean diagonal of 1, so coils differ in noise level and are correlated.
    """
    if n_coils < 1:
        raise ValueError(f"n_coils must be >= 1, got {n_coils}")
    gen = torch.Generator().manual_seed(int(seed) + 7919)
    g = torch.complex(torch.randn(n_coils, n_coils, generator=gen, dtype=torch.float64),
                      torch.randn(n_coils, n_coils, generator=gen, dtype=torch.float64)) / math.sqrt(2)
    b = torch.eye(n_coils, dtype=torch.complex128) + correlation * g / math.sqrt(n_coils)
    psi = b @ b.conj().T
    psi = psi / psi.diagonal().real.mean()
    return psi.to(torch.complex64)


def _correlated_noise(shape_tail: tuple[int, ...], chol: Tensor, sigma: float,
                      gen: torch.Generator) -> Tensor:
    """Complex Gaussian ``[C, *shape_tail]`` with covariance ``sigma² · chol cholᴴ`` across C."""
    c = chol.shape[0]
    n = 1
    for s in shape_tail:
        n *= s
    w = torch.complex(torch.randn(c, n, generator=gen), torch.randn(c, n, generator=gen)) / math.sqrt(2)
    return (sigma * (chol @ w)).reshape(c, *shape_tail)


# ----------------------------------------------------------------------------------------------
# acquisition simulation


@dataclass
class PhantomScan:
    """A simulated acquisition with its ground truth.

    ``kspace`` is ``[F, C, Ny, os·N]`` (Cartesian, zeros where unsampled) or ``[F, C, M]``;
    ``mask`` ``[F, Ny, os·N]`` float32 (Cartesian, else None); ``trajectory`` ``[F, 2, M]``
    radians/voxel of the ``N × N`` grid (non-Cartesian, else None). ``encode_index`` ``[F, R]``
    gives, for non-Cartesian data, the spoke / interleave number of each of the ``R`` readouts of
    a frame (samples are readout-major, ``samples_per_readout`` each). ``noise`` ``[C, Nn]`` is a
    separate noise-only scan with the same covariance ``noise_covariance`` (absolute units, i.e.
    ``σ² Ψ``) as the noise added to ``kspace``. ``kspace_scale`` is the mean ground-truth magnitude
    inside the body, the unit of ``noise_std``.
    """

    kind: str
    kspace: Tensor
    mask: Tensor | None
    trajectory: Tensor | None
    coil_maps: Tensor
    ground_truth: Tensor
    body_mask: Tensor
    noise: Tensor
    noise_covariance: Tensor
    frame_times_s: Tensor
    fov_mm: float
    matrix: int
    readout_oversampling: int
    noise_std: float
    kspace_scale: float
    samples_per_readout: int
    encode_index: Tensor | None = None
    accel: float | None = None
    acs_lines: int = 0
    mask_kind: str | None = None
    n_encodings: int = 0
    rr_interval_s: float = 1.0
    extra: dict = field(default_factory=dict)

    @property
    def n_frames(self) -> int:
        return int(self.kspace.shape[0])

    @property
    def n_coils(self) -> int:
        return int(self.kspace.shape[1])


_KINDS = ("cartesian", "radial", "spiral")
_MASKS = ("variable_density", "uniform", "poisson")


def _match_arms(traj: Tensor, all_arms: Tensor, n_samples: int) -> Tensor:
    """Index of the design interleave of every arm of every frame, ``[F, R]`` int64."""
    f = traj.shape[0]
    arms = traj.reshape(f, 2, -1, n_samples).permute(0, 2, 1, 3).reshape(f, -1, 2 * n_samples)
    ref = all_arms.reshape(2, -1, n_samples).permute(1, 0, 2).reshape(-1, 2 * n_samples)
    return torch.cdist(arms.to(torch.float64), ref.to(torch.float64)[None].expand(f, -1, -1)).argmin(dim=-1)


def simulate_scan(kind: str, matrix: int = 128, n_frames: int = 16, n_coils: int = 12, *,
                  accel: float = 4, acs_lines: int = 24, mask_kind: str = "variable_density",
                  spokes_per_frame: int = 13, n_readout: int | None = None, interleaves: int = 32,
                  interleaves_per_frame: int = 4, readout_oversampling: int = 2,
                  noise_std: float = 0.01, noise_samples: int = 256, fov_mm: float = 320.0,
                  seed: int = 0, phantom: CardiacPhantom | None = None) -> PhantomScan:
    """Simulate a multi-coil (dynamic) acquisition of :class:`CardiacPhantom` with ground truth.

    Parameters
    ----------
    kind : {"cartesian", "radial", "spiral"}
        Cartesian lines (readout oversampled ``readout_oversampling``×, masks from
        ``recon_core.trajectories``), golden-angle radial (``spokes_per_frame`` spokes of
        ``n_readout`` samples, default ``readout_oversampling·N``) or spiral
        (``interleaves_per_frame`` of ``interleaves`` arms, ``n_readout`` samples each, default
        ``4N``).
    matrix, n_frames, n_coils : int
        Reconstruction matrix ``N``, frames over one cardiac cycle (1 = static), coils.
    accel, acs_lines, mask_kind
        Cartesian undersampling (``acs_lines`` central lines; Poisson-disc uses a
        ``acs_lines × acs_lines`` block, capped by the sample budget).
    noise_std : float
        Standard deviation of the complex k-space noise per sample, for a coil of average noise
        level, as a fraction of ``kspace_scale`` (mean ground-truth magnitude inside the body);
        with orthonormal transforms it is the image-domain noise of a fully sampled coil image
        relative to the object. Noise is correlated across coils with
        :func:`noise_covariance_matrix`.
    seed : int
        Seeds the masks / golden-angle independent noise; the anatomy and coils are fixed.

    Returns
    -------
    PhantomScan
    """
    from recon_core import trajectories as tr  # sibling module; imported lazily

    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
    if mask_kind not in _MASKS:
        raise ValueError(f"mask_kind must be one of {_MASKS}, got {mask_kind!r}")
    if not noise_std >= 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std}")
    os_ = int(readout_oversampling)
    if os_ < 1 or os_ != readout_oversampling:
        raise ValueError(f"readout_oversampling must be a positive integer, got {readout_oversampling}")
    if phantom is None:
        phantom = CardiacPhantom(matrix, n_frames, n_coils)
    elif (phantom.matrix, phantom.n_frames, phantom.n_coils) != (matrix, n_frames, n_coils):
        raise ValueError("phantom does not match matrix/n_frames/n_coils")
    n = matrix
    gt = phantom.ground_truth()
    body = phantom.body_mask()
    scale = float(gt.abs()[:, body].mean())
    mask = traj = enc = None
    n_enc = 0
    if kind == "cartesian":
        nx = os_ * n
        if mask_kind == "uniform":
            mask = tr.uniform_mask(n, nx, int(accel), acs_lines, n_frames=n_frames)
        elif mask_kind == "variable_density":
            mask = tr.variable_density_mask(n, nx, accel, acs_lines, n_frames=n_frames, seed=seed)
        else:
            side = int(min(acs_lines, math.floor(math.sqrt(n * nx / accel))))
            mask = tr.poisson_disc_mask(n, nx, accel, acs=(side, side), n_frames=n_frames, seed=seed)
        rows = mask.amax(dim=-1) > 0
        kspace = phantom.cartesian_kspace(n, os_, rows=rows) * mask[:, None].to(torch.complex64)
        samples = nx
        n_enc = n
    else:
        if kind == "radial":
            n_ro = int(n_readout) if n_readout is not None else os_ * n
            traj = tr.golden_angle_radial(spokes_per_frame, n_ro, n_frames=n_frames,
                                          readout_oversampling=n_ro / n)
            enc = torch.arange(n_frames * spokes_per_frame).reshape(n_frames, spokes_per_frame)
            n_enc = n_frames * spokes_per_frame
        else:
            n_ro = int(n_readout) if n_readout is not None else 4 * n
            traj = tr.spiral_trajectory(interleaves, n_ro, n_frames=n_frames,
                                        interleaves_per_frame=interleaves_per_frame, matrix_size=n)
            design = tr.spiral_trajectory(interleaves, n_ro, n_frames=1, matrix_size=n)[0]
            enc = _match_arms(traj, design, n_ro)
            n_enc = interleaves
        kspace = phantom.kspace(traj)
        samples = n_ro
    psi = noise_covariance_matrix(n_coils, seed=seed)
    chol = torch.linalg.cholesky(psi.to(torch.complex128)).to(torch.complex64)
    sigma = noise_std * scale
    gen = torch.Generator().manual_seed(int(seed))
    if sigma > 0:
        noise = _correlated_noise(tuple(kspace.shape[:1] + kspace.shape[2:]), chol, sigma, gen)
        noise = noise.movedim(0, 1)  # [F, C, ...]
        if mask is not None:
            noise = noise * mask[:, None]
        kspace = kspace + noise
    noise_scan = _correlated_noise((int(noise_samples),), chol, sigma, gen)
    return PhantomScan(
        kind=kind, kspace=kspace.to(torch.complex64), mask=mask, trajectory=traj,
        coil_maps=phantom.coil_maps(), ground_truth=gt, body_mask=body, noise=noise_scan,
        noise_covariance=(sigma ** 2) * psi, frame_times_s=phantom.frame_times_s.to(torch.float32),
        fov_mm=float(fov_mm), matrix=n, readout_oversampling=os_, noise_std=float(noise_std),
        kspace_scale=scale, samples_per_readout=samples, encode_index=enc,
        accel=float(accel) if kind == "cartesian" else None,
        acs_lines=int(acs_lines) if kind == "cartesian" else 0,
        mask_kind=mask_kind if kind == "cartesian" else None, n_encodings=n_enc,
        rr_interval_s=phantom.rr_s)
