"""TD-DIP — time-dependent deep image prior for dynamic MRI (Yoo et al. 2021).

An untrained generator is fitted, scan-specifically, to the undersampled k-space of all frames.
Frame ``t`` is generated from a fixed point ``z_t`` on a hand-crafted low-dimensional manifold —
a helix ``(cos φ_t, sin φ_t, ρ_t)`` whose angle runs over the cardiac cycles and whose third
coordinate is a linear ramp over the whole acquisition — so that temporally close frames get
close inputs and the network shares its weights over time. Each fitting step draws one random
frame (or a small batch of frames) and minimises the mean squared error between the measured
k-space of those frames and the encoded network output (real and imaginary parts).

Architecture (BRIEFS §6, "Helix (L=3) + MapNet (L=64)", the variant the GIP paper used as its
TDIP baseline):

* latent ``z_t ∈ R³``: ``φ_t = linspace(0, 2π·n_cycles, F)[t]`` (end point included, as in the
  authors' code), ``ρ_t = linspace(0, 1, F)[t]``;
* mapping MLP: Linear(3→512) → ReLU → Linear(512→64), reshaped to a 1×8×8 map;
* CNN: Conv3×3(1→C) + BN + ReLU, Conv3×3(C→C) + BN + ReLU, then ``n_up`` stages of
  [nearest ×2 up-sampling, 2 × (Conv3×3(C→C) + BN + ReLU)], then Conv3×3(C→2) = (re, im);
  all convolutions without bias, ``C = channels`` (128 in the paper; ≈1.33 M CNN + 35 k MLP
  parameters at 128²).

Our conventions and extensions
------------------------------
* **Multi-coil forward model.** The generator outputs the coil-combined complex image of a
  frame; the data term uses ``problem.operator`` (SENSE: coil maps, Cartesian mask or NUFFT)
  restricted to the chosen frames by its ``select_frames`` (only those frames are encoded); an
  operator without one is evaluated on a zero-filled full series and the frames read out. Gradients are the true gradients
  of the MSE (autograd through the operator) with ``gradient="exact"``.
* **Gradient** (``gradient``, default ``"preconditioned"``, as in the authors' code): their custom
  NUFFT backward returns ``Σ_c S_c* · NUFFTᴴ(w ⊙ g_c) / Σ_c |S_c|²`` for the output gradient ``g`` —
  a density-compensated (``w`` = the problem's DCF; 1 for Cartesian data) and
  coil-normalised adjoint, not the true gradient. It weights the sparse outer k-space like the
  dense centre, so edges are fitted in far fewer steps than with the exact MSE gradient (which is
  dominated by the over-sampled centre of radial/spiral data). ``"exact"`` uses autograd (as does
  an operator without ``select_frames``, which has no per-frame adjoint).
* **Matrix sizes.** The network doubles from 8×8 until it covers the image
  (``n_up = ceil(log2(max(Ny, Nx)/8))``, 4 stages at 128² as in the paper); for sizes that are
  not ``8·2^n`` (or non-square images) the output is centre-cropped to ``Ny×Nx``.
* **Data scaling.** k-space is multiplied by ``s = 1 / max|x_zf|`` where ``x_zf`` is the
  SENSE-combined adjoint image of :class:`ZeroFilled`: plain zero filling for Cartesian data,
  DCF-weighted gridding with the problem's DCF for non-Cartesian data, so the
  network fits images of peak ≈ 1; the output is divided by ``s``.
* **n_cycles.** The paper's value 13 is the number of heartbeats spanned by its 23 × 13 = 299
  time frames; it is a property of the data. The default here is 1 (frames = the phases of one
  cycle, e.g. a binned cine); set it to the number of cycles the frames span for real-time data.
* **BatchNorm mode.** As in the authors' code the network is never switched to ``eval``: the
  final images are generated in train mode, in chunks of ``frames_per_step`` frames (so the
  normalisation statistics are those seen during fitting).
* **Loss.** ``MSE(re) + MSE(im)`` over the measured samples of the chosen frames (Cartesian:
  sampled positions only), reported as ``loss``. The authors also multiply it by ``N²``, which
  only matters to Adam through its ε and is left out.
* **Coil-map support.** Where all coil maps vanish (e.g. ESPIRiT maps, which are zero outside the
  object) the encoding is blind: the data term neither constrains nor penalises the network output
  there, and an untrained generator fills those pixels with arbitrary, often large, values. The
  image is therefore defined as ``G(z_t)`` restricted to the map support
  ``Σ_c |S_c|² > 1e-6 · max Σ_c |S_c|²`` (zero elsewhere, as a SENSE reconstruction started from
  zero), both in the data term and in the returned images.
* **latent_noise** (off by default): Gaussian perturbation of ``z_t`` at each step.
* **dc_final** [EXT] (off by default): ``dc_final`` CG iterations on
  ``(EᴴE + λI) x = Eᴴy + λ G(z)`` started from the network output, ``λ = dc_lambda · ‖EᴴE‖``.

References
----------
J. Yoo, K. H. Jin, H. Gupta, J. Yerly, M. Stuber, M. Unser, "Time-dependent deep image prior for
dynamic MRI", IEEE Trans. Med. Imaging 40(12):3337–3348, 2021.
Z. Li et al., "Graph Image Prior for unsupervised dynamic cardiac cine MRI reconstruction",
arXiv:2403.15770 (TDIP as unsupervised baseline, random batch sampling over frames).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from recon_core.linop import LinearOperator
from recon_core.nets.fitting import FitSchedule, NetworkFit, init_seeded
from recon_core.methods.base import MethodParams, ProgressCallback, ReconMethod, ReconProblem

Tensor = torch.Tensor

__all__ = ["TDIPParams", "TDIP", "TDIPGenerator", "helix_latent"]

#: Side of the square map the mapping MLP produces (64 = 8 × 8 values).
_BASE = 8


@dataclass
class TDIPParams(MethodParams):
    """TD-DIP parameters (paper defaults unless marked).

    Attributes
    ----------
    n_steps:
        Fitting steps (Adam iterations), 10 000.
    lr:
        Adam learning rate, 1e-3.
    lr_step, lr_gamma:
        StepLR schedule: multiply the learning rate by ``lr_gamma`` every ``lr_step`` steps
        (2000, 0.5).
    channels:
        Feature channels of every CNN layer, 128.
    frames_per_step:
        Frames drawn (without replacement) per step, 1.
    n_cycles:
        Number of helix turns over all frames (cardiac cycles spanned by the frames). Paper data:
        13; default 1 (see the module docstring).
    latent_noise:
        Standard deviation of Gaussian noise added to the latent points at each step (0 = off).
    dc_final:
        [EXT] Number of final data-consistency CG iterations (0 = off).
    dc_lambda:
        [EXT] Weight of the network image in the final CG, relative to ``‖EᴴE‖``.
    gradient:
        ``"preconditioned"`` (authors' code: DCF-weighted, coil-normalised adjoint as the
        backward of the encoding) or ``"exact"`` (autograd gradient of the MSE).
    preview_every:
        Attach a lazy image preview to every ``preview_every``-th progress event (0 = never).
    checkpoint, checkpoint_every:
        Save the fit to this file every ``checkpoint_every`` steps and at the end; a fit started
        with an existing checkpoint of the same network and seed resumes from it ("" = off).
    amp, compile:
        CUDA only, off by default: bfloat16 autocast of the generator; ``torch.compile`` of it.

    Presets: ``paper`` = the values above (a GPU job); ``fast`` (the CPU default) = 1500 steps,
    64 channels, StepLR every 1000 steps — PSNR and time of both in the README's benchmark table.
    """

    n_steps: int = 10_000
    lr: float = 1e-3
    lr_step: int = 2000
    lr_gamma: float = 0.5
    channels: int = 128
    frames_per_step: int = 1
    n_cycles: float = 1.0
    latent_noise: float = 0.0
    dc_final: int = 0
    dc_lambda: float = 0.05
    gradient: str = "preconditioned"
    preview_every: int = 0
    checkpoint: str = ""
    checkpoint_every: int = 0
    amp: bool = False
    compile: bool = False


def helix_latent(n_frames: int, n_cycles: float = 1.0) -> Tensor:
    """Helix latent points ``[F, 3]`` float32: ``(cos φ, sin φ, ρ)``.

    ``φ = linspace(0, 2π·n_cycles, F)`` and ``ρ = linspace(0, 1, F)`` (end points included).

    Parameters
    ----------
    n_frames:
        Number of time frames ``F``.
    n_cycles:
        Number of turns of the helix over the ``F`` frames.

    References
    ----------
    Yoo et al., IEEE TMI 2021, §III ("Helix" manifold).
    """
    if n_frames < 1:
        raise ValueError(f"n_frames must be >= 1, got {n_frames}")
    phi = torch.linspace(0.0, 2.0 * math.pi * float(n_cycles), n_frames, dtype=torch.float64)
    ramp = torch.linspace(0.0, 1.0, n_frames, dtype=torch.float64)
    return torch.stack([torch.cos(phi), torch.sin(phi), ramp], dim=1).to(torch.float32)


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel_size=3, padding=1, bias=False), nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True)]


class TDIPGenerator(nn.Module):
    """The TD-DIP generator: helix point ``[B, 3]`` → complex image ``[B, Ny, Nx]``.

    Parameters
    ----------
    image_shape:
        ``(Ny, Nx)`` of the output; the network up-samples 8×8 by 2 until both sides are covered
        and centre-crops.
    channels:
        CNN width (128 in the paper).
    latent_dim, hidden, map_size:
        Mapping MLP ``latent_dim → hidden → map_size²`` (3 → 512 → 64).

    References
    ----------
    Yoo et al., IEEE TMI 2021 (MapNet + CNN generator, nearest up-sampling, no bias).
    """

    def __init__(self, image_shape: tuple[int, int], channels: int = 128, latent_dim: int = 3,
                 hidden: int = 512, map_size: int = _BASE) -> None:
        super().__init__()
        ny, nx = (int(s) for s in image_shape)
        if min(ny, nx) < 1 or channels < 1:
            raise ValueError(f"bad image_shape {image_shape} or channels {channels}")
        self.image_shape = (ny, nx)
        self.map_size = int(map_size)
        self.n_up = max(0, math.ceil(math.log2(max(ny, nx) / self.map_size)))
        self.mapping = nn.Sequential(nn.Linear(latent_dim, hidden), nn.ReLU(inplace=True),
                                     nn.Linear(hidden, self.map_size * self.map_size))
        layers: list[nn.Module] = _conv_bn_relu(1, channels) + _conv_bn_relu(channels, channels)
        for _ in range(self.n_up):
            layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
            layers += _conv_bn_relu(channels, channels) + _conv_bn_relu(channels, channels)
        layers.append(nn.Conv2d(channels, 2, kernel_size=3, padding=1, bias=False))
        self.cnn = nn.Sequential(*layers)

    @property
    def grid_size(self) -> int:
        """Side of the square network output before cropping."""
        return self.map_size * 2 ** self.n_up

    def forward(self, z: Tensor) -> Tensor:
        """Complex64 images ``[B, Ny, Nx]`` for latent points ``z`` ``[B, latent_dim]``."""
        h = self.mapping(z).reshape(-1, 1, self.map_size, self.map_size)
        out = self.cnn(h)
        ny, nx = self.image_shape
        s = self.grid_size
        y0, x0 = (s - ny) // 2, (s - nx) // 2
        out = out[..., y0:y0 + ny, x0:x0 + nx].float()   # float32 also under bfloat16 autocast
        return torch.complex(out[:, 0], out[:, 1])


def _frame_forward(op: LinearOperator, idx: Tensor, n_frames: int,
                   image_shape: tuple[int, int]) -> Callable[[Tensor], Tensor]:
    """The encoding of frames ``idx`` only (``op.select_frames``): images ``[B, Ny, Nx]`` → their k-space.

    An operator without a frame axis is applied to a zero-filled series and the frames read out."""
    try:
        return op.select_frames(idx)
    except NotImplementedError:
        pass

    def apply(x: Tensor) -> Tensor:
        full = x.new_zeros((n_frames, *image_shape)).index_copy(0, idx, x)
        return op(full)[idx]

    return apply


class _PreconditionedEncoding(torch.autograd.Function):
    """``y = E x`` whose backward is ``P(g)`` (the authors' preconditioned adjoint), not ``Eᴴ g``."""

    @staticmethod
    def forward(ctx, x: Tensor, forward_fn: Callable[[Tensor], Tensor],  # type: ignore[override]
                backward_fn: Callable[[Tensor], Tensor]) -> Tensor:
        ctx.backward_fn = backward_fn
        with torch.no_grad():
            return forward_fn(x)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return ctx.backward_fn(grad), None, None


def _preconditioned_frame_encoding(op: LinearOperator, idx: Tensor, n_frames: int,
                                   image_shape: tuple[int, int], dcf: Tensor | None,
                                   inv_ssq: Tensor) -> Callable[[Tensor], Tensor]:
    """Encoding of frames ``idx`` with the TD-DIP authors' backward ``Eᴴ(w ⊙ g) / Σ|S|²``."""
    enc = _frame_forward(op, idx, n_frames, image_shape)
    adjoint = getattr(enc, "adjoint", None)
    if adjoint is None:  # generic operator: no per-frame adjoint; fall back to the exact gradient
        return enc
    w = None if dcf is None else dcf[idx].unsqueeze(1)   # [B, 1, M] over coils

    def backward_fn(g: Tensor) -> Tensor:
        g = g.detach()
        if w is not None:
            g = g * w
        return adjoint(g) * inv_ssq

    return lambda x: _PreconditionedEncoding.apply(x, enc, backward_fn)


class TDIP(ReconMethod[TDIPParams]):
    """Time-dependent deep image prior (helix latent + MapNet + CNN), fitted per scan.

    ``reconstruct`` fits a freshly initialised :class:`TDIPGenerator` to ``problem.kspace`` for
    ``n_steps`` Adam steps (one random frame, or ``frames_per_step`` frames, per step), reports
    ``loss`` and ``lr`` every step (stage ``"fit"``; optional stage ``"dc"``), raises
    :class:`~recon_core.methods.base.StopRequested` when asked to stop, and returns the generated
    series ``[F, Ny, Nx]`` complex64 on the problem's device. Deterministic on the CPU for a given
    ``problem.seed`` (network initialisation under a forked global RNG, frame draws and latent
    noise from a private generator).

    References
    ----------
    J. Yoo et al., "Time-dependent deep image prior for dynamic MRI", IEEE TMI 40(12), 2021.
    """

    name = "tdip"
    Params = TDIPParams
    quick_params = {"n_steps": 6, "channels": 8}
    uses_autograd = True
    path_params = ("checkpoint",)
    presets = {"fast": {"n_steps": 1500, "channels": 64, "lr_step": 1000}}

    # ------------------------------------------------------------------------------------------
    def _check_params(self, n_frames: int) -> TDIPParams:
        p = self.params
        if p.gradient not in ("preconditioned", "exact"):
            raise ValueError(f"tdip: gradient must be 'preconditioned' or 'exact', got {p.gradient!r}")
        for key in ("n_steps", "lr_step", "channels", "frames_per_step", "dc_final", "preview_every"):
            v = getattr(p, key)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"tdip: {key} must be an int, got {v!r}")
        if p.n_steps < 0 or p.dc_final < 0 or p.preview_every < 0:
            raise ValueError("tdip: n_steps, dc_final and preview_every must be >= 0")
        if p.lr_step < 1 or p.channels < 1 or p.frames_per_step < 1:
            raise ValueError("tdip: lr_step, channels and frames_per_step must be >= 1")
        if not (p.lr > 0 and p.lr_gamma > 0 and p.latent_noise >= 0 and p.dc_lambda >= 0):
            raise ValueError("tdip: lr and lr_gamma must be > 0, latent_noise and dc_lambda >= 0")
        return dataclasses.replace(p, frames_per_step=min(p.frames_per_step, n_frames))

    @staticmethod
    def _data_scale(problem: ReconProblem, dcf: Tensor | None) -> float:
        """``1 / max|x_zf|``: zero-filled (Cartesian) or gridding with ``dcf`` (non-Cartesian)."""
        from recon_core.methods.zero_filled import ZeroFilled

        prob = problem if problem.is_cartesian else dataclasses.replace(problem, dcf=dcf)
        # Cartesian: plain zero filling (dividing by the sampling fraction over-scales masks with a
        # fully sampled centre by up to the acceleration factor)
        zf = ZeroFilled(density_compensation=not problem.is_cartesian).reconstruct(prob)
        peak = float(zf.abs().max())
        return 1.0 / peak if peak > 0 and math.isfinite(peak) else 1.0

    @staticmethod
    def _map_support(coil_maps: Tensor) -> Tensor:
        """``[Ny, Nx]`` float 0/1: pixels where ``Σ_c |S_c|² > 1e-6 · max`` (outside: null space of E)."""
        ssq = coil_maps.detach().abs().square().sum(0)
        peak = float(ssq.max())
        if not (peak > 0 and math.isfinite(peak)):
            return torch.ones_like(ssq)
        return (ssq > 1e-6 * peak).to(torch.float32)

    # ------------------------------------------------------------------------------------------
    def reconstruct(self, problem: ReconProblem, progress: ProgressCallback | None = None) -> Tensor:
        device = problem.kspace.device
        F = problem.n_frames
        ny, nx = problem.image_shape
        p = self._check_params(F)

        grid_dcf = None if problem.is_cartesian else problem.dcf
        if not problem.is_cartesian and grid_dcf is None:
            raise ValueError("tdip: a non-Cartesian problem needs a density compensation (problem.dcf); "
                             "build it with make_problem")
        scale = self._data_scale(problem, grid_dcf)
        y = problem.kspace.to(torch.complex64) * scale
        if problem.is_cartesian:
            mask = problem.mask if problem.mask is not None else (problem.kspace.abs().sum(1) > 0)
            measured = (mask > 0).to(torch.float32).expand(F, ny, nx).flatten(1).sum(1) * problem.n_coils
        else:
            measured = torch.full((F,), float(y.shape[1] * y.shape[2]), device=device)
        measured = measured.to(device)

        support = self._map_support(problem.coil_maps).to(device)
        precondition = p.gradient == "preconditioned"
        dcf = None
        if precondition:
            ssq = problem.coil_maps.detach().abs().square().sum(0).to(device)
            inv_ssq = torch.where(support > 0, 1.0 / ssq.clamp_min(1e-12), torch.zeros_like(ssq))
            if grid_dcf is not None:
                dcf = grid_dcf.to(device=device, dtype=torch.float32)
                dcf = dcf / dcf.max().clamp_min(1e-30)

        net = init_seeded(problem.seed, lambda: TDIPGenerator((ny, nx), channels=p.channels)).to(device)
        z_all = helix_latent(F, p.n_cycles).to(device)
        k = p.frames_per_step

        def generate() -> Tensor:
            """All frames, in chunks of ``k``; train-mode BN as during fitting (module docstring)."""
            with torch.no_grad():
                frames = [net(z_all[i:i + k]) for i in range(0, F, k)]
            return (torch.cat(frames, dim=0) * support).to(torch.complex64)

        fit = NetworkFit(self, net, FitSchedule(p.n_steps, lr=p.lr, lr_step=p.lr_step, lr_gamma=p.lr_gamma),
                         seed=problem.seed, progress=progress, preview=lambda: generate() / scale,
                         preview_every=p.preview_every, checkpoint=p.checkpoint or None,
                         checkpoint_every=p.checkpoint_every, amp=p.amp, compile=p.compile)
        op = problem.operator

        def step(_i: int) -> Tensor:
            if k == 1:
                idx = torch.randint(F, (1,), generator=fit.generator)
            else:
                idx = torch.randperm(F, generator=fit.generator)[:k]
            idx_d = idx.to(device)
            z = z_all[idx_d]
            if p.latent_noise > 0:
                z = z + p.latent_noise * torch.randn(z.shape, generator=fit.generator).to(device)
            with fit.autocast():
                x = net(z) * support
            if precondition:
                encode = _preconditioned_frame_encoding(op, idx_d, F, (ny, nx), dcf, inv_ssq)
            else:
                encode = _frame_forward(op, idx_d, F, (ny, nx))
            r = encode(x) - y[idx_d]
            return (r.real.square().sum() + r.imag.square().sum()) / measured[idx_d].sum()

        fit.run(step)
        x = generate()

        if p.dc_final > 0:
            x = self._final_dc(problem, y, x, p, progress)
        return (x / scale).to(torch.complex64)

    def _final_dc(self, problem: ReconProblem, y: Tensor, x_net: Tensor, p: TDIPParams,
                  progress: ProgressCallback | None) -> Tensor:
        """[EXT] CG on ``(EᴴE + λI) x = Eᴴy + λ·x_net`` from ``x_net``, ``λ = dc_lambda·‖EᴴE‖``."""
        from recon_core.solvers import conjugate_gradient, power_iteration

        op = problem.operator
        lam = 0.0
        if p.dc_lambda > 0:
            lam = p.dc_lambda * power_iteration(op.normal, tuple(x_net.shape), n_iter=15,
                                                device=x_net.device, seed=int(problem.seed))
        with torch.no_grad():
            rhs = op.adjoint(y) + lam * x_net

            def callback(it: int, _x: Tensor, rel_res: float) -> None:
                self._report(progress, it, p.dc_final, "dc", rel_residual=rel_res)

            x, _info = conjugate_gradient(op.normal, rhs, x0=x_net.clone(), max_iter=p.dc_final,
                                          tol=0.0, lam=lam, callback=callback)
        return x
