"""DC-CNN-LR: the plug-and-play low-rank module inside DC-CNN (placement, exact reduction to DC-CNN),
training through ``torchgadgets train``, the shipped weights against the dc_cnn control on held-out
phantoms, and a run through its chain."""

from __future__ import annotations

import pytest
import torch

from recon_core.methods import get_method, make_problem
from recon_core.methods.dc_cnn import DCCNN
from recon_core.methods.dc_cnn_lr import DCCNNLR, DCCNNLRNet
from recon_core.nets.blocks import channels_to_complex, complex_to_channels
from recon_core.nets.svt import svt_casorati
from recon_core.phantoms import simulate_scan

from tests.recon_core.test_slr_net import (held_out_problems, mean_psnr, run_chain_vs_zero_filled,
                                           server_matches_offline)

TINY = dict(preset="fast", n_cascades=2, n_filters=4, n_layers=3)


def _problem(matrix=24, frames=4, coils=3, seed=0, **kw):
    opts = {"accel": 4, "acs_lines": 6, "mask_kind": "uniform", **kw}
    scan = simulate_scan("cartesian", matrix=matrix, n_frames=frames, n_coils=coils, readout_oversampling=1,
                         noise_std=0.01, seed=seed, **opts)
    return scan, make_problem(scan.kspace, scan.coil_maps, mask=scan.mask)


@torch.no_grad()
def test_lr_module_sits_between_cnn_and_dc() -> None:
    """Cascade = DC(SVT(x + CNN(x))) (location L2 of the paper's Fig. 2)."""
    _, p = _problem()
    m = DCCNNLR(**TINY)
    torch.manual_seed(0)
    net = m.build_network()
    x0, ctx, _ = m.prepare(p)
    z = x0 + channels_to_complex(net.cnns[0](complex_to_channels(x0, 3)), 3)
    ref = net.dcs[0](svt_casorati(z, torch.sigmoid(net.lrs[0].c)), ctx)
    assert torch.allclose(net.cascade_at(0, x0, ctx, 3), ref, atol=1e-5)


@torch.no_grad()
def test_without_thresholding_it_is_exactly_dc_cnn() -> None:
    """Same CNN and DC weights, SVT threshold → 0: the output equals DC-CNN's (the LR module is the
    only difference between the method and its control)."""
    _, p = _problem(seed=1)
    torch.manual_seed(1)
    plain = DCCNN(**TINY)
    net0 = plain.build_network()
    lr = DCCNNLR(**TINY)
    net1 = lr.build_network()
    missing = net1.load_state_dict(net0.state_dict(), strict=False)
    assert sorted(missing.missing_keys) == ["lrs.0.c", "lrs.1.c"] and not missing.unexpected_keys
    for mod in net1.lrs:
        mod.c.fill_(-1e4)
    x0, ctx, _ = plain.prepare(p)
    assert torch.allclose(net1(x0, ctx), net0(x0, ctx), atol=1e-5)
    assert lr.arch() == plain.arch()


def test_tiny_cli_training_reduces_the_validation_loss(tmp_path) -> None:
    """``torchgadgets train dc_cnn_lr`` on varied phantoms, a few steps: validation loss goes down,
    the weights name the method and the command."""
    from gadgets.cli import main
    from recon_core.training.loop import checkpoint_path
    from recon_core.training.weights import read_metadata

    out = tmp_path / "w.pt"
    rc = main(["train", "dc_cnn_lr", "--data", "phantom:varied", "--steps", "8", "--val-every", "4",
               "--out", str(out), "-q", "--n-train", "4", "--n-val", "2", "--matrix", "24",
               "--frames", "4", "4", "--coils", "3", "3", "--accel", "4", "4", "--masks", "uniform",
               "--lr", "3e-3",
               "--param", "n_filters=4", "--param", "n_cascades=2", "--param", "n_layers=3"])
    assert rc == 0
    hist = torch.load(checkpoint_path(out), weights_only=True)["history"]
    assert min(h["val_loss"] for h in hist[1:]) < hist[0]["val_loss"]
    meta = read_metadata(out)
    assert meta["method"] == "dc_cnn_lr"
    assert "Command: torchgadgets train dc_cnn_lr --data phantom:varied" in meta["trained_on"]
    assert "varied cardiac-phantom" in meta["trained_on"]


def test_registered_fast_preset_and_shipped_weights() -> None:
    from recon_core.training.weights import default_weights_name

    assert get_method("dc_cnn_lr") is DCCNNLR
    m = DCCNNLR(device="cpu")
    assert m.preset == "fast" and m.arch() == DCCNN(device="cpu").arch()
    assert default_weights_name("dc_cnn_lr", m.arch()) == "dc_cnn_lr_fast"
    assert isinstance(m.load_network(torch.device("cpu")), DCCNNLRNet)


#: The control: dc_cnn weights trained by the same command as dc_cnn_lr_fast (same data, steps, seed).
CONTROL = "dc_cnn_fast_cine"
#: Measured (README section): mean over the held-out cases of test_slr_net.HELD_OUT, DC-CNN (control)
#: 20.10 dB, DC-CNN-LR 20.67 dB (per case +0.33, +0.86, +0.54 dB); k-t SLR 19.98 dB.
LR_MARGIN_DB = 0.3


def test_shipped_weights_beat_the_dc_cnn_control_on_held_out_cine() -> None:
    """The paper's LR-module claim: DC-CNN-LR above DC-CNN (same architecture otherwise, same training
    data and steps) on held-out Cartesian cine at R = 8 (seeds, matrices 40–56² and anatomy not
    used in training), by ``LR_MARGIN_DB`` on the mean, and on every case."""
    probs = list(held_out_problems())
    per_lr = [mean_psnr(lambda: DCCNNLR(device="cpu"), [sp]) for sp in probs]
    per_dc = [mean_psnr(lambda: DCCNN(device="cpu", weights=CONTROL), [sp]) for sp in probs]
    mean_lr, mean_dc = sum(per_lr) / len(per_lr), sum(per_dc) / len(per_dc)
    assert mean_lr > mean_dc + LR_MARGIN_DB, (per_lr, per_dc)
    assert all(a > b for a, b in zip(per_lr, per_dc)), (per_lr, per_dc)


def test_control_is_trained_like_the_method() -> None:
    """The control's and the method's weights record the same training command, method name aside."""
    from recon_core.training.weights import read_registry, PACKAGE_WEIGHTS_DIR

    reg = read_registry(PACKAGE_WEIGHTS_DIR)
    a, b = reg["dc_cnn_lr_fast"].trained_on, reg[CONTROL].trained_on
    norm = [t.split("Command: ")[1].split(" --out ")[0].replace("dc_cnn_lr", "M").replace("dc_cnn", "M")
            for t in (a, b)]
    assert norm[0] == norm[1] and reg[CONTROL].arch == reg["dc_cnn_lr_fast"].arch


def test_runs_through_its_chain(tmp_path) -> None:
    q, q_zf, n = run_chain_vs_zero_filled("cartesian_cine_dc_cnn_lr", tmp_path)
    assert n == 6
    assert q > q_zf + 4.0, (q, q_zf)  # measured 23.70 vs 16.89 dB


def test_runs_through_the_server(tmp_path) -> None:
    n, diff = server_matches_offline("cartesian_cine_dc_cnn_lr", tmp_path)
    assert n == 4 and diff < 1e-4
