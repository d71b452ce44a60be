"""Sparsity and low-rank priors: wavelets, finite differences / TV, singular-value thresholding.

These are the building blocks of the classical baselines (BRIEFS §6): L+S (SVT + temporal FFT
sparsity), k-t SLR (Schatten-p shrinkage + spatio-temporal TV), GRASP (smoothed temporal TV for
nonlinear CG) and wavelet-regularised CS. Transforms are :class:`~recon_core.linop.LinearOperator`
subclasses with exact adjoints; proximal maps and value functions are plain functions. All of them
work on complex64 (and complex128) tensors ``[..., F, Ny, Nx]`` on whatever device the input is on.

Contents
--------
* :class:`WaveletTransform` — orthonormal multi-level 2-D Daubechies wavelets (Haar = db1, db4 …),
  periodic boundary, coefficients packed in an image-sized tensor (adjoint = inverse).
* :func:`daubechies_filter` — the orthonormal low-pass filter, computed by spectral factorisation.
* :func:`soft_threshold`, :func:`group_soft_threshold` — ℓ1 / ℓ2,1 proximal maps (complex-safe).
* :class:`FiniteDifference` and the TV helpers (:func:`spatial_tv`, :func:`temporal_tv`,
  :func:`tv_value`, :func:`smoothed_tv`, :func:`spatial_tv_op`, :func:`temporal_tv_op`,
  :func:`spatiotemporal_tv_op`, :func:`temporal_tv_prox`).
* :func:`svt`, :func:`schatten_p_shrink` — Casorati singular-value thresholding.
* :class:`TemporalFFT` — unitary FFT along the frame axis (x-f sparsity in L+S).
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import numpy as np
import torch

from recon_core.fft import fftnc, ifftnc
from recon_core.linop import LinearOperator

Tensor = torch.Tensor

__all__ = [
    "daubechies_filter",
    "WaveletTransform",
    "soft_threshold",
    "group_soft_threshold",
    "FiniteDifference",
    "spatial_tv_op",
    "temporal_tv_op",
    "spatiotemporal_tv_op",
    "temporal_tv_prox",
    "tv_value",
    "spatial_tv",
    "temporal_tv",
    "smoothed_tv",
    "svt",
    "schatten_p_shrink",
    "TemporalFFT",
]

_BOUNDARIES = ("periodic", "neumann")


# --------------------------------------------------------------------------------------------
# wavelets
# --------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _daubechies_np(n_moments: int) -> tuple[float, ...]:
    # Spectral factorisation: |H(ω)|² = 2·cos²ᴺ(ω/2)·P(sin²(ω/2)) with
    # P(y) = Σ_{k<N} C(N−1+k, k) yᵏ. Each root y of P gives a pair z, 1/z of roots of
    # z² − (2 − 4y) z + 1 = 0; keeping the root inside the unit circle gives the minimum-phase
    # (extremal-phase, "dbN") filter H(z) ∝ (1 + z)ᴺ Π (z − zᵢ).
    N = n_moments
    p = [math.comb(N - 1 + k, k) for k in range(N)]  # ascending powers of y
    y_roots = np.roots(p[::-1]) if N > 1 else np.array([])
    z_roots = []
    for y in y_roots:
        r = np.roots([1.0, -(2.0 - 4.0 * y), 1.0])
        z_roots.append(r[np.argmin(np.abs(r))])
    h = np.real(np.poly(np.concatenate([-np.ones(N), np.array(z_roots, dtype=complex)])))
    h = h * (math.sqrt(2.0) / h.sum())
    return tuple(float(v) for v in h)


def daubechies_filter(n_moments: int) -> Tensor:
    """Orthonormal Daubechies low-pass analysis filter with ``n_moments`` vanishing moments.

    ``n_moments = 1`` is Haar ``[1, 1]/√2``; ``n_moments = 4`` is "db4" (8 taps). The filter has
    ``2·n_moments`` taps, sums to √2, is orthonormal to its even shifts, and the matching high-pass
    ``g[j] = (−1)ʲ h[L−1−j]`` annihilates polynomials of degree < ``n_moments``. Computed here by
    spectral factorisation (float64), not copied from a table.
    """
    if isinstance(n_moments, bool) or not isinstance(n_moments, int) or not 1 <= n_moments <= 10:
        raise ValueError(f"n_moments must be an integer in 1..10, got {n_moments!r}")
    return torch.tensor(_daubechies_np(n_moments), dtype=torch.float64)


def _parse_wavelet(name: str) -> int:
    if not isinstance(name, str):
        raise TypeError(f"wavelet must be a string such as 'haar' or 'db4', got {type(name).__name__}")
    key = name.lower()
    if key == "haar":
        return 1
    if key.startswith("db") and key[2:].isdigit() and 1 <= int(key[2:]) <= 10:
        return int(key[2:])
    raise ValueError(f"unknown wavelet {name!r}; use 'haar' or 'db1' … 'db10'")


def _analysis_1d(x: Tensor, dim: int, filt: Tensor, idx: Tensor) -> Tensor:
    """One periodic two-band split along ``dim``: [approximation | detail], each n/2 long."""
    x = x.movedim(dim, -1)
    blocks = x[..., idx.to(x.device)]  # [..., n/2, L]: x[(2k + j) mod n]
    out = blocks @ filt.to(device=x.device, dtype=x.dtype)  # [..., n/2, 2]
    out = torch.cat([out[..., 0], out[..., 1]], dim=-1)
    return out.movedim(-1, dim)


def _synthesis_1d(c: Tensor, dim: int, filt: Tensor, idx: Tensor) -> Tensor:
    """Transpose (= inverse) of :func:`_analysis_1d`."""
    c = c.movedim(dim, -1)
    n = c.shape[-1]
    ad = torch.stack([c[..., : n // 2], c[..., n // 2:]], dim=-1)  # [..., n/2, 2]
    contrib = ad @ filt.T.to(device=c.device, dtype=c.dtype)  # [..., n/2, L]
    out = torch.zeros(c.shape, dtype=c.dtype, device=c.device)
    out = out.index_add(-1, idx.reshape(-1).to(c.device), contrib.reshape(*contrib.shape[:-2], -1))
    return out.movedim(-1, dim)


class WaveletTransform(LinearOperator):
    """Orthonormal multi-level separable 2-D wavelet transform over the last two axes.

    Periodic boundary, Mallat packing: after each level the approximation band occupies the
    top-left ``Ny/2ˡ × Nx/2ˡ`` block, details fill the rest, so coefficients have the image's shape
    and ``adjoint`` is the exact inverse. Leading axes (frames, batch) are transformed independently.

    Sizes not divisible by ``2**levels``: with ``mode="reduce"`` (default) the number of levels is
    lowered to the largest ``l ≤ levels`` with ``2ˡ`` dividing both ``Ny`` and ``Nx`` (``self.levels``
    holds the value used; 0 makes it the identity); with ``mode="pad"`` the image is zero-padded at the
    bottom/right to the next multiple of ``2**levels`` (``oshape`` is then larger, the adjoint crops:
    still an exact adjoint pair and an isometry, ``AᴴA = I``, but ``AAᴴ ≠ I``).

    Parameters
    ----------
    shape
        Domain shape ``[..., Ny, Nx]`` of one item (e.g. ``[F, Ny, Nx]``).
    wavelet
        ``"haar"`` or ``"db1"`` … ``"db10"`` (``"db4"`` = 8-tap Daubechies).
    levels
        Requested number of decomposition levels (≥ 0).
    mode
        ``"reduce"`` or ``"pad"`` (see above).
    """

    def __init__(self, shape: Sequence[int], wavelet: str = "db4", levels: int = 3,
                 mode: str = "reduce") -> None:
        super().__init__()
        shape = tuple(int(s) for s in shape)
        if len(shape) < 2 or any(s <= 0 for s in shape):
            raise ValueError(f"shape must be [..., Ny, Nx] with positive sizes, got {shape}")
        if isinstance(levels, bool) or not isinstance(levels, int) or levels < 0:
            raise ValueError(f"levels must be a non-negative integer, got {levels!r}")
        if mode not in ("reduce", "pad"):
            raise ValueError(f"mode must be 'reduce' or 'pad', got {mode!r}")
        n_mom = _parse_wavelet(wavelet)
        self.wavelet = wavelet.lower()
        self.mode = mode
        ny, nx = shape[-2:]
        if mode == "reduce":
            lev = levels
            while lev > 0 and (ny % (2**lev) or nx % (2**lev)):
                lev -= 1
            py, px = ny, nx
        else:
            lev = levels
            m = 2**lev
            py, px = -(-ny // m) * m, -(-nx // m) * m
        self.levels = lev
        self.requested_levels = levels
        self.ishape = shape
        self.oshape = shape[:-2] + (py, px)
        self._pad = (py - ny, px - nx)
        h = daubechies_filter(n_mom)
        L = h.numel()
        g = h.flip(0) * torch.tensor([(-1.0) ** j for j in range(L)], dtype=torch.float64)
        self.register_buffer("filt", torch.stack([h, g], dim=1), persistent=False)  # [L, 2] float64
        # gather indices for every band length used: (2k + j) mod n
        self._sizes: list[tuple[int, int]] = [(py >> i, px >> i) for i in range(lev)]
        for n in sorted({s for pair in self._sizes for s in pair}):
            k = torch.arange(n // 2).unsqueeze(1)
            j = torch.arange(L).unsqueeze(0)
            self.register_buffer(f"idx{n}", (2 * k + j) % n, persistent=False)

    def _idx(self, n: int) -> Tensor:
        return getattr(self, f"idx{n}")

    def _check(self, x: Tensor, expected: tuple[int, ...], name: str) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if tuple(x.shape[-2:]) != expected:
            raise ValueError(f"{name} must end in {expected}, got shape {tuple(x.shape)}")

    def forward(self, x: Tensor) -> Tensor:
        """Image ``[..., Ny, Nx]`` → packed coefficients ``[..., Ny', Nx']``."""
        self._check(x, self.ishape[-2:], "x")
        if any(self._pad):
            x = torch.nn.functional.pad(x, (0, self._pad[1], 0, self._pad[0]))
        out = x
        filt = self.filt
        for ny, nx in self._sizes:
            blk = out[..., :ny, :nx]
            blk = _analysis_1d(blk, -1, filt, self._idx(nx))
            blk = _analysis_1d(blk, -2, filt, self._idx(ny))
            out = torch.cat([torch.cat([blk, out[..., :ny, nx:]], dim=-1), out[..., ny:, :]], dim=-2)
        return out

    def adjoint(self, c: Tensor) -> Tensor:
        """Packed coefficients → image (the inverse transform, cropped when padded)."""
        self._check(c, self.oshape[-2:], "coefficients")
        out = c
        filt = self.filt
        for ny, nx in reversed(self._sizes):
            blk = out[..., :ny, :nx]
            blk = _synthesis_1d(blk, -2, filt, self._idx(ny))
            blk = _synthesis_1d(blk, -1, filt, self._idx(nx))
            out = torch.cat([torch.cat([blk, out[..., :ny, nx:]], dim=-1), out[..., ny:, :]], dim=-2)
        if any(self._pad):
            out = out[..., : self.ishape[-2], : self.ishape[-1]]
        return out

    def normal(self, x: Tensor) -> Tensor:
        """``AᴴA`` is the identity (orthonormal, or isometric with padding)."""
        self._check(x, self.ishape[-2:], "x")
        return x

    def extra_repr(self) -> str:
        return f"wavelet={self.wavelet!r}, levels={self.levels}, mode={self.mode!r}, " + super().extra_repr()


# --------------------------------------------------------------------------------------------
# thresholding
# --------------------------------------------------------------------------------------------

def _check_lam(lam: float | Tensor) -> None:
    if isinstance(lam, torch.Tensor):
        if lam.is_complex():
            raise TypeError("lam must be real")
        if bool((lam < 0).any()):
            raise ValueError("lam must be >= 0")
    else:
        try:
            f = float(lam)
        except (TypeError, ValueError):
            raise TypeError(f"lam must be a real number or tensor, got {type(lam).__name__}") from None
        if not f >= 0:
            raise ValueError(f"lam must be >= 0, got {lam!r}")


def soft_threshold(x: Tensor, lam: float | Tensor) -> Tensor:
    """Proximal map of ``lam·‖x‖₁``: shrink magnitudes by ``lam``, keep the phase (sign if real).

    ``lam`` may be a scalar or a broadcastable non-negative tensor (e.g. per-band weights).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    _check_lam(lam)
    mag = x.abs()
    scale = torch.clamp(mag - lam, min=0.0) / torch.clamp(mag, min=torch.finfo(mag.dtype).tiny)
    return x * scale


def group_soft_threshold(x: Tensor, lam: float | Tensor, dim: int = 0) -> Tensor:
    """Proximal map of ``lam·Σ‖x_g‖₂`` with groups along ``dim`` (isotropic-TV shrinkage).

    Each vector along ``dim`` (e.g. the stacked differences from :class:`FiniteDifference`, which
    sit on axis 0 of ``[n_dims, *shape]``) is shortened by ``lam``, direction kept.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    _check_lam(lam)
    mag = torch.linalg.vector_norm(x, dim=dim, keepdim=True)
    scale = torch.clamp(mag - lam, min=0.0) / torch.clamp(mag, min=torch.finfo(mag.dtype).tiny)
    return x * scale


# --------------------------------------------------------------------------------------------
# finite differences and TV
# --------------------------------------------------------------------------------------------

def _fdiff(x: Tensor, dim: int, boundary: str) -> Tensor:
    """Forward difference ``x[i+1] − x[i]``; periodic wraps, Neumann sets the last entry to 0."""
    if boundary == "periodic":
        return torch.roll(x, -1, dims=dim) - x
    n = x.shape[dim]
    d = x.narrow(dim, 1, n - 1) - x.narrow(dim, 0, n - 1)
    return torch.cat([d, torch.zeros_like(x.narrow(dim, 0, 1))], dim=dim)


def _fdiff_adj(y: Tensor, dim: int, boundary: str) -> Tensor:
    """Exact adjoint of :func:`_fdiff` (a negative backward difference)."""
    if boundary == "periodic":
        return torch.roll(y, 1, dims=dim) - y
    n = y.shape[dim]
    zero = torch.zeros_like(y.narrow(dim, 0, 1))
    z = torch.cat([y.narrow(dim, 0, n - 1), zero], dim=dim)  # last difference is identically 0
    return torch.cat([zero, z.narrow(dim, 0, n - 1)], dim=dim) - z


def _check_boundary(boundary: str) -> str:
    if boundary not in _BOUNDARIES:
        raise ValueError(f"boundary must be one of {_BOUNDARIES}, got {boundary!r}")
    return boundary


def _norm_boundaries(boundary: str | Sequence[str], n: int) -> tuple[str, ...]:
    """One boundary per differenced axis: a single name applies to all ``n`` of them."""
    if isinstance(boundary, str):
        return (_check_boundary(boundary),) * n
    b = tuple(boundary)
    if len(b) != n:
        raise ValueError(f"boundary has {len(b)} entries but there are {n} dims")
    return tuple(_check_boundary(v) for v in b)


def _norm_dims(dims: Sequence[int], ndim: int, name: str = "dims") -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in dims)
    except TypeError:
        raise TypeError(f"{name} must be a sequence of ints, got {dims!r}") from None
    if not dims:
        raise ValueError(f"{name} must not be empty")
    out = []
    for d in dims:
        if not -ndim <= d < ndim:
            raise ValueError(f"{name} entry {d} out of range for {ndim} axes")
        out.append(d - ndim if d >= 0 else d)
    if len(set(out)) != len(out):
        raise ValueError(f"{name} has repeated axes: {dims}")
    return tuple(out)


def _norm_weights(weights: Sequence[float] | None, n: int) -> tuple[float, ...]:
    if weights is None:
        return (1.0,) * n
    w = tuple(float(v) for v in weights)
    if len(w) != n:
        raise ValueError(f"weights has {len(w)} entries but there are {n} dims")
    if any(not math.isfinite(v) for v in w):
        raise ValueError(f"weights must be finite, got {w}")
    return w


def _weighted_diffs(x: Tensor, dims: Sequence[int], boundary: str | Sequence[str],
                    weights: Sequence[float] | None) -> tuple[list[Tensor], tuple[int, ...], tuple[str, ...],
                                                              tuple[float, ...]]:
    """Checked arguments of the TV functions and the differences ``w_d·D_d x`` they all start from."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    dims = _norm_dims(dims, x.ndim)
    bounds = _norm_boundaries(boundary, len(dims))
    w = _norm_weights(weights, len(dims))
    return [wi * _fdiff(x, d, b) for d, b, wi in zip(dims, bounds, w)], dims, bounds, w


class FiniteDifference(LinearOperator):
    """Stacked first-order forward differences along ``dims``: ``[..., *shape] → [..., len(dims), *shape]``.

    ``D x = stack_d(w_d · (x[i+1] − x[i]) along d)``. ``boundary="periodic"`` wraps around;
    ``"neumann"`` sets the difference at the last index to zero (no wrap; the right choice for a
    non-periodic time series). The adjoint is exact for both. ``boundary`` may also give one value
    per entry of ``dims`` (k-t SLR: periodic in space, Neumann in time). ``weights`` scales each
    direction (e.g. k-t SLR's (x, y, t) weights); it defaults to 1.

    Parameters
    ----------
    shape
        Shape of one item, e.g. ``[F, Ny, Nx]``.
    dims
        Axes of ``shape`` to difference (non-negative indices count from the start of ``shape``,
        so leading batch axes are allowed on inputs).
    boundary
        ``"periodic"`` or ``"neumann"``, or a sequence of them, one per entry of ``dims``.
    weights
        One real weight per entry of ``dims``.
    """

    def __init__(self, shape: Sequence[int], dims: Sequence[int], boundary: str | Sequence[str] = "periodic",
                 weights: Sequence[float] | None = None) -> None:
        super().__init__()
        shape = tuple(int(s) for s in shape)
        if not shape or any(s <= 0 for s in shape):
            raise ValueError(f"shape must have positive sizes, got {shape}")
        self.dims = _norm_dims(dims, len(shape))
        self.boundaries = _norm_boundaries(boundary, len(self.dims))
        #: The common boundary name, or the per-axis tuple when they differ.
        self.boundary: str | tuple[str, ...] = (self.boundaries[0] if len(set(self.boundaries)) == 1
                                                else self.boundaries)
        self.weights = _norm_weights(weights, len(self.dims))
        self.ishape = shape
        self.oshape = (len(self.dims),) + shape
        self._stack = -(len(shape) + 1)

    def _check(self, x: Tensor, expected: tuple[int, ...], name: str) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim < len(expected) or tuple(x.shape[-len(expected):]) != expected:
            raise ValueError(f"{name} must end in {expected}, got shape {tuple(x.shape)}")

    def forward(self, x: Tensor) -> Tensor:
        self._check(x, self.ishape, "x")
        return torch.stack([w * _fdiff(x, d, b) for d, b, w in zip(self.dims, self.boundaries, self.weights)],
                           dim=self._stack)

    def adjoint(self, y: Tensor) -> Tensor:
        self._check(y, self.oshape, "y")
        parts = y.unbind(dim=self._stack)
        out = None
        for p, d, b, w in zip(parts, self.dims, self.boundaries, self.weights):
            t = w * _fdiff_adj(p, d, b)
            out = t if out is None else out + t
        return out

    def extra_repr(self) -> str:
        own = f"dims={self.dims}, boundary={self.boundary!r}, weights={self.weights}, "
        return own + super().extra_repr()


def spatial_tv_op(shape: Sequence[int], boundary: str = "periodic") -> FiniteDifference:
    """Spatial gradient over the last two axes of ``shape`` (``[..., Ny, Nx]``), for spatial TV."""
    n = len(tuple(shape))
    if n < 2:
        raise ValueError(f"shape must have at least 2 axes, got {tuple(shape)}")
    return FiniteDifference(shape, dims=(n - 2, n - 1), boundary=boundary)


def temporal_tv_op(shape: Sequence[int], boundary: str = "neumann") -> FiniteDifference:
    """Temporal difference along the frame axis (axis 0 of ``[F, Ny, Nx]``) for temporal TV.

    Default ``"neumann"``: frame F−1 is not compared with frame 0 (as in GRASP); use
    ``"periodic"`` for a cardiac cycle that wraps.
    """
    if len(tuple(shape)) != 3:
        raise ValueError(f"shape must be [F, Ny, Nx], got {tuple(shape)}")
    return FiniteDifference(shape, dims=(0,), boundary=boundary)


def spatiotemporal_tv_op(shape: Sequence[int], weights: Sequence[float] = (1.0, 1.0, 1.0),
                         spatial_boundary: str = "periodic", temporal_boundary: str = "neumann"
                         ) -> FiniteDifference:
    """Weighted (x, y, t) differences of ``[F, Ny, Nx]``, stacked in that order, for k-t SLR's TV.

    Periodic in space and Neumann in time by default (a single frame has no temporal difference).
    ``weights`` are ``(w_x, w_y, w_t)``.
    """
    if len(tuple(shape)) != 3:
        raise ValueError(f"shape must be [F, Ny, Nx], got {tuple(shape)}")
    return FiniteDifference(shape, dims=(2, 1, 0), weights=weights,
                            boundary=(spatial_boundary, spatial_boundary, temporal_boundary))


def temporal_tv_prox(v: Tensor, lam: float, n_iter: int = 30, dual: Tensor | None = None
                     ) -> tuple[Tensor, Tensor]:
    """Proximal map of ``lam·Σ|x[t+1] − x[t]|`` (temporal TV, Neumann boundary) of ``v [F, Ny, Nx]``.

    Solved on the dual (Chambolle-type projected gradient): ``x = v − Dᴴp`` with ``|p| ≤ lam``
    pointwise, ``p ← clip(p + τ D(v − Dᴴp))``, ``τ = 1/4 ≤ 1/‖DDᴴ‖``, with ``D`` =
    :func:`temporal_tv_op`. A fixed number of iterations (not a tolerance) keeps the cost bounded;
    ``dual`` warm-starts ``p`` (L+S passes the previous iteration's).

    Returns
    -------
    x, p
        The prox and the final dual variable (``[1, F, Ny, Nx]``, for warm starts).
    """
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"v must be a torch.Tensor, got {type(v).__name__}")
    _check_lam(lam)
    D = temporal_tv_op(tuple(v.shape))
    if dual is not None and tuple(dual.shape) != D.oshape:
        raise ValueError(f"dual must have shape {D.oshape}, got {tuple(dual.shape)}")
    if v.shape[0] < 2 or lam <= 0:
        return v.clone(), torch.zeros(D.oshape, dtype=v.dtype, device=v.device) if dual is None else dual
    p = torch.zeros(D.oshape, dtype=v.dtype, device=v.device) if dual is None else dual
    tau = 0.25
    for _ in range(n_iter):
        p = p + tau * D(v - D.adjoint(p))
        p = p * (lam / torch.clamp(p.abs(), min=lam))  # project onto |p| ≤ lam
    return v - D.adjoint(p), p


def tv_value(x: Tensor, dims: Sequence[int], isotropic: bool = True,
             boundary: str | Sequence[str] = "periodic", weights: Sequence[float] | None = None) -> Tensor:
    """Total variation of ``x`` over the axes ``dims`` (axes of ``x``), a real 0-d tensor.

    Isotropic: ``Σᵢ √(Σ_d |w_d D_d x|ᵢ²)``; anisotropic: ``Σ_d Σᵢ |w_d D_d x|ᵢ``.
    """
    diffs = _weighted_diffs(x, dims, boundary, weights)[0]
    if isotropic:
        return torch.sqrt(sum(di.abs() ** 2 for di in diffs)).sum()
    return sum(di.abs().sum() for di in diffs)


def spatial_tv(x: Tensor, isotropic: bool = True, boundary: str = "periodic") -> Tensor:
    """Spatial TV over the last two axes, summed over frames (see :func:`tv_value`)."""
    return tv_value(x, dims=(-2, -1), isotropic=isotropic, boundary=boundary)


def temporal_tv(x: Tensor, boundary: str = "neumann") -> Tensor:
    """Temporal TV ``Σ |x[t+1] − x[t]|`` along the frame axis (-3 of ``[..., F, Ny, Nx]``)."""
    if not isinstance(x, torch.Tensor) or x.ndim < 3:
        raise ValueError("x must be a tensor [..., F, Ny, Nx]")
    return tv_value(x, dims=(-3,), isotropic=True, boundary=boundary)


def smoothed_tv(x: Tensor, dims: Sequence[int] = (-3,), eps: float = 1e-15,
                boundary: str | Sequence[str] = "neumann",
                weights: Sequence[float] | None = None) -> tuple[Tensor, Tensor]:
    """Smoothed (differentiable) TV and its gradient, for nonlinear CG (GRASP).

    ``f(x) = Σᵢ √(Σ_d |w_d D_d x|ᵢ² + eps)`` and ``∇f = Σ_d w_d D_dᴴ(w_d D_d x / √(…))`` in torch's
    convention (∂f/∂Re + i·∂f/∂Im), so it plugs into :func:`recon_core.solvers.nonlinear_cg`.
    The default is temporal TV (axis -3, Neumann boundary, eps = 1e-15 as in GRASP).

    Returns
    -------
    value, grad
        Real 0-d tensor and a tensor like ``x``.
    """
    if not float(eps) > 0:
        raise ValueError(f"eps must be > 0, got {eps!r}")
    diffs, dims, bounds, w = _weighted_diffs(x, dims, boundary, weights)
    mag = torch.sqrt(sum(di.abs() ** 2 for di in diffs) + eps)
    grad = None
    for di, d, b, wi in zip(diffs, dims, bounds, w):
        t = wi * _fdiff_adj(di / mag, d, b)
        grad = t if grad is None else grad + t
    return mag.sum(), grad


# --------------------------------------------------------------------------------------------
# low rank
# --------------------------------------------------------------------------------------------

def schatten_p_shrink(s: Tensor, lam: float | Tensor, p: float = 1.0) -> Tensor:
    """Shrink singular values for a Schatten-p penalty (k-t SLR), ``0 ≤ p ≤ 1``.

    ``s ↦ max(s − lam·s^(p−1), 0)``: the majorise–minimise step used by k-t SLR for
    ``lam/p·Σ sᵢᵖ``. ``p = 1`` is plain soft thresholding ``max(s − lam, 0)`` (nuclear norm). For
    ``p < 1`` the amount removed, ``lam·s^(p−1)``, decreases as ``s`` grows, so large singular values
    are shrunk less (less bias) while small ones are still set to zero.
    """
    if not isinstance(s, torch.Tensor):
        raise TypeError(f"s must be a torch.Tensor, got {type(s).__name__}")
    if s.is_complex():
        raise TypeError("s must be real (singular values)")
    if bool((s < 0).any()):
        raise ValueError("s must be non-negative (singular values)")
    _check_lam(lam)
    p = float(p)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p!r}")
    if p == 1.0:
        return torch.clamp(s - lam, min=0.0)
    pos = s > 0
    safe = torch.where(pos, s, torch.ones_like(s))
    out = torch.clamp(safe - lam * safe ** (p - 1.0), min=0.0)
    return torch.where(pos, out, torch.zeros_like(s))


def svt(x: Tensor, lam: float, p: float = 1.0, relative: bool = False) -> tuple[Tensor, Tensor]:
    """Singular-value thresholding of the Casorati matrix of a dynamic series.

    ``x [..., F, Ny, Nx]`` is reshaped to the (Ny·Nx) × F Casorati matrix (leading axes batched),
    its thin SVD is taken (in complex128 for stability), singular values are shrunk with
    :func:`schatten_p_shrink` and the matrix is rebuilt. This is the proximal map of
    ``lam·‖·‖_*`` for ``p = 1`` (L+S's L-update) and k-t SLR's Schatten-p step for ``p < 1``.

    Parameters
    ----------
    x
        Series ``[..., F, Ny, Nx]``.
    lam
        Threshold (≥ 0). With ``relative=True`` it is a fraction of the largest singular value
        (Otazo's convention), otherwise absolute.
    p
        Schatten exponent in [0, 1].
    relative
        See ``lam``.

    Returns
    -------
    x_lowrank, singular_values
        The thresholded series (same shape and dtype as ``x``) and the singular values *before*
        shrinkage, descending, ``[..., min(F, Ny·Nx)]`` (real, the real dtype matching ``x``).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim < 3:
        raise ValueError(f"x must be [..., F, Ny, Nx], got shape {tuple(x.shape)}")
    _check_lam(lam)
    F = x.shape[-3]
    work_dtype = torch.complex128 if x.is_complex() else torch.float64
    M = x.reshape(*x.shape[:-3], F, -1).to(work_dtype)  # F × (Ny·Nx): the transposed Casorati matrix
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    thr = lam * S[..., :1] if relative else lam
    S_new = schatten_p_shrink(S, thr, p)
    L = (U * S_new.to(U.dtype).unsqueeze(-2)) @ Vh
    real_dtype = torch.float64 if x.dtype in (torch.complex128, torch.float64) else torch.float32
    return L.reshape(x.shape).to(x.dtype), S.to(real_dtype)


# --------------------------------------------------------------------------------------------
# temporal FFT
# --------------------------------------------------------------------------------------------

class TemporalFFT(LinearOperator):
    """Unitary FFT along the frame axis (axis 0 of ``[F, Ny, Nx]``), the x-f transform of L+S.

    Centred by default (zero temporal frequency at index ``F // 2``); orthonormal, so the adjoint
    is the inverse. Leading batch axes are allowed.
    """

    def __init__(self, shape: Sequence[int], centered: bool = True) -> None:
        super().__init__()
        shape = tuple(int(s) for s in shape)
        if not shape or any(s <= 0 for s in shape):
            raise ValueError(f"shape must have positive sizes, got {shape}")
        self.ishape = self.oshape = shape
        self.centered = bool(centered)
        self._dim = -len(shape)

    def _check(self, x: Tensor, name: str) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim < len(self.ishape) or tuple(x.shape[-len(self.ishape):]) != self.ishape:
            raise ValueError(f"{name} must end in {self.ishape}, got shape {tuple(x.shape)}")

    def forward(self, x: Tensor) -> Tensor:
        self._check(x, "x")
        return fftnc(x, (self._dim,), centered=self.centered)

    def adjoint(self, y: Tensor) -> Tensor:
        self._check(y, "y")
        return ifftnc(y, (self._dim,), centered=self.centered)

    def normal(self, x: Tensor) -> Tensor:
        self._check(x, "x")
        return x
