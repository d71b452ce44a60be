"""The ``image_export`` gadget: ImageSeries → ISMRMRD images (+ optional DICOM, PNG montage, GIF).

Images leave the chain as ``ismrmrd.Image`` objects, one per frame, with the geometry copied from
the acquisitions (position, read/phase/slice directions, table position, time stamps), the field of
view of the reconstruction, the slice/phase/repetition/set indices, a running ``image_index`` and
``image_series_index``, and meta attributes (``DataRole``, ``ImageComment``, reconstruction method …).
Magnitude is written as float32 or, like Gadgetron's FloatToUShort, scaled to uint16.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Optional

import ismrmrd
import numpy as np
import torch

from gadgets.base import ChainError, Gadget, GadgetParams
from gadgets.messages import ImageSeries


@dataclass
class ImageExportParams(GadgetParams):
    output: Literal["magnitude", "complex", "magnitude_phase"] = "magnitude"
    dtype: Literal["float", "uint16"] = "float"
    uint16_max: float = 4095.0
    series_index: int = 0
    dicom_dir: Optional[str] = None
    png: Optional[str] = None
    gif: Optional[str] = None
    series_description: str = ""

    @classmethod
    def check_untrusted(cls, values: Optional[dict], where: str) -> None:
        """A chain from the network may not name output files or folders (``png``, ``gif``,
        ``dicom_dir``): the server would write wherever the client says."""
        named = [k for k in ("png", "gif", "dicom_dir") if (values or {}).get(k) not in (None, "")]
        if named:
            raise ChainError(f"{where}: parameter(s) {named} name files or folders on the server; a chain "
                             f"sent over the network may not set them — put the chain in the server's chain "
                             f"directory instead")

    def validate(self, where: str) -> None:
        if self.output == "complex" and self.dtype == "uint16":
            raise ChainError(f"{where}: complex output cannot be written as uint16; use dtype: float")
        if not 0 < self.uint16_max <= 65535:
            raise ChainError(f"{where}: parameter 'uint16_max' must be in (0, 65535], got {self.uint16_max}")


def _meta_xml(meta: dict) -> str:
    """The ISMRMRD MetaContainer XML for a flat dict of values (lists allowed)."""
    from xml.sax.saxutils import escape

    parts = ["<?xml version=\"1.0\"?><ismrmrdMeta>"]
    for key, value in meta.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        parts.append("<meta><name>" + escape(str(key)) + "</name>")
        parts.extend("<value>" + escape(str(v)) + "</value>" for v in values)
        parts.append("</meta>")
    parts.append("</ismrmrdMeta>")
    return "".join(parts)


class ImageExportGadget(Gadget):
    """Turn reconstructed series into ISMRMRD images (the chain's output to the client/file)."""

    name = "image_export"
    Params = ImageExportParams
    accepts = (ImageSeries,)

    def __init__(self, params: ImageExportParams | None = None, ctx=None) -> None:
        super().__init__(params, ctx)
        self._image_index = 0
        self._series_for_dicom: list[tuple[ImageSeries, np.ndarray]] = []

    def _scale_uint16(self, mag: np.ndarray) -> tuple[np.ndarray, float]:
        p: ImageExportParams = self.params  # type: ignore[assignment]
        peak = float(mag.max()) if mag.size else 0.0
        scale = p.uint16_max / peak if peak > 0 else 1.0
        return np.clip(np.round(mag * scale), 0, 65535).astype(np.uint16), scale

    def process(self, series: ImageSeries) -> Iterator[ismrmrd.Image]:
        p: ImageExportParams = self.params  # type: ignore[assignment]
        imgs = series.images.detach().to("cpu", torch.complex64).numpy()  # [F, Ny, Nx]
        if imgs.ndim != 3:
            raise self.error(f"expected images [frames, y, x], got shape {imgs.shape}")
        mag = np.abs(imgs).astype(np.float32)
        outputs: list[tuple[int, np.ndarray, int]] = []  # (image_type, data, series offset)
        scale = 1.0
        if p.output == "complex":
            outputs.append((ismrmrd.IMTYPE_COMPLEX, imgs.astype(np.complex64), 0))
        else:
            data = mag
            if p.dtype == "uint16":
                data, scale = self._scale_uint16(mag)
            outputs.append((ismrmrd.IMTYPE_MAGNITUDE, data, 0))
            if p.output == "magnitude_phase":
                phase = np.angle(imgs).astype(np.float32)
                if p.dtype == "uint16":  # Gadgetron convention: (phase + π) scaled to [0, 4095]
                    phase = np.round((phase + np.pi) / (2 * np.pi) * 4095).astype(np.uint16)
                outputs.append((ismrmrd.IMTYPE_PHASE, phase, 1))
        n_frames = imgs.shape[0]
        fov = tuple(float(v) for v in series.fov_mm)
        for image_type, data, series_offset in outputs:
            for f in range(n_frames):
                ref = series.ref_headers[min(f, len(series.ref_headers) - 1)] if series.ref_headers else None
                self._image_index += 1
                img = ismrmrd.Image.from_array(np.ascontiguousarray(data[f])[None], transpose=False)
                head = img.getHead()
                if ref is not None:
                    for name in ("measurement_uid", "position", "read_dir", "phase_dir", "slice_dir",
                                 "patient_table_position", "acquisition_time_stamp", "physiology_time_stamp"):
                        setattr(head, name, getattr(ref, name))
                    head.average = ref.idx.average
                head.field_of_view = fov
                head.slice, head.contrast, head.repetition, head.set = (
                    series.slice, series.contrast, series.repetition, series.set)
                if series.frame_axis == "repetition":
                    head.repetition = f
                    head.phase = 0
                else:
                    head.phase = f
                head.image_type = image_type
                head.image_index = self._image_index
                # one ISMRMRD series per recon series (e.g. a preliminary one before the final) and output
                head.image_series_index = p.series_index + len(outputs) * series.series_index + series_offset
                img.setHead(head)
                meta = {
                    "DataRole": "Image",
                    "ImageComment": series.meta.get("ImageComment",
                                                    f"torchgadgets_{series.method or 'recon'}"),
                    "GADGETRON_ImageNumber": self._image_index,
                    "SequenceDescriptionAdditional": p.series_description or series.method,
                    "ImageRowDir": [f"{v:.6f}" for v in head.read_dir],
                    "ImageColumnDir": [f"{v:.6f}" for v in head.phase_dir],
                    "ReconMethod": series.method,
                }
                if image_type == ismrmrd.IMTYPE_MAGNITUDE and p.dtype == "uint16":
                    meta["ImageScale"] = f"{scale:.6g}"
                if series.frame_times_s is not None and f < len(series.frame_times_s):
                    meta["TriggerTime_ms"] = f"{1000.0 * float(series.frame_times_s[f]):.3f}"
                for key, value in series.meta.items():
                    meta.setdefault(key, value)
                img.attribute_string = _meta_xml(meta)
                yield img
        if p.dicom_dir or p.png or p.gif:
            self._write_views(series, mag)

    def _write_views(self, series: ImageSeries, mag: np.ndarray) -> None:
        p: ImageExportParams = self.params  # type: ignore[assignment]
        suffix = f"_slc{series.slice}_con{series.contrast}_rep{series.repetition}_set{series.set}"
        if series.series_index:   # a later series of the same scan (e.g. after a quick preliminary one)
            suffix += f"_ser{series.series_index}"
        if p.png:
            from gadgets.preview import write_montage_png

            write_montage_png(mag, _with_suffix(p.png, suffix, ".png"))
        if p.gif and mag.shape[0] > 1:
            from gadgets.preview import write_cine_gif

            fps = None
            if series.frame_times_s is not None and len(series.frame_times_s) > 1:
                dt = float(series.frame_times_s[-1] - series.frame_times_s[0]) / (len(series.frame_times_s) - 1)
                fps = 1.0 / dt if dt > 0 else None
            write_cine_gif(mag, _with_suffix(p.gif, suffix, ".gif"), fps=fps)
        if p.dicom_dir:
            from gadgets.dicom import write_dicom_series

            write_dicom_series(series, mag, Path(p.dicom_dir), header_xml=self.ctx.header_xml,
                               series_number=p.series_index + 1 + series.slice + 100 * series.series_index,
                               series_description=p.series_description or f"torchgadgets {series.method}")


def _with_suffix(path: str, suffix: str, ext: str) -> Path:
    """``out.png`` → ``out_slc0_….png`` so several slices/series never overwrite each other."""
    pth = Path(path)
    stem = pth.stem if pth.suffix.lower() == ext else pth.name
    return pth.with_name(stem + suffix + ext)
