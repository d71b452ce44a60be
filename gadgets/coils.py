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


@dataclass
class CoilEstimateParams(GadgetParams):
    method: Literal["espirit", "walsh"] = "espirit"
    calib_size: int = 24
    kernel_size: int = 6
    threshold: float = 0.02
    crop: float = 0.0
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

    def _calibration(self, buf: KSpaceBuffer) -> Tensor:
        """Centred calibration k-space ``[C, ny, nx]`` for this buffer."""
        p: CoilEstimateParams = self.params  # type: ignore[assignment]
        dev = self.ctx.device
        if buf.calibration is not None:
            return buf.calibration.to(dev)
        ksp = buf.kspace.to(dev)
        if buf.is_cartesian:
            mask = buf.mask.to(dev) if buf.mask is not None else (ksp.abs().sum(1) > 0).float()
            counts = mask.sum(0)
            avg = ksp.sum(0) / counts.clamp_min(1).unsqueeze(0)
            return coils.calibration_region(avg, (counts > 0).float(), size=p.calib_size)
        return coils.calib_from_images(self._gridded_coil_images(buf), p.calib_size)

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

    def process(self, buf: KSpaceBuffer) -> Iterator[KSpaceBuffer]:
        p: CoilEstimateParams = self.params  # type: ignore[assignment]
        dev = self.ctx.device
        # Cartesian maps live on the k-space grid (which may still be readout-oversampled: the recon
        # gadget crops to the recon matrix afterwards); non-Cartesian maps on the recon matrix.
        ny, nx = tuple(buf.kspace.shape[-2:]) if buf.is_cartesian else buf.matrix
        if p.method == "espirit":
            calib = self._calibration(buf)
            maps = coils.espirit_maps(calib, (ny, nx), kernel_size=p.kernel_size, threshold=p.threshold,
                                      crop=p.crop)
        else:
            if buf.is_cartesian:
                calib = self._calibration(buf)
                pad_y, pad_x = (ny - calib.shape[-2]), (nx - calib.shape[-1])
                full = torch.nn.functional.pad(calib, (pad_x // 2, pad_x - pad_x // 2, pad_y // 2, pad_y - pad_y // 2))
                coil_images = ifft2c(full)
            else:
                coil_images = self._gridded_coil_images(buf)
            maps = coils.walsh_maps(coil_images, kernel_size=p.walsh_kernel)
        buf.coil_maps = maps.to(device=dev, dtype=torch.complex64)
        self.log.info("coil maps (%s): %d coils, %dx%d", p.method, maps.shape[0], ny, nx)
        yield buf
