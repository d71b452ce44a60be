"""DC-CNN-LR: DC-CNN with SLR-Net's plug-and-play low-rank module (Ke et al., IEEE TMI 2021, §II-C).

Each cascade of :mod:`recon_core.methods.dc_cnn` becomes ``x ← DC(SVT(x + CNN(x)))``: the learned
singular-value thresholding of the Casorati matrix (:class:`recon_core.nets.svt.LearnedSVT`,
``σ ← relu(σ − sigmoid(c)·σ_max)``, one learned ``c`` per cascade, −2 at init) sits after the CNN
and *before* the data-consistency layer — location L2 of the paper's Fig. 2, which its §IV-A found
best ("avoid embedding behind the DC module"). Everything else (architecture, DC layer, [EXT]
multi-coil / non-Cartesian DC through the encoding operator, data scaling, presets, training) is
DC-CNN's, so plain ``dc_cnn`` trained with the same command is the control of the paper's claim
(Table II: DC-CNN 41.46 → DC-CNN-LR 42.89 dB at 8×).

``weights``: a registry name, a path, or ``default`` = the registered ``dc_cnn_lr`` weights of this
architecture (shipped: ``dc_cnn_lr_fast``, trained on varied phantoms only; command in the registry).
On a single frame (2-D data) the Casorati matrix has one singular value and the module is a
learned uniform shrinkage ``(1 − sigmoid(c))``, i.e. no low-rank prior.

Measured (shipped ``dc_cnn_lr_fast`` vs the control ``dc_cnn_fast_cine``, both 200 CPU steps of the
same command): held-out Cartesian cine VD R = 8 at 40²/48²/56², mean PSNR 20.67 vs 20.10 dB
(k-t SLR 19.98); validation 29.10 vs 24.99 dB; at 128² × 16 frames through the chain 23.19 vs
23.58 dB (the models were trained at 24–32²).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from recon_core.methods.base import ProgressCallback, ReconProblem
from recon_core.methods.dc_cnn import DCCNN, DCCNNNet, DCCNNParams
from recon_core.nets.blocks import channels_to_complex, complex_to_channels
from recon_core.nets.svt import LearnedSVT
from recon_core.nets.unrolled import DCContext

Tensor = torch.Tensor


class DCCNNLRNet(DCCNNNet):
    """DC-CNN's cascade with a learned SVT between the residual CNN and the DC layer."""

    def __init__(self, arch: dict[str, Any]) -> None:
        super().__init__(arch)
        self.lrs = nn.ModuleList(LearnedSVT(-2.0) for _ in range(int(arch["n_cascades"])))

    def forward(self, x0: Tensor, ctx: DCContext) -> Tensor:
        dim = int(self.arch["conv_dim"])
        x = x0
        for i in range(len(self.cnns)):
            x = self.cascade_at(i, x, ctx, dim)
        return x

    def cascade_at(self, i: int, x: Tensor, ctx: DCContext, dim: int) -> Tensor:
        """Cascade ``i``: residual CNN, learned SVT (location L2), then DC."""
        imgs = self._shared_inputs(x, ctx) if self.arch["data_sharing"] else [x]
        inp = torch.cat([complex_to_channels(im, dim) for im in imgs], dim=1)
        z = x + channels_to_complex(self.cnns[i](inp), dim)
        return self.dcs[i](self.lrs[i](z), ctx)


class DCCNNLR(DCCNN):
    """DC-CNN + plug-and-play low-rank module; trained weights from the registry."""

    name = "dc_cnn_lr"
    Params = DCCNNParams

    def build_network(self) -> DCCNNLRNet:
        """A freshly initialised network for this architecture (on the CPU; ``.to()`` it)."""
        net = DCCNNLRNet(self.arch())
        net.set_cg_iter(self.params.cg_iter)
        return net

    def reconstruct(self, problem: ReconProblem, progress: ProgressCallback | None = None) -> Tensor:
        p = self.params
        net = self.load_network(problem.device)
        x, ctx, scale = self.prepare(problem)
        total = p.n_cascades
        self._report(progress, 0, total, "cascade")
        for i in range(total):
            x = net.cascade_at(i, x, ctx, p.conv_dim)
            self._report(progress, i + 1, total, "cascade")
            if i + 1 < total and self.out_of_time(i + 1, total):
                break
        return (x * scale).to(torch.complex64)
