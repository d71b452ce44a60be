"""Messages that flow between gadgets inside a chain.

At the edges the ``ismrmrd`` package's ``Acquisition``, ``Waveform`` and ``Image`` travel unchanged;
inside, the buffer gadget emits a :class:`KSpaceBuffer` per slice/contrast/repetition/set and the
recon gadget an :class:`ImageSeries`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

Tensor = torch.Tensor


@dataclass
class KSpaceBuffer:
    """Sorted k-space of one slice (2D or 2D+time), ready for coil processing and reconstruction.

    * ``kspace``: Cartesian ``[F, C, Ny, Nx]`` (centred, zeros where not sampled; readout oversampling
      already removed if a gadget did so) or non-Cartesian ``[F, C, M]``; complex64.
    * ``mask``: Cartesian sampling mask ``[F, Ny, Nx]`` float32.
    * ``trajectory``: non-Cartesian ``[F, 2, M]`` rad/voxel of the reconstruction grid, (ky, kx).
    * ``dcf``: ``[F, M]`` density compensation (non-Cartesian), or None.
    * ``calibration``: separate centred calibration k-space ``[C, ny, nx]`` (Cartesian ACS/reference
      lines kept apart), or None (then coil tools take the ACS from ``kspace``).
    * ``matrix``: reconstruction matrix (Ny, Nx); ``encoded_matrix`` the encoded one.
    * ``ref_headers``: one ``ismrmrd.AcquisitionHeader`` per frame (position, directions, time
      stamps) for image export.
    * ``coil_maps``: ``[C, Ny, Nx]`` once a coil-estimation gadget has run.
    """

    kspace: Tensor
    matrix: tuple[int, int]
    mask: Optional[Tensor] = None
    trajectory: Optional[Tensor] = None
    dcf: Optional[Tensor] = None
    calibration: Optional[Tensor] = None
    encoded_matrix: tuple[int, int] = (0, 0)
    fov_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    recon_fov_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    slice: int = 0
    contrast: int = 0
    repetition: int = 0
    set: int = 0
    frame_axis: str = "phase"
    ref_headers: list[Any] = field(default_factory=list)
    frame_times_s: Optional[Tensor] = None
    coil_maps: Optional[Tensor] = None
    prewhitened: bool = False
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def is_cartesian(self) -> bool:
        return self.trajectory is None

    @property
    def n_frames(self) -> int:
        return int(self.kspace.shape[0])

    @property
    def n_coils(self) -> int:
        return int(self.kspace.shape[1])


@dataclass
class ImageSeries:
    """Reconstructed complex images of one slice: ``images`` ``[F, Ny, Nx]`` complex64.

    ``ref_headers`` (one acquisition header per frame) and the indices let the exporter write
    ISMRMRD image headers with the right geometry; ``meta`` ends up in the image attributes.
    """

    images: Tensor
    fov_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    slice: int = 0
    contrast: int = 0
    repetition: int = 0
    set: int = 0
    frame_axis: str = "phase"
    ref_headers: list[Any] = field(default_factory=list)
    frame_times_s: Optional[Tensor] = None
    method: str = ""
    series_index: int = 0
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class NoiseStatistics:
    """Noise covariance of the receiver channels (from an in-stream noise scan or a stored dependency)."""

    covariance: np.ndarray          # [C, C] complex
    dwell_time_us: float
    n_samples: int
    measurement_id: str = ""
    channel_names: list[str] = field(default_factory=list)
