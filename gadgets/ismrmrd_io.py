"""ISMRMRD (MRD) HDF5 files: turn a simulated scan into a real header + acquisitions, write, read.

A file written here is an ordinary ISMRMRD dataset (``/{group}/xml``, ``/{group}/data``) that
``ismrmrd_info``, ``gadgetron_ismrmrd_client`` and other MRD readers accept. Two extra datasets
carry the simulation's truth for tests and benchmarks: ``/{group}/torchgadgets/ground_truth``
(``[F, N, N]`` complex64) and ``/{group}/torchgadgets/coil_maps`` (``[C, N, N]`` complex64).

Conventions used by :func:`scan_to_ismrmrd` (see PROTOCOL.md §5 for the header fields):

* One noise readout first (``ACQ_IS_NOISE_MEASUREMENT``, the same dwell time as the imaging
  readouts and ``relativeReceiverNoiseBandwidth = 1``, so its covariance applies unscaled).
* Then one acquisition per Cartesian line / radial spoke / spiral interleaf, frame by frame:
  ``idx.kspace_encode_step_1`` = line (Cartesian, DC line at ``N//2``) or spoke / interleaf number,
  ``idx.phase`` = frame. ``FIRST_IN_SLICE`` on the first imaging readout, ``FIRST/LAST_IN_PHASE``
  around each frame, ``LAST_IN_SLICE`` and ``LAST_IN_MEASUREMENT`` on the last readout;
  ``IS_PARALLEL_CALIBRATION_AND_IMAGING`` on lines inside the fully sampled centre block.
* ``acquisition_time_stamp`` counts 2.5 ms ticks (readouts of frame ``f`` start at
  ``frame_times_s[f]`` after the imaging start), ``physiology_time_stamp[0]`` is the time since
  the last R-wave trigger in the same ticks.
* Non-Cartesian ``traj`` has ``trajectory_dimensions = 2``, columns ``(kx, ky)`` in cycles/FOV of
  the encoded matrix (``[-N/2, N/2]``), i.e. ``k_cycles = k_rad · N / (2π)``.
"""

from __future__ import annotations

import heapq
import math
import os
from typing import TYPE_CHECKING, Iterator, Sequence

import h5py
import ismrmrd
import ismrmrd.xsd as xsd
import numpy as np
import torch

from recon_core.phantoms import PhantomScan
from recon_core.trajectories import acs_region

if TYPE_CHECKING:
    from xsdata.formats.dataclass.context import XmlContext
    from xsdata.formats.dataclass.parsers import XmlParser

__all__ = [
    "IsmrmrdFileError",
    "TICK_S",
    "scan_to_ismrmrd",
    "write_ismrmrd",
    "iter_ismrmrd",
    "read_ismrmrd",
    "read_ground_truth",
    "read_coil_maps",
]

#: Duration of one ``acquisition_time_stamp`` / ``physiology_time_stamp`` tick (Siemens convention).
TICK_S = 2.5e-3
_EXTRA = "torchgadgets"
_IMAGING_START_S = 0.1   # imaging starts 100 ms after the noise scan
_SLICE_MM = 8.0
_GOLDEN_RATIO = (1 + 5 ** 0.5) / 2
_READ_CHUNK = 256        # records read from HDF5 at a time when streaming


class IsmrmrdFileError(ValueError):
    """An ISMRMRD file exists but cannot be used (wrong format, missing parts, bad header)."""


# ----------------------------------------------------------------------------------------------
# header


def _limit(lo: int, hi: int, centre: int) -> xsd.limitType:
    return xsd.limitType(minimum=int(lo), maximum=int(hi), center=int(centre))


def _space(mx: int, my: int, fx: float, fy: float) -> xsd.encodingSpaceType:
    return xsd.encodingSpaceType(matrixSize=xsd.matrixSizeType(x=int(mx), y=int(my), z=1),
                                 fieldOfView_mm=xsd.fieldOfViewMm(x=float(fx), y=float(fy), z=_SLICE_MM))


def _frame_durations(scan: PhantomScan) -> float:
    t = scan.frame_times_s.to(torch.float64)
    return float(t[1] - t[0]) if t.numel() > 1 else float(scan.rr_interval_s)


def _readouts(scan: PhantomScan) -> list[list[tuple[int, object]]]:
    """Per frame, the list of (encode step 1, selector) of its readouts in acquisition order."""
    out = []
    if scan.kind == "cartesian":
        for f in range(scan.n_frames):
            rows = torch.nonzero(scan.mask[f].amax(dim=-1) > 0).reshape(-1).tolist()
            out.append([(r, r) for r in rows])
    else:
        for f in range(scan.n_frames):
            out.append([(int(e), i) for i, e in enumerate(scan.encode_index[f].tolist())])
    return out


def _build_header(scan: PhantomScan, protocol_name: str, measurement_id: str, tr_ms: float,
                  dwell_us: float) -> str:
    n, os_, fov = scan.matrix, scan.readout_oversampling, scan.fov_mm
    f, c = scan.n_frames, scan.n_coils
    if scan.kind == "cartesian":
        encoded = _space(os_ * n, n, os_ * fov, fov)
        step1 = _limit(0, n - 1, n // 2)
        step0 = _limit(0, os_ * n - 1, (os_ * n) // 2)
        traj_type, traj_desc = xsd.trajectoryType.CARTESIAN, None
        accel = max(1, int(round(scan.accel or 1)))
        parallel = xsd.parallelImagingType(
            accelerationFactor=xsd.accelerationFactorType(kspace_encoding_step_1=accel,
                                                          kspace_encoding_step_2=1),
            calibrationMode=xsd.calibrationModeType.EMBEDDED)
    else:
        encoded = _space(n, n, fov, fov)
        s = scan.samples_per_readout
        step0 = _limit(0, s - 1, s // 2 if scan.kind == "radial" else 0)
        step1 = _limit(0, scan.n_encodings - 1, 0)
        parallel = None
        per_frame = int(scan.encode_index.shape[1])
        longs = [xsd.userParameterLongType(name="readouts_per_frame", value=per_frame),
                 xsd.userParameterLongType(name="samples_per_readout", value=s),
                 xsd.userParameterLongType(name="total_encodings", value=scan.n_encodings)]
        if scan.kind == "radial":
            traj_type = xsd.trajectoryType.GOLDENANGLE
            ident = "golden_angle_radial"
            doubles = [xsd.userParameterDoubleType(name="angle_increment_deg", value=180.0 / _GOLDEN_RATIO),
                       xsd.userParameterDoubleType(name="readout_oversampling", value=s / n)]
        else:
            traj_type = xsd.trajectoryType.SPIRAL
            ident = "variable_density_spiral"
            doubles = []
        traj_desc = xsd.trajectoryDescriptionType(
            identifier=ident, userParameterLong=longs, userParameterDouble=doubles,
            comment="traj columns (kx, ky) in cycles/FOV of the encoded matrix, range [-N/2, N/2]")
    limits = xsd.encodingLimitsType(
        kspace_encoding_step_0=step0, kspace_encoding_step_1=step1, kspace_encoding_step_2=_limit(0, 0, 0),
        average=_limit(0, 0, 0), slice=_limit(0, 0, 0), contrast=_limit(0, 0, 0),
        phase=_limit(0, f - 1, 0), repetition=_limit(0, 0, 0), set=_limit(0, 0, 0),
        segment=_limit(0, 0, 0))
    encoding = xsd.encodingType(encodedSpace=encoded, reconSpace=_space(n, n, fov, fov),
                                encodingLimits=limits, trajectory=traj_type,
                                trajectoryDescription=traj_desc, parallelImaging=parallel)
    header = xsd.ismrmrdHeader(
        measurementInformation=xsd.measurementInformationType(
            measurementID=measurement_id, patientPosition=xsd.patientPositionType.HFS,
            protocolName=protocol_name, sequenceName="torchgadgets_phantom_bssfp"),
        acquisitionSystemInformation=xsd.acquisitionSystemInformationType(
            systemVendor="torchgadgets", systemModel="analytic cardiac phantom",
            systemFieldStrength_T=1.5, relativeReceiverNoiseBandwidth=1.0, receiverChannels=c),
        experimentalConditions=xsd.experimentalConditionsType(H1resonanceFrequency_Hz=63_870_000),
        encoding=[encoding],
        sequenceParameters=xsd.sequenceParametersType(
            TR=[round(tr_ms, 4)], TE=[round(tr_ms / 2, 4)], flipAngle_deg=[50.0], sequence_type="TrueFISP",
            echo_spacing=[round(tr_ms, 4)]),
        userParameters=xsd.userParametersType(
            userParameterDouble=[
                xsd.userParameterDoubleType(name="rr_interval_ms", value=scan.rr_interval_s * 1e3),
                xsd.userParameterDoubleType(name="noise_std_relative", value=scan.noise_std),
                xsd.userParameterDoubleType(name="kspace_scale", value=scan.kspace_scale),
                xsd.userParameterDoubleType(name="dwell_time_us", value=dwell_us)],
            userParameterString=[xsd.userParameterStringType(name="source", value="recon_core.phantoms")]),
    )
    return xsd.ToXML(header)


# ----------------------------------------------------------------------------------------------
# acquisitions


def _new_acq(data: np.ndarray, traj: np.ndarray | None, counter: int, tick: int, trigger_tick: int,
             dwell_us: float, centre: int, measurement_uid: int) -> ismrmrd.Acquisition:
    if traj is not None:
        traj = np.ascontiguousarray(traj, dtype=np.float32)
    acq = ismrmrd.Acquisition.from_array(np.ascontiguousarray(data, dtype=np.complex64), traj)
    acq.version = 1
    acq.measurement_uid = measurement_uid
    acq.scan_counter = counter
    acq.acquisition_time_stamp = tick
    acq.physiology_time_stamp[0] = trigger_tick
    acq.center_sample = centre
    acq.sample_time_us = dwell_us
    acq.position[:] = (0.0, 0.0, 0.0)
    acq.read_dir[:] = (1.0, 0.0, 0.0)
    acq.phase_dir[:] = (0.0, 1.0, 0.0)
    acq.slice_dir[:] = (0.0, 0.0, 1.0)
    acq.patient_table_position[:] = (0.0, 0.0, 0.0)
    for ch in range(data.shape[0]):
        acq.setChannelActive(ch)
    return acq


def scan_to_ismrmrd(scan: PhantomScan, protocol_name: str = "torchgadgets_phantom",
                    measurement_id: str = "00000_00000_00000_1",
                    dwell_time_us: float = 2.5) -> tuple[str, list]:
    """Convert a :class:`~recon_core.phantoms.PhantomScan` into an ISMRMRD header and acquisitions.

    Parameters
    ----------
    scan : PhantomScan
        Output of :func:`recon_core.phantoms.simulate_scan`.
    protocol_name, measurement_id : str
        Written to ``measurementInformation`` (chain selection keys on the protocol name).
    dwell_time_us : float
        ``sample_time_us`` of every readout, the noise readout included.

    Returns
    -------
    (str, list of ismrmrd.Acquisition)
        The header XML (serialised with ``ismrmrd.xsd.ToXML``) and the acquisitions in order,
        noise readout first.

    Raises
    ------
    TypeError
        ``scan`` is not a PhantomScan.
    ValueError
        The Cartesian mask has partially sampled readout lines (Poisson-disc masks): such data
        cannot be written as whole readouts.
    """
    if not isinstance(scan, PhantomScan):
        raise TypeError(f"scan must be a PhantomScan, got {type(scan).__name__}")
    if not dwell_time_us > 0:
        raise ValueError(f"dwell_time_us must be positive, got {dwell_time_us}")
    if scan.kind == "cartesian":
        rows = scan.mask.amax(dim=-1) > 0
        full = scan.mask.amin(dim=-1) > 0
        if not torch.equal(rows, full):
            raise ValueError("scan.mask samples parts of readout lines (e.g. a Poisson-disc mask); "
                             "only masks of whole lines can be written as ISMRMRD readouts")
    readouts = _readouts(scan)
    per_frame = max(1, max(len(r) for r in readouts))
    frame_dur = _frame_durations(scan)
    tr_s = frame_dur / per_frame
    digits = "".join(ch for ch in measurement_id if ch.isdigit())
    uid = int(digits[-9:]) if digits else 0
    header_xml = _build_header(scan, protocol_name, measurement_id, tr_s * 1e3, dwell_time_us)

    noise = scan.noise.detach().cpu().numpy().astype(np.complex64)
    acqs = []
    n_acq = _new_acq(noise, None, 1, 0, 0, dwell_time_us, 0, uid)
    n_acq.set_flag(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)
    acqs.append(n_acq)

    kspace = scan.kspace.detach().cpu().numpy()
    times = scan.frame_times_s.to(torch.float64).tolist()
    acs_rows: set[int] = set()
    if scan.kind == "cartesian":
        region = acs_region(scan.mask)
        if region is not None and scan.acs_lines > 0:
            (y0, y1), (x0, x1) = region
            if x0 == 0 and x1 == scan.mask.shape[-1]:
                acs_rows = set(range(y0, y1))
        centre = scan.kspace.shape[-1] // 2
        traj_scale = None
    else:
        s = scan.samples_per_readout
        centre = s // 2 if scan.kind == "radial" else 0
        traj_scale = scan.matrix / (2 * math.pi)
        traj_np = scan.trajectory.detach().cpu().to(torch.float64).numpy()
    counter = 1
    last = (scan.n_frames - 1, len(readouts[-1]) - 1)
    for f, frame in enumerate(readouts):
        for r, (step1, sel) in enumerate(frame):
            t = times[f] + r * tr_s
            tick = int(round((_IMAGING_START_S + t) / TICK_S))
            trig = int(round((t % scan.rr_interval_s) / TICK_S))
            if scan.kind == "cartesian":
                data, traj = kspace[f, :, sel, :], None
            else:
                sl = slice(sel * s, (sel + 1) * s)
                data = kspace[f, :, sl]
                traj = np.stack([traj_np[f, 1, sl], traj_np[f, 0, sl]], axis=1) * traj_scale  # (kx, ky)
            counter += 1
            acq = _new_acq(data, traj, counter, tick, trig, dwell_time_us, centre, uid)
            acq.idx.kspace_encode_step_1 = int(step1)
            acq.idx.phase = f
            acq.idx.slice = 0
            if f == 0 and r == 0:
                acq.set_flag(ismrmrd.ACQ_FIRST_IN_SLICE)
            if r == 0:
                acq.set_flag(ismrmrd.ACQ_FIRST_IN_PHASE)
            if r == len(frame) - 1:
                acq.set_flag(ismrmrd.ACQ_LAST_IN_PHASE)
            if (f, r) == last:
                acq.set_flag(ismrmrd.ACQ_LAST_IN_SLICE)
                acq.set_flag(ismrmrd.ACQ_LAST_IN_MEASUREMENT)
            if step1 in acs_rows:
                acq.set_flag(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING)
            acqs.append(acq)
    return header_xml, acqs


# ----------------------------------------------------------------------------------------------
# writing


def _as_complex64(name: str, value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    arr = np.asarray(value)
    if not np.iscomplexobj(arr) and not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(f"{name} must be a complex or real array, got dtype {arr.dtype}")
    return arr.astype(np.complex64)


def write_ismrmrd(path: str | os.PathLike, header_xml: str, acquisitions: Sequence,
                  group: str = "dataset", ground_truth=None, coil_maps=None,
                  overwrite: bool = False) -> None:
    """Write an ISMRMRD dataset (header, acquisitions and waveforms) with ``ismrmrd.Dataset``.

    ``ground_truth`` (``[F, N, N]``) and ``coil_maps`` (``[C, N, N]``), when given, are stored as
    complex64 under ``/{group}/torchgadgets/``. An existing group is an error unless
    ``overwrite`` (then the group is replaced; other groups of the file are kept).
    """
    if not isinstance(header_xml, str):
        raise TypeError(f"header_xml must be a str, got {type(header_xml).__name__}")
    try:
        xsd.CreateFromDocument(header_xml)
    except Exception as exc:  # the parser raises several types; report its message
        raise ValueError(f"header_xml is not a valid ISMRMRD header: {exc}") from exc
    items = list(acquisitions)
    for i, item in enumerate(items):
        if not isinstance(item, (ismrmrd.Acquisition, ismrmrd.Waveform)):
            raise TypeError(f"acquisitions[{i}] must be an ismrmrd.Acquisition or Waveform, "
                            f"got {type(item).__name__}")
    path = os.fspath(path)
    with h5py.File(path, "a") as fh:
        if group in fh:
            if not overwrite:
                raise ValueError(f"{path}: group {group!r} already exists "
                             "(pass overwrite=True to replace it)")
            del fh[group]
    with ismrmrd.Dataset(path, group, create_if_needed=True) as ds:
        ds.write_xml_header(header_xml.encode("utf-8"))
        for item in items:
            if isinstance(item, ismrmrd.Acquisition):
                ds.append_acquisition(item)
            else:
                ds.append_waveform(item)
    if ground_truth is not None or coil_maps is not None:
        with h5py.File(path, "a") as fh:
            extra = fh[group].require_group(_EXTRA)
            if ground_truth is not None:
                extra.create_dataset("ground_truth", data=_as_complex64("ground_truth", ground_truth))
            if coil_maps is not None:
                extra.create_dataset("coil_maps", data=_as_complex64("coil_maps", coil_maps))


# ----------------------------------------------------------------------------------------------
# reading


def _open(path: str | os.PathLike, group: str) -> tuple[h5py.File, h5py.Group]:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"ISMRMRD file {path!r} does not exist")
    if not h5py.is_hdf5(path):
        raise IsmrmrdFileError(f"{path}: not an HDF5 file, so not an ISMRMRD dataset")
    fh = h5py.File(path, "r")
    if group not in fh or not isinstance(fh[group], h5py.Group):
        groups = sorted(k for k in fh.keys() if isinstance(fh[k], h5py.Group))
        fh.close()
        raise IsmrmrdFileError(f"{path}: group {group!r} not found (groups in the file: {groups})")
    return fh, fh[group]


def _header(path: str, grp: h5py.Group) -> str:
    if "xml" not in grp:
        raise IsmrmrdFileError(f"{path}: no ISMRMRD header (dataset /{grp.name.strip('/')}/xml is missing)")
    raw = grp["xml"][0]
    xml = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else str(raw)
    xml = xml.rstrip("\x00")
    try:
        xsd.CreateFromDocument(xml)
    except Exception as exc:
        raise IsmrmrdFileError(f"{path}: the ISMRMRD header in {grp.name}/xml does not parse: {exc}") from exc
    return xml


def _acq_records(ds: h5py.Dataset) -> Iterator[tuple[int, int, ismrmrd.Acquisition]]:
    for start in range(0, ds.shape[0], _READ_CHUNK):
        block = ds[start:start + _READ_CHUNK]
        for i, rec in enumerate(block):
            acq = ismrmrd.Acquisition(rec["head"].tobytes())
            acq.data[:] = rec["data"].view(np.complex64).reshape(acq.active_channels, acq.number_of_samples)
            if acq.trajectory_dimensions > 0:
                acq.traj[:] = rec["traj"].reshape(acq.number_of_samples, acq.trajectory_dimensions)
            yield int(acq.acquisition_time_stamp), start + i, acq


def _wav_records(ds: h5py.Dataset) -> Iterator[tuple[int, int, ismrmrd.Waveform]]:
    hdr_dtype = ismrmrd.hdf5.waveform_header_dtype
    for start in range(0, ds.shape[0], _READ_CHUNK):
        block = ds[start:start + _READ_CHUNK]
        for i, rec in enumerate(block):
            head = np.zeros((1,), dtype=hdr_dtype)
            head[0] = rec["head"]
            wav = ismrmrd.Waveform(head)
            wav.data[:] = rec["data"].view(np.uint32).reshape(wav.channels, wav.number_of_samples)
            yield int(wav.time_stamp), start + i, wav


def iter_ismrmrd(path: str | os.PathLike, group: str = "dataset") -> Iterator:
    """Stream an ISMRMRD file: yield the header XML (str), then Acquisitions and Waveforms.

    Acquisitions keep their stored order; waveforms are merged in by time stamp (at equal time
    stamps the acquisition comes first), the order in which a scanner or
    ``gadgetron_ismrmrd_client`` sends them. Records are read from HDF5 in small blocks, so
    memory does not grow with the file.

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    IsmrmrdFileError
        Not an HDF5 file, ``group`` missing, no ``xml`` header, a header that does not parse
        (the parser's message is included), or no acquisitions.
    """
    fh, grp = _open(path, group)
    with fh:
        yield _header(os.fspath(path), grp)
        if "data" not in grp or grp["data"].shape[0] == 0:
            raise IsmrmrdFileError(f"{os.fspath(path)}: no acquisitions in group {group!r} "
                                   f"(/{group}/data is missing or empty)")
        streams = [_acq_records(grp["data"])]
        if "waveforms" in grp and grp["waveforms"].shape[0] > 0:
            streams.append(_wav_records(grp["waveforms"]))
        # merge key: (time stamp, stream, index); acquisitions are already in file order, so a
        # time stamp that goes backwards must not reorder them: use a running maximum.
        def keyed(stream, tag):
            running = 0
            for ts, i, item in stream:
                running = max(running, ts) if tag == 0 else ts
                yield (running, tag, i), item
        merged = heapq.merge(*(keyed(s, t) for t, s in enumerate(streams)), key=lambda kv: kv[0])
        for _, item in merged:
            yield item


def read_ismrmrd(path: str | os.PathLike, group: str = "dataset") -> tuple[str, list, list]:
    """Read a whole ISMRMRD dataset: ``(header_xml, acquisitions, waveforms)``.

    Same checks and errors as :func:`iter_ismrmrd`.
    """
    it = iter_ismrmrd(path, group)
    header = next(it)
    acqs, wavs = [], []
    for item in it:
        (acqs if isinstance(item, ismrmrd.Acquisition) else wavs).append(item)
    return header, acqs, wavs


def _read_extra(path: str | os.PathLike, group: str, name: str) -> torch.Tensor:
    fh, grp = _open(path, group)
    with fh:
        if _EXTRA not in grp or name not in grp[_EXTRA]:
            raise IsmrmrdFileError(f"{os.fspath(path)}: no {name} stored "
                                   f"(/{group}/{_EXTRA}/{name} is missing)")
        return torch.from_numpy(np.asarray(grp[_EXTRA][name][()], dtype=np.complex64))


def read_ground_truth(path: str | os.PathLike, group: str = "dataset") -> torch.Tensor:
    """The ground truth ``[F, N, N]`` complex64 stored by :func:`write_ismrmrd`."""
    return _read_extra(path, group, "ground_truth")


def read_coil_maps(path: str | os.PathLike, group: str = "dataset") -> torch.Tensor:
    """The true coil maps ``[C, N, N]`` complex64 stored by :func:`write_ismrmrd`."""
    return _read_extra(path, group, "coil_maps")


_HEADER_CONTEXT: "XmlContext | None" = None


def _header_parser() -> "XmlParser":
    """A parser as strict as ``ismrmrd.xsd.CreateFromDocument``'s (unknown elements are errors) that
    shares one binding context: building the context's class metadata is most of a header parse
    (≈ 12 ms of 15), so every parse after the first costs ≈ 3 ms. A new parser per call (its
    namespace map is per parse) keeps concurrent sessions apart; the context is only a cache."""
    global _HEADER_CONTEXT
    from xsdata.formats.dataclass.context import XmlContext
    from xsdata.formats.dataclass.parsers import XmlParser
    from xsdata.formats.dataclass.parsers.config import ParserConfig

    if _HEADER_CONTEXT is None:
        _HEADER_CONTEXT = XmlContext()
    return XmlParser(config=ParserConfig(fail_on_unknown_properties=True), context=_HEADER_CONTEXT)


def warm_header_parser() -> None:
    """Build the binding context's metadata for every ISMRMRD header class, so that a session's first
    header parse costs ≈ 3 ms instead of ≈ 15 ms (the server calls it while a session process
    waits for its connection)."""
    import dataclasses

    context = _header_parser().context
    for cls in vars(xsd).values():
        if isinstance(cls, type) and dataclasses.is_dataclass(cls):
            context.build(cls)


def parse_header(header_xml: str, source: str) -> "xsd.ismrmrdHeader":
    """Parse and sanity-check an ISMRMRD XML header; errors name ``source`` and the field.

    The one header check shared by ``torchgadgets run`` and the server (before any chain starts).
    """
    try:
        header = _header_parser().from_string(header_xml, xsd.ismrmrdHeader)
    except Exception as exc:  # noqa: BLE001 - xsdata raises several parser error types
        raise IsmrmrdFileError(f"{source}: the ISMRMRD header does not parse: {exc}") from None
    if not header.encoding:
        raise IsmrmrdFileError(f"{source}: the ISMRMRD header has no <encoding> section")
    enc = header.encoding[0]
    for space_name in ("encodedSpace", "reconSpace"):
        space = getattr(enc, space_name, None)
        if space is None or space.matrixSize is None:
            raise IsmrmrdFileError(f"{source}: header encoding/{space_name}/matrixSize is missing")
        ms = space.matrixSize
        if not ms.x or not ms.y or ms.x < 1 or ms.y < 1:
            raise IsmrmrdFileError(
                f"{source}: header encoding/{space_name}/matrixSize is {ms.x}x{ms.y}; both must be >= 1")
    limits = enc.encodingLimits
    e1 = getattr(limits, "kspace_encoding_step_1", None) if limits is not None else None
    if e1 is not None and e1.minimum is not None and e1.maximum is not None:
        if e1.maximum < e1.minimum or (e1.center is not None and not e1.minimum <= e1.center <= e1.maximum):
            raise IsmrmrdFileError(
                f"{source}: inconsistent encodingLimits/kspace_encoding_step_1: minimum {e1.minimum}, "
                f"maximum {e1.maximum}, center {e1.center}")
    return header
