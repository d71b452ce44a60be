"""Coil gadgets: ``coil_compress`` (SVD / geometric) and ``coil_estimate`` (ESPIRiT / Walsh maps).

Both work on :class:`~gadgets.messages.KSpaceBuffer` on ``ctx.device``. Maps are estimated from the
separate calibration block when the buffer has one, else from the fully sampled centre of the
time-averaged Cartesian k-space, else (non-Cartesian) from low-resolution coil images gridded
from all frames together (the time-averaged centre of k-space).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Literal

import torch

from gadgets.base import ChainError, Gadget, GadgetParams
from gadgets.messages import KSpaceBuffer
from recon_core import coils
from recon_core.fft import ifft2c

Tensor = torch.Tensor


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
            calib = buf.calibration.to(dev) if buf.calibration is not None else coils.calibration_region(
                ksp.mean(0), None if buf.mask is None else buf.mask.to(dev).amax(0))
            mats = coils.gcc_compression_matrices(calib, n_virt, n_readout=ksp.shape[-1])
            buf.kspace = coils.apply_gcc(ksp, mats)
            if buf.calibration is not None:
                buf.calibration = coils.apply_gcc(buf.calibration.to(dev).unsqueeze(0), mats)[0]
        if buf.coil_maps is not None:
            buf.coil_maps = None  # maps belong to the physical coils; estimate after compression
        self.log.info("coil compression (%s): %d → %d coils", method, n_coils, n_virt)
        yield buf


MIN_CALIB = 8  # smallest usable fully sampled centre (rows and columns) for coil calibration


@dataclass
class CoilEstimateParams(GadgetParams):
    method: Literal["espirit", "walsh"] = "espirit"
    calib_size: int = 24
    kernel_size: int = 6
    threshold: float = 0.02
    crop: float = 0.8
    walsh_kernel: int = 7

    def validate(self, where: str) -> None:
        if self.calib_size < 4:
            raise ChainError(f"{where}: parameter 'calib_size' must be >= 4, got {self.calib_size}")
        if not 0.0 <= self.crop < 1.0:
            raise ChainError(f"{where}: parameter 'crop' must be in [0, 1), got {self.crop}")


class CoilEstimateGadget(Gadget):
    """Attach coil sensitivity maps ``[C, Ny, Nx]`` to each buffer."""

    name = "coil_estimate"
    Params = CoilEstimateParams
    accepts = (KSpaceBuffer,)

    def _cartesian_calibration(self, ksum: Tensor, counts: Tensor) -> Tensor | None:
        """The fully sampled centred block (at most ``calib_size``) of the averaged k-space, or None
        when fewer than ``MIN_CALIB`` rows/columns around the centre are fully sampled."""
        p: CoilEstimateParams = self.params  # type: ignore[assignment]
        avg = ksum / counts.clamp_min(1).unsqueeze(0)
        try:
            block = coils.calibration_region(avg, (counts > 0).float())
        except ValueError:
            return None
        if min(block.shape[-2:]) < MIN_CALIB:
            return None
        sy, sx = min(block.shape[-2], p.calib_size), min(block.shape[-1], p.calib_size)
        return coils.calibration_region(block, size=(sy, sx))

    def _gridded_coil_images(self, buf: KSpaceBuffer) -> Tensor:
        """Low-resolution coil images from all frames pooled (time-averaged k-space centre)."""
        from recon_core.operators import Nufft
        from recon_core.trajectories import pipe_menon_dcf

        dev = self.ctx.device
        f, c, m = buf.kspace.shape
        traj = buf.trajectory.to(dev).permute(1, 0, 2).reshape(1, 2, f * m)
        data = buf.kspace.to(dev).permute(1, 0, 2).reshape(1, c, f * m)
        dcf = pipe_menon_dcf(traj, buf.matrix).to(dev)
        nufft = Nufft(traj, buf.matrix).to(dev)
        return nufft.adjoint(data * dcf.reshape(1, 1, -1).to(data.dtype))[0]

    def __init__(self, params: CoilEstimateParams | None = None, ctx=None) -> None:
        super().__init__(params, ctx)
        # Interleaved calibration (e.g. TSENSE-style repetitions without ACS lines): k-space sums,
        # sample counts, held buffers and finished maps per (slice, contrast, set).
        self._acc: dict[tuple[int, int, int], tuple[Tensor, Tensor]] = {}
        self._held: dict[tuple[int, int, int], list[KSpaceBuffer]] = {}
        self._maps: dict[tuple[int, int, int], Tensor] = {}

    @staticmethod
    def _key(buf: KSpaceBuffer) -> tuple[int, int, int]:
        return (buf.slice, buf.contrast, buf.set)

    def _estimate(self, calib: Tensor | None, coil_images: Tensor | None, shape: tuple[int, int]) -> Tensor:
        p: CoilEstimateParams = self.params  # type: ignore[assignment]
        if p.method == "espirit":
            if calib is None:
                calib = coils.calib_from_images(coil_images, p.calib_size)
            return coils.espirit_maps(calib, shape, kernel_size=p.kernel_size, threshold=p.threshold, crop=p.crop)
        if coil_images is None:
            ny, nx = shape
            pad_y, pad_x = ny - calib.shape[-2], nx - calib.shape[-1]
            full = torch.nn.functional.pad(calib, (pad_x // 2, pad_x - pad_x // 2, pad_y // 2, pad_y - pad_y // 2))
            coil_images = ifft2c(full)
        return coils.walsh_maps(coil_images, kernel_size=p.walsh_kernel)

    def _attach(self, buf: KSpaceBuffer, maps: Tensor) -> KSpaceBuffer:
        buf.coil_maps = maps.to(device=self.ctx.device, dtype=torch.complex64)
        return buf

    def process(self, buf: KSpaceBuffer) -> Iterator[KSpaceBuffer]:
        p: CoilEstimateParams = self.params  # type: ignore[assignment]
        dev = self.ctx.device
        if not buf.is_cartesian:
            maps = self._estimate(None, self._gridded_coil_images(buf), buf.matrix)
            self.log.info("coil maps (%s, time-averaged gridded centre): %d coils, %dx%d", p.method,
                          maps.shape[0], *buf.matrix)
            yield self._attach(buf, maps)
            return
        # Cartesian maps live on the k-space grid (which may still be readout-oversampled: the recon
        # gadget crops to the recon matrix afterwards).
        shape = (int(buf.kspace.shape[-2]), int(buf.kspace.shape[-1]))
        key = self._key(buf)
        if buf.calibration is not None:
            maps = self._estimate(buf.calibration.to(dev), None, shape)
            self.log.info("coil maps (%s, calibration lines): %d coils", p.method, maps.shape[0])
            yield self._attach(buf, maps)
            return
        ksp = buf.kspace.to(dev)
        mask = buf.mask.to(dev) if buf.mask is not None else (ksp.abs().sum(1) > 0).float()
        ksum = (ksp * mask.unsqueeze(1)).sum(0)
        counts = mask.sum(0)
        calib = self._cartesian_calibration(ksum, counts)
        if calib is not None:
            maps = self._estimate(calib, None, shape)
            self.log.info("coil maps (%s, ACS of the time-averaged k-space): %d coils", p.method, maps.shape[0])
            yield self._attach(buf, maps)
            return
        if key in self._maps and tuple(self._maps[key].shape[-2:]) == shape:
            yield self._attach(buf, self._maps[key])
            return
        # No fully sampled centre in this buffer: interleaved calibration across buffers.
        if key in self._acc:
            s0, c0 = self._acc[key]
            if tuple(s0.shape) == tuple(ksum.shape):
                ksum, counts = ksum + s0, counts + c0
        self._acc[key] = (ksum, counts)
        self._held.setdefault(key, []).append(buf)
        calib = self._cartesian_calibration(ksum, counts)
        if calib is None:
            self.log.info("slice %d: no fully sampled k-space centre yet; holding %d buffer(s) for interleaved "
                          "calibration", buf.slice, len(self._held[key]))
            return
        maps = self._estimate(calib, None, shape)
        self._maps[key] = maps
        held = self._held.pop(key)
        self._acc.pop(key, None)
        self.log.info("coil maps (%s, interleaved calibration over %d buffers): %d coils", p.method, len(held),
                      maps.shape[0])
        for b in held:
            yield self._attach(b, maps)

    def flush(self) -> Iterator[KSpaceBuffer]:
        if self._held:
            keys = ", ".join(f"slice {k[0]} contrast {k[1]} set {k[2]}" for k in self._held)
            raise self.error(
                f"no fully sampled calibration region for {keys}: the data have neither calibration (ACS) lines "
                f"nor interleaved sampling that fills the k-space centre; use a chain with an ACS-free "
                f"method or acquire calibration lines")
        return iter(())
