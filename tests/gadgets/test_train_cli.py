"""``torchgadgets train``: a tiny CPU run, resume, registering, and the weights round trip through a chain."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gadgets.cli import main
from gadgets.offline import OfflineRunError, run_offline
from recon_core.training.loop import checkpoint_path
from recon_core.training.weights import ENV_VAR, read_metadata, read_registry

ARCH = ["--param", "n_filters=4", "--param", "n_cascades=2", "--param", "n_layers=3"]
SMALL = ["--n-train", "4", "--n-val", "2", "--matrix", "24", "--frames", "2", "3", "--coils", "3", "4",
         "--accel", "4", "4", "--masks", "uniform", "--lr", "3e-3"]
CHAIN = """version: 1
name: dc_cnn_roundtrip
chain:
  - gadget: noise
  - gadget: remove_oversampling
  - gadget: buffer
  - gadget: coil_estimate
  - gadget: recon
    params: {{method: dc_cnn, weights: {weights}, preset: fast, n_filters: {nf}, n_cascades: 2, n_layers: 3}}
  - gadget: image_export
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """One tiny training run through the CLI, registered in a temporary registry."""
    root = tmp_path_factory.mktemp("train")
    out = root / "w.pt"
    rc = main(["train", "dc_cnn", "--data", "phantom", "--steps", "8", "--val-every", "4", "--out", str(out),
               "--register", "mine", "--registry", str(root / "reg"), "-q", *SMALL, *ARCH])
    assert rc == 0
    phantom = root / "scan.h5"
    assert main(["phantom", str(phantom), "--matrix", "24", "--frames", "2", "--coils", "4", "--accel", "2",
                 "--acs", "8", "--seed", "99"]) == 0
    return {"out": out, "reg": root / "reg", "phantom": phantom, "root": root}


def test_tiny_train_run_improves_validation_and_keeps_best(trained) -> None:
    out = trained["out"]
    ckpt = torch.load(checkpoint_path(out), weights_only=True)
    hist = ckpt["history"]
    assert [h["step"] for h in hist] == [0, 4, 8] and ckpt["step"] == 8
    assert min(h["val_loss"] for h in hist[1:]) < hist[0]["val_loss"]
    meta = read_metadata(out)
    assert meta["extra"]["val_psnr"] == max(h["val_psnr"] for h in hist)
    assert meta["arch"]["n_filters"] == 4 and "Command: torchgadgets train dc_cnn --data phantom" in meta["trained_on"]
    entry = read_registry(trained["reg"])["mine"]
    assert entry.method == "dc_cnn" and entry.arch == meta["arch"] and entry.trained_on == meta["trained_on"]


def test_resume_continues_from_the_step(trained, tmp_path) -> None:
    out = tmp_path / "r.pt"
    assert main(["train", "dc_cnn", "--data", "phantom", "--steps", "2", "--val-every", "2", "--out", str(out),
                 "-q", *SMALL, *ARCH]) == 0
    assert main(["train", "dc_cnn", "--data", "phantom", "--steps", "4", "--val-every", "2", "--out", str(out),
                 "--resume", str(checkpoint_path(out)), "-q", *SMALL, *ARCH]) == 0
    ckpt = torch.load(checkpoint_path(out), weights_only=True)
    assert ckpt["step"] == 4 and [h["step"] for h in ckpt["history"]] == [0, 2, 4]


def test_train_from_fully_sampled_ismrmrd_folder(tmp_path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for seed in (1, 2):
        assert main(["phantom", str(data / f"full{seed}.h5"), "--matrix", "24", "--frames", "2", "--coils", "3",
                     "--accel", "1", "--acs", "24", "--seed", str(seed)]) == 0
    out = tmp_path / "w.pt"
    assert main(["train", "dc_cnn", "--data", str(data), "--steps", "2", "--val-every", "2", "--out", str(out),
                 "-q", *SMALL, *ARCH]) == 0
    assert "fully sampled ISMRMRD slices" in read_metadata(out)["trained_on"]


def _write_chain(path: Path, weights: str, nf: int = 4) -> Path:
    path.write_text(CHAIN.format(weights=weights, nf=nf))
    return path


def test_weights_round_trip_through_a_chain(trained, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(ENV_VAR, str(trained["reg"]))
    res = run_offline(_write_chain(tmp_path / "c.yaml", "mine"), trained["phantom"], device="cpu")
    assert len(res.images) == 2
    # a path works for offline chains as well
    res = run_offline(_write_chain(tmp_path / "p.yaml", str(trained["out"])), trained["phantom"], device="cpu")
    assert len(res.images) == 2


def test_chain_refuses_architecture_mismatch(trained, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(ENV_VAR, str(trained["reg"]))
    with pytest.raises(OfflineRunError) as exc:
        run_offline(_write_chain(tmp_path / "c.yaml", "mine", nf=8), trained["phantom"], device="cpu")
    text = "\n".join(exc.value.errors)
    assert "weights 'mine' were trained for dc_cnn with n_filters=4, this chain asks n_filters=8" in text


def test_chain_refuses_tampered_weights(trained, tmp_path, monkeypatch) -> None:
    reg = tmp_path / "reg"
    reg.mkdir()
    for f in trained["reg"].iterdir():
        (reg / f.name).write_bytes(f.read_bytes())
    monkeypatch.setenv(ENV_VAR, str(reg))
    data = bytearray((reg / "mine.pt").read_bytes())
    data[len(data) // 2] ^= 0x01
    (reg / "mine.pt").write_bytes(bytes(data))
    with pytest.raises(OfflineRunError) as exc:
        run_offline(_write_chain(tmp_path / "c.yaml", "mine"), trained["phantom"], device="cpu")
    text = "\n".join(exc.value.errors)
    assert "sha256" in text and read_registry(reg)["mine"].sha256 in text


def test_unknown_method_and_bad_param_exit_2(tmp_path, capsys) -> None:
    assert main(["train", "nope", "--data", "phantom", "--out", str(tmp_path / "w.pt")]) == 2
    assert "unknown reconstruction method" in capsys.readouterr().err
    assert main(["train", "dc_cnn", "--data", "phantom", "--out", str(tmp_path / "w.pt"), "--param", "bogus=1"]) == 2
    assert "bogus" in capsys.readouterr().err


def test_network_chains_may_not_name_weights() -> None:
    """``weights`` can be a local path, so a chain arriving over the network may not set it."""
    from gadgets.base import ChainError
    from gadgets.recon import ReconParams

    ReconParams.check_untrusted({"method": "dc_cnn"}, "net")
    ReconParams.check_untrusted({"method": "dc_cnn", "weights": "dc_cnn_fast"}, "net")   # a registered name
    for value in ("/etc/passwd", "../w.pt", "mine.pt", "not_registered"):
        with pytest.raises(ChainError, match="weights"):
            ReconParams.check_untrusted({"method": "dc_cnn", "weights": value}, "net")

