"""Encoding operators for multi-coil MRI: building blocks, Cartesian and non-Cartesian SENSE, NUFFT.

Shapes (DESIGN.md conventions):

* images ``[F, Ny, Nx]`` complex64 (``F`` frames), coil maps ``[C, Ny, Nx]`` complex64;
* Cartesian k-space ``[F, C, Ny, Nx]`` (centred), mask ``[F or 1, Ny, Nx]`` float32;
* non-Cartesian k-space ``[F, C, M]``, trajectory ``[F, 2, M]`` float32 in radians/voxel,
  optional weights ``[F, M]`` float32 (e.g. the square root of a DCF).

Building blocks (each a :class:`~recon_core.linop.LinearOperator` with a frame axis first):
:class:`CoilMaps` (``[F, Ny, Nx] → [F, C, Ny, Nx]``), :class:`FFT2` (centred orthonormal 2-D FFT
over the last two axes), :class:`Sampling` (Cartesian mask multiply), :class:`Nufft`
(``[F, C, Ny, Nx] → [F, C, M]``) and :class:`SampleWeights` (``[F, C, M]`` weights). Composed,

* ``Sampling(mask, F, C) @ FFT2((F, C, Ny, Nx)) @ CoilMaps(maps, F)`` is Cartesian SENSE and
* ``SampleWeights(w, F, C) @ Nufft(traj, (Ny, Nx), n_coils=C) @ CoilMaps(maps, F)`` is
  non-Cartesian SENSE.

:class:`CartesianSense` and :class:`NonCartesianSense` are exactly these compositions (they
subclass :class:`~recon_core.linop.ComposedOperator`) with named attributes and fast normal
operators: an FFT path that shifts maps and mask once, and the Toeplitz embedding below. Every
frame-indexed operator has ``select_frames(idx)``, which returns the same operator on frames
``idx`` (masks shared by all frames stay shared; a built Toeplitz kernel is sliced, not rebuilt).

All operators accept extra leading batch axes in front of these shapes (``[..., F, Ny, Nx]``),
are differentiable, keep their constants in buffers (``op.to(device)`` moves everything) and
never choose a device: outputs live where the inputs and buffers live.

The non-Cartesian normal operator can use a Toeplitz embedding: ``AᴴW²A`` restricted to an
``Ny×Nx`` image is a convolution with the point-spread function
``h(d) = Σ_m w_m² exp(i k_m·d) / (Ny·Nx)``, ``d ∈ [-(N-1), N-1]``. Sampling ``h`` on a 2N grid
turns this into a circular convolution of the zero-padded image, applied with FFTs:
``crop(IFFT(K · FFT(pad(S_c x))))``, ``K = FFT(h)``. Because ``h(-d) = conj(h(d))`` (and the
one unused row/column at ``d = -N`` is set to zero) ``K`` is real, so it is stored as float32.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .fft import fft2c, ifft2c
from .linop import ComposedOperator, LinearOperator
from .nufft import DEFAULT_BACKEND, NufftBackend, get_backend

Tensor = torch.Tensor

__all__ = [
    "CoilMaps",
    "FFT2",
    "Sampling",
    "SampleWeights",
    "Nufft",
    "CartesianSense",
    "NonCartesianSense",
    "make_encoding_operator",
    "OPERATORS",
]


# ----------------------------------------------------------------------------------------------
# argument checks
# ----------------------------------------------------------------------------------------------

def _check_maps(coil_maps: Tensor) -> None:
    if not isinstance(coil_maps, Tensor):
        raise TypeError(f"coil_maps must be a torch.Tensor, got {type(coil_maps).__name__}")
    if coil_maps.dtype != torch.complex64:
        raise TypeError(f"coil_maps must be complex64, got {coil_maps.dtype}")
    if coil_maps.ndim != 3:
        raise ValueError(f"coil_maps must have shape [C, Ny, Nx], got {tuple(coil_maps.shape)}")


def _image_shape(image_shape: Sequence[int]) -> tuple[int, int]:
    try:
        shape = tuple(int(s) for s in image_shape)
    except TypeError as exc:
        raise TypeError(f"image_shape must be a pair (Ny, Nx), got {image_shape!r}") from exc
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"image_shape must be (Ny, Nx) with positive sizes, got {tuple(image_shape)}")
    return shape  # type: ignore[return-value]


def _n_frames(n_frames: int) -> int:
    if isinstance(n_frames, bool) or not isinstance(n_frames, int) or n_frames < 1:
        raise ValueError(f"n_frames must be a positive int, got {n_frames!r}")
    return n_frames


def _real_float(name: str, t: Tensor) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.is_complex():
        raise TypeError(f"{name} must be real (float32), got {t.dtype}")
    return t.to(torch.float32)


def _check_trajectory(trajectory: Tensor, n_frames: int | None = None) -> Tensor:
    trajectory = _real_float("trajectory", trajectory)
    if trajectory.ndim != 3 or trajectory.shape[1] != 2:
        raise ValueError(f"trajectory must have shape [F, 2, M] (ky, kx in radians/voxel), "
                         f"got {tuple(trajectory.shape)}")
    if n_frames is not None and trajectory.shape[0] != n_frames:
        if trajectory.shape[0] != 1:
            raise ValueError(f"trajectory has {trajectory.shape[0]} frames but n_frames is {n_frames}")
        trajectory = trajectory.expand(n_frames, -1, -1)
    return trajectory.contiguous()


def _split_batch(x: Tensor, core: tuple[int, ...], name: str) -> tuple[int, ...]:
    """Check that ``x`` ends in ``core`` and return its leading batch shape."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    n = len(core)
    if x.ndim < n or tuple(x.shape[-n:]) != core:
        raise ValueError(f"{name} must have shape [..., {', '.join(map(str, core))}], got {tuple(x.shape)}")
    return tuple(x.shape[:-n])


def _check_frames_tail(x: Tensor, n_frames: int, tail: tuple[int, ...], name: str) -> None:
    """Check ``x`` is ``[..., F, channels, *tail]`` (any channel count, any batch axes)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    n = len(tail)
    if x.ndim < n + 2 or x.shape[-n - 2] != n_frames or tuple(x.shape[-n:]) != tail:
        raise ValueError(f"{name} must have shape [..., {n_frames}, channels, {', '.join(map(str, tail))}], "
                         f"got {tuple(x.shape)}")


def _frame_index(idx: Tensor | Sequence[int], n_frames: int, device: torch.device) -> Tensor:
    """``idx`` (LongTensor or sequence of ints) as a 1-D int64 tensor on ``device``, range-checked."""
    if isinstance(idx, Tensor):
        if idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
            raise TypeError(f"frame indices must be integers, got a {idx.dtype} tensor")
        t = idx.detach().reshape(-1).to(torch.long)
    else:
        try:
            vals = [int(i) for i in idx]
        except TypeError as exc:
            raise TypeError(f"frame indices must be a LongTensor or a sequence of ints, got {idx!r}") from exc
        t = torch.tensor(vals, dtype=torch.long)
    if t.numel() == 0:
        raise ValueError("select_frames needs at least one frame index")
    lo, hi = (int(v) for v in torch.aminmax(t))  # checked where idx lives: one sync at most
    if lo < 0 or hi >= n_frames:
        raise IndexError(f"frame indices must lie in [0, {n_frames}), got min {lo}, max {hi}")
    return t.to(device)


def _select_rows(t: Tensor, idx: Tensor) -> Tensor:
    """Frames ``idx`` of a per-frame tensor ``[F or 1, ...]`` (a shared ``[1, ...]`` one stays shared)."""
    return t if t.shape[0] == 1 else t.index_select(0, idx.to(t.device))


# ----------------------------------------------------------------------------------------------
# building blocks
# ----------------------------------------------------------------------------------------------

class CoilMaps(LinearOperator):
    """Coil-sensitivity expansion ``x[..., F, Ny, Nx] → S · x`` of shape ``[..., F, C, Ny, Nx]``.

    The adjoint combines coils, ``Σ_c conj(S_c) y_c``; the normal operator is ``Σ_c |S_c|² · x``.

    Parameters
    ----------
    coil_maps:
        ``[C, Ny, Nx]`` complex64 sensitivities (shared by all frames).
    n_frames:
        Number of frames ``F`` (sets ``ishape``/``oshape``).
    """

    def __init__(self, coil_maps: Tensor, n_frames: int = 1) -> None:
        super().__init__()
        _check_maps(coil_maps)
        self.n_frames = _n_frames(n_frames)
        self.register_buffer("coil_maps", coil_maps)
        C, Ny, Nx = coil_maps.shape
        self.ishape = (self.n_frames, Ny, Nx)
        self.oshape = (self.n_frames, C, Ny, Nx)

    def forward(self, x: Tensor) -> Tensor:
        _split_batch(x, self.ishape, "x")
        return x.unsqueeze(-3) * self.coil_maps

    def adjoint(self, y: Tensor) -> Tensor:
        _split_batch(y, self.oshape, "y")
        return torch.sum(self.coil_maps.conj() * y, dim=-3)

    def normal(self, x: Tensor) -> Tensor:
        _split_batch(x, self.ishape, "x")
        s = self.coil_maps
        return x * torch.sum(s.real * s.real + s.imag * s.imag, dim=0)

    def select_frames(self, idx: Tensor | Sequence[int]) -> "CoilMaps":
        idx = _frame_index(idx, self.n_frames, self.coil_maps.device)
        return CoilMaps(self.coil_maps, int(idx.numel()))


class FFT2(LinearOperator):
    """Centred orthonormal 2-D FFT over the last two axes (:func:`recon_core.fft.fft2c`); unitary.

    Parameters
    ----------
    shape:
        Item shape ``[F, ..., Ny, Nx]``; with three or more axes, axis 0 is the frame axis (so
        :meth:`select_frames` works), a 2-D ``[Ny, Nx]`` shape has no frames. Extra leading batch
        axes are accepted at call time.
    """

    def __init__(self, shape: Sequence[int]) -> None:
        super().__init__()
        try:
            shape = tuple(int(s) for s in shape)
        except TypeError as exc:
            raise TypeError(f"shape must be a sequence of ints, got {shape!r}") from exc
        if len(shape) < 2 or min(shape) < 1:
            raise ValueError(f"shape must be [..., Ny, Nx] with positive sizes, got {shape}")
        self.ishape = self.oshape = shape

    def forward(self, x: Tensor) -> Tensor:
        _split_batch(x, self.ishape[-2:], "x")
        return fft2c(x)

    def adjoint(self, y: Tensor) -> Tensor:
        _split_batch(y, self.oshape[-2:], "y")
        return ifft2c(y)

    def normal(self, x: Tensor) -> Tensor:
        _split_batch(x, self.ishape[-2:], "x")
        return x

    def select_frames(self, idx: Tensor | Sequence[int]) -> "FFT2":
        if len(self.ishape) < 3:
            raise NotImplementedError(f"FFT2 of shape {self.ishape} has no frame axis: select_frames needs a "
                                      f"shape [F, ..., Ny, Nx]")
        idx = _frame_index(idx, self.ishape[0], torch.device("cpu"))
        return FFT2((int(idx.numel()),) + self.ishape[1:])


class Sampling(LinearOperator):
    """Cartesian sampling: ``y[..., F, C, Ny, Nx] = mask[F or 1, Ny, Nx] · x`` (real mask or weights).

    Self-adjoint; the normal operator multiplies by ``mask²``. Any channel count is accepted at
    call time (``n_coils`` only sets ``ishape``/``oshape``). :class:`SampleWeights` is the same
    operator on non-Cartesian samples.

    Parameters
    ----------
    mask:
        ``[F, Ny, Nx]``, ``[1, Ny, Nx]`` (shared by all frames) or ``[Ny, Nx]``, real.
    n_frames:
        Number of frames ``F``.
    n_coils:
        Channel count used for ``ishape``/``oshape``.
    """

    #: name of the weights buffer and number of trailing (sample) axes it covers
    _buffer, _tail = "mask", 2

    def __init__(self, mask: Tensor, n_frames: int, n_coils: int = 1) -> None:
        super().__init__()
        values = _real_float(self._buffer, mask)
        n_frames = _n_frames(n_frames)
        if values.ndim == self._tail:
            values = values.unsqueeze(0)
        if values.ndim != self._tail + 1 or values.shape[0] not in (1, n_frames):
            tail = "Ny, Nx" if self._tail == 2 else "M"
            raise ValueError(f"{self._buffer} must have shape [{n_frames} or 1, {tail}], got {tuple(mask.shape)}")
        self.register_buffer(self._buffer, values)
        self.n_frames = n_frames
        self.ishape = self.oshape = (n_frames, int(n_coils), *(int(n) for n in values.shape[1:]))

    def _weights(self) -> Tensor:
        """The weights broadcast over the coil axis: ``[F or 1, 1, *tail]``."""
        return getattr(self, self._buffer).unsqueeze(1)

    def forward(self, x: Tensor) -> Tensor:
        _check_frames_tail(x, self.n_frames, self.ishape[2:], "x")
        return self._weights() * x

    def adjoint(self, y: Tensor) -> Tensor:
        _check_frames_tail(y, self.n_frames, self.oshape[2:], "y")
        return self._weights() * y

    def normal(self, x: Tensor) -> Tensor:
        _check_frames_tail(x, self.n_frames, self.ishape[2:], "x")
        w = self._weights()
        return (w * w) * x

    def select_frames(self, idx: Tensor | Sequence[int]) -> "Sampling":
        values = getattr(self, self._buffer)
        idx = _frame_index(idx, self.n_frames, values.device)
        return type(self)(_select_rows(values, idx), int(idx.numel()), self.ishape[1])


class SampleWeights(Sampling):
    """Per-sample real weights on non-Cartesian k-space: ``y[..., F, C, M] = w[F or 1, M] · x``.

    Self-adjoint, normal ``w² · x`` (e.g. ``w = sqrt(dcf)`` gives the DCF-weighted normal). Any
    channel count is accepted at call time.

    Parameters
    ----------
    weights:
        ``[F, M]`` or ``[1, M]`` (shared by all frames), real.
    n_frames:
        Number of frames ``F``.
    n_coils:
        Channel count used for ``ishape``/``oshape``.
    """

    _buffer, _tail = "weights", 1

    def __init__(self, weights: Tensor, n_frames: int, n_coils: int = 1) -> None:
        if isinstance(weights, Tensor) and weights.ndim != 2:
            raise ValueError(f"weights must have shape [{n_frames} or 1, M], got {tuple(weights.shape)}")
        super().__init__(weights, n_frames, n_coils)


def _fold_frames(z: Tensor, batch: tuple[int, ...]) -> Tensor:
    """``[*batch, F, C, ...]`` → ``[F, prod(batch)·C, ...]`` (frames first, for the backend)."""
    if not batch:
        return z
    nb = len(batch)
    F, C = z.shape[nb], z.shape[nb + 1]
    rest = z.shape[nb + 2:]
    z = z.reshape(-1, F, C, *rest).movedim(0, 1)
    return z.reshape(F, -1, *rest)


def _unfold_frames(z: Tensor, batch: tuple[int, ...], C: int) -> Tensor:
    """Inverse of :func:`_fold_frames`."""
    if not batch:
        return z
    F = z.shape[0]
    rest = z.shape[2:]
    z = z.reshape(F, -1, C, *rest).movedim(1, 0)
    return z.reshape(*batch, F, C, *rest)


class Nufft(LinearOperator):
    """Raw multi-channel NUFFT ``[F, C, Ny, Nx] → [F, C, M]`` with one trajectory per frame.

    For gridding reconstructions and coil images, and the Fourier part of non-Cartesian SENSE.
    ``n_coils`` only sets ``ishape``/``oshape``; any number of channels is accepted at call time.

    Parameters
    ----------
    trajectory:
        ``[F, 2, M]`` float32, radians/voxel, (ky, kx).
    image_shape:
        ``(Ny, Nx)``.
    backend:
        Backend name or instance for :func:`recon_core.nufft.get_backend`.
    n_coils:
        Channel count used for ``ishape``/``oshape``.
    """

    def __init__(self, trajectory: Tensor, image_shape: Sequence[int],
                 backend: str | NufftBackend = DEFAULT_BACKEND, n_coils: int = 1) -> None:
        super().__init__()
        trajectory = _check_trajectory(trajectory)
        self.image_shape = _image_shape(image_shape)
        self.backend = get_backend(backend)
        self.register_buffer("trajectory", trajectory)
        F, _, M = trajectory.shape
        self.n_frames = int(F)
        self.ishape = (F, int(n_coils), *self.image_shape)
        self.oshape = (F, int(n_coils), M)

    def _core(self, x: Tensor, n_tail: int, name: str) -> tuple[int, ...]:
        F = self.trajectory.shape[0]
        if not isinstance(x, Tensor) or x.ndim < n_tail + 1 or x.shape[-n_tail - 1] != F:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{name} must have {F} frames at axis {-n_tail - 1}, got {shape}")
        return tuple(x.shape[:-n_tail - 1])

    def forward(self, x: Tensor) -> Tensor:
        _split_batch(x, self.image_shape, "x")
        batch = self._core(x, 3, "x")
        C = x.shape[-3]
        y = self.backend.forward(_fold_frames(x, batch), self.trajectory)
        return _unfold_frames(y, batch, C)

    def adjoint(self, y: Tensor) -> Tensor:
        M = self.trajectory.shape[2]
        _split_batch(y, (M,), "y")
        batch = self._core(y, 2, "y")
        C = y.shape[-2]
        x = self.backend.adjoint(_fold_frames(y, batch), self.trajectory, self.image_shape)
        return _unfold_frames(x, batch, C)

    def select_frames(self, idx: Tensor | Sequence[int]) -> "Nufft":
        idx = _frame_index(idx, self.n_frames, self.trajectory.device)
        return Nufft(self.trajectory.index_select(0, idx), self.image_shape, backend=self.backend,
                     n_coils=self.ishape[1])


# ----------------------------------------------------------------------------------------------
# Cartesian SENSE
# ----------------------------------------------------------------------------------------------

class CartesianSense(ComposedOperator):
    """Multi-coil Cartesian encoding ``x[F, Ny, Nx] → mask · fft2c(S · x)`` of shape ``[F, C, Ny, Nx]``.

    Exactly ``Sampling(mask) @ FFT2 @ CoilMaps(S)`` (``self.outer``, ``self.inner``).

    Parameters
    ----------
    coil_maps:
        ``[C, Ny, Nx]`` complex64 sensitivities.
    mask:
        ``[F, Ny, Nx]`` or ``[1, Ny, Nx]`` real sampling mask or weights (centred, like the k-space).
    n_frames:
        Number of frames ``F``.

    The adjoint is ``Σ_c conj(S_c) · ifft2c(mask · y)``. :meth:`normal` is a fast path
    ``Σ_c conj(S_c) ifft2c(mask² fft2c(S_c x))`` that shifts the maps and the mask once at
    construction, so only the ``[F, Ny, Nx]`` image (not every coil image) is fft-shifted per call.
    """

    def __init__(self, coil_maps: Tensor, mask: Tensor, n_frames: int) -> None:
        _check_maps(coil_maps)
        n_frames = _n_frames(n_frames)
        mask = _real_float("mask", mask)
        C, Ny, Nx = coil_maps.shape
        if mask.ndim == 2:
            mask = mask.unsqueeze(0)
        if mask.ndim != 3 or tuple(mask.shape[-2:]) != (Ny, Nx) or mask.shape[0] not in (1, n_frames):
            raise ValueError(f"mask must have shape [{n_frames} or 1, {Ny}, {Nx}] to match coil_maps "
                             f"and n_frames, got {tuple(mask.shape)}")
        mask = mask.to(coil_maps.device)
        sampling = Sampling(mask, n_frames, C)
        super().__init__(sampling @ FFT2((n_frames, C, Ny, Nx)), CoilMaps(coil_maps, n_frames))
        # shifted copies for the normal fast path: derived, built on the first normal() call (so
        # operators used only forward, e.g. per-frame fitting, never hold them), not in state_dict
        self.register_buffer("_maps_shifted", None, persistent=False)
        self.register_buffer("_mask2_shifted", None, persistent=False)
        self.register_buffer("_mask2_lines", None, persistent=False)
        self.n_frames = n_frames

    @property
    def coil_maps(self) -> Tensor:
        """``[C, Ny, Nx]`` complex64 sensitivities."""
        return self.inner.coil_maps

    @property
    def mask(self) -> Tensor:
        """``[F or 1, Ny, Nx]`` float32 mask."""
        return self.outer.outer.mask

    @property
    def image_shape(self) -> tuple[int, int]:
        """``(Ny, Nx)``."""
        return tuple(self.ishape[-2:])  # type: ignore[return-value]

    def forward(self, x: Tensor) -> Tensor:
        _split_batch(x, self.ishape, "x")
        return self.outer(self.inner(x))

    def adjoint(self, y: Tensor) -> Tensor:
        _split_batch(y, self.oshape, "y")
        return self.inner.adjoint(self.outer.adjoint(y))

    def _shifted(self) -> tuple[Tensor, Tensor]:
        """``ifftshift``-ed maps and squared mask for :meth:`normal`, (re)built when missing or moved."""
        maps, mask = self.coil_maps, self.mask
        if self._maps_shifted is None or self._maps_shifted.device != maps.device:
            self._maps_shifted = torch.fft.ifftshift(maps, dim=(-2, -1))
        if self._mask2_shifted is None or self._mask2_shifted.device != mask.device:
            self._mask2_shifted = torch.fft.ifftshift(mask * mask, dim=(-2, -1))
            lines = self._mask2_shifted[..., :1]
            # whole readout lines (the usual Cartesian case): the FFT along the readout cancels in
            # the normal operator, so only the phase-encode axis is transformed
            self._mask2_lines = lines if bool(torch.all(self._mask2_shifted == lines)) else None
        return self._maps_shifted, self._mask2_shifted

    def normal(self, x: Tensor) -> Tensor:
        """``Aᴴ A x``; one FFT axis (phase encode) instead of two when every readout line is sampled
        whole (the mask is constant along ``Nx``): ``F_xᴴ M F_x = M`` there, so the result is the same."""
        _split_batch(x, self.ishape, "x")
        d = (-2, -1)
        maps_s, mask2_s = self._shifted()
        z = maps_s * torch.fft.ifftshift(x, dim=d).unsqueeze(-3)
        if self._mask2_lines is not None:
            z = torch.fft.ifft(self._mask2_lines.unsqueeze(-3) * torch.fft.fft(z, dim=-2), dim=-2)
        else:
            z = torch.fft.ifft2(mask2_s.unsqueeze(-3) * torch.fft.fft2(z))
        return torch.fft.fftshift(torch.sum(maps_s.conj() * z, dim=-3), dim=d)

    def select_frames(self, idx: Tensor | Sequence[int]) -> "CartesianSense":
        """Cartesian SENSE on frames ``idx``; a shared ``[1, Ny, Nx]`` mask stays shared, and the
        fast-normal buffers, when built, are shared or sliced rather than recomputed."""
        idx = _frame_index(idx, self.n_frames, self.coil_maps.device)
        op = CartesianSense(self.coil_maps, _select_rows(self.mask, idx), int(idx.numel()))
        if self._maps_shifted is not None:
            op._maps_shifted = self._maps_shifted
        if self._mask2_shifted is not None:
            op._mask2_shifted = _select_rows(self._mask2_shifted, idx)
            op._mask2_lines = None if self._mask2_lines is None else _select_rows(self._mask2_lines, idx)
        return op


# ----------------------------------------------------------------------------------------------
# non-Cartesian SENSE
# ----------------------------------------------------------------------------------------------

class NonCartesianSense(ComposedOperator):
    """Multi-coil non-Cartesian encoding ``x[F, Ny, Nx] → w · NUFFT(S · x)`` of shape ``[F, C, M]``.

    Exactly ``SampleWeights(w) @ Nufft @ CoilMaps(S)`` (``Nufft @ CoilMaps(S)`` without weights).

    Parameters
    ----------
    coil_maps:
        ``[C, Ny, Nx]`` complex64 sensitivities.
    trajectory:
        ``[F, 2, M]`` float32 in radians/voxel (ky, kx); ``[1, 2, M]`` is not expanded here, so
        give one trajectory per frame (use :func:`make_encoding_operator` to broadcast).
    image_shape:
        ``(Ny, Nx)``; must match the coil maps.
    backend:
        NUFFT backend name or instance (see :func:`recon_core.nufft.get_backend`).
    weights:
        Optional ``[F, M]`` (or ``[1, M]``, expanded) real weights applied in the forward (e.g.
        ``sqrt(dcf)``). The operator stays linear with a true adjoint; its normal is ``AᴴW²A``.
    toeplitz:
        If True, :meth:`normal` uses the Toeplitz embedding (module docstring). The kernel
        (``[F, 2Ny, 2Nx]`` float32) is built lazily on the first :meth:`normal` call, on the
        trajectory's device, or explicitly with :meth:`precompute_toeplitz`; it is a
        (non-persistent) buffer, so ``.to(device)`` moves it once built.
    """

    def __init__(self, coil_maps: Tensor, trajectory: Tensor, image_shape: Sequence[int],
                 backend: str | NufftBackend = DEFAULT_BACKEND, weights: Tensor | None = None,
                 toeplitz: bool = False) -> None:
        _check_maps(coil_maps)
        image_shape = _image_shape(image_shape)
        if tuple(coil_maps.shape[-2:]) != image_shape:
            raise ValueError(f"coil_maps spatial shape {tuple(coil_maps.shape[-2:])} does not match "
                             f"image_shape {image_shape}")
        trajectory = _check_trajectory(trajectory).to(coil_maps.device)
        F, _, M = trajectory.shape
        C = coil_maps.shape[0]
        if weights is not None:
            weights = _real_float("weights", weights)
            if tuple(weights.shape) == (1, M):
                weights = weights.expand(F, M)
            if tuple(weights.shape) != (F, M):
                raise ValueError(f"weights must have shape [F, M] = [{F}, {M}], got {tuple(weights.shape)}")
            weights = weights.contiguous().to(coil_maps.device)
        nufft: LinearOperator = Nufft(trajectory, image_shape, backend=backend, n_coils=C)
        outer = nufft if weights is None else SampleWeights(weights, F, C) @ nufft
        super().__init__(outer, CoilMaps(coil_maps, F))
        self.register_buffer("toeplitz_kernel", None, persistent=False)
        self.toeplitz = bool(toeplitz)
        self.image_shape = image_shape
        self.n_frames = F

    # -- parts --------------------------------------------------------------------------------
    @property
    def _nufft(self) -> Nufft:
        return self.outer if isinstance(self.outer, Nufft) else self.outer.inner

    @property
    def coil_maps(self) -> Tensor:
        """``[C, Ny, Nx]`` complex64 sensitivities."""
        return self.inner.coil_maps

    @property
    def trajectory(self) -> Tensor:
        """``[F, 2, M]`` float32 trajectory."""
        return self._nufft.trajectory

    @property
    def weights(self) -> Tensor | None:
        """``[F, M]`` float32 weights, or None."""
        return None if isinstance(self.outer, Nufft) else self.outer.outer.weights

    @property
    def backend(self) -> NufftBackend:
        """The NUFFT backend instance."""
        return self._nufft.backend

    # -- maps ---------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        _split_batch(x, self.ishape, "x")
        return self.outer(self.inner(x))

    def adjoint(self, y: Tensor) -> Tensor:
        _split_batch(y, self.oshape, "y")
        return self.inner.adjoint(self.outer.adjoint(y))

    def normal(self, x: Tensor) -> Tensor:
        """``AᴴA x`` (with weights ``AᴴW²A``), by Toeplitz embedding when ``toeplitz=True``."""
        _split_batch(x, self.ishape, "x")
        if not self.toeplitz:
            return self.inner.adjoint(self.outer.normal(self.inner(x)))
        return self.toeplitz_normal(x)

    def select_frames(self, idx: Tensor | Sequence[int]) -> "NonCartesianSense":
        """Non-Cartesian SENSE on frames ``idx`` (trajectory and weights sliced; a built Toeplitz
        kernel is sliced too, not rebuilt)."""
        idx = _frame_index(idx, self.n_frames, self.trajectory.device)
        w = None if self.weights is None else self.weights.index_select(0, idx)
        op = NonCartesianSense(self.coil_maps, self.trajectory.index_select(0, idx), self.image_shape,
                               backend=self.backend, weights=w, toeplitz=self.toeplitz)
        if self.toeplitz_kernel is not None:
            op.toeplitz_kernel = self.toeplitz_kernel.index_select(0, idx.to(self.toeplitz_kernel.device))
        return op

    # -- Toeplitz -----------------------------------------------------------------------------
    @torch.no_grad()
    def precompute_toeplitz(self) -> Tensor:
        """Build (or rebuild) the real ``[F, 2Ny, 2Nx]`` Toeplitz kernel and return it.

        ``h`` on the 2N grid is the backend adjoint of ``w²`` onto a ``(2Ny, 2Nx)`` image (pixel
        ``j`` ↔ displacement ``j - N``), rescaled from the 2N ortho factor to ``1/(Ny·Nx)``; the
        unused displacement ``-N`` is zeroed so that ``h`` is exactly Hermitian and ``K = FFT(h)``
        is real.
        """
        Ny, Nx = self.image_shape
        traj = self.trajectory
        F, _, M = traj.shape
        w = self.weights
        w2 = torch.ones(F, M, device=traj.device) if w is None else w * w
        w2 = w2.to(torch.complex64).unsqueeze(1)                                  # [F, 1, M]
        h = self.backend.adjoint(w2, traj, (2 * Ny, 2 * Nx))[:, 0]              # [F, 2Ny, 2Nx]
        h = h * (2.0 / (Ny * Nx) ** 0.5)
        h[:, 0, :] = 0
        h[:, :, 0] = 0
        h = torch.fft.ifftshift(h, dim=(-2, -1))
        kernel = torch.fft.fft2(h).real.to(torch.float32).contiguous()
        self.toeplitz_kernel = kernel
        return kernel

    def toeplitz_normal(self, x: Tensor) -> Tensor:
        """``Σ_c conj(S_c) crop(IFFT(K · FFT(pad(S_c x))))``; builds the kernel on first use."""
        if self.toeplitz_kernel is None or self.toeplitz_kernel.device != self.trajectory.device:
            self.precompute_toeplitz()
        Ny, Nx = self.image_shape
        maps = self.coil_maps
        z = x.unsqueeze(-3) * maps                                        # [..., F, C, Ny, Nx]
        Z = torch.fft.fft2(z, s=(2 * Ny, 2 * Nx))
        Z = Z * self.toeplitz_kernel.unsqueeze(-3)
        z = torch.fft.ifft2(Z)[..., :Ny, :Nx]
        return torch.sum(maps.conj() * z, dim=-3)


# ----------------------------------------------------------------------------------------------
# factory
# ----------------------------------------------------------------------------------------------

def _make_cartesian(coil_maps: Tensor, image_shape: tuple[int, int], n_frames: int, mask: Tensor | None,
                    trajectory: Tensor | None, weights: Tensor | None, backend,
                    toeplitz: bool) -> LinearOperator:
    if weights is not None:
        raise ValueError("weights are for non-Cartesian data; put Cartesian weights into mask")
    if mask is None:
        mask = torch.ones(1, *image_shape, dtype=torch.float32, device=coil_maps.device)
    return CartesianSense(coil_maps, mask, n_frames)


def _make_noncartesian(coil_maps: Tensor, image_shape: tuple[int, int], n_frames: int, mask: Tensor | None,
                       trajectory: Tensor | None, weights: Tensor | None, backend,
                       toeplitz: bool) -> LinearOperator:
    assert trajectory is not None
    trajectory = _check_trajectory(trajectory, n_frames)
    return NonCartesianSense(coil_maps, trajectory, image_shape, backend=backend, weights=weights,
                             toeplitz=toeplitz)


#: Catalog of encoding-operator factories, keyed by sampling kind (one entry per operator).
OPERATORS: dict[str, Callable[..., LinearOperator]] = {
    "cartesian": _make_cartesian,
    "noncartesian": _make_noncartesian,
}


def make_encoding_operator(coil_maps: Tensor, image_shape: Sequence[int], n_frames: int,
                           mask: Tensor | None = None, trajectory: Tensor | None = None,
                           weights: Tensor | None = None, backend: str | NufftBackend = DEFAULT_BACKEND,
                           toeplitz: bool = False) -> LinearOperator:
    """Build the SENSE encoding operator for Cartesian (``mask``) or non-Cartesian (``trajectory``) data.

    Parameters
    ----------
    coil_maps:
        ``[C, Ny, Nx]`` complex64.
    image_shape:
        ``(Ny, Nx)``, must match ``coil_maps``.
    n_frames:
        Number of frames ``F``.
    mask:
        Cartesian ``[F or 1, Ny, Nx]`` mask; if neither ``mask`` nor ``trajectory`` is given the data
        are taken as fully sampled Cartesian.
    trajectory:
        Non-Cartesian ``[F or 1, 2, M]`` trajectory (a single one is shared by all frames).
    weights:
        Non-Cartesian ``[F or 1, M]`` weights (e.g. ``sqrt(dcf)``), applied in the forward.
    backend, toeplitz:
        NUFFT backend and Toeplitz normal operator (non-Cartesian only; the Cartesian normal is
        already FFT-based, so ``toeplitz`` is ignored there).

    Raises
    ------
    ValueError
        Both ``mask`` and ``trajectory`` given, weights with Cartesian sampling, or mismatched shapes.
    """
    _check_maps(coil_maps)
    shape = _image_shape(image_shape)
    n_frames = _n_frames(n_frames)
    if tuple(coil_maps.shape[-2:]) != shape:
        raise ValueError(f"coil_maps spatial shape {tuple(coil_maps.shape[-2:])} does not match "
                         f"image_shape {shape}")
    if mask is not None and trajectory is not None:
        raise ValueError("give either mask (Cartesian) or trajectory (non-Cartesian), not both")
    kind = "noncartesian" if trajectory is not None else "cartesian"
    if kind == "noncartesian" and weights is not None:
        weights = _real_float("weights", weights)
        if weights.ndim == 2 and weights.shape[0] == 1 and n_frames > 1:
            weights = weights.expand(n_frames, -1)
    return OPERATORS[kind](coil_maps, shape, n_frames, mask, trajectory, weights, backend, toeplitz)
