"""SLR-Net: a deep sparse and low-rank network for dynamic MRI (Ke et al., IEEE TMI 40:3379, 2021).

SLR-Net unrolls the iteration of eq. 13 of the paper for ``min ½‖Ex − d‖² + λ₁‖Dx‖₁ + λ₂‖x‖_*``
(variable splitting ``x = t``, scaled multiplier ``β``) into ``n_iter`` cells with separate weights.
Cell ``n`` (``x⁰`` = the zero-filled image, ``t⁰ = β⁰ = 0``):

* reconstruction layer R: ``r = x − λ₁·Eᴴ(Ex − d) − λ₂·(x + β − t)``, ``λ₁ = relu(a₁)`` (learned
  step) and ``λ₂ = relu(a₂)`` (learned ``ρ``-coupling), both 0.1 at init (the authors' code; the
  paper's text initialises ρ at 0, which a ReLU would never move). ``step_init`` (training only)
  sets λ₁'s initial value: the ``fast`` preset starts at 1 (a full ``1/L`` gradient step), because
  a short CPU training run cannot move λ₁ from 0.1 to ≈ 1 (Adam lr 1e-3 moves it ~1e-3 per step;
  the paper trains ~40 000 steps). The sign of the coupling term
  is the paper's (eq. 9); the authors' code adds it (BRIEFS §4 ⚠).
* sparse layer X: ``x = r + D̃(soft_θ(D r))`` with learned 3-D (t, y, x) transforms ``D`` (Conv3d
  2→16→16→16, ReLU between, no bias) and ``D̃`` (16→16→16→2), soft threshold
  ``sign(z)·relu(|z| − θ)``, ``θ`` learned (init 0.1); real and imaginary parts are the 2 channels.
  The symmetry output ``D̃(D r) − r`` enters the training loss (``sym_weight`` · its mean square,
  summed over cells: :meth:`SLRNet.training_loss`), so ``D̃`` stays close to a left inverse of ``D``.
* low-rank layer T: ``t = SVT(x)`` on the Casorati matrix (time × space) with the learned
  ``σ_max``-relative threshold of the authors' code, ``σ ← relu(σ − sigmoid(c)·σ_max)``, ``c = −2``
  at init (:class:`recon_core.nets.svt.LearnedSVT`, whose backward is finite for repeated
  singular values).
* multiplier update M: ``β ← β + relu(η)(x − t)``, ``η = 0.01`` at init.

The last cell's ``t`` and ``β`` would be unused, so it has no T and M layers. The output is the
last ``x``. Paper settings: 10 cells, 16 filters (the released code; BRIEFS §4.1), MSE + 0.01 ×
symmetry loss, Adam 1e-3.

Extensions [EXT] (not in the paper — it is single-coil Cartesian; labelled in results):

* multi-coil SENSE and non-Cartesian (radial, spiral) data through the problem's encoding
  operator ``E`` (``problem.operator``: coil maps, FFT or NUFFT, mask or trajectory); the gradient
  ``Eᴴ(Ex − d)`` is divided by ``L = ‖EᴴE‖`` (power iteration) so the learned step means the same
  for every operator; the start image is the SENSE-combined zero-filled / DCF-gridded image;
* data scaling: data and images are divided by the peak of the start image before the network and
  multiplied back after (one set of weights for every data scale);
* ``start: cg_sense`` (the ``fast`` preset): the first ``x`` is ``start_iter`` = 10 CG-SENSE
  iterations (λ = 0.01) instead of the SENSE-combined zero-filled image. On the paper's single-coil
  Cartesian data the zero-filled image is the minimum-norm least-squares solution; with several
  coils that solution is SENSE's, and 5 cells of one gradient step each cannot get there alone.

``weights``: a registry name, a path, or ``default`` = the registered ``slr_net`` weights whose
architecture equals this one (shipped: ``slr_net_fast``, trained on varied phantoms only, see the
registry for the command). ``preset: fast`` = the architecture with shipped weights (``n_iter`` and
``n_filters`` below); ``auto`` means ``fast`` on every device until paper-size weights exist.
Measured with ``slr_net_fast`` (200 CPU steps; command in the registry) on held-out Cartesian cine
(VD R = 8, 8 frames, 6 coils, 40²/48²/56², standard anatomy), mean PSNR: CG-SENSE 17.90, k-t SLR
19.98, SLR-Net 19.12 dB (below k-t SLR: the paper trains ~40 000 steps); through the ``default``
chain at 128² × 16 frames (README benchmark) 26.91 dB against CG-SENSE 22.20 / k-t SLR 33.67 dB, in
0.47× CG-SENSE's time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from recon_core.methods.base import MethodParams, ProgressCallback, ReconMethod, ReconProblem
from recon_core.nets.blocks import channels_to_complex, complex_to_channels
from recon_core.nets.svt import LearnedSVT
from recon_core.nets.unrolled import DCContext, estimate_lipschitz

Tensor = torch.Tensor

#: Parameters that define the network (and therefore must match the weights' metadata).
ARCH_KEYS = ("n_iter", "n_filters", "start")


@dataclass
class SLRNetParams(MethodParams):
    """Paper / released-code defaults; ``presets["fast"]`` is the CPU architecture with shipped weights."""

    n_iter: int = 10
    n_filters: int = 16
    sym_weight: float = 0.01
    step_init: float = 0.1
    start: str = "zero_filled"
    start_iter: int = 10
    weights: str = "default"


def _conv3(c_in: int, c_out: int) -> nn.Conv3d:
    conv = nn.Conv3d(c_in, c_out, 3, padding=1, bias=False)
    nn.init.xavier_uniform_(conv.weight)  # the TF/Keras default of the authors' code
    return conv


class SLRCell(nn.Module):
    """One SLR-Net cell: reconstruction (R), sparse (X), low-rank (T) and multiplier (M) layers."""

    def __init__(self, n_filters: int = 16, last: bool = False, step_init: float = 0.1) -> None:
        super().__init__()
        nf = int(n_filters)
        self.a1 = nn.Parameter(torch.tensor(float(step_init)))  # learned step λ₁ = relu(a₁)
        self.a2 = nn.Parameter(torch.tensor(0.1))      # learned coupling λ₂ = relu(a₂)
        self.theta = nn.Parameter(torch.tensor(0.1))   # soft threshold
        self.D = nn.Sequential(_conv3(2, nf), nn.ReLU(), _conv3(nf, nf), nn.ReLU(), _conv3(nf, nf))
        self.Dt = nn.Sequential(_conv3(nf, nf), nn.ReLU(), _conv3(nf, nf), nn.ReLU(), _conv3(nf, 2))
        self.last = bool(last)
        if not self.last:
            self.svt = LearnedSVT(-2.0)
            self.eta = nn.Parameter(torch.tensor(0.01))

    def forward(self, x: Tensor, t: Tensor, beta: Tensor, ctx: DCContext, need_sym: bool = True
                ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """``(x, t, β)`` → ``(x', t', β', symmetry residual)`` (``t, β`` unchanged in the last cell;
        the residual, a training-only quantity, is None unless ``need_sym``)."""
        grad = (ctx.operator.normal(x) - ctx.adjoint_y) / ctx.lipschitz
        lam1 = torch.relu(self.a1).to(x.device)
        lam2 = torch.relu(self.a2).to(x.device)
        r = x - lam1 * grad - lam2 * (x + beta - t)
        rc = complex_to_channels(r, 3)
        z = self.D(rc)
        zs = torch.sign(z) * torch.relu(z.abs() - self.theta)
        x_new = r + channels_to_complex(self.Dt(zs), 3)
        sym = channels_to_complex(self.Dt(z), 3) - r if need_sym else None
        if self.last:
            return x_new, t, beta, sym
        t_new = self.svt(x_new)
        beta_new = beta + torch.relu(self.eta).to(x.device) * (x_new - t_new)
        return x_new, t_new, beta_new, sym


class SLRNetNet(nn.Module):
    """``n_iter`` cells on normalised complex images ``[F, Ny, Nx]``."""

    def __init__(self, arch: dict[str, Any], step_init: float = 0.1) -> None:
        super().__init__()
        self.arch = dict(arch)
        n = int(arch["n_iter"])
        if n < 1:
            raise ValueError(f"n_iter must be >= 1, got {n}")
        self.cells = nn.ModuleList(SLRCell(int(arch["n_filters"]), last=(i == n - 1), step_init=step_init)
                                   for i in range(n))

    def forward(self, x0: Tensor, ctx: DCContext, need_sym: bool = True) -> tuple[Tensor, list[Tensor]]:
        """Output image and the cells' symmetry residuals (empty unless ``need_sym``)."""
        x, t, beta = x0, torch.zeros_like(x0), torch.zeros_like(x0)
        syms = []
        for cell in self.cells:
            x, t, beta, sym = cell(x, t, beta, ctx, need_sym)
            if sym is not None:
                syms.append(sym)
        return x, syms


START_KINDS = ("zero_filled", "cg_sense")


def prepare_normalised(problem: ReconProblem, start: str = "zero_filled", start_iter: int = 10
                       ) -> tuple[Tensor, DCContext, float]:
    """Start image ÷ its peak, the DC context (data ÷ the same scale, ``L = ‖EᴴE‖``), the scale.

    ``start``: ``zero_filled`` (the paper) or ``cg_sense`` ([EXT]: ``start_iter`` CG-SENSE iterations,
    λ = 0.01 — the multi-coil counterpart of the single-coil zero-filled image, which *is* the
    minimum-norm least-squares solution there)."""
    from recon_core.methods.dc_cnn import zero_filled_image

    if start == "zero_filled":
        x_zf = zero_filled_image(problem)
    elif start == "cg_sense":
        from recon_core.methods.cg_sense import CGSense

        with torch.no_grad():
            x_zf = CGSense(preset="paper", max_iter=int(start_iter), lam=0.01).reconstruct(problem)
    else:
        raise ValueError(f"slr_net: start must be one of {list(START_KINDS)}, got {start!r}")
    scale = float(x_zf.abs().max())
    if not scale > 0:
        scale = 1.0
    shape = (problem.n_frames, *problem.image_shape)
    lip = estimate_lipschitz(problem.operator.normal, shape, problem.device)
    ctx = DCContext(operator=problem.operator, y=problem.kspace / scale, lipschitz=lip,
                    mask=problem.mask if problem.is_cartesian else None,
                    coil_maps=problem.coil_maps if problem.is_cartesian else None)
    return x_zf / scale, ctx, scale


class SLRNet(ReconMethod[SLRNetParams]):
    """SLR-Net with trained weights from the registry ([EXT] multi-coil / non-Cartesian)."""

    name = "slr_net"
    Params = SLRNetParams
    uses_autograd = False
    presets = {"fast": {"n_iter": 5, "n_filters": 16, "step_init": 1.0, "start": "cg_sense"}}
    weights_params = ("weights",)

    @classmethod
    def auto_preset(cls, device: torch.device | str | None) -> str:
        """``auto`` = ``fast`` on every device: the architecture with shipped weights."""
        return "fast"

    # -- the parts training uses ------------------------------------------------------------
    def arch(self) -> dict[str, Any]:
        """The architecture parameters (what the weights' metadata must match)."""
        return {k: getattr(self.params, k) for k in ARCH_KEYS}

    def build_network(self) -> SLRNetNet:
        """A freshly initialised network for this architecture (on the CPU; ``.to()`` it)."""
        return SLRNetNet(self.arch(), step_init=self.params.step_init)

    def forward_normalised(self, net: SLRNetNet, problem: ReconProblem) -> tuple[Tensor, float]:
        """Network output on the normalised scale and the scale (differentiable in ``net``)."""
        x0, ctx, scale = prepare_normalised(problem, self.params.start, self.params.start_iter)
        return net(x0, ctx, need_sym=False)[0], scale

    def training_loss(self, net: SLRNetNet, problem: ReconProblem, ground_truth: Tensor) -> Tensor:
        """The paper's loss on the normalised scale:
        ``mean|x − gt|² + sym_weight · Σ_cells mean|D̃(Dr) − r|²`` (the training loop calls it instead
        of its plain MSE)."""
        x0, ctx, scale = prepare_normalised(problem, self.params.start, self.params.start_iter)
        x, syms = net(x0, ctx)
        mse = (x - ground_truth.to(x.device) / scale).abs().pow(2).mean()
        sym = torch.stack([s.abs().pow(2).mean() for s in syms]).sum()
        return mse + float(self.params.sym_weight) * sym

    # -- inference ------------------------------------------------------------------------------
    def load_network(self, device: torch.device) -> SLRNetNet:
        """Build the network and load the configured weights onto ``device`` (verified)."""
        from recon_core.training.weights import load_trained_network

        return load_trained_network(self, device)  # type: ignore[return-value]

    def reconstruct(self, problem: ReconProblem, progress: ProgressCallback | None = None) -> Tensor:
        net = self.load_network(problem.device)
        x, ctx, scale = prepare_normalised(problem, self.params.start, self.params.start_iter)
        t, beta = torch.zeros_like(x), torch.zeros_like(x)
        total = len(net.cells)
        self._report(progress, 0, total, "cell")
        for i, cell in enumerate(net.cells, start=1):
            x, t, beta, _ = cell(x, t, beta, ctx, need_sym=False)
            self._report(progress, i, total, "cell")
            if i < total and self.out_of_time(i, total):
                break
        return (x * scale).to(torch.complex64)
