"""The ``remove_oversampling`` gadget: crop readout oversampling (Gadgetron's RemoveROOversampling).

When the header's ``encodedSpace/matrixSize/x`` exceeds ``reconSpace/matrixSize/x`` (typically 2×)
each Cartesian readout is transformed to image space (centred orthonormal 1-D FFT, as
``recon_core.fft.ifft1c``), the central
``recon_x / encoded_x`` portion is kept and transformed back. Orthonormal transforms keep the noise
variance per sample unchanged, so prewhitened data stay white. ``number_of_samples``,
``center_sample``, ``discard_pre/post`` and a 1-D trajectory (if any) are updated;
``ctx.options["readout_oversampling_removed"]`` is set so that the buffer gadget knows the
readout length is now ``recon_x``.

Noise scans pass through untouched. Non-Cartesian data (header trajectory other than
cartesian/epi, or acquisitions with ``trajectory_dimensions >= 2``) pass through untouched with
one log line: for radial and spiral readouts the oversampling is part of the trajectory and is
handled by the NUFFT grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import ismrmrd
import numpy as np

from gadgets.base import ChainContext, Gadget, GadgetParams
from gadgets.noise import parsed_header

__all__ = ["RemoveOversamplingGadget", "RemoveOversamplingParams", "crop_readout"]

_CARTESIAN = {"cartesian", "epi"}


def crop_readout(data: np.ndarray, n_out: int) -> np.ndarray:
    """Keep the central ``n_out`` of ``data.shape[-1]`` image-space samples of each readout.

    ``data`` ``[C, N]`` k-space (DC at ``N // 2``) → ``[C, n_out]`` k-space, complex64, via centred
    orthonormal FFTs (the image-space crop starts at ``N // 2 - n_out // 2``). numpy's FFT is used:
    per-readout transforms are tiny and a threaded torch FFT only adds overhead here.
    """
    n = data.shape[-1]
    if not 0 < n_out <= n:
        raise ValueError(f"n_out must be in 1..{n}, got {n_out}")
    x = np.asarray(data, dtype=np.complex64)
    img = np.fft.fftshift(np.fft.ifft(np.fft.ifftshift(x, axes=-1), axis=-1, norm="ortho"), axes=-1)
    start = n // 2 - n_out // 2
    img = img[..., start:start + n_out]
    out = np.fft.fftshift(np.fft.fft(np.fft.ifftshift(img, axes=-1), axis=-1, norm="ortho"), axes=-1)
    return out.astype(np.complex64, copy=False)


@dataclass
class RemoveOversamplingParams(GadgetParams):
    """Parameters of :class:`RemoveOversamplingGadget`.

    enabled : False makes the gadget a pass-through.
    """

    enabled: bool = True


class RemoveOversamplingGadget(Gadget):
    """Crop Cartesian readouts from the encoded to the reconstruction field of view."""

    name = "remove_oversampling"
    Params = RemoveOversamplingParams
    accepts = (ismrmrd.Acquisition,)

    def __init__(self, params: RemoveOversamplingParams | None = None,
                 ctx: ChainContext | None = None) -> None:
        super().__init__(params, ctx)
        self._ratio: tuple[int, int] | None = None   # (encoded x, recon x), None until read
        self._header_trajectory = "cartesian"
        self._noncart_logged = False
        self._ready = False

    def _read_header(self) -> None:
        self._ready = True
        h = parsed_header(self.ctx)
        if h is None or not getattr(h, "encoding", None):
            self.log.info("no ISMRMRD header encoding: readout oversampling is left unchanged")
            return
        enc = h.encoding[0]
        traj = enc.trajectory
        self._header_trajectory = str(getattr(traj, "value", traj) or "cartesian").lower()
        ex = int(enc.encodedSpace.matrixSize.x)
        rx = int(enc.reconSpace.matrixSize.x)
        if ex <= 0 or rx <= 0:
            raise self.error(f"header matrixSize x must be > 0 (encodedSpace {ex}, reconSpace {rx})")
        if ex > rx:
            self._ratio = (ex, rx)
            self.log.info("removing readout oversampling: %d → %d samples", ex, rx)
        else:
            self.log.debug("encoded x %d <= recon x %d: no readout oversampling to remove", ex, rx)

    def process(self, acq: ismrmrd.Acquisition) -> Iterator[Any]:
        p: RemoveOversamplingParams = self.params  # type: ignore[assignment]
        if not self._ready:
            self._read_header()
        if not p.enabled or self._ratio is None or acq.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT):
            yield acq
            return
        if self._header_trajectory not in _CARTESIAN or acq.trajectory_dimensions >= 2:
            if not self._noncart_logged:
                self._noncart_logged = True
                self.log.info("non-Cartesian data (trajectory %s, %d trajectory dimensions): readout "
                              "oversampling is part of the trajectory, acquisitions pass unchanged",
                              self._header_trajectory, acq.trajectory_dimensions)
            yield acq
            return
        ex, rx = self._ratio
        n = int(acq.number_of_samples)
        if (n * rx) % ex != 0:
            raise self.error(
                f"acquisition {acq.scan_counter}: number_of_samples {n} cannot be reduced by the "
                f"oversampling ratio {ex}/{rx} to a whole number of samples"
            )
        n_out = n * rx // ex
        out = crop_readout(acq.data, n_out)
        traj = np.array(acq.traj, dtype=np.float32, copy=True)
        c = int(acq.center_sample)
        new_c = int(round(c * rx / ex))
        channels, tdim = int(acq.active_channels), int(acq.trajectory_dimensions)
        acq.resize(n_out, channels, tdim)
        acq.data[:] = out
        if tdim == 1 and n > 1:
            step = (float(traj[-1, 0]) - float(traj[0, 0])) / (n - 1) * ex / rx
            acq.traj[:, 0] = float(traj[min(c, n - 1), 0]) + (np.arange(n_out) - new_c) * step
        acq.center_sample = new_c
        acq.discard_pre = int(round(acq.discard_pre * rx / ex))
        acq.discard_post = int(round(acq.discard_post * rx / ex))
        self.ctx.options["readout_oversampling_removed"] = True
        yield acq
