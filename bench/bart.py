"""Helpers to run the BART command line tool (``bart ecalib``, ``bart pics``, ``bart nufft``) from benchmarks.

BART is never a dependency of the package: everything that touches it lives here, and callers
check :func:`bart_available` first (benchmarks skip the BART rows when it is absent).

Layouts (this project → BART):

* Cartesian k-space ``[F, C, Ny, Nx]`` → ``[Nx, Ny, 1, C, 1, …, F]`` (BART dim 0 = readout x,
  1 = phase encoding y, 3 = coil, 10 = time).
* Non-Cartesian k-space ``[F, C, M]`` → ``[1, M, 1, C, 1, …, F]``.
* Trajectory ``[F, 2, M]`` (ky, kx) in radians/voxel → ``[3, M, 1, …, F]`` with component 0 = x,
  1 = y, 2 = z, in BART's units of cycles per FOV (``k · N / 2π``).
* Coil maps ``[C, Ny, Nx]`` → ``[Nx, Ny, 1, C]``; images come back as ``[Nx, Ny, 1, …, F]``.

Every call is timed as subprocess wall time from this process (BART start-up and ``.cfl`` file
I/O included) and its peak resident memory is the child's ``VmHWM`` polled from
``/proc/<pid>/status`` every 5 ms while it runs (the BART process's own peak, not this one's).
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from recon_core.cfl import readcfl, writecfl

Tensor = torch.Tensor

__all__ = [
    "BartCall",
    "BartError",
    "BartSession",
    "BART_VARIANTS",
    "tv_t_args",
    "bart_available",
    "bart_version",
    "cart_kspace_to_bart",
    "noncart_kspace_to_bart",
    "traj_to_bart",
    "maps_to_bart",
    "maps_from_bart",
    "images_from_bart",
]

TIME_DIM = 10   # BART's TIME_DIM
N_DIMS = 16


class BartError(RuntimeError):
    """A BART command failed (message includes its stderr)."""


@dataclass
class BartCall:
    """One BART invocation: the argument list, wall time (s), the child's peak RSS (MiB, VmHWM), stderr."""

    args: list[str]
    seconds: float
    peak_rss_mib: float
    stderr: str = ""


@dataclass(frozen=True)
class BartVariant:
    """A ``bart pics`` regularisation set-up: ``kind`` groups it with our methods of the same model."""

    name: str
    kind: str
    args: tuple[str, ...]
    temporal: bool = False   # only meaningful with more than one frame
    note: str = ""


#: The BART reconstructions of the quality benchmark. λ values are in BART's own units (pics
#: scales the data so the adjoint image has a fixed magnitude before solving), chosen once by hand
#: on the ``radial21`` case and then used unchanged everywhere.
BART_VARIANTS: dict[str, BartVariant] = {
    "bart_l2": BartVariant("bart_l2", "l2", ("-l2", "-r", "0.01"),
                           note="l2 SENSE, Tikhonov λ = 0.01 (CG)"),
    "bart_l1wav": BartVariant("bart_l1wav", "l1", ("-l1", "-e", "-r", "0.005"),
                              note="l1-wavelet (spatial, per frame), λ = 0.005 (FISTA, random shifts)"),
    "bart_tv_t": BartVariant("bart_tv_t", "tv_t", ("-e", "-R", "T:1024:0:0.01"), temporal=True,
                             note="temporal TV on dim 10, λ = 0.01 (ADMM)"),
    "bart_llr": BartVariant("bart_llr", "lowrank", ("-e", "-R", "L:7:7:0.02"), temporal=True,
                            note="locally low rank, 8×8 blocks × time, λ = 0.02 (ADMM)"),
}


def tv_t_args(lam: float) -> tuple[str, ...]:
    """``bart_tv_t``'s arguments with temporal-TV weight ``lam`` (``-e -R T:1024:0:lam``), for λ sweeps."""
    if not float(lam) >= 0:
        raise ValueError(f"lam must be >= 0, got {lam!r}")
    return ("-e", "-R", f"T:1024:0:{float(lam):g}")


def bart_available() -> bool:
    """True when a ``bart`` executable is on ``PATH``."""
    return shutil.which("bart") is not None


def bart_version() -> str:
    """``bart version`` output, or ``""`` when BART is absent."""
    if not bart_available():
        return ""
    out = subprocess.run(["bart", "version"], capture_output=True, text=True)
    return out.stdout.strip()


# ----------------------------------------------------------------------------------------------
# layout conversion


def _np(x: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _bart_shape(**dims: int) -> list[int]:
    shape = [1] * N_DIMS
    names = {"x": 0, "y": 1, "z": 2, "coil": 3, "time": TIME_DIM}
    for k, v in dims.items():
        shape[names[k]] = int(v)
    return shape


def _trim(shape: list[int]) -> tuple[int, ...]:
    last = max([i for i, s in enumerate(shape) if s != 1] + [0])
    return tuple(shape[:last + 1])


def cart_kspace_to_bart(kspace: Tensor | np.ndarray) -> np.ndarray:
    """``[F, C, Ny, Nx]`` → BART ``[Nx, Ny, 1, C, …, F]`` complex64 (Fortran order)."""
    k = _np(kspace).astype(np.complex64)
    f, c, ny, nx = k.shape
    out = np.asfortranarray(k.transpose(3, 2, 1, 0))                       # [Nx, Ny, C, F]
    return out.reshape(_trim(_bart_shape(x=nx, y=ny, coil=c, time=f)), order="F")


def noncart_kspace_to_bart(kspace: Tensor | np.ndarray) -> np.ndarray:
    """``[F, C, M]`` → BART ``[1, M, 1, C, …, F]`` complex64."""
    k = _np(kspace).astype(np.complex64)
    f, c, m = k.shape
    out = np.asfortranarray(k.transpose(2, 1, 0))                          # [M, C, F]
    return out.reshape(_trim(_bart_shape(y=m, coil=c, time=f)), order="F")


def traj_to_bart(traj: Tensor | np.ndarray, image_shape: Sequence[int]) -> np.ndarray:
    """``[F, 2, M]`` (ky, kx) radians/voxel → BART ``[3, M, 1, …, F]`` in cycles/FOV (x, y, z)."""
    t = _np(traj).astype(np.float64)
    f, _, m = t.shape
    ny, nx = int(image_shape[0]), int(image_shape[1])
    out = np.zeros((3, m, f), dtype=np.complex64, order="F")
    out[0] = (t[:, 1] * nx / (2 * math.pi)).T
    out[1] = (t[:, 0] * ny / (2 * math.pi)).T
    return out.reshape(_trim([3, m] + [1] * 8 + [f] + [1] * 5), order="F")


def maps_to_bart(maps: Tensor | np.ndarray) -> np.ndarray:
    """``[C, Ny, Nx]`` → BART ``[Nx, Ny, 1, C]``."""
    s = _np(maps).astype(np.complex64)
    c, ny, nx = s.shape
    return np.asfortranarray(s.transpose(2, 1, 0)).reshape((nx, ny, 1, c), order="F")


def maps_from_bart(arr: np.ndarray) -> Tensor:
    """BART maps ``[Nx, Ny, 1, C(, maps)]`` → ``[C, Ny, Nx]`` complex64 (first set of maps)."""
    a = np.asarray(arr)
    a = a.reshape(a.shape + (1,) * (5 - a.ndim), order="F")[:, :, 0, :, 0]   # [Nx, Ny, C]
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 1, 0)).astype(np.complex64))


def images_from_bart(arr: np.ndarray, n_frames: int) -> Tensor:
    """BART image ``[Nx, Ny, 1, …, F]`` (single map) → ``[F, Ny, Nx]`` complex64."""
    a = np.asarray(arr)
    nx, ny = a.shape[0], a.shape[1] if a.ndim > 1 else 1
    if a.size != nx * ny * n_frames:
        raise BartError(f"unexpected BART image shape {a.shape} for {n_frames} frame(s)")
    a = a.reshape((nx, ny, n_frames), order="F")
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 1, 0)).astype(np.complex64))


# ----------------------------------------------------------------------------------------------
# running BART


def _watch_hwm(pid: int, out: list[int], done: threading.Event, period: float = 0.005) -> None:
    """Poll ``VmHWM`` (peak RSS, KiB) of process ``pid`` until it exits; keep the last value in ``out[0]``.

    (``wait4``'s ``ru_maxrss`` is not used: after ``fork``/``vfork`` + ``exec`` it includes this
    process's own peak, which would swamp BART's.)"""
    path = f"/proc/{pid}/status"
    while True:
        try:
            with open(path) as fh:
                text = fh.read()
        except OSError:
            return
        # before exec the child still shares this process's memory map: only count it once it is bart
        if text.startswith("Name:\tbart"):
            for line in text.splitlines():
                if line.startswith("VmHWM:"):
                    out[0] = max(out[0], int(line.split()[1]))
                    break
        if done.wait(period):
            return


@dataclass
class BartSession:
    """A scratch directory plus a runner for ``bart`` commands.

    Use as a context manager; ``threads`` sets ``OMP_NUM_THREADS`` for the children (default: the
    torch thread count, so BART and our methods get the same cores). ``calls`` keeps every call.
    """

    threads: Optional[int] = None
    calls: list[BartCall] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="tg_bart_")
        self.dir = Path(self._tmp.name)
        self.env = dict(os.environ)
        self.env["OMP_NUM_THREADS"] = str(self.threads or torch.get_num_threads())
        self.env.setdefault("DEBUG_LEVEL", "0")

    def __enter__(self) -> "BartSession":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._tmp.cleanup()

    def path(self, name: str) -> str:
        return str(self.dir / name)

    def write(self, name: str, array: np.ndarray) -> str:
        writecfl(self.dir / name, array)
        return self.path(name)

    def read(self, name: str) -> np.ndarray:
        return readcfl(self.dir / name)

    def run(self, *args: str) -> BartCall:
        """Run ``bart *args``; raise :class:`BartError` on failure. Returns the timed call."""
        argv = ["bart", *map(str, args)]
        with open(self.dir / "_stderr.txt", "w+") as err:
            t0 = time.perf_counter()
            proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, env=self.env)
            hwm = [0]
            done = threading.Event()
            watcher = threading.Thread(target=_watch_hwm, args=(proc.pid, hwm, done), daemon=True)
            watcher.start()
            proc.wait()
            dt = time.perf_counter() - t0
            done.set()
            watcher.join()
            err.seek(0)
            text = err.read()
        # a call that ends within the first poll has no reading: NaN rather than a made-up 0
        call = BartCall(argv[1:], dt, hwm[0] / 1024.0 if hwm[0] else float("nan"), text)
        self.calls.append(call)
        if proc.returncode != 0:
            raise BartError(f"{' '.join(argv)} failed (exit {proc.returncode}): {text.strip()[-600:]}")
        return call

    # -- coil maps -------------------------------------------------------------------------------
    def ecalib(self, kspace: Tensor | np.ndarray, calib_size: Sequence[int],
               extra: Sequence[str] = ()) -> tuple[Tensor, BartCall]:
        """``bart ecalib -m 1 -r cx:cy:1`` on centred k-space ``[C, Ny, Nx]`` → maps ``[C, Ny, Nx]``.

        ``calib_size`` is ``(ny, nx)`` of the calibration block (BART takes it as x:y:z).
        """
        k = _np(kspace)
        self.write("ec_ksp", cart_kspace_to_bart(k[None]))
        cy, cx = int(calib_size[0]), int(calib_size[1])
        call = self.run("ecalib", "-m", "1", "-r", f"{cx}:{cy}:1", *extra, self.path("ec_ksp"), self.path("ec_maps"))
        return maps_from_bart(self.read("ec_maps")), call

    def ecalib_noncart(self, kspace: Tensor | np.ndarray, traj: Tensor | np.ndarray, dcf: Tensor | np.ndarray,
                       image_shape: Sequence[int], calib: int = 24) -> tuple[Tensor, list[BartCall]]:
        """ESPIRiT maps for non-Cartesian data: DCF-weighted ``bart nufft -a`` of all frames together
        (the time-averaged gridded image), ``bart fft -u`` to a Cartesian grid, ``bart ecalib``
        on its centre ``calib × calib``.

        ``kspace`` ``[F, C, M]``, ``traj`` ``[F, 2, M]`` radians/voxel, ``dcf`` ``[F, M]``.
        """
        k = _np(kspace)
        t = _np(traj)
        w = _np(dcf)
        f, c, m = k.shape
        k_all = (k * w[:, None, :]).transpose(1, 0, 2).reshape(1, c, f * m)
        t_all = t.transpose(1, 0, 2).reshape(1, 2, f * m)
        ny, nx = int(image_shape[0]), int(image_shape[1])
        self.write("ecn_ksp", noncart_kspace_to_bart(k_all))
        self.write("ecn_traj", traj_to_bart(t_all, (ny, nx)))
        calls = [self.run("nufft", "-a", "-d", f"{nx}:{ny}:1", self.path("ecn_traj"), self.path("ecn_ksp"),
                          self.path("ecn_img"))]
        calls.append(self.run("fft", "-u", "3", self.path("ecn_img"), self.path("ecn_grid")))
        calls.append(self.run("ecalib", "-m", "1", "-r", f"{calib}:{calib}:1", self.path("ecn_grid"),
                              self.path("ecn_maps")))
        return maps_from_bart(self.read("ecn_maps")), calls

    # -- NUFFT convention check -----------------------------------------------------------------
    def nufft_scale(self, images: Tensor, traj: Tensor, ours: Tensor) -> tuple[complex, float]:
        """Round trip of conventions: ``bart nufft`` of single-coil ``images`` ``[F, Ny, Nx]`` on
        ``traj`` ``[F, 2, M]`` against our forward ``ours`` ``[F, M]``.

        Returns ``(s, rel_err)`` with ``bart ≈ s · ours``: ``|s|`` is BART's NUFFT scale relative
        to our orthonormal one, and a small ``rel_err`` confirms the trajectory units/axes.
        """
        f, ny, nx = images.shape
        img = np.asfortranarray(_np(images).astype(np.complex64).transpose(2, 1, 0))   # [Nx, Ny, F]
        self.write("nu_img", img.reshape(_trim(_bart_shape(x=nx, y=ny, time=f)), order="F"))
        self.write("nu_traj", traj_to_bart(traj, (ny, nx)))
        self.run("nufft", self.path("nu_traj"), self.path("nu_img"), self.path("nu_ksp"))
        kb = np.asarray(self.read("nu_ksp")).reshape(-1, order="F")                   # [M·F], M fastest
        ref = _np(ours).astype(np.complex128).reshape(f, -1).T.reshape(-1, order="F")  # same order
        kb = kb.astype(np.complex128)
        s = np.vdot(ref, kb) / np.vdot(ref, ref)
        err = float(np.linalg.norm(kb - s * ref) / max(np.linalg.norm(kb), 1e-30))
        return complex(s), err

    # -- reconstruction -------------------------------------------------------------------------
    def pics(self, kspace: Tensor | np.ndarray, maps: Tensor | np.ndarray, args: Sequence[str], *,
             traj: Tensor | np.ndarray | None = None, iters: Optional[int] = None,
             tag: str = "pics", rescale: bool = True) -> tuple[Tensor, BartCall]:
        """``bart pics -S [args] [-i iters] [-t traj] ksp maps out`` → images ``[F, Ny, Nx]``.

        ``kspace`` is ``[F, C, Ny, Nx]`` (Cartesian; the sampling pattern is taken from the
        non-zero samples) or ``[F, C, M]`` with ``traj`` ``[F, 2, M]``. ``-S`` re-scales the result
        to the data's units (``rescale=False`` leaves it out, e.g. with ``-w 1``: no scaling at all).
        """
        k = _np(kspace)
        s = _np(maps)
        f = k.shape[0]
        if traj is None:
            self.write(f"{tag}_ksp", cart_kspace_to_bart(k))
        else:
            self.write(f"{tag}_ksp", noncart_kspace_to_bart(k))
            self.write(f"{tag}_traj", traj_to_bart(traj, s.shape[-2:]))
        self.write(f"{tag}_maps", maps_to_bart(s))
        argv = ["pics", *(["-S"] if rescale else []), *args]
        if iters is not None:
            argv += ["-i", str(int(iters))]
        if traj is not None:
            argv += ["-t", self.path(f"{tag}_traj")]
        argv += [self.path(f"{tag}_ksp"), self.path(f"{tag}_maps"), self.path(f"{tag}_out")]
        call = self.run(*argv)
        return images_from_bart(self.read(f"{tag}_out"), f), call
