"""Images for people to look at: a PNG montage of frames, an animated GIF of a cine, and labelled
comparison figures (frame, error map, temporal profile, PSNR per panel) — all with Pillow."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont


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


# ----------------------------------------------------------------------------------------------
# labelled comparison figures (benchmark montage, demo comparison)


@dataclass
class Panel:
    """One reconstruction in a comparison figure: a frame, its error map and a temporal profile.

    ``image`` / ``error`` are ``[Ny, Nx]`` magnitudes on the reference's scale; ``profile`` is an
    x–t image ``[F, Nx]`` (one image row through time) or ``None`` for 2-D scans; ``caption`` is
    drawn on the panel (method and PSNR)."""

    image: np.ndarray
    caption: str
    error: Optional[np.ndarray] = None
    profile: Optional[np.ndarray] = None


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:   # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _text(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, font: ImageFont.ImageFont) -> None:
    """White text on a black box (readable on any image)."""
    box = draw.textbbox(xy, text, font=font)
    draw.rectangle((box[0] - 2, box[1] - 1, box[2] + 2, box[3] + 1), fill=0)
    draw.text(xy, text, fill=255, font=font)


def motion_row(reference: np.ndarray) -> int:
    """The image row with the most temporal variation of ``reference`` ``[F, Ny, Nx]`` (it crosses
    the moving anatomy, so its x–t profile shows temporal blurring); the centre row for one frame."""
    ref = np.abs(np.asarray(reference, dtype=np.float32))
    if ref.ndim != 3 or ref.shape[0] < 2:
        return int(ref.shape[-2] // 2)
    return int(np.argmax(ref.std(axis=0).sum(axis=1)))


def panels_for(reference: np.ndarray, recons: Sequence[tuple[str, np.ndarray, Optional[float]]],
               frame: int = 0, row: Optional[int] = None) -> list[Panel]:
    """Panels for the reference (first) and each ``(label, [F, Ny, Nx] magnitude, psnr)``: ``frame``,
    the error ``|recon − reference|`` of that frame and the x–t profile along ``row``
    (default :func:`motion_row`)."""
    ref = np.abs(np.asarray(reference, dtype=np.float32))
    ref = ref[None] if ref.ndim == 2 else ref
    r = motion_row(ref) if row is None else int(row)
    cine = ref.shape[0] > 1
    out = [Panel(ref[frame], "reference", None, ref[:, r, :] if cine else None)]
    for label, imgs, value in recons:
        x = np.abs(np.asarray(imgs, dtype=np.float32))
        x = x[None] if x.ndim == 2 else x
        cap = label if value is None or not np.isfinite(value) else f"{label}  {value:.2f} dB"
        out.append(Panel(x[frame], cap, np.abs(x[frame] - ref[frame]), x[:, r, :] if cine else None))
    return out


def write_comparison_figure(rows: Sequence[tuple[str, Sequence[Panel]]], path: str | Path,
                            error_gain: float = 5.0, zoom: int = 2, note: str = "") -> Path:
    """A labelled montage: one row per case (its title above it), one column per reconstruction;
    each panel stacks the frame, the error map (×``error_gain``) and the x–t profile (stretched to a
    readable height), with the caption (method, PSNR) on the frame. Every panel of a row is windowed
    like that row's first (reference) panel, so brightness differences are real."""
    gap, title_h = 4, 22
    font, small = _font(14), _font(11)
    blocks: list[Image.Image] = []
    width = 0
    for title, panels in rows:
        if not panels:
            continue
        top = float(np.percentile(panels[0].image, 99.5)) or 1.0
        tiles = []
        for p in panels:
            ny, nx = p.image.shape
            parts = [p.image / top]
            labels = [p.caption]
            if any(q.error is not None for q in panels):
                parts.append(np.zeros((ny, nx)) if p.error is None else p.error * error_gain / top)
                labels.append("" if p.error is None else f"error x{error_gain:g}")
            if any(q.profile is not None for q in panels) and p.profile is not None:
                f = p.profile.shape[0]
                reps = max(1, int(round(ny / 2 / max(f, 1))))
                parts.append(np.repeat(p.profile, reps, axis=0) / top)
                labels.append(f"x-t profile ({f} frames)")
            tile_imgs = []
            for arr, lab in zip(parts, labels):
                im = Image.fromarray(np.clip(arr * 255.0, 0, 255).astype(np.uint8))
                im = im.resize((im.width * zoom, im.height * zoom), Image.NEAREST)
                if lab:
                    _text(ImageDraw.Draw(im), (3, 2), lab, font if lab == p.caption else small)
                tile_imgs.append(im)
            h = sum(t.height for t in tile_imgs) + gap * (len(tile_imgs) - 1)
            col = Image.new("L", (tile_imgs[0].width, h), 40)
            y = 0
            for t in tile_imgs:
                col.paste(t, (0, y))
                y += t.height + gap
            tiles.append(col)
        w = sum(t.width for t in tiles) + gap * (len(tiles) - 1)
        h = max(t.height for t in tiles) + title_h
        block = Image.new("L", (w, h), 0)
        ImageDraw.Draw(block).text((4, 3), title, fill=255, font=font)
        x = 0
        for t in tiles:
            block.paste(t, (x, title_h))
            x += t.width + gap
        blocks.append(block)
        width = max(width, w)
    note_h = title_h if note else 0
    height = sum(b.height for b in blocks) + gap * max(len(blocks) - 1, 0) + note_h
    fig = Image.new("L", (max(width, 1), max(height, 1)), 0)
    y = 0
    for b in blocks:
        fig.paste(b, (0, y))
        y += b.height + gap
    if note:
        ImageDraw.Draw(fig).text((4, y + 2), note, fill=200, font=small)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.save(path)
    return path
