"""Gadgets of Gadgetron's generic Cartesian image stage, with the same meaning as Gadgetron's.

Image-array stage (our :class:`~gadgets.messages.ImageSeries` is Gadgetron's ``IsmrmrdImageArray``):

* ``simple_recon`` (SimpleReconGadget): k-space buffer → inverse FFT per coil → root sum of squares.
* ``eigen_channel`` (GenericReconEigenChannelGadget, upstream coil compression): k-space buffer →
  eigen-channels of the calibration data, keeping the modes whose eigenvalue is above
  ``threshold`` × the largest one (or the first ``modes`` ones).
* ``partial_fourier`` (GenericReconPartialFourierHandlingFilter/POCS): a tapered filter at the
  sampled edge of a partial-Fourier k-space, or POCS with the low-resolution phase.
* ``kspace_filter`` (GenericReconKSpaceFilteringGadget): Gaussian / Hanning / tapered-Hanning
  apodisation along readout and phase encoding, normalised to unit RMS like Gadgetron's.
* ``fov_adjust`` (GenericReconFieldOfViewAdjustmentGadget): images brought to the header's
  ``reconSpace`` matrix by k-space zero-padding or cropping.
* ``image_scale`` (GenericReconImageArrayScalingGadget): a constant scaling factor, or Gadgetron's
  automatic one (fixed factor halved until the maximum fits, else maximum → 4095 × 0.5… see
  :meth:`ImageScaleGadget._auto`).
* ``noise_std_map`` (GenericReconNoiseStdMapComputingGadget): standard deviation over the frames
  (repetitions) as an extra series.

Image stage (``ismrmrd.Image`` messages, after ``image_export`` split the array):

* ``complex_to_float`` (ComplexToFloatGadget): magnitude / phase / real / imaginary by image type.
* ``extract`` (ExtractGadget): one float image per selected type, series index + 0/1000/2000/3000.
* ``auto_scale`` (AutoScaleGadget): magnitude scaled so its 99th percentile is ``max_value``.
* ``float_to_ushort`` (FloatToUShortGadget): clamp to ``[min_intensity, max_intensity]``, round, uint16.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator, Literal

import ismrmrd
import numpy as np
import torch

from gadgets.base import ChainError, Gadget, GadgetParams
from gadgets.messages import ImageSeries, KSpaceBuffer
from gadgets.noise import parsed_header
from gadgets.recon import crop_to_matrix

Tensor = torch.Tensor
FilterKind = Literal["none", "gaussian", "hanning", "tapered_hanning"]

#: ExtractGadget's series index offsets per image type
SERIES_OFFSET = {ismrmrd.IMTYPE_MAGNITUDE: 0, ismrmrd.IMTYPE_REAL: 1000, ismrmrd.IMTYPE_IMAG: 2000,
                 ismrmrd.IMTYPE_PHASE: 3000}


def _fft2c(x: Tensor) -> Tensor:
    axes = (-2, -1)
    return torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(x, dim=axes), norm="ortho"), dim=axes)


def _ifft2c(x: Tensor) -> Tensor:
    axes = (-2, -1)
    return torch.fft.fftshift(torch.fft.ifft2(torch.fft.ifftshift(x, dim=axes), norm="ortho"), dim=axes)


# --------------------------------------------------------------------------------------------
# filters (Gadgetron's definitions, normalised to unit RMS)
# --------------------------------------------------------------------------------------------


def symmetric_filter(n: int, kind: FilterKind, sigma: float = 1.0, width: int = 1) -> np.ndarray:
    """Gadgetron's symmetric k-space filter of length ``n`` (zero at index 0 for even ``n``, so the
    filter is symmetric about the centre ``n//2``), scaled to unit RMS.

    gaussian: ``exp(-sigma² x² / 2)`` on ``x ∈ [-1, 1]``; hanning: a Hann window over the whole
    length; tapered_hanning: 1 with Hann tapers ``width`` samples long at both ends; none: ones.
    """
    if n <= 0:
        return np.ones(0)
    width = 1 if width <= 0 or width >= n else width
    f = np.ones(n)
    if kind == "gaussian":
        if n % 2 == 0:
            x = -1 + np.arange(n - 1) * (2.0 / (n - 2)) if n > 2 else np.zeros(n - 1)
            f[1:] = np.exp(-0.5 * sigma * sigma * x * x)
            f[0] = 0.0
        else:
            x = -1 + np.arange(n) * (2.0 / (n - 1)) if n > 1 else np.zeros(1)
            f = np.exp(-0.5 * sigma * sigma * x * x)
    elif kind == "tapered_hanning":
        w = 0.5 * (1 - np.cos(2 * np.pi * np.arange(1, width + 1) / (2 * width + 1)))
        if n % 2 == 0:
            f[1:width + 1] = w
            f[n - width:] = w[::-1]
            f[0] = 0.0
        else:
            f[:width] = w
            f[n - width:] = w[::-1]
    elif kind == "hanning":
        if n % 2 == 0:
            m = n - 1
            half = (m + 1) // 2
            f[0] = 0.0
            f[1:half + 1] = 0.5 * (1 - np.cos(2 * np.pi * np.arange(1, half + 1) / (m + 1)))
            for i in range(half, m):
                f[i + 1] = f[m - i]
        else:
            half = (n + 1) // 2
            f[:half] = 0.5 * (1 - np.cos(2 * np.pi * np.arange(1, half + 1) / (n + 1)))
            for i in range(half, n):
                f[i] = f[n - 1 - i]
    rms = math.sqrt(float((f * f).sum()) / n)
    return f / rms if rms > 0 else f


def _sampled(series: ImageSeries, shape: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """First/last sampled k-space row and column of the series on a grid of ``shape`` (from the
    buffer's ``kspace_sampled`` meta, rescaled when the image grid differs), or None."""
    s = series.meta.get("kspace_sampled")
    if not s or len(s) != 6:
        return None
    r0, r1, c0, c1, ny, nx = (int(v) for v in s)
    my, mx = shape

    def rescale(a: int, b: int, n: int, m: int) -> tuple[int, int]:
        if n == m:
            return a, b
        ca, cb = a - n // 2, b - n // 2
        return max(0, m // 2 + round(ca * m / n)), min(m - 1, m // 2 + round(cb * m / n))

    r0, r1 = rescale(r0, r1, ny, my)
    c0, c1 = rescale(c0, c1, nx, mx)
    return r0, r1, c0, c1


def _series_like(series: ImageSeries, images: Tensor, **meta: Any) -> ImageSeries:
    out = ImageSeries(**{k: getattr(series, k) for k in series.__dataclass_fields__})
    out.images = images
    out.meta = dict(series.meta)
    out.meta.update(meta)
    return out


# --------------------------------------------------------------------------------------------
# k-space buffer stage
# --------------------------------------------------------------------------------------------


@dataclass
class SimpleReconParams(GadgetParams):
    """SimpleReconGadget has no parameters."""


class SimpleReconGadget(Gadget):
    """Gadgetron's SimpleRecon: inverse FFT of each coil's zero-filled k-space, root sum of squares.

    No coil maps, no unaliasing: undersampled data stay aliased, exactly as in Gadgetron's
    ``default.xml``. Images are cropped to the reconstruction matrix.
    """

    name = "simple_recon"
    Params = SimpleReconParams
    accepts = (KSpaceBuffer,)

    def process(self, buf: KSpaceBuffer) -> Iterator[ImageSeries]:
        if not buf.is_cartesian:
            raise self.error("SimpleRecon (FFT + root sum of squares) needs Cartesian data")
        coil_images = _ifft2c(buf.kspace.to(self.ctx.device))            # [F, C, Ny, Nx]
        rss = coil_images.abs().pow(2).sum(1).sqrt().to(torch.complex64)  # [F, Ny, Nx]
        images = crop_to_matrix(rss, buf.matrix)
        meta = dict(buf.meta)
        meta["ReconMethod"] = "simple_recon"
        yield ImageSeries(images=images, fov_mm=buf.recon_fov_mm if any(buf.recon_fov_mm) else buf.fov_mm,
                          slice=buf.slice, contrast=buf.contrast, repetition=buf.repetition, set=buf.set,
                          frame_axis=buf.frame_axis, ref_headers=buf.ref_headers,
                          frame_times_s=buf.frame_times_s, method="simple_recon", meta=meta)


@dataclass
class EigenChannelParams(GadgetParams):
    """threshold: keep eigen-channels with eigenvalue ≥ threshold × the largest (< 0: keep all);
    modes: keep exactly this many (0: use the threshold)."""

    threshold: float = 0.002
    modes: int = 0

    def validate(self, where: str) -> None:
        if self.modes < 0:
            raise ChainError(f"{where}: parameter 'modes' must be >= 0, got {self.modes}")


class EigenChannelGadget(Gadget):
    """Upstream coil compression to eigen-channels (Gadgetron's GenericReconEigenChannel).

    The channel covariance of the calibration data (or of the whole k-space without calibration
    lines) gives the eigen-channels; the k-space and the calibration block are projected onto the
    kept ones. Per (slice, contrast, set) the first buffer's transform is reused, so all
    repetitions share one set of virtual coils.
    """

    name = "eigen_channel"
    Params = EigenChannelParams
    accepts = (KSpaceBuffer,)

    def __init__(self, params: EigenChannelParams | None = None, ctx: Any = None) -> None:
        super().__init__(params, ctx)
        self._transforms: dict[tuple[int, int, int], Tensor] = {}

    def _transform(self, buf: KSpaceBuffer) -> Tensor:
        p: EigenChannelParams = self.params  # type: ignore[assignment]
        c = buf.n_coils
        src = buf.calibration if buf.calibration is not None else buf.kspace.transpose(0, 1)
        x = src.to(self.ctx.device).reshape(c, -1)
        cov = x @ x.conj().T
        evals, evecs = torch.linalg.eigh(cov)                 # ascending
        evals, evecs = evals.flip(0), evecs.flip(1)
        if p.modes > 0:
            keep = min(p.modes, c)
        elif p.threshold < 0:
            keep = c
        else:
            keep = int((evals >= p.threshold * evals[0]).sum().clamp_min(1))
        return evecs[:, :keep].conj().T.to(torch.complex64)   # [keep, C]

    def process(self, buf: KSpaceBuffer) -> Iterator[KSpaceBuffer]:
        if buf.coil_maps is not None:
            raise self.error("eigen-channel compression must run before coil estimation")
        key = (buf.slice, buf.contrast, buf.set)
        if key not in self._transforms:
            self._transforms[key] = self._transform(buf)
            self.log.info("eigen-channels: %d of %d coils kept", self._transforms[key].shape[0], buf.n_coils)
        a = self._transforms[key].to(buf.kspace.device)
        if a.shape[1] != buf.n_coils:
            raise self.error(f"buffer has {buf.n_coils} coils, the eigen-channel transform of this slice "
                             f"{a.shape[1]}")
        buf.kspace = torch.einsum("vc,fc...->fv...", a, buf.kspace)
        if buf.calibration is not None:
            buf.calibration = torch.einsum("vc,c...->v...", a.to(buf.calibration.device), buf.calibration)
        buf.meta["EigenChannels"] = int(a.shape[0])
        yield buf


@dataclass
class GrappaMapsParams(GadgetParams):
    """gfactor / snr: send the g-factor map / the SNR-unit image as extra series (GRAPPA's unmixing
    weights); gfactor_series / snr_series: their series index offsets from the images' series."""

    gfactor: bool = True
    snr: bool = False
    gfactor_series: int = 19
    snr_series: int = 299
    #: the GRAPPA kernel of the images' reconstruction (so the maps describe that kernel)
    lam: float = 5e-4
    kernel_e1: int = 4
    kernel_ro: int = 5


class GrappaMapsGadget(Gadget):
    """Gadgetron's ``send_out_gfactor`` / ``send_out_snr_map``: before the GRAPPA reconstruction,
    add the g-factor map and the SNR map of each buffer as their own image series (``DataRole``
    ``GFactor`` / ``SnrMap``, meta ``Skip_processing_after_recon`` so partial-Fourier handling and
    k-space filtering leave them alone; Gadgetron's series numbers image_series + 20 and + 300). The
    buffer passes on unchanged to the reconstruction."""

    name = "grappa_maps"
    Params = GrappaMapsParams
    accepts = (KSpaceBuffer,)

    def __init__(self, params: GrappaMapsParams | None = None, ctx: Any = None) -> None:
        super().__init__(params, ctx)
        from gadgets.recon import ReconGadget, ReconParams

        p: GrappaMapsParams = self.params  # type: ignore[assignment]
        self._recons = []
        for on, output, role, offset in ((p.gfactor, "gfactor", "GFactor", p.gfactor_series),
                                         (p.snr, "snr", "SnrMap", p.snr_series)):
            if on:
                rp = ReconParams.from_mapping({"method": "grappa", "output": output, "lam": p.lam,
                                               "kernel_e1": p.kernel_e1, "kernel_ro": p.kernel_ro},
                                              f"{self.name} ({output})")
                self._recons.append((ReconGadget(rp, self.ctx), role, offset))

    def process(self, buf: KSpaceBuffer) -> Iterator[Any]:
        for recon, role, offset in self._recons:
            for series in recon.process(buf):
                series.meta.update({"DataRole": role, "ImageRole": role, "Skip_processing_after_recon": 1})
                series.series_index = offset
                yield series
        yield buf


# --------------------------------------------------------------------------------------------
# image-array stage
# --------------------------------------------------------------------------------------------


@dataclass
class PartialFourierParams(GadgetParams):
    """mode: ``filter`` (tapered transition at the sampled edge) or ``pocs``; ``ro_width``/
    ``e1_width``: taper width as a fraction of the matrix (filter); ``density_comp``: weight the
    one-sided part ×2 (filter); ``iterations``, ``threshold``, ``transit_band``: POCS."""

    mode: Literal["filter", "pocs"] = "filter"
    ro_width: float = 0.15
    e1_width: float = 0.15
    density_comp: bool = False
    iterations: int = 6
    threshold: float = 0.01
    transit_band: int = 24
    skip_meta: str = "Skip_processing_after_recon"


def _asymmetric_filter(n: int, start: int, end: int, width: int, density_comp: bool) -> np.ndarray:
    """1 on ``[start, end]`` with tapered-Hanning edges on the partial-Fourier side(s); with
    ``density_comp`` the one-sided part counts twice (Gadgetron's generate_asymmetric_filter)."""
    f = np.zeros(n)
    f[start:end + 1] = 1.0
    width = 1 if width <= 0 or width >= n else width
    w = 0.5 * (1 - np.cos(2 * np.pi * np.arange(1, width + 1) / (2 * width + 1)))
    centre = n // 2
    half = min(centre - start, end - centre)
    s_sym, e_sym = centre - half, centre + half
    if start > 0:
        f[start:start + width] = w[: min(width, end - start + 1)]
    if end < n - 1:
        f[end - width + 1:end + 1] = w[::-1][-min(width, end - start + 1):]
    if density_comp:
        if start == 0 and end < n - 1:
            f[:s_sym] = 2.0
        elif start > 0 and end == n - 1:
            f[e_sym + 1:] = 2.0
    return f


class PartialFourierGadget(Gadget):
    """Partial-Fourier handling of reconstructed images (no-op for symmetric sampling)."""

    name = "partial_fourier"
    Params = PartialFourierParams
    accepts = (ImageSeries,)

    def process(self, series: ImageSeries) -> Iterator[ImageSeries]:
        p: PartialFourierParams = self.params  # type: ignore[assignment]
        ny, nx = series.images.shape[-2:]
        s = _sampled(series, (ny, nx))
        if s is None or (p.skip_meta and p.skip_meta in series.meta):
            yield series
            return
        r0, r1, c0, c1 = s
        asym_e1 = (r0 > 0) != (r1 < ny - 1) or abs((ny // 2 - r0) - (r1 - ny // 2)) > 1
        asym_ro = (c0 > 0) != (c1 < nx - 1) or abs((nx // 2 - c0) - (c1 - nx // 2)) > 1
        if not asym_e1 and not asym_ro:
            yield series
            return
        k = _fft2c(series.images)
        if p.mode == "filter":
            fy = (_asymmetric_filter(ny, r0, r1, int(ny * p.e1_width), p.density_comp) if asym_e1
                  else np.ones(ny))
            fx = (_asymmetric_filter(nx, c0, c1, int(nx * p.ro_width), p.density_comp) if asym_ro
                  else np.ones(nx))
            filt = torch.from_numpy(np.outer(fy, fx)).to(k.device, torch.float32)
            out = _ifft2c(k * filt)
        else:
            out = self._pocs(k, (r0, r1, c0, c1))
        self.log.info("partial Fourier (%s): rows %d..%d, columns %d..%d of %dx%d", p.mode, r0, r1, c0, c1,
                      ny, nx)
        yield _series_like(series, out.to(torch.complex64))

    def _pocs(self, k: Tensor, s: tuple[int, int, int, int]) -> Tensor:
        """POCS: the symmetric centre gives the phase; iterate magnitude·phase with the acquired
        samples restored, until the relative change is below ``threshold``."""
        p: PartialFourierParams = self.params  # type: ignore[assignment]
        ny, nx = k.shape[-2:]
        r0, r1, c0, c1 = s
        sampled = torch.zeros(ny, nx, dtype=torch.bool, device=k.device)
        sampled[r0:r1 + 1, c0:c1 + 1] = True
        hy = min(ny // 2 - r0, r1 - ny // 2)
        hx = min(nx // 2 - c0, c1 - nx // 2)
        low = torch.zeros(ny, nx, device=k.device)
        wy = torch.from_numpy(symmetric_filter(2 * hy + 1, "hanning")).to(k.device, torch.float32)
        wx = torch.from_numpy(symmetric_filter(2 * hx + 1, "hanning")).to(k.device, torch.float32)
        low[ny // 2 - hy:ny // 2 + hy + 1, nx // 2 - hx:nx // 2 + hx + 1] = torch.outer(wy, wx)
        phase = torch.exp(1j * torch.angle(_ifft2c(k * low)))
        x = _ifft2c(k)
        for _ in range(max(1, p.iterations)):
            kx = _fft2c(x.abs() * phase)
            kx = torch.where(sampled, k, kx)
            new = _ifft2c(kx)
            change = float((new - x).abs().norm() / x.abs().norm().clamp_min(1e-12))
            x = new
            if change < p.threshold:
                break
        return x


@dataclass
class KSpaceFilterParams(GadgetParams):
    """Filter kind, Gaussian sigma and tapered-Hanning width (fraction of the length) per axis."""

    ro: FilterKind = "none"
    ro_sigma: float = 1.0
    ro_width: float = 0.15
    e1: FilterKind = "none"
    e1_sigma: float = 1.0
    e1_width: float = 0.15
    skip_meta: str = "Skip_processing_after_recon"


class KSpaceFilterGadget(Gadget):
    """Apodise each image's k-space along readout and phase encoding (over the sampled extent)."""

    name = "kspace_filter"
    Params = KSpaceFilterParams
    accepts = (ImageSeries,)

    def _axis(self, n: int, lo: int, hi: int, kind: FilterKind, sigma: float, width: float) -> np.ndarray:
        if kind == "none":
            return np.ones(n)
        # a symmetric filter over the symmetric sampled extent around the centre, 1 beyond it
        half = min(n // 2 - lo, hi - n // 2)
        length = n if (lo == 0 and hi >= n - 1) else 2 * half + 1
        f = symmetric_filter(length, kind, sigma, int(length * width))
        if length == n:
            return f
        out = np.ones(n) * f.max()
        out[n // 2 - half:n // 2 + half + 1] = f
        out[:lo] = 0.0
        out[hi + 1:] = 0.0
        return out

    def process(self, series: ImageSeries) -> Iterator[ImageSeries]:
        p: KSpaceFilterParams = self.params  # type: ignore[assignment]
        if (p.ro == "none" and p.e1 == "none") or (p.skip_meta and p.skip_meta in series.meta):
            yield series
            return
        ny, nx = series.images.shape[-2:]
        r0, r1, c0, c1 = _sampled(series, (ny, nx)) or (0, ny - 1, 0, nx - 1)
        fy = self._axis(ny, r0, r1, p.e1, p.e1_sigma, p.e1_width)
        fx = self._axis(nx, c0, c1, p.ro, p.ro_sigma, p.ro_width)
        filt = torch.from_numpy(np.outer(fy, fx)).to(series.images.device, torch.float32)
        yield _series_like(series, _ifft2c(_fft2c(series.images) * filt).to(torch.complex64))


@dataclass
class FovAdjustParams(GadgetParams):
    """GenericReconFieldOfViewAdjustmentGadget has no image-changing parameters."""


class FovAdjustGadget(Gadget):
    """Bring images to the header's reconSpace matrix: k-space zero-padding (interpolation) when the
    matrix is larger, centre crop when smaller (after the recon's own crop this is usually a no-op)."""

    name = "fov_adjust"
    Params = FovAdjustParams
    accepts = (ImageSeries,)

    def process(self, series: ImageSeries) -> Iterator[ImageSeries]:
        h = parsed_header(self.ctx)
        try:
            ms = h.encoding[0].reconSpace.matrixSize
            want = (int(ms.y), int(ms.x))
        except (AttributeError, IndexError, TypeError):
            yield series
            return
        ny, nx = series.images.shape[-2:]
        if (ny, nx) == want:
            yield series
            return
        k = _fft2c(series.images)
        out = torch.zeros(*k.shape[:-2], *want, dtype=k.dtype, device=k.device)
        cy, cx = min(ny, want[0]), min(nx, want[1])
        oy, ox = want[0] // 2 - cy // 2, want[1] // 2 - cx // 2
        iy, ix = ny // 2 - cy // 2, nx // 2 - cx // 2
        out[..., oy:oy + cy, ox:ox + cx] = k[..., iy:iy + cy, ix:ix + cx]
        scale = math.sqrt(want[0] * want[1] / (ny * nx))
        self.log.info("field of view: images %dx%d -> reconSpace %dx%d", ny, nx, *want)
        yield _series_like(series, (_ifft2c(out) * scale).to(torch.complex64))


#: GENERICRECON_DEFAULT_INTENSITY_MAX / _SCALING_FACTOR of Gadgetron's generic recon
DEFAULT_INTENSITY_MAX = 2048.0
DEFAULT_INTENSITY_SCALING = 4.0


@dataclass
class ImageScaleParams(GadgetParams):
    """constant: use ``factor`` (else the automatic factor); ``min_value``/``max_value``: limits of
    the automatic rule; ``once``: compute the automatic factor on the first array only;
    ``gfactor_factor``/``snr_factor``/``std_factor``: factors of g-factor, SNR and std maps."""

    constant: bool = True
    factor: float = 4.0
    min_value: float = 64.0
    max_value: float = 4095.0
    once: bool = True
    gfactor_factor: float = 100.0
    snr_factor: float = 10.0
    std_factor: float = 1000.0


class ImageScaleGadget(Gadget):
    """Scale image arrays as GenericReconImageArrayScaling does; records ``ImageScaleRatio``.

    The constant factor assumes images in noise units (prewhitened data); for data without a noise
    scan (buffer meta ``prewhitened`` 0) the automatic factor is used instead, with a warning, so the
    uint16 images that follow are not all zero."""

    name = "image_scale"
    Params = ImageScaleParams
    accepts = (ImageSeries,)

    def __init__(self, params: ImageScaleParams | None = None, ctx: Any = None) -> None:
        super().__init__(params, ctx)
        self._auto: float | None = None

    def _auto_factor(self, mag_max: float) -> float:
        p: ImageScaleParams = self.params  # type: ignore[assignment]
        m = mag_max if mag_max > 1e-7 else 1.0
        if m < p.min_value or m > p.max_value:
            return DEFAULT_INTENSITY_MAX / m
        f = DEFAULT_INTENSITY_SCALING
        while m * f > p.max_value and f >= 2:
            f /= 2
        if m * f > p.max_value:
            f = DEFAULT_INTENSITY_MAX / m
        return f

    def process(self, series: ImageSeries) -> Iterator[ImageSeries]:
        p: ImageScaleParams = self.params  # type: ignore[assignment]
        role = str(series.meta.get("DataRole", "Image")).lower()
        if role == "gfactor":
            f = p.gfactor_factor
        elif role == "snrmap":
            f = p.snr_factor
        elif role == "stdmap":
            f = p.std_factor
        elif p.constant and p.factor > 0 and str(series.meta.get("prewhitened", 1)) not in ("0", "False"):
            f = p.factor
        else:
            if p.constant and p.factor > 0 and self._auto is None:
                self.log.warning("the data are not prewhitened (no noise scan): a constant scaling factor "
                                 "assumes "
                                 "noise units; using Gadgetron's automatic scaling instead")
            if self._auto is None or not p.once:
                self._auto = self._auto_factor(float(series.images.abs().max()))
            f = self._auto
        comment = f"{series.meta.get('ImageComment', '')}_x{f:.4g}".lstrip("_")
        yield _series_like(series, series.images * f, ImageScaleRatio=f"{f:.6g}", ImageComment=comment)


@dataclass
class NoiseStdMapParams(GadgetParams):
    """start_frame: first frame used (the first ones may not be in steady state); min_frames:
    fewest frames that give a map."""

    start_frame: int = 0
    min_frames: int = 2


class NoiseStdMapGadget(Gadget):
    """Pass the series on and add the standard deviation over its frames (repetitions) as a second
    series (``DataRole`` ``StdMap``, series index + 1), as Gadgetron's noise-std-map gadget does for
    SNR measurements by repetitions."""

    name = "noise_std_map"
    Params = NoiseStdMapParams
    accepts = (ImageSeries,)

    def process(self, series: ImageSeries) -> Iterator[ImageSeries]:
        p: NoiseStdMapParams = self.params  # type: ignore[assignment]
        yield series
        frames = series.images[p.start_frame:]
        if frames.shape[0] < p.min_frames or series.meta.get("DataRole", "Image") != "Image":
            self.log.info("noise std map: %d frame(s), need %d; no map", frames.shape[0], p.min_frames)
            return
        std = frames.abs().std(dim=0, keepdim=True).to(torch.complex64)
        out = _series_like(series, std, DataRole="StdMap")
        out.ref_headers = series.ref_headers[:1]
        out.series_index = series.series_index + 1
        out.meta["SeriesOffset"] = 1
        yield out


# --------------------------------------------------------------------------------------------
# image stage (ismrmrd.Image)
# --------------------------------------------------------------------------------------------


def replace_data(img: ismrmrd.Image, data: np.ndarray, image_type: int | None = None,
                 series_offset: int = 0) -> ismrmrd.Image:
    """A copy of ``img`` with new pixel data (any ISMRMRD dtype; shape ``[cha, z, y, x]``), its header
    (data type updated), optionally a new image type and a series index offset, and its attributes."""
    out = ismrmrd.Image.from_array(np.ascontiguousarray(data), transpose=False)
    head = img.getHead()
    new_type = out.getHead().data_type
    head.data_type = new_type
    if image_type is not None:
        head.image_type = image_type
    head.image_series_index = int(head.image_series_index) + series_offset
    out.setHead(head)
    out.attribute_string = img.attribute_string
    return out


@dataclass
class ComplexToFloatParams(GadgetParams):
    """ComplexToFloatGadget has no parameters."""


class ComplexToFloatGadget(Gadget):
    """Complex images → float by their image type (magnitude, phase, real, imaginary); complex or
    unset types become magnitude (as Gadgetron does)."""

    name = "complex_to_float"
    Params = ComplexToFloatParams
    accepts = (ismrmrd.Image,)

    def process(self, img: ismrmrd.Image) -> Iterator[ismrmrd.Image]:
        data = img.data
        if not np.iscomplexobj(data):
            yield img
            return
        t = int(img.image_type)
        if t == ismrmrd.IMTYPE_PHASE:
            out = np.angle(data)
        elif t == ismrmrd.IMTYPE_REAL:
            out = data.real
        elif t == ismrmrd.IMTYPE_IMAG:
            out = data.imag
        else:
            out, t = np.abs(data), ismrmrd.IMTYPE_MAGNITUDE
        yield replace_data(img, out.astype(np.float32), image_type=t)


@dataclass
class ExtractParams(GadgetParams):
    """magnitude/real/imag/phase: which float images to make from each complex one;
    real_imag_offset: added to real and imaginary images."""

    magnitude: bool = True
    real: bool = False
    imag: bool = False
    phase: bool = False
    real_imag_offset: float = 0.0

    def validate(self, where: str) -> None:
        if not (self.magnitude or self.real or self.imag or self.phase):
            raise ChainError(f"{where}: extract needs at least one of magnitude, real, imag, phase")


class ExtractGadget(Gadget):
    """One float image per selected type; series index offset 0 / 1000 / 2000 / 3000 for magnitude /
    real / imaginary / phase; phase is ``arg + π`` (Gadgetron's ExtractGadget)."""

    name = "extract"
    Params = ExtractParams
    accepts = (ismrmrd.Image,)

    def process(self, img: ismrmrd.Image) -> Iterator[ismrmrd.Image]:
        p: ExtractParams = self.params  # type: ignore[assignment]
        data = img.data
        if not np.iscomplexobj(data):
            yield img
            return
        wanted = [(p.magnitude, ismrmrd.IMTYPE_MAGNITUDE, lambda d: np.abs(d)),
                  (p.real, ismrmrd.IMTYPE_REAL, lambda d: d.real + p.real_imag_offset),
                  (p.imag, ismrmrd.IMTYPE_IMAG, lambda d: d.imag + p.real_imag_offset),
                  (p.phase, ismrmrd.IMTYPE_PHASE, lambda d: np.angle(d) + np.pi)]
        for on, t, fn in wanted:
            if on:
                yield replace_data(img, fn(data).astype(np.float32), image_type=t,
                                   series_offset=SERIES_OFFSET[t])


@dataclass
class AutoScaleParams(GadgetParams):
    """max_value: where the 99th percentile of each magnitude image goes; histogram_bins: bins."""

    max_value: float = 2048.0
    histogram_bins: int = 100


class AutoScaleGadget(Gadget):
    """Scale each float magnitude image so its 99th percentile (histogram estimate) is ``max_value``."""

    name = "auto_scale"
    Params = AutoScaleParams
    accepts = (ismrmrd.Image,)

    def process(self, img: ismrmrd.Image) -> Iterator[ismrmrd.Image]:
        p: AutoScaleParams = self.params  # type: ignore[assignment]
        data = img.data
        if int(img.image_type) != ismrmrd.IMTYPE_MAGNITUDE or np.iscomplexobj(data):
            yield img
            return
        mx = float(data.max()) if data.size else 0.0
        if mx <= 0:
            yield img
            return
        bins = np.minimum(np.floor(data / mx * p.histogram_bins).astype(np.int64), p.histogram_bins - 1)
        hist = np.bincount(bins.ravel(), minlength=p.histogram_bins)
        counter, cumsum = 0, 0
        while cumsum < 0.99 * data.size:
            cumsum += int(hist[counter])
            counter += 1
        top = (counter + 1) * (mx / p.histogram_bins)
        yield replace_data(img, (data * (p.max_value / top)).astype(np.float32))


@dataclass
class FloatToUShortParams(GadgetParams):
    """Clamp range and the offset added to real/imaginary (and the phase scale)."""

    min_intensity: float = 0.0
    max_intensity: float = 4095.0
    intensity_offset: float = 2048.0

    def validate(self, where: str) -> None:
        if not 0 <= self.min_intensity <= self.max_intensity <= 65535:
            raise ChainError(f"{where}: need 0 <= min_intensity <= max_intensity <= 65535, got "
                             f"{self.min_intensity}, {self.max_intensity}")


class FloatToUShortGadget(Gadget):
    """Float images → uint16: magnitude ``|x|``, real/imag ``x + offset``, phase
    ``x·offset/π + offset``, each clamped to ``[min_intensity, max_intensity]`` and rounded."""

    name = "float_to_ushort"
    Params = FloatToUShortParams
    accepts = (ismrmrd.Image,)

    def process(self, img: ismrmrd.Image) -> Iterator[ismrmrd.Image]:
        p: FloatToUShortParams = self.params  # type: ignore[assignment]
        data = img.data
        if np.iscomplexobj(data):
            raise self.error("complex image: put ComplexToFloat/Extract before FloatToUShort")
        if data.dtype == np.uint16:
            yield img
            return
        t = int(img.image_type)
        if t == ismrmrd.IMTYPE_MAGNITUDE:
            v = np.abs(data)
        elif t in (ismrmrd.IMTYPE_REAL, ismrmrd.IMTYPE_IMAG):
            v = data + p.intensity_offset
        elif t == ismrmrd.IMTYPE_PHASE:
            v = data * p.intensity_offset / np.pi + p.intensity_offset
        else:
            raise self.error(f"unknown image type {t}")
        out = np.rint(np.clip(v.astype(np.float64), p.min_intensity, p.max_intensity)).astype(np.uint16)
        yield replace_data(img, out)
