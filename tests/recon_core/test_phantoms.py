"""Analytic phantom: closed-form ellipse transform, coil/ground-truth consistency, motion, noise."""

from __future__ import annotations

import math

import pytest
import torch

from recon_core.fft import ifft2c
from recon_core.phantoms import (CardiacPhantom, ellipse_image, ellipse_kspace, noise_covariance_matrix,
                                 simulate_scan)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


@pytest.fixture(scope="module")
def phantom() -> CardiacPhantom:
    return CardiacPhantom(48, 3, 4)


def test_ellipse_ft_matches_supersampled_dft():
    # two rotated, off-centre, overlapping ellipses on a 32² grid, rasterised 8× finer
    ell = torch.tensor([[2.3, -3.1, 9.0, 6.0, 0.4, 1.0],
                        [-4.0, 5.5, 3.0, 4.5, -1.1, -0.6]], dtype=torch.float64)
    s = 8
    g = (torch.arange(32 * s, dtype=torch.float64) + 0.5) / s - 0.5 - 16  # sub-pixel centres
    yy, xx = torch.meshgrid(g, g, indexing="ij")
    img = torch.zeros_like(yy)
    for cy, cx, ay, ax, th, rho in ell.tolist():
        u = (xx - cx) * math.cos(th) + (yy - cy) * math.sin(th)
        v = (yy - cy) * math.cos(th) - (xx - cx) * math.sin(th)
        img += rho * (((u / ax) ** 2 + (v / ay) ** 2) <= 1)
    gen = torch.Generator().manual_seed(3)
    k = (torch.rand(2, 150, generator=gen, dtype=torch.float64) * 2 - 1) * 2.0
    k = torch.cat([torch.zeros(2, 1, dtype=torch.float64), k], dim=1)
    r = torch.stack([yy.reshape(-1), xx.reshape(-1)])
    vals = img.reshape(-1)
    keep = vals != 0
    arg = k.T @ r[:, keep]  # [K, P]
    brute = (torch.polar(torch.ones_like(arg), -arg) * vals[keep]).sum(dim=1) / s ** 2
    analytic = ellipse_kspace(k, ell)
    assert analytic.dtype == torch.complex128
    assert _rel(analytic, brute) < 1e-2
    # DC is the signed area
    assert abs(float(analytic[0].real) - math.pi * (9 * 6 * 1.0 - 3 * 4.5 * 0.6)) < 1e-9
    # the rasteriser agrees on the (signed) area
    area = float(ellipse_image(ell, 32, 32, supersample=8).sum())
    assert area == pytest.approx(math.pi * (9 * 6 * 1.0 - 3 * 4.5 * 0.6), rel=1e-2)


def test_ellipse_kspace_rejects_bad_shapes():
    with pytest.raises(ValueError, match="ellipses must have shape"):
        ellipse_kspace(torch.zeros(2, 3), torch.zeros(5))
    with pytest.raises(ValueError, match=r"k must have shape \[2, M\]"):
        ellipse_kspace(torch.zeros(3, 3), torch.zeros(1, 6))


def test_coil_images_equal_maps_times_ground_truth(phantom):
    n = phantom.matrix
    body = phantom.body_mask()
    maps, gt = phantom.coil_maps(), phantom.ground_truth()
    assert maps.shape == (4, n, n) and gt.shape == (3, n, n)
    assert maps.dtype == gt.dtype == torch.complex64
    ref = maps[None] * gt[:, None]
    img = ifft2c(phantom.cartesian_kspace(n, 1))
    assert _rel(img[..., body], ref[..., body]) < 0.05
    # with 2x readout oversampling the FOV doubles along x: crop the centre
    img2 = ifft2c(phantom.cartesian_kspace(n, 2))[..., n // 2: n // 2 + n]
    assert _rel(img2[..., body], ref[..., body]) < 0.05
    # and there is (almost) nothing outside the central FOV
    outside = torch.cat([ifft2c(phantom.cartesian_kspace(n, 2))[..., : n // 4],
                         ifft2c(phantom.cartesian_kspace(n, 2))[..., -n // 4:]], dim=-1)
    assert float(outside.abs().max()) < 0.05 * float(img2.abs().max())


def test_arbitrary_points_agree_with_grid_path(phantom):
    n = phantom.matrix
    ky = (torch.arange(n) - n // 2) * (2 * math.pi / n)
    grid = torch.stack(torch.meshgrid(ky, ky, indexing="ij")).reshape(2, -1)
    traj = grid[None].expand(phantom.n_frames, -1, -1).contiguous()
    direct = phantom.kspace(traj).reshape(phantom.n_frames, -1, n, n)
    assert _rel(direct, phantom.cartesian_kspace(n, 1)) < 1e-4


def test_maps_normalised_inside_body(phantom):
    sos = (phantom.coil_maps().abs() ** 2).sum(dim=0)[phantom.body_mask()]
    assert abs(float(sos.mean()) - 1.0) < 1e-4
    assert 0.85 < float(sos.min()) and float(sos.max()) < 1.15
    # coils are distinct: each one's sensitivity varies strongly across the body
    mag = phantom.coil_maps().abs()[:, phantom.body_mask()]
    assert bool((mag.max(dim=1).values > 4 * mag.min(dim=1).values).all())


def test_frames_differ_and_background_is_static(phantom):
    gt = phantom.ground_truth()
    body = phantom.body_mask()
    for f in range(1, gt.shape[0]):
        assert _rel(gt[f], gt[0]) > 0.02
    # the body outline does not move: far outside the body all frames are (nearly) empty
    far = ~torch.nn.functional.max_pool2d(body[None, None].float(), 7, 1, 3)[0, 0].bool()
    assert float(gt[:, far].abs().max()) < 0.1 * float(gt.abs().max())
    # contrast: bright blood pool and dark lungs both present
    vals = gt[0, body].abs()
    assert float(vals.max()) > 4 * float(torch.quantile(vals, 0.05))


def test_static_single_frame():
    ph = CardiacPhantom(32, 1, 2)
    assert ph.ground_truth().shape == (1, 32, 32)
    assert float(ph.frame_times_s[0]) == 0.0


@pytest.mark.parametrize("kind", ["cartesian", "radial", "spiral"])
def test_simulate_scan_shapes_and_reproducibility(kind):
    kw = dict(accel=2, acs_lines=8, spokes_per_frame=5, interleaves=8, interleaves_per_frame=2,
              noise_std=0.05)
    a = simulate_scan(kind, 32, 2, 4, seed=1, **kw)
    b = simulate_scan(kind, 32, 2, 4, seed=1, **kw)
    c = simulate_scan(kind, 32, 2, 4, seed=2, **kw)
    assert torch.equal(a.kspace, b.kspace) and torch.equal(a.noise, b.noise)
    assert not torch.equal(a.kspace, c.kspace)
    assert a.kspace.dtype == torch.complex64 and a.ground_truth.shape == (2, 32, 32)
    assert a.coil_maps.shape == (4, 32, 32) and a.noise.shape[0] == 4
    if kind == "cartesian":
        assert a.kspace.shape == (2, 4, 32, 64) and a.mask.shape == (2, 32, 64)
        assert bool((a.kspace[a.mask[:, None].expand_as(a.kspace) == 0] == 0).all())
        assert a.trajectory is None
    else:
        m = a.trajectory.shape[-1]
        assert a.kspace.shape == (2, 4, m) and a.trajectory.shape == (2, 2, m)
        assert float(a.trajectory.abs().max()) <= math.pi + 1e-5
        assert a.encode_index.shape[0] == 2
        assert m == a.encode_index.shape[1] * a.samples_per_readout
        # different readouts in the two frames
        assert set(a.encode_index[0].tolist()).isdisjoint(a.encode_index[1].tolist())


def test_noise_covariance_is_the_requested_one():
    psi = noise_covariance_matrix(4, seed=0)
    assert torch.allclose(psi, psi.conj().T)
    assert float(psi.diagonal().real.mean()) == pytest.approx(1.0, abs=1e-5)
    assert float(psi.abs().fill_diagonal_(0).max()) > 0.05  # genuinely non-diagonal
    scan = simulate_scan("radial", 32, 1, 4, spokes_per_frame=8, noise_std=0.1, noise_samples=20000)
    cov = scan.noise @ scan.noise.conj().T / scan.noise.shape[1]
    assert _rel(cov, scan.noise_covariance) < 0.05
    # the noise added to k-space has the same covariance
    clean = simulate_scan("radial", 32, 1, 4, spokes_per_frame=8, noise_std=0.0)
    d = (scan.kspace - clean.kspace)[0]
    assert _rel(d @ d.conj().T / d.shape[1], scan.noise_covariance) < 0.15
    # noise_std is relative to the mean ground-truth magnitude in the body
    sigma2 = float(scan.noise_covariance.diagonal().real.mean())
    assert math.sqrt(sigma2) == pytest.approx(0.1 * scan.kspace_scale, rel=1e-4)


def test_radial_dc_matches_cartesian_centre():
    ph = CardiacPhantom(32, 1, 2)
    scan = simulate_scan("radial", 32, 1, 2, spokes_per_frame=3, noise_std=0.0, phantom=ph)
    dc = scan.trajectory[0].abs().sum(dim=0) < 1e-6
    cart = ph.cartesian_kspace(32, 1)[0, :, 16, 16]
    assert torch.allclose(scan.kspace[0][:, dc], cart[:, None].expand(-1, int(dc.sum())), rtol=1e-4)


def test_bad_arguments():
    with pytest.raises(ValueError, match="kind must be one of"):
        simulate_scan("rosette", 32, 1, 2)
    with pytest.raises(ValueError, match="mask_kind"):
        simulate_scan("cartesian", 32, 1, 2, mask_kind="random")
    with pytest.raises(ValueError, match="noise_std"):
        simulate_scan("radial", 32, 1, 2, noise_std=-1)
    with pytest.raises(TypeError, match="matrix must be an int"):
        CardiacPhantom(32.0, 1, 2)
    with pytest.raises(ValueError, match="traj must have shape"):
        CardiacPhantom(32, 2, 2).kspace(torch.zeros(1, 2, 5))
