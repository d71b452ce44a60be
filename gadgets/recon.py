"""The ``recon`` gadget: runs any registered reconstruction method on each k-space buffer.

Parameters are flat in the chain file: ``method`` picks the method from
``recon_core.methods.METHODS``; every other key is handed to that method's parameter dataclass, so
``{method: cg_sense, max_iter: 30}`` works and a misspelt key is an error naming the file, line,
gadget and the method's allowed keys.
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

_GADGET_KEYS = ("method", "nufft_backend", "toeplitz", "seed")


@dataclass
class ReconParams(GadgetParams):
    method: str = "cg_sense"
    nufft_backend: str = "torchkbnufft"
    toeplitz: bool = True
    seed: int = 0
    method_params: dict[str, Any] = field(default_factory=dict)

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
        try:
            method_cls = get_method(obj.method)
        except KeyError as exc:
            raise ChainError(f"{where}: {exc.args[0]}") from None
        hints = typing.get_type_hints(method_cls.Params)
        allowed = [f.name for f in dataclasses.fields(method_cls.Params)]
        unknown = [k for k in values if k not in allowed]
        if unknown:
            raise ChainError(
                f"{where}: unknown parameter(s) {unknown} for method {obj.method!r}; allowed: "
                f"{list(_GADGET_KEYS) + allowed}"
            )
        obj.method_params = {k: _coerce(v, hints[k], where, k) for k, v in values.items()}
        try:  # bad values (an unknown preset, a negative time budget) fail when the chain is built
            method_cls(**obj.method_params)
        except (ValueError, TypeError, KeyError) as exc:
            raise ChainError(f"{where}: method {obj.method!r}: {exc}") from None
        return obj


    @classmethod
    def check_untrusted(cls, values: Mapping[str, Any] | None, where: str) -> None:
        """A chain from the network may not set a method's ``path_params`` (checkpoint files), and
        its ``weights_params`` only to registered weights names (never a file path)."""
        values = dict(values or {})
        values.update(values.pop("method_params", None) or {})
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
        kspace = buf.kspace.to(dev)
        maps = buf.coil_maps.to(dev)
        problem = make_problem(
            kspace, maps,
            mask=None if buf.mask is None else buf.mask.to(dev),
            trajectory=None if buf.trajectory is None else buf.trajectory.to(dev),
            dcf=None if buf.dcf is None else buf.dcf.to(dev),
            nufft_backend=p.nufft_backend, toeplitz=p.toeplitz, seed=p.seed,
            frame_times_s=buf.frame_times_s,
            calibration=None if buf.calibration is None else buf.calibration.to(dev),
        )
        method = self.method_cls(device=dev, **p.method_params)
        method.should_stop = self.ctx.stop_requested
        t0 = time.perf_counter()
        last_log = [0.0]

        def progress(event: ProgressEvent) -> None:
            self.ctx.report(self.name, event)
            now = time.perf_counter()
            if now - last_log[0] > 5.0 or event.step == event.total:
                last_log[0] = now
                self.log.debug("%s %s %d/%d %s", event.method, event.stage, event.step, event.total,
                               event.metrics)

        images = crop_to_matrix(method.run(problem, progress), buf.matrix)
        wall = time.perf_counter() - t0
        self.log.info("slice %d: %s (preset %s) on %s, %d frame(s) %dx%d, %.2f s", buf.slice, p.method,
                      method.preset, dev, images.shape[0], images.shape[-2], images.shape[-1], wall)
        meta = dict(buf.meta)
        meta.update({"ReconMethod": p.method, "ReconPreset": method.preset, "ReconTime_s": f"{wall:.3f}"})
        if method.stopped_early:
            self.log.warning("slice %d: %s stopped early: %s", buf.slice, p.method, method.stopped_early)
            meta["ReconStoppedEarly"] = method.stopped_early
        yield ImageSeries(
            images=images, fov_mm=buf.recon_fov_mm if any(buf.recon_fov_mm) else buf.fov_mm, slice=buf.slice,
            contrast=buf.contrast, repetition=buf.repetition, set=buf.set, frame_axis=buf.frame_axis,
            ref_headers=buf.ref_headers, frame_times_s=buf.frame_times_s, method=p.method,
            series_index=self._series, meta=meta,
        )
