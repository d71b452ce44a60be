"""Training: the weights file format, registry and verified loader; datasets; the training loop."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from recon_core.methods.dc_cnn import DCCNN
from recon_core.training.data import IsmrmrdDataset, PhantomDataset, SamplingSpec, split_datasets
from recon_core.training.loop import TrainConfig, checkpoint_path, train
from recon_core.training.weights import (
    ENV_VAR,
    WeightsMismatchError,
    default_weights_name,
    load_weights,
    read_metadata,
    read_registry,
    register_weights,
    resolve_weights,
    save_weights,
    sha256_file,
)

TINY = dict(preset="fast", n_cascades=2, n_filters=4, n_layers=3)


def _tiny_method(**kw) -> DCCNN:
    return DCCNN(**{**TINY, **kw})


@pytest.fixture()
def registry(tmp_path, monkeypatch) -> Path:
    reg = tmp_path / "registry"
    monkeypatch.setenv(ENV_VAR, str(reg))
    return reg


def _saved(tmp_path: Path, **arch_kw) -> tuple[Path, DCCNN, dict]:
    m = _tiny_method(**arch_kw)
    torch.manual_seed(0)
    net = m.build_network()
    path = tmp_path / "w.pt"
    save_weights(path, net.state_dict(), m.name, m.arch(), "unit test: random initialisation")
    return path, m, net.state_dict()


# ------------------------------------------------------------------------------------------- weights
def test_save_register_load_round_trip(tmp_path, registry) -> None:
    path, m, sd = _saved(tmp_path)
    meta = read_metadata(path)
    assert meta["method"] == "dc_cnn" and meta["arch"] == m.arch() and meta["package_version"]
    entry = register_weights("tiny_dc", path)          # first folder of $TORCHGADGETS_WEIGHTS
    assert (registry / "tiny_dc.pt").is_file() and entry.sha256 == sha256_file(path)
    on_disk = json.loads((registry / "registry.json").read_text())["weights"]["tiny_dc"]
    assert on_disk["arch"] == m.arch() and on_disk["trained_on"].startswith("unit test")
    assert resolve_weights("tiny_dc").entry is not None
    assert default_weights_name("dc_cnn", m.arch()) == "tiny_dc"
    loaded = load_weights("tiny_dc", "cpu", method="dc_cnn", arch=m.arch())
    assert loaded.keys() == sd.keys() and all(torch.equal(loaded[k], sd[k]) for k in sd)
    # a plain path is allowed too (offline chains): metadata still checked
    assert load_weights(path, torch.device("cpu"), method="dc_cnn", arch=m.arch()).keys() == sd.keys()


def test_weights_are_read_once_per_process_until_the_file_changes(tmp_path, registry, monkeypatch) -> None:
    """A long-lived worker (session process, Ray worker) reads and hashes a weights file once; a
    rewritten file is read again (the cache is keyed by path, mtime and size)."""
    import recon_core.training.weights as W

    path, m, sd = _saved(tmp_path)
    register_weights("tiny_once", path)
    reads, hashes = [], []
    real_load, real_sha = torch.load, W.sha256_file
    monkeypatch.setattr(W.torch, "load", lambda *a, **k: reads.append(1) or real_load(*a, **k))
    monkeypatch.setattr(W, "sha256_file", lambda p: hashes.append(1) or real_sha(p))
    for _ in range(3):
        out = load_weights("tiny_once", "cpu", method="dc_cnn", arch=m.arch())
        assert all(torch.equal(out[k], sd[k]) for k in sd)
    assert len(reads) == 1 and len(hashes) == 1
    out.clear()                                   # a caller's dict is its own
    assert load_weights("tiny_once", "cpu", method="dc_cnn", arch=m.arch()).keys() == sd.keys()


def test_tampered_file_is_refused_naming_both_hashes(tmp_path, registry) -> None:
    path, m, _ = _saved(tmp_path)
    entry = register_weights("tiny_dc", path)
    target = registry / entry.file
    data = bytearray(target.read_bytes())
    data[-10] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(WeightsMismatchError) as exc:
        load_weights("tiny_dc", "cpu", method="dc_cnn", arch=m.arch())
    msg = str(exc.value)
    assert entry.sha256 in msg and sha256_file(target) in msg and "tiny_dc" in msg


def test_architecture_and_method_mismatch_are_refused_naming_both_sides(tmp_path, registry) -> None:
    path, m, _ = _saved(tmp_path)
    register_weights("tiny_dc", path)
    asked = dict(m.arch(), n_filters=8)
    with pytest.raises(WeightsMismatchError) as exc:
        load_weights("tiny_dc", "cpu", method="dc_cnn", arch=asked)
    msg = str(exc.value)
    assert "trained for dc_cnn with n_filters=4" in msg and "asks n_filters=8" in msg
    with pytest.raises(WeightsMismatchError, match="trained for dc_cnn, this chain asks slr_net"):
        load_weights("tiny_dc", "cpu", method="slr_net", arch=m.arch())
    with pytest.raises(KeyError, match="tiny_dc"):
        load_weights("no_such_weights", "cpu")


def test_registry_entry_must_agree_with_the_file(tmp_path, registry) -> None:
    path, m, _ = _saved(tmp_path)
    register_weights("tiny_dc", path)
    reg = json.loads((registry / "registry.json").read_text())
    reg["weights"]["tiny_dc"]["arch"]["n_filters"] = 99
    (registry / "registry.json").write_text(json.dumps(reg))
    assert read_registry(registry)["tiny_dc"].arch["n_filters"] == 99
    with pytest.raises(WeightsMismatchError, match="registry says .*n_filters=99.*the file says .*n_filters=4"):
        load_weights("tiny_dc", "cpu", method="dc_cnn")


# ------------------------------------------------------------------------------------------- datasets
def test_phantom_dataset_is_deterministic_and_consistent() -> None:
    spec = SamplingSpec(kinds=("cartesian",), masks=("uniform",), accel=(3, 3))
    a = PhantomDataset(3, seed=5, matrix=(24,), frames=(2, 3), coils=(3, 4), noise=(0.0, 0.0), sampling=spec)
    b = PhantomDataset(3, seed=5, matrix=(24,), frames=(2, 3), coils=(3, 4), noise=(0.0, 0.0), sampling=spec)
    for i in range(3):
        assert torch.equal(a[i].problem.kspace, b[i].problem.kspace)
        p = a[i].problem
        # noise-free data are exactly the encoding of the ground truth
        err = (p.operator(a[i].ground_truth) - p.kspace).abs().max()
        assert float(err) < 1e-5 * float(p.kspace.abs().max())
    assert not torch.equal(a[0].ground_truth, a[1].ground_truth)


def test_noncartesian_samples_have_trajectory_and_dcf() -> None:
    for kind in ("radial", "spiral"):
        ds = PhantomDataset(1, seed=1, matrix=(24,), frames=(2, 2), coils=(3, 3), sampling=SamplingSpec(kinds=(kind,)))
        p = ds[0].problem
        assert p.trajectory is not None and p.dcf is not None and p.kspace.ndim == 3


def test_ismrmrd_dataset_from_fully_sampled_file(tmp_path) -> None:
    """A fully sampled file (written like ``torchgadgets phantom --accel 1``) gives ground truths
    matching the file's own ground truth (magnitude, after one least-squares scale) and
    undersampled problems."""
    from gadgets.ismrmrd_io import scan_to_ismrmrd, write_ismrmrd
    from recon_core.metrics import psnr, scale_to_reference
    from recon_core.phantoms import simulate_scan

    scan = simulate_scan("cartesian", matrix=32, n_frames=3, n_coils=4, accel=1, acs_lines=32, mask_kind="uniform",
                         noise_std=0.001, seed=2)
    header, acqs = scan_to_ismrmrd(scan)
    (tmp_path / "d").mkdir()
    write_ismrmrd(tmp_path / "d" / "full.h5", header, acqs, ground_truth=scan.ground_truth, coil_maps=scan.coil_maps)
    ds = IsmrmrdDataset(tmp_path / "d", n=2, seed=0, sampling=SamplingSpec(masks=("uniform",), accel=(4, 4)))
    s = ds[0]
    assert tuple(s.ground_truth.shape) == (3, 32, 32)
    est = scale_to_reference(s.ground_truth.abs(), scan.ground_truth.abs(), scan.body_mask)
    assert psnr(est, scan.ground_truth.abs()) > 30
    assert s.problem.mask is not None and 0.2 < float(s.problem.mask.mean()) < 0.5
    tr, va, what = split_datasets(str(tmp_path / "d"), 2, 1, seed=0)
    assert "one slice" in what and len(tr) == 2 and len(va) == 1


# ------------------------------------------------------------------------------------------- loop
def _sets(n_train=6, n_val=2):
    spec = SamplingSpec(kinds=("cartesian",), masks=("uniform",), accel=(4, 4), acs_lines=(4, 4))
    return split_datasets("phantom", n_train, n_val, seed=0, sampling=spec, matrix=(24,), frames=(2, 2),
                          coils=(3, 3), noise=(0.0, 0.01))


def test_training_improves_validation_and_keeps_best(tmp_path) -> None:
    tr, va, what = _sets()
    res = train(_tiny_method(), tr, va, tmp_path / "w.pt", TrainConfig(steps=12, val_every=4, lr=3e-3),
                trained_on=what)
    first, best = res.history[0], max(h["val_psnr"] for h in res.history)
    assert res.history[0]["step"] == 0 and res.best_val_psnr == best
    assert min(h["val_loss"] for h in res.history[1:]) < first["val_loss"]
    meta = read_metadata(res.out)
    assert meta["extra"]["step"] == res.best_step and abs(meta["extra"]["val_psnr"] - best) < 1e-9
    assert checkpoint_path(res.out).is_file()


def test_resume_continues_from_the_checkpoint(tmp_path) -> None:
    tr, va, _ = _sets(4, 1)
    cfg = dict(val_every=2, lr=3e-3)
    full = train(_tiny_method(), tr, va, tmp_path / "a.pt", TrainConfig(steps=4, **cfg))
    train(_tiny_method(), tr, va, tmp_path / "b.pt", TrainConfig(steps=2, **cfg), trained_on="stage one")
    resumed = train(_tiny_method(), tr, va, tmp_path / "b.pt", TrainConfig(steps=4, **cfg), trained_on="stage two",
                    resume=checkpoint_path(tmp_path / "b.pt"))
    assert resumed.steps_done == 4 and [h["step"] for h in resumed.history] == [0, 2, 4]
    provenance = torch.load(checkpoint_path(tmp_path / "b.pt"), weights_only=True)["trained_on"]
    assert provenance == "stage one | resumed at step 2: stage two"
    a = torch.load(checkpoint_path(tmp_path / "a.pt"), weights_only=True)["model"]
    b = torch.load(checkpoint_path(tmp_path / "b.pt"), weights_only=True)["model"]
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    with pytest.raises(ValueError, match="checkpoint"):
        train(_tiny_method(n_filters=6), tr, va, tmp_path / "c.pt", TrainConfig(steps=4, **cfg),
              resume=checkpoint_path(tmp_path / "b.pt"))


def test_varied_phantoms_are_deterministic_consistent_and_varied() -> None:
    """``variety`` draws anatomy, contrast, wall motion and coil arrays: reproducible per (seed, i),
    still exactly encoded (E(gt) = data without noise), different from the standard anatomy;
    ``variety = 0`` gives the old samples bit for bit."""
    spec = SamplingSpec(kinds=("cartesian",), masks=("uniform",), accel=(3, 3))
    kw = dict(matrix=(24,), frames=(3, 3), coils=(3, 3), noise=(0.0, 0.0), sampling=spec)
    a, b = PhantomDataset(2, seed=5, variety=1.0, **kw), PhantomDataset(2, seed=5, variety=1.0, **kw)
    std, old = PhantomDataset(2, seed=5, variety=0.0, **kw), PhantomDataset(2, seed=5, **kw)
    for i in range(2):
        assert torch.equal(a[i].ground_truth, b[i].ground_truth)
        assert torch.equal(a[i].problem.kspace, b[i].problem.kspace)
        p = a[i].problem
        err = (p.operator(a[i].ground_truth) - p.kspace).abs().max()
        assert float(err) < 1e-5 * float(p.kspace.abs().max())
        assert torch.equal(std[i].problem.kspace, old[i].problem.kspace)
        assert not torch.allclose(a[i].problem.coil_maps, std[i].problem.coil_maps)
    assert float((a[0].ground_truth.abs() - std[0].ground_truth.abs()).abs().mean()) > 0.01
    tr, va, what = split_datasets("phantom:varied=0.5", 1, 1, seed=0, sampling=spec, matrix=(24,),
                                  frames=(2, 2), coils=(3, 3))
    assert tr.variety == 0.5 and "variety 0.5" in what
    with pytest.raises(ValueError, match="unknown phantom option"):
        split_datasets("phantom:wild", 1, 1, seed=0)
