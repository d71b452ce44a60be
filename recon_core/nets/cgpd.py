"""CGPD-CSNet's network (Fan et al., BSPC 84:104821, 2023): unrolled stages of pre-relaxation,
two-grid-cycle correction and geometric prior distillation, with a condition module.

Stage ℓ maps ``x_{ℓ-1}`` to ``x_ℓ`` (paper eqs. 3–9, BRIEFS §3.1):

* pre-relaxation ``h = x − (η_ℓ/L)·Eᴴ(Ex − y)`` (one gradient step, learned step η_ℓ; ``L`` = ‖EᴴE‖
  so one η means the same for every operator);
* correction: the k-space residual ``r = F(Eᴴ(y − Eh)/L)`` as 2 channels (real, imag — the paper's
  intent; the released code's reshape scrambles them, BRIEFS §3.6), restriction ``I_R`` (2×2 conv,
  stride 2), solution operator ``S`` (3×3 conv, ResBlocks, 3×3 conv, global skip), inverse FFT on
  the coarse grid, prolongation ``I_P`` (2×2 transposed conv, stride 2) → ``e``;
* the noise-level map ``M_β`` (constant β_ℓ);
* geometric prior distillation ``P``: a residual dense block on ``concat(h, e, M_β)`` (``n_dense``
  3×3 conv + ReLU layers of ``growth`` channels, each seeing all earlier outputs, then a 1×1 fusion),
  ``x_ℓ = h + fusion``.

The condition module (an MLP 1 → 32 → 32 → 2·stages, ReLU, ReLU, Softplus, shared by all stages)
maps the sampling ratio to (η_ℓ, β_ℓ). No weight sharing between stages.

[EXT] for this project: images are complex (2 channels: real, imag) through the whole stage, and
``E`` is the multi-coil SENSE (or NUFFT) encoding operator. With one coil of unit sensitivity and a
Cartesian mask ``F(Eᴴ(y − Eh)) = M⊙(y − F h)`` — exactly the paper's residual — so the extension
reduces to the paper's network on its own data; with several coils the residual is that of the
coil-combined image, so one network serves any coil count. Odd matrix sizes are padded by one
pixel for the stride-2 grids.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as Fnn
from torch import nn

from recon_core.fft import fft2c, ifft2c

Tensor = torch.Tensor

#: Parameters that define the network (the weights' metadata must match them).
ARCH_KEYS = ("n_stages", "n_dense", "growth", "smoother_channels", "n_resblocks", "condition_hidden")


class ResBlock(nn.Module):
    """Conv3×3 – ReLU – Conv3×3 plus the input (the solution operator's blocks, no batch norm)."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.c2 = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.c2(torch.relu(self.c1(x)))


class SolutionOperator(nn.Module):
    """``S``: Conv3×3 2→p, ResBlocks, Conv3×3 p→2, plus its input (global skip)."""

    def __init__(self, ch: int, n_blocks: int) -> None:
        super().__init__()
        self.head = nn.Conv2d(2, ch, 3, padding=1)
        self.blocks = nn.Sequential(*(ResBlock(ch) for _ in range(n_blocks)))
        self.tail = nn.Conv2d(ch, 2, 3, padding=1)

    def forward(self, r: Tensor) -> Tensor:
        return r + self.tail(self.blocks(self.head(r)))


class ResidualDenseBlock(nn.Module):
    """``P``: dense 3×3 conv + ReLU layers (each sees the input and all earlier outputs), a 1×1
    fusion of everything to 2 channels, added to the first two input channels (``h``)."""

    def __init__(self, c_in: int, n_dense: int, growth: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Conv2d(c_in + j * growth, growth, 3, padding=1) for j in range(n_dense))
        self.fusion = nn.Conv2d(c_in + n_dense * growth, 2, 1)

    def forward(self, m: Tensor) -> Tensor:
        feats = [m]
        for conv in self.layers:
            feats.append(torch.relu(conv(torch.cat(feats, dim=1))))
        return m[:, :2] + self.fusion(torch.cat(feats, dim=1))


class Stage(nn.Module):
    """One stage: pre-relaxation, two-grid-cycle correction, noise map, prior distillation."""

    def __init__(self, arch: dict[str, Any]) -> None:
        super().__init__()
        self.restrict = nn.Conv2d(2, 2, 2, stride=2)
        self.solve = SolutionOperator(int(arch["smoother_channels"]), int(arch["n_resblocks"]))
        self.prolong = nn.ConvTranspose2d(2, 2, 2, stride=2)
        self.prior = ResidualDenseBlock(5, int(arch["n_dense"]), int(arch["growth"]))

    def forward(self, x: Tensor, eta: Tensor, beta: Tensor, grad: Callable[[Tensor], Tensor]) -> Tensor:
        """``x`` complex ``[F, Ny, Nx]`` (even sizes); ``grad(x)`` = ``Eᴴ(Ex − y)/L``."""
        h = x - eta * grad(x)
        r = fft2c(-grad(h))                                  # k-space residual F(Eᴴ(y − Eh)/L)
        r2 = self.solve(self.restrict(_channels(r)))         # coarse grid: restriction, solution operator
        e2 = ifft2c(_complex(r2))                            # back to image space on the coarse grid
        e = self.prolong(_channels(e2))                      # prolongation to the fine grid
        noise = beta.expand(h.shape[0], 1, *h.shape[-2:])
        m = torch.cat([_channels(h), e, noise], dim=1)
        return _complex(self.prior(m))


def _channels(x: Tensor) -> Tensor:
    return torch.stack((x.real, x.imag), dim=1)


def _complex(t: Tensor) -> Tensor:
    return torch.complex(t[:, 0], t[:, 1])


class ConditionModule(nn.Module):
    """Sampling ratio → step lengths η and noise levels β for every stage (Softplus keeps them > 0)."""

    def __init__(self, n_stages: int, hidden: int) -> None:
        super().__init__()
        self.n_stages = n_stages
        self.net = nn.Sequential(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 2 * n_stages), nn.Softplus())

    def forward(self, ratio: Tensor) -> tuple[Tensor, Tensor]:
        out = self.net(ratio.reshape(1, 1).float())[0]
        return out[: self.n_stages], out[self.n_stages:]


class CGPDNet(nn.Module):
    """The unrolled network; :meth:`forward` returns the final image and the middle stage's (deep
    supervision)."""

    def __init__(self, arch: dict[str, Any]) -> None:
        super().__init__()
        self.arch = dict(arch)
        n = int(arch["n_stages"])
        if n < 1:
            raise ValueError(f"n_stages must be >= 1, got {n}")
        self.stages = nn.ModuleList(Stage(arch) for _ in range(n))
        self.condition = ConditionModule(n, int(arch["condition_hidden"]))

    @property
    def mid(self) -> int:
        """Index of the stage whose output is deep-supervised ((n−1)//2, stage 7 of 13)."""
        return (len(self.stages) - 1) // 2

    def forward(self, x0: Tensor, ratio: Tensor, grad: Callable[[Tensor], Tensor],
                stages: int | None = None, on_stage: Callable[[int], bool] | None = None) -> tuple[Tensor, Tensor]:
        """Run the stages from ``x0`` (complex ``[F, Ny, Nx]``); ``on_stage(i)`` returning True stops
        early (time budget). Returns ``(x_last, x_mid)``."""
        eta, beta = self.condition(ratio.to(x0.real.dtype))
        ny, nx = x0.shape[-2:]
        pad = (0, nx % 2, 0, ny % 2)
        padded = any(pad)

        def g(x: Tensor) -> Tensor:
            return _pad(grad(_crop(x, ny, nx)), pad) if padded else grad(x)

        x = _pad(x0, pad) if padded else x0
        x_mid = x
        n = len(self.stages) if stages is None else min(int(stages), len(self.stages))
        for i in range(n):
            x = self.stages[i](x, eta[i], beta[i].reshape(1, 1, 1, 1), g)
            if i == self.mid:
                x_mid = x
            if on_stage is not None and on_stage(i + 1) and i + 1 < n:
                break
        return _crop(x, ny, nx), _crop(x_mid, ny, nx)


def _pad(x: Tensor, pad: tuple[int, int, int, int]) -> Tensor:
    if not any(pad):
        return x
    return torch.complex(Fnn.pad(x.real, pad), Fnn.pad(x.imag, pad))


def _crop(x: Tensor, ny: int, nx: int) -> Tensor:
    return x[..., :ny, :nx]
