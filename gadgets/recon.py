"""The ``recon`` gadget: runs any registered reconstruction method on each k-space buffer.

Parameters are flat in the chain file: ``method`` picks the method from
``recon_core.methods.METHODS``; every other key is handed to that method's parameter dataclass, so
``{method: cg_sense, max_iter: 30}`` works and a misspelt key is an error naming the file, line,
gadget and the method's allowed keys.

Gadget options (not handed to the method):

* ``quick: METHOD`` (+ ``quick_params: {...}``, validated like the method's own keys): before the
  (long) main method runs, a preliminary series by ``METHOD`` (e.g. ``cg_sense``) is sent, so the
  scanner shows images within seconds. It is its own series (``series_index`` 0, the main one 1) with
  meta ``ReconSeries: preliminary`` and ``ImageComment`` ``torchgadgets_<METHOD>_preliminary``; the
  main series says ``ReconSeries: final``.
* ``frames_out: N`` or ``temporal_upsampling: K`` (one of them; only for methods that can return
  frames at any time, ``supports_output_times``): temporal super-resolution. The output times lie on
  the acquired frames' clock (``frame_times_s``; frame index × the mean header time-stamp spacing when
  missing): ``K`` gives ``K·(F−1)+1`` frames, ``K−1`` equally spaced between each pair of acquired
  frames (every ``K``-th output frame is an acquired one; ``t_0 + j·Δt/K`` for equally spaced
  frames), ``N`` gives ``N`` equally spaced times from the first to the last acquired frame. Each
  output frame gets its own header (time stamps interpolated between the neighbouring acquired
  frames) and phase index ``0…F_out−1``.
* ``progress_log_s`` (default 5): the server log gets a line per this many seconds with the stage,
  step/total and an ETA from the step rate.
"""

from __future__ import annotations

import dataclasses
import time
import typing
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import torch

from gadgets.base import ChainContext, ChainError, Gadget, GadgetParams, _coerce
from gadgets.messages import ImageSeries, KSpaceBuffer
from recon_core.methods import ProgressEvent, get_method, make_problem
from recon_core.nufft import DEFAULT_BACKEND

_GADGET_KEYS = ("method", "nufft_backend", "toeplitz", "seed", "quick", "quick_params", "frames_out",
                "temporal_upsampling", "progress_log_s")

#: ISMRMRD time-stamp tick (2.5 ms), the unit of ``acquisition_time_stamp``/``physiology_time_stamp``.
TICK_S = 0.0025


@dataclass
class ReconParams(GadgetParams):
    method: str = "cg_sense"
    nufft_backend: str = DEFAULT_BACKEND   # finufft / cufinufft when installed, else torchkbnufft
    toeplitz: bool = True
    seed: int = 0
    quick: str = ""
    quick_params: dict[str, Any] = field(default_factory=dict)
    frames_out: int = 0
    temporal_upsampling: int = 0
    progress_log_s: float = 5.0
    method_params: dict[str, Any] = field(default_factory=dict)

    def validate(self, where: str) -> None:
        if self.frames_out < 0 or self.temporal_upsampling < 0:
            raise ChainError(f"{where}: 'frames_out' and 'temporal_upsampling' must be >= 1 (0 = off), got "
                             f"{self.frames_out}, {self.temporal_upsampling}")
        if self.frames_out and self.temporal_upsampling:
            raise ChainError(f"{where}: give either 'frames_out' or 'temporal_upsampling', not both")
        if not self.progress_log_s > 0:
            raise ChainError(f"{where}: parameter 'progress_log_s' must be > 0, got {self.progress_log_s}")
        if self.quick_params and not self.quick:
            raise ChainError(f"{where}: 'quick_params' given without 'quick' (the preliminary method)")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None, where: str = "chain") -> "ReconParams":
        values = dict(values or {})
        own = {k: values.pop(k) for k in list(values) if k in _GADGET_KEYS}
        nested = values.pop("method_params", None)
        if nested:
            if not isinstance(nested, Mapping):
                raise ChainError(f"{where}: parameter 'method_params' must be a mapping")
            values.update(nested)
        obj = super().from_mapping(own, where)
        method_cls, obj.method_params = _method_params(obj.method, values, where, list(_GADGET_KEYS))
        if obj.quick:
            _, obj.quick_params = _method_params(obj.quick, obj.quick_params, f"{where}: quick_params", [])
        if (obj.frames_out or obj.temporal_upsampling) and not method_cls.supports_output_times:
            option = "frames_out" if obj.frames_out else "temporal_upsampling"
            raise ChainError(f"{where}: parameter {option!r}: method {obj.method!r} cannot return frames at "
                             f"other times than the acquired ones (temporal super-resolution needs a method "
                             f"with supports_output_times, e.g. 'inr')")
        return obj


    @classmethod
    def check_untrusted(cls, values: Mapping[str, Any] | None, where: str) -> None:
        """A chain from the network may not set a method's ``path_params`` (checkpoint files), and
        its ``weights_params`` only to registered weights names (never a file path)."""
        values = dict(values or {})
        values.update(values.pop("method_params", None) or {})
        quick, quick_values = values.get("quick"), values.get("quick_params")
        if quick and isinstance(quick_values, Mapping):   # the preliminary method obeys the same rule
            cls.check_untrusted({"method": quick, **quick_values}, f"{where}: quick_params")
        try:
            method_cls = get_method(str(values.get("method", cls.method)))
        except KeyError:
            return   # from_mapping reports the unknown method
        named = [k for k in method_cls.path_params if values.get(k) not in (None, "")]
        for k in method_cls.weights_params:
            value = values.get(k)
            if value in (None, "", "default"):
                continue
            from recon_core.training.weights import resolve_weights

            try:
                registered = resolve_weights(str(value)).entry is not None
            except (KeyError, FileNotFoundError, OSError, ValueError):
                registered = False
            if not registered:
                named.append(k)
        if named:
            raise ChainError(f"{where}: parameter(s) {named} of method {method_cls.name!r} name local files; a chain "
                             f"sent over the network may not set them (weights: registered names only) — put the "
                             f"chain in the server's chain directory, or register the weights, instead")


def _method_params(name: str, values: Mapping[str, Any], where: str,
                   gadget_keys: list[str]) -> tuple[type, dict[str, Any]]:
    """The method class ``name`` and ``values`` checked and coerced against its parameter dataclass
    (unknown keys and bad values are a ChainError when the chain is built)."""
    try:
        method_cls = get_method(name)
    except KeyError as exc:
        raise ChainError(f"{where}: {exc.args[0]}") from None
    hints = typing.get_type_hints(method_cls.Params)
    allowed = [f.name for f in dataclasses.fields(method_cls.Params)]
    unknown = [k for k in values if k not in allowed]
    if unknown:
        raise ChainError(f"{where}: unknown parameter(s) {unknown} for method {name!r}; allowed: "
                         f"{gadget_keys + allowed}")
    params = {k: _coerce(v, hints[k], where, k) for k, v in values.items()}
    try:  # bad values (an unknown preset, a negative time budget) fail when the chain is built
        method_cls(**params)
    except (ValueError, TypeError, KeyError) as exc:
        raise ChainError(f"{where}: method {name!r}: {exc}") from None
    return method_cls, params


def acquired_times(buf: KSpaceBuffer) -> torch.Tensor:
    """The acquired frames' times ``[F]`` float64 (s): ``buf.frame_times_s``, else frame index × the
    mean spacing of the reference headers' acquisition time stamps (1 s if there is none)."""
    n = buf.n_frames
    if buf.frame_times_s is not None and len(buf.frame_times_s) == n:
        return torch.as_tensor(buf.frame_times_s, dtype=torch.float64).detach().cpu()
    dt = 1.0
    if len(buf.ref_headers) == n and n > 1:
        stamps = [float(h.acquisition_time_stamp) for h in buf.ref_headers]
        span = (stamps[-1] - stamps[0]) * TICK_S / (n - 1)
        if span > 0:
            dt = span
    return torch.arange(n, dtype=torch.float64) * dt


def output_times(times: torch.Tensor, frames_out: int = 0,
                 upsampling: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Output times and their fractional positions on the acquired-frame axis.

    ``upsampling = K``: ``K−1`` equally spaced times between each pair of neighbouring acquired frames
    (``K·(F−1)+1`` in all; every ``K``-th is an acquired frame; ``t_0 + j·Δt/K`` for equally spaced
    frames). ``frames_out = N``: ``N`` equally spaced times from the first to the last acquired
    frame. Returns ``(t_out [F_out], position [F_out])``, float64; position ``p`` means between acquired
    frames ``floor(p)`` and ``floor(p)+1``."""
    t = torch.as_tensor(times, dtype=torch.float64)
    n = int(t.numel())
    if n < 2:
        raise ValueError(f"temporal super-resolution needs at least 2 acquired frames, got {n}")
    if torch.any(t[1:] <= t[:-1]):
        raise ValueError("temporal super-resolution needs strictly increasing frame times")
    if upsampling:
        k = int(upsampling)
        pos = torch.arange(k * (n - 1) + 1, dtype=torch.float64) / k
    elif frames_out:
        pos = None
        t_out = torch.linspace(float(t[0]), float(t[-1]), int(frames_out), dtype=torch.float64)
        idx = torch.searchsorted(t, t_out, right=True).clamp(1, n - 1) - 1
        frac = ((t_out - t[idx]) / (t[idx + 1] - t[idx])).clamp(0.0, 1.0)
        return t_out, idx.to(torch.float64) + frac
    else:
        raise ValueError("give frames_out or upsampling")
    i = pos.floor().long().clamp(max=n - 2)
    frac = pos - i.to(torch.float64)
    return t[i] + frac * (t[i + 1] - t[i]), pos


def interpolated_headers(headers: list[Any], position: torch.Tensor) -> list[Any]:
    """One header per output frame: a copy of the nearer acquired frame's header whose
    ``acquisition_time_stamp`` and ``physiology_time_stamp`` are interpolated linearly at the
    fractional frame ``position`` (an acquired frame keeps its own header values)."""
    n = len(headers)
    out = []
    for p in position.tolist():
        i = min(int(p), n - 2) if n > 1 else 0
        frac = p - i
        a, b = headers[i], headers[min(i + 1, n - 1)]
        h = type(a).from_buffer_copy(b if frac > 0.5 else a)
        if frac not in (0.0, 1.0):
            sa, sb = float(a.acquisition_time_stamp), float(b.acquisition_time_stamp)
            h.acquisition_time_stamp = int(round(sa + frac * (sb - sa)))
            for j in range(len(h.physiology_time_stamp)):
                pa, pb = float(a.physiology_time_stamp[j]), float(b.physiology_time_stamp[j])
                h.physiology_time_stamp[j] = int(round(pa + frac * (pb - pa)))
        out.append(h)
    return out


def crop_to_matrix(images: torch.Tensor, matrix: tuple[int, int]) -> torch.Tensor:
    """Centre-crop ``[F, Ny, Nx]`` images to the reconstruction matrix (e.g. after readout
    oversampling was kept through the reconstruction); smaller images are returned unchanged."""
    ny, nx = images.shape[-2:]
    my, mx = int(matrix[0]), int(matrix[1])
    if (my, mx) == (ny, nx) or my <= 0 or mx <= 0 or my > ny or mx > nx:
        return images
    y0 = ny // 2 - my // 2
    x0 = nx // 2 - mx // 2
    return images[..., y0:y0 + my, x0:x0 + mx]


class ReconGadget(Gadget):
    """KSpaceBuffer (with coil maps) → ImageSeries, by the configured method, on ``ctx.device``."""

    params: ReconParams

    name = "recon"
    Params = ReconParams
    accepts = (KSpaceBuffer,)

    def __init__(self, params: ReconParams | None = None, ctx: ChainContext | None = None) -> None:
        super().__init__(params, ctx)
        self.method_cls = get_method(self.params.method)
        self._series = 0

    def process(self, buf: KSpaceBuffer) -> Iterator[ImageSeries]:
        p = self.params
        if buf.coil_maps is None:
            raise self.error(
                "no coil sensitivity maps on the k-space buffer: put a 'coil_estimate' gadget before 'recon'"
            )
        dev = self.ctx.device
        frame_times = buf.frame_times_s
        t_out = position = None
        if p.frames_out or p.temporal_upsampling:
            frame_times = acquired_times(buf)
            try:
                t_out, position = output_times(frame_times, p.frames_out, p.temporal_upsampling)
            except ValueError as exc:
                raise self.error(f"slice {buf.slice}: {exc}") from None
        kspace = buf.kspace.to(dev)
        maps = buf.coil_maps.to(dev)
        problem = make_problem(
            kspace, maps,
            mask=None if buf.mask is None else buf.mask.to(dev),
            trajectory=None if buf.trajectory is None else buf.trajectory.to(dev),
            dcf=None if buf.dcf is None else buf.dcf.to(dev),
            nufft_backend=p.nufft_backend, toeplitz=p.toeplitz, seed=p.seed,
            frame_times_s=frame_times,
            calibration=None if buf.calibration is None else buf.calibration.to(dev),
        )
        problem.extra["prewhitened"] = bool(buf.prewhitened)   # noise units: methods may tie λ to σ
        if p.quick:   # the preliminary series first: the client has images while the main fit runs
            yield self._series_of(buf, problem, p.quick, p.quick_params, self._series, preliminary=True)
            series_index = self._series + 1
        else:
            series_index = self._series
        if t_out is not None:
            problem.output_times_s = t_out
        yield self._series_of(buf, problem, p.method, p.method_params, series_index, preliminary=False,
                              position=position)

    def _series_of(self, buf: KSpaceBuffer, problem: Any, name: str, params: dict[str, Any],
                   series_index: int, preliminary: bool,
                   position: torch.Tensor | None = None) -> ImageSeries:
        """Run method ``name`` on ``problem`` and wrap its images as an ImageSeries."""
        p = self.params
        dev = self.ctx.device
        method_cls = get_method(name)
        method = method_cls(device=dev, **params)
        method.should_stop = self.ctx.stop_requested
        t0 = time.perf_counter()
        progress = self._progress_logger(buf.slice, name)
        images = crop_to_matrix(method.run(problem, progress), buf.matrix)
        wall = time.perf_counter() - t0
        what = "preliminary series" if preliminary else "series"
        self.log.info("slice %d: %s %s (preset %s) on %s, %d frame(s) %dx%d, %.2f s", buf.slice, name, what,
                      method.preset, dev, images.shape[0], images.shape[-2], images.shape[-1], wall)
        meta = dict(buf.meta)
        meta.update({"ReconMethod": name, "ReconPreset": method.preset, "ReconTime_s": f"{wall:.3f}"})
        if p.quick:
            meta["ReconSeries"] = "preliminary" if preliminary else "final"
        if preliminary:
            meta["ImageComment"] = f"torchgadgets_{name}_preliminary"
            meta["ReconFinalMethod"] = p.method
        if method.stopped_early:
            self.log.warning("slice %d: %s stopped early: %s", buf.slice, name, method.stopped_early)
            meta["ReconStoppedEarly"] = method.stopped_early
        headers, times = buf.ref_headers, buf.frame_times_s
        if position is not None:
            headers = interpolated_headers(buf.ref_headers, position) if buf.ref_headers else []
            times = problem.output_times_s
            meta["ReconTemporalUpsampling"] = (f"frames_out {p.frames_out}" if p.frames_out
                                               else f"temporal_upsampling {p.temporal_upsampling}")
        return ImageSeries(
            images=images, fov_mm=buf.recon_fov_mm if any(buf.recon_fov_mm) else buf.fov_mm, slice=buf.slice,
            contrast=buf.contrast, repetition=buf.repetition, set=buf.set, frame_axis=buf.frame_axis,
            ref_headers=headers, frame_times_s=times, method=name, series_index=series_index, meta=meta,
        )

    def _progress_logger(self, slice_: int, name: str) -> "typing.Callable[[ProgressEvent], None]":
        """Progress callback: forwards every event to the chain context and logs at INFO every
        ``progress_log_s`` seconds (and at each stage's end): stage, step/total, elapsed, ETA."""
        interval = float(self.params.progress_log_s)
        last_log = [time.perf_counter()]
        stage_start: dict[str, tuple[float, int]] = {}

        def progress(event: ProgressEvent) -> None:
            self.ctx.report(self.name, event)
            start = stage_start.setdefault(event.stage, (event.elapsed_s, event.step))
            now = time.perf_counter()
            if now - last_log[0] < interval and not (event.step == event.total and event.total > 1):
                return
            last_log[0] = now
            self.log.info("slice %d: %s", slice_, format_progress(event, *start))

        return progress


def format_progress(event: ProgressEvent, stage_t0: float = 0.0, stage_step0: int = 0) -> str:
    """``method stage step/total (pct), elapsed, ETA, metrics`` — the server's progress line. The ETA is
    the remaining steps of the stage at its step rate so far (``stage_t0``/``stage_step0``: the elapsed
    time and step of the stage's first event)."""
    total = max(int(event.total), 1)
    step = int(event.step)
    text = f"{event.method} {event.stage or 'step'} {step}/{total} ({100.0 * step / total:.0f}%), " \
           f"{event.elapsed_s:.1f} s elapsed"
    done, spent = step - int(stage_step0), float(event.elapsed_s) - float(stage_t0)
    if step < total and done > 0 and spent > 0:
        eta = (total - step) * spent / done
        text += f", ETA {eta:.0f} s"
    if event.metrics:
        text += ", " + " ".join(f"{k}={v:.4g}" for k, v in event.metrics.items())
    return text
