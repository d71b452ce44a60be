"""GIP — Graph Image Prior for unsupervised dynamic MRI (Li, Chen, Wang, Liu, Li; arXiv 2403.15770).

A scan-specific generator ``G_θ(z)`` (``recon_core.nets.gip``: ``F`` independent per-frame CNNs from
one shared noise latent, then a graph network over the frames with a cosine-similarity kNN graph)
is fitted to the undersampled k-space in three "DIP initialisation" stages, then refined by ADMM on

    min_{x, θ}  ‖A x − y‖²  s.t.  x = G_θ(z)

alternating, per outer iteration (paper Eq. 7–9, authors' code):

1. X-step: ``cg_iters`` CG iterations on ``(AᴴA + ρI) X = Aᴴy + ρ·G − Λ``, warm-started from the
   previous ``X``;
2. θ-step: ``admm_inner`` Adam steps on ``‖G_θ(z) − (X + Λ/ρ)‖²`` (sum), networks in train mode;
3. ``G ← G_θ(z)`` in eval mode (BatchNorm running statistics);
4. ``Λ ← Λ + ρ (X − G)``.

The reconstruction is ``X`` after the last X-step.

Pre-training (BRIEFS §1.2, the authors' code — the paper only says "DIP initialisation"; their README
calls it critical): stage 0 scales the data by ``s₁ = ‖mean_t G_head(z)‖ / ‖mean_t x₀‖`` (network
output at initialisation over a reference image ``x₀``: the zero-filled image, DCF gridding for
non-Cartesian data); stage 1 fits the per-frame CNNs with per-frame 1×1 heads to the k-space;
stage 2 rescales (``s₂`` from the graph network's output at initialisation) and fits the graph
network alone (CNNs frozen, graph recomputed every step); stage 3 fits both jointly, the graph
recomputed every step for the first ``graph_freeze`` fraction of the steps, then computed once in
eval mode and frozen (also through ADMM). All network losses are sum-reduced squared errors over
real and imaginary parts; Adam with ``β = (0.5, 0.98)``.

Where paper and code differ (BRIEFS §1.4): the width ``C`` is the paper's 12 by default (the code
uses 24: ``channels: 24``); K = 7, Cz = 8, ρ = 1e-3, 10 CG steps, 20 ADMM iterations × 500 Adam
steps at lr 1e-5 are the same in both.

Our conventions and extensions
------------------------------
* **Encoding.** ``problem.operator`` (SENSE: coil maps and Cartesian mask or NUFFT) for every
  trajectory. The k-space loss ``‖A x − y‖²`` is evaluated from the normal operator,
  ``Re⟨x, AᴴA x⟩ − 2 Re⟨x, Aᴴy⟩ + ‖y‖²``, with the exact gradient ``2(AᴴA x − Aᴴy)`` (one fast
  normal — Toeplitz for non-Cartesian data — per step instead of a forward and a backward NUFFT).
* **DCF-weighted data consistency** (``dcf_weighted``, off by default = the paper, which replaces
  the operators by their NUFFT counterparts without mentioning a DCF): the authors' NUFFT helper
  multiplies the DCF before the adjoint, so their CG solves the weighted problem
  ``(AᴴDA + ρI) X = AᴴDy + …``. ``dcf_weighted: true`` uses that in the X-step
  (``problem.encoding(weights=√dcf)``); the pre-training loss stays unweighted, as in their code.
* **ρ relative to ‖AᴴA‖.** ``ρ_eff = rho · λ_max(AᴴA)`` (power iteration). For Cartesian data with
  a fully sampled centre ``λ_max = 1`` and this is the paper's ρ; it keeps ρ's meaning on
  non-Cartesian and DCF-weighted operators whose scale differs.
* **Coil-map support.** The generator output is multiplied by the map support
  ``Σ_c|S_c|² > 1e-6·max`` (outside it the encoding is blind), as for TD-DIP; X is then zero there.
* **Matrix sizes.** See ``recon_core.nets.gip`` (up-sampling sizes, FEN on small images).
* **Time budget / stop.** ``max_time_s`` ends the current stage and skips the rest: the estimate
  so far is returned (the last X, or the current network output) and ``stopped_early`` says where.

References
----------
Z. Li, X. Chen, S. Wang, Y. Liu, D. Li, "Graph Image Prior for unsupervised dynamic cardiac cine MRI
reconstruction", arXiv:2403.15770, 2024; code github.com/lizs17/GIP_Cardiac_MRI.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from recon_core.linop import LinearOperator
from recon_core.methods.base import MethodParams, ProgressCallback, ReconMethod, ReconProblem
from recon_core.nets.fitting import FitSchedule, NetworkFit, init_seeded
from recon_core.nets.gip import GIPGenerator

Tensor = torch.Tensor

__all__ = ["GIPParams", "GIP", "quadratic_data_loss"]

#: Adam β of every stage (authors' code)
_BETAS = (0.5, 0.98)


@dataclass
class GIPParams(MethodParams):
    """GIP parameters; the defaults are the paper's (``preset: paper``).

    Attributes
    ----------
    channels:
        Width ``C`` of the generator (paper 12; authors' code 24).
    latent_channels:
        Channels ``Cz`` of the 8×8 noise latent (8).
    k:
        Neighbours per graph node, itself included (7; capped at the number of frames).
    steps_cnn, steps_gcn, steps_joint:
        Pre-training stage 1 (per-frame CNNs), 2 (graph network), 3 (joint) Adam steps
        (10 000, 5 000, 15 000).
    lr_cnn, lr_gcn, lr_joint:
        Their learning rates (5e-4, 5e-4, 5e-5).
    graph_freeze:
        Fraction of stage 3 after which the graph is frozen (10 000 / 15 000).
    admm_iters:
        ADMM outer iterations (20).
    admm_inner:
        Adam steps of the θ-step per outer iteration (500).
    lr_admm:
        Adam learning rate of the θ-step (1e-5; one optimiser for all outer iterations).
    cg_iters:
        CG iterations of the X-step (10).
    rho:
        ADMM penalty ρ (1e-3), relative to ``λ_max(AᴴA)`` (module docstring).
    dcf_weighted:
        Non-Cartesian X-step with the DCF-weighted operator of the authors' code (off = paper).
    admm_x0, x0_iters:
        Start of the first X-step: ``"network"`` (authors' code: X₀ = G after pre-training; the paper
        does not say) or ``"cg"`` [EXT]: X₀ = ``x0_iters`` CG iterations from zero on
        ``(AᴴA + ρI) X = Aᴴy`` (the X-step with G = Λ = 0, a ρ-regularised CG-SENSE). With a network
        that is far from fitted (short CPU budgets) ``"network"`` puts its errors into the null space of
        A, where the X-steps never remove them; ``"cg"`` starts ADMM from the data.
    preview_every:
        Attach a lazy image preview to every ``preview_every``-th fitting progress event (0 = never).
    """

    channels: int = 12
    latent_channels: int = 8
    k: int = 7
    steps_cnn: int = 10_000
    steps_gcn: int = 5_000
    steps_joint: int = 15_000
    lr_cnn: float = 5e-4
    lr_gcn: float = 5e-4
    lr_joint: float = 5e-5
    graph_freeze: float = 2.0 / 3.0
    admm_iters: int = 20
    admm_inner: int = 500
    lr_admm: float = 1e-5
    cg_iters: int = 10
    rho: float = 1e-3
    dcf_weighted: bool = False
    admm_x0: str = "network"
    x0_iters: int = 30
    preview_every: int = 0


class _QuadraticLoss(torch.autograd.Function):
    """``‖A x − y‖² = Re⟨x, N x⟩ − 2 Re⟨x, b⟩ + c`` with ``N = AᴴA``, ``b = Aᴴy``, ``c = ‖y‖²``;
    backward ``2 (N x − b)`` (PyTorch's convention for a real function of a complex tensor)."""

    @staticmethod
    def forward(ctx, x: Tensor, normal: Callable[[Tensor], Tensor], b: Tensor,  # type: ignore[override]
                c: float) -> Tensor:
        with torch.no_grad():
            nx = normal(x)
            r = nx - b
            ctx.save_for_backward(r)
            loss = torch.real(torch.vdot(x.reshape(-1), (r - b).reshape(-1))) + c
        return loss.to(torch.float32)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        (r,) = ctx.saved_tensors
        return 2.0 * g * r, None, None, None


def quadratic_data_loss(x: Tensor, normal: Callable[[Tensor], Tensor], b: Tensor, c: float = 0.0) -> Tensor:
    """The k-space loss ``‖A x − y‖²`` from ``N = AᴴA`` and ``b = Aᴴy`` (one ``N`` per call).

    ``c = ‖y‖²`` makes the value equal the residual norm; the gradient does not depend on it.
    """
    return _QuadraticLoss.apply(x, normal, b, float(c))


def _frame_mean_norm(x: Tensor) -> float:
    return float(x.detach().mean(dim=0).abs().square().sum().sqrt())


class GIP(ReconMethod[GIPParams]):
    """Graph Image Prior: GIP generator pre-trained in three stages, then ADMM (module docstring).

    ``reconstruct`` reports progress per step with stages ``"dip-init 1/3"`` … ``"dip-init 3/3"``,
    ``"admm k/N cg"`` (CG iterations) and ``"admm k/N"`` (θ-step), raises
    :class:`~recon_core.methods.base.StopRequested` when asked to stop, honours ``max_time_s`` and
    returns ``X`` ``[F, Ny, Nx]`` complex64 on the problem's device; deterministic on the CPU for
    a given ``problem.seed`` (network weights and latent drawn under ``init_seeded``).
    """

    name = "gip"
    Params = GIPParams
    uses_autograd = True
    quick_params = {"channels": 2, "k": 2, "steps_cnn": 3, "steps_gcn": 2, "steps_joint": 3,
                    "admm_iters": 2, "admm_inner": 2, "cg_iters": 2}
    #: CPU preset, sized so that a 128², 16-frame, 12-coil cine ends in about 10 min on 2 (shared)
    #: cores: C = 4, K = 3, 100 / 20 / 40 pre-training steps at the paper's learning rates, 3 ADMM
    #: iterations × 10 θ-steps at lr 1e-4 — far shorter than the paper's 10 000 + 5 000 + 15 000 steps.
    #: Own 48², 8-frame, 8-coil radial 13-spoke cine (1 % noise, true maps, CG-SENSE 27.70 dB): this
    #: preset 25.73 dB; with 400 / 100 / 150 + 4 × 30 steps (about 4× the time) 28.11 dB. The
    #: benchmark's 24.58 dB on radial 13 (README) predates the GroupConv2d gradient fix. Use
    #: ``preset: paper`` on a GPU.
    presets = {"fast": {"channels": 4, "k": 3, "steps_cnn": 100, "steps_gcn": 20, "steps_joint": 40,
                        "admm_iters": 3, "admm_inner": 10, "lr_admm": 1e-4}}

    def __init__(self, params: GIPParams | None = None, **kw) -> None:
        super().__init__(params, **kw)
        self._check_params()   # bad values fail when the chain is built, not minutes into a fit

    # ------------------------------------------------------------------------------------------
    def _check_params(self) -> GIPParams:
        p = self.params
        for key in ("channels", "latent_channels", "k", "steps_cnn", "steps_gcn", "steps_joint",
                    "admm_iters", "admm_inner", "cg_iters", "preview_every"):
            v = getattr(p, key)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"gip: {key} must be an int, got {v!r}")
            if v < (1 if key in ("channels", "latent_channels", "k") else 0):
                raise ValueError(f"gip: {key} must be >= {1 if key in ('channels', 'latent_channels', 'k') else 0}, "
                                 f"got {v}")
        for key in ("lr_cnn", "lr_gcn", "lr_joint", "lr_admm", "rho"):
            v = float(getattr(p, key))
            if not (v > 0 and math.isfinite(v)):
                raise ValueError(f"gip: {key} must be > 0, got {v}")
        if p.admm_x0 not in ("network", "cg"):
            raise ValueError(f"gip: admm_x0 must be 'network' or 'cg', got {p.admm_x0!r}")
        if isinstance(p.x0_iters, bool) or not isinstance(p.x0_iters, int) or p.x0_iters < 0:
            raise ValueError(f"gip: x0_iters must be an int >= 0, got {p.x0_iters!r}")
        if not 0.0 <= float(p.graph_freeze) <= 1.0:
            raise ValueError(f"gip: graph_freeze must be in [0, 1], got {p.graph_freeze}")
        return p

    @staticmethod
    def _map_support(coil_maps: Tensor) -> Tensor:
        ssq = coil_maps.detach().abs().square().sum(0)
        peak = float(ssq.max())
        if not (peak > 0 and math.isfinite(peak)):
            return torch.ones_like(ssq)
        return (ssq > 1e-6 * peak).to(torch.float32)

    @staticmethod
    def _reference_image(problem: ReconProblem) -> Tensor:
        """Zero-filled (Cartesian) / DCF-gridded (non-Cartesian) image: the scale reference ``x₀``."""
        from recon_core.methods.zero_filled import ZeroFilled

        return ZeroFilled(density_compensation=not problem.is_cartesian).reconstruct(problem)

    def _cg_operator(self, problem: ReconProblem, p: GIPParams) -> tuple[LinearOperator, Tensor]:
        """The X-step's operator and its data (DCF-weighted if ``dcf_weighted``)."""
        if p.dcf_weighted and not problem.is_cartesian:
            if problem.dcf is None:
                raise ValueError("gip: dcf_weighted needs the problem's density compensation (problem.dcf)")
            w = problem.dcf.to(device=problem.device, dtype=torch.float32).clamp_min(0).sqrt()
            w = w / w.max().clamp_min(1e-30)
            return problem.encoding(weights=w), problem.kspace * w.unsqueeze(1)
        return problem.operator, problem.kspace

    # ------------------------------------------------------------------------------------------
    def reconstruct(self, problem: ReconProblem, progress: ProgressCallback | None = None) -> Tensor:
        from recon_core.solvers import conjugate_gradient, power_iteration

        p = self._check_params()
        device = problem.device
        F = problem.n_frames
        ny, nx = problem.image_shape
        support = self._map_support(problem.coil_maps).to(device)
        op = problem.operator
        y = problem.kspace.to(torch.complex64)
        with torch.no_grad():
            b_raw = op.adjoint(y)
            c_raw = float(y.abs().square().sum())
            x_ref = self._reference_image(problem).to(device)
        ref_norm = max(_frame_mean_norm(x_ref), 1e-30)

        net = init_seeded(problem.seed, lambda: GIPGenerator(F, (ny, nx), channels=p.channels,
                                                             latent_channels=p.latent_channels, k=p.k)).to(device)
        normal = op.normal

        def make_fit(module: torch.nn.Module, n: int, lr: float, stage: str,
                     preview: Optional[Callable[[], Tensor]]) -> NetworkFit:
            fit = NetworkFit(self, module, FitSchedule(max(n, 0), lr=lr), seed=problem.seed, progress=progress,
                             stage=stage, preview=preview, preview_every=p.preview_every)
            for group in fit.optimizer.param_groups:
                group["betas"] = _BETAS
            return fit

        def run_fit(fit: NetworkFit, step: Callable[[int], Tensor]) -> bool:
            """Run a fit; False when the time budget is spent (stop here)."""
            if fit.schedule.n_steps > 0:
                fit.run(step)
            return not self.out_of_time()

        # ---- stage 0 + 1: data scale from the CNN heads at initialisation; fit the per-frame CNNs
        with torch.no_grad():
            s1 = _frame_mean_norm(net.forward_cnn() * support) / ref_norm
        s1 = s1 if s1 > 0 and math.isfinite(s1) else 1.0
        b, c = b_raw * s1, c_raw * s1 * s1

        def step_cnn(_i: int) -> Tensor:
            return quadratic_data_loss(net.forward_cnn() * support, normal, b, c)

        def out_cnn() -> Tensor:
            with torch.no_grad():
                return (net.forward_cnn() * support) / s1

        going = run_fit(make_fit(net.cnns, p.steps_cnn, p.lr_cnn, "dip-init 1/3", out_cnn), step_cnn)
        estimate: Callable[[], Tensor] = out_cnn

        # ---- stage 2: rescale from the graph network's output at initialisation; fit it alone
        if going:
            with torch.no_grad():
                feats = net.features().detach()   # CNNs frozen: their features are constant here
                s2 = _frame_mean_norm(net.gcn(feats) * support) / ref_norm
            s2 = s2 if s2 > 0 and math.isfinite(s2) else 1.0
            b, c = b_raw * s2, c_raw * s2 * s2

            def step_gcn(_i: int) -> Tensor:
                return quadratic_data_loss(net.gcn(feats) * support, normal, b, c)

            def out_gen() -> Tensor:
                with torch.no_grad():
                    return (net() * support) / s2

            going = run_fit(make_fit(net.gcn, p.steps_gcn, p.lr_gcn, "dip-init 2/3", out_gen), step_gcn)
            estimate, scale = out_gen, s2

            # ---- stage 3: joint fit, graph frozen after graph_freeze of the steps
            if going:
                freeze_at = int(round(p.graph_freeze * p.steps_joint))
                if freeze_at == 0:
                    net.freeze_graph()

                def step_joint(i: int) -> Tensor:
                    if i == freeze_at + 1 and net.gcn.frozen_graph is None:
                        net.freeze_graph()
                        net.train()
                    return quadratic_data_loss(net() * support, normal, b, c)

                going = run_fit(make_fit(net, p.steps_joint, p.lr_joint, "dip-init 3/3", out_gen), step_joint)
            if net.gcn.frozen_graph is None:
                net.freeze_graph()

            # ---- ADMM
            if going and p.admm_iters > 0:
                x = self._admm(problem, p, net, support, scale, progress, conjugate_gradient, power_iteration)
                return (x / scale).to(torch.complex64)
        net.eval()
        return estimate().detach().to(torch.complex64)

    # ------------------------------------------------------------------------------------------
    def _admm(self, problem: ReconProblem, p: GIPParams, net: GIPGenerator, support: Tensor, scale: float,
              progress: ProgressCallback | None, conjugate_gradient, power_iteration) -> Tensor:
        """ADMM on ``min ‖Ax − y‖² s.t. x = G_θ(z)`` (module docstring); returns the last X (scaled units)."""
        op_cg, y_cg = self._cg_operator(problem, p)
        F = problem.n_frames
        ny, nx = problem.image_shape
        with torch.no_grad():
            b = op_cg.adjoint(y_cg.to(torch.complex64)) * scale
            lam_max = power_iteration(op_cg.normal, (F, ny, nx), n_iter=15, device=problem.device,
                                      seed=int(problem.seed))
        rho = float(p.rho) * (lam_max if lam_max > 0 and math.isfinite(lam_max) else 1.0)

        def generate_eval() -> Tensor:
            net.eval()
            with torch.no_grad():
                g = net() * support
            net.train()
            return g

        g = generate_eval()
        if p.admm_x0 == "cg":
            # [EXT] X₀ = the X-step's own solve with G = 0, Λ = 0 from zero (a ρ-regularised CG-SENSE)
            with torch.no_grad():
                x, _info = conjugate_gradient(op_cg.normal, b, x0=torch.zeros_like(g), max_iter=p.x0_iters,
                                              tol=0.0, lam=rho)
        else:
            x = g.clone()
        lagr = torch.zeros_like(x)
        target: dict[str, Tensor] = {}

        def step(_i: int) -> Tensor:
            r = net() * support - target["t"]
            return r.real.square().sum() + r.imag.square().sum()

        fit = NetworkFit(self, net, FitSchedule(max(p.admm_inner, 0), lr=p.lr_admm), seed=problem.seed,
                         progress=progress, stage="admm", preview=lambda: x / scale, preview_every=p.preview_every)
        for group in fit.optimizer.param_groups:
            group["betas"] = _BETAS
        n = p.admm_iters
        for k in range(1, n + 1):
            stage = f"admm {k}/{n}"
            with torch.no_grad():
                rhs = b + rho * g - lagr
                if p.cg_iters > 0:
                    def callback(it: int, _x: Tensor, rel: float, stage: str = stage) -> None:
                        self._report(progress, it, p.cg_iters, stage + " cg", rel_residual=rel)

                    x, _info = conjugate_gradient(op_cg.normal, rhs, x0=x, max_iter=p.cg_iters, tol=0.0,
                                                  lam=rho, callback=callback)
            if k == n or self.out_of_time(k, n):
                break   # the reconstruction is X after the last X-step: no θ-step needed after it
            target["t"] = (x + lagr / rho).detach()
            fit.stage = stage
            if p.admm_inner > 0:
                fit.run(step)
            g = generate_eval()
            with torch.no_grad():
                lagr = lagr + rho * (x - g)
        return x
