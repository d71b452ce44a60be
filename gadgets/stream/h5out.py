"""Images to HDF5 in the layout of ``gadgetron_ismrmrd_client`` (PROTOCOL.md §5.3).

Each image series becomes ``/<group>/image_<image_series_index>/`` with

* ``data``: ``[N, channels, z, y, x]`` in the image's dtype (complex as the ISMRMRD compound
  ``{real, imag}``, as the C++ ISMRMRD library writes it);
* ``header``: ``[N]`` records of :data:`IMAGE_HEADER_DTYPE`, the packed 198-byte ImageHeader;
* ``attributes``: ``[N]`` variable-length strings (MetaContainer XML, "" when absent).

Used by the client (``torchgadgets client``) and by ``torchgadgets run -o out.h5 -G group``.
Depends on h5py, numpy and ismrmrd only.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import h5py
import ismrmrd
import numpy as np

__all__ = ["IMAGE_HEADER_DTYPE", "ImageLayoutError", "ImageH5Writer", "SeriesData", "read_images",
           "image_header_to_record"]

_f3 = ("<f4", (3,))

#: numpy twin of ``ISMRMRD_ImageHeader`` (packed, 198 bytes, field names as in ismrmrd.h).
IMAGE_HEADER_DTYPE = np.dtype([
    ("version", "<u2"),
    ("data_type", "<u2"),
    ("flags", "<u8"),
    ("measurement_uid", "<u4"),
    ("matrix_size", "<u2", (3,)),
    ("field_of_view", *_f3),
    ("channels", "<u2"),
    ("position", *_f3),
    ("read_dir", *_f3),
    ("phase_dir", *_f3),
    ("slice_dir", *_f3),
    ("patient_table_position", *_f3),
    ("average", "<u2"),
    ("slice", "<u2"),
    ("contrast", "<u2"),
    ("phase", "<u2"),
    ("repetition", "<u2"),
    ("set", "<u2"),
    ("acquisition_time_stamp", "<u4"),
    ("physiology_time_stamp", "<u4", (3,)),
    ("image_type", "<u2"),
    ("image_index", "<u2"),
    ("image_series_index", "<u2"),
    ("user_int", "<i4", (8,)),
    ("user_float", "<f4", (8,)),
    ("attribute_string_len", "<u4"),
])
if IMAGE_HEADER_DTYPE.itemsize != ctypes.sizeof(ismrmrd.ImageHeader):  # pragma: no cover - import-time guard
    raise ImportError(f"IMAGE_HEADER_DTYPE is {IMAGE_HEADER_DTYPE.itemsize} bytes, "
                      f"ismrmrd.ImageHeader {ctypes.sizeof(ismrmrd.ImageHeader)}")

_COMPLEX_H5 = {
    np.dtype("<c8"): np.dtype([("real", "<f4"), ("imag", "<f4")]),
    np.dtype("<c16"): np.dtype([("real", "<f8"), ("imag", "<f8")]),
}
_STR = h5py.string_dtype(encoding="utf-8")


class ImageLayoutError(ValueError):
    """An image does not fit the series already stored (matrix size, channels or dtype differ)."""


@dataclass
class SeriesData:
    """One stored series: ``data`` [N, C, z, y, x], ``headers`` [N] IMAGE_HEADER_DTYPE, ``attributes``."""

    data: np.ndarray
    headers: np.ndarray
    attributes: list[str]


def image_header_to_record(head: ismrmrd.ImageHeader) -> np.ndarray:
    """The packed header bytes viewed as one :data:`IMAGE_HEADER_DTYPE` record (shape ``()``)."""
    return np.frombuffer(bytes(head), dtype=IMAGE_HEADER_DTYPE)[0]


class ImageH5Writer:
    """Appends images to ``/<group>/image_<series>/{data,header,attributes}`` of an HDF5 file.

    The file is opened (in append mode, creating it if needed) on the first image, so a session
    that returns no image leaves no file behind. Existing series with the same shape are extended.

    Parameters
    ----------
    path
        Output HDF5 file.
    group
        Output group, e.g. the client's ``-G`` (default there: the local date-time).
    """

    def __init__(self, path: Union[str, Path], group: str) -> None:
        if not group.strip("/"):
            raise ValueError("ImageH5Writer: group must be a non-empty name")
        self.path = Path(path)
        self.group = group.strip("/")
        self._file: Optional[h5py.File] = None
        self.images_written = 0

    def _open(self) -> h5py.File:
        if self._file is None:
            self._file = h5py.File(self.path, "a")
        return self._file

    def append(self, image: ismrmrd.Image) -> str:
        """Append one image to its series; returns the HDF5 path of the series group.

        Raises
        ------
        ImageLayoutError
            The series exists with another ``[channels, z, y, x]`` shape or dtype.
        """
        head = image.getHead()
        data = np.ascontiguousarray(image.data)
        attrs = image.attribute_string if len(image.meta) else ""
        record = image_header_to_record(head)
        series = int(head.image_series_index)
        gpath = f"{self.group}/image_{series}"
        h5dtype = _COMPLEX_H5.get(data.dtype, data.dtype)
        f = self._open()
        g = f.require_group(gpath)
        if "data" not in g:
            shape = data.shape
            g.create_dataset("data", shape=(0, *shape), maxshape=(None, *shape), dtype=h5dtype,
                             chunks=(1, *shape))
            g.create_dataset("header", shape=(0,), maxshape=(None,), dtype=IMAGE_HEADER_DTYPE, chunks=True)
            g.create_dataset("attributes", shape=(0,), maxshape=(None,), dtype=_STR, chunks=True)
        dset, hset, aset = g["data"], g["header"], g["attributes"]
        if dset.shape[1:] != data.shape or dset.dtype != h5dtype:
            raise ImageLayoutError(
                f"{self.path}:{gpath}: image {int(head.image_index)} has [channels, z, y, x] = "
                f"{list(data.shape)} ({data.dtype}) but the series stores {list(dset.shape[1:])} "
                f"({dset.dtype}); images of one series must share matrix size, channels and data type "
                f"(give them different image_series_index)")
        n = dset.shape[0]
        for ds in (dset, hset, aset):
            ds.resize(n + 1, axis=0)
        dset[n] = data.view(h5dtype) if h5dtype is not data.dtype else data
        hset[n] = record
        aset[n] = attrs
        self.images_written += 1
        return "/" + gpath

    def append_text(self, name: str, text: str) -> str:
        """Append a string to ``/<group>/<name>`` (a growing 1-D string dataset); returns its path.

        The client stores DEPENDENCY_QUERY (1019) replies here as ``dependency_query``.
        """
        f = self._open()
        g = f.require_group(self.group)
        if name not in g:
            g.create_dataset(name, shape=(0,), maxshape=(None,), dtype=_STR, chunks=True)
        ds = g[name]
        n = ds.shape[0]
        ds.resize(n + 1, axis=0)
        ds[n] = text
        return f"/{self.group}/{name}"

    def close(self) -> None:
        """Flush and close the file (safe to call twice)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "ImageH5Writer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_images(path: Union[str, Path], group: str) -> dict[int, SeriesData]:
    """Read every ``image_<n>`` series under ``/<group>`` back as numpy arrays.

    Complex data stored as ``{real, imag}`` compounds come back as complex64/complex128.

    Raises
    ------
    KeyError
        The group does not exist in the file.
    """
    out: dict[int, SeriesData] = {}
    with h5py.File(path, "r") as f:
        g = f[group.strip("/")]
        for key in g:
            if not key.startswith("image_") or not isinstance(g[key], h5py.Group):
                continue
            try:
                series = int(key[len("image_"):])
            except ValueError:
                continue
            s = g[key]
            raw = s["data"][()]
            if raw.dtype.names == ("real", "imag"):
                cdt = np.complex64 if raw.dtype["real"] == np.float32 else np.complex128
                data = (raw["real"] + 1j * raw["imag"]).astype(cdt)
            else:
                data = raw
            headers = s["header"].astype(IMAGE_HEADER_DTYPE)[()]
            attrs = [a.decode("utf-8") if isinstance(a, bytes) else str(a) for a in s["attributes"][()]]
            out[series] = SeriesData(data, headers, attrs)
    return out
