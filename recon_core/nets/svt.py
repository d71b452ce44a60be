"""Learned singular-value thresholding (SVT) on the Casorati matrix, with a guarded backward.

SLR-Net's low-rank prior layer (Ke et al., IEEE TMI 2021) reshapes the frames ``[F, Ny, Nx]``
into the Casorati matrix ``X`` (``F × Ny·Nx``: time × space), takes its singular values ``σ_i`` and
keeps ``relu(σ_i − τ)`` with a learned, ``σ_max``-relative threshold ``τ = sigmoid(c)·σ_max``
(the authors' released code; ``c = −2`` at init, ``τ ≈ 0.12 σ_max``). The same block is the
"plug-and-play LR module" put into other networks (``dc_cnn_lr``).

Why not ``torch.linalg.svd``: its backward contains ``1/(σ_i² − σ_j²)`` and is infinite or NaN
when singular values repeat (static parts, zero frames, symmetric phantoms), which they do. The
thresholded matrix is a *matrix function* of the small ``F × F`` Gram matrix ``G = X Xᴴ``:

    SVT(X) = U diag(relu(σ − τ)) Vᴴ = φ(G) X,   φ(λ) = relu(1 − τ/√λ)   (λ = σ²),

and the derivative of a Hermitian matrix function is the Daleckii–Krein formula
``dφ(G) = U (Φ ∘ (Uᴴ dG U)) Uᴴ`` with the divided differences ``Φ_ij = (φ(λ_i) − φ(λ_j))/(λ_i − λ_j)``,
which tend to ``φ'(λ_i)`` when ``λ_j → λ_i``: finite for repeated eigenvalues. :class:`_GramFunction`
implements that backward (in float64; ``F`` is small, so this costs ``F²·Ny·Nx``, less than an
SVD of ``X``). The threshold's dependence on ``σ_max`` goes through ``eigvalsh``, whose backward
(``U diag(g) Uᴴ``) has no divided differences either.
"""

from __future__ import annotations

import torch
from torch import nn

Tensor = torch.Tensor

__all__ = ["LearnedSVT", "svt_casorati", "gram_threshold_function"]

#: Relative gap below which two eigenvalues count as equal in the divided differences.
_REL_GAP = 1e-9


def _phi(lam: Tensor, tau: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``φ(λ) = relu(1 − τ/√λ)`` and its derivatives ``∂φ/∂λ``, ``∂φ/∂τ`` (zero where φ = 0)."""
    sig = torch.sqrt(lam.clamp_min(0.0))
    keep = sig > tau
    safe = torch.where(keep, sig, torch.ones_like(sig))
    phi = torch.where(keep, 1.0 - tau / safe, torch.zeros_like(sig))
    dphi_dlam = torch.where(keep, 0.5 * tau / safe ** 3, torch.zeros_like(sig))
    dphi_dtau = torch.where(keep, -1.0 / safe, torch.zeros_like(sig))
    return phi, dphi_dlam, dphi_dtau


class _GramFunction(torch.autograd.Function):
    """``Y = φ(G)`` for Hermitian ``G`` (complex128) and a real scalar ``τ``; Daleckii–Krein backward."""

    @staticmethod
    def forward(ctx, gram: Tensor, tau: Tensor) -> Tensor:  # type: ignore[override]
        lam, u = torch.linalg.eigh(gram)
        phi, dphi, dtau = _phi(lam, tau)
        ctx.save_for_backward(lam, u, phi, dphi, dtau)
        return (u * phi.to(u.dtype)) @ u.mH

    @staticmethod
    def backward(ctx, grad_y: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        lam, u, phi, dphi, dtau = ctx.saved_tensors
        diff_l = lam[:, None] - lam[None, :]
        diff_p = phi[:, None] - phi[None, :]
        scale = lam.abs().max().clamp_min(1e-300)
        close = diff_l.abs() <= _REL_GAP * scale
        safe = torch.where(close, torch.ones_like(diff_l), diff_l)
        mean_d = 0.5 * (dphi[:, None] + dphi[None, :])
        div = torch.where(close, mean_d, diff_p / safe)          # divided differences, finite everywhere
        inner = u.mH @ grad_y @ u
        grad_g = u @ (div.to(inner.dtype) * inner) @ u.mH
        grad_tau = (dtau.to(inner.dtype) * torch.diagonal(inner)).sum().real
        return grad_g, grad_tau.to(ctx.saved_tensors[0].dtype).reshape(())


def gram_threshold_function(gram: Tensor, tau: Tensor) -> Tensor:
    """``φ(G) = U diag(relu(1 − τ/σ)) Uᴴ`` of a Hermitian PSD ``G = X Xᴴ`` (``σ² `` its eigenvalues),
    differentiable in ``G`` and ``τ`` with a backward that stays finite for repeated eigenvalues."""
    return _GramFunction.apply(gram, tau)


def svt_casorati(x: Tensor, rel_threshold: Tensor | float) -> Tensor:
    """Singular-value soft thresholding of the Casorati matrix of ``x`` ``[F, Ny, Nx]``.

    ``σ_i ← relu(σ_i − τ)`` with ``τ = rel_threshold · σ_max``; returns ``[F, Ny, Nx]`` in ``x``'s
    dtype. Computed as ``φ(X Xᴴ) X`` in complex128 (see the module docstring); differentiable in
    ``x`` and ``rel_threshold``, finite gradients for repeated singular values."""
    if not torch.is_complex(x) or x.ndim != 3:
        raise ValueError(f"expected complex frames [F, Ny, Nx], got {x.dtype} {tuple(x.shape)}")
    f = x.shape[0]
    cas = x.reshape(f, -1).to(torch.complex128)
    gram = cas @ cas.mH
    gram = 0.5 * (gram + gram.mH)
    lam = torch.linalg.eigvalsh(gram)
    sigma_max = torch.sqrt(lam[-1].clamp_min(0.0))
    rel = torch.as_tensor(rel_threshold, dtype=torch.float64, device=x.device)
    tau = rel * sigma_max
    y = gram_threshold_function(gram, tau) @ cas
    return y.reshape(x.shape).to(x.dtype)


class LearnedSVT(nn.Module):
    """SLR-Net's learned SVT: ``τ = sigmoid(c)·σ_max`` with ``c`` learned (``init = −2``, τ ≈ 0.12 σ_max).

    ``trainable=False`` freezes ``c`` (SLR-Net's last cell, whose low-rank output is unused)."""

    def __init__(self, init: float = -2.0, trainable: bool = True) -> None:
        super().__init__()
        self.c = nn.Parameter(torch.tensor(float(init), dtype=torch.float32), requires_grad=trainable)

    @property
    def rel_threshold(self) -> Tensor:
        return torch.sigmoid(self.c)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` ``[F, Ny, Nx]`` complex → the thresholded frames (same shape and dtype)."""
        return svt_casorati(x, self.rel_threshold.to(x.device))
