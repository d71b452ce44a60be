"""Tests for recon_core.metrics: definitions, normalisations, granularity, ROI, skimage agreement."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from recon_core.metrics import (
    METRIC_DEFAULTS,
    METRIC_PRESETS,
    compute_metrics,
    describe_metric,
    mae,
    nrmse,
    psnr,
    ssim,
)


def _pair(F=3, ny=16, nx=20, noise=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    ref = torch.rand(F, ny, nx, generator=g, dtype=torch.float64) + 0.2
    rec = (ref + noise * torch.randn(F, ny, nx, generator=g, dtype=torch.float64)).abs()
    return rec, ref


# ------------------------------------------------------------------------------- hand-computed values

def test_hand_computed_values():
    ref = torch.full((2, 8, 8), 0.5, dtype=torch.float64)
    ref[0, 0, 0] = 1.0  # series max 1 (so gt_max leaves the images unchanged)
    rec = ref + 0.1
    # MSE = 0.01 in every frame, R = 1 → PSNR = 20 dB exactly
    assert abs(psnr(rec, ref) - 20.0) < 1e-9
    assert abs(psnr(rec, ref, granularity="volume") - 20.0) < 1e-9
    # MAE = 0.1; NRMSE = 0.1·8 / ‖ref_f‖
    assert abs(mae(rec, ref) - 0.1) < 1e-7
    n0 = 0.1 * 8 / math.sqrt(63 * 0.25 + 1.0)
    n1 = 0.1 * 8 / math.sqrt(64 * 0.25)
    per = nrmse(rec, ref, per_frame=True)
    assert per.shape == (2,) and per.dtype == torch.float32
    assert torch.allclose(per, torch.tensor([n0, n1], dtype=torch.float32), atol=1e-6)
    assert abs(nrmse(rec, ref) - (n0 + n1) / 2) < 1e-6
    vol = 0.1 * math.sqrt(128) / math.sqrt(127 * 0.25 + 1.0)
    assert abs(nrmse(rec, ref, granularity="volume") - vol) < 1e-6
    # identical images: PSNR inf, NRMSE 0, SSIM 1
    assert psnr(ref, ref) == math.inf and nrmse(ref, ref) == 0.0 and abs(ssim(ref, ref) - 1.0) < 1e-12


def test_frame_vs_volume_granularity():
    ref = torch.ones(2, 4, 4, dtype=torch.float64)
    rec = ref.clone()
    rec[0] += 0.1  # MSE 0.01 in frame 0
    rec[1] += 0.01  # MSE 1e-4 in frame 1
    per = psnr(rec, ref, per_frame=True)
    assert torch.allclose(per, torch.tensor([20.0, 40.0]), atol=1e-4)  # float32 output
    assert abs(psnr(rec, ref) - 30.0) < 1e-6  # mean of per-frame dB values
    assert abs(psnr(rec, ref, granularity="volume") - 10 * math.log10(1 / ((0.01 + 1e-4) / 2))) < 1e-6
    with pytest.raises(ValueError, match="per_frame"):
        psnr(rec, ref, granularity="volume", per_frame=True)


def test_2d_input_and_complex_magnitude():
    rec, ref = _pair(F=1)
    assert abs(psnr(rec[0], ref[0]) - psnr(rec, ref)) < 1e-12
    assert psnr(rec[0], ref[0], per_frame=True).shape == (1,)
    phase = torch.exp(1j * torch.rand(ref.shape, dtype=torch.float64) * 6)
    refc = ref * phase
    # magnitude is taken: a pure phase change is invisible …
    assert psnr(refc, ref) > 250 and abs(ssim(refc.to(torch.complex64), ref) - 1) < 1e-6
    # … unless complex comparison is asked for
    assert psnr(refc, ref.to(torch.complex128), magnitude=False) < 20
    with pytest.raises(ValueError, match="real"):
        ssim(refc, ref, magnitude=False)
    with pytest.raises(ValueError, match="real"):
        psnr(refc, ref, magnitude=False, normalization="minmax")


# ------------------------------------------------------------------------------- normalisations

def test_gt_max_is_joint_scale_invariant():
    rec, ref = _pair()
    base = psnr(rec, ref)
    assert abs(psnr(7 * rec, 7 * ref) - base) < 1e-9
    # default R = 1 after ÷ max|GT| is PSNR with peak max|GT| on raw images
    raw = psnr(rec, ref, normalization="none", data_range=float(ref.max()))
    assert abs(raw - base) < 1e-9
    # "none" defaults to R = max|ref|
    assert abs(psnr(rec, ref, normalization="none") - base) < 1e-9
    # but scaling only the recon hurts
    assert psnr(2 * rec, ref) < base - 3


def test_own_max_removes_each_scale():
    rec, ref = _pair(seed=1)
    base = psnr(rec, ref, normalization="own_max")
    assert abs(psnr(3 * rec, ref, normalization="own_max") - base) < 1e-9
    assert abs(psnr(rec, 0.2 * ref, normalization="own_max") - base) < 1e-9
    # by hand: each ÷ its own max
    x, r = rec / rec.max(), ref / ref.max()
    assert abs(psnr(x, r, normalization="none", data_range=1.0) - base) < 1e-9


def test_minmax_is_affine_invariant():
    rec, ref = _pair(seed=2)
    base = ssim(rec, ref, normalization="minmax")
    assert abs(ssim(2 * rec + 5, ref, normalization="minmax") - base) < 1e-9
    assert abs(ssim(rec, 0.5 * ref + 1, normalization="minmax") - base) < 1e-9
    x = (rec - rec.min()) / (rec.max() - rec.min())
    r = (ref - ref.min()) / (ref.max() - ref.min())
    by_hand = psnr(x, r, normalization="none", data_range=1.0)
    assert abs(by_hand - psnr(rec, ref, normalization="minmax")) < 1e-9


def test_meanstd_matches_reference_to_recon():
    rec, ref = _pair(seed=3)
    # an exact affine copy of the reference is a perfect reconstruction under mean/std matching
    assert nrmse(3 * ref + 1, ref, normalization="meanstd") < 1e-12
    base = psnr(rec, ref, normalization="meanstd")
    assert abs(psnr(rec, 4 * ref + 2, normalization="meanstd") - base) < 1e-9
    # by hand, with ConvDecoder's data range = max of the matched reference
    r = (ref - ref.mean()) / ref.std(correction=0) * rec.std(correction=0) + rec.mean()
    per = 10 * torch.log10(r.max() ** 2 / ((rec - r) ** 2).mean(dim=(1, 2)))
    assert abs(base - float(per.mean())) < 1e-9


def test_norm_scope_frame():
    rec, ref = _pair(seed=4)
    scale = torch.tensor([1.0, 10.0, 0.1], dtype=torch.float64).view(3, 1, 1)
    # per-frame min-max (TD-DIP) ignores per-frame scalings of either image
    a = psnr(rec, ref, normalization="minmax", norm_scope="frame")
    b = psnr(rec * scale, ref / scale, normalization="minmax", norm_scope="frame")
    assert abs(a - b) < 1e-9
    # series-wide min-max does not
    assert abs(psnr(rec * scale, ref, normalization="minmax") - psnr(rec, ref, normalization="minmax")) > 1.0


def test_zero_reference_is_an_error():
    z = torch.zeros(2, 8, 8)
    with pytest.raises(ValueError, match="reference"):
        psnr(torch.ones(2, 8, 8), z)
    with pytest.raises(ValueError, match="recon"):
        psnr(z, torch.ones(2, 8, 8), normalization="own_max")


# ------------------------------------------------------------------------------- ROI and options

def test_roi_mask():
    rec, ref = _pair(seed=5)
    mask = torch.zeros(16, 20, dtype=torch.bool)
    mask[4:12, 5:15] = True
    rec2 = rec.clone()
    rec2[:, ~mask] = ref[:, ~mask] + 0.5  # large errors outside the ROI only
    assert abs(psnr(rec2, ref, mask=mask) - psnr(rec, ref, mask=mask)) < 1e-9
    assert abs(mae(rec2, ref, mask=mask) - float((rec - ref)[:, mask].abs().mean() / ref.max())) < 1e-9
    assert psnr(rec2, ref) < psnr(rec, ref)
    perfect = ref.clone()
    perfect[:, ~mask] += 1.0
    assert nrmse(perfect, ref, mask=mask) == 0.0
    # SSIM over the ROI: only the valid-region part of the mask counts
    full = torch.ones(16, 20, dtype=torch.bool)
    assert abs(ssim(rec, ref, mask=full) - ssim(rec, ref)) < 1e-12
    with pytest.raises(ValueError, match="mask"):
        psnr(rec, ref, mask=torch.zeros(16, 20, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask"):
        psnr(rec, ref, mask=torch.ones(5, 5, dtype=torch.bool))


def test_option_validation_and_inputs():
    rec, ref = _pair()
    with pytest.raises(TypeError, match="unknown metric option"):
        psnr(rec, ref, normalisation="gt_max")
    with pytest.raises(ValueError, match="normalization"):
        psnr(rec, ref, normalization="max")
    with pytest.raises(ValueError, match="granularity"):
        psnr(rec, ref, granularity="slice")
    with pytest.raises(ValueError, match="window"):
        ssim(rec, ref, window="gaussian7")
    with pytest.raises(ValueError, match="data_range"):
        psnr(rec, ref, data_range=0)
    with pytest.raises(ValueError, match="shape"):
        psnr(rec, ref[:, :8])
    with pytest.raises(ValueError, match="smaller"):
        ssim(rec[:, :5, :5], ref[:, :5, :5])
    # numpy input is accepted
    assert abs(psnr(rec.numpy(), ref.numpy()) - psnr(rec, ref)) < 1e-12


def test_presets_and_describe():
    rec, ref = _pair(seed=6)
    for name, preset in METRIC_PRESETS.items():
        assert set(preset) <= set(METRIC_DEFAULTS)
        out = compute_metrics(rec, ref, metrics=("psnr", "nrmse", "mae") if preset.get("magnitude") is False
                              else ("psnr", "ssim", "nrmse", "mae"), **preset)
        assert all(math.isfinite(v) for v in out.values()), name
        describe_metric(**preset)
    text = describe_metric("psnr")
    assert "10·log10(R²/MSE)" in text and "max|reference|" in text and "averaged over frames" in text
    assert "own maximum" in describe_metric("ssim", **METRIC_PRESETS["gip"])
    assert "min-max" in describe_metric("nrmse", normalization="minmax")
    assert "Gaussian" in describe_metric("ssim", window="gaussian11")
    assert "‖recon − ref‖₂ / ‖ref‖₂" in describe_metric("nrmse")
    assert len(describe_metric().splitlines()) == 4
    with pytest.raises(ValueError, match="metric"):
        describe_metric("vif")


# ------------------------------------------------------------------------------- SSIM

def test_ssim_properties():
    rec, ref = _pair(seed=7)
    s_small = ssim(rec, ref)
    s_big = ssim(*_pair(seed=7, noise=0.2))
    assert 0 < s_big < s_small < 1
    # default (÷ max|GT|, R = 1) equals raw images with R = max|GT|: SSIM is invariant to joint scaling
    assert abs(s_small - ssim(rec, ref, normalization="none", data_range=float(ref.max()))) < 1e-12


def test_ssim_symmetric_and_window_options():
    rec, ref = _pair(seed=8)
    a = ssim(rec, ref, normalization="none", data_range=1.0)
    b = ssim(ref, rec, normalization="none", data_range=1.0)
    assert abs(a - b) < 1e-12  # SSIM is symmetric for a fixed R
    g = ssim(rec, ref, normalization="none", data_range=1.0, window="gaussian11")
    assert 0 < g < 1 and abs(g - a) > 1e-6


def test_ssim_matches_skimage():
    skm = pytest.importorskip("skimage.metrics")
    rec, ref = _pair(F=2, ny=24, nx=19, noise=0.1, seed=9)
    for f in range(2):
        mine = ssim(rec[f], ref[f], normalization="none", data_range=1.0)
        theirs = skm.structural_similarity(ref[f].numpy(), rec[f].numpy(), data_range=1.0)
        assert abs(mine - theirs) < 1e-10
        mine_g = ssim(rec[f], ref[f], normalization="none", data_range=1.0, window="gaussian11")
        theirs_g = skm.structural_similarity(ref[f].numpy(), rec[f].numpy(), data_range=1.0,
                                             gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
        assert abs(mine_g - theirs_g) < 1e-10
        mine_p = psnr(rec[f], ref[f], normalization="none", data_range=1.0)
        theirs_p = skm.peak_signal_noise_ratio(ref[f].numpy(), rec[f].numpy(), data_range=1.0)
        assert abs(mine_p - theirs_p) < 1e-9
    # default options = skimage on images divided by max|GT| over the series, frame mean
    r = (ref / ref.max()).numpy()
    x = (rec / ref.max()).numpy()
    ref_val = np.mean([skm.structural_similarity(r[f], x[f], data_range=1.0) for f in range(2)])
    assert abs(ssim(rec, ref) - ref_val) < 1e-10
    # float32 / complex64 inputs agree to single precision
    assert abs(ssim(rec.to(torch.complex64), ref.float()) - ref_val) < 1e-5
