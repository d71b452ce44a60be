"""torchgadgets inside an existing Gadgetron: entry points for ``<external>`` nodes.

A Gadgetron chain names them as ``<external><execute name="gadgets.external" target="T"
type="python"/><configuration>…</configuration></external>``; Gadgetron then runs
``python3 -m gadgetron PORT gadgets.external T`` and the module connects back (PROTOCOL.md §10,
through the ``gadgetron`` package's :class:`gadgetron.external.Connection`). Targets:

* :func:`recon_acquisitions`: raw acquisitions (1008) and waveforms (1026) → a whole chain of ours
  (noise, oversampling, buffer, coil maps, recon, export) → ISMRMRD images (1022);
* :func:`recon_buffers`: ReconData (1023) from Gadgetron's BucketToBuffer → the part of the chain
  after our buffer gadget (coil estimation, recon, export) → images, or image arrays (1024);
* :func:`recon_image_arrays`: image arrays (1024), e.g. from Gadgetron's own GRAPPA → our export
  (magnitude/complex, float/uint16, DICOM/PNG/GIF) → images with the arrays' own headers;
* :func:`recon`: any of the above, dispatched per message type (handy for ``<connect>``).

Messages a target does not handle go straight back to Gadgetron, so they continue down its chain.

The ``<configuration>`` element holds ``<property name=… value=…/>`` (or Gadgetron's legacy
``<property><name/><value/></property>``):

* ``chain``: a chain name in our chain directory (default ``default``), never a path; or an inline
  chain as the text of a ``<chain>`` child element (YAML or Gadgetron XML);
* ``device``: ``auto`` (default) | ``cpu`` | ``cuda`` | ``cuda:N``;
* ``output``: ``images`` (default) or ``image_array`` (buffers and image-array targets);
* ``GADGET.KEY``: override one parameter of that gadget in the chain, e.g.
  ``recon.method=l1_wavelet`` or ``image_export.dtype=uint16``.

Inline chains and overrides come from whoever wrote the Gadgetron chain (possibly a client's inline
chain), so they are untrusted: no parameter may name a local file. Failures are reported the way
Gadgetron expects: an ERROR message (id 8: u64 length + ``"[gadget] ERROR: …"``), then CLOSE — never
a dropped socket. The ``gadgetron`` 1.4.1 array writer breaks under numpy 2 (``np.array(…,
copy=False)``) and its ``add_writer`` is unusable (see :class:`_Session`); this module puts its own
writers for image arrays and ReconData in front of the connection's.

``<connect port=P/>`` mode: ``torchgadgets external --port P`` (:func:`serve_connect`) listens,
accepts one Gadgetron core and serves it with :func:`recon` (or the target named by ``--target``).
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import ismrmrd
import numpy as np
import torch

from gadgets.base import ChainError, Gadget
from gadgets.buffer import TICK_S
from gadgets.messages import ImageSeries, KSpaceBuffer
from gadgets.stream.chain import (ChainSpec, GadgetSpec, build_chain, chain_context, load_chain,
                                  parse_chain_text)
from gadgets.stream.runner import ChainRunner, format_error
from recon_core import trajectories as tr

log = logging.getLogger("torchgadgets.external")

__all__ = [
    "ExternalConfig", "ExternalError", "parse_configuration", "recon", "recon_acquisitions", "recon_buffers",
    "recon_image_arrays", "recon_data_to_buffers", "series_to_image_array", "image_array_to_series",
    "send_error", "serve_connect", "TARGETS",
]

MSG_CLOSE = 4
MSG_ERROR = 8
_U16 = struct.Struct("<H")
_U64 = struct.Struct("<Q")
_BOOL = struct.Struct("<?")

#: Gadgets Gadgetron has already run when it sends ReconData (NoiseAdjust, RemoveROOversampling,
#: AcquisitionAccumulateTrigger + BucketToBuffer).
_KSPACE_SIDE = ("noise", "remove_oversampling", "buffer")
_INDEX_FIELDS = ("average", "slice", "contrast", "phase", "repetition", "set")
#: Message id → the handler kind that takes it (anything else goes back to Gadgetron).
_KINDS = {1008: "acquisitions", 1026: "acquisitions", 1023: "buffers", 1024: "image_arrays"}


class ExternalError(RuntimeError):
    """A problem with what Gadgetron sent (configuration, message type, array layout)."""


# ----------------------------------------------------------------------------------- configuration
@dataclass
class ExternalConfig:
    """What the ``<configuration>`` element of the ``<external>`` node asks for."""

    chain: str = "default"
    inline: Optional[str] = None
    device: str = "auto"
    output: str = "images"
    overrides: dict[str, dict[str, str]] = field(default_factory=dict)

    def chain_spec(self) -> ChainSpec:
        """The chain to run, overrides applied; inline chains and overrides are untrusted."""
        if self.inline is not None:
            spec = parse_chain_text(self.inline, "<gadgetron configuration>", name="gadgetron_inline")
            spec.trusted = False
        else:
            spec = load_chain(self.chain, allow_paths=False)
        for gadget, values in self.overrides.items():
            step = next((g for g in spec.gadgets if g.gadget == gadget), None)
            if step is None:
                raise ChainError(f"<configuration>: property '{gadget}.{next(iter(values))}' names gadget "
                                 f"{gadget!r}, which chain {spec.name!r} does not have; its gadgets: "
                                 f"{spec.gadget_names}")
            step.params = {**step.params, **values}
            spec.trusted = False
        return spec


def _property_pairs(root: ET.Element) -> Iterator[tuple[str, str]]:
    for prop in root.iter("property"):
        name, value = prop.get("name"), prop.get("value")
        if name is None:
            name, value = prop.findtext("name"), prop.findtext("value")
        if name is None:
            raise ExternalError("<configuration>: a <property> without a name")
        yield name.strip(), (value or "").strip()


def parse_configuration(root: Optional[ET.Element]) -> ExternalConfig:
    """Read the ``<configuration>`` element Gadgetron sends (None or empty → the defaults)."""
    cfg = ExternalConfig()
    if root is None:
        return cfg
    inline = root.find("chain")
    if inline is not None and (inline.text or "").strip():
        cfg.inline = inline.text.strip()
    for name, value in _property_pairs(root):
        if name == "chain":
            cfg.chain = value
        elif name == "device":
            cfg.device = value or "auto"
        elif name == "output":
            if value not in ("images", "image_array"):
                raise ExternalError(f"<configuration>: property 'output' must be 'images' or 'image_array', "
                                    f"got {value!r}")
            cfg.output = value
        elif "." in name:
            gadget, _, key = name.partition(".")
            cfg.overrides.setdefault(gadget, {})[key] = value
        elif name in ("python_module", "python_class"):
            continue          # forwarded by Gadgetron's legacy PythonGadget rewrite
        else:
            raise ExternalError(f"<configuration>: unknown property {name!r}; allowed: chain, device, "
                                f"output, GADGET.KEY (e.g. recon.method)")
    return cfg


# ------------------------------------------------------------------------------- wire: our writers
def _write_array(write: Callable[[bytes], Any], array: np.ndarray, dtype: Any) -> None:
    """hoNDArray: u64 ndim, ndim × u64 dims, elements first-dimension fastest (numpy-2 safe)."""
    arr = np.asarray(array, dtype=dtype)
    write(_U64.pack(arr.ndim) + b"".join(_U64.pack(int(d)) for d in arr.shape))
    write(arr.tobytes(order="F"))


def _write_struct_array(write: Callable[[bytes], Any], array: np.ndarray) -> None:
    """An array of raw ctypes records (image or acquisition headers), first dimension fastest."""
    write(_U64.pack(array.ndim) + b"".join(_U64.pack(int(d)) for d in array.shape))
    for item in array.ravel(order="F"):
        write(bytes(item))


def write_image_array(destination: Any, image_array: Any) -> None:
    """IMAGE_ARRAY (1024) as Gadgetron's reader expects it (PROTOCOL.md §10.2)."""
    w = destination.write
    w(_U16.pack(1024))
    _write_array(w, image_array.data, np.complex64)
    _write_struct_array(w, np.asarray(image_array.headers, dtype=object))
    metas = list(image_array.meta or [])
    w(_U64.pack(len(metas)))
    for m in metas:
        text = m.encode("utf-8") if isinstance(m, str) else bytes(m)
        w(_U64.pack(len(text)) + text)
    waves = image_array.waveform
    w(_BOOL.pack(waves is not None))
    if waves is not None:
        w(_U64.pack(len(waves)))
        for wave in waves:
            wave.serialize_into(w)          # header + data, no message id inside the array
    acq = image_array.acq_headers
    w(_BOOL.pack(acq is not None))
    if acq is not None:
        _write_struct_array(w, np.asarray(acq, dtype=object))


def _write_recon_buffer(w: Callable[[bytes], Any], buf: Any) -> None:
    _write_array(w, buf.data, np.complex64)
    for opt in (buf.trajectory, buf.density):
        w(_BOOL.pack(opt is not None))
        if opt is not None:
            _write_array(w, opt, np.float32)
    _write_struct_array(w, np.asarray(buf.headers, dtype=object))
    w(bytes(buf.sampling))


def write_recon_data(destination: Any, recon_data: Any) -> None:
    """RECON_DATA (1023) (PROTOCOL.md §10.1), for ReconData passed back to Gadgetron."""
    w = destination.write
    w(_U16.pack(1023) + _U64.pack(len(recon_data.bits)))
    for bit in recon_data.bits:
        _write_recon_buffer(w, bit.data)
        w(_BOOL.pack(bit.ref is not None))
        if bit.ref is not None:
            _write_recon_buffer(w, bit.ref)


def send_error(conn: Any, message: str) -> None:
    """ERROR (8): u64 length + text; Gadgetron then stops sending and reports it."""
    text = message.encode("utf-8", "replace")
    conn.socket.write(_U16.pack(MSG_ERROR) + _U64.pack(len(text)) + text)


# --------------------------------------------------------------------------- ReconData → KSpaceBuffer
def _header_counters(h: Any) -> tuple[int, ...]:
    return tuple(int(getattr(h.idx, f)) for f in _INDEX_FIELDS)


def _sampled_lines(headers: np.ndarray) -> np.ndarray:
    """True where Gadgetron put an acquisition (unset header records are all zeros)."""
    flat = headers.ravel(order="F")
    out = np.array([int(h.number_of_samples) > 0 or int(h.version) > 0 for h in flat], dtype=bool)
    return out.reshape(headers.shape, order="F")


def _centre_offset(n: int, center: int) -> tuple[int, int]:
    """(grid size, offset) placing index ``center`` of ``n`` samples at ``grid // 2``."""
    grid = max(n, 2 * center, 2 * (n - center))
    return grid, grid // 2 - center


def _frame_axis(heads: list[Any]) -> str:
    for name in ("phase", "repetition"):
        if len({int(getattr(h.idx, name)) for h in heads}) > 1:
            return name
    return "phase"


def _ref_block(ref: Any, s: int, loc: int) -> Optional[np.ndarray]:
    """The fully sampled calibration block ``[C, ny, nx]`` of a reference buffer, or None."""
    data = np.asarray(ref.data)
    if data.ndim != 7 or data.shape[2] != 1:
        return None
    sampled = _sampled_lines(np.asarray(ref.headers, dtype=object))[:, 0, :, s, loc]   # [E1, N]
    k = data[:, :, 0, :, :, s, loc]                                  # [RO, E1, C, N]
    counts = np.maximum(sampled.sum(axis=1), 1)
    cal = (k.sum(axis=3) / counts[None, :, None]).transpose(2, 1, 0).astype(np.complex64)  # [C, E1, RO]
    lines = np.zeros(cal.shape[1:], dtype=bool)
    lines[np.ix_(sampled.any(axis=1), np.abs(k).sum(axis=(1, 2, 3)) > 0)] = True
    return _block(cal, lines)


def _block(cal: np.ndarray, lines: np.ndarray) -> Optional[np.ndarray]:
    region = tr.acs_region(torch.from_numpy(lines))
    if region is None:
        return None
    (r0, r1), (c0, c1) = region
    return np.ascontiguousarray(cal[:, r0:r1, c0:c1])


def recon_data_to_buffers(recon_data: Any, header: Any, device: torch.device) -> list[KSpaceBuffer]:
    """Gadgetron ReconData (BucketToBuffer output) → one :class:`KSpaceBuffer` per bit, S and LOC.

    ``data`` ``[RO, E1, E2, CHA, N, S, LOC]`` becomes ``kspace [N, CHA, Ny, Nx]`` with the k-space
    centre (``sampling_limits`` centres) at ``Ny//2, Nx//2`` (our convention), N the frame axis;
    the sampling mask comes from which header records are set; a reference buffer becomes the
    calibration block. Non-Cartesian bits (a trajectory) become ``[N, CHA, M]`` data with the
    trajectory in rad/voxel (units by magnitude, as in our buffer gadget) and Gadgetron's density
    or our default DCF.
    """
    out: list[KSpaceBuffer] = []
    for b, bit in enumerate(recon_data.bits):
        buf = bit.data
        data = np.asarray(buf.data)
        if data.ndim != 7:
            raise ExternalError(f"ReconData bit {b}: data must be 7-D [RO, E1, E2, CHA, N, S, LOC], got "
                                f"shape {data.shape}")
        n_ro, n_e1, n_e2, n_c, n_n, n_s, n_loc = data.shape
        if n_e2 != 1:
            raise ExternalError(f"ReconData bit {b}: 3D data (E2 = {n_e2}) is not supported yet")
        heads = np.asarray(buf.headers, dtype=object)
        if heads.shape != (n_e1, n_e2, n_n, n_s, n_loc):
            raise ExternalError(f"ReconData bit {b}: headers shape {heads.shape} does not match data "
                                f"{data.shape} (expected [E1, E2, N, S, LOC])")
        sampled = _sampled_lines(heads)
        sd = buf.sampling
        rec = (int(sd.recon_matrix[1]) or n_e1, int(sd.recon_matrix[0]) or n_ro)
        enc = (int(sd.encoded_matrix[1]) or n_e1, int(sd.encoded_matrix[0]) or n_ro)
        fov = tuple(float(v) for v in sd.encoded_FOV)
        rfov = tuple(float(v) for v in sd.recon_FOV)
        for s in range(n_s):
            for loc in range(n_loc):
                frame_heads = []
                for n in range(n_n):
                    rows = np.flatnonzero(sampled[:, 0, n, s, loc])
                    if rows.size == 0:
                        raise ExternalError(f"ReconData bit {b}: frame N={n} S={s} LOC={loc} has no "
                                            f"acquisition")
                    centre = int(sd.sampling_limits[1].center)
                    frame_heads.append(heads[rows[np.argmin(np.abs(rows - centre))], 0, n, s, loc])
                k = data[:, :, 0, :, :, s, loc]                       # [RO, E1, C, N]
                common = dict(
                    matrix=rec, encoded_matrix=enc, fov_mm=fov, recon_fov_mm=rfov,
                    slice=int(frame_heads[0].idx.slice), contrast=int(frame_heads[0].idx.contrast),
                    repetition=int(frame_heads[0].idx.repetition), set=int(frame_heads[0].idx.set),
                    frame_axis=_frame_axis(frame_heads), ref_headers=frame_heads,
                    frame_times_s=torch.tensor([TICK_S * float(h.acquisition_time_stamp)
                                                for h in frame_heads], dtype=torch.float64),
                    meta={"source": "gadgetron ReconData", "frame_indices": list(range(n_n)),
                          "phase": int(frame_heads[0].idx.phase)},
                )
                if buf.trajectory is not None:
                    out.append(_noncartesian(buf, k, sampled[:, 0, :, s, loc], s, loc, rec, header, device,
                                             common))
                    continue
                ny, oy = _centre_offset(n_e1, int(sd.sampling_limits[1].center))
                nx, ox = _centre_offset(n_ro, int(sd.sampling_limits[0].center) if
                                        sd.sampling_limits[0].max else n_ro // 2)
                kspace = np.zeros((n_n, n_c, ny, nx), dtype=np.complex64)
                kspace[:, :, oy:oy + n_e1, ox:ox + n_ro] = k.transpose(3, 2, 1, 0)
                cols = np.zeros(nx, dtype=bool)
                cols[ox:ox + n_ro] = np.abs(k).sum(axis=(1, 2, 3)) > 0
                mask = np.zeros((n_n, ny, nx), dtype=np.float32)
                for n in range(n_n):
                    rows = oy + np.flatnonzero(sampled[:, 0, n, s, loc])
                    mask[n, rows[:, None], np.flatnonzero(cols)[None]] = 1
                calibration = None
                if bit.ref is not None:
                    calibration = _ref_block(bit.ref, s, loc)
                    if calibration is None:
                        log.warning("ReconData bit %d: the reference lines do not cover the k-space centre; "
                                    "coil maps come from the imaging data", b)
                common["meta"]["calibration_shape"] = (None if calibration is None
                                                       else list(calibration.shape[1:]))
                out.append(KSpaceBuffer(
                    kspace=torch.from_numpy(kspace).to(device), mask=torch.from_numpy(mask).to(device),
                    calibration=None if calibration is None else torch.from_numpy(calibration).to(device),
                    **common))
    return out


def _noncartesian(buf: Any, k: np.ndarray, sampled: np.ndarray, s: int, loc: int, rec: tuple[int, int],
                  header: Any, device: torch.device, common: dict[str, Any]) -> KSpaceBuffer:
    """One non-Cartesian frame set: readouts of each frame concatenated in E1 order."""
    traj = np.asarray(buf.trajectory)                      # [D, RO, E1, E2, N, S, LOC]
    if traj.ndim != 7 or traj.shape[0] < 2:
        raise ExternalError(f"ReconData trajectory must be [D>=2, RO, E1, E2, N, S, LOC], got {traj.shape}")
    n_ro, _, n_c, n_n = k.shape
    lines = [np.flatnonzero(sampled[:, n]) for n in range(n_n)]
    if len({len(r) for r in lines}) != 1:
        raise ExternalError("non-Cartesian ReconData: every frame must have the same number of readouts")
    # k[..., n] first: indexing [:, r, :, n] at once would move the advanced axes to the front
    data = np.stack([k[..., n][:, r, :].transpose(2, 1, 0).reshape(n_c, -1) for n, r in enumerate(lines)])
    t = np.stack([traj[:2, :, r, 0, n, s, loc].transpose(0, 2, 1).reshape(2, -1)        # (kx, ky), line-major
                  for n, r in enumerate(lines)])
    kmax = float(np.abs(t).max()) if t.size else 0.0
    scale = (2 * np.pi) if kmax <= 0.5 else np.array([2 * np.pi / rec[1], 2 * np.pi / rec[0]])[:, None]
    t = t * scale
    traj_t = torch.from_numpy(np.ascontiguousarray(t[:, ::-1]).astype(np.float32))      # (ky, kx)
    if buf.density is not None:
        dens = np.asarray(buf.density)
        dcf = torch.from_numpy(np.stack([dens[:, r, 0, n, s, loc].T.reshape(-1) for n, r in enumerate(lines)])
                               .astype(np.float32))
    else:
        kind = getattr(getattr(header.encoding[0], "trajectory", None), "value", None) if header else None
        dcf = tr.default_dcf(traj_t, rec, kind=kind)
    return KSpaceBuffer(kspace=torch.from_numpy(data.astype(np.complex64)).to(device),
                        trajectory=traj_t.to(device), dcf=dcf.to(device), **common)


# --------------------------------------------------------------------------- images ↔ image arrays
def _fix_indices(img: ismrmrd.Image, ref: Any) -> None:
    """Give an output image the encoding counters of the acquisition its frame came from."""
    head = img.getHead()
    for name in _INDEX_FIELDS:
        setattr(head, name, int(getattr(ref.idx, name)))
    img.setHead(head)


def series_to_image_array(images: list[ismrmrd.Image]) -> Any:
    """ISMRMRD images of one series (same matrix) → one Gadgetron ImageArray, N = image count.

    ``data [RO, E1, E2, CHA, N, 1, 1]`` complex64, ``headers [N, 1, 1]``, one meta XML per image.
    """
    from gadgetron.types import ImageArray

    if not images:
        raise ExternalError("no images to pack into an image array")
    arrays = [np.asarray(im.data) for im in images]           # [CHA, Z, Y, X]
    if len({a.shape for a in arrays}) != 1:
        raise ExternalError(f"images of different sizes cannot share an image array: "
                            f"{sorted({a.shape for a in arrays})}")
    stack = np.stack(arrays).astype(np.complex64)              # [N, CHA, Z, Y, X]
    data = stack.transpose(4, 3, 2, 1, 0)[..., None, None]     # [X, Y, Z, CHA, N, 1, 1]
    heads = np.empty((len(images), 1, 1), dtype=object)
    for i, im in enumerate(images):
        h = ismrmrd.ImageHeader.from_buffer_copy(bytes(im.getHead()))
        h.data_type = ismrmrd.DATATYPE_CXFLOAT
        h.image_type = ismrmrd.IMTYPE_COMPLEX if h.image_type == ismrmrd.IMTYPE_COMPLEX else h.image_type
        h.attribute_string_len = 0
        heads[i, 0, 0] = h
    meta = [im.attribute_string or "" for im in images]
    return ImageArray(data=np.asfortranarray(data), headers=heads, meta=meta, waveform=None, acq_headers=None)


def _acq_header_from_image(h: Any) -> ismrmrd.AcquisitionHeader:
    """An acquisition header carrying an image header's geometry and counters (for our exporter);
    the image header itself rides along as ``.image_header``."""
    a = ismrmrd.AcquisitionHeader()
    a.image_header = h
    for name in ("measurement_uid", "acquisition_time_stamp"):
        setattr(a, name, getattr(h, name))
    for name in ("position", "read_dir", "phase_dir", "slice_dir", "patient_table_position"):
        getattr(a, name)[:] = list(getattr(h, name))
    a.physiology_time_stamp[:] = list(h.physiology_time_stamp)
    for name in _INDEX_FIELDS:
        setattr(a.idx, name, int(getattr(h, name)))
    return a


def image_array_to_series(ia: Any) -> list[ImageSeries]:
    """A Gadgetron ImageArray → one :class:`ImageSeries` per (S, LOC), frames = N; each frame's image
    header is kept as ``ref_headers[n].image_header``.

    Several channels (CHA > 1) are combined by root-sum-of-squares (recorded in the meta).
    """
    data = np.asarray(ia.data)
    if data.ndim != 7:
        raise ExternalError(f"ImageArray data must be 7-D [RO, E1, E2, CHA, N, S, LOC], got {data.shape}")
    n_ro, n_e1, n_e2, n_c, n_n, n_s, n_loc = data.shape
    if n_e2 != 1:
        raise ExternalError(f"ImageArray with E2 = {n_e2} (3D) is not supported yet")
    heads = np.asarray(ia.headers, dtype=object)
    if heads.shape != (n_n, n_s, n_loc):
        raise ExternalError(f"ImageArray headers shape {heads.shape} does not match data {data.shape} "
                            f"(expected [N, S, LOC])")
    out = []
    for s in range(n_s):
        for loc in range(n_loc):
            x = data[:, :, 0, :, :, s, loc].transpose(3, 2, 1, 0)   # [N, CHA, E1, RO]
            meta: dict[str, Any] = {}
            if n_c > 1:
                x = np.sqrt((np.abs(x) ** 2).sum(axis=1, keepdims=True)).astype(np.complex64)
                meta["CoilCombination"] = "rss"
            hs = [heads[n, s, loc] for n in range(n_n)]
            h0 = hs[0]
            refs = [_acq_header_from_image(h) for h in hs]
            series = ImageSeries(
                images=torch.from_numpy(np.ascontiguousarray(x[:, 0])),
                fov_mm=tuple(float(v) for v in h0.field_of_view), slice=int(h0.slice),
                contrast=int(h0.contrast), repetition=int(h0.repetition), set=int(h0.set),
                frame_axis=_frame_axis(refs), ref_headers=refs, method="gadgetron",
                series_index=int(h0.image_series_index), meta=meta)
            out.append(series)
    return out


# ------------------------------------------------------------------------------------ the session
class _Session:
    """One Gadgetron connection: routes each message to the part of our chain that handles it."""

    def __init__(self, conn: Any, accepts: tuple[str, ...]) -> None:
        from gadgetron.types import ImageArray, ReconData

        self.conn = conn
        self.accepts = accepts
        self._ImageArray, self._ReconData = ImageArray, ReconData
        # gadgetron 1.4.1: ``add_writer`` wraps the writer in a one-argument lambda that ``send`` then
        # calls with two (socket, item), so it cannot be used; our writers go to the front directly.
        conn.writers[:0] = [(lambda item: isinstance(item, ImageArray), write_image_array),
                            (lambda item: isinstance(item, ReconData), write_recon_data)]
        conn.add_reader(MSG_CLOSE, self._on_close)
        self._send_lock = threading.Lock()
        self.cfg = parse_configuration(conn.config)
        self.spec = self.cfg.chain_spec()
        self.header_xml = conn.raw_bytes.header.decode("utf-8", "replace").rstrip("\x00")
        self.ctx = chain_context(self.spec, default_device=self.cfg.device, header=conn.header,
                                 header_xml=self.header_xml)
        self.log = self.ctx.logger
        self._runner: Optional[ChainRunner] = None
        self._tail: Optional[tuple[list[Gadget], list[Gadget]]] = None
        self._export_tail: Optional[tuple[list[Gadget], list[Gadget]]] = None
        self.sent = 0
        self.peer_closed = False     # Gadgetron's CLOSE has been read

    def _on_close(self, _source: Any) -> None:
        self.peer_closed = True
        raise StopIteration()

    # -- output ----------------------------------------------------------------------------------
    def send(self, item: Any) -> None:
        with self._send_lock:
            self.conn.send(item)
            self.sent += 1

    def _send_output(self, msg: Any) -> None:
        """A chain output: images and other ISMRMRD messages go back to Gadgetron."""
        if isinstance(msg, (ismrmrd.Image, ismrmrd.Acquisition, ismrmrd.Waveform, self._ImageArray,
                            self._ReconData)):
            self.send(msg)
        else:
            self.log.debug("dropping chain output of type %s (Gadgetron has no reader for it)",
                           type(msg).__name__)

    # -- handlers --------------------------------------------------------------------------------
    def _chain_runner(self) -> ChainRunner:
        if self._runner is None:
            self._runner = ChainRunner(build_chain(self.spec, self.ctx), self.ctx,
                                       on_output=self._send_output)
        return self._runner

    @staticmethod
    def _push(gadgets: list[Gadget], msgs: list[Any]) -> list[Any]:
        """Messages through gadgets in order (no flush: gadgets keep their state across buffers,
        e.g. coil estimation pooling interleaved repetitions)."""
        for g in gadgets:
            msgs = [out for m in msgs for out in g.handle(m)]
        return msgs

    def _split(self, steps: list[GadgetSpec]) -> tuple[list[Gadget], list[Gadget]]:
        """Build ``steps`` as (gadgets before image_export, image_export and after)."""
        if self.cfg.output == "image_array":      # complex images, packed into arrays by _emit_images
            steps = [s for s in steps if s.gadget != "image_export"]
            steps.append(GadgetSpec("image_export", {"output": "complex"}, "<external image_array output>"))
        elif not any(s.gadget == "image_export" for s in steps):
            steps = steps + [GadgetSpec("image_export", {}, "<external default export>")]
        sub = ChainSpec(self.spec.name, self.spec.device, list(steps), self.spec.source,
                        trusted=self.spec.trusted)
        gadgets = build_chain(sub, self.ctx)
        first = next(i for i, s in enumerate(sub.gadgets) if s.gadget == "image_export")
        return gadgets[:first], gadgets[first:]

    def _tail_gadgets(self) -> tuple[list[Gadget], list[Gadget]]:
        """The gadgets after the k-space side (noise, oversampling, buffer) of the chain."""
        names = self.spec.gadget_names
        last = max((i for i, n in enumerate(names) if n in _KSPACE_SIDE), default=-1)
        steps = self.spec.gadgets[last + 1:]
        if not any(s.gadget == "recon" for s in steps):
            raise ChainError(f"chain {self.spec.name!r} has no recon gadget after its buffer; ReconData "
                             f"needs one (gadgets: {names})")
        return self._split(steps)

    def _export_gadgets(self) -> tuple[list[Gadget], list[Gadget]]:
        """The chain's image_export and what follows it (or a default export)."""
        names = self.spec.gadget_names
        steps = self.spec.gadgets[names.index("image_export"):] if "image_export" in names else []
        return self._split(steps)

    def _export(self, post: list[Gadget], outs: list[Any], fix: Callable[[ismrmrd.Image, Any, int], None]
                ) -> None:
        """Series → images through the export gadgets; ``fix(image, series, frame)`` gives each image
        the header fields of the frame it shows; other outputs go back as they are."""
        for item in outs:
            if not isinstance(item, ImageSeries):
                self._send_output(item)
                continue
            images = self._push(post, [item])
            n_f = max(1, int(item.images.shape[0]))
            for k, img in enumerate(i for i in images if isinstance(i, ismrmrd.Image)):
                fix(img, item, k % n_f)
            self._emit_images([i for i in images if isinstance(i, ismrmrd.Image)])
            for other in images:
                if not isinstance(other, ismrmrd.Image):
                    self._send_output(other)

    @staticmethod
    def _fix_from_acquisition(img: ismrmrd.Image, series: ImageSeries, f: int) -> None:
        if series.ref_headers:
            _fix_indices(img, series.ref_headers[min(f, len(series.ref_headers) - 1)])

    @staticmethod
    def _fix_from_image_header(img: ismrmrd.Image, series: ImageSeries, f: int) -> None:
        src = series.ref_headers[min(f, len(series.ref_headers) - 1)].image_header
        head = img.getHead()
        for name in _INDEX_FIELDS + ("image_index", "image_series_index"):
            setattr(head, name, getattr(src, name))
        head.user_int[:] = list(src.user_int)
        head.user_float[:] = list(src.user_float)
        img.setHead(head)

    def handle_recon_data(self, rd: Any) -> None:
        if self._tail is None:
            self._tail = self._tail_gadgets()
        pre, post = self._tail
        for buf in recon_data_to_buffers(rd, self.conn.header, self.ctx.device):
            self._export(post, self._push(pre, [buf]), self._fix_from_acquisition)

    def handle_image_array(self, ia: Any) -> None:
        if self._export_tail is None:
            self._export_tail = self._export_gadgets()
        pre, post = self._export_tail
        for series in image_array_to_series(ia):
            self._export(post, self._push(pre, [series]), self._fix_from_image_header)

    def finish(self) -> None:
        """End of stream for the buffer and image-array paths: flush their gadgets once."""
        for tail, fix in ((self._tail, self._fix_from_acquisition),
                          (self._export_tail, self._fix_from_image_header)):
            if tail is None:
                continue
            pre, post = tail
            for i, g in enumerate(pre):
                self._export(post, self._push(pre[i + 1:], list(g.flush())), fix)
            for i, g in enumerate(post):
                for out in self._push(post[i + 1:], list(g.flush())):
                    if isinstance(out, ismrmrd.Image):
                        self._emit_images([out])
                    else:
                        self._send_output(out)

    def _emit_images(self, images: list[ismrmrd.Image]) -> None:
        if not images:
            return
        if self.cfg.output == "image_array":
            self.send(series_to_image_array(images))
        else:
            for img in images:
                self.send(img)

    # -- main loop -------------------------------------------------------------------------------
    def run(self) -> list[str]:
        """Serve until Gadgetron's CLOSE; returns the error lines (empty on success)."""
        errors: list[str] = []
        stopped = False
        try:
            for mid, item in self.conn.iter_with_mids():
                kind = _KINDS.get(mid)
                if kind is None and mid == 1050:
                    raise ExternalError("acquisition buckets (1050) are not handled by gadgets.external: put "
                                        "the external node after BucketToBufferGadget (ReconData) or before "
                                        "AcquisitionAccumulateTriggerGadget (acquisitions)")
                if kind not in self.accepts:
                    self.send(item)               # not ours: continue down Gadgetron's chain
                elif kind == "acquisitions":
                    if not self._chain_runner().put(item):
                        stopped = True           # the chain failed; its errors are collected below
                        break
                elif kind == "buffers":
                    self.handle_recon_data(item)
                else:
                    self.handle_image_array(item)
            if not self.peer_closed and not stopped:
                raise ExternalError("Gadgetron sent a message id this module has no reader for")
            if not stopped:
                self.finish()
        except Exception as exc:  # noqa: BLE001 - reported to Gadgetron as ERROR below
            errors.append(format_error("gadgets.external", exc))
            self.log.debug("traceback", exc_info=exc)
            if self._runner is not None:
                self._runner.cancel("error in the external module")
        if self._runner is not None:
            if not errors:
                self._runner.close()
            result = self._runner.wait()
            errors = list(result.errors) + errors
        return errors


def _serve(conn: Any, accepts: tuple[str, ...]) -> None:
    """Run a session on an open connection; failures become ERROR messages, never a dropped socket."""
    try:
        session = _Session(conn, accepts)
    except Exception as exc:  # noqa: BLE001 - a bad configuration is reported to Gadgetron
        errors, session = [format_error("gadgets.external", exc)], None
    else:
        errors = session.run()
    if errors:
        for line in errors:
            log.error("%s", line)
            send_error(conn, line)
        if session is None or not session.peer_closed:
            _drain(conn)
    else:
        log.info("session done: %d message(s) sent back", session.sent if session else 0)


def _drain(conn: Any, timeout_s: float = 30.0) -> None:
    """After ERROR, read until Gadgetron's CLOSE so closing our socket cannot reset unread replies."""
    try:
        conn.socket.socket.settimeout(timeout_s)
        for _ in conn.iter_with_mids():
            pass
    except Exception as exc:  # noqa: BLE001 - the peer went away or sent garbage: nothing left to do
        log.debug("while draining after an error: %s", exc)


# ------------------------------------------------------------------------------- entry points
def recon_acquisitions(conn: Any) -> None:
    """Raw acquisitions and waveforms → the configured chain (default ``default``) → images."""
    _serve(conn, ("acquisitions",))


def recon_buffers(conn: Any) -> None:
    """ReconData from Gadgetron's BucketToBuffer → coil maps + recon + export of the chain."""
    _serve(conn, ("buffers",))


def recon_image_arrays(conn: Any) -> None:
    """Image arrays → our image export → images (or image arrays) with the arrays' headers."""
    _serve(conn, ("image_arrays",))


def recon(conn: Any) -> None:
    """Every message type above, each to its handler (the default of ``torchgadgets external``)."""
    _serve(conn, ("acquisitions", "buffers", "image_arrays"))


#: ``--target`` names of ``torchgadgets external`` → entry point.
TARGETS: dict[str, Callable[[Any], None]] = {
    "recon": recon, "recon_acquisitions": recon_acquisitions, "recon_buffers": recon_buffers,
    "recon_image_arrays": recon_image_arrays,
}


def serve_connect(port: int, host: str = "127.0.0.1", target: str = "recon", once: bool = True,
                  ready: Optional[Callable[[int], None]] = None) -> int:
    """``<connect>`` mode: listen on ``host:port``, serve Gadgetron cores that connect (one by default).

    ``port`` 0 picks a free port; ``ready`` is called with the bound port once listening. Returns 0.
    Unlike ``gadgetron.external.listen`` (IPv6 wildcard only) the address is the caller's choice.
    """
    from gadgetron.external import Connection

    fn = TARGETS[target]
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as srv:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind((host, port))
        srv.listen(1)
        bound = srv.getsockname()[1]
        log.info("waiting for a Gadgetron core on %s:%d (target %s)", host, bound, target)
        if ready is not None:
            ready(bound)
        while True:
            sock, addr = srv.accept()
            log.info("Gadgetron core connected from %s", addr[0])
            try:
                with Connection(sock) as conn:
                    fn(conn)
            except Exception as exc:  # noqa: BLE001 - a broken handshake ends this connection only
                log.error("connection from %s failed: %s", addr[0], exc)
            if once:
                return 0

