"""Coil gadgets: ``coil_compress`` (SVD / geometric) and ``coil_estimate`` (ESPIRiT / Walsh maps).

Both work on :class:`~gadgets.messages.KSpaceBuffer` on ``ctx.device``. Cartesian maps are
calibrated from the larger of the buffer's flagged calibration block and the fully sampled centre
of the time-averaged k-space (all frames pooled); non-Cartesian maps from the centre of the coil
images gridded from all frames together with the buffer's DCF. ESPIRiT maps that leave part of the
object without sensitivity are retried and, failing that, replaced by Walsh/Inati maps, with a
WARNING and a record in the buffer's ``meta`` (see :class:`CoilEstimateGadget`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Literal

import torch

from gadgets.base import ChainError, Gadget, GadgetParams
from gadgets.messages import KSpaceBuffer
from recon_core import coils
from recon_core.trajectories import default_dcf

Tensor = torch.Tensor


MIN_CALIB = 8  # smallest usable fully sampled centre (rows and columns) for coil calibration
LOW_CROP = 0.4  # the ESPIRiT eigenvalue crop of the last ESPIRiT retry before the fallback


def time_averaged_kspace(kspace: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Sum over frames of the sampled k-space ``[C, Ny, Nx]`` and the per-point sample counts ``[Ny, Nx]``
    (the time-averaged k-space is ``sum / counts`` where ``counts > 0``)."""
    m = mask.to(kspace.device) if mask is not None else (kspace.abs().sum(1) > 0).float()
    m = m.expand(kspace.shape[0], *kspace.shape[-2:])
    return (kspace * m.unsqueeze(1).to(kspace.dtype)).sum(0), m.sum(0)


def _average(ksum: Tensor, counts: Tensor) -> Tensor:
    return ksum / counts.clamp_min(1).unsqueeze(0).to(ksum.dtype)



@dataclass
class CoilCompressParams(GadgetParams):
    method: Literal["svd", "gcc"] = "svd"
    n_virtual: int = 8
    energy: float = 0.0          # if > 0: smallest number of virtual coils keeping this energy fraction

    def validate(self, where: str) -> None:
        if self.n_virtual < 1:
            raise ChainError(f"{where}: parameter 'n_virtual' must be >= 1, got {self.n_virtual}")
        if not 0.0 <= self.energy <= 1.0:
            raise ChainError(f"{where}: parameter 'energy' must be in [0, 1], got {self.energy}")


class CoilCompressGadget(Gadget):
    """Compress the receive channels to ``n_virtual`` virtual coils (no-op if there are fewer)."""

    name = "coil_compress"
    Params = CoilCompressParams
    accepts = (KSpaceBuffer,)

    def process(self, buf: KSpaceBuffer) -> Iterator[KSpaceBuffer]:
        p: CoilCompressParams = self.params  # type: ignore[assignment]
        dev = self.ctx.device
        ksp = buf.kspace.to(dev)
        n_coils = ksp.shape[1]
        source = buf.calibration.to(dev) if buf.calibration is not None else ksp.transpose(0, 1).reshape(n_coils, -1)
        n_virt = min(p.n_virtual, n_coils)
        if p.energy > 0:
            s = torch.linalg.svdvals(source.reshape(n_coils, -1))
            frac = torch.cumsum(s**2, 0) / (s**2).sum()
            n_virt = min(n_virt, int(torch.searchsorted(frac, torch.tensor(p.energy, device=frac.device))) + 1)
        if n_virt >= n_coils:
            self.log.info("coil compression skipped: %d coils <= %d virtual", n_coils, n_virt)
            yield buf
            return
        method = p.method
        if method == "gcc" and not buf.is_cartesian:
            self.log.warning("geometric coil compression needs Cartesian readouts; using SVD for this buffer")
            method = "svd"
        if method == "svd":
            mat = coils.svd_compression_matrix(source.reshape(n_coils, -1), n_virt)
            buf.kspace = coils.apply_compression(ksp, mat, coil_dim=1)
            if buf.calibration is not None:
                buf.calibration = coils.apply_compression(buf.calibration.to(dev), mat, coil_dim=0)
        else:
            if buf.calibration is not None:
                calib = buf.calibration.to(dev)
            else:
                ksum, counts = time_averaged_kspace(ksp, buf.mask)
                calib = coils.calibration_region(_average(ksum, counts), counts > 0)
            mats = coils.gcc_compression_matrices(calib, n_virt, n_readout=ksp.shape[-1])
            buf.kspace = coils.apply_gcc(ksp, mats)
            if buf.calibration is not None:
                buf.calibration = coils.apply_gcc(buf.calibration.to(dev).unsqueeze(0), mats)[0]
        if buf.coil_maps is not None:
            buf.coil_maps = None  # maps belong to the physical coils; estimate after compression
        self.log.info("coil compression (%s): %d → %d coils", method, n_coils, n_virt)
        yield buf


@dataclass
class CoilEstimateParams(GadgetParams):
    """Parameters of :class:`CoilEstimateGadget`.

    method : ESPIRiT (with the coverage check and fallbacks below) or Walsh maps.
    calib_size : largest calibration block (rows and columns) ESPIRiT uses; for non-Cartesian data
        the size of the centre of the gridded k-space.
    kernel_size, threshold, crop : ESPIRiT kernel side, singular-value threshold, eigenvalue crop.
    walsh_kernel : smoothing window of Walsh / Inati maps.
    min_coverage : smallest accepted fraction of the object (low-resolution image) with
        Σ|S|² ≥ 0.5; below it ESPIRiT is retried and finally replaced by ``fallback`` maps.
    fallback : adaptive maps used when no ESPIRiT attempt covers the object.
    """

    method: Literal["espirit", "walsh"] = "espirit"
    calib_size: int = 24
    kernel_size: int = 6
    threshold: float = 0.02
    crop: float = 0.8
    walsh_kernel: int = 7
    min_coverage: float = 0.95
    fallback: Literal["walsh", "inati"] = "walsh"

    def validate(self, where: str) -> None:
        if self.calib_size < 4:
            raise ChainError(f"{where}: parameter 'calib_size' must be >= 4, got {self.calib_size}")
        if self.kernel_size < 2:
            raise ChainError(f"{where}: parameter 'kernel_size' must be >= 2, got {self.kernel_size}")
        if not 0.0 <= self.crop < 1.0:
            raise ChainError(f"{where}: parameter 'crop' must be in [0, 1), got {self.crop}")
        if not 0.0 <= self.min_coverage <= 1.0:
            raise ChainError(f"{where}: parameter 'min_coverage' must be in [0, 1], got {self.min_coverage}")


def _crop(block: Tensor, size: int) -> Tensor:
    """The central ``≤ size × size`` part of a calibration block ``[C, ny, nx]``."""
    return coils.calibration_region(block, size=(min(block.shape[-2], size), min(block.shape[-1], size)))


def _shape(block: Tensor) -> str:
    return f"{block.shape[-2]}x{block.shape[-1]}"


class CoilEstimateGadget(Gadget):
    """Attach coil sensitivity maps ``[C, Ny, Nx]`` to each buffer, checked for coverage of the object.

    Calibration data (Cartesian): the larger of the buffer's flagged calibration block and the
    fully sampled centre of the time-averaged k-space (all frames pooled, so a cine whose frames
    each sample a few central lines plus different random ones calibrates from the union); when
    neither exists, buffers of the same slice are pooled until their union fills the centre
    (interleaved calibration). Non-Cartesian: the centre of the k-space of the coil images gridded
    from all frames together with the buffer's DCF.

    ESPIRiT maps are checked with :func:`recon_core.coils.map_coverage` against the low-resolution
    image of the calibration data. If they leave more than ``1 − min_coverage`` of the object
    without sensitivity, ESPIRiT is retried (whole calibration block instead of the central
    ``calib_size``; a smaller kernel; crop ``LOW_CROP``) and finally replaced by Walsh/Inati maps of
    the low-resolution coil images; each step is logged as a WARNING. The outcome is recorded in
    the buffer's ``meta``: ``CoilMaps`` (``espirit``, ``espirit(calib=…)``, ``espirit(kernel=…)``,
    ``espirit(crop=…)``, ``walsh``, ``walsh-fallback`` / ``inati-fallback``), ``CoilMapCoverage``
    and ``CoilCalibration`` (source and size).
    """

    name = "coil_estimate"
    Params = CoilEstimateParams
    accepts = (KSpaceBuffer,)

    def __init__(self, params: CoilEstimateParams | None = None, ctx=None) -> None:
        super().__init__(params, ctx)
        # Interleaved calibration (e.g. TSENSE-style repetitions without ACS lines): k-space sums,
        # sample counts, held buffers and finished maps (with their meta) per (slice, contrast, set).
        self._acc: dict[tuple[int, int, int], tuple[Tensor, Tensor]] = {}
        self._held: dict[tuple[int, int, int], list[KSpaceBuffer]] = {}
        self._maps: dict[tuple[int, int, int], tuple[Tensor, dict[str, str]]] = {}

    @staticmethod
    def _key(buf: KSpaceBuffer) -> tuple[int, int, int]:
        return (buf.slice, buf.contrast, buf.set)

    # ------------------------------------------------------------------ calibration data

    @staticmethod
    def _pooled_block(ksum: Tensor, counts: Tensor) -> Tensor | None:
        """The whole fully sampled centre of the time-averaged k-space, or None when it has fewer
        than ``MIN_CALIB`` rows or columns."""
        try:
            block = coils.calibration_region(_average(ksum, counts), counts > 0)
        except ValueError:
            return None
        return block if min(block.shape[-2:]) >= MIN_CALIB else None

    def _cartesian_calibration(self, buf: KSpaceBuffer, ksum: Tensor, counts: Tensor
                               ) -> tuple[Tensor, str] | None:
        """The larger (smaller side first, then area) of the flagged block and the pooled centre."""
        cands: list[tuple[Tensor, str]] = []
        if buf.calibration is not None:
            cands.append((buf.calibration.to(self.ctx.device), "calibration lines"))
        pooled = self._pooled_block(ksum, counts)
        if pooled is not None:
            cands.append((pooled, f"time-averaged k-space of {buf.n_frames} frame(s)"))
        if not cands:
            return None
        block, source = max(cands, key=lambda c: (min(c[0].shape[-2:]), c[0].shape[-2] * c[0].shape[-1]))
        if len(cands) > 1:
            other = [c for c in cands if c[0] is not block][0]
            self.log.info("calibration: %s %s (larger than the %s %s)", source, _shape(block), other[1],
                          _shape(other[0]))
        else:
            self.log.info("calibration: %s %s", source, _shape(block))
        return block, source

    # ------------------------------------------------------------------ maps

    def _espirit(self, calib: Tensor, shape: tuple[int, int], kernel: int, crop: float) -> Tensor:
        p: CoilEstimateParams = self.params  # type: ignore[assignment]
        return coils.espirit_maps(calib, shape, kernel_size=kernel, threshold=p.threshold, crop=crop)

    def _adaptive(self, kind: str, images: Tensor) -> Tensor:
        p: CoilEstimateParams = self.params  # type: ignore[assignment]
        k = min(p.walsh_kernel, *images.shape[-2:])
        k -= 1 - k % 2                              # odd
        fn = coils.inati_maps if kind == "inati" else coils.walsh_maps
        return fn(images, kernel_size=max(1, k))

    def _estimate(self, block: Tensor, source: str, shape: tuple[int, int]) -> tuple[Tensor, dict[str, str]]:
        """Maps from the calibration ``block`` (cut to ``calib_size`` for ESPIRiT), checked for coverage."""
        p: CoilEstimateParams = self.params  # type: ignore[assignment]
        calib = _crop(block, p.calib_size)
        lowres = coils.lowres_coil_images(block, shape)     # the whole block: the sharpest object outline
        obj = lowres                                        # reference of the coverage check
        meta = {"CoilCalibration": f"{source} {_shape(calib)}"}
        if p.method == "walsh":
            maps = self._adaptive("walsh", lowres)
            meta.update(CoilMaps="walsh", CoilMapCoverage=f"{coils.map_coverage(maps, obj):.3f}",
                        CoilCalibration=f"{source} {_shape(block)}")
            return maps, meta
        k0 = min(p.kernel_size, *calib.shape[-2:])
        attempts: list[tuple[str, Tensor, int, float]] = [("espirit", calib, k0, p.crop)]
        if block.shape[-2] * block.shape[-1] > calib.shape[-2] * calib.shape[-1]:
            k_block = min(p.kernel_size, *block.shape[-2:])
            attempts.append((f"espirit(calib={_shape(block)})", block, k_block, p.crop))
        widest = attempts[-1][1]
        k_small = max(2, min(p.kernel_size, widest.shape[-2] - 2, widest.shape[-1] - 2))
        if k_small < attempts[-1][2]:
            attempts.append((f"espirit(kernel={k_small})", widest, k_small, p.crop))
        if p.crop > LOW_CROP:
            attempts.append((f"espirit(crop={LOW_CROP:g})", widest, attempts[-1][2], LOW_CROP))
        for label, cal, kernel, crop in attempts:
            try:
                maps = self._espirit(cal, shape, kernel, crop)
            except ValueError as exc:           # e.g. a block too small for any kernel
                self.log.warning("ESPIRiT (%s) on the %s %s failed: %s", label, source, _shape(cal), exc)
                continue
            cov = coils.map_coverage(maps, obj)
            if cov >= p.min_coverage:
                if label != "espirit":
                    self.log.warning("coil maps: %s covers %.1f%% of the object (after retries)", label,
                                     100 * cov)
                meta.update(CoilMaps=label, CoilMapCoverage=f"{cov:.3f}",
                            CoilCalibration=f"{source} {_shape(cal)}")
                return maps, meta
            self.log.warning("coil maps: %s from the %s %s leave %.1f%% of the object uncovered "
                             "(sum|S|^2 < 0.5; need coverage >= %.1f%%)", label, source, _shape(cal),
                             100 * (1 - cov), 100 * p.min_coverage)
        maps = self._adaptive(p.fallback, lowres)
        cov = coils.map_coverage(maps, obj)
        self.log.warning("coil maps: ESPIRiT does not cover the object with the %s %s; falling back to %s "
                         "maps of the low-resolution coil images (coverage %.1f%%)", source, _shape(calib),
                         p.fallback, 100 * cov)
        meta.update(CoilMaps=f"{p.fallback}-fallback", CoilMapCoverage=f"{cov:.3f}",
                    CoilCalibration=f"{source} {_shape(block)}")
        return maps, meta

    def _attach(self, buf: KSpaceBuffer, maps: Tensor, meta: dict[str, str]) -> KSpaceBuffer:
        buf.coil_maps = maps.to(device=self.ctx.device, dtype=torch.complex64)
        buf.meta.update(meta)
        return buf

    def _noncartesian(self, buf: KSpaceBuffer) -> KSpaceBuffer:
        p: CoilEstimateParams = self.params  # type: ignore[assignment]
        dev = self.ctx.device
        traj = buf.trajectory.to(dev)
        dcf = buf.dcf
        if dcf is None:
            kind = str(buf.meta.get("trajectory", ""))
            self.log.warning("buffer has no density compensation: using the default DCF (%s trajectory)",
                             kind or "unknown")
            dcf = default_dcf(traj, buf.matrix, kind=kind or None)
        images = coils.gridded_coil_images(buf.kspace.to(dev), traj, dcf.to(dev), buf.matrix,
                                           pool_frames=True)
        calib = coils.calib_from_images(images, min(p.calib_size, *buf.matrix))
        maps, meta = self._estimate(calib, f"gridded centre of {buf.n_frames} frame(s)", buf.matrix)
        self.log.info("coil maps (%s, %s): %d coils, %dx%d, coverage %s", meta["CoilMaps"],
                      meta["CoilCalibration"], maps.shape[0], *buf.matrix, meta["CoilMapCoverage"])
        return self._attach(buf, maps, meta)

    def process(self, buf: KSpaceBuffer) -> Iterator[KSpaceBuffer]:
        if not buf.is_cartesian:
            yield self._noncartesian(buf)
            return
        # Cartesian maps live on the k-space grid (which may still be readout-oversampled: the recon
        # gadget crops to the recon matrix afterwards).
        shape = (int(buf.kspace.shape[-2]), int(buf.kspace.shape[-1]))
        key = self._key(buf)
        ksum, counts = time_averaged_kspace(buf.kspace.to(self.ctx.device), buf.mask)
        found = self._cartesian_calibration(buf, ksum, counts)
        if found is not None:
            maps, meta = self._estimate(found[0], found[1], shape)
            self.log.info("coil maps (%s, %s): %d coils, coverage %s", meta["CoilMaps"],
                          meta["CoilCalibration"], maps.shape[0], meta["CoilMapCoverage"])
            yield self._attach(buf, maps, meta)
            return
        if key in self._maps and tuple(self._maps[key][0].shape[-2:]) == shape:
            yield self._attach(buf, *self._maps[key])
            return
        # No fully sampled centre in this buffer: interleaved calibration across buffers.
        if key in self._acc:
            s0, c0 = self._acc[key]
            if tuple(s0.shape) == tuple(ksum.shape):
                ksum, counts = ksum + s0, counts + c0
        self._acc[key] = (ksum, counts)
        self._held.setdefault(key, []).append(buf)
        block = self._pooled_block(ksum, counts)
        if block is None:
            self.log.info("slice %d: no fully sampled k-space centre yet; holding %d buffer(s) for interleaved "
                          "calibration", buf.slice, len(self._held[key]))
            return
        held = self._held.pop(key)
        self._acc.pop(key, None)
        maps, meta = self._estimate(block, f"interleaved calibration over {len(held)} buffers", shape)
        self._maps[key] = (maps, meta)
        self.log.info("coil maps (%s, %s): %d coils, coverage %s", meta["CoilMaps"], meta["CoilCalibration"],
                      maps.shape[0], meta["CoilMapCoverage"])
        for b in held:
            yield self._attach(b, maps, meta)

    def flush(self) -> Iterator[KSpaceBuffer]:
        if self._held:
            keys = ", ".join(f"slice {k[0]} contrast {k[1]} set {k[2]}" for k in self._held)
            raise self.error(
                f"no fully sampled calibration region for {keys}: the data have neither calibration (ACS) lines "
                f"nor interleaved sampling that fills the k-space centre; use a chain with an ACS-free "
                f"method or acquire calibration lines")
        return iter(())
