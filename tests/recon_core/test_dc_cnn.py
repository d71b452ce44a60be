"""DC-CNN: data-consistency layers (exact properties), shapes, and the shipped weights' quality."""

from __future__ import annotations

import pytest
import torch

from recon_core.fft import fft2c
from recon_core.methods import get_method, make_problem
from recon_core.methods.dc_cnn import DCCNN, DCCNNNet
from recon_core.metrics import psnr, scale_to_reference
from recon_core.nets.blocks import ConvStack, UNet, channels_to_complex, complex_to_channels
from recon_core.nets.unrolled import DCContext, GradientDC, HardDC, ProximalDC, estimate_lipschitz
from recon_core.phantoms import simulate_scan
from recon_core.trajectories import uniform_mask
from recon_core.training.weights import save_weights


def _rand(*shape, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.complex64)


def _single_coil_problem(F=3, N=16, accel=3, seed=0):
    mask = uniform_mask(N, N, accel, 4, n_frames=F)
    y = fft2c(_rand(F, N, N, seed=seed)) * mask
    maps = torch.ones(1, N, N, dtype=torch.complex64)
    p = make_problem(y.unsqueeze(1), maps, mask=mask)
    return p, DCContext(p.operator, p.kspace, estimate_lipschitz(p.operator.normal, (F, N, N), p.device),
                        mask=p.mask, coil_maps=maps)


def test_packing_round_trip() -> None:
    x = _rand(3, 8, 10)
    for dim in (2, 3):
        assert torch.equal(channels_to_complex(complex_to_channels(x, dim), dim), x)


@torch.no_grad()
def test_hard_dc_is_the_papers_replacement() -> None:
    p, ctx = _single_coil_problem()
    z = _rand(3, 16, 16, seed=1)
    k = fft2c(HardDC()(z, ctx))
    m = p.mask.bool()
    k_z = fft2c(z)
    assert torch.allclose(k[m], p.kspace[:, 0][m], atol=1e-5)          # sampled: measured data
    assert torch.allclose(k[~m], k_z[~m], atol=1e-5)                    # unsampled: the CNN's


@torch.no_grad()
def test_proximal_dc_on_single_coil_cartesian_is_the_papers_noisy_dc() -> None:
    """(EᴴE/L + μ) x = Eᴴy/L + μz is diagonal in k-space: k = (k_z + λ k0)/(1 + λ), λ = 1/(μL)."""
    p, ctx = _single_coil_problem()
    assert abs(ctx.lipschitz - 1.0) < 1e-4
    dc = ProximalDC(mu=0.25, cg_iter=4)
    z = _rand(3, 16, 16, seed=2)
    k = fft2c(dc(z, ctx))
    lam = 1.0 / (float(dc.mu.detach()) * ctx.lipschitz)
    hard = HardDC(noise_lambda=lam)
    k_ref = fft2c(hard(z, ctx))
    assert torch.allclose(k, k_ref, atol=1e-4)


@torch.no_grad()
def test_gradient_dc_matches_its_formula_and_prox_dc_fits_data_for_small_mu() -> None:
    scan = simulate_scan("radial", matrix=24, n_frames=2, n_coils=3, spokes_per_frame=12, noise_std=0.0, seed=1)
    p = make_problem(scan.kspace, scan.coil_maps, trajectory=scan.trajectory)
    L = estimate_lipschitz(p.operator.normal, (2, 24, 24), p.device)
    ctx = DCContext(p.operator, p.kspace, L)
    z = torch.zeros(2, 24, 24, dtype=torch.complex64)
    g = GradientDC(alpha=0.7)
    alpha = float(torch.nn.functional.softplus(g.theta.detach()))
    ref = z - (alpha / L) * p.operator.adjoint(p.operator(z) - p.kspace)
    assert torch.allclose(g(z, ctx), ref, atol=1e-6)
    x = ProximalDC(mu=1e-4, cg_iter=30)(z, ctx)
    res0 = torch.linalg.vector_norm(p.kspace)
    assert float(torch.linalg.vector_norm(p.operator(x) - p.kspace) / res0) < 0.2


def test_blocks_shapes() -> None:
    assert ConvStack(2, 2, hidden=4, n_layers=3, dim=3)(torch.zeros(1, 2, 3, 9, 11)).shape == (1, 2, 3, 9, 11)
    assert UNet(2, 2, base=4, depth=2)(torch.zeros(2, 2, 13, 10)).shape == (2, 2, 13, 10)
    assert UNet(2, 1, base=4, depth=2, dim=3)(torch.zeros(1, 2, 3, 12, 12)).shape == (1, 1, 3, 12, 12)


@pytest.mark.parametrize("kind", ["cartesian", "radial"])
def test_dc_cnn_runs_with_given_weights_file(kind, tmp_path, device) -> None:
    """Random-init weights from a path: complex64 [F, N, N] on the problem's device, finite, and
    with data sharing on Cartesian data too."""
    scan = simulate_scan(kind, matrix=24, n_frames=3, n_coils=3, accel=3, acs_lines=6, mask_kind="uniform",
                         spokes_per_frame=10, readout_oversampling=1, seed=0)
    kw = dict(preset="fast", n_cascades=2, n_filters=4, n_layers=3, data_sharing=kind == "cartesian",
              share_frames=2)
    m = DCCNN(**kw)
    path = tmp_path / "w.pt"
    save_weights(path, m.build_network().state_dict(), "dc_cnn", m.arch(), "test")
    p = make_problem(scan.kspace.to(device), scan.coil_maps.to(device),
                     mask=None if scan.mask is None else scan.mask.to(device),
                     trajectory=None if scan.trajectory is None else scan.trajectory.to(device))
    events = []
    x = DCCNN(weights=str(path), **kw).run(p, events.append)
    assert x.dtype == torch.complex64 and x.device == p.device and tuple(x.shape) == (3, 24, 24)
    assert torch.isfinite(torch.view_as_real(x)).all() and events[-1].step == events[-1].total == 2


def test_data_sharing_refuses_noncartesian() -> None:
    scan = simulate_scan("radial", matrix=16, n_frames=2, n_coils=2, spokes_per_frame=8, seed=0)
    p = make_problem(scan.kspace, scan.coil_maps, trajectory=scan.trajectory)
    m = DCCNN(preset="paper", n_cascades=1, n_filters=4, n_layers=2)
    x0, ctx, _ = m.prepare(p)
    with pytest.raises(ValueError, match="data_sharing needs Cartesian"):
        DCCNNNet(m.arch())(x0, ctx)


def test_registered_and_fast_preset_on_cpu() -> None:
    assert get_method("dc_cnn") is DCCNN
    m = DCCNN(device="cpu")
    assert m.preset == "fast" and m.params.n_filters == 16 and not m.params.data_sharing


@pytest.mark.parametrize("kind,kw", [
    ("cartesian", dict(accel=4, acs_lines=8, mask_kind="uniform")),
    ("cartesian", dict(accel=5, acs_lines=6, mask_kind="variable_density")),
    ("radial", dict(spokes_per_frame=16)),
    ("spiral", dict(interleaves=16, interleaves_per_frame=4)),
])
def test_shipped_weights_beat_zero_filled_on_unseen_phantoms(kind, kw) -> None:
    """Shipped (phantom-trained) weights on a scan simulated analytically (not with the training
    operator), with a seed, size and coil count not used in training: clearly above zero-filled."""
    scan = simulate_scan(kind, matrix=40, n_frames=4, n_coils=6, readout_oversampling=1, noise_std=0.01,
                         seed=4242, **kw)
    from recon_core.trajectories import pipe_menon_dcf

    dcf = None if scan.trajectory is None else pipe_menon_dcf(scan.trajectory, (40, 40))
    p = make_problem(scan.kspace, scan.coil_maps, mask=scan.mask, trajectory=scan.trajectory, dcf=dcf)
    zf = get_method("zero_filled")().run(p)
    x = DCCNN(device="cpu").run(p)
    gt, body = scan.ground_truth, scan.body_mask
    # one least-squares scale each (zero-filled non-Cartesian images are not in object units)
    assert psnr(scale_to_reference(x, gt, body), gt) > psnr(scale_to_reference(zf, gt, body), gt) + 3.0


def test_shipped_registry_is_consistent() -> None:
    """Every shipped entry's file exists, has the registered hash and the registered metadata."""
    from recon_core.training.weights import (PACKAGE_WEIGHTS_DIR, default_weights_name, read_metadata,
                                             read_registry, sha256_file)

    entries = read_registry(PACKAGE_WEIGHTS_DIR)
    assert "dc_cnn_fast" in entries
    for name, e in entries.items():
        f = PACKAGE_WEIGHTS_DIR / e.file
        assert f.is_file() and sha256_file(f) == e.sha256, name
        assert f.stat().st_size < 6 * 2 ** 20
        meta = read_metadata(f)
        assert meta["method"] == e.method and meta["arch"] == e.arch
        assert "Command: torchgadgets train" in e.trained_on
    assert default_weights_name("dc_cnn", DCCNN(preset="fast").arch()) == "dc_cnn_fast"


@torch.no_grad()
def test_data_sharing_fills_kspace_from_neighbouring_frames() -> None:
    """Static object, ky-t interleaved R=3 mask: sharing over distance 1 (3 frames, cyclic) fills all
    of k-space with measured data, so that input image is the object itself, whatever the estimate."""
    F, N = 3, 12
    truth = _rand(1, N, N, seed=5).expand(F, -1, -1).contiguous()
    mask = uniform_mask(N, N, 3, 0, n_frames=F, shift_per_frame=True)
    maps = torch.ones(1, N, N, dtype=torch.complex64)
    y = (fft2c(truth) * mask).unsqueeze(1)
    ctx = DCContext(make_problem(y, maps, mask=mask).operator, y, 1.0, mask=mask, coil_maps=maps)
    m = DCCNN(preset="paper", n_cascades=1, n_filters=4, n_layers=2, share_frames=2)
    d0, d1 = DCCNNNet(m.arch())._shared_inputs(torch.zeros(F, N, N, dtype=torch.complex64), ctx)
    assert torch.allclose(d1, truth, atol=1e-5)
    assert torch.allclose(fft2c(d0), fft2c(truth) * mask, atol=1e-5)   # distance 0: own samples only
