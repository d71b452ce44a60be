"""Zero-filled (Cartesian) / density-compensated gridding (non-Cartesian) reconstruction.

The baseline every paper reports: one application of the adjoint. Cartesian data are zero-filled
as they are (masks sample the k-space centre fully, so no global rescaling: dividing by the
sampling fraction would make the image about R times too bright); non-Cartesian data are
multiplied by the density compensation before the adjoint NUFFT. Coils are combined with the
sensitivity maps, normalised by Σ_c|S_c|² (a SENSE-type "optimal" combination), or by
root-sum-of-squares of the coil images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from recon_core.coils import gridded_coil_images
from recon_core.methods.base import MethodParams, ProgressCallback, ReconMethod, ReconProblem
from recon_core.methods.data_term import density_weights
from recon_core.nufft import DEFAULT_BACKEND

Tensor = torch.Tensor


@dataclass
class ZeroFilledParams(MethodParams):
    coil_combine: Literal["sense", "rss"] = "sense"
    density_compensation: bool = True


def _coil_images(problem: ReconProblem, density_compensation: bool) -> Tensor:
    """Per-coil adjoint images ``[F, C, Ny, Nx]`` (:func:`recon_core.coils.gridded_coil_images`).

    Non-Cartesian data are density compensated with the problem's DCF (which :func:`make_problem`
    always supplies; methods never choose their own)."""
    dcf = density_weights(problem) if not problem.is_cartesian and density_compensation else None
    return gridded_coil_images(problem.kspace, problem.trajectory, dcf, problem.image_shape,
                               mask=problem.mask, backend=problem.extra.get("nufft_backend", DEFAULT_BACKEND))


class ZeroFilled(ReconMethod[ZeroFilledParams]):
    """Adjoint reconstruction with coil combination; the floor every other method must beat."""

    name = "zero_filled"
    Params = ZeroFilledParams

    def reconstruct(self, problem: ReconProblem, progress: ProgressCallback | None = None) -> Tensor:
        p = self.params
        coil_imgs = _coil_images(problem, p.density_compensation)
        if p.coil_combine == "rss":
            out = torch.sqrt((coil_imgs.abs() ** 2).sum(dim=1)).to(torch.complex64)
        else:
            maps = problem.coil_maps
            norm = (maps.abs() ** 2).sum(dim=0)
            num = (maps.conj().unsqueeze(0) * coil_imgs).sum(dim=1)
            out = torch.where(norm > 1e-8, num / norm.clamp_min(1e-8), torch.zeros_like(num))
        self._report(progress, 1, 1, "adjoint")
        return out.to(torch.complex64)
