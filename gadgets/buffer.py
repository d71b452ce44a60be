"""The ``buffer`` gadget: sort acquisitions into k-space buffers (AcquisitionAccumulateTrigger +
BucketToBuffer).

Acquisitions are collected into one bucket per (slice, contrast, repetition, set, phase) with the
frame dimension (``frames``: phase or repetition; ``none`` = one frame per buffer) left out of the
key. A bucket is turned into a :class:`~gadgets.messages.KSpaceBuffer` when the trigger fires:

* ``trigger="slice"``: LAST_IN_SLICE of slice *s* emits every pending bucket of slice *s*;
* ``trigger="repetition"``: LAST_IN_REPETITION of repetition *r* emits every pending bucket of *r*;
* ``trigger="phase"``: LAST_IN_PHASE emits the bucket of that acquisition;
* ``trigger="none"``: nothing until the end of the stream.

Whatever is still pending is emitted at the end of the stream (flush). When the trigger dimension
is the frame dimension, the triggering acquisition's own bucket is emitted (frames so far).

Merging (``merge``): the listed counters are left out of the key too, so their acquisitions land in
one k-space (lines acquired more than once are averaged). ``interleaved`` stands for the header's
interleaved dimension: ``parallelImaging/interleavingDimension`` (``repetition`` when absent) when
``parallelImaging/calibrationMode`` is ``interleaved``, else nothing — the complementary
undersampled acquisitions of e.g. ``ismrmrd_generate_cartesian_shepp_logan -a 2`` (even lines in
repetition 0, odd lines in repetition 1) become one fully sampled k-space. A trigger then fires
only on an acquisition whose merged counters are at their header maximum
(``encodingLimits``), i.e. once the last piece has arrived; without limits, at the end of the stream.

Cartesian sorting: line ``kspace_encode_step_1 = e1`` goes to row ``e1 − center + Ny//2`` where
``center`` is ``encodingLimits/kspace_encoding_step_1/center`` (``Ny//2`` without limits) and
``Ny`` is the encoded matrix y (grown if the limits need more), so the k-space centre sits at
``Ny//2`` and partial-Fourier rows stay zero. A readout of ``n`` samples with echo at
``center_sample = c`` is placed at columns ``Nx//2 − c … Nx//2 − c + n`` (asymmetric echo); a full
readout (``n == Nx``) fills the row. ``Nx`` is the encoded matrix x, or the recon matrix x once
``remove_oversampling`` has run. IS_REVERSE lines are flipped. Repeated lines (averages) are
averaged. Calibration lines (IS_PARALLEL_CALIBRATION) go only into ``calibration``;
IS_PARALLEL_CALIBRATION_AND_IMAGING lines go into both (calibration-only lines too with ``acs_in_data``). ``calibration`` is the fully sampled block
of the calibration samples around the k-space centre, ``[C, ny, nx]``, by the project's one rule
(:func:`recon_core.trajectories.acs_region`); calibration lines that miss the centre give no block
(a warning; coil maps then come from the imaging data). Noise, navigator, phase-correction,
dummy-scan, feedback, surface-coil-correction and phase-stabilisation acquisitions are dropped.

Non-Cartesian sorting (header trajectory other than cartesian/epi, or acquisitions with
``trajectory_dimensions >= 2``): each frame's readouts are concatenated in arrival order into
data ``[C, M]`` and trajectory ``[2, M]``; all frames must have the same ``M``. Trajectory units
(rule, in order):

1. the ``trajectory_units`` parameter, if not ``auto``;
2. a ``trajectoryDescription`` userParameterString named ``units``/``trajectory_units``/
   ``kspace_units`` with value ``cycles/fov``, ``cycles/sample`` (alias ``normalized``) or
   ``rad/voxel`` (alias ``radians``);
3. otherwise by magnitude: ``max |k| <= 0.5`` → cycles/sample, else cycles/FOV (ISMRMRD's
   convention, ``|k| <= N/2`` on the recon matrix; a warning is logged when ``max |k|`` exceeds
   ``N``, twice the Nyquist edge).

cycles/FOV → rad/voxel is ``2π·k/N`` per axis with ``N`` the recon matrix; cycles/sample → ``2π·k``.
ISMRMRD columns (kx, ky) become rows (ky, kx). DCF: ``auto`` = the project's default
(:func:`recon_core.trajectories.default_dcf`: ramp for radial/goldenangle, Pipe–Menon otherwise).
Calibration-only readouts (IS_PARALLEL_CALIBRATION) are not part of the non-Cartesian data.

3D (``kspace_encode_step_2 > 0`` or an encoded matrix z > 1) is rejected with a GadgetError.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, Optional

import ismrmrd
import numpy as np
import torch

from gadgets.base import ChainContext, ChainError, Gadget, GadgetParams
from gadgets.messages import KSpaceBuffer
from gadgets.noise import parsed_header
from recon_core import trajectories as tr

__all__ = ["BufferGadget", "BufferParams", "TICK_S"]

#: ISMRMRD acquisition_time_stamp tick (Siemens: 2.5 ms).
TICK_S = 2.5e-3

_DROP_FLAGS = {
    ismrmrd.ACQ_IS_NOISE_MEASUREMENT: "noise",
    ismrmrd.ACQ_IS_NAVIGATION_DATA: "navigator",
    ismrmrd.ACQ_IS_PHASECORR_DATA: "phase correction",
    ismrmrd.ACQ_IS_DUMMYSCAN_DATA: "dummy scan",
    ismrmrd.ACQ_IS_HPFEEDBACK_DATA: "HP feedback",
    ismrmrd.ACQ_IS_RTFEEDBACK_DATA: "RT feedback",
    ismrmrd.ACQ_IS_SURFACECOILCORRECTIONSCAN_DATA: "surface coil correction",
    ismrmrd.ACQ_IS_PHASE_STABILIZATION: "phase stabilisation",
    ismrmrd.ACQ_IS_PHASE_STABILIZATION_REFERENCE: "phase stabilisation reference",
}
_CARTESIAN = {"cartesian", "epi"}
_UNIT_ALIASES = {
    "cycles/fov": "cycles/fov", "cycles_per_fov": "cycles/fov", "cyclesperfov": "cycles/fov",
    "cycles/sample": "cycles/sample", "normalized": "cycles/sample", "normalised": "cycles/sample",
    "cycles_per_sample": "cycles/sample",
    "rad/voxel": "rad/voxel", "radians": "rad/voxel", "rad": "rad/voxel", "radians/voxel": "rad/voxel",
}
_UNIT_PARAM_NAMES = {"units", "trajectory_units", "trajectoryunits", "kspace_units", "traj_units"}
_KEY_FIELDS = ("slice", "contrast", "repetition", "set", "phase")


@dataclass
class BufferParams(GadgetParams):
    """Parameters of :class:`BufferGadget` (see the module docstring for the semantics).

    trigger : when a buffer is emitted ("slice", "phase", "repetition", "none" = end of stream).
    frames : the encoding counter that becomes the frame axis ("phase", "repetition", "none").
    dcf : density compensation of non-Cartesian data ("auto", "ramp", "pipe_menon", "none").
    dcf_iterations : Pipe–Menon iterations.
    trajectory_units : units of the acquisitions' ``traj`` ("auto" follows the rule above).
    merge : counters merged into one k-space ("slice", "contrast", "repetition", "set", "phase",
        or "interleaved" = the header's interleaved dimension, see above).
    separate : ``["average"]`` keeps each average in its own buffer instead of averaging repeated
        lines (Gadgetron's ``S_dimension=average``: one image per average).
    acs_in_data : calibration-only lines (IS_PARALLEL_CALIBRATION) also go into the imaging k-space
        (they are measured data: SENSE-type methods and GRAPPA with its embedded-ACS step use them;
        BART users do the same); they still form the calibration block too.
    """

    trigger: Literal["slice", "phase", "repetition", "none"] = "slice"
    frames: Literal["phase", "repetition", "none"] = "phase"
    dcf: Literal["auto", "ramp", "pipe_menon", "none"] = "auto"
    dcf_iterations: int = 20
    trajectory_units: Literal["auto", "cycles/fov", "cycles/sample", "rad/voxel"] = "auto"
    merge: list[str] = field(default_factory=list)
    separate: list[str] = field(default_factory=list)
    acs_in_data: bool = False

    def validate(self, where: str) -> None:
        if self.dcf_iterations < 1:
            raise ChainError(f"{where}: parameter 'dcf_iterations' must be >= 1, got {self.dcf_iterations}")
        allowed = (*_KEY_FIELDS, "interleaved")
        for m in self.merge:
            if m not in allowed:
                raise ChainError(f"{where}: parameter 'merge' has unknown counter {m!r}; allowed: "
                                 f"{', '.join(allowed)}")
            if m == self.frames:
                raise ChainError(f"{where}: parameter 'merge' lists {m!r}, which is already the frame axis "
                                 f"('frames: {self.frames}')")
        for s in self.separate:
            if s != "average":
                raise ChainError(f"{where}: parameter 'separate' has unknown counter {s!r}; allowed: average "
                                 f"(the other counters always get their own buffers unless merged)")


@dataclass
class _Geometry:
    """What the buffer needs from the header's first encoding."""

    enc: tuple[int, int, int]
    rec: tuple[int, int, int]
    enc_fov: tuple[float, float, float]
    rec_fov: tuple[float, float, float]
    e1_limits: Optional[tuple[int, int, int]]     # (minimum, maximum, center)
    trajectory: str
    units_hint: Optional[str]
    merged: tuple[str, ...] = ()                  # counters merged into one k-space
    merged_max: dict[str, int] = field(default_factory=dict)   # their encodingLimits maximum


@dataclass
class _Record:
    """One stored acquisition."""

    head: Any
    data: np.ndarray            # [C, n] complex64 (flipped if IS_REVERSE)
    traj: np.ndarray            # [n, D] float32
    e1: int
    center: int
    imaging: bool
    calibration: bool
    order: int


@dataclass
class _Bucket:
    key: tuple[Optional[int], ...]
    frames: dict[int, list[_Record]] = field(default_factory=dict)
    first_order: int = 0


def _limit(limits: Any, name: str) -> Any:
    return getattr(limits, name, None) if limits is not None else None


class BufferGadget(Gadget):
    """Acquisitions → one :class:`KSpaceBuffer` per slice/contrast/repetition/set (frames: ``frames``)."""

    name = "buffer"
    Params = BufferParams
    accepts = (ismrmrd.Acquisition,)

    def __init__(self, params: BufferParams | None = None, ctx: ChainContext | None = None) -> None:
        super().__init__(params, ctx)
        self._geom: Optional[_Geometry] = None
        self._noncartesian: Optional[bool] = None
        self._channels: Optional[int] = None
        self._pending: dict[tuple[Optional[int], ...], _Bucket] = {}
        self._order = 0
        self._emitted = 0
        self._dropped: dict[str, int] = {}

    # ------------------------------------------------------------------ header

    def _read_header(self) -> _Geometry:
        h = parsed_header(self.ctx)
        if h is None or not getattr(h, "encoding", None):
            raise self.error("no ISMRMRD header with an <encoding> section: cannot size the k-space buffer")
        enc = h.encoding[0]

        def triple(space: Any, what: str) -> tuple[int, int, int]:
            ms = getattr(space, "matrixSize", None)
            if ms is None:
                raise self.error(f"header encoding/{what}/matrixSize is missing")
            vals = (int(ms.x or 0), int(ms.y or 0), int(ms.z or 1))
            for axis, v in zip("xyz", vals):
                if v <= 0:
                    raise self.error(f"header encoding/{what}/matrixSize/{axis} is {v}; it must be > 0")
            return vals

        def fov(space: Any) -> tuple[float, float, float]:
            f = getattr(space, "fieldOfView_mm", None)
            if f is None:
                return (0.0, 0.0, 0.0)
            return (float(f.x or 0.0), float(f.y or 0.0), float(f.z or 0.0))

        enc_m = triple(enc.encodedSpace, "encodedSpace")
        rec_m = triple(enc.reconSpace, "reconSpace")
        if enc_m[2] > 1:
            raise self.error(f"3D acquisitions are not supported yet (header encodedSpace/matrixSize/z is "
                             f"{enc_m[2]}); only 2D (multi-slice) data can be buffered")
        lim = _limit(enc.encodingLimits, "kspace_encoding_step_1")
        e1: Optional[tuple[int, int, int]] = None
        if lim is not None:
            lo, hi = int(lim.minimum or 0), int(lim.maximum or 0)
            c = int(lim.center) if lim.center is not None else (lo + hi + 1) // 2
            if lo > hi:
                raise self.error(f"header encodingLimits/kspace_encoding_step_1: minimum {lo} > maximum {hi}")
            if not lo <= c <= hi + 1:
                raise self.error(f"header encodingLimits/kspace_encoding_step_1: center {c} is outside "
                                 f"[{lo}, {hi}]")
            e1 = (lo, hi, c)
        traj = enc.trajectory
        traj_name = str(getattr(traj, "value", traj) or "cartesian").lower()
        units_hint = None
        desc = getattr(enc, "trajectoryDescription", None)
        for up in list(getattr(desc, "userParameterString", None) or []) if desc is not None else []:
            if str(up.name).strip().lower() in _UNIT_PARAM_NAMES:
                value = str(up.value).strip().lower()
                if value not in _UNIT_ALIASES:
                    raise self.error(f"header trajectoryDescription userParameterString {up.name!r} is "
                                     f"{up.value!r}; known units: {sorted(set(_UNIT_ALIASES.values()))}")
                units_hint = _UNIT_ALIASES[value]
        merged, merged_max = self._merged_counters(enc)
        return _Geometry(enc=enc_m, rec=rec_m, enc_fov=fov(enc.encodedSpace), rec_fov=fov(enc.reconSpace),
                         e1_limits=e1, trajectory=traj_name, units_hint=units_hint, merged=merged,
                         merged_max=merged_max)

    def _merged_counters(self, enc: Any) -> tuple[tuple[str, ...], dict[str, int]]:
        """The counters of ``merge`` (``interleaved`` resolved from the header) and their maxima."""
        p: BufferParams = self.params  # type: ignore[assignment]
        out: list[str] = []
        for m in p.merge:
            if m == "interleaved":
                pi = getattr(enc, "parallelImaging", None)
                mode = getattr(pi, "calibrationMode", None) if pi is not None else None
                mode = str(getattr(mode, "value", mode) or "").lower()
                if mode != "interleaved":
                    continue
                dim = getattr(pi, "interleavingDimension", None)
                dim = str(getattr(dim, "value", dim) or "repetition").lower()
                if dim == "average":   # averages always share one k-space (repeated lines are averaged)
                    continue
                if dim not in _KEY_FIELDS:
                    self.log.warning("header parallelImaging/interleavingDimension is %r: not a buffer "
                                     "counter, nothing merged", dim)
                    continue
                if dim == p.frames:
                    continue
                self.log.info("header calibrationMode interleaved along %s: merging the %s "
                              "acquisitions into one k-space", dim, dim)
                m = dim
            if m not in out:
                out.append(m)
        maxima: dict[str, int] = {}
        for m in out:
            lim = _limit(enc.encodingLimits, m)
            if lim is not None and lim.maximum is not None:
                maxima[m] = int(lim.maximum)
        return tuple(out), maxima

    # ------------------------------------------------------------------ grid

    def _grid_ny(self, g: _Geometry) -> tuple[int, int]:
        """(Ny, center e1) of the Cartesian grid."""
        ny = g.enc[1]
        if g.e1_limits is None:
            return ny, ny // 2
        lo, hi, c = g.e1_limits
        need = 2 * max(c - lo, hi - c + 1)
        return max(ny, need), c

    def _grid_nx(self, g: _Geometry) -> int:
        if self.ctx.options.get("readout_oversampling_removed") and g.enc[0] > g.rec[0]:
            return g.rec[0]
        return g.enc[0]

    # ------------------------------------------------------------------ collection

    def _key(self, acq: ismrmrd.Acquisition) -> tuple[Optional[int], ...]:
        p: BufferParams = self.params  # type: ignore[assignment]
        idx = acq.idx
        vals = [int(getattr(idx, f)) for f in _KEY_FIELDS]
        if p.frames != "none":
            vals[_KEY_FIELDS.index(p.frames)] = None  # type: ignore[call-overload]
        for m in (self._geom.merged if self._geom is not None else ()):
            vals[_KEY_FIELDS.index(m)] = None  # type: ignore[call-overload]
        if "average" in p.separate:
            vals.append(int(idx.average))
        return tuple(vals)

    def _frame_value(self, acq: ismrmrd.Acquisition) -> int:
        p: BufferParams = self.params  # type: ignore[assignment]
        return 0 if p.frames == "none" else int(getattr(acq.idx, p.frames))

    def _dropped_kind(self, acq: ismrmrd.Acquisition) -> Optional[str]:
        for flag, what in _DROP_FLAGS.items():
            if acq.is_flag_set(flag):
                return what
        return None

    def process(self, acq: ismrmrd.Acquisition) -> Iterator[KSpaceBuffer]:
        what = self._dropped_kind(acq)
        if what is not None:
            self._dropped[what] = self._dropped.get(what, 0) + 1
            self.log.debug("acquisition %d dropped (%s data)", acq.scan_counter, what)
            yield from self._trigger(acq)
            return
        if self._geom is None:
            self._geom = self._read_header()
        g = self._geom
        scan = int(acq.scan_counter)
        if int(acq.idx.kspace_encode_step_2) > 0:
            raise self.error(f"acquisition {scan}: kspace_encode_step_2 is {acq.idx.kspace_encode_step_2}; "
                             f"3D acquisitions are not supported yet")
        n = int(acq.number_of_samples)
        c = int(acq.active_channels)
        if n <= 0 or c <= 0:
            raise self.error(f"acquisition {scan}: number_of_samples {n} / active_channels {c} must be > 0")
        if self._channels is None:
            self._channels = c
        elif c != self._channels:
            raise self.error(f"acquisition {scan}: active_channels is {c} but earlier acquisitions had "
                             f"{self._channels}")
        if self._noncartesian is None:
            self._noncartesian = g.trajectory not in _CARTESIAN or int(acq.trajectory_dimensions) >= 2
            self.log.info("buffering %s data (header trajectory %s)",
                          "non-Cartesian" if self._noncartesian else "Cartesian", g.trajectory)
        data = np.array(acq.data, dtype=np.complex64, copy=True)
        traj = np.array(acq.traj, dtype=np.float32, copy=True)
        center = int(acq.center_sample)
        e1 = int(acq.idx.kspace_encode_step_1)
        if self._noncartesian:
            if int(acq.trajectory_dimensions) < 2:
                raise self.error(f"acquisition {scan}: trajectory_dimensions is {acq.trajectory_dimensions}; "
                                 f"non-Cartesian ({g.trajectory}) data need at least 2 (kx, ky)")
            if traj.shape[1] > 2 and np.any(np.abs(traj[:, 2:]) > 1e-6):
                raise self.error(f"acquisition {scan}: trajectory has non-zero kz; 3D acquisitions are not "
                                 f"supported yet")
        else:
            if acq.is_flag_set(ismrmrd.ACQ_IS_REVERSE):
                data = data[:, ::-1].copy()
                center = n - 1 - center if n < self._grid_nx(g) else center
            self._check_cartesian(acq, g, n, center, e1)
        cal_only = acq.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION)
        cal_img = acq.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING)
        p: BufferParams = self.params  # type: ignore[assignment]
        in_data = cal_img or not cal_only or (p.acs_in_data and not self._noncartesian)
        rec = _Record(head=acq.getHead(), data=data, traj=traj, e1=e1, center=center,
                      imaging=in_data, calibration=cal_only or cal_img, order=self._order)
        self._order += 1
        key = self._key(acq)
        bucket = self._pending.get(key)
        if bucket is None:
            bucket = self._pending[key] = _Bucket(key=key, first_order=rec.order)
        bucket.frames.setdefault(self._frame_value(acq), []).append(rec)
        yield from self._trigger(acq)

    def _check_cartesian(self, acq: ismrmrd.Acquisition, g: _Geometry, n: int, center: int, e1: int) -> None:
        scan = int(acq.scan_counter)
        ny, c1 = self._grid_ny(g)
        if g.e1_limits is not None:
            lo, hi, _ = g.e1_limits
            if not lo <= e1 <= hi:
                raise self.error(f"acquisition {scan}: kspace_encode_step_1 {e1} is outside the header's "
                                 f"encodingLimits/kspace_encoding_step_1 [{lo}, {hi}]")
        row = e1 - c1 + ny // 2
        if not 0 <= row < ny:
            raise self.error(f"acquisition {scan}: kspace_encode_step_1 {e1} does not fit the encoded matrix "
                             f"y {ny} (centre {c1})")
        nx = self._grid_nx(g)
        if n > nx:
            raise self.error(f"acquisition {scan}: number_of_samples {n} exceeds the readout length {nx} "
                             f"(header encodedSpace x {g.enc[0]}, recon x {g.rec[0]})")
        if n < nx:
            off = nx // 2 - center
            if off < 0 or off + n > nx:
                raise self.error(f"acquisition {scan}: center_sample {center} with number_of_samples {n} "
                                 f"does not fit the readout length {nx}")

    # ------------------------------------------------------------------ triggering

    def _trigger(self, acq: ismrmrd.Acquisition) -> Iterator[KSpaceBuffer]:
        p: BufferParams = self.params  # type: ignore[assignment]
        if p.trigger == "none" or not self._pending:
            return
        flag = {"slice": ismrmrd.ACQ_LAST_IN_SLICE, "phase": ismrmrd.ACQ_LAST_IN_PHASE,
                "repetition": ismrmrd.ACQ_LAST_IN_REPETITION}[p.trigger]
        if not acq.is_flag_set(flag):
            return
        g = self._geom
        if g is not None and g.merged:
            for m in g.merged:   # a merged k-space is complete only with its last piece
                top = g.merged_max.get(m)
                if top is None or int(getattr(acq.idx, m)) < top:
                    return
        dim = _KEY_FIELDS.index(p.trigger)
        value = int(getattr(acq.idx, p.trigger))
        if p.frames == p.trigger:
            keys = [self._key(acq)] if self._key(acq) in self._pending else []
        else:
            keys = [k for k in self._pending if k[dim] is None or k[dim] == value]
        for k in sorted(keys, key=lambda k: self._pending[k].first_order):
            yield self._emit(self._pending.pop(k))

    def flush(self) -> Iterator[KSpaceBuffer]:
        """Emit every pending bucket; an empty stream is an error (a noise-only stream is not)."""
        if not self._pending and self._emitted == 0:
            if self.ctx.options.get("noise_scans", 0) or self._dropped.get("noise"):
                self.log.info("noise-only stream: no k-space buffer to emit")
                return
            dropped = f" (dropped: {self._dropped})" if self._dropped else ""
            raise self.error(f"no imaging acquisitions received{dropped}")
        for k in sorted(self._pending, key=lambda k: self._pending[k].first_order):
            yield self._emit(self._pending[k])
        self._pending.clear()

    # ------------------------------------------------------------------ assembly

    def _emit(self, bucket: _Bucket) -> KSpaceBuffer:
        g = self._geom
        if g is None:  # only possible if buckets exist, which implies a header was read
            raise self.error("internal: bucket without header geometry")
        if self._noncartesian:
            buf = self._assemble_noncartesian(bucket, g)
        else:
            buf = self._assemble_cartesian(bucket, g)
        self._emitted += 1
        self.log.info("emitting buffer slice %d contrast %d repetition %d set %d: %d frame(s), k-space %s",
                      buf.slice, buf.contrast, buf.repetition, buf.set, buf.n_frames, tuple(buf.kspace.shape))
        return buf

    def _common(self, bucket: _Bucket, g: _Geometry, kspace: torch.Tensor,
                ref_headers: list[Any]) -> dict[str, Any]:
        p: BufferParams = self.params  # type: ignore[assignment]
        frame_vals = sorted(bucket.frames)
        times = [float(np.mean([r.head.acquisition_time_stamp for r in bucket.frames[v]])) * TICK_S
                 for v in frame_vals]
        first = bucket.frames[frame_vals[0]][0].head.idx
        n_acq = sum(len(v) for v in bucket.frames.values())
        return dict(
            kspace=kspace.to(self.ctx.device),
            matrix=(g.rec[1], g.rec[0]),
            encoded_matrix=(g.enc[1], g.enc[0]),
            fov_mm=g.enc_fov,
            recon_fov_mm=g.rec_fov,
            slice=int(first.slice), contrast=int(first.contrast), repetition=int(first.repetition),
            set=int(first.set),
            frame_axis=p.frames,
            ref_headers=ref_headers,
            frame_times_s=torch.tensor(times, dtype=torch.float64),
            prewhitened=bool(self.ctx.options.get("prewhitened", False)),
            meta={"frame_indices": frame_vals, "n_acquisitions": n_acq, "trajectory": g.trajectory,
                  "phase": int(first.phase),
                  "prewhitened": int(bool(self.ctx.options.get("prewhitened", False)))},
        )

    def _assemble_cartesian(self, bucket: _Bucket, g: _Geometry) -> KSpaceBuffer:
        ny, c1 = self._grid_ny(g)
        nx = self._grid_nx(g)
        frame_vals = sorted(bucket.frames)
        n_f, n_c = len(frame_vals), int(self._channels or 0)
        k = np.zeros((n_f, n_c, ny, nx), dtype=np.complex64)
        count = np.zeros((n_f, ny, nx), dtype=np.float32)
        cal = np.zeros((n_c, ny, nx), dtype=np.complex64)
        cal_count = np.zeros((ny, nx), dtype=np.float32)
        ref_headers = []
        for f, v in enumerate(frame_vals):
            recs = bucket.frames[v]
            best: Optional[_Record] = None
            for r in recs:
                row = r.e1 - c1 + ny // 2
                n = r.data.shape[1]
                off = 0 if n == nx else nx // 2 - r.center
                if r.imaging:
                    k[f, :, row, off:off + n] += r.data
                    count[f, row, off:off + n] += 1.0
                    if best is None or abs(row - ny // 2) < abs(best.e1 - c1):
                        best = r
                if r.calibration:
                    cal[:, row, off:off + n] += r.data
                    cal_count[row, off:off + n] += 1.0
            ref_headers.append((best if best is not None else recs[len(recs) // 2]).head)
        k /= np.maximum(count, 1.0)[:, None]
        mask = (count > 0).astype(np.float32)
        calibration = None
        if cal_count.any():
            cal /= np.maximum(cal_count, 1.0)[None]
            calibration = self._calibration_block(cal, cal_count > 0)
        fields = self._common(bucket, g, torch.from_numpy(k), ref_headers)
        fields["meta"]["calibration_shape"] = None if calibration is None else list(calibration.shape[1:])
        # sampled extent of the grid (first and last sampled row / column): partial-Fourier handling
        # (rows from the header's encodingLimits when it has them: a lattice that ends one line short
        # of the edge is not partial Fourier)
        rows, cols = np.flatnonzero(count.any(axis=(0, 2))), np.flatnonzero(count.any(axis=(0, 1)))
        if rows.size:
            r0, r1 = int(rows[0]), int(rows[-1])
            if g.e1_limits is not None:
                lo, hi, _ = g.e1_limits
                r0, r1 = lo - c1 + ny // 2, hi - c1 + ny // 2
            fields["meta"]["kspace_sampled"] = [r0, r1, int(cols[0]), int(cols[-1]), ny, nx]
        return KSpaceBuffer(
            mask=torch.from_numpy(mask).to(self.ctx.device),
            calibration=None if calibration is None else torch.from_numpy(calibration).to(self.ctx.device),
            **fields,
        )

    def _calibration_block(self, cal: np.ndarray, sampled: np.ndarray) -> Optional[np.ndarray]:
        """The fully sampled calibration block around the k-space centre
        (:func:`recon_core.trajectories.acs_region`, the project's one rule), or None with a warning
        when the calibration samples do not include the centre."""
        region = tr.acs_region(torch.from_numpy(sampled))
        if region is None:
            rows = np.flatnonzero(sampled.any(axis=1))
            self.log.warning("calibration lines %d..%d do not include the k-space centre (row %d, column "
                             "%d): no calibration block; coil maps will come from the imaging data", rows[0],
                             rows[-1], sampled.shape[0] // 2, sampled.shape[1] // 2)
            return None
        (r0, r1), (c0, c1) = region
        return np.ascontiguousarray(cal[:, r0:r1, c0:c1])

    def _units(self, g: _Geometry, kmax: float) -> str:
        p: BufferParams = self.params  # type: ignore[assignment]
        if p.trajectory_units != "auto":
            return p.trajectory_units
        if g.units_hint is not None:
            return g.units_hint
        return "cycles/sample" if kmax <= 0.5 + 1e-6 else "cycles/fov"

    def _assemble_noncartesian(self, bucket: _Bucket, g: _Geometry) -> KSpaceBuffer:
        p: BufferParams = self.params  # type: ignore[assignment]
        frame_vals = sorted(bucket.frames)
        datas, trajs, ref_headers = [], [], []
        for v in frame_vals:
            recs = [r for r in bucket.frames[v] if r.imaging] or bucket.frames[v]
            datas.append(np.concatenate([r.data for r in recs], axis=1))
            trajs.append(np.concatenate([r.traj[:, :2] for r in recs], axis=0))
            ref_headers.append(recs[len(recs) // 2].head)
        counts = [d.shape[1] for d in datas]
        if len(set(counts)) > 1:
            detail = ", ".join(f"{p.frames} {v}: {m}" for v, m in zip(frame_vals, counts))
            sl = bucket.frames[frame_vals[0]][0].head.idx.slice
            raise self.error(f"non-Cartesian frames of slice {sl} "
                             f"have different sample counts ({detail}); every frame needs the same number "
                             f"of samples")
        traj = np.stack(trajs).astype(np.float64)               # [F, M, 2] (kx, ky)
        ny, nx = g.rec[1], g.rec[0]
        kmax_x = float(np.abs(traj[..., 0]).max()) if traj.size else 0.0
        kmax_y = float(np.abs(traj[..., 1]).max()) if traj.size else 0.0
        units = self._units(g, max(kmax_x, kmax_y))
        if units == "cycles/fov":
            if kmax_x > nx or kmax_y > ny:
                self.log.warning("trajectory max |kx| %.4g, |ky| %.4g exceed the recon matrix (%d, %d): "
                                 "check the trajectory units", kmax_x, kmax_y, nx, ny)
            scale = np.array([2 * math.pi / nx, 2 * math.pi / ny])
        elif units == "cycles/sample":
            scale = np.array([2 * math.pi, 2 * math.pi])
        else:
            scale = np.array([1.0, 1.0])
        rad = traj * scale                                       # still (kx, ky)
        traj_t = torch.from_numpy(np.ascontiguousarray(rad[..., ::-1].transpose(0, 2, 1))).to(torch.float32)
        dcf = None
        method = p.dcf
        if method == "auto":   # the project's default rule (ramp for radial, Pipe–Menon otherwise)
            dcf = tr.default_dcf(traj_t, (ny, nx), kind=g.trajectory, n_iter=p.dcf_iterations)
            method = "ramp" if g.trajectory in tr.RADIAL_KINDS else "pipe_menon"
        elif method == "ramp":
            dcf = tr.ramp_dcf(traj_t, (ny, nx))
        elif method == "pipe_menon":
            dcf = tr.pipe_menon_dcf(traj_t, (ny, nx), n_iter=p.dcf_iterations)
        fields = self._common(bucket, g, torch.from_numpy(np.stack(datas)), ref_headers)
        fields["meta"].update({"trajectory_units": units, "dcf": method})
        return KSpaceBuffer(
            trajectory=traj_t.to(self.ctx.device),
            dcf=None if dcf is None else dcf.to(torch.float32).to(self.ctx.device),
            **fields,
        )
