"""Noise dependency store: coil noise statistics saved by one measurement, used by later ones.

A noise-only (or any) measurement that contains noise scans saves its covariance under the
header's ``measurementInformation/measurementID``; a later measurement whose header names it in
``measurementDependency`` (type ``Noise``) loads it and prewhitens with it (PROTOCOL.md §3.3).

Files are ``noise_<id>.npz`` in one folder, written atomically (temporary file + rename) and
read with ``allow_pickle=False``. The id is reduced to ``[A-Za-z0-9._-]``; when that changes it
(or it is very long) a short hash of the original id is appended so distinct ids never share a
file, and the resulting path is checked to lie inside the folder.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np

from gadgets.messages import NoiseStatistics

__all__ = ["NoiseStore", "noise_summary", "sanitize_measurement_id"]

_SAFE = re.compile(r"[^A-Za-z0-9._-]")
_MAX_LEN = 96


def sanitize_measurement_id(measurement_id: str) -> str:
    """A file-name-safe form of a measurement id (no separators, no leading dot, bounded length).

    Raises
    ------
    ValueError
        When the id is empty.
    """
    mid = str(measurement_id)
    if not mid.strip():
        raise ValueError("measurement id is empty")
    safe = _SAFE.sub("_", mid).lstrip(".")
    if safe != mid or len(safe) > _MAX_LEN or not safe:
        digest = hashlib.sha256(mid.encode("utf-8")).hexdigest()[:12]
        safe = f"{safe[:_MAX_LEN]}_{digest}" if safe else digest
    return safe


class NoiseStore:
    """A folder of noise statistics keyed by measurement id.

    Parameters
    ----------
    folder : directory holding the ``noise_<id>.npz`` files (created on the first save).
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)

    def path_for(self, measurement_id: str) -> Path:
        """The file that holds (or would hold) the statistics of ``measurement_id``."""
        root = self.folder.resolve()
        path = (root / f"noise_{sanitize_measurement_id(measurement_id)}.npz").resolve()
        if path.parent != root:  # cannot happen after sanitising; kept as a hard guarantee
            raise ValueError(f"measurement id {measurement_id!r} escapes the noise folder {root}")
        return path

    def save(self, measurement_id: str, stats: NoiseStatistics) -> Path:
        """Write ``stats`` for ``measurement_id`` (replacing an older file); returns the path."""
        cov = np.asarray(stats.covariance, dtype=np.complex128)
        if cov.ndim != 2 or cov.shape[0] != cov.shape[1] or cov.shape[0] == 0:
            raise ValueError(f"noise covariance must be a non-empty square matrix, got shape {cov.shape}")
        path = self.path_for(measurement_id)
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".noise_", suffix=".npz", dir=str(path.parent))
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(
                    fh,
                    covariance=cov,
                    dwell_time_us=np.float64(stats.dwell_time_us),
                    n_samples=np.int64(stats.n_samples),
                    measurement_id=np.str_(str(measurement_id)),
                    channel_names=np.array([str(c) for c in stats.channel_names], dtype=np.str_),
                )
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    def load(self, measurement_id: str) -> Optional[NoiseStatistics]:
        """The stored statistics of ``measurement_id``, or None when there are none.

        Raises
        ------
        ValueError
            When the file exists but is not a valid noise-statistics file.
        """
        path = self.path_for(measurement_id)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                cov = np.asarray(z["covariance"], dtype=np.complex128)
                dwell = float(z["dwell_time_us"])
                n = int(z["n_samples"])
                mid = str(z["measurement_id"])
                names = [str(c) for c in z["channel_names"]]
        except (OSError, KeyError, ValueError) as exc:
            raise ValueError(f"noise dependency file {path} is unreadable: {exc}") from exc
        if cov.ndim != 2 or cov.shape[0] != cov.shape[1]:
            raise ValueError(f"noise dependency file {path}: covariance has shape {cov.shape}, not [C, C]")
        return NoiseStatistics(covariance=cov, dwell_time_us=dwell, n_samples=n, measurement_id=mid,
                               channel_names=names)

    def __contains__(self, measurement_id: object) -> bool:
        return isinstance(measurement_id, str) and self.path_for(measurement_id).is_file()


def noise_summary(stats: Optional[NoiseStatistics]) -> dict[str, Any]:
    """Summary of noise statistics for the dependency query (PROTOCOL.md §3.3).

    Keys: ``status`` ("success" or "failed"), ``channels``, ``min_sigma``, ``max_sigma``,
    ``mean_sigma`` (per-channel noise standard deviation ``sqrt(Ψ_cc)``), ``noise_dwell_time_us``,
    ``n_samples`` and ``measurement_id``. ``None`` (no stored dependency) gives ``status`` "failed".
    """
    if stats is None:
        return {"status": "failed", "channels": 0}
    sigma = np.sqrt(np.clip(np.real(np.diag(np.asarray(stats.covariance))), 0.0, None))
    return {
        "status": "success",
        "channels": int(sigma.size),
        "min_sigma": float(sigma.min()) if sigma.size else 0.0,
        "max_sigma": float(sigma.max()) if sigma.size else 0.0,
        "mean_sigma": float(sigma.mean()) if sigma.size else 0.0,
        "noise_dwell_time_us": float(stats.dwell_time_us),
        "n_samples": int(stats.n_samples),
        "measurement_id": stats.measurement_id,
    }
