"""The shared in-vivo brain (16 ch, 128², fully sampled Cartesian) as tensors, and its R=4 version."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import torch

from recon_core.fft import ifft2c
from recon_core.trajectories import uniform_mask

BRAIN = "brain_invivo_16ch_128_cartesian.h5"

# BART reference, measured once on this project's CI machine kind (Debian bart 0.8.00):
#   bart ecalib -m1 -r 24 us maps && bart pics -l2 -r 0.01 -S us maps rec
# on the R=4 (uniform, 24 ACS lines) brain below; NRMSE of |rec| against the root-sum-of-squares of
# the fully sampled coil images inside the support (RSS > 10 % of max), after one least-squares scale.
BART_PICS_L2_NRMSE_R4 = 0.0525


def load_brain_kspace(shared_data: Path) -> torch.Tensor:
    """Fully sampled centred k-space ``[16, 128, 128]`` (complex64) from the ISMRMRD file."""
    with h5py.File(shared_data / BRAIN, "r", locking=False) as f:
        recs = f["dataset/data"][:]
    first = recs[0]
    n_ch, n_s = int(first["head"]["active_channels"]), int(first["head"]["number_of_samples"])
    k = np.zeros((n_ch, 128, 128), np.complex64)
    for r in recs:
        line = int(r["head"]["idx"]["kspace_encode_step_1"])
        k[:, line, :] = np.asarray(r["data"], dtype=np.float32).view(np.complex64).reshape(n_ch, n_s)
    return torch.from_numpy(k)


def r4_mask() -> torch.Tensor:
    """Uniform R=4 phase-encode mask with 24 central lines, ``[128, 128]``."""
    return uniform_mask(128, 128, 4, 24, 1)[0]


def reference_and_support(kspace: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fully sampled root-sum-of-squares image and the support mask (RSS > 10 % of max)."""
    rss = ifft2c(kspace).abs().pow(2).sum(0).sqrt()
    return rss, rss > 0.1 * rss.max()


def support_nrmse(image: torch.Tensor, reference: torch.Tensor, support: torch.Tensor) -> float:
    """NRMSE of ``|image|`` vs ``reference`` inside ``support`` after one least-squares scale."""
    x, r = image.abs().to(torch.float64)[support], reference.to(torch.float64)[support]
    a = (x * r).sum() / (x * x).sum()
    return float(torch.linalg.vector_norm(a * x - r) / torch.linalg.vector_norm(r))
