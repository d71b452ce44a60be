"""Coil tools: prewhitening, SVD/GCC compression, Walsh/Inati/ESPIRiT maps (vs truth and vs BART), cfl I/O."""

from __future__ import annotations

import math
import shutil
import subprocess

import numpy as np
import pytest
import torch

from recon_core import coils
from recon_core.cfl import readcfl, writecfl
from recon_core.fft import fft2c, ifft2c
from tests.helpers import randc

HAVE_BART = shutil.which("bart") is not None


# ------------------------------------------------------------------------------------------------
# synthetic data: an object of ellipses with smooth phase × known smooth complex coil maps
# ------------------------------------------------------------------------------------------------

def _phantom(n: int = 64, n_coils: int = 8, device="cpu"):
    y, x = torch.meshgrid(torch.linspace(-1, 1, n), torch.linspace(-1, 1, n), indexing="ij")
    obj = ((x / 0.75) ** 2 + (y / 0.9) ** 2 <= 1).float()
    obj = obj + 0.5 * (((x - 0.2) / 0.3) ** 2 + ((y + 0.2) / 0.4) ** 2 <= 1).float()
    obj = obj - 0.4 * (((x + 0.3) / 0.2) ** 2 + ((y - 0.3) / 0.25) ** 2 <= 1).float()
    img = obj * torch.exp(1j * math.pi * 0.3 * x)
    maps = []
    for i in range(n_coils):
        a = 2 * math.pi * i / n_coils
        cx, cy = 1.3 * math.cos(a), 1.3 * math.sin(a)
        mag = torch.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * 0.8 ** 2))
        ph = torch.exp(1j * (a + 0.5 * math.pi * (math.cos(a) * x + math.sin(a) * y)))
        maps.append(mag * ph)
    maps = torch.stack(maps).to(torch.complex64)
    maps = maps / torch.linalg.vector_norm(maps, dim=0, keepdim=True)
    coil_images = (maps * img.to(torch.complex64)).to(device)
    return coil_images, maps.to(device), (obj > 0.05).to(device)


@pytest.fixture(scope="module")
def phantom64():
    return _phantom(64, 8)


def _corr(est: torch.Tensor, true: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean over ``mask`` of |Σ_c conj(est) true| / (‖est‖‖true‖): 1 = equal up to a per-pixel phase."""
    num = (est.conj() * true).sum(0).abs()
    den = torch.linalg.vector_norm(est, dim=0) * torch.linalg.vector_norm(true, dim=0)
    return float((num / den.clamp_min(1e-30))[mask].mean())


def _phase_smoothness(est: torch.Tensor, true: torch.Tensor, mask: torch.Tensor) -> float:
    """Largest jump between neighbouring pixels (inside mask) of the phase that maps est to true."""
    p = (est.conj() * true).sum(0)
    p = p / p.abs().clamp_min(1e-30)
    dy = (p[1:] - p[:-1]).abs()[mask[1:] & mask[:-1]]
    dx = (p[:, 1:] - p[:, :-1]).abs()[mask[:, 1:] & mask[:, :-1]]
    return float(torch.cat([dy, dx]).max())


# ------------------------------------------------------------------------------------------------
# noise
# ------------------------------------------------------------------------------------------------

def _correlated_noise(n_coils=6, n=20000, seed=0):
    """Noise with a fixed, known non-diagonal covariance; ``seed`` only changes the samples."""
    g = torch.Generator().manual_seed(1234)
    m = torch.randn(n_coils, n_coils, generator=g, dtype=torch.float64) + 1j * torch.randn(
        n_coils, n_coils, generator=g, dtype=torch.float64)
    true_cov = (m @ m.conj().T / n_coils + 0.2 * torch.eye(n_coils)).to(torch.complex128)
    L = torch.linalg.cholesky(true_cov)
    white = randc((n_coils, n), dtype=torch.complex128, seed=seed + 1) / math.sqrt(2)  # unit complex variance
    return (L @ white).to(torch.complex64), true_cov


def test_noise_covariance_estimates_known_covariance():
    noise, true_cov = _correlated_noise()
    cov = coils.noise_covariance(noise)
    assert cov.shape == (6, 6) and cov.dtype == torch.complex64
    assert torch.allclose(cov, cov.conj().T)
    rel = float((cov.to(torch.complex128) - true_cov).abs().max() / true_cov.abs().max())
    assert rel < 0.05, rel                        # ~1/sqrt(20000) statistical error
    # unbiased: with the mean removed the estimator divides by N-1
    x = noise[:, :5]
    xc = x - x.mean(1, keepdim=True)
    assert torch.allclose(coils.noise_covariance(x), xc @ xc.conj().T / 4, atol=1e-6)


def test_prewhitening_gives_identity_covariance(device):
    noise, _ = _correlated_noise()
    noise = noise.to(device)
    W = coils.prewhitening_matrix(coils.noise_covariance(noise))
    assert W.device == noise.device and W.dtype == torch.complex64
    assert torch.allclose(torch.triu(W, 1), torch.zeros_like(W))        # lower triangular (L⁻¹)
    white = coils.prewhiten(noise, W)
    dev = (coils.noise_covariance(white) - torch.eye(6, device=device)).abs().max()
    assert float(dev) < 0.05, float(dev)
    # against the true covariance of fresh noise (not the samples W was estimated from): still close
    fresh, true_cov = _correlated_noise(seed=7)
    assert float((fresh.to(torch.complex128) - noise.cpu().to(torch.complex128)).abs().max()) > 0.1
    dev2 = (coils.noise_covariance(coils.prewhiten(fresh.to(device), W)) - torch.eye(6, device=device)).abs().max()
    assert float(dev2) < 0.06, float(dev2)


def test_prewhiten_along_any_coil_axis():
    noise, _ = _correlated_noise(n_coils=4, n=400)
    W = coils.prewhitening_matrix(coils.noise_covariance(noise))
    data = randc((3, 4, 5, 6), seed=3)                  # coils on axis 1
    out = coils.prewhiten(data, W, coil_dim=1)
    ref = torch.einsum("cd,fdyx->fcyx", W, data)
    assert torch.allclose(out, ref, atol=1e-5)
    out_neg = coils.prewhiten(data.movedim(1, -1), W, coil_dim=-1).movedim(-1, 1)
    assert torch.allclose(out_neg, ref, atol=1e-5)


def test_prewhitening_rejects_bad_covariance():
    with pytest.raises(ValueError, match="positive definite"):
        coils.prewhitening_matrix(torch.tensor([[1, 2], [2, 1]], dtype=torch.complex64))
    with pytest.raises(ValueError, match="Hermitian"):
        coils.prewhitening_matrix(torch.tensor([[1, 0.5], [0, 1]], dtype=torch.complex64))
    with pytest.raises(ValueError, match="square"):
        coils.prewhitening_matrix(torch.zeros(2, 3, dtype=torch.complex64))
    with pytest.raises(TypeError, match="complex"):
        coils.prewhitening_matrix(torch.eye(2))
    with pytest.raises(ValueError, match="coils"):
        coils.prewhiten(randc((3, 10)), torch.eye(4, dtype=torch.complex64))


def test_noise_bandwidth_scale():
    # Gadgetron's convention: sqrt(2 · data_dwell / noise_dwell · receiver_noise_bandwidth)
    assert coils.noise_bandwidth_scale(5.0, 5.0, 0.5) == pytest.approx(1.0)
    assert coils.noise_bandwidth_scale(2.0, 8.0, 0.793) == pytest.approx(math.sqrt(2 * 4 * 0.793))
    # noise sampled at twice the bandwidth (half the dwell) has twice the variance: W must grow by sqrt(2)
    r = coils.noise_bandwidth_scale(1.0, 2.0) / coils.noise_bandwidth_scale(2.0, 2.0)
    assert r == pytest.approx(math.sqrt(2))
    with pytest.raises(ValueError, match="noise_dwell_us"):
        coils.noise_bandwidth_scale(0.0, 2.0)
    with pytest.raises(ValueError, match="receiver_noise_bandwidth"):
        coils.noise_bandwidth_scale(1.0, 2.0, -1.0)


# ------------------------------------------------------------------------------------------------
# coil compression
# ------------------------------------------------------------------------------------------------

def test_svd_compression_keeps_low_rank_signal(device):
    mix = randc((8, 4), seed=1, device=device)
    data = mix @ randc((4, 3000), seed=2, device=device)        # rank-4 signal in 8 coils
    M, kept = coils.svd_compression_matrix(data, 4, return_energy=True)
    assert M.shape == (4, 8) and M.device == data.device
    assert torch.allclose(M @ M.conj().T, torch.eye(4, dtype=M.dtype, device=device), atol=1e-5)
    comp = coils.apply_compression(data, M)
    back = M.conj().T @ comp
    assert float((back - data).norm() / data.norm()) < 1e-5
    assert kept == pytest.approx(1.0, abs=1e-6)
    # 3 virtual coils lose energy, and the reported fraction is the measured one
    M3, kept3 = coils.svd_compression_matrix(data, 3, return_energy=True)
    meas = float(coils.apply_compression(data, M3).abs().pow(2).sum() / data.abs().pow(2).sum())
    assert kept3 < 0.999 and meas == pytest.approx(kept3, rel=1e-4)
    # choosing by energy fraction picks the rank
    assert coils.svd_compression_matrix(data, energy=0.99999).shape == (4, 8)


def test_apply_compression_along_coil_dim():
    M = coils.svd_compression_matrix(randc((6, 200), seed=4), 3)
    k = randc((2, 6, 8, 8), seed=5)
    out = coils.apply_compression(k, M, coil_dim=1)
    assert out.shape == (2, 3, 8, 8)
    assert torch.allclose(out, torch.einsum("vc,fcyx->fvyx", M, k), atol=1e-5)
    with pytest.raises(ValueError, match="n_virtual"):
        coils.svd_compression_matrix(k[0], 7)
    with pytest.raises(ValueError, match="exactly one"):
        coils.svd_compression_matrix(k[0])


def test_gcc_beats_svd_on_readout_varying_profiles(phantom64):
    coil_images, _, _ = phantom64
    k = fft2c(coil_images)
    calib = k[:, 20:44]                                          # 24 ACS lines, full readout
    for nv in (2, 3):
        M = coils.svd_compression_matrix(calib, nv)
        A, kept = coils.gcc_compression_matrices(calib, nv, return_energy=True)
        assert A.shape == (64, nv, 8)
        eye = torch.eye(nv, dtype=A.dtype).expand(64, nv, nv)
        assert torch.allclose(A @ A.conj().transpose(-2, -1), eye, atol=1e-5)   # orthonormal rows
        e_svd = float(coils.apply_compression(k, M).abs().pow(2).sum() / k.abs().pow(2).sum())
        e_gcc = float(coils.apply_gcc(k, A).abs().pow(2).sum() / k.abs().pow(2).sum())
        assert e_gcc >= e_svd, (nv, e_gcc, e_svd)
        assert e_gcc > 0.98
        cal_gcc = float(coils.apply_gcc(calib, A).abs().pow(2).sum() / calib.abs().pow(2).sum())
        assert kept == pytest.approx(cal_gcc, rel=1e-4)
    # alignment: inside the object neighbouring matrices are close (no arbitrary rotations)
    A = coils.gcc_compression_matrices(calib, 3)
    cols = torch.arange(14, 50)                                  # x positions well inside the object
    diff = (A[cols[1:]] - A[cols[:-1]]).flatten(1).norm(dim=1)
    assert float(diff.max()) < 0.5, float(diff.max())


def test_gcc_all_virtual_coils_is_lossless_and_checks_shapes():
    k = randc((4, 10, 16), seed=6)
    A = coils.gcc_compression_matrices(k, 4, window=3)
    out = coils.apply_gcc(k, A)
    assert torch.allclose(out.norm(), k.norm(), rtol=1e-5)
    # batch dimensions in front are allowed
    out2 = coils.apply_gcc(torch.stack([k, 2 * k]), A)
    assert torch.allclose(out2[1], 2 * out, atol=1e-5)
    with pytest.raises(ValueError, match="n_readout"):
        coils.apply_gcc(randc((4, 10, 20)), A)
    with pytest.raises(ValueError, match="window"):
        coils.gcc_compression_matrices(k, 2, window=4)
    A20 = coils.gcc_compression_matrices(k, 2, n_readout=20)
    assert A20.shape == (20, 2, 4)


# ------------------------------------------------------------------------------------------------
# sensitivities
# ------------------------------------------------------------------------------------------------

def test_espirit_recovers_true_maps(phantom64, device):
    coil_images, maps, mask = (t.to(device) for t in phantom64)
    calib = coils.calibration_region(fft2c(coil_images), size=24)
    est = coils.espirit_maps(calib, (64, 64))
    assert est.shape == (8, 64, 64) and est.dtype == torch.complex64 and est.device == coil_images.device
    assert _corr(est, maps, mask) > 0.999
    norm = torch.linalg.vector_norm(est, dim=0)
    assert torch.allclose(norm[mask], torch.ones_like(norm[mask]), atol=1e-4)
    # outside the support (far corners of the FOV) the eigenvalue drops below crop: maps are zero
    assert float(norm[:4, :4].max()) == 0.0 and float(norm[-4:, -4:].max()) == 0.0
    assert _phase_smoothness(est, maps, mask) < 0.2


def test_espirit_other_image_size_and_two_maps(phantom64):
    coil_images, maps, mask = phantom64
    calib = coils.calibration_region(fft2c(coil_images), size=24)
    # maps for a half-FOV-resolution grid: same FOV, so they equal the true maps subsampled by 2
    small = coils.espirit_maps(calib, (32, 32), crop=0.9)
    assert _corr(small, maps[:, ::2, ::2], mask[::2, ::2]) > 0.995
    two = coils.espirit_maps(calib, (64, 64), n_maps=2)
    assert two.shape == (2, 8, 64, 64)
    one = coils.espirit_maps(calib, (64, 64))
    assert torch.allclose(two[0], one, atol=1e-4)
    # second map set is orthogonal to the first where both exist
    both = (two[0].abs().sum(0) > 0) & (two[1].abs().sum(0) > 0)
    if both.any():
        assert float((two[0].conj() * two[1]).sum(0).abs()[both].max()) < 1e-3


def test_espirit_rejects_bad_input():
    calib = randc((4, 12, 12))
    with pytest.raises(TypeError, match="calib"):
        coils.espirit_maps(calib.real, (32, 32))
    with pytest.raises(ValueError, match="kernel_size"):
        coils.espirit_maps(calib, (32, 32), kernel_size=14)
    with pytest.raises(ValueError, match="crop"):
        coils.espirit_maps(calib, (32, 32), crop=1.5)
    with pytest.raises(ValueError, match="n_maps"):
        coils.espirit_maps(calib, (32, 32), n_maps=5)
    with pytest.raises(ValueError, match="image_shape"):
        coils.espirit_maps(calib, (8, 32))


def test_walsh_and_inati_recover_true_maps(phantom64, device):
    coil_images, maps, mask = (t.to(device) for t in phantom64)
    for fn in (coils.walsh_maps, coils.inati_maps):
        est = fn(coil_images)
        assert est.shape == (8, 64, 64) and est.device == coil_images.device
        assert _corr(est, maps, mask) > 0.99, fn.__name__
        norm = torch.linalg.vector_norm(est, dim=0)
        assert torch.allclose(norm[mask], torch.ones_like(norm[mask]), atol=1e-4)
        assert _phase_smoothness(est, maps, mask) < 0.2, fn.__name__
    with pytest.raises(ValueError, match="kernel_size"):
        coils.walsh_maps(coil_images, kernel_size=6)


def test_maps_from_low_resolution_calibration(phantom64):
    coil_images, maps, mask = phantom64
    k = fft2c(coil_images)
    calib = coils.calib_from_images(coil_images, 24)
    assert torch.allclose(calib, k[:, 20:44, 20:44], atol=1e-5)
    lowres = ifft2c(torch.nn.functional.pad(calib, (20, 20, 20, 20)))
    assert _corr(coils.espirit_maps(calib, (64, 64)), maps, mask) > 0.999
    assert _corr(coils.walsh_maps(lowres), maps, mask) > 0.99


def test_calibration_region_finds_acs_block():
    k = randc((3, 40, 32), seed=8)
    mask = torch.zeros(40, 32)
    mask[::4] = 1
    mask[14:26] = 1                                    # 12 ACS lines: rows 14..25, centre 20
    mask[13] = 0
    mask[26] = 0
    cal = coils.calibration_region(k * mask, mask)
    assert cal.shape == (3, 12, 32)
    assert torch.equal(cal, k[:, 14:26])
    assert torch.equal(coils.calibration_region(k * mask), cal)          # mask inferred from zeros
    # a 2-D block (e.g. Poisson-disc with a fully sampled centre): 10 × 6 around (20, 16)
    m2 = (torch.rand(40, 32, generator=torch.Generator().manual_seed(0)) < 0.3).float()
    m2[15:25, 13:19] = 1
    m2[14, :] = 0
    m2[25, :] = 0
    m2[:, 12] = 0
    m2[:, 19] = 0
    assert coils.calibration_region(k * m2, m2).shape == (3, 10, 6)
    assert coils.calibration_region(k, size=(8, 6)).shape == (3, 8, 6)
    assert torch.equal(coils.calibration_region(k, size=8), k[:, 16:24, 12:20])
    m3 = mask.clone()
    m3[20] = 0
    with pytest.raises(ValueError, match="centre"):
        coils.calibration_region(k, m3)
    with pytest.raises(ValueError, match="mask"):
        coils.calibration_region(k, mask[:10])


def test_normalize_maps():
    m = randc((4, 5, 6), seed=9)
    m[:, 0, 0] = 0
    out = coils.normalize_maps(m)
    norm = torch.linalg.vector_norm(out, dim=0)
    assert torch.allclose(norm[1:], torch.ones_like(norm[1:]), atol=1e-6)
    assert float(norm[0, 0]) == 0.0
    assert torch.allclose(out[:, 2, 3] * torch.linalg.vector_norm(m[:, 2, 3]), m[:, 2, 3], atol=1e-6)


# ------------------------------------------------------------------------------------------------
# BART as an oracle (skipped without `bart`)
# ------------------------------------------------------------------------------------------------

def test_cfl_roundtrip_and_fortran_order(tmp_path):
    a = (np.arange(24).reshape(2, 3, 4) + 1j * np.arange(24).reshape(2, 3, 4)[::-1]).astype(np.complex64)
    writecfl(tmp_path / "a", a)
    assert (tmp_path / "a.hdr").read_text().startswith("# Dimensions\n2 3 4")
    assert np.array_equal(readcfl(tmp_path / "a.cfl"), a)
    # column-major: the first dimension varies fastest in the file
    raw = np.fromfile(tmp_path / "a.cfl", dtype=np.complex64)
    assert raw[1] == a[1, 0, 0] and raw[2] == a[0, 1, 0]
    with pytest.raises(ValueError, match="header"):
        (tmp_path / "b.hdr").write_text("# Dimensions\n5 5\n")
        np.zeros(3, np.complex64).tofile(tmp_path / "b.cfl")
        readcfl(tmp_path / "b")


@pytest.mark.skipif(not HAVE_BART, reason="bart not on PATH")
def test_cfl_interoperates_with_bart(tmp_path):
    a = randc((5, 3, 2), seed=10).numpy()
    writecfl(tmp_path / "a", a)
    subprocess.run(["bart", "transpose", "0", "2", str(tmp_path / "a"), str(tmp_path / "b")], check=True,
                   capture_output=True)
    assert np.array_equal(readcfl(tmp_path / "b"), a.transpose(2, 1, 0))


def _bart_ecalib(kspace: torch.Tensor, tmp_path, *args: str) -> torch.Tensor:
    c, ny, nx = kspace.shape
    writecfl(tmp_path / "k", kspace.numpy().transpose(2, 1, 0)[:, :, None, :])
    subprocess.run(["bart", "ecalib", "-m1", *args, str(tmp_path / "k"), str(tmp_path / "s")], check=True,
                   capture_output=True)
    return torch.from_numpy(readcfl(tmp_path / "s").reshape(nx, ny, c).transpose(2, 1, 0).copy())


@pytest.mark.skipif(not HAVE_BART, reason="bart not on PATH")
def test_espirit_agrees_with_bart_ecalib(phantom64, tmp_path):
    coil_images, maps, mask = phantom64
    k = fft2c(coil_images)
    ref = _bart_ecalib(k, tmp_path, "-r", "24")
    est = coils.espirit_maps(coils.calibration_region(k, size=24), (64, 64))
    assert _corr(ref, maps, mask) > 0.99                     # the oracle itself is right
    assert _corr(est, ref, mask) > 0.98


def _read_brain(path) -> torch.Tensor:
    ismrmrd = pytest.importorskip("ismrmrd")
    ds = ismrmrd.Dataset(str(path), "/dataset", create_if_needed=False)
    try:
        hdr = ismrmrd.xsd.CreateFromDocument(ds.read_xml_header())
        ny = hdr.encoding[0].encodedSpace.matrixSize.y
        acqs = [ds.read_acquisition(i) for i in range(ds.number_of_acquisitions())]
    finally:
        ds.close()
    acqs = [a for a in acqs if not a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)]
    c, nx = acqs[0].data.shape
    k = np.zeros((c, ny, nx), np.complex64)
    for a in acqs:
        k[:, a.idx.kspace_encode_step_1] = a.data
    return torch.from_numpy(k)


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_BART, reason="bart not on PATH")
def test_real_brain_espirit_agrees_with_bart_and_inati(shared_data, tmp_path):
    path = shared_data / "brain_invivo_16ch_128_cartesian.h5"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    k = _read_brain(path)                                    # fully sampled, 16 coils, 128²
    img = ifft2c(k)
    rss = torch.linalg.vector_norm(img, dim=0)
    mask = rss > 0.1 * rss.max()
    ref = _bart_ecalib(k, tmp_path, "-r", "24", "-c", "0.95")
    est = coils.espirit_maps(coils.calibration_region(k, size=24), (128, 128), crop=0.95)
    on_est, on_ref = est.abs().sum(0) > 0, ref.abs().sum(0) > 0
    both = mask & on_est & on_ref
    assert _corr(est, ref, both) > 0.999
    assert float((mask & (on_est ^ on_ref)).sum()) < 0.05 * float(mask.sum())   # same crop decisions
    assert _corr(coils.inati_maps(img), est, both) > 0.99


def test_calibration_region_max_size_clips_around_dc():
    k = randc((2, 40, 32), seed=10)
    mask = torch.zeros(40, 32)
    mask[10:34] = 1                                    # rows 10..33 fully sampled, centre 20
    assert coils.calibration_region(k, mask).shape == (2, 24, 32)
    cut = coils.calibration_region(k, mask, max_size=(8, 16))
    assert torch.equal(cut, k[:, 16:24, 8:24])         # DC (20, 16) at (4, 8) of the block
    # the block never leaves the fully sampled rows, even when DC sits near its edge
    assert torch.equal(coils.calibration_region(k, mask, max_size=(30, 40)), k[:, 10:34])


def test_map_coverage_counts_object_without_sensitivity(phantom64):
    coil_images, maps, obj = phantom64
    assert coils.map_coverage(maps, coil_images) == pytest.approx(1.0)
    assert coils.map_coverage(maps, obj) == pytest.approx(1.0)
    holed = maps.clone()
    holed[:, :32] = 0                                  # upper half of the image: no sensitivity
    frac = float(obj[:32].sum() / obj.sum())
    assert coils.map_coverage(holed, obj) == pytest.approx(1 - frac, abs=1e-6)
    weighted = coils.map_coverage(holed, coil_images)  # intensity-weighted: near the unweighted value
    assert abs(weighted - (1 - frac)) < 0.1
    with pytest.raises(ValueError, match="object"):
        coils.map_coverage(maps, torch.zeros(64, 64, dtype=torch.bool))
    with pytest.raises(ValueError, match="match"):
        coils.map_coverage(maps, obj[:32])


def test_espirit_from_a_few_lines_is_caught_by_map_coverage(phantom64):
    """The failure the coverage check exists for: ESPIRiT (6x6 kernel) on a 6-line calibration block."""
    coil_images, _, obj = phantom64
    k = fft2c(coil_images)
    few = coils.calibration_region(k, size=(6, 64))
    lowres = coils.lowres_coil_images(few, (64, 64))
    bad = coils.espirit_maps(few, (64, 64), kernel_size=6, crop=0.9)
    good = coils.espirit_maps(coils.calibration_region(k, size=24), (64, 64), crop=0.9)
    assert coils.map_coverage(good, lowres) > 0.95
    assert coils.map_coverage(bad, lowres) < coils.map_coverage(good, lowres)


def test_lowres_coil_images_and_object_mask(phantom64):
    coil_images, _, obj = phantom64
    calib = coils.calibration_region(fft2c(coil_images), size=24)
    low = coils.lowres_coil_images(calib, (64, 64))
    assert low.shape == (8, 64, 64) and low.dtype == torch.complex64
    assert torch.allclose(fft2c(low)[:, 20:44, 20:44], calib, atol=1e-5)
    m = coils.object_mask(low)
    assert float((m & obj).sum() / obj.sum()) > 0.9 and float((m & ~obj).sum() / m.sum()) < 0.2
    with pytest.raises(ValueError, match="larger"):
        coils.lowres_coil_images(calib, (16, 16))


def test_gridded_coil_images_cartesian_and_pooled():
    k = randc((3, 4, 16, 12), seed=11)
    mask = (torch.rand(3, 16, 12, generator=torch.Generator().manual_seed(1)) < 0.5).float()
    out = coils.gridded_coil_images(k, None, None, (16, 12), mask=mask)
    assert torch.allclose(out, ifft2c(k * mask[:, None]), atol=1e-6)
    pooled = coils.gridded_coil_images(k, None, None, (16, 12), mask=mask, pool_frames=True)
    avg = (k * mask[:, None]).sum(0) / mask.sum(0).clamp_min(1)
    assert torch.allclose(pooled, ifft2c(avg), atol=1e-6)


def test_gridded_coil_images_noncartesian_pooled_is_sum_of_frames():
    from recon_core.operators import Nufft
    from recon_core.trajectories import golden_angle_radial, ramp_dcf

    traj = golden_angle_radial(8, 32, n_frames=3)
    dcf = ramp_dcf(traj, (16, 16))
    k = randc((3, 2, traj.shape[-1]), seed=12)
    per = coils.gridded_coil_images(k, traj, dcf, (16, 16))
    ref = Nufft(traj, (16, 16)).adjoint(k * dcf[:, None].to(k.dtype))
    assert torch.allclose(per, ref, atol=1e-5)
    pooled = coils.gridded_coil_images(k, traj, dcf, (16, 16), pool_frames=True)
    assert pooled.shape == (2, 16, 16)
    assert torch.allclose(pooled, per.sum(0), atol=1e-4 * float(per.abs().max()))
