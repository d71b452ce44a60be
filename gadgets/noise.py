"""The ``noise`` gadget: coil noise prewhitening (Gadgetron's NoiseAdjustGadget).

Noise scans (flag IS_NOISE_MEASUREMENT) are consumed: their samples are accumulated into the
coil noise covariance ``Ψ``. At the first other acquisition the prewhitening matrix
``W = L⁻¹`` (``Ψ = L Lᴴ``) is formed and scaled for the noise/data dwell-time ratio and the
receiver noise bandwidth exactly as Gadgetron does
(``sqrt(2 · data_dwell / noise_dwell · relativeReceiverNoiseBandwidth)``); every following
acquisition's data are replaced by ``W · data`` along the channel axis (complex64).

Noise dependencies: statistics from an in-stream noise scan are saved (``save_noise``) in the
:class:`~gadgets.stream.storage.NoiseStore` under the header's
``measurementInformation/measurementID``. A measurement without noise scans whose header names a
``measurementDependency`` (``Noise`` first, then any other type) loads those statistics instead. A
missing dependency or a channel-count mismatch is a WARNING and the data pass unwhitened — never
an error and never a wait.

The gadget records what it did in ``ctx.options``: ``prewhitened`` (bool), ``noise_statistics``
(the :class:`NoiseStatistics` used) and ``noise_scans`` (number of noise acquisitions seen).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import ismrmrd
import numpy as np
import torch

from gadgets.base import ChainContext, Gadget, GadgetParams
from gadgets.messages import NoiseStatistics
from gadgets.stream.storage import NoiseStore
from recon_core import coils

__all__ = ["NoiseGadget", "NoiseParams", "parsed_header"]

DEFAULT_RECEIVER_NOISE_BANDWIDTH = 0.793


def parsed_header(ctx: ChainContext) -> Any:
    """The chain's parsed ISMRMRD header (parsing ``ctx.header_xml`` once if needed), or None."""
    if ctx.header is None and ctx.header_xml:
        ctx.header = ismrmrd.xsd.CreateFromDocument(ctx.header_xml)
    return ctx.header


@dataclass
class NoiseParams(GadgetParams):
    """Parameters of :class:`NoiseGadget`.

    enabled : False makes the gadget a pass-through.
    store_dir : noise dependency folder; None → ``ctx.storage_dir`` (None there too → no store).
    save_noise : save statistics of an in-stream noise scan under the measurement id.
    skip_channels : channel indices left out of prewhitening (neither mixed nor scaled).
    receiver_noise_bandwidth : overrides the header's ``relativeReceiverNoiseBandwidth``
        (default 0.793 when the header has none).
    """

    enabled: bool = True
    store_dir: Optional[str] = None
    save_noise: bool = True
    skip_channels: list[int] = field(default_factory=list)
    receiver_noise_bandwidth: Optional[float] = None

    @classmethod
    def check_untrusted(cls, values: Optional[dict], where: str) -> None:
        """A chain from the network may not choose the noise folder (``store_dir``): the server's
        own folder (``--noise-store``) is used."""
        from gadgets.base import ChainError

        if (values or {}).get("store_dir") not in (None, ""):
            raise ChainError(f"{where}: parameter 'store_dir' names a folder on the server; a chain sent "
                             f"over the network may not set it (the server's noise folder is used)")

    def validate(self, where: str) -> None:
        from gadgets.base import ChainError

        if any(c < 0 for c in self.skip_channels):
            raise ChainError(f"{where}: parameter 'skip_channels' must hold channel indices >= 0, "
                             f"got {self.skip_channels}")
        if self.receiver_noise_bandwidth is not None and not self.receiver_noise_bandwidth > 0:
            raise ChainError(f"{where}: parameter 'receiver_noise_bandwidth' must be > 0, "
                             f"got {self.receiver_noise_bandwidth}")


class NoiseGadget(Gadget):
    """Consume noise scans, prewhiten all other acquisitions in place (see module docstring)."""

    name = "noise"
    Params = NoiseParams
    accepts = (ismrmrd.Acquisition,)

    def __init__(self, params: NoiseParams | None = None, ctx: ChainContext | None = None) -> None:
        super().__init__(params, ctx)
        self._sum: Optional[np.ndarray] = None      # Σ x xᴴ over noise samples, complex128
        self._mean_sum: Optional[np.ndarray] = None  # Σ x (to remove the DC offset)
        self._n = 0
        self._noise_dwell = 0.0
        self._n_noise_scans = 0
        self._decided = False                        # noise statistics fixed (first data seen)
        self._stats: Optional[NoiseStatistics] = None
        self._saved = False
        self._w_cache: dict[tuple[float, int], Optional[np.ndarray]] = {}
        self._late_noise_warned = False

    # ------------------------------------------------------------------ header facts

    def _measurement_id(self) -> str:
        h = parsed_header(self.ctx)
        info = getattr(h, "measurementInformation", None) if h is not None else None
        mid = getattr(info, "measurementID", None) if info is not None else None
        return str(mid) if mid else ""

    def _dependency_ids(self) -> list[str]:
        h = parsed_header(self.ctx)
        info = getattr(h, "measurementInformation", None) if h is not None else None
        deps = list(getattr(info, "measurementDependency", None) or []) if info is not None else []
        noise = [d.measurementID for d in deps if str(d.dependencyType or "").lower() == "noise"]
        other = [d.measurementID for d in deps if str(d.dependencyType or "").lower() != "noise"]
        return [str(m) for m in noise + other if m]

    def _bandwidth(self) -> float:
        p: NoiseParams = self.params  # type: ignore[assignment]
        if p.receiver_noise_bandwidth is not None:
            return float(p.receiver_noise_bandwidth)
        h = parsed_header(self.ctx)
        sysinfo = getattr(h, "acquisitionSystemInformation", None) if h is not None else None
        bw = getattr(sysinfo, "relativeReceiverNoiseBandwidth", None) if sysinfo is not None else None
        return float(bw) if bw else DEFAULT_RECEIVER_NOISE_BANDWIDTH

    def _store(self) -> Optional[NoiseStore]:
        p: NoiseParams = self.params  # type: ignore[assignment]
        folder = p.store_dir if p.store_dir else self.ctx.storage_dir
        return NoiseStore(Path(folder)) if folder else None

    # ------------------------------------------------------------------ noise accumulation

    def _accumulate(self, acq: ismrmrd.Acquisition) -> None:
        x = np.asarray(acq.data, dtype=np.complex128)
        if self._sum is not None and self._sum.shape[0] != x.shape[0]:
            raise self.error(
                f"noise scan {acq.scan_counter}: active_channels is {x.shape[0]} but earlier noise "
                f"scans had {self._sum.shape[0]}"
            )
        if self._sum is None:
            self._sum = np.zeros((x.shape[0], x.shape[0]), dtype=np.complex128)
            self._mean_sum = np.zeros(x.shape[0], dtype=np.complex128)
            self._noise_dwell = float(acq.sample_time_us)
        self._sum += x @ x.conj().T
        self._mean_sum += x.sum(axis=1)
        self._n += x.shape[1]

    def _noise_statistics(self) -> Optional[NoiseStatistics]:
        """Covariance of the accumulated noise (mean removed, unbiased), or None."""
        if self._sum is None or self._n < 2:
            return None
        mean = self._mean_sum / self._n
        cov = (self._sum - self._n * np.outer(mean, mean.conj())) / (self._n - 1)
        cov = 0.5 * (cov + cov.conj().T)
        return NoiseStatistics(covariance=cov, dwell_time_us=self._noise_dwell, n_samples=self._n,
                               measurement_id=self._measurement_id(),
                               channel_names=self._channel_names())

    def _channel_names(self) -> list[str]:
        h = parsed_header(self.ctx)
        sysinfo = getattr(h, "acquisitionSystemInformation", None) if h is not None else None
        labels = list(getattr(sysinfo, "coilLabel", None) or []) if sysinfo is not None else []
        return [str(lab.coilName) for lab in labels]

    def _save(self, stats: NoiseStatistics) -> None:
        p: NoiseParams = self.params  # type: ignore[assignment]
        if not p.save_noise or self._saved:
            return
        self._saved = True
        mid = self._measurement_id()
        store = self._store()
        if not mid:
            self.log.info("noise statistics not saved: the header has no "
                          "measurementInformation/measurementID")
            return
        if store is None:
            self.log.info("noise statistics of %s not saved: no noise dependency folder configured", mid)
            return
        path = store.save(mid, stats)
        self.log.info("saved noise statistics of %s (%d channels, %d samples) to %s",
                      mid, stats.covariance.shape[0], stats.n_samples, path)

    def _load_dependency(self) -> Optional[NoiseStatistics]:
        ids = self._dependency_ids()
        if not ids:
            self.log.info("no noise scan and no noise dependency in the header: data are not prewhitened")
            return None
        store = self._store()
        if store is None:
            self.log.warning("noise dependency %s named in the header but no noise dependency folder is "
                             "configured: data are not prewhitened", ", ".join(ids))
            return None
        for mid in ids:
            try:
                stats = store.load(mid)
            except ValueError as exc:
                self.log.warning("noise dependency %s: %s", mid, exc)
                continue
            if stats is not None:
                self.log.info("loaded noise dependency %s from %s", mid, store.folder)
                return stats
        self.log.warning("noise dependency %s not found in %s: data are not prewhitened",
                         ", ".join(ids), store.folder)
        return None

    def _decide(self) -> None:
        """Fix the noise statistics at the first non-noise acquisition."""
        self._decided = True
        stats = self._noise_statistics()
        if stats is not None:
            self._save(stats)
        else:
            stats = self._load_dependency()
        self._stats = stats
        self.ctx.options["noise_statistics"] = stats

    # ------------------------------------------------------------------ prewhitening

    def _matrix(self, n_channels: int, data_dwell: float, scan: int) -> Optional[np.ndarray]:
        key = (float(data_dwell), int(n_channels))
        if key in self._w_cache:
            return self._w_cache[key]
        stats = self._stats
        w: Optional[np.ndarray] = None
        if stats is None:
            return None
        c = stats.covariance.shape[0]
        if c != n_channels:
            self.log.warning(
                "acquisition %d: active_channels is %d but the noise statistics (%s) have %d channels: "
                "data are not prewhitened", scan, n_channels, stats.measurement_id or "in-stream", c)
        else:
            p: NoiseParams = self.params  # type: ignore[assignment]
            skip = sorted({ch for ch in p.skip_channels if ch < c})
            keep = [ch for ch in range(c) if ch not in skip]
            cov = torch.from_numpy(np.ascontiguousarray(stats.covariance[np.ix_(keep, keep)]))
            try:
                w_sub = coils.prewhitening_matrix(cov).numpy()
            except ValueError as exc:
                self.log.warning("noise covariance unusable (%s): data are not prewhitened", exc)
                self._w_cache[key] = None
                return None
            if stats.dwell_time_us > 0 and data_dwell > 0:
                scale = coils.noise_bandwidth_scale(stats.dwell_time_us, data_dwell, self._bandwidth())
            else:
                self.log.debug("dwell time unknown (noise %.3g us, data %.3g us): no dwell-time scaling",
                               stats.dwell_time_us, data_dwell)
                scale = coils.noise_bandwidth_scale(1.0, 1.0, self._bandwidth())
            w = np.eye(c, dtype=np.complex128)
            w[np.ix_(keep, keep)] = w_sub * scale
            self.log.info("prewhitening %d channels (scale %.4f, noise dwell %.3g us, data dwell %.3g us)",
                          len(keep), scale, stats.dwell_time_us, data_dwell)
        self._w_cache[key] = w
        return w

    def process(self, acq: ismrmrd.Acquisition) -> Iterator[Any]:
        p: NoiseParams = self.params  # type: ignore[assignment]
        if not p.enabled:
            yield acq
            return
        if acq.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT):
            self._n_noise_scans += 1
            self.ctx.options["noise_scans"] = self._n_noise_scans
            if self._decided:
                if not self._late_noise_warned:
                    self.log.warning("noise scan %d arrived after imaging data: ignored", acq.scan_counter)
                    self._late_noise_warned = True
                return
            self._accumulate(acq)
            return
        if not self._decided:
            self._decide()
        if self._stats is None:
            self.ctx.options.setdefault("prewhitened", False)
            yield acq
            return
        w = self._matrix(acq.active_channels, float(acq.sample_time_us), acq.scan_counter)
        if w is None:
            self.ctx.options["prewhitened"] = False
            yield acq
            return
        # A new Acquisition: the caller's object (e.g. a list read once and run twice) stays untouched.
        white = (w @ acq.data.astype(np.complex128)).astype(np.complex64)
        out = ismrmrd.Acquisition(ismrmrd.AcquisitionHeader.from_buffer_copy(acq.getHead()), white,
                                  np.array(acq.traj, dtype=np.float32, copy=True))
        self.ctx.options["prewhitened"] = True
        yield out

    def flush(self) -> Iterator[Any]:
        """A noise-only stream (a dependency measurement) saves its statistics here."""
        p: NoiseParams = self.params  # type: ignore[assignment]
        if p.enabled and not self._decided:
            stats = self._noise_statistics()
            if stats is not None:
                self._stats = stats
                self.ctx.options["noise_statistics"] = stats
                self._save(stats)
        return iter(())
