"""Tests for the multiresolution hash encoding (recon_core/nets/hash_encoding.py) and the
spatiotemporal INR method (recon_core/methods/inr.py).

Scans come from the project's analytic cardiac phantom (``recon_core.phantoms.simulate_scan``:
k-space computed analytically, never with the reconstruction operator).
"""

from __future__ import annotations

import math
import time

import pytest
import torch

from recon_core.methods import StopRequested, get_method, make_method, make_problem
from recon_core.methods.inr import (INR, INRNet, INRParams, QuadraticDataTerm, _time_to_index,
                                    frame_coordinates, upsampled_times)
from recon_core.metrics import psnr, scale_to_reference
from recon_core.nets.hash_encoding import HashEncoding, level_resolutions
from recon_core.nufft import available_backends

BACKEND = "finufft" if "finufft" in available_backends() else "torchkbnufft"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small products run fastest single-threaded on a shared CPU; restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _scan(kind: str = "radial", n: int = 32, frames: int = 6, coils: int = 4, seed: int = 0, **kw):
    from recon_core.phantoms import simulate_scan

    if kind == "radial":
        kw.setdefault("spokes_per_frame", 8)
    if kind == "cartesian":
        kw.setdefault("accel", 8)
        kw.setdefault("acs_lines", 6)
        kw.setdefault("readout_oversampling", 1)
    sc = simulate_scan(kind, matrix=n, n_frames=frames, n_coils=coils, noise_std=0.01, seed=seed, **kw)
    if kind == "cartesian":
        prob = make_problem(sc.kspace, sc.coil_maps, mask=sc.mask, seed=seed)
    else:
        prob = make_problem(sc.kspace, sc.coil_maps, trajectory=sc.trajectory, nufft_backend=BACKEND, seed=seed)
    return prob, sc


def _psnr(x: torch.Tensor, sc) -> float:
    gt = sc.ground_truth.abs()
    return float(psnr(scale_to_reference(x.abs(), gt, sc.body_mask), gt))


# ----------------------------------------------------------------------------------------------
# hash encoding


def test_level_resolutions_are_a_geometric_series():
    levels = level_resolutions(6, 16, 1.5)
    for l, (scale, res) in enumerate(levels):
        assert scale == pytest.approx(16 * 1.5 ** l - 1)
        assert res == math.ceil(scale) + 1


def test_interpolation_is_exact_at_grid_vertices():
    """At a vertex of a (dense) level the feature is that vertex's table entry."""
    enc = HashEncoding(3, n_levels=2, n_features=2, log2_table_size=16, base_resolution=5, per_level_scale=2.0)
    assert enc.hashed == [False, False]
    for level, (scale, res) in enumerate(enc.levels):
        g = torch.tensor([[1, 2, 3], [1, 4, 1], [2, 2, 2], [3, 1, 4]], dtype=torch.float64)
        coords = ((g - 0.5) / scale).to(torch.float32)
        g = torch.round(coords.double() * scale + 0.5).long()        # the vertex (float32 rounding aside)
        with torch.no_grad():
            feats = enc(coords)[:, 2 * level:2 * level + 2]
        flat = g[:, 0] + res * g[:, 1] + res * res * g[:, 2]
        torch.testing.assert_close(feats, enc.tables[level][flat].detach(), rtol=1e-4, atol=1e-9)


def test_interpolation_is_continuous_and_linear_along_an_edge():
    torch.manual_seed(0)
    enc = HashEncoding(3, n_levels=4, n_features=2, log2_table_size=10, base_resolution=4, per_level_scale=2.0,
                       init_range=1.0)
    assert any(enc.hashed) and not all(enc.hashed)
    torch.set_grad_enabled(False)
    x = torch.rand(200, 3) * 0.9 + 0.05
    # continuity: a tiny displacement changes the features by a tiny amount (bounded slope)
    dx = torch.randn(200, 3) * 1e-5
    jump = (enc(x + dx) - enc(x)).abs().max()
    assert float(jump) < 1e-5 * 4 * 2 ** 3 * 2 * 3 * 10, float(jump)
    # within one cell, the interpolation along an axis is linear: f(mid) = (f(a) + f(b)) / 2
    scale, _ = enc.levels[2]
    base = torch.floor(x.double() * scale + 0.5)
    a = ((base + 0.1 - 0.5) / scale).float()
    b = ((base + 0.9 - 0.5) / scale).float()
    a[:, 1:] = b[:, 1:] = x[:, 1:]
    mid = (a + b) / 2
    f = lambda c: enc(c)[:, 4:6]   # level 2
    torch.testing.assert_close(f(mid), (f(a) + f(b)) / 2, rtol=1e-4, atol=1e-5)
    torch.set_grad_enabled(True)


def test_interpolation_weights_are_a_partition_of_unity_and_hashes_fit_the_table():
    enc = HashEncoding(3, n_levels=6, n_features=2, log2_table_size=12, base_resolution=16, per_level_scale=2.0)
    coords = torch.rand(500, 3)
    coords[:10] = torch.tensor([0.0, 1.0, 0.5])   # boundary points
    for level in range(enc.n_levels):
        idx, w = enc.corners(coords, level)
        torch.testing.assert_close(w.sum(1), torch.ones(500))
        assert int(idx.min()) >= 0 and int(idx.max()) < enc.table_sizes[level]
        if enc.hashed[level]:
            assert enc.table_sizes[level] == 2 ** 12
            assert enc.levels[level][1] ** 3 > 2 ** 12


def test_level_masking_zeroes_fine_levels_and_their_gradients():
    enc = HashEncoding(3, n_levels=5, n_features=2, log2_table_size=10, base_resolution=4, per_level_scale=1.7)
    coords = torch.rand(300, 3)
    f = enc(coords, n_active=2)
    assert f.shape == (300, 10)
    fd = f.detach()
    assert float(fd[:, 4:].abs().max()) == 0.0 and float(fd[:, :4].abs().max()) > 0
    torch.testing.assert_close(fd[:, :4], enc(coords).detach()[:, :4])
    f.square().sum().backward()
    for level in range(5):
        g = enc.tables[level].grad
        assert (g is None or float(g.abs().max()) == 0.0) == (level >= 2), level


def test_plan_equals_direct_interpolation_and_compaction_changes_nothing():
    torch.manual_seed(1)
    enc = HashEncoding(3, n_levels=6, n_features=2, log2_table_size=11, base_resolution=4, per_level_scale=1.8)
    coords = torch.rand(400, 3)
    other = torch.rand(50, 3)
    direct, direct_other = enc(coords), enc(other).detach()
    direct.sum().backward()
    grads = [t.grad.clone() for t in enc.tables]
    plan = enc.plan(coords)   # compacts: the trainable rows are those the coordinates touch
    planned = enc(plan=plan)
    torch.testing.assert_close(planned, direct.detach(), rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(enc(other), direct_other)          # frozen rows kept for elsewhere
    planned.sum().backward()
    for level, g_full in enumerate(grads):
        rows = getattr(enc, f"rows_{level}")
        torch.testing.assert_close(enc.tables[level].grad, g_full[rows], rtol=1e-5, atol=1e-7)
        mask = torch.ones(g_full.shape[0], dtype=torch.bool)
        mask[rows] = False
        assert float(g_full[mask].abs().sum()) == 0.0   # untouched rows get no gradient
    with pytest.raises(RuntimeError):
        enc.plan(coords)


# ----------------------------------------------------------------------------------------------
# method structure


def test_registered_and_paper_defaults():
    assert get_method("inr") is INR and INR.uses_autograd and INR.supports_output_times
    p = INRParams()
    assert (p.n_steps, p.lr, p.lr_step, p.hidden, p.n_hidden) == (500, 1e-3, 0, 64, 5)   # paper §2.5
    assert (p.n_levels, p.n_features, p.log2_table_size, p.base_resolution, p.per_level_scale) == (16, 2, 24, 16, 2.0)
    assert (p.lambda_tv, p.lambda_lr, p.eps, p.dc_loss, p.coarse_to_fine) == (0.02, 2e-4, 1e-4, "relative", True)
    with pytest.raises(KeyError):
        make_method("inr", not_a_param=1)


def test_mlp_is_bias_free_relu_to_re_im():
    net = INRNet(INRParams(n_levels=4, log2_table_size=10))
    lin = [m for m in net.mlp if isinstance(m, torch.nn.Linear)]
    assert len(lin) == 6 and all(m.bias is None for m in lin)
    assert lin[0].in_features == 8 and lin[-1].out_features == 2
    assert sum(isinstance(m, torch.nn.ReLU) for m in net.mlp) == 5
    assert not isinstance(net.mlp[-1], torch.nn.ReLU)     # linear output
    out = net(torch.rand(7, 3))
    assert out.shape == (7,) and out.dtype == torch.complex64


def test_coordinates_isotropic_and_time_mapping():
    c = frame_coordinates(torch.arange(4.0), (6, 8), 4)
    assert c.shape == (4 * 48, 3)
    torch.testing.assert_close(c[:48, 0], torch.full((48,), 0.5 / 8))      # t: (i + ½)/S, S = max(6, 8, 4)
    torch.testing.assert_close(c[:8, 2], (torch.arange(8.0) + 0.5) / 8)   # x
    torch.testing.assert_close(c[::8, 1][:6], (torch.arange(6.0) + 0.5) / 8)   # y, same spacing
    ft = torch.tensor([0.2, 0.25, 0.35, 0.4], dtype=torch.float64)   # non-uniform frame times
    u = _time_to_index(torch.cat([ft, torch.tensor([0.3, 0.45, 0.1])]), ft, 4)
    torch.testing.assert_close(u, torch.tensor([0.0, 1.0, 2.0, 3.0, 1.5, 4.0, -2.0], dtype=torch.float64))
    torch.testing.assert_close(_time_to_index(torch.tensor([1.5]), None, 4), torch.tensor([1.5], dtype=torch.float64))


def test_upsampled_times():
    ft = 0.1 + 0.04 * torch.arange(5, dtype=torch.float64)
    t = upsampled_times(ft, 5, 4)
    assert t.numel() == 4 * 5 - 3
    torch.testing.assert_close(t[::4], ft)
    assert upsampled_times(ft, 5, 4, tail=True).numel() == 20
    torch.testing.assert_close(upsampled_times(None, 3, 2), torch.tensor([0, 0.5, 1, 1.5, 2], dtype=torch.float64))


@pytest.mark.parametrize("kind,dc", [("radial", "l2"), ("radial", "dcf_l2"), ("cartesian", "l2")])
def test_quadratic_data_term_is_the_least_squares_loss(kind, dc):
    """Value and gradient of the Toeplitz-normal data term = ‖W^{1/2}(Ex − y)‖² by autograd through E."""
    prob, _ = _scan(kind, n=16, frames=3, coils=3, **({"accel": 3, "acs_lines": 2} if kind == "cartesian" else {}))
    w = None if dc == "l2" else prob.dcf
    term = QuadraticDataTerm(prob, prob.kspace, w)
    g = torch.Generator().manual_seed(0)
    x = torch.complex(torch.randn(3, 16, 16, generator=g), torch.randn(3, 16, 16, generator=g)).requires_grad_(True)
    val = term(x)
    (grad,) = torch.autograd.grad(val, x)
    x2 = x.detach().requires_grad_(True)
    r = prob.operator(x2) - prob.kspace
    if w is not None:
        r = r * w.sqrt().unsqueeze(1)
    ref = r.abs().square().sum()
    (grad_ref,) = torch.autograd.grad(ref, x2)
    torch.testing.assert_close(val, ref.detach(), rtol=2e-3, atol=1e-3)
    torch.testing.assert_close(grad, grad_ref, rtol=2e-3, atol=2e-3 * float(grad_ref.abs().max()))


def test_bad_params():
    prob, _ = _scan(n=16, frames=2, coils=2)
    with pytest.raises(ValueError):
        INR(n_steps=-1).reconstruct(prob)
    with pytest.raises(TypeError):
        INR(hidden=2.5).reconstruct(prob)
    with pytest.raises(ValueError, match="dc_loss"):
        INR(dc_loss="l1").reconstruct(prob)


# ----------------------------------------------------------------------------------------------
# fitting

#: a seconds-long fit on the tiny problems below
SMALL = dict(n_steps=40, n_levels=6, log2_table_size=14, per_level_scale=1.5, hidden=16, n_hidden=2, lr=1e-2)


def test_progress_stages_determinism_and_global_rng():
    prob, _ = _scan(n=16, frames=4, coils=2)
    events: list = []
    state = torch.get_rng_state()
    a = INR(**SMALL).run(prob, events.append)
    assert torch.equal(torch.get_rng_state(), state)
    stages = [e.stage for e in events]
    assert stages[0] == "setup" and stages[-1] == "evaluate" and stages.count("fit") == SMALL["n_steps"]
    assert all(e.method == "inr" and e.step <= e.total for e in events) and events[-1].step == events[-1].total
    fit = [e.metrics["loss"] for e in events if e.stage == "fit"]
    assert fit[-1] < 0.5 * fit[0]
    b = INR(**SMALL).run(prob)
    assert torch.equal(a, b)
    prob.seed = 3
    assert not torch.equal(a, INR(**SMALL).run(prob))


def test_stop_request_and_time_budget():
    prob, _ = _scan(n=16, frames=3, coils=2)
    m = INR(**dict(SMALL, n_steps=10_000))
    events: list = []
    m.should_stop = lambda: len(events) >= 4
    with pytest.raises(StopRequested):
        m.run(prob, events.append)
    assert len(events) == 4
    m = INR(**dict(SMALL, n_steps=10_000, max_time_s=1.0))
    t0 = time.perf_counter()
    x = m.run(prob)
    assert time.perf_counter() - t0 < 30
    assert "time budget" in m.stopped_early
    assert torch.isfinite(torch.view_as_real(x)).all() and float(x.abs().max()) > 0


@pytest.mark.parametrize("tail", [False, True])
def test_temporal_super_resolution_every_kth_frame_is_the_plain_reconstruction(tail):
    prob, _ = _scan(n=16, frames=4, coils=2)
    prob.frame_times_s = 0.3 + 0.045 * torch.arange(4, dtype=torch.float64)
    plain = INR(**SMALL).run(prob)
    K = 3
    prob.output_times_s = upsampled_times(prob.frame_times_s, 4, K, tail=tail)
    up = INR(**SMALL).run(prob)
    assert up.shape == ((K * 4 if tail else K * 4 - (K - 1)), 16, 16) and up.dtype == torch.complex64
    torch.testing.assert_close(up[::K][:4], plain, rtol=1e-5, atol=1e-6 * float(plain.abs().max()))
    # interpolated frames lie between their neighbours (a continuous representation), not copies
    mid = up[1]
    assert not torch.allclose(mid, up[0]) and not torch.allclose(mid, up[K])
    d_mid = float((mid - up[0]).abs().mean())
    assert d_mid < float((up[K] - up[0]).abs().mean()) * 1.5


def test_plain_methods_refuse_output_times():
    prob, _ = _scan(n=16, frames=3, coils=2)
    prob.output_times_s = torch.tensor([0.0, 0.5, 1.0])
    with pytest.raises(ValueError, match="inr"):
        make_method("cg_sense").run(prob)


@pytest.mark.parametrize("kind", ["radial", "cartesian"])
def test_beats_cg_sense(kind):
    """48² cine, 6 frames, 6 coils (radial 8 spokes/frame; Cartesian VD R=6), the fast preset with 100
    steps: the INR beats CG-SENSE by a margin (below what was measured, see ``MARGIN``)."""
    prob, sc = _scan(kind, n=48, frames=6, coils=6, **({"accel": 6, "acs_lines": 6} if kind == "cartesian" else {}))
    p_cg = _psnr(make_method("cg_sense").run(prob), sc)
    x = INR(preset="fast", n_steps=100).run(prob)
    p_inr = _psnr(x, sc)
    assert p_inr > p_cg + MARGIN[kind], (p_cg, p_inr)


#: measured (problem seeds 0 / 1, 100 steps): radial CG-SENSE 22.1 / 22.1 dB, INR 33.2 / 32.0 dB;
#: Cartesian CG-SENSE 19.0 / 19.1 dB, INR 23.4 / 22.3 dB (zero-filled 18.5 and 17.1 dB)
MARGIN = {"radial": 6.0, "cartesian": 2.0}
