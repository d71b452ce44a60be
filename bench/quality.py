"""Quality benchmark: PSNR / SSIM / NRMSE, wall time and peak memory per case × method (and BART).

Run::

    python -m bench.quality --small            # tiny sizes and iterations, a quick check (~1-2 min)
    python -m bench.quality                    # full set: 128², 16 frames, 12 coils (≲ 30 min on 2 cores)
    python -m bench.quality --methods zero_filled cg_sense --cases radial13 brain_r4 --no-bart

(later also ``torchgadgets bench quality …`` with the same options).

Cases (fixed seeds; cine from :func:`recon_core.phantoms.simulate_scan`, 128², 16 frames, 12 coils):

* ``radial13`` / ``radial21`` / ``radial8`` / ``radial5``: golden-angle radial, 13 / 21 / 8 / 5 spokes per
  frame, 2× readout oversampling;
* ``cart_vd8``: Cartesian, variable density R = 8 with 8 ACS lines per frame;
* ``spiral4of32``: variable-density spiral, 4 of 32 interleaves per frame;
* ``brain_r4`` / ``brain_r6``: the real 16-channel brain (``/work/shared/data``), uniform R = 4 / 6 with
  24 ACS lines (always 128²); reference = the fully sampled file through the ``default`` chain.

Every one of our rows is what a user gets: the case is written as an ISMRMRD file and reconstructed
by ``run_offline`` (the path of ``torchgadgets run``) through the shipped chain for its kind
(``default`` for Cartesian, ``radial_cine_cg_sense``, ``spiral_cine_cg_sense``) with the recon gadget
running the method — noise prewhitening and the chain's ``coil_estimate`` maps included. Metrics
compare magnitudes after one least-squares scale inside the body / support. ``time s`` is the
recon gadget's time (``ReconTime_s``); the JSON also has the whole chain's wall time. When ``bart`` is on PATH (and not ``--no-bart``) the same cases are reconstructed
with ``bart pics`` using maps from ``bart ecalib`` (see :mod:`bench.bart`), and the table shows our
best method of a kind ÷ the BART variant of that kind, for PSNR and time.

Results go to a table on stdout and to JSON (``--json``, default ``bench/results/quality.json``).
Timings are wall time in this process (noisy on shared machines); compare them only as the ratios
printed in the same run. Simulated scans are cached in ``bench/results/cache`` (``--no-cache``).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import platform
import shlex
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

Tensor = torch.Tensor

BRAIN_PATH = Path("/work/shared/data/brain_invivo_16ch_128_cartesian.h5")
DEFAULT_JSON = Path("bench/results/quality.json")
CACHE_DIR = Path("bench/results/cache")

#: sizes of the cine phantom cases
FULL = dict(matrix=128, frames=16, coils=12, brain=128, calib=24)
SMALL = dict(matrix=64, frames=4, coils=8, brain=64, calib=16)

#: name → (kind, simulate_scan keyword arguments at full size; ACS lines scale with the matrix)
CASES: dict[str, dict[str, Any]] = {
    "radial13": dict(kind="radial", spokes_per_frame=13, desc="golden-angle radial, 13 spokes/frame"),
    "radial21": dict(kind="radial", spokes_per_frame=21, desc="golden-angle radial, 21 spokes/frame"),
    "radial8": dict(kind="radial", spokes_per_frame=8, desc="golden-angle radial, 8 spokes/frame"),
    "radial5": dict(kind="radial", spokes_per_frame=5, desc="golden-angle radial, 5 spokes/frame"),
    "cart_vd8": dict(kind="cartesian", accel=8, acs_lines=8, mask_kind="variable_density",
                     desc="Cartesian variable density R=8, 8 ACS lines/frame"),
    "spiral4of32": dict(kind="spiral", interleaves=32, interleaves_per_frame=4,
                        desc="VD spiral, 4 of 32 interleaves/frame"),
    "brain_r4": dict(kind="brain", accel=4, acs_lines=24, desc="in-vivo brain 16 ch, uniform R=4, 24 ACS"),
    "brain_r6": dict(kind="brain", accel=6, acs_lines=24, desc="in-vivo brain 16 ch, uniform R=6, 24 ACS"),
}

#: which BART variant kind each of our methods competes with (methods not listed: no BART ratio)
METHOD_KIND: dict[str, str] = {
    "cg_sense": "l2",
    "l1_wavelet": "l1",
    "grasp": "tv_t",
    "l_plus_s": "lowrank",
    "kt_slr": "lowrank",
}

# Methods run with their defaults and ``preset: auto`` — ``paper`` on CUDA, ``fast`` on the CPU (e.g. TD-DIP:
# 1500 steps × 64 channels instead of the paper's 10 000 × 128) — exactly as a chain runs them; the preset
# used is in every row.

#: left out of the default method list on CPU (minutes per case even with the fast preset); name them to run them
SLOW_ON_CPU: tuple[str, ...] = ("tdip",)

#: integer parameters whose name contains one of these words are capped in ``--small`` mode
_ITER_WORDS = ("iter", "step", "epoch", "round", "outer", "inner", "cycle")
SMALL_ITER_CAP = 10
SMALL_STEP_CAP = 40   # for long fits (default > 200 steps, e.g. network fitting)
BART_ITERS_SMALL = 10

#: metric options used for every number in the table (the project default, BRIEFS §7)
METRIC_OPTIONS: dict[str, Any] = {}


# ----------------------------------------------------------------------------------------------
# cases


@dataclass
class Case:
    """One benchmark case: an ISMRMRD file the chains read, its ground truth, and what BART needs."""

    name: str
    desc: str
    input_path: Path                    # the ISMRMRD file reconstructed by the chain
    chain: str                          # the shipped chain for this kind of data
    kspace: Tensor                      # [F, C, Ny, Nx] or [F, C, M] (for BART)
    ground_truth: Tensor                # [F, Ny, Nx] reference (metrics compare magnitudes)
    support: Tensor                     # [Ny, Nx] or [F, Ny, Nx]: where the LS scale is fitted
    mask: Optional[Tensor] = None       # [F, Ny, Nx] (Cartesian)
    trajectory: Optional[Tensor] = None  # [F, 2, M] radians/voxel
    dcf: Optional[Tensor] = None        # [F, M]
    calib_kspace: Optional[Tensor] = None   # [C, Ny, Nx] zero-filled calibration k-space (Cartesian, for ecalib)
    calib_size: tuple[int, int] = (24, 24)
    sim_seconds: float = 0.0
    maps_note: str = ("coil maps estimated by the chain's coil_estimate gadget (the same for every method; "
                      "not the true maps)")

    @property
    def n_frames(self) -> int:
        return int(self.kspace.shape[0])

    @property
    def image_shape(self) -> tuple[int, int]:
        return int(self.ground_truth.shape[-2]), int(self.ground_truth.shape[-1])

    @property
    def is_cartesian(self) -> bool:
        return self.trajectory is None


#: the shipped chain each kind of data is reconstructed with (recon method replaced per row)
CHAIN_FOR_KIND = {"cartesian": "default", "brain": "default", "radial": "radial_cine_cg_sense",
                  "spiral": "spiral_cine_cg_sense"}


def _sizes(small: bool) -> dict[str, int]:
    return dict(SMALL if small else FULL)


def _simulate_cached(case: str, kw: dict[str, Any], seed: int, use_cache: bool) -> tuple[dict[str, Tensor], Path]:
    """simulate_scan(...) written as an ISMRMRD file + the tensors we need, cached on disk by its arguments."""
    from recon_core.phantoms import simulate_scan

    key = "_".join(f"{k}{v}" for k, v in sorted(kw.items())) + f"_seed{seed}_prewhitened"
    stem = CACHE_DIR / f"{case}_{hashlib.sha1(key.encode()).hexdigest()[:12]}"
    pt, h5 = stem.with_suffix(".pt"), stem.with_suffix(".h5")
    if use_cache and pt.is_file() and h5.is_file():
        try:
            d = torch.load(pt, weights_only=True)
            if d.get("_key") == key:   # type: ignore[union-attr]
                return d, h5
        except Exception:   # a corrupt cache entry is simply recomputed
            pass
    args = dict(kw)
    kind = args.pop("kind")
    s = simulate_scan(kind, seed=seed, **args)
    d, h5 = write_scan_for_chain(s, h5, f"bench_{case}", use_cache)
    if use_cache:
        torch.save({**d, "_key": key}, pt)   # type: ignore[dict-item]
    return d, h5


def write_scan_for_chain(s: Any, h5: Path, protocol_name: str,
                         in_place: bool = True) -> tuple[dict[str, Tensor], Path]:
    """Write the simulated scan ``s`` as an ISMRMRD file and return the tensors the benchmark scores with.

    The noise gadget prewhitens with the scan's noise covariance, so the chain's image is the object
    times the whitened receive profile ‖W S(r)‖ (SNR units, as in Gadgetron); that is the reference a
    perfect reconstruction reaches (``ground_truth``), and BART gets the same prewhitened k-space
    (``kspace``). ``in_place=False`` writes to a fresh temporary folder instead of ``h5`` (no cache).
    """
    from gadgets.ismrmrd_io import scan_to_ismrmrd, write_ismrmrd
    from recon_core.coils import noise_covariance, prewhiten, prewhitening_matrix

    W = prewhitening_matrix(noise_covariance(s.noise))
    profile = torch.linalg.vector_norm(prewhiten(s.coil_maps, W, coil_dim=0), dim=0)
    d = {"kspace": prewhiten(s.kspace, W, coil_dim=1), "ground_truth": s.ground_truth * profile,
         "body_mask": s.body_mask}
    if s.mask is not None:
        d["mask"] = s.mask
    if s.trajectory is not None:
        d["trajectory"] = s.trajectory
    if not in_place:
        import tempfile

        h5 = Path(tempfile.mkdtemp(prefix="tg_bench_")) / h5.name
    h5.parent.mkdir(parents=True, exist_ok=True)
    header, acqs = scan_to_ismrmrd(s, protocol_name=protocol_name)
    write_ismrmrd(h5, header, acqs, ground_truth=s.ground_truth, overwrite=True)
    return d, h5


def _bart_calibration(kavg: Tensor, sampled: Tensor, calib_cap: int) -> tuple[Tensor, tuple[int, int]]:
    """For ``bart ecalib``: the zero-filled time-averaged k-space and the size of its largest fully
    sampled centred block (capped at ``calib_cap``)."""
    from recon_core.coils import calibration_region

    found = calibration_region(kavg, mask=sampled)
    size = (min(found.shape[-2], calib_cap), min(found.shape[-1], calib_cap))
    return kavg * sampled.to(kavg.dtype), size


def espirit_kernel(sy: int, sx: int) -> int:
    """ESPIRiT kernel size for a ``sy × sx`` calibration block: 6 (BART's default) or less if it must."""
    return max(2, min(6, sy - 2, sx - 2))


def _phantom_case(name: str, spec: dict[str, Any], small: bool, seed: int, frames: Optional[int],
                  use_cache: bool) -> Case:
    from recon_core.trajectories import default_dcf

    sz = _sizes(small)
    n = sz["matrix"]
    kw: dict[str, Any] = {k: v for k, v in spec.items() if k != "desc"}
    kw.update(matrix=n, n_frames=int(frames or sz["frames"]), n_coils=sz["coils"])
    if kw["kind"] == "cartesian":
        kw["readout_oversampling"] = 1   # as the scanner's data after readout-oversampling removal
        kw["acs_lines"] = max(6, round(kw["acs_lines"] * n / 128))
    t0 = time.perf_counter()
    d, h5 = _simulate_cached(name, kw, seed, use_cache)
    k = d["kspace"]
    f, c = k.shape[:2]
    case = Case(name=name, desc=spec["desc"] + f" ({n}², {f} frames, {c} coils)", input_path=h5,
                chain=CHAIN_FOR_KIND[kw["kind"]], kspace=k, ground_truth=d["ground_truth"],
                support=d["body_mask"], sim_seconds=time.perf_counter() - t0)
    if kw["kind"] == "cartesian":
        mask = d["mask"]
        case.mask = mask
        cnt = mask.sum(0)
        kavg = k.sum(0) / cnt.clamp_min(1)[None].to(k.dtype)
        case.calib_kspace, case.calib_size = _bart_calibration(kavg, cnt > 0, sz["calib"])
    else:
        case.trajectory = d["trajectory"]
        case.dcf = default_dcf(case.trajectory, (n, n), kind=kw["kind"])
        case.calib_size = (sz["calib"], sz["calib"])
    return case


def load_brain(path: Path = BRAIN_PATH) -> Tensor:
    """The fully sampled brain k-space ``[C, Ny, Nx]`` complex64 (centred, DC at N//2)."""
    rows: dict[int, np.ndarray] = {}
    try:   # read-only and without an HDF5 lock, so parallel readers do not block each other
        import h5py

        with h5py.File(path, "r", locking=False) as h5:
            data = h5["dataset/data"][:]
        for rec in data:
            hd = rec["head"]
            c, m = int(hd["active_channels"]), int(hd["number_of_samples"])
            v = rec["data"].view(np.float32).reshape(c, m, 2)
            rows[int(hd["idx"]["kspace_encode_step_1"])] = v[..., 0] + 1j * v[..., 1]
    except (OSError, KeyError, TypeError):
        import ismrmrd

        ds = ismrmrd.Dataset(str(path), "/dataset", create_if_needed=False)
        for i in range(ds.number_of_acquisitions()):
            a = ds.read_acquisition(i)
            rows[int(a.idx.kspace_encode_step_1)] = np.asarray(a.data)
        ds.close()
    ny = max(rows) + 1
    c, nx = next(iter(rows.values())).shape
    k = np.zeros((c, ny, nx), dtype=np.complex64)
    for y, v in rows.items():
        k[:, y, :] = v
    return torch.from_numpy(k)


def _brain_case(name: str, spec: dict[str, Any], use_cache: bool) -> Case:
    """The real brain (always 128²: one 2-D slice is quick), its retrospectively undersampled lines
    written as an ISMRMRD file; reference = the fully sampled file through the ``default`` chain (the
    SENSE combination with its own ESPIRiT maps: what the chain gives without undersampling)."""
    from gadgets.ismrmrd_io import read_ismrmrd, write_ismrmrd
    from gadgets.offline import run_offline
    from recon_core.trajectories import uniform_mask

    k = load_brain()
    c, n, _ = k.shape
    acs = int(spec["acs_lines"])
    mask = uniform_mask(n, n, int(spec["accel"]), acs, n_frames=1)   # [1, N, N]
    h5 = CACHE_DIR / f"{name}_r{spec['accel']}_acs{acs}.h5"
    if not (use_cache and h5.is_file()):
        header, acqs, _ = read_ismrmrd(BRAIN_PATH)
        keep = [a for a in acqs if mask[0, a.idx.kspace_encode_step_1, 0] > 0]
        h5.parent.mkdir(parents=True, exist_ok=True)
        write_ismrmrd(h5, header, keep, overwrite=True)
    ku = (k * mask[0].to(k.dtype))[None]
    full = run_offline("default", BRAIN_PATH, None, device="cpu")
    ref = torch.from_numpy(np.asarray(full.images[0].data[0, 0], dtype=np.float32))
    scale = float(ref.max())
    calib_k, size = _bart_calibration(ku[0] / scale, mask[0] > 0, FULL["calib"])
    return Case(name=name, desc=spec["desc"] + f" ({n}², {c} coils)", input_path=h5, chain="default",
                kspace=ku / scale, ground_truth=(ref / scale)[None], support=ref > 0.1 * ref.max(), mask=mask,
                calib_kspace=calib_k, calib_size=size,
                maps_note="coil maps estimated by the chain's coil_estimate gadget; reference = the fully sampled "
                          "data through the default chain (BART: its ecalib maps on the same ACS)")


def make_case(name: str, small: bool = False, seed: int = 0, frames: Optional[int] = None,
              use_cache: bool = True) -> Case:
    """Build benchmark case ``name`` (see :data:`CASES`)."""
    if name not in CASES:
        raise KeyError(f"unknown case {name!r}; available: {list(CASES)}")
    spec = CASES[name]
    if spec["kind"] == "brain":
        return _brain_case(name, spec, use_cache)
    return _phantom_case(name, spec, small, seed, frames, use_cache)


# ----------------------------------------------------------------------------------------------
# measurement


class PeakMemory:
    """Peak memory while a block runs, measured without changing how fast the block runs.

    CUDA: ``torch.cuda.max_memory_allocated`` after a reset (tensor allocations only). CPU: the
    kernel's resident-set high-water mark (``VmHWM``), reset at entry through ``/proc/self/clear_refs``
    — exact, no sampling; where that reset is refused, a thread samples the RSS every 5 ms instead
    (short spikes may be missed). The peak minus the RSS at entry is reported; ``malloc_trim`` at entry
    returns the heap freed by earlier runs, so their cached memory does not hide this run's.

    The allocator is left as a user's process has it: an earlier version set glibc's
    ``M_MMAP_THRESHOLD`` to 64 KiB, which made every tensor an ``mmap`` and slowed the iterative
    methods 2–2.5× (grasp on a 96² Cartesian cine: 2.3 s against 0.9–1.1 s), so times were not what
    ``torchgadgets run`` gives.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_mib = float("nan")
        self.method = ""
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._rss: Callable[[], int] = _rss_reader()

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated − allocated at start"
            return self
        _release_free_heap()
        self._base = self._rss()
        self._peak = self._base
        self._hwm = _reset_high_water_mark()
        if self._hwm:
            self.method = "kernel RSS high-water mark (VmHWM, reset at start) − RSS at start (malloc_trim first)"
            return self
        self.method = (f"process RSS sampled every 5 ms ({_RSS_SOURCE}) − RSS at start "
                       "(malloc_trim before each run)")
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            r = self._rss()
            if r > self._peak:
                self._peak = r

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mib = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
            return
        if self._hwm:
            self._peak = max(self._peak, _high_water_mark())
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
        self._peak = max(self._peak, self._rss())
        self.peak_mib = (self._peak - self._base) / 2**20


_RSS_SOURCE = ""


def _high_water_mark() -> int:
    """``VmHWM`` of this process in bytes (0 where /proc is not available)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _reset_high_water_mark() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux ≥ 4.0: write 5 to ``/proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return _high_water_mark() > 0


def _release_free_heap() -> None:
    """Return the heap freed by earlier runs to the kernel (glibc ``malloc_trim(0)``), so that an RSS
    delta means something; no-op where glibc is not available."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss_reader() -> Callable[[], int]:
    global _RSS_SOURCE
    try:
        import psutil   # optional

        proc = psutil.Process()
        _RSS_SOURCE = "psutil"
        return lambda: int(proc.memory_info().rss)
    except ImportError:
        page = os.sysconf("SC_PAGE_SIZE")
        _RSS_SOURCE = "/proc/self/statm"

        def read() -> int:
            with open("/proc/self/statm") as fh:
                return int(fh.read().split()[1]) * page
        return read


def _metrics(recon: Tensor, case: Case) -> dict[str, float]:
    """PSNR / SSIM / NRMSE of ``|recon|`` against the case's reference after one least-squares scale
    inside its support (prewhitened chain output is in noise units; BART's in the data's units)."""
    from recon_core.metrics import nrmse, psnr, scale_to_reference, ssim

    r = recon.detach().to("cpu")
    if not bool(torch.isfinite(torch.view_as_real(r) if r.is_complex() else r).all()):
        return {"psnr": float("nan"), "ssim": float("nan"), "nrmse": float("nan")}
    g = case.ground_truth.abs()
    x = scale_to_reference(r.abs(), g, case.support)
    return {"psnr": float(psnr(x, g, **METRIC_OPTIONS)), "ssim": float(ssim(x, g, **METRIC_OPTIONS)),
            "nrmse": float(nrmse(x, g, **METRIC_OPTIONS)),
            "_images": x.reshape(g.shape).numpy()}   # for the figure; keys starting "_" stay out of the JSON


def method_overrides(name: str, small: bool, extra: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Parameter overrides for method ``name``: small-mode iteration caps (none in full mode: the
    method's own defaults and preset, as a chain runs it), then the user's."""
    from recon_core.methods import get_method

    cls = get_method(name)
    out: dict[str, Any] = {}
    if small:
        effective = cls(device="cpu").params   # the CPU preset's values (small mode is a CPU check)
        for f in dataclasses.fields(cls.Params):
            default = getattr(effective, f.name)
            if (isinstance(default, int) and not isinstance(default, bool) and default > 1
                    and not f.name.lower().startswith("lr")
                    and any(w in f.name.lower() for w in _ITER_WORDS)):
                cap = SMALL_STEP_CAP if default > 200 else SMALL_ITER_CAP
                out[f.name] = min(default, cap)
    out.update(extra or {})
    return out


def chain_for(case: Case, name: str, params: dict[str, Any]):
    """The case's shipped chain with its recon gadget running method ``name`` with ``params``, on top of
    the recon parameters a user of ``name`` gets from a shipped chain: the case chain's own when it
    already runs ``name`` (e.g. ``default``'s ``cg_sense`` with ``lam: 0.01``), else those of the method's
    own chain for this trajectory (``<kind>_cine_<name>``, e.g. ``spiral_cine_inr``'s ``eps``), method
    parameters only (no preliminary series or other gadget options)."""
    import copy

    from gadgets.stream.chain import load_chain

    spec = copy.deepcopy(load_chain(case.chain))
    for g in spec.gadgets:
        if g.gadget == "recon":
            runs_it = (g.params or {}).get("method", "cg_sense") == name
            own = dict(g.params or {}) if runs_it else _method_chain_params(case.chain, name)
            g.params = {**own, "method": name, **params}
    spec.name = f"{case.chain}+{name}"
    return spec


def _method_chain_params(case_chain: str, name: str) -> dict[str, Any]:
    """Method parameters of method ``name``'s shipped chain for the trajectory of ``case_chain`` ({} if none)."""
    import dataclasses as dc

    from gadgets.stream.chain import CHAIN_EXTENSIONS, default_chains_dir, load_chain
    from recon_core.methods import available_methods, get_method

    kind = {chain: kind for kind, chain in CHAIN_FOR_KIND.items() if kind != "brain"}.get(case_chain)
    own = f"{kind}_cine_{name}"
    shipped = default_chains_dir()
    if kind is None or name not in available_methods() or not any(
            (shipped / (own + ext)).is_file() for ext in CHAIN_EXTENSIONS):
        return {}
    fields = {f.name for f in dc.fields(get_method(name).Params)}
    for g in load_chain(own).gadgets:
        if g.gadget == "recon" and (g.params or {}).get("method") == name:
            return {k: v for k, v in (g.params or {}).items() if k in fields}
    return {}


def run_method(name: str, case: Case, device: torch.device, small: bool = False, seed: int = 0,
               overrides: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Reconstruct ``case`` with our method ``name`` through the case's chain (``run_offline``, the
    path of ``torchgadgets run``); one result row (metrics, chain and recon time, memory)."""
    from gadgets.offline import run_offline

    params = method_overrides(name, small, overrides)
    if seed:
        params.setdefault("seed", seed)
    row: dict[str, Any] = {"case": case.name, "method": name, "source": "ours", "kind": METHOD_KIND.get(name, ""),
                           "params": {k: v for k, v in params.items()}, "device": str(device),
                           "chain": case.chain}
    try:
        spec = chain_for(case, name, params)
        with PeakMemory(device) as mem:
            res = run_offline(spec, case.input_path, None, device=str(device))
        x = torch.from_numpy(np.stack([np.asarray(im.data[0, 0], dtype=np.float32) for im in res.images]))
        meta = res.images[0].attribute_string if res.images else ""
        row.update(_metrics(x, case))
        recon_s = float(_meta_value(meta, "ReconTime_s") or "nan")   # one slice per case: one recon call
        row.update(seconds=recon_s, chain_seconds=res.wall_s, peak_mib=mem.peak_mib, memory_method=mem.method,
                   preset=_meta_value(meta, "ReconPreset"), status="ok")
    except Exception as exc:   # one failing method must not end the benchmark
        row.update(psnr=float("nan"), ssim=float("nan"), nrmse=float("nan"), seconds=float("nan"),
                   peak_mib=float("nan"), status=f"error: {type(exc).__name__}: {exc}"[:300])
        row["traceback"] = traceback.format_exc(limit=6)
    return row


def _meta_value(attribute_xml: str, name: str) -> str:
    """The first value of meta attribute ``name`` in an ISMRMRD image's attribute string ("" if none)."""
    import re

    m = re.search(rf"<name>{re.escape(name)}</name>\s*<value>([^<]*)</value>", attribute_xml or "")
    return m.group(1) if m else ""


def run_bart_case(case: Case, small: bool, variants: Sequence[str] | None = None) -> tuple[list[dict[str, Any]], str]:
    """All BART variants on ``case`` (maps by ``bart ecalib``). Returns rows and a one-line note."""
    from bench import bart as B

    rows: list[dict[str, Any]] = []
    names = list(variants or B.BART_VARIANTS)
    notes = []
    with B.BartSession() as sess:
        try:
            if case.is_cartesian:
                assert case.calib_kspace is not None
                maps, call = sess.ecalib(case.calib_kspace, case.calib_size,
                                         extra=("-k", "{0}:{0}:1".format(espirit_kernel(*case.calib_size))))
                maps_s = call.seconds
                notes.append(f"bart ecalib -r {case.calib_size[1]}:{case.calib_size[0]} on the same ACS")
                scale: complex = 1.0
            else:
                assert case.trajectory is not None and case.dcf is not None
                maps, calls = sess.ecalib_noncart(case.kspace, case.trajectory, case.dcf, case.image_shape,
                                                  calib=case.calib_size[0])
                maps_s = sum(c.seconds for c in calls)
                notes.append(f"maps: DCF-weighted bart nufft -a of all frames, bart fft -u, bart ecalib -r "
                             f"{case.calib_size[0]}")
                # conventions round trip: bart nufft vs our NUFFT on the ground truth
                from recon_core.operators import Nufft

                ours = Nufft(case.trajectory, case.image_shape)(case.ground_truth[:, None])[:, 0]
                scale, err = sess.nufft_scale(case.ground_truth, case.trajectory, ours)
                notes.append(f"bart nufft = {abs(scale):.4g}·e^(i{math.degrees(np.angle(scale)):+.1f}°) × ours, "
                             f"rel. residual {err:.1e}")
                if err > 0.05:
                    notes.append("WARNING: BART NUFFT does not match ours — trajectory units/axes suspect")
        except B.BartError as exc:
            return [], f"BART maps failed: {exc}"
        for name in names:
            v = B.BART_VARIANTS[name]
            row: dict[str, Any] = {"case": case.name, "method": name, "source": "bart", "kind": v.kind,
                                   "params": {"args": " ".join(v.args), "note": v.note,
                                              "iters": BART_ITERS_SMALL if small else "default"},
                                   "device": "cpu (bart)", "maps_seconds": maps_s}
            if v.temporal and case.n_frames == 1:
                continue
            try:
                x, call = sess.pics(case.kspace, maps, v.args, traj=case.trajectory,
                                    iters=BART_ITERS_SMALL if small else None, tag=name)
                # BART's NUFFT is s × ours, so its image is ours / s: undo with the measured s
                x = x * complex(scale)
                row.update(_metrics(x, case))
                row.update(seconds=call.seconds, peak_mib=call.peak_rss_mib,
                           memory_method="peak RSS of the bart process (its VmHWM, polled every 5 ms)", status="ok",
                           command="bart " + " ".join(a if "/" not in a else Path(a).name for a in call.args))
            except B.BartError as exc:
                row.update(psnr=float("nan"), ssim=float("nan"), nrmse=float("nan"), seconds=float("nan"),
                           peak_mib=float("nan"), status=f"error: {exc}"[:300])
            rows.append(row)
    return rows, "; ".join(notes)


def run_quality(methods: Sequence[str], cases: Sequence[str], device: str | torch.device = "auto",
                small: bool = False, bart: bool = True, *, seed: int = 0, frames: Optional[int] = None,
                use_cache: bool = True,
                overrides: Optional[dict[str, dict[str, Any]]] = None,
                log: Optional[Callable[[str], None]] = None,
                figure: Optional[Path] = None) -> list[dict[str, Any]]:
    """Run every method (and BART when ``bart`` and available) on every case; return result rows.

    Each row: ``case, method, source ('ours'|'bart'), kind, psnr, ssim, nrmse, seconds, peak_mib,
    status, params`` plus case information (``case_desc, maps_note``).
    """
    from bench.bart import bart_available
    from recon_core.device import resolve_device

    dev = resolve_device(device)
    say = log or (lambda s: print(s, file=sys.stderr, flush=True))
    use_bart = bool(bart) and bart_available()
    rows: list[dict[str, Any]] = []
    references: dict[str, tuple[str, np.ndarray]] = {}
    for cname in cases:
        t0 = time.perf_counter()
        case = make_case(cname, small=small, seed=seed, frames=frames, use_cache=use_cache)
        references[cname] = (case.desc, case.ground_truth.abs().numpy())
        say(f"[{cname}] {case.desc}: data {case.sim_seconds:.1f} s "
            f"({time.perf_counter() - t0:.1f} s total)")
        info = {"case_desc": case.desc, "maps_note": case.maps_note}
        for m in methods:
            row = run_method(m, case, dev, small=small, seed=seed, overrides=(overrides or {}).get(m))
            row.update(info)
            rows.append(row)
            say(f"[{cname}] {m:<12} {row['status'] if row['status'] != 'ok' else ''}"
                f"PSNR {row['psnr']:.2f} dB, {row['seconds']:.1f} s")
        if use_bart:
            brows, note = run_bart_case(case, small)
            for r in brows:
                r.update(info, bart_note=note)
                rows.append(r)
                say(f"[{cname}] {r['method']:<12} {r['status'] if r['status'] != 'ok' else ''}"
                    f"PSNR {r['psnr']:.2f} dB, {r['seconds']:.1f} s")
            if not brows:
                rows.append({"case": cname, "method": "bart", "source": "bart", "status": note, **info})
                say(f"[{cname}] {note}")
    _add_ratios(rows)
    if figure is not None:
        write_figure(rows, references, figure, say)
    return rows


def write_figure(rows: Sequence[dict[str, Any]], references: dict[str, tuple[str, np.ndarray]], path: Path,
                 say: Callable[[str], None] = print) -> Optional[Path]:
    """The labelled comparison figure: one block per case (the middle frame of our methods and of
    BART's best row, its error map and the x-t profile through the most moving image row, PSNR in
    each panel), reference first."""
    from gadgets.preview import panels_for, write_comparison_figure

    blocks = []
    for cname, (desc, ref) in references.items():
        recons = []
        bart = [r for r in rows if r["case"] == cname and r.get("source") == "bart" and "_images" in r]
        best_bart = max(bart, key=lambda r: r.get("psnr", float("-inf")), default=None)
        for r in rows:
            if r["case"] != cname or "_images" not in r or (r.get("source") == "bart" and r is not best_bart):
                continue
            label = r["method"] if r.get("source") != "bart" else f"BART {r['method']}"
            recons.append((label, r["_images"], r.get("psnr")))
        if recons:
            frame = ref.shape[0] // 2 if ref.ndim == 3 else 0
            blocks.append((f"{cname}: {desc} (frame {frame})", panels_for(ref, recons, frame=frame)))
    if not blocks:
        return None
    out = write_comparison_figure(blocks, path, note="magnitude, each row windowed like its reference; "
                                                     "error maps x5; PSNR per frame, mean over frames")
    say(f"figure: {out}")
    return out


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    """Same-run ratios: time ÷ cg_sense time of the case; for each BART row the best of ours of the
    same kind (highest PSNR) ÷ BART, for PSNR (dB ratio and difference) and time."""
    by_case: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_case.setdefault(r["case"], []).append(r)
    for case_rows in by_case.values():
        ok = [r for r in case_rows if r.get("status") == "ok"]
        ref = next((r for r in ok if r["method"] == "cg_sense"), None)
        for r in ok:
            r["time_vs_cg_sense"] = r["seconds"] / ref["seconds"] if ref and ref["seconds"] > 0 else None
        for b in ok:
            if b["source"] != "bart":
                continue
            ours = [r for r in ok if r["source"] == "ours" and r.get("kind") == b["kind"]
                    and math.isfinite(r["psnr"])]
            if not ours:
                continue
            best = max(ours, key=lambda r: r["psnr"])
            b["vs_ours"] = {"method": best["method"], "psnr_ratio": best["psnr"] / b["psnr"],
                            "psnr_diff_db": best["psnr"] - b["psnr"], "time_ratio": best["seconds"] / b["seconds"]}


# ----------------------------------------------------------------------------------------------
# output


def _f(v: Any, fmt: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    return format(v, fmt)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown tables: one row per case × method, then the ours ÷ BART ratios (if any)."""
    head = ("| case | method | PSNR dB | SSIM | NRMSE | time s | t/t(cg_sense) | peak MiB | status |",
            "|---|---|---:|---:|---:|---:|---:|---:|---|")
    lines = list(head)
    for r in rows:
        if "psnr" not in r:
            lines.append(f"| {r['case']} | {r['method']} | — | — | — | — | — | — | {r.get('status', '')} |")
            continue
        status = r.get("status", "")
        lines.append(f"| {r['case']} | {r['method']} | {_f(r['psnr'], '.2f')} | {_f(r['ssim'], '.4f')} | "
                     f"{_f(r['nrmse'], '.4f')} | {_f(r['seconds'], '.2f')} | {_f(r.get('time_vs_cg_sense'), '.2f')} | "
                     f"{_f(r['peak_mib'], '.0f')} | {'ok' if status == 'ok' else status[:70]} |")
    ratios = [r for r in rows if r.get("vs_ours")]
    if ratios:
        lines += ["", "Ours ÷ BART (best of our methods of the same kind, by PSNR; same run):", "",
                  "| case | kind | ours | BART | PSNR ours/BART | ΔPSNR dB | time ours/BART |",
                  "|---|---|---|---|---:|---:|---:|"]
        for b in ratios:
            v = b["vs_ours"]
            lines.append(f"| {b['case']} | {b['kind']} | {v['method']} | {b['method']} | {v['psnr_ratio']:.3f} | "
                         f"{v['psnr_diff_db']:+.2f} | {v['time_ratio']:.2f} |")
    return "\n".join(lines)


def machine_info(device: torch.device) -> dict[str, Any]:
    """Cores, torch threads, device and versions, for the printout and the JSON."""
    info: dict[str, Any] = {"host": platform.node(), "platform": platform.platform(),
                            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                            "torch": torch.__version__, "python": platform.python_version(), "device": str(device)}
    try:
        info["cpu_affinity"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    from bench.bart import bart_version

    info["bart"] = bart_version() or None
    return info


def _parse_overrides(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for it in items:
        key, sep, val = it.partition("=")
        meth, dot, param = key.partition(".")
        if not sep or not dot:
            raise SystemExit(f"--param expects METHOD.NAME=VALUE, got {it!r}")
        try:
            v: Any = json.loads(val)
        except json.JSONDecodeError:
            v = val
        out.setdefault(meth, {})[param] = v
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line entry point (``python -m bench.quality``)."""
    from recon_core.device import resolve_device
    from recon_core.methods import available_methods
    from recon_core.metrics import describe_metric

    ap = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.split("\n")[0])
    ap.add_argument("--methods", nargs="+", default=None, help="our methods (default: all registered)")
    ap.add_argument("--cases", nargs="+", default=None, choices=list(CASES), help="cases (default: all)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (BART always runs on CPU)")
    ap.add_argument("--small", action="store_true", help="tiny sizes and iterations for a quick check")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"result file (default {DEFAULT_JSON})")
    ap.add_argument("--no-bart", action="store_true", help="skip BART even when it is on PATH")
    ap.add_argument("--frames", type=int, default=None, help="frames of the cine cases (default 16, small 4)")
    ap.add_argument("--seed", type=int, default=0, help="seed of masks/noise and of stochastic methods")
    ap.add_argument("--param", action="append", default=[], metavar="METHOD.NAME=VALUE",
                    help="override a method parameter (repeatable; VALUE parsed as JSON if possible)")
    ap.add_argument("--no-cache", action="store_true", help="re-simulate the phantom scans")
    ap.add_argument("--figure", type=Path, default=None,
                    help="labelled comparison figure (PNG; default: next to the --json file, same name)")
    args = ap.parse_args(argv)

    dev = resolve_device(args.device)
    skipped: list[str] = []
    if args.methods:
        methods = list(args.methods)
    else:
        methods = [m for m in available_methods() if dev.type == "cuda" or m not in SLOW_ON_CPU]
        skipped = [m for m in available_methods() if m not in methods]
    unknown = [m for m in methods if m not in available_methods()]
    if unknown:
        ap.error(f"unknown method(s) {unknown}; available: {available_methods()}")
    cases = args.cases or list(CASES)
    overrides = _parse_overrides(args.param)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)

    from bench.bart import BART_VARIANTS, bart_available

    use_bart = not args.no_bart and bart_available()
    cmd = " ".join(["python -m bench.quality"] +
                   [shlex.quote(a) for a in (sys.argv[1:] if argv is None else list(argv))])
    minfo = machine_info(dev)
    t_start = time.perf_counter()
    rows = run_quality(methods, cases, dev, small=args.small, bart=use_bart, seed=args.seed, frames=args.frames,
                       use_cache=not args.no_cache, overrides=overrides,
                       figure=args.figure or args.json.with_suffix(".png"))
    total = time.perf_counter() - t_start

    metric_text = describe_metric(None, **METRIC_OPTIONS)
    metric_text = "\n".join(ln for ln in metric_text.splitlines() if not ln.startswith("MAE"))
    print(f"\n# Quality benchmark{' (--small)' if args.small else ''}\n")
    print(f"command: {cmd}")
    print(f"machine: {minfo['cpu_count']} CPU cores (affinity {minfo.get('cpu_affinity', '?')}), "
          f"torch threads {minfo['torch_threads']}, device {dev}{' ' + minfo['gpu'] if 'gpu' in minfo else ''}, "
          f"torch {minfo['torch']}, BART {minfo['bart'] or 'absent'}{'' if use_bart else ' (not used)'}")
    print(f"metrics (per frame, averaged over frames):\n{metric_text}")
    mem = next((r.get("memory_method") for r in rows if r.get("source") == "ours" and r.get("memory_method")), "")
    print(f"peak memory: ours = {mem}; BART = peak RSS of the bart process (its VmHWM, polled every 5 ms)")
    print("time: wall time of reconstruct() only (maps and data preparation excluded); BART: subprocess wall "
          "time of `bart pics` incl. start-up and .cfl I/O")
    print("coil maps:")
    seen = set()
    for r in rows:
        if r["case"] not in seen and r.get("maps_note"):
            seen.add(r["case"])
            print(f"  {r['case']}: {r['case_desc']}; {r['maps_note']}")
            bn = next((x.get("bart_note") for x in rows if x["case"] == r["case"] and x.get("bart_note")), None)
            if bn:
                print(f"    BART: {bn}")
    if use_bart:
        print("BART variants (bart pics -S, λ in BART's scaled units; " +
              (f"-i {BART_ITERS_SMALL}" if args.small else "default iterations") + "):")
        for v in BART_VARIANTS.values():
            print(f"  {v.name}: {' '.join(v.args)} — {v.note}" + (" (cine cases only)" if v.temporal else ""))
    params = {}
    for r in rows:
        if r.get("source") == "ours" and r.get("params"):
            params.setdefault(r["method"], r["params"])
    if skipped:
        print(f"not run by default on CPU (too slow; pass --methods to include): {', '.join(skipped)}")
    if params:
        print("parameter overrides: " + "; ".join(f"{m}: {p}" for m, p in params.items()) + " (others: defaults)")
    print()
    print(format_table(rows))
    print(f"\ntotal {total:.0f} s")

    args.json.parent.mkdir(parents=True, exist_ok=True)
    payload = {"command": cmd, "machine": minfo, "small": args.small, "seed": args.seed,
               "metric_definition": metric_text, "metric_options": METRIC_OPTIONS,
               "rows": [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows],
               "total_seconds": total}
    args.json.write_text(json.dumps(payload, indent=1, default=str))
    print(f"results: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
