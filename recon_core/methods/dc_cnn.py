"""DC-CNN: a deep cascade of CNNs with data consistency (Schlemper et al., IEEE TMI 37:491, 2018).

Architecture (paper, dynamic "D5-C10(S)"): ``n_cascades`` = 10 cascades, each a CNN of
``n_layers`` = 5 convolutions (3×3×3 over (t, y, x), ``n_filters`` = 64, ReLU, He initialisation)
whose output is added to its input (residual), followed by a data-consistency (DC) layer; the
optional k-space data-sharing layer (``data_sharing``) feeds each CNN the images whose k-space is
filled, at unsampled points, with the average of the samples of frames within distance 0…4.
Weights are not shared between cascades. Input: the zero-filled image, real and imaginary parts
as two channels. Training (``torchgadgets train dc_cnn``): MSE, Adam lr 1e-3, ℓ2 1e-6.

Extensions [EXT] (not in the paper, labelled as such in results):

* multi-coil SENSE and non-Cartesian data through the problem's encoding operator ``E``: the
  default DC is the proximal step ``x = argmin ‖Ex − y‖²/L + μ‖x − z‖²`` by ``cg_iter`` CG steps
  (``dc: prox``; on single-coil Cartesian data it equals the paper's noisy DC with λ = 1/(μL)),
  or one gradient step ``dc: gradient``. The paper's hard replacement ``k ← (1−m)k + m·k₀`` is
  ``dc: hard`` (Cartesian; coil-wise with the maps for several coils). μ, α are learned per cascade.
* data scaling: data and images are divided by the peak of the zero-filled image before the
  network and multiplied back after, so one set of weights serves every data scale.
* data sharing works on Cartesian data only (frames are treated as cyclic, as in cine).

``weights`` is a registry name (``recon_core/weights/registry.json`` or ``$TORCHGADGETS_WEIGHTS``),
a path to a file written by :func:`recon_core.training.weights.save_weights`, or ``default``: the
registered ``dc_cnn`` weights whose architecture equals this one (shipped: the ``fast``
architecture, trained on phantoms only). Weights are checked by hash and architecture when loaded.

Presets: ``paper`` = D5-C10(S) above (no weights shipped: train them, ideally on a GPU); ``fast`` =
5 cascades × 16 filters, no data sharing — the shipped ``dc_cnn_fast`` (trained 750 steps on 32²
phantoms, ≈12 CPU-minutes; command in the registry). ``auto`` means ``fast`` on every device until
paper weights exist. Measured with ``dc_cnn_fast`` on held-out phantoms (true maps, 6 frames, noise
1 %), PSNR zero-filled / CG-SENSE / DC-CNN: Cartesian R=4 32² 19.6 / 28.1 / 32.6 dB, radial 12 spokes
32² 20.8 / 25.5 / 29.8 dB, spiral 2 of 16 48² 15.4 / 20.3 / 26.9 dB, radial 21 spokes 48²
24.6 / 33.7 / 31.2 dB; 0.3–1.6 s per scan on the CPU. Through the chains at 128² it is below CG-SENSE
(README quality table): the weights have seen 32² problems only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from recon_core.fft import fft2c, ifft2c
from recon_core.methods.base import MethodParams, ProgressCallback, ReconMethod, ReconProblem
from recon_core.nets.blocks import ConvStack, channels_to_complex, complex_to_channels
from recon_core.nets.unrolled import DC_KINDS, DCContext, estimate_lipschitz, make_dc

Tensor = torch.Tensor

#: Parameters that define the network (and therefore must match the weights' metadata).
ARCH_KEYS = ("n_cascades", "n_layers", "n_filters", "conv_dim", "data_sharing", "share_frames", "dc", "activation")


@dataclass
class DCCNNParams(MethodParams):
    """Paper defaults (D5-C10(S)); ``presets["fast"]`` is the CPU architecture with shipped weights."""

    n_cascades: int = 10
    n_layers: int = 5
    n_filters: int = 64
    conv_dim: int = 3
    data_sharing: bool = True
    share_frames: int = 5
    dc: str = "prox"
    activation: str = "relu"
    cg_iter: int = 5
    weights: str = "default"


def _sense_combine(coil_k: Tensor, maps: Tensor) -> Tensor:
    """``Σ S̄_c F⁻¹k_c / Σ|S_c|²`` for ``[F, C, Ny, Nx]`` coil k-space."""
    num = torch.sum(maps.conj() * ifft2c(coil_k), dim=-3)
    den = torch.sum(maps.abs() ** 2, dim=0)
    return torch.where(den > 1e-8, num / den.clamp_min(1e-8), torch.zeros_like(num))


def zero_filled_image(problem: ReconProblem) -> Tensor:
    """The zero-filled (Cartesian) / DCF-gridded (non-Cartesian) SENSE-combined image ``[F, Ny, Nx]``."""
    from recon_core.methods.zero_filled import ZeroFilled

    return ZeroFilled(preset="paper").reconstruct(problem)


class DCCNNNet(nn.Module):
    """The cascade: ``x ← DC(x + CNN(x))`` ``n_cascades`` times on normalised complex images."""

    def __init__(self, arch: dict[str, Any]) -> None:
        super().__init__()
        self.arch = dict(arch)
        if arch["dc"] not in DC_KINDS:
            raise ValueError(f"dc must be one of {list(DC_KINDS)}, got {arch['dc']!r}")
        if arch["conv_dim"] not in (2, 3):
            raise ValueError(f"conv_dim must be 2 or 3, got {arch['conv_dim']}")
        n_in = 2 * (int(arch["share_frames"]) if arch["data_sharing"] else 1)
        self.cnns = nn.ModuleList(
            ConvStack(n_in, 2, hidden=int(arch["n_filters"]), n_layers=int(arch["n_layers"]),
                      dim=int(arch["conv_dim"]), activation=str(arch["activation"]))
            for _ in range(int(arch["n_cascades"])))
        self.dcs = nn.ModuleList(make_dc(str(arch["dc"])) for _ in range(int(arch["n_cascades"])))

    def set_cg_iter(self, n: int) -> None:
        for dc in self.dcs:
            if hasattr(dc, "cg_iter"):
                dc.cg_iter = int(n)

    def _shared_inputs(self, x: Tensor, ctx: DCContext) -> list[Tensor]:
        """Data-sharing layer: images whose unsampled k-space is filled from frames within distance d."""
        if ctx.mask is None or ctx.coil_maps is None:
            raise ValueError("dc_cnn: data_sharing needs Cartesian data; set data_sharing: false for "
                             "radial / spiral trajectories")
        maps = ctx.coil_maps
        m = ctx.mask.to(x.real.dtype).expand(x.shape[0], -1, -1).unsqueeze(1)  # [F, 1, Ny, Nx]
        k = fft2c(x.unsqueeze(1) * maps)
        my = m * ctx.y
        count = torch.zeros_like(m)
        total = torch.zeros_like(k)
        out = []
        for d in range(int(self.arch["share_frames"])):
            shifts = (0,) if d == 0 else (d, -d)
            for s in shifts:
                count = count + torch.roll(m, s, dims=0)
                total = total + torch.roll(my, s, dims=0)
            filled = torch.where(count > 0, total / count.clamp_min(1), k)
            out.append(_sense_combine(filled, maps))
        return out

    def forward(self, x0: Tensor, ctx: DCContext) -> Tensor:
        dim = int(self.arch["conv_dim"])
        x = x0
        for cnn, dc in zip(self.cnns, self.dcs):
            x = self.cascade(cnn, dc, x, ctx, dim)
        return x

    def cascade(self, cnn: nn.Module, dc: nn.Module, x: Tensor, ctx: DCContext, dim: int) -> Tensor:
        """One cascade: residual CNN then DC."""
        imgs = self._shared_inputs(x, ctx) if self.arch["data_sharing"] else [x]
        inp = torch.cat([complex_to_channels(i, dim) for i in imgs], dim=1)
        z = x + channels_to_complex(cnn(inp), dim)
        return dc(z, ctx)


class DCCNN(ReconMethod[DCCNNParams]):
    """Deep cascade of CNNs with data consistency; trained weights from the registry."""

    name = "dc_cnn"
    Params = DCCNNParams
    uses_autograd = False
    presets = {"fast": {"n_cascades": 5, "n_filters": 16, "data_sharing": False}}
    #: ``weights``: a registry name or a path; a chain sent over the network may give registered names only.
    weights_params = ("weights",)

    @classmethod
    def auto_preset(cls, device: torch.device | str | None) -> str:
        """``auto`` = ``fast`` on every device: the architecture with shipped weights (no weights for
        the paper's D5-C10(S) are shipped yet; ``preset: paper`` asks for them explicitly)."""
        return "fast"

    # -- the parts training uses ------------------------------------------------------------
    def arch(self) -> dict[str, Any]:
        """The architecture parameters (what the weights' metadata must match)."""
        return {k: getattr(self.params, k) for k in ARCH_KEYS}

    def build_network(self) -> DCCNNNet:
        """A freshly initialised network for this architecture (on the CPU; ``.to()`` it)."""
        net = DCCNNNet(self.arch())
        net.set_cg_iter(self.params.cg_iter)
        return net

    def prepare(self, problem: ReconProblem) -> tuple[Tensor, DCContext, float]:
        """Normalised zero-filled start image, DC context (data ÷ scale, ‖EᴴE‖) and the scale."""
        x_zf = zero_filled_image(problem)
        scale = float(x_zf.abs().max())
        if not scale > 0:
            scale = 1.0
        shape = (problem.n_frames, *problem.image_shape)
        lip = estimate_lipschitz(problem.operator.normal, shape, problem.device)
        ctx = DCContext(operator=problem.operator, y=problem.kspace / scale, lipschitz=lip,
                        mask=problem.mask if problem.is_cartesian else None,
                        coil_maps=problem.coil_maps if problem.is_cartesian else None)
        return x_zf / scale, ctx, scale

    def forward_normalised(self, net: DCCNNNet, problem: ReconProblem) -> tuple[Tensor, float]:
        """Network output on the normalised scale and the scale (differentiable in ``net``)."""
        x0, ctx, scale = self.prepare(problem)
        return net(x0, ctx), scale

    # -- inference ------------------------------------------------------------------------------
    def load_network(self, device: torch.device) -> DCCNNNet:
        """Build the network and load the configured weights onto ``device`` (verified)."""
        from recon_core.training.weights import load_trained_network

        return load_trained_network(self, device)  # type: ignore[return-value]

    def reconstruct(self, problem: ReconProblem, progress: ProgressCallback | None = None) -> Tensor:
        p = self.params
        net = self.load_network(problem.device)
        x, ctx, scale = self.prepare(problem)
        total = p.n_cascades
        self._report(progress, 0, total, "cascade")
        for i, (cnn, dc) in enumerate(zip(net.cnns, net.dcs), start=1):
            x = net.cascade(cnn, dc, x, ctx, p.conv_dim)
            self._report(progress, i, total, "cascade")
            if i < total and self.out_of_time(i, total):
                break
        return (x * scale).to(torch.complex64)
