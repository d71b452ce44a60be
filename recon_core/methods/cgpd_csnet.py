"""CGPD-CSNet: two-grid-cycle correction and geometric prior distillation (Fan et al., 2023).

A supervised unrolled network (:mod:`recon_core.nets.cgpd`): ``n_stages`` stages of
pre-relaxation (gradient step with a learned step length), two-grid-cycle correction of the
k-space residual and a residual dense block ("geometric prior distillation"), with a condition
module that maps the sampling ratio to each stage's step length and noise level — so **one model
serves several sampling ratios**. Training (``torchgadgets train cgpd_csnet``): deep-supervision
L1 loss ``mean|x_last − gt| + mean|x_mid − gt|`` (on real and imaginary parts), Adam lr 1e-4 in the
paper; each training problem is drawn at one of several ratios.

Paper settings (``preset: paper``): 13 stages, 8 dense layers of growth 32, solution operator with
32 channels and 4 ResBlocks, condition MLP 1→32→32→26 (≈4.4 M parameters). ``fast``: 5 stages, 4
dense layers of growth 16, 16 channels and 2 ResBlocks — the architecture with shipped weights
(``cgpd_csnet_fast``, trained on CPU on generated 2-D Cartesian phantoms only; see the registry's
``trained_on`` for the command). ``auto`` = ``fast`` on every device until paper weights exist.

Extensions [EXT], labelled "CGPD-CSNet (extended)" in results: complex images (2 channels)
instead of the paper's real single-coil images; multi-coil SENSE / NUFFT data through the
problem's encoding operator (the residual is the k-space of the coil-combined residual image,
which equals the paper's residual for one coil); data divided by the zero-filled image's peak
before the network (so one model serves any data scale) and multiplied back after; the gradient
step normalised by ‖EᴴE‖. The sampling ratio fed to the condition module is the fraction of
Cartesian grid cells that hold a sample (the mask's mean; for radial/spiral, cells the trajectory
hits), averaged over frames. A 2-D method: cine data are reconstructed frame by frame (frames are
the batch). The shipped weights were trained on Cartesian masks only (the paper trains one model
per mask family); radial/spiral data run, but far from their training distribution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from recon_core.methods.base import MethodParams, ProgressCallback, ReconMethod, ReconProblem
from recon_core.nets.cgpd import ARCH_KEYS, CGPDNet
from recon_core.nets.unrolled import estimate_lipschitz

Tensor = torch.Tensor


@dataclass
class CGPDCSNetParams(MethodParams):
    """Paper architecture (BRIEFS §3.1); ``presets["fast"]`` is the CPU architecture with weights."""

    n_stages: int = 13
    n_dense: int = 8
    growth: int = 32
    smoother_channels: int = 32
    n_resblocks: int = 4
    condition_hidden: int = 32
    weights: str = "default"
    #: override of the sampling ratio given to the condition module (0 = measured from the data)
    sampling_ratio: float = 0.0


def sampling_ratio(problem: ReconProblem) -> float:
    """Fraction of the Cartesian grid's cells holding a sample, mean over frames (the condition
    module's input): the mask's mean for Cartesian data, the cells the trajectory hits otherwise."""
    ny, nx = problem.image_shape
    if problem.is_cartesian:
        mask = problem.mask if problem.mask is not None else (problem.kspace.abs().sum(1) > 0)
        m = mask.to(torch.float32)
        return float(m.mean()) if m.ndim >= 2 else 1.0
    traj = problem.trajectory
    iy = torch.floor(traj[:, 0] / (2 * math.pi) * ny + ny / 2 + 0.5).long() % ny
    ix = torch.floor(traj[:, 1] / (2 * math.pi) * nx + nx / 2 + 0.5).long() % nx
    fracs = [float(torch.unique(iy[f] * nx + ix[f]).numel()) / (ny * nx) for f in range(traj.shape[0])]
    return sum(fracs) / len(fracs)


class CGPDCSNet(ReconMethod[CGPDCSNetParams]):
    """Unrolled pre-relaxation + two-grid correction + prior distillation; weights from the registry."""

    name = "cgpd_csnet"
    Params = CGPDCSNetParams
    uses_autograd = False
    presets = {"fast": {"n_stages": 5, "n_dense": 4, "growth": 16, "smoother_channels": 16, "n_resblocks": 2}}
    quick_params = {"preset": "fast"}
    weights_params = ("weights",)

    @classmethod
    def auto_preset(cls, device: torch.device | str | None) -> str:
        """``auto`` = ``fast`` everywhere: the architecture with shipped weights."""
        return "fast"

    # -- the parts training uses ------------------------------------------------------------
    def arch(self) -> dict[str, Any]:
        """The architecture parameters (what the weights' metadata must match)."""
        return {k: getattr(self.params, k) for k in ARCH_KEYS}

    def build_network(self) -> CGPDNet:
        """A freshly initialised network for this architecture (CPU; ``.to()`` it)."""
        return CGPDNet(self.arch())

    def prepare(self, problem: ReconProblem) -> tuple[Tensor, Any, Tensor, float]:
        """Normalised start image ``Eᴴy/L`` ÷ scale, the normalised gradient ``x ↦ Eᴴ(Ex − y/scale)/L``,
        the sampling ratio tensor and the scale (peak of the zero-filled image)."""
        from recon_core.methods.dc_cnn import zero_filled_image

        x_zf = zero_filled_image(problem)
        scale = float(x_zf.abs().max())
        if not scale > 0:
            scale = 1.0
        op = problem.operator
        shape = (problem.n_frames, *problem.image_shape)
        lip = float(estimate_lipschitz(op.normal, shape, problem.device))
        y = problem.kspace / scale
        aty = op.adjoint(y) / lip

        def grad(x: Tensor) -> Tensor:
            return op.normal(x) / lip - aty

        ratio = float(self.params.sampling_ratio) or sampling_ratio(problem)
        return x_zf / scale, grad, torch.tensor(ratio, device=problem.device), scale

    def forward_normalised(self, net: CGPDNet, problem: ReconProblem) -> tuple[Tensor, float]:
        """Network output on the normalised scale and the scale (differentiable in ``net``)."""
        x0, grad, ratio, scale = self.prepare(problem)
        return net(x0, ratio, grad)[0], scale

    def training_loss(self, net: CGPDNet, problem: ReconProblem, ground_truth: Tensor) -> Tensor:
        """The paper's deep-supervision L1 loss on the normalised scale (final + middle stage)."""
        x0, grad, ratio, scale = self.prepare(problem)
        x, x_mid = net(x0, ratio, grad)
        gt = ground_truth.to(x.device) / scale
        return (torch.view_as_real(x - gt).abs().mean() + torch.view_as_real(x_mid - gt).abs().mean())

    # -- inference ------------------------------------------------------------------------------
    def load_network(self, device: torch.device) -> CGPDNet:
        """Build the network and load the configured weights onto ``device`` (verified)."""
        from recon_core.training.weights import load_trained_network

        return load_trained_network(self, device)  # type: ignore[return-value]

    def reconstruct(self, problem: ReconProblem, progress: ProgressCallback | None = None) -> Tensor:
        net = self.load_network(problem.device)
        x0, grad, ratio, scale = self.prepare(problem)
        total = int(self.params.n_stages)
        self._report(progress, 0, total, "stage", sampling_ratio=float(ratio))

        def on_stage(i: int) -> bool:
            self._report(progress, i, total, "stage")
            return self.out_of_time(i, total)

        x, _ = net(x0, ratio, grad, on_stage=on_stage)
        return (x * scale).to(torch.complex64)
