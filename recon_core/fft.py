"""Centred, orthonormal FFTs over the trailing image axes (complex64 in, complex64 out).

"Centred" means the DC sample sits at index ``N // 2`` in both image and k-space
(``ifftshift → fft → fftshift``), the convention of BART, SigPy and the ISMRMRD examples.
``norm="ortho"`` makes the transform unitary, so ``ifft2c`` is exactly the adjoint of ``fft2c``.
Uncentred / unnormalised variants are available for methods whose papers use them
(see BRIEFS §0) through ``centered`` and ``norm``.
"""

from __future__ import annotations

from typing import Sequence

import torch

Tensor = torch.Tensor


def _dims(ndim: int, dims: Sequence[int]) -> tuple[int, ...]:
    return tuple(d % ndim for d in dims)


def fftnc(x: Tensor, dims: Sequence[int] = (-2, -1), norm: str = "ortho", centered: bool = True) -> Tensor:
    """Forward FFT over ``dims`` (centred and orthonormal by default)."""
    d = _dims(x.ndim, dims)
    if centered:
        x = torch.fft.ifftshift(x, dim=d)
    x = torch.fft.fftn(x, dim=d, norm=norm)
    if centered:
        x = torch.fft.fftshift(x, dim=d)
    return x


def ifftnc(x: Tensor, dims: Sequence[int] = (-2, -1), norm: str = "ortho", centered: bool = True) -> Tensor:
    """Inverse FFT over ``dims`` (centred and orthonormal by default)."""
    d = _dims(x.ndim, dims)
    if centered:
        x = torch.fft.ifftshift(x, dim=d)
    x = torch.fft.ifftn(x, dim=d, norm=norm)
    if centered:
        x = torch.fft.fftshift(x, dim=d)
    return x


def fft2c(x: Tensor) -> Tensor:
    """Centred orthonormal 2-D FFT over the last two axes, batched over the rest."""
    return fftnc(x, (-2, -1))


def ifft2c(x: Tensor) -> Tensor:
    """Centred orthonormal inverse 2-D FFT over the last two axes (the adjoint of :func:`fft2c`)."""
    return ifftnc(x, (-2, -1))


def fft1c(x: Tensor, dim: int = -1) -> Tensor:
    """Centred orthonormal 1-D FFT along ``dim`` (e.g. readout, or time for x-f sparsity)."""
    return fftnc(x, (dim,))


def ifft1c(x: Tensor, dim: int = -1) -> Tensor:
    """Centred orthonormal inverse 1-D FFT along ``dim``."""
    return ifftnc(x, (dim,))
