"""Images for people to look at: a PNG montage of frames and an animated GIF of a cine (Pillow)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image


def to_uint8(mag: np.ndarray, percentile: float = 99.5) -> np.ndarray:
    """Window magnitude images to 0..255 using a high percentile of the whole series (robust to spikes)."""
    mag = np.asarray(mag, dtype=np.float32)
    top = float(np.percentile(mag, percentile)) if mag.size else 0.0
    if top <= 0:
        top = float(mag.max()) if mag.size and mag.max() > 0 else 1.0
    return np.clip(mag / top * 255.0, 0, 255).astype(np.uint8)


def montage(frames: np.ndarray, columns: Optional[int] = None, pad: int = 2) -> np.ndarray:
    """Tile ``[F, Ny, Nx]`` frames into one 2-D array (row-major, padded with zeros)."""
    frames = np.asarray(frames)
    if frames.ndim == 2:
        frames = frames[None]
    n, ny, nx = frames.shape
    cols = columns or int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    out = np.zeros((rows * (ny + pad) - pad, cols * (nx + pad) - pad), dtype=frames.dtype)
    for i in range(n):
        r, c = divmod(i, cols)
        out[r * (ny + pad): r * (ny + pad) + ny, c * (nx + pad): c * (nx + pad) + nx] = frames[i]
    return out


def write_montage_png(mag: np.ndarray, path: str | Path, columns: Optional[int] = None) -> Path:
    """Write a montage of magnitude frames ``[F, Ny, Nx]`` (or several series side by side) as PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(montage(to_uint8(mag), columns)).save(path)
    return path


def write_comparison_png(rows: Sequence[np.ndarray], path: str | Path, frames: Sequence[int] = (0,)) -> Path:
    """One row per reconstruction (e.g. truth, zero-filled, CG-SENSE), the chosen frames as columns."""
    tiles = [np.concatenate([to_uint8(r)[f] for f in frames], axis=1) for r in rows]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(tiles, axis=0)).save(path)
    return path


def write_cine_gif(mag: np.ndarray, path: str | Path, fps: Optional[float] = None) -> Path:
    """Write ``[F, Ny, Nx]`` magnitude frames as a looping animated GIF (frame rate from the timing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = [Image.fromarray(f) for f in to_uint8(mag)]
    duration_ms = int(round(1000.0 / fps)) if fps and fps > 0 else 80
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=max(duration_ms, 20), loop=0)
    return path
