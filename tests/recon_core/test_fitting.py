"""The shared fitting loop (recon_core/nets/fitting.py): schedule, budget, best snapshot, checkpoint/resume."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from recon_core.methods import make_method, make_problem
from recon_core.methods.base import MethodParams, ReconMethod, StopRequested
from recon_core.nets.fitting import FitSchedule, NetworkFit, init_seeded
from recon_core.phantoms import simulate_scan


class _Fit(ReconMethod[MethodParams]):
    """A minimal scan-specific 'method': fit a linear map to a target (for exercising the loop)."""

    name = "fit_probe"
    uses_autograd = True

    def reconstruct(self, problem, progress=None):  # pragma: no cover - not used
        raise NotImplementedError


def _setup(seed: int = 0):
    net = init_seeded(seed, lambda: nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 4)))
    target = torch.linspace(-1, 1, 4)
    return net, target


def _loss_fn(net, target, fit):
    def step(_i: int) -> torch.Tensor:
        z = torch.randn(8, 4, generator=fit.generator)
        return (net(z) - target).square().mean()
    return step


def test_init_seeded_is_reproducible_and_leaves_global_rng():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, _ = _setup(5)
    assert torch.equal(torch.random.get_rng_state(), before)
    b, _ = _setup(5)
    c, _ = _setup(6)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))


def test_loss_decreases_lr_schedule_and_progress():
    net, target = _setup()
    events = []
    fit = NetworkFit(_Fit(), net, FitSchedule(60, lr=1e-2, lr_step=20, lr_gamma=0.5), progress=events.append)
    res = fit.run(_loss_fn(net, target, fit))
    assert res.steps == 60 and [e.step for e in events] == list(range(1, 61))
    assert events[0].metrics["lr"] == pytest.approx(1e-2) and events[-1].metrics["lr"] == pytest.approx(2.5e-3)
    assert res.last_loss < 0.5 * events[0].metrics["loss"]


def test_checkpoint_resume_equals_uninterrupted(tmp_path):
    """A fit stopped after 15 of 30 steps and resumed from its checkpoint ends where an
    uninterrupted fit ends (network, optimiser, scheduler and random draws restored)."""
    net, target = _setup()
    fit = NetworkFit(_Fit(), net, FitSchedule(30, lr=1e-2, lr_step=10, lr_gamma=0.5))
    fit.run(_loss_fn(net, target, fit))
    ref = [p.detach().clone() for p in net.parameters()]

    ckpt = tmp_path / "fit.pt"
    net1, _ = _setup()
    stopping = _Fit()
    count = [0]
    stopping.should_stop = lambda: count[0] >= 15
    fit1 = NetworkFit(stopping, net1, FitSchedule(30, lr=1e-2, lr_step=10, lr_gamma=0.5), checkpoint=ckpt,
                      checkpoint_every=5, progress=lambda e: count.__setitem__(0, e.step))
    with pytest.raises(StopRequested):
        fit1.run(_loss_fn(net1, target, fit1))
    assert ckpt.is_file()
    net2, _ = _setup()
    fit2 = NetworkFit(_Fit(), net2, FitSchedule(30, lr=1e-2, lr_step=10, lr_gamma=0.5), checkpoint=ckpt,
                      checkpoint_every=5)
    res = fit2.run(_loss_fn(net2, target, fit2))
    assert res.resumed_from == 15 and res.steps == 30
    for p, q in zip(net2.parameters(), ref):
        assert torch.allclose(p, q, atol=1e-6), float((p - q).abs().max())


def test_checkpoint_of_another_network_is_refused(tmp_path):
    ckpt = tmp_path / "fit.pt"
    net, target = _setup()
    fit = NetworkFit(_Fit(), net, FitSchedule(3), checkpoint=ckpt)
    fit.run(_loss_fn(net, target, fit))
    other = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="parameters"):
        NetworkFit(_Fit(), other, FitSchedule(3), checkpoint=ckpt).run(lambda i: other(torch.ones(4)).sum())


def test_keep_best_restores_lowest_loss_parameters():
    net, target = _setup()
    losses = iter([3.0, 1.0, 2.0, 4.0])
    snapshots = []

    def step(_i):
        snapshots.append([p.detach().clone() for p in net.parameters()])
        out = net(torch.ones(4)).sum()
        return out - out.detach() + next(losses)   # value = the scripted loss, non-zero gradient

    res = NetworkFit(_Fit(), net, FitSchedule(4, lr=1e-1), keep_best=True).run(step)
    assert res.best_step == 2 and res.best_loss == 1.0
    # restored: the parameters that produced the best loss (those at the start of step 2), not
    # the ones after that step's update
    assert not all(torch.equal(p, q) for p, q in zip(snapshots[1], snapshots[2]))
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), snapshots[1]))


def test_non_finite_loss_is_an_error():
    net, _ = _setup()
    with pytest.raises(FloatingPointError, match="step 1"):
        NetworkFit(_Fit(), net, FitSchedule(3)).run(lambda i: net(torch.ones(4)).sum() * float("nan"))


def test_tdip_time_budget_and_checkpoint_resume(tmp_path):
    """TD-DIP on the fitting loop: a spent budget stops it after one step with the reason recorded;
    a fit checkpointed half-way and resumed gives the uninterrupted fit's images."""
    sc = simulate_scan("radial", matrix=24, n_frames=3, n_coils=3, spokes_per_frame=12, seed=1)
    prob = make_problem(sc.kspace, sc.coil_maps, trajectory=sc.trajectory, seed=0)
    events = []
    m = make_method("tdip", n_steps=20, channels=4, max_time_s=1e-9)
    x = m.run(prob, events.append)
    assert "time budget" in m.stopped_early and "step 1/20" in m.stopped_early and len(events) == 1
    assert torch.isfinite(torch.view_as_real(x)).all()

    full = make_method("tdip", n_steps=12, channels=4).run(prob)
    ckpt = tmp_path / "tdip.pt"
    half = make_method("tdip", n_steps=12, channels=4, checkpoint=str(ckpt), checkpoint_every=6)
    half.should_stop = lambda: ckpt.is_file()
    with pytest.raises(StopRequested):
        half.run(prob)
    resumed = make_method("tdip", n_steps=12, channels=4, checkpoint=str(ckpt), checkpoint_every=6).run(prob)
    assert torch.allclose(resumed, full, rtol=1e-4, atol=1e-5 * float(full.abs().max()))
