"""The reconstruction-method interface shared by classical, untrained-network and learned methods.

A method is one file in ``recon_core/methods/``: a parameter dataclass with the paper's defaults and a
:class:`ReconMethod` subclass whose :meth:`ReconMethod.reconstruct` turns a :class:`ReconProblem` into
complex images. Methods never pick a device (they follow the problem's tensors), never read files
except trained weights through :func:`load_weights`, and never print: they report through the
``progress`` callback, which the ``recon`` gadget turns into log lines and a progress bar.

Scan-specific network fitting (GIP, INR, ConvDecoder, TDIP) is just a long ``reconstruct`` that calls
``progress`` every step and honours ``should_stop``; trained methods (SLR-Net, CGPD-CSNet) declare
their weights file in ``Params``.
"""

from __future__ import annotations

import abc
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Generic, Optional, TypeVar

import torch

from recon_core.linop import LinearOperator
from recon_core.nufft import DEFAULT_BACKEND

Tensor = torch.Tensor


@dataclass
class ProgressEvent:
    """One progress report: ``step`` of ``total`` in ``stage``, with optional scalar metrics."""

    method: str
    step: int
    total: int
    stage: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    elapsed_s: float = 0.0
    #: Optional zero-argument callable returning the current image estimate ``[F, Ny, Nx]``
    #: (evaluated only if a consumer calls it: previews of long fits, convergence studies).
    preview: Optional[Callable[[], Tensor]] = None


ProgressCallback = Callable[[ProgressEvent], None]


class StopRequested(Exception):
    """Raised inside a method when the caller asked to stop (e.g. session cancelled)."""


@dataclass
class ReconProblem:
    """Everything a method needs for one slice (2D or 2D+time).

    Shapes (F = frames, C = coils, Ny × Nx = image matrix, M = samples per frame):

    * ``kspace``: measured data, ``[F, C, Ny, Nx]`` (Cartesian, zeros where not sampled) or
      ``[F, C, M]`` (non-Cartesian); complex64.
    * ``operator``: the encoding operator E mapping images ``[F, Ny, Nx]`` to ``kspace``'s shape
      (coil maps included). ``operator.normal`` may be a fast (Toeplitz) equivalent.
    * ``coil_maps``: ``[C, Ny, Nx]`` complex64 sensitivities.
    * ``mask``: ``[F, Ny, Nx]`` (or broadcastable) sampling mask for Cartesian data, else ``None``.
    * ``trajectory``: ``[F, 2, M]`` in radians/voxel, range [-π, π), for non-Cartesian data.
    * ``dcf``: ``[F, M]`` density compensation weights for non-Cartesian data (gridding, GRASP);
      always set for non-Cartesian problems built by :func:`make_problem`.
    * ``frame_times_s``: acquisition time of each frame (for cine export / temporal methods).
    * ``seed``: the RNG seed a stochastic method must use (fixed → reproducible results).
    * ``calibration``: separate centred calibration (ACS/reference) k-space ``[C, ny, nx]`` when the
      scan had one (Cartesian), else ``None`` — then calibration-based methods (GRAPPA) take the
      fully sampled centre of ``kspace``.
    * ``output_times_s``: times (same clock as ``frame_times_s``) of the frames to return, for
      temporal super-resolution; ``None`` = one image per acquired frame. Only methods with
      ``supports_output_times`` (a continuous-time model, e.g. the INR) accept it; they return
      ``[len(output_times_s), Ny, Nx]``.
    """

    kspace: Tensor
    operator: LinearOperator
    coil_maps: Tensor
    image_shape: tuple[int, int]
    mask: Optional[Tensor] = None
    trajectory: Optional[Tensor] = None
    dcf: Optional[Tensor] = None
    frame_times_s: Optional[Tensor] = None
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    output_times_s: Optional[Tensor] = None
    calibration: Optional[Tensor] = None

    @property
    def n_frames(self) -> int:
        return int(self.kspace.shape[0])

    @property
    def n_output_frames(self) -> int:
        """Frames the method returns: ``len(output_times_s)`` if set, else :attr:`n_frames`."""
        return self.n_frames if self.output_times_s is None else int(self.output_times_s.numel())

    @property
    def n_coils(self) -> int:
        return int(self.kspace.shape[1])

    @property
    def is_cartesian(self) -> bool:
        return self.trajectory is None

    @property
    def device(self) -> torch.device:
        return self.kspace.device

    def encoding(self, weights: Optional[Tensor] = None, toeplitz: Optional[bool] = None,
                 backend: Optional[str] = None) -> LinearOperator:
        """A variant of the encoding operator (e.g. DCF-weighted, or without Toeplitz) for this problem.

        Methods whose paper uses a different data term (GIP's DCF-weighted adjoint, GRASP's
        √DCF-weighted least squares) build it here instead of re-deriving the geometry.
        """
        from recon_core.operators import make_encoding_operator

        return make_encoding_operator(
            self.coil_maps, self.image_shape, self.n_frames, mask=self.mask, trajectory=self.trajectory,
            weights=weights,
            backend=backend or self.extra.get("nufft_backend", DEFAULT_BACKEND),
            toeplitz=bool(self.extra.get("toeplitz", True)) if toeplitz is None else toeplitz,
        )


def make_problem(kspace: Tensor, coil_maps: Tensor, *, mask: Optional[Tensor] = None,
                 trajectory: Optional[Tensor] = None, dcf: Optional[Tensor] = None,
                 nufft_backend: str = DEFAULT_BACKEND, toeplitz: bool = True, seed: int = 0,
                 frame_times_s: Optional[Tensor] = None, calibration: Optional[Tensor] = None,
                 output_times_s: Optional[Tensor] = None) -> ReconProblem:
    """Build a :class:`ReconProblem` (and its encoding operator) from arrays.

    Cartesian when ``trajectory`` is None (``kspace`` ``[F, C, Ny, Nx]``, ``mask`` required or derived
    from the non-zero samples), non-Cartesian otherwise (``kspace`` ``[F, C, M]``; a missing ``dcf`` is
    :func:`recon_core.trajectories.default_dcf`, so methods always find one and never choose their
    own). Non-Cartesian operators use the Toeplitz normal operator by default (fast inside CG).
    """
    from recon_core.operators import make_encoding_operator

    if kspace.ndim not in (3, 4):
        raise ValueError(f"kspace must be [F, C, Ny, Nx] or [F, C, M], got shape {tuple(kspace.shape)}")
    if coil_maps.ndim != 3:
        raise ValueError(f"coil_maps must be [C, Ny, Nx], got shape {tuple(coil_maps.shape)}")
    if kspace.shape[1] != coil_maps.shape[0]:
        raise ValueError(f"kspace has {kspace.shape[1]} coils but coil_maps has {coil_maps.shape[0]}")
    image_shape = (int(coil_maps.shape[-2]), int(coil_maps.shape[-1]))
    n_frames = int(kspace.shape[0])
    if trajectory is None:
        if kspace.ndim != 4:
            raise ValueError("Cartesian kspace must be [F, C, Ny, Nx]")
        if mask is None:
            mask = (kspace.abs().sum(dim=1) > 0).to(torch.float32)
        mask = mask.to(device=kspace.device, dtype=torch.float32)
    elif kspace.ndim != 3:
        raise ValueError("non-Cartesian kspace must be [F, C, M]")
    elif dcf is None:   # the one rule for a missing DCF (the buffer gadget supplies the same one)
        from recon_core.trajectories import default_dcf

        dcf = default_dcf(trajectory, image_shape).to(kspace.device)
    op = make_encoding_operator(coil_maps, image_shape, n_frames, mask=mask, trajectory=trajectory,
                                backend=nufft_backend, toeplitz=toeplitz)
    return ReconProblem(kspace=kspace, operator=op, coil_maps=coil_maps, image_shape=image_shape, mask=mask,
                        trajectory=trajectory, dcf=dcf, frame_times_s=frame_times_s, seed=seed,
                        extra={"nufft_backend": nufft_backend, "toeplitz": toeplitz},
                        calibration=calibration, output_times_s=output_times_s)


#: Preset names every method understands. ``auto`` = ``paper`` on CUDA, ``fast`` elsewhere.
PRESETS = ("auto", "paper", "fast")


@dataclass
class MethodParams:
    """Base for method parameter dataclasses; subclasses add fields with the paper's defaults.

    Attributes
    ----------
    preset:
        ``paper`` (the published settings: the dataclass defaults), ``fast`` (the method's
        ``presets["fast"]`` overrides, for the CPU and interactive use) or ``auto`` (``paper`` on
        CUDA, ``fast`` on any other device). Parameters given explicitly always win over a preset.
    max_time_s:
        Time budget in seconds (0 = none). An iterative method stops when it is spent, keeps its
        current (best) estimate and records why in :attr:`ReconMethod.stopped_early`.
    """

    preset: str = "auto"
    max_time_s: float = 0.0

    def replace(self, **changes: Any) -> "MethodParams":
        return dataclasses.replace(self, **changes)


P = TypeVar("P", bound=MethodParams)


def resolve_preset(preset: str, device: torch.device | str | None) -> str:
    """The concrete preset (``paper`` | ``fast``) for ``preset`` on ``device``.

    ``auto`` with no device known resolves to ``paper`` (the dataclass defaults)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; allowed: {list(PRESETS)}")
    if preset != "auto":
        return preset
    if device is None:
        return "paper"
    return "paper" if torch.device(device).type == "cuda" else "fast"


class ReconMethod(abc.ABC, Generic[P]):
    """Base class. Subclasses set ``name`` and ``Params`` and implement :meth:`reconstruct`.

    The contract (checked for every registered method by ``tests/test_method_contract.py``):

    * ``uses_autograd`` — True for methods that fit or run networks with gradients (scan-specific
      fits); :meth:`run` then enables autograd, otherwise it runs under ``torch.no_grad()``.
    * ``presets`` — ``{"fast": {field: value, …}}`` (``paper`` is the dataclass defaults); applied to
      the fields not given explicitly, see :class:`MethodParams`.
    * ``quick_params`` — overrides that make a run on a tiny problem take seconds (the contract test
      uses them, so a new method is covered without a new test).
    * :meth:`run` (what the recon gadget calls) returns complex64 ``[F, Ny, Nx]`` on the problem's
      device, reports progress until its total, raises :class:`StopRequested` when asked to stop,
      honours ``max_time_s`` and is deterministic for a given ``problem.seed``.
    """

    name: ClassVar[str] = ""
    Params: ClassVar[type[MethodParams]] = MethodParams
    uses_autograd: ClassVar[bool] = False
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    #: Overrides for a seconds-long run on a tiny problem (the contract test, CI smoke runs).
    quick_params: ClassVar[dict[str, Any]] = {}
    #: Parameters whose values name local files (checkpoints): a chain that arrives over the
    #: network may not set them.
    path_params: ClassVar[tuple[str, ...]] = ()
    #: Parameters that take trained weights (a registry name or a file): a chain that arrives over
    #: the network may give registered names only, never a path.
    weights_params: ClassVar[tuple[str, ...]] = ()
    #: True for methods that can return frames at arbitrary times (``ReconProblem.output_times_s``).
    supports_output_times: ClassVar[bool] = False
    #: Trajectory kinds the method reconstructs (a Cartesian-only method, e.g. GRAPPA, says
    #: ``("cartesian",)`` and raises ``ValueError`` on the others; the contract test skips them).
    trajectories: ClassVar[tuple[str, ...]] = ("cartesian", "radial", "spiral")

    @classmethod
    def auto_preset(cls, device: torch.device | str | None) -> str:
        """What ``preset: auto`` means on ``device``: ``paper`` on CUDA, ``fast`` elsewhere (a learned
        method may instead pick the architecture it has weights for)."""
        return resolve_preset("auto", device)
    params: P

    def __init__(self, params: P | None = None, *, device: torch.device | str | None = None,
                 **overrides: Any) -> None:
        if params is not None and not isinstance(params, self.Params):
            raise TypeError(f"{self.name}: params must be {self.Params.__name__}, got {type(params).__name__}")
        allowed = {f.name for f in dataclasses.fields(self.Params)}
        unknown = sorted(set(overrides) - allowed)
        if unknown:
            raise KeyError(f"method {self.name!r}: unknown parameter(s) {unknown}; allowed: {sorted(allowed)}")
        base: MethodParams = params if params is not None else self.Params()
        preset = str(overrides.get("preset", base.preset))
        self.preset = self.auto_preset(device) if preset == "auto" else resolve_preset(preset, device)
        changes: dict[str, Any] = {}
        if params is None:
            changes.update({k: v for k, v in self.presets.get(self.preset, {}).items() if k not in overrides})
        changes.update(overrides)
        self.params = dataclasses.replace(base, **changes)  # type: ignore[assignment]
        if self.params.max_time_s < 0:
            raise ValueError(f"{self.name}: max_time_s must be >= 0, got {self.params.max_time_s}")
        self._t0 = 0.0
        #: Why the method stopped before its planned end (time budget), or "" if it did not.
        self.stopped_early = ""
        self.should_stop: Callable[[], bool] = lambda: False

    @abc.abstractmethod
    def reconstruct(self, problem: ReconProblem, progress: ProgressCallback | None = None) -> Tensor:
        """Return complex64 images ``[F, Ny, Nx]`` on the problem's device."""

    def run(self, problem: ReconProblem, progress: ProgressCallback | None = None) -> Tensor:
        """Reconstruct with the contract's guarantees: autograd only if ``uses_autograd``, the time
        budget clock started, and the output checked (shape ``[F, Ny, Nx]``, complex64, device)."""
        self._t0 = time.perf_counter()
        self.stopped_early = ""
        if problem.output_times_s is not None and not self.supports_output_times:
            raise ValueError(f"{self.name}: cannot return frames at other times than the acquired ones "
                             f"(temporal super-resolution needs a continuous-time method, e.g. 'inr')")
        with torch.enable_grad() if self.uses_autograd else torch.no_grad():
            images = self.reconstruct(problem, progress)
        expected = (problem.n_output_frames, *problem.image_shape)
        if tuple(images.shape) != expected:
            raise RuntimeError(f"{self.name}: returned images of shape {tuple(images.shape)}, expected {expected}")
        if images.dtype != torch.complex64:
            raise RuntimeError(f"{self.name}: returned {images.dtype}, expected torch.complex64")
        if images.device != problem.device:
            raise RuntimeError(f"{self.name}: returned images on {images.device}, the problem is on {problem.device}")
        return images.detach()

    # -- helpers for subclasses -------------------------------------------------------------
    def elapsed_s(self) -> float:
        """Seconds since :meth:`run` (or the first progress report) started the clock."""
        if self._t0 == 0.0:
            self._t0 = time.perf_counter()
        return time.perf_counter() - self._t0

    def out_of_time(self, step: int | None = None, total: int | None = None) -> bool:
        """True when ``max_time_s`` is set and spent; records :attr:`stopped_early` (with the step)."""
        budget = float(self.params.max_time_s)
        if budget <= 0 or self.elapsed_s() < budget:
            return False
        if not self.stopped_early:
            where = f" at step {step}/{total}" if step is not None and total is not None else ""
            self.stopped_early = f"time budget {budget:g} s spent{where}; kept the estimate so far"
        return True

    def _report(self, progress: ProgressCallback | None, step: int, total: int, stage: str = "",
                preview: Optional[Callable[[], Tensor]] = None, **metrics: float) -> None:
        """Send a progress event (optionally with a lazy ``preview`` of the current images) and
        honour a stop request."""
        elapsed = self.elapsed_s()
        if progress is not None:
            progress(ProgressEvent(self.name, step, total, stage, {k: float(v) for k, v in metrics.items()},
                                   elapsed, preview))
        if self.should_stop():
            raise StopRequested(f"{self.name}: stop requested at {stage} step {step}/{total}")


def load_weights(name_or_path: str | Path, device: torch.device | str, method: str | None = None,
                 arch: dict[str, Any] | None = None) -> dict[str, Tensor]:
    """Trained weights onto ``device`` — the one loader (``map_location``), verified: a registry name
    (sha256 checked) or a path, and the embedded method/architecture against ``method``/``arch``
    (see :func:`recon_core.training.weights.load_weights`)."""
    from recon_core.training.weights import load_weights as _load

    return _load(name_or_path, device, method=method, arch=arch)
