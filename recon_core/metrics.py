"""Image-quality metrics with explicit, nameable conventions (BRIEFS §7).

The five papers this project reproduces each compute PSNR/SSIM differently (normalisation,
per-frame vs volume, window, data range). Every function here takes the same named options, and
:func:`describe_metric` states the resulting definition in words so a benchmark can print exactly
what it measured.

Definitions (after normalisation, on magnitude images unless ``magnitude=False``):

* PSNR  = 10·log10(R² / MSE), R = ``data_range``.
* SSIM  = mean of the SSIM map (Wang et al. 2004, K1 = 0.01, K2 = 0.03) over the valid region,
  i.e. the image cropped by (w−1)//2 at each border. ``"uniform7"`` = 7×7 box window with sample
  covariance (N/(N−1)), identical to scikit-image's ``structural_similarity`` defaults;
  ``"gaussian11"`` = 11×11 Gaussian (σ = 1.5) with population covariance (Wang's / TensorFlow's).
* NRMSE = ‖recon − ref‖₂ / ‖ref‖₂ (Euclidean norms; not divided by range or mean).
* MAE   = mean |recon − ref|.

Options (all keyword-only, defaults in :data:`METRIC_DEFAULTS`)
--------------------------------------------------------------
normalization
    ``"gt_max"`` (default): both images ÷ max|ref| over the series · ``"own_max"`` (GIP): each ÷ its
    own max · ``"minmax"`` (INR, TD-DIP): each mapped to [0, 1] by its own min and max ·
    ``"meanstd"`` (ConvDecoder): ref affinely matched to the recon's mean and standard deviation
    (population std) · ``"none"``.
norm_scope
    ``"series"`` (default): normalisation statistics over the whole ``[F, Ny, Nx]`` series;
    ``"frame"``: per frame (TD-DIP's per-frame min-max, ConvDecoder's per-slice matching).
granularity
    ``"frame"`` (default): the metric per 2-D frame, then the mean over frames; ``"volume"``: one
    value over all voxels of the series.
data_range
    R for PSNR/SSIM. None (default) means 1.0 after ``gt_max``/``own_max``/``minmax``; max|ref| for
    ``"none"``; max of the matched ref for ``"meanstd"`` (ConvDecoder's choice), both taken in the
    normalisation scope.
window
    SSIM window, ``"uniform7"`` (default) or ``"gaussian11"``.
magnitude
    True (default): compare magnitudes (complex or real input). False: compare complex values
    directly (PSNR/NRMSE/MAE only; ``"minmax"``/``"meanstd"`` need real images).
mask
    Optional ROI, bool ``[Ny, Nx]`` or ``[F, Ny, Nx]``: errors are averaged over ROI pixels only
    (normalisation statistics still use the whole image; SSIM averages its map over the ROI pixels
    inside the valid region).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

Tensor = torch.Tensor

__all__ = [
    "METRIC_DEFAULTS",
    "METRIC_PRESETS",
    "psnr",
    "ssim",
    "nrmse",
    "mae",
    "compute_metrics",
    "describe_metric",
]

METRIC_DEFAULTS: dict[str, Any] = {
    "normalization": "gt_max",
    "norm_scope": "series",
    "granularity": "frame",
    "data_range": None,  # → 1.0 after gt_max / own_max / minmax (see module docstring)
    "window": "uniform7",
    "magnitude": True,
    "mask": None,
}

#: Paper-compatible settings (BRIEFS §7). Pass as ``psnr(x, ref, **METRIC_PRESETS["gip"])``.
METRIC_PRESETS: dict[str, dict[str, Any]] = {
    "project": {},
    "gip": {"normalization": "own_max", "granularity": "frame", "data_range": 1.0, "window": "uniform7"},
    "inr": {"normalization": "minmax", "granularity": "frame", "data_range": 1.0, "window": "uniform7"},
    "tddip": {"normalization": "minmax", "norm_scope": "frame", "granularity": "frame", "data_range": 1.0},
    "convdecoder": {"normalization": "meanstd", "norm_scope": "frame", "granularity": "frame",
                    "window": "uniform7"},
    "slrnet": {"normalization": "gt_max", "granularity": "volume", "window": "gaussian11"},
    "dccnn": {"normalization": "gt_max", "granularity": "volume", "magnitude": False},
}

_NORMALIZATIONS = ("none", "gt_max", "own_max", "minmax", "meanstd")
_SCOPES = ("series", "frame")
_GRANULARITIES = ("frame", "volume")
_WINDOWS = ("uniform7", "gaussian11")
_K1, _K2 = 0.01, 0.03


# --------------------------------------------------------------------------------------------
# option checking and preparation
# --------------------------------------------------------------------------------------------

def _check_options(opts: dict[str, Any]) -> dict[str, Any]:
    unknown = set(opts) - set(METRIC_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown metric option(s) {sorted(unknown)}; allowed: {sorted(METRIC_DEFAULTS)}")
    o = dict(METRIC_DEFAULTS)
    o.update(opts)
    if o["normalization"] not in _NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {_NORMALIZATIONS}, got {o['normalization']!r}")
    if o["norm_scope"] not in _SCOPES:
        raise ValueError(f"norm_scope must be one of {_SCOPES}, got {o['norm_scope']!r}")
    if o["granularity"] not in _GRANULARITIES:
        raise ValueError(f"granularity must be one of {_GRANULARITIES}, got {o['granularity']!r}")
    if o["window"] not in _WINDOWS:
        raise ValueError(f"window must be one of {_WINDOWS}, got {o['window']!r}")
    if not isinstance(o["magnitude"], bool):
        raise TypeError(f"magnitude must be a bool, got {type(o['magnitude']).__name__}")
    dr = o["data_range"]
    if dr is not None:
        try:
            drf = float(dr)
        except (TypeError, ValueError):
            raise TypeError(f"data_range must be a positive number or None, got {dr!r}") from None
        if not (math.isfinite(drf) and drf > 0):
            raise ValueError(f"data_range must be a positive finite number, got {dr!r}")
        o["data_range"] = drf
    return o


def _as_tensor(name: str, v: Any) -> Tensor:
    if isinstance(v, np.ndarray):
        v = torch.from_numpy(v)
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(v).__name__}")
    if v.ndim not in (2, 3):
        raise ValueError(f"{name} must be [F, Ny, Nx] or [Ny, Nx], got shape {tuple(v.shape)}")
    return v


def _amax(v: Tensor, scope: str) -> Tensor:
    """max over the series (shape [1,1,1]) or per frame ([F,1,1])."""
    return v.amax(dim=(0, 1, 2) if scope == "series" else (1, 2), keepdim=True)


def _amin(v: Tensor, scope: str) -> Tensor:
    return v.amin(dim=(0, 1, 2) if scope == "series" else (1, 2), keepdim=True)


def _nonzero(name: str, what: str, v: Tensor) -> None:
    if bool((v == 0).any()):
        raise ValueError(f"{name} has {what} 0, so the normalisation is undefined")


def _prepare(recon: Any, reference: Any, o: dict[str, Any], need_real: bool = False
             ) -> tuple[Tensor, Tensor, Tensor, Tensor | None, bool]:
    """→ (x, r, R[F,1,1], mask[F,Ny,Nx] | None, input_was_2d) in float64 / complex128."""
    x = _as_tensor("recon", recon)
    r = _as_tensor("reference", reference)
    if x.shape != r.shape:
        raise ValueError(f"recon shape {tuple(x.shape)} differs from reference shape {tuple(r.shape)}")
    was2d = x.ndim == 2
    if was2d:
        x, r = x.unsqueeze(0), r.unsqueeze(0)
    r = r.to(x.device)
    if o["magnitude"]:
        x = x.abs().to(torch.float64)
        r = r.abs().to(torch.float64)
    else:
        if need_real and (x.is_complex() or r.is_complex()):
            raise ValueError("this metric needs real images: use magnitude=True for complex input")
        cplx = x.is_complex() or r.is_complex()
        dt = torch.complex128 if cplx else torch.float64
        x, r = x.to(dt), r.to(dt)
        if cplx and o["normalization"] in ("minmax", "meanstd"):
            raise ValueError(f"normalization={o['normalization']!r} needs real images; use magnitude=True")

    norm, scope = o["normalization"], o["norm_scope"]
    if norm == "gt_max":
        s = _amax(r.abs(), scope)
        _nonzero("reference", "max |value|", s)
        x, r = x / s, r / s
    elif norm == "own_max":
        sx, sr = _amax(x.abs(), scope), _amax(r.abs(), scope)
        _nonzero("recon", "max |value|", sx)
        _nonzero("reference", "max |value|", sr)
        x, r = x / sx, r / sr
    elif norm == "minmax":
        lo_x, hi_x, lo_r, hi_r = _amin(x, scope), _amax(x, scope), _amin(r, scope), _amax(r, scope)
        _nonzero("recon", "max − min", hi_x - lo_x)
        _nonzero("reference", "max − min", hi_r - lo_r)
        x, r = (x - lo_x) / (hi_x - lo_x), (r - lo_r) / (hi_r - lo_r)
    elif norm == "meanstd":
        dims = (0, 1, 2) if scope == "series" else (1, 2)
        mx, sx = x.mean(dim=dims, keepdim=True), x.std(dim=dims, keepdim=True, correction=0)
        mr, sr = r.mean(dim=dims, keepdim=True), r.std(dim=dims, keepdim=True, correction=0)
        _nonzero("reference", "standard deviation", sr)
        r = (r - mr) / sr * sx + mx

    F = x.shape[0]
    if o["data_range"] is not None:
        R = torch.full((F, 1, 1), o["data_range"], dtype=torch.float64, device=x.device)
    elif norm == "none" or norm == "meanstd":
        R = _amax(r.abs(), scope).to(torch.float64).expand(F, 1, 1)
        _nonzero("reference", "max |value| (the default data_range)", R)
    else:
        R = torch.ones((F, 1, 1), dtype=torch.float64, device=x.device)

    mask = o["mask"]
    if mask is not None:
        if isinstance(mask, np.ndarray):
            mask = torch.from_numpy(mask)
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a tensor or numpy array, got {type(mask).__name__}")
        if tuple(mask.shape) not in (tuple(x.shape[1:]), tuple(x.shape)) or (was2d and mask.ndim != 2):
            raise ValueError(f"mask must have shape {tuple(x.shape[1:])} or {tuple(x.shape)}, "
                             f"got {tuple(mask.shape)}")
        mask = (mask != 0).to(x.device).expand(x.shape)
        if bool((mask.sum(dim=(1, 2)) == 0).any()):
            raise ValueError("mask selects no pixel in at least one frame")
    return x, r, R, mask, was2d


def _finish(per_frame_vals: Tensor, volume_val: Tensor, o: dict[str, Any], per_frame: bool) -> float | Tensor:
    if per_frame:
        if o["granularity"] == "volume":
            raise ValueError("per_frame=True contradicts granularity='volume'")
        return per_frame_vals.to(torch.float32)
    if o["granularity"] == "frame":
        return float(per_frame_vals.mean())
    return float(volume_val)


def _masked_sums(v: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Per-frame sum of v over the mask and per-frame pixel count."""
    if mask is None:
        return v.sum(dim=(1, 2)), torch.full((v.shape[0],), v.shape[1] * v.shape[2], dtype=torch.float64,
                                             device=v.device)
    m = mask.to(v.dtype)
    return (v * m).sum(dim=(1, 2)), m.sum(dim=(1, 2))


# --------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------

def _psnr_from(mse: Tensor, R: Tensor) -> Tensor:
    return 10.0 * torch.log10(R**2 / mse)  # MSE = 0 gives +inf


def psnr(recon: Tensor, reference: Tensor, *, per_frame: bool = False, **options: Any) -> float | Tensor:
    """Peak SNR in dB, ``10·log10(R² / MSE)`` (see the module docstring for ``options``).

    Returns a float (inf for a perfect match), or the per-frame float32 tensor ``[F]`` with
    ``per_frame=True``.
    """
    o = _check_options(options)
    x, r, R, mask, _ = _prepare(recon, reference, o)
    s, n = _masked_sums((x - r).abs() ** 2, mask)
    frames = _psnr_from(s / n, R.flatten())
    volume = _psnr_from(s.sum() / n.sum(), R.max())
    return _finish(frames, volume, o, per_frame)


def nrmse(recon: Tensor, reference: Tensor, *, per_frame: bool = False, **options: Any) -> float | Tensor:
    """Normalised RMSE ``‖recon − ref‖₂ / ‖ref‖₂`` after normalisation (options as in :func:`psnr`)."""
    o = _check_options(options)
    x, r, _, mask, _ = _prepare(recon, reference, o)
    e, _ = _masked_sums((x - r).abs() ** 2, mask)
    q, _ = _masked_sums(r.abs() ** 2, mask)
    return _finish(torch.sqrt(e / q), torch.sqrt(e.sum() / q.sum()), o, per_frame)


def mae(recon: Tensor, reference: Tensor, *, per_frame: bool = False, **options: Any) -> float | Tensor:
    """Mean absolute error ``mean |recon − ref|`` after normalisation (options as in :func:`psnr`)."""
    o = _check_options(options)
    x, r, _, mask, _ = _prepare(recon, reference, o)
    s, n = _masked_sums((x - r).abs(), mask)
    return _finish(s / n, s.sum() / n.sum(), o, per_frame)


def _window(kind: str, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, float]:
    """2-D window [1,1,k,k] and the covariance correction factor."""
    if kind == "uniform7":
        k = 7
        w = torch.full((k, k), 1.0 / (k * k), dtype=dtype, device=device)
        return w.view(1, 1, k, k), (k * k) / (k * k - 1.0)  # sample covariance, as skimage
    sigma, radius = 1.5, 5
    t = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    g = torch.exp(-(t**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g).view(1, 1, 2 * radius + 1, 2 * radius + 1), 1.0


def _ssim_map(x: Tensor, y: Tensor, R: Tensor, window: str) -> tuple[Tensor, int]:
    """SSIM map over the valid region (no padding) of frames [F, Ny, Nx]; returns (map, crop)."""
    w, cov_norm = _window(window, x.dtype, x.device)
    k = w.shape[-1]
    if x.shape[-1] < k or x.shape[-2] < k:
        raise ValueError(f"frames of {tuple(x.shape[-2:])} are smaller than the {k}×{k} SSIM window")
    conv = lambda v: torch.nn.functional.conv2d(v.unsqueeze(1), w).squeeze(1)  # noqa: E731
    ux, uy = conv(x), conv(y)
    vx = cov_norm * (conv(x * x) - ux * ux)
    vy = cov_norm * (conv(y * y) - uy * uy)
    vxy = cov_norm * (conv(x * y) - ux * uy)
    C1, C2 = (_K1 * R) ** 2, (_K2 * R) ** 2
    s = ((2 * ux * uy + C1) * (2 * vxy + C2)) / ((ux**2 + uy**2 + C1) * (vx + vy + C2))
    return s, (k - 1) // 2


def ssim(recon: Tensor, reference: Tensor, *, per_frame: bool = False, **options: Any) -> float | Tensor:
    """Structural similarity (options as in :func:`psnr`; ``window`` picks the SSIM window).

    With the defaults (and ``normalization="none", data_range=R``) a frame's value equals
    scikit-image's ``structural_similarity(ref, recon, data_range=R)``.
    """
    o = _check_options(options)
    x, r, R, mask, _ = _prepare(recon, reference, o, need_real=True)
    if x.is_complex() or r.is_complex():
        raise ValueError("ssim needs real images: use magnitude=True for complex input")
    smap, c = _ssim_map(x, r, R, o["window"])
    m = None if mask is None else mask[:, c: mask.shape[1] - c, c: mask.shape[2] - c]
    if m is not None and bool((m.sum(dim=(1, 2)) == 0).any()):
        raise ValueError("mask selects no pixel inside the SSIM valid region in at least one frame")
    s, n = _masked_sums(smap, m)
    return _finish(s / n, s.sum() / n.sum(), o, per_frame)


_METRICS = {"psnr": psnr, "ssim": ssim, "nrmse": nrmse, "mae": mae}


def compute_metrics(recon: Tensor, reference: Tensor,
                    metrics: tuple[str, ...] = ("psnr", "ssim", "nrmse", "mae"),
                    **options: Any) -> dict[str, float]:
    """Several metrics with the same options, as a dict ``{name: value}`` (for benchmark tables)."""
    bad = [m for m in metrics if m not in _METRICS]
    if bad:
        raise ValueError(f"unknown metric(s) {bad}; choose from {sorted(_METRICS)}")
    return {m: _METRICS[m](recon, reference, **options) for m in metrics}


# --------------------------------------------------------------------------------------------
# description
# --------------------------------------------------------------------------------------------

_NORM_TEXT = {
    "none": "no normalisation",
    "gt_max": "recon and reference both divided by max|reference|",
    "own_max": "recon and reference each divided by its own maximum",
    "minmax": "recon and reference each min-max scaled to [0, 1]",
    "meanstd": "reference affinely matched to the recon's mean and (population) standard deviation",
}

_METRIC_TEXT = {
    "psnr": "PSNR = 10·log10(R²/MSE) in dB",
    "ssim": "SSIM (K1=0.01, K2=0.03) averaged over the valid region (borders cropped by (w−1)//2)",
    "nrmse": "NRMSE = ‖recon − ref‖₂ / ‖ref‖₂",
    "mae": "MAE = mean |recon − ref|",
}


def describe_metric(metric: str | None = None, **options: Any) -> str:
    """The definition, in words, of a metric under the given options (or of all four if None).

    Benchmarks print this next to their tables, e.g.
    ``describe_metric("psnr", **METRIC_PRESETS["gip"])``.
    """
    if metric is not None and metric not in _METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose from {sorted(_METRICS)}")
    o = _check_options(options)
    norm, scope = o["normalization"], o["norm_scope"]
    parts = [
        "magnitude images" if o["magnitude"] else "complex images (no magnitude)",
        _NORM_TEXT[norm] + (f" ({'over the whole series' if scope == 'series' else 'frame by frame'})"
                            if norm != "none" else ""),
        "value per 2-D frame, averaged over frames" if o["granularity"] == "frame"
        else "one value over the whole series (volume)",
    ]
    if o["data_range"] is not None:
        rng = f"R = {o['data_range']:g}"
    elif norm == "none":
        rng = "R = max|reference|" + (" over the series" if scope == "series" else " per frame")
    elif norm == "meanstd":
        rng = "R = max of the matched reference" + (" over the series" if scope == "series" else " per frame")
    else:
        rng = "R = 1"
    win = ("7×7 uniform window, sample covariance (scikit-image default)" if o["window"] == "uniform7"
           else "11×11 Gaussian window σ=1.5, population covariance")
    roi = "errors averaged over the ROI mask" if o["mask"] is not None else "whole image"
    names = [metric] if metric is not None else list(_METRICS)
    lines = []
    for name in names:
        extra = [rng] if name in ("psnr", "ssim") else []
        if name == "ssim":
            extra.append(win)
        lines.append(f"{_METRIC_TEXT[name]}; " + "; ".join(parts + extra + [roi]) + ".")
    return "\n".join(lines)


def scale_to_reference(recon: Tensor, reference: Tensor, mask: Tensor | None = None) -> Tensor:
    """Magnitude of ``recon`` times the least-squares scalar that best matches ``|reference|``.

    Reconstructions from prewhitened data are in noise units, not in the units of a phantom's
    ground truth; this removes that single global factor (over ``mask`` if given, else everywhere)
    before a metric, and nothing else. Benchmarks that use it say so in their printout.
    """
    x = recon.abs().to(torch.float64)
    r = reference.abs().to(torch.float64)
    if mask is not None:
        m = mask.to(torch.bool).expand_as(x)
        num, den = (x[m] * r[m]).sum(), (x[m] * x[m]).sum()
    else:
        num, den = (x * r).sum(), (x * x).sum()
    scale = (num / den) if float(den) > 0 else torch.tensor(1.0, dtype=torch.float64)
    return (x * scale).to(torch.float32)
