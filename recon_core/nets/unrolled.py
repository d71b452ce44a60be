"""Data-consistency steps for unrolled (cascaded) networks: DC-CNN now, SLR-Net / CGPD-CSNet later.

An unrolled network alternates a learned prior ``z = net(x)`` with a data-consistency step
``x = DC(z)`` that pulls the estimate back towards the measured data ``y`` of the encoding operator
``E`` (SENSE: coil maps, FFT or NUFFT, mask or trajectory). Three steps are offered:

* :class:`HardDC` — Schlemper et al.'s k-space replacement ``k ← (1−m)k + m·k₀`` (noiseless) or the
  λ-weighted average at sampled points (noisy). Cartesian only; with several coils it replaces
  coil-wise and recombines with the maps (``Σ S̄_c F⁻¹k_c / Σ|S_c|²``); single coil with unit maps
  it is exactly the paper's layer.
* :class:`ProximalDC` [EXT] — ``x = argmin ‖Ex − y‖²/L + μ‖x − z‖²`` by a few differentiable CG
  steps on ``(EᴴE/L + μI) x = Eᴴy/L + μz`` (MoDL's DC). Any trajectory. On single-coil Cartesian
  data it is the paper's noisy DC with ``λ = 1/(μL)`` (the normal matrix is diagonal in k-space).
* :class:`GradientDC` [EXT] — one gradient step ``x = z − (α/L) Eᴴ(Ez − y)`` (variational networks).

``L`` is the largest eigenvalue of ``EᴴE`` (:func:`estimate_lipschitz`), so the learnable
``μ``/``α`` mean the same thing for every operator and data scale. The steps are differentiable
(autograd through CG) and device-agnostic (they follow the tensors of the :class:`DCContext`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from recon_core.fft import fft2c, ifft2c
from recon_core.linop import LinearOperator

Tensor = torch.Tensor

__all__ = ["DCContext", "HardDC", "ProximalDC", "GradientDC", "make_dc", "cg_solve", "estimate_lipschitz",
           "DC_KINDS"]

DC_KINDS = ("prox", "hard", "gradient")


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return torch.sum(a.conj() * b).real


def cg_solve(apply_a: Callable[[Tensor], Tensor], b: Tensor, x0: Tensor, n_iter: int) -> Tensor:
    """``n_iter`` conjugate-gradient steps on the Hermitian PD system ``A x = b`` from ``x0``.

    Fixed iteration count and no in-place updates, so autograd differentiates through it (the
    unrolled DC of MoDL); stops early only when the residual is exactly zero."""
    x = x0
    r = b - apply_a(x)
    p = r
    rs = _dot(r, r)
    for _ in range(int(n_iter)):
        if float(rs.detach()) == 0.0:
            break
        ap = apply_a(p)
        alpha = rs / _dot(p, ap).clamp_min(1e-30)
        x = x + alpha * p
        r = r - alpha * ap
        rs_new = _dot(r, r)
        p = r + (rs_new / rs.clamp_min(1e-30)) * p
        rs = rs_new
    return x


def estimate_lipschitz(normal: Callable[[Tensor], Tensor], shape: tuple[int, ...], device: torch.device,
                       n_iter: int = 15) -> float:
    """Largest eigenvalue of ``EᴴE`` (power iteration, reproducible start), at least 1e-12."""
    from recon_core.solvers import power_iteration

    with torch.no_grad():
        return max(float(power_iteration(normal, shape, n_iter=n_iter, device=device)), 1e-12)


@dataclass
class DCContext:
    """What a DC step needs about one problem: operator ``E``, data ``y`` (already scaled like the
    images), Cartesian ``mask`` and ``coil_maps`` (for :class:`HardDC`) and ``lipschitz`` = ‖EᴴE‖."""

    operator: LinearOperator
    y: Tensor
    lipschitz: float = 1.0
    mask: Optional[Tensor] = None
    coil_maps: Optional[Tensor] = None
    _aty: Optional[Tensor] = None

    @property
    def adjoint_y(self) -> Tensor:
        """``Eᴴy`` (computed once)."""
        if self._aty is None:
            self._aty = self.operator.adjoint(self.y)
        return self._aty


def _softplus_inv(v: float) -> float:
    return math.log(math.expm1(v))


class ProximalDC(nn.Module):
    """[EXT] ``x = argmin ‖Ex − y‖²/L + μ‖x − z‖²`` by ``cg_iter`` CG steps (warm start at ``z``).

    ``μ = softplus(θ)`` is learned (initial ``mu``)."""

    def __init__(self, mu: float = 0.05, cg_iter: int = 5) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.tensor(_softplus_inv(mu), dtype=torch.float32))
        self.cg_iter = int(cg_iter)

    @property
    def mu(self) -> Tensor:
        return nn.functional.softplus(self.theta)

    def forward(self, z: Tensor, ctx: DCContext) -> Tensor:
        mu = self.mu.to(z.device)
        inv_l = 1.0 / ctx.lipschitz

        def apply_a(v: Tensor) -> Tensor:
            return ctx.operator.normal(v) * inv_l + mu * v

        return cg_solve(apply_a, ctx.adjoint_y * inv_l + mu * z, z, self.cg_iter)


class GradientDC(nn.Module):
    """[EXT] One gradient step ``x = z − (α/L) Eᴴ(Ez − y)``; ``α = softplus(θ)`` learned (initial ``alpha``)."""

    def __init__(self, alpha: float = 1.0) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.tensor(_softplus_inv(alpha), dtype=torch.float32))

    def forward(self, z: Tensor, ctx: DCContext) -> Tensor:
        alpha = nn.functional.softplus(self.theta).to(z.device)
        return z - (alpha / ctx.lipschitz) * (ctx.operator.normal(z) - ctx.adjoint_y)


class HardDC(nn.Module):
    """Schlemper et al.'s DC layer on Cartesian data, coil-wise for several coils.

    ``noise_lambda=None``: noiseless replacement ``k ← (1−m)k + m·k₀``; a float λ: the noisy
    version ``k ← (1−m)k + m·(k + λk₀)/(1+λ)`` with λ learned (positive, initial value given)."""

    def __init__(self, noise_lambda: float | None = None) -> None:
        super().__init__()
        self.theta = None if noise_lambda is None else nn.Parameter(
            torch.tensor(_softplus_inv(noise_lambda), dtype=torch.float32))

    def forward(self, z: Tensor, ctx: DCContext) -> Tensor:
        if ctx.mask is None or ctx.coil_maps is None:
            raise ValueError("hard data consistency needs Cartesian data (a mask); use dc: prox for "
                             "radial / spiral trajectories")
        maps = ctx.coil_maps                                    # [C, Ny, Nx]
        m = ctx.mask.to(z.real.dtype).unsqueeze(-3)             # [F, 1, Ny, Nx]
        k = fft2c(z.unsqueeze(-3) * maps)                       # [F, C, Ny, Nx]
        if self.theta is None:
            k = (1 - m) * k + m * ctx.y
        else:
            lam = nn.functional.softplus(self.theta).to(z.device)
            k = (1 - m) * k + m * (k + lam * ctx.y) / (1 + lam)
        num = torch.sum(maps.conj() * ifft2c(k), dim=-3)
        den = torch.sum(maps.abs() ** 2, dim=0)
        return torch.where(den > 1e-8, num / den.clamp_min(1e-8), torch.zeros_like(num))


def make_dc(kind: str, *, mu: float = 0.05, cg_iter: int = 5, alpha: float = 1.0,
            noise_lambda: float | None = None) -> nn.Module:
    """A DC step by name: ``prox`` | ``hard`` | ``gradient`` (see module docstring)."""
    if kind == "prox":
        return ProximalDC(mu=mu, cg_iter=cg_iter)
    if kind == "gradient":
        return GradientDC(alpha=alpha)
    if kind == "hard":
        return HardDC(noise_lambda=noise_lambda)
    raise ValueError(f"unknown data-consistency kind {kind!r}; allowed: {list(DC_KINDS)}")
