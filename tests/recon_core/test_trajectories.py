"""Sampling masks, radial/spiral trajectories, density compensation and unit conversions."""

import math

import numpy as np
import pytest
import torch
import torchkbnufft as tkbn

from recon_core.fft import fft2c
from recon_core.trajectories import (
    GOLDEN_ANGLE,
    GOLDEN_RATIO,
    acs_region,
    golden_angle_radial,
    ismrmrd_to_radians,
    mask_acceleration,
    pipe_menon_dcf,
    poisson_disc_mask,
    radial_angles,
    radians_to_ismrmrd,
    ramp_dcf,
    spiral_trajectory,
    trajectory_from_acquisitions,
    uniform_mask,
    variable_density_mask,
)


def angle_diff_mod(a: torch.Tensor, period: float) -> torch.Tensor:
    """Signed difference wrapped into [-period/2, period/2)."""
    return torch.remainder(a + period / 2, period) - period / 2


# ---------------------------------------------------------------------------------------------
# Cartesian masks


def test_uniform_mask_pattern_acs_and_interleaving():
    ny, nx, R, acs = 32, 12, 4, 6
    m = uniform_mask(ny, nx, R, acs, n_frames=5)
    assert m.shape == (5, ny, nx) and m.dtype == torch.float32
    assert set(torch.unique(m).tolist()) <= {0.0, 1.0}
    # readout fully sampled: every line is all-ones or all-zeros
    assert torch.all((m.sum(-1) == 0) | (m.sum(-1) == nx))
    lines = m[..., 0].bool()
    c = ny // 2
    assert lines[:, c - acs // 2:c - acs // 2 + acs].all()
    ky = torch.arange(ny) - c
    for f in range(5):
        outside = torch.ones(ny, dtype=torch.bool)
        outside[c - acs // 2:c - acs // 2 + acs] = False
        expected = torch.remainder(ky - f % R, R) == 0
        assert torch.equal(lines[f][outside], expected[outside])
    # ky-t interleaving: R consecutive frames together sample every line
    assert lines[:R].any(0).all()
    assert not torch.equal(m[0], m[1])
    same = uniform_mask(ny, nx, R, acs, n_frames=3, shift_per_frame=False)
    assert torch.equal(same[0], same[2])
    (y0, y1), (x0, x1) = acs_region(m)
    assert y0 <= c - acs // 2 and y1 >= c - acs // 2 + acs and (x0, x1) == (0, nx)


def test_variable_density_mask_counts_seeds_and_density():
    ny, nx, R, acs = 64, 8, 4, 8
    m = variable_density_mask(ny, nx, R, acs, n_frames=40, seed=3)
    assert m.shape == (40, ny, nx) and m.dtype == torch.float32
    lines = m[..., 0]
    assert torch.all(lines.sum(-1) == round(ny / R))
    assert torch.all((m.sum(-1) == 0) | (m.sum(-1) == nx))
    c = ny // 2
    assert lines[:, c - acs // 2:c + acs // 2].bool().all()
    assert torch.equal(m, variable_density_mask(ny, nx, R, acs, n_frames=40, seed=3))
    assert not torch.equal(m, variable_density_mask(ny, nx, R, acs, n_frames=40, seed=4))
    assert not torch.equal(m[0], m[1])
    # variable density: lines next to the ACS block are hit more often than the outer quarter
    freq = lines.mean(0)
    near = torch.cat([freq[c - acs // 2 - 8:c - acs // 2], freq[c + acs // 2:c + acs // 2 + 8]]).mean()
    far = torch.cat([freq[:ny // 8], freq[-ny // 8:]]).mean()
    assert near > 2 * far
    with pytest.raises(ValueError, match="acs_lines"):
        variable_density_mask(ny, nx, 16, 8)


def test_poisson_disc_mask_acceleration_acs_and_blue_noise():
    ny, nx, R = 64, 64, 8
    m = poisson_disc_mask(ny, nx, R, acs=(6, 6), n_frames=3, seed=1)
    assert m.shape == (3, ny, nx) and m.dtype == torch.float32
    for f in range(3):
        assert abs(mask_acceleration(m[f]) - R) / R < 0.10
    (y0, y1), (x0, x1) = acs_region(m)
    assert y0 <= ny // 2 - 3 and y1 >= ny // 2 + 3 and x0 <= nx // 2 - 3 and x1 >= nx // 2 + 3
    assert torch.equal(m, poisson_disc_mask(ny, nx, R, acs=(6, 6), n_frames=3, seed=1))
    assert not torch.equal(m[0], m[1])
    # variable density: centre disc denser than the outer ring
    yy, xx = torch.meshgrid(torch.arange(ny) - ny // 2, torch.arange(nx) - nx // 2, indexing="ij")
    rho = torch.sqrt((yy / (ny / 2)) ** 2 + (xx / (nx / 2)) ** 2)
    assert m[:, rho < 0.3].mean() > 2 * m[:, rho > 0.7].mean()
    # Poisson-disc (not white noise): outer samples keep a minimum distance from each other
    pts = torch.nonzero(m[0] * (rho > 0.7)).double()
    d = torch.cdist(pts, pts) + 1e9 * torch.eye(len(pts), dtype=torch.float64)
    assert d.min() >= 2.0
    assert torch.all(poisson_disc_mask(8, 8, 1.0) == 1)


def test_acs_region_on_hand_made_masks():
    m = torch.zeros(2, 10, 12)
    m[:, 3:7, 4:9] = 1
    m[0, 0, :] = 1
    assert acs_region(m) == ((3, 7), (4, 9))
    m[1, 6, 8] = 0  # a hole in one frame shrinks the common block
    (y0, y1), (x0, x1) = acs_region(m)
    assert (y0, y1, x0, x1) in {(3, 6, 4, 9), (3, 7, 4, 8)}
    assert acs_region(torch.zeros(8, 8)) is None
    with pytest.raises(ValueError, match="mask"):
        acs_region(torch.zeros(2, 2, 2, 2))


# ---------------------------------------------------------------------------------------------
# radial


def test_golden_and_tiny_golden_increments_continue_across_frames():
    th = radial_angles(7, n_frames=3).double().reshape(-1)
    d = angle_diff_mod(th[1:] - th[:-1] - GOLDEN_ANGLE, math.pi)
    assert abs(math.degrees(GOLDEN_ANGLE) - 111.246) < 1e-3
    assert d.abs().max() < 1e-5
    for n in (2, 5, 10):
        th = radial_angles(5, n_frames=2, angle=f"tiny:{n}").double().reshape(-1)
        inc = math.pi / (GOLDEN_RATIO + n - 1)
        assert angle_diff_mod(th[1:] - th[:-1] - inc, math.pi).abs().max() < 1e-5
    u = radial_angles(4, n_frames=2, angle="uniform")
    assert torch.allclose(u[1], torch.tensor([0, 1, 2, 3]) * math.pi / 4)
    with pytest.raises(ValueError, match="tiny"):
        radial_angles(4, angle="tiny:11")
    with pytest.raises(ValueError, match="angle"):
        radial_angles(4, angle="silver")


def test_golden_angle_radial_geometry():
    S, R, F = 5, 32, 2
    traj = golden_angle_radial(S, R, n_frames=F)
    assert traj.shape == (F, 2, S * R) and traj.dtype == torch.float32
    assert traj.min() >= -math.pi - 1e-6 and traj.max() < math.pi
    kabs = traj.norm(dim=1)
    assert kabs.max() <= math.pi + 1e-5
    spokes = traj.reshape(F, 2, S, R)
    assert torch.all(spokes[..., R // 2] == 0)  # DC sampled exactly once per spoke
    theta = radial_angles(S, F)
    # positive half of each spoke points along (sin θ, cos θ); radii spaced 2π/R
    tip = spokes[..., -1]
    assert angle_diff_mod(torch.atan2(tip[:, 0], tip[:, 1]) - theta, 2 * math.pi).abs().max() < 1e-5
    radii = spokes.norm(dim=1)
    assert torch.allclose(radii[..., R // 2:], torch.arange(R // 2) * 2 * math.pi / R, atol=1e-5)
    assert torch.allclose(radii[..., 0], torch.full((F, S), math.pi), atol=1e-5)
    with pytest.raises(ValueError, match="readout_oversampling"):
        golden_angle_radial(4, 30, readout_oversampling=4.0)


# ---------------------------------------------------------------------------------------------
# spiral


def test_spiral_single_arm_properties():
    n_il, n_s = 8, 600
    traj = spiral_trajectory(n_il, n_s, density_power=1.5, matrix_size=64)
    assert traj.shape == (1, 2, n_il * n_s) and traj.dtype == torch.float32
    arms = traj[0].reshape(2, n_il, n_s)
    assert torch.all(arms[:, :, 0] == 0)  # k(0) = 0
    r = arms.norm(dim=0)
    assert torch.all(r[:, 1:] >= r[:, :-1] - 1e-6)  # monotone radius
    assert abs(float(r.max()) - math.pi) < 1e-5 and float(r.max()) <= math.pi + 1e-5
    # bounded step: |dk/dτ| ≤ π·sqrt(p² + (2π·turns)²), turns = p·N/(2·n_il)
    turns = 1.5 * 64 / (2 * n_il)
    bound = math.pi * math.hypot(1.5, 2 * math.pi * turns) / (n_s - 1)
    steps = (arms[:, :, 1:] - arms[:, :, :-1]).norm(dim=0)
    assert steps.max() <= bound * 1.001
    assert steps.max() > 0.5 * bound  # the bound is tight, not vacuous
    # arms are rotated copies: arm i = arm 0 rotated by 2π·i/n_il
    ang = torch.atan2(arms[0, :, -1], arms[1, :, -1]).double()
    d = angle_diff_mod(ang[1:] - ang[:-1] - 2 * math.pi / n_il, 2 * math.pi)
    assert d.abs().max() < 1e-5


def test_spiral_full_set_meets_nyquist_at_edge():
    N = 128
    full = spiral_trajectory(32, 3000, matrix_size=N)[0].double()
    full = full[:, full.norm(dim=0) > 0.55 * math.pi]  # only the annulus matters below
    g = torch.Generator().manual_seed(0)
    rho = (0.6 + 0.35 * torch.rand(800, generator=g, dtype=torch.float64)) * math.pi
    phi = 2 * math.pi * torch.rand(800, generator=g, dtype=torch.float64)
    pts = torch.stack([rho * torch.sin(phi), rho * torch.cos(phi)], 1)
    nn = torch.cdist(pts, full.T).min(1).values
    # arms 2π/N apart ⇒ no point of the annulus is farther than ~π/N from a sample
    assert nn.max() < 1.1 * math.pi / N
    # half the arms (same turns) leave gaps of twice the Nyquist distance
    half = spiral_trajectory(32, 3000, matrix_size=N, interleaves_per_frame=16,
                             golden_rotation=False)[0].double()
    assert torch.cdist(pts, half.T).min(1).values.max() > 1.5 * math.pi / N


def test_spiral_frames_use_subsets_of_the_interleaf_design():
    full = spiral_trajectory(32, 64, matrix_size=128)[0].reshape(2, 32, 64)
    seq = spiral_trajectory(32, 64, n_frames=8, interleaves_per_frame=4, golden_rotation=False,
                            matrix_size=128)
    gold = spiral_trajectory(32, 64, n_frames=8, interleaves_per_frame=4, matrix_size=128)
    assert seq.shape == (8, 2, 4 * 64)

    def arm_ids(tr):
        arms = tr.reshape(2, -1, 64)
        ids = []
        for a in range(arms.shape[1]):
            d = (full - arms[:, a:a + 1]).norm(dim=0).amax(-1)
            assert d.min() < 1e-5  # every frame's arm is one of the 32 designed arms
            ids.append(int(d.argmin()))
        return ids

    seen = sorted(i for f in range(8) for i in arm_ids(seq[f]))
    assert seen == list(range(32))  # 8 sequential frames × 4 arms = all 32 arms once
    g_ids = [tuple(sorted(arm_ids(gold[f]))) for f in range(8)]
    assert g_ids[0] != g_ids[1] and len(set(g_ids)) >= 4
    with pytest.raises(ValueError, match="interleaves_per_frame"):
        spiral_trajectory(32, 64, interleaves_per_frame=5)


# ---------------------------------------------------------------------------------------------
# density compensation


def test_pipe_menon_is_one_on_cartesian_grid_and_matches_ramp_on_radial():
    N = 32
    ky, kx = torch.meshgrid(torch.arange(N) - N // 2, torch.arange(N) - N // 2, indexing="ij")
    cart = torch.stack([ky.flatten(), kx.flatten()]).float() * (2 * math.pi / N)
    d = pipe_menon_dcf(cart, (N, N))
    assert d.shape == (1, N * N) and d.dtype == torch.float32
    assert abs(float(d.mean()) - 1.0) < 0.02 and float(d.std()) < 1e-3

    traj = golden_angle_radial(int(math.ceil(N * math.pi / 2)), 2 * N, angle="uniform")
    ramp, pm = ramp_dcf(traj)[0], pipe_menon_dcf(traj, (N, N))[0]
    k = traj[0].norm(dim=0)
    sel = (k > 0.3) & (k < 2.8)
    corr = torch.corrcoef(torch.stack([ramp[sel], pm[sel]]))[0, 1]
    assert corr > 0.95
    assert abs(float((pm[sel] / ramp[sel]).mean()) - 1.0) < 0.05  # same scale convention
    # ramp shape: proportional to |k| away from DC, DC weight positive but smallest
    assert torch.allclose(ramp[sel] / k[sel], (ramp[sel] / k[sel]).mean().expand(int(sel.sum())), rtol=1e-4)
    assert ramp.min() > 0 and torch.all(ramp[k == 0] < ramp[k > 0].min())


def _torchkbnufft_ortho_factor(N: int) -> float:
    """torchkbnufft's norm="ortho" divides by sqrt(prod(grid_size)) (2N per axis by default), not
    sqrt(prod(im_size)); this returns the factor to our convention and checks it against fft2c."""
    ky, kx = torch.meshgrid(torch.arange(N) - N // 2, torch.arange(N) - N // 2, indexing="ij")
    cart = torch.stack([ky.flatten(), kx.flatten()]).float() * (2 * math.pi / N)
    g = torch.Generator().manual_seed(0)
    x = torch.complex(torch.randn(N, N, generator=g), torch.randn(N, N, generator=g))
    y = tkbn.KbNufft(im_size=(N, N))(x[None, None], cart, norm="ortho").reshape(N, N)
    factor = 2.0
    ref = fft2c(x)
    assert float((factor * y - ref).norm() / ref.norm()) < 1e-2
    return factor


@pytest.mark.parametrize("dcf_name", ["ramp", "pipe_menon"])
def test_dcf_weighted_adjoint_is_approximate_inverse(dcf_name):
    N = 32
    factor = _torchkbnufft_ortho_factor(N)
    traj = golden_angle_radial(int(math.ceil(N * math.pi / 2)), 2 * N)
    dcf = ramp_dcf(traj) if dcf_name == "ramp" else pipe_menon_dcf(traj, (N, N))
    yy, xx = torch.meshgrid(torch.arange(N) - N // 2, torch.arange(N) - N // 2, indexing="ij")
    blob = torch.exp(-((yy - 2.0) ** 2 + (xx + 1.0) ** 2) / (2 * 3.0 ** 2)).to(torch.complex64)
    fwd, adj = tkbn.KbNufft(im_size=(N, N)), tkbn.KbNufftAdjoint(im_size=(N, N))
    y = factor * fwd(blob[None, None], traj[0], norm="ortho")
    rec = factor * adj(y * dcf[0], traj[0], norm="ortho")[0, 0]
    disc = (yy ** 2 + xx ** 2) < (0.4 * N) ** 2
    nrmse = float((rec - blob)[disc].norm() / blob[disc].norm())
    assert nrmse < (0.1 if dcf_name == "ramp" else 0.02), nrmse
    # without density compensation the adjoint is far from an inverse
    raw = factor * adj(y, traj[0], norm="ortho")[0, 0]
    assert float((raw - blob)[disc].norm() / blob[disc].norm()) > 0.5


def test_dcf_rejects_bad_input():
    with pytest.raises(ValueError, match="traj"):
        ramp_dcf(torch.zeros(3, 5))
    with pytest.raises(TypeError, match="traj"):
        pipe_menon_dcf(np.zeros((2, 5)), (8, 8))
    with pytest.raises(ValueError, match="image_shape"):
        pipe_menon_dcf(torch.zeros(2, 5), (8, 8, 8))


# ---------------------------------------------------------------------------------------------
# conversions


def test_unit_conversions_round_trip_and_acquisition_stacking():
    g = torch.Generator().manual_seed(0)
    t = (torch.rand(3, 2, 10, generator=g) - 0.5) * 2 * math.pi
    assert torch.allclose(ismrmrd_to_radians(radians_to_ismrmrd(t, (64, 48)), (64, 48)), t, atol=1e-6)
    assert torch.allclose(ismrmrd_to_radians(torch.tensor([-32.0, 16.0]), 64),
                          torch.tensor([-math.pi, math.pi / 2]))
    ky_kx = ismrmrd_to_radians(torch.tensor([[-32.0], [24.0]]), (64, 48))
    assert torch.allclose(ky_kx[:, 0], torch.tensor([-math.pi, math.pi]))
    # two acquisitions, ISMRMRD columns (kx, ky) in cycles/FOV
    a1 = np.array([[-32.0, 0.0], [0.0, 16.0]], dtype=np.float32)
    a2 = np.array([[16.0, -32.0, 5.0]], dtype=np.float32)  # a kz column is ignored
    out = trajectory_from_acquisitions([a1, a2], 64)
    expected = torch.tensor([[0.0, math.pi / 2, -math.pi], [-math.pi, 0.0, math.pi / 2]])
    assert out.shape == (2, 3) and torch.allclose(out, expected, atol=1e-6)
    norm = trajectory_from_acquisitions([a1 / 64], 64, units="normalized")
    assert torch.allclose(norm, expected[:, :2], atol=1e-6)
    with pytest.raises(ValueError, match="trajs\\[0\\]"):
        trajectory_from_acquisitions([np.zeros((4, 1))], 64)
    with pytest.raises(ValueError, match="units"):
        trajectory_from_acquisitions([a1], 64, units="furlongs")


@pytest.mark.cuda
def test_outputs_follow_requested_device():
    dev = torch.device("cuda")
    assert uniform_mask(8, 8, 2, 2, device=dev).device.type == "cuda"
    traj = golden_angle_radial(4, 16, device=dev)
    assert traj.device.type == "cuda"
    assert pipe_menon_dcf(traj, (8, 8)).device.type == "cuda"
    assert spiral_trajectory(4, 16, device=dev).device.type == "cuda"


def test_acs_region_max_size_and_asymmetric_block():
    m = torch.zeros(20, 16)
    m[6:17] = 1                                        # rows 6..16 around the centre row 10
    assert acs_region(m) == ((6, 17), (0, 16))
    assert acs_region(m, max_size=(4, 8)) == ((8, 12), (4, 12))      # DC at index size // 2
    assert acs_region(m, max_size=9) == ((6, 15), (4, 13))           # clipped at the block's top edge
    assert acs_region(m, max_size=(40, 40)) == ((6, 17), (0, 16))
    with pytest.raises(ValueError, match="max_size"):
        acs_region(m, max_size=(4, 4, 4))


def test_default_dcf_is_ramp_for_radial_and_pipe_menon_otherwise():
    from recon_core.trajectories import default_dcf

    traj = golden_angle_radial(8, 32, n_frames=2)
    assert torch.equal(default_dcf(traj, (16, 16), kind="radial"), ramp_dcf(traj, (16, 16)))
    assert torch.equal(default_dcf(traj, (16, 16), kind="GoldenAngle"), ramp_dcf(traj, (16, 16)))
    spiral = spiral_trajectory(8, 64, n_frames=1, matrix_size=16)
    assert torch.equal(default_dcf(spiral, (16, 16), kind="spiral"), pipe_menon_dcf(spiral, (16, 16)))
    assert torch.equal(default_dcf(spiral, (16, 16)), pipe_menon_dcf(spiral, (16, 16)))
