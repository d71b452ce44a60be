"""The recon gadget's product features: the quick preliminary series, progress lines on the server
log, and temporal super-resolution plumbing (``frames_out`` / ``temporal_upsampling``).

Two test-only methods are registered for the duration of a test (``monkeypatch`` on the registry):

* :class:`LerpMethod` — ``supports_output_times``: the zero-filled SENSE reconstruction of the
  acquired frames, interpolated linearly in time to ``problem.output_times_s`` (so at an acquired
  time it is exactly the plain reconstruction);
* :class:`GatedMethod` — returns the zero-filled images only after the test released it; the
  server test releases it only once the preliminary series has reached the client, which proves
  that the first series is streamed before the second one exists.
"""

from __future__ import annotations

import inspect
import logging
import threading
from pathlib import Path

import ismrmrd
import numpy as np
import pytest
import torch

from gadgets.base import ChainError
from gadgets.ismrmrd_io import scan_to_ismrmrd, write_ismrmrd
from gadgets.offline import run_offline
from gadgets.recon import ReconParams, output_times
from gadgets.stream.chain import parse_chain_text
from gadgets.stream.protocol import (Close, ConfigFile, Header, MessageReader, encode_message,
                                     socket_read_exact)
from gadgets.stream.server import ReconServer
from recon_core.methods import METHODS, MethodParams, ReconMethod, ReconProblem, get_method
from recon_core.phantoms import simulate_scan

N, FRAMES, COILS = 32, 4, 4
TIMEOUT = 30.0


# ---------------------------------------------------------------------------------------------
# test-only methods


class LerpMethod(ReconMethod[MethodParams]):
    """Zero-filled SENSE recon of the acquired frames, linearly interpolated to the output times."""

    name = "test_lerp"
    Params = MethodParams
    supports_output_times = True

    def reconstruct(self, problem: ReconProblem, progress=None) -> torch.Tensor:
        x = get_method("zero_filled")().reconstruct(problem, None)
        self._report(progress, 1, 1, "lerp")
        if problem.output_times_s is None:
            return x
        t = torch.as_tensor(problem.frame_times_s, dtype=torch.float64)
        t_out = torch.as_tensor(problem.output_times_s, dtype=torch.float64)
        i = (torch.searchsorted(t, t_out, right=True) - 1).clamp(0, len(t) - 2)
        w = ((t_out - t[i]) / (t[i + 1] - t[i])).clamp(0, 1).to(torch.float32)[:, None, None]
        return ((1 - w) * x[i] + w * x[i + 1]).to(torch.complex64)


RELEASE = threading.Event()


class GatedMethod(ReconMethod[MethodParams]):
    """The zero-filled images, returned only after :data:`RELEASE` is set (20 s at most)."""

    name = "test_gated"
    Params = MethodParams

    def reconstruct(self, problem: ReconProblem, progress=None) -> torch.Tensor:
        for i in range(400):
            if RELEASE.wait(0.05):
                break
            self._report(progress, i, 400, "waiting")
        else:
            raise RuntimeError("test_gated: never released (the preliminary series did not reach the client)")
        self._report(progress, 400, 400, "waiting")
        return get_method("zero_filled")().reconstruct(problem, None)


@pytest.fixture
def test_methods(monkeypatch):
    monkeypatch.setitem(METHODS, "test_lerp", f"{__name__}:LerpMethod")
    monkeypatch.setitem(METHODS, "test_gated", f"{__name__}:GatedMethod")
    RELEASE.clear()
    yield
    RELEASE.set()


# ---------------------------------------------------------------------------------------------
# data and helpers


@pytest.fixture(scope="module")
def cine_file(tmp_path_factory) -> Path:
    scan = simulate_scan("cartesian", matrix=N, n_frames=FRAMES, n_coils=COILS, accel=2, acs_lines=12,
                         mask_kind="uniform", seed=5)
    header, acqs = scan_to_ismrmrd(scan, protocol_name="recon_gadget_test")
    path = tmp_path_factory.mktemp("recon_gadget") / "cine.h5"
    write_ismrmrd(path, header, acqs)
    return path


def _chain(recon_params: str) -> str:
    return ("version: 1\nname: recon_gadget_test\nchain:\n  - gadget: noise\n"
            "  - gadget: remove_oversampling\n"
            "  - gadget: buffer\n  - gadget: coil_estimate\n    params: {method: walsh}\n"
            f"  - gadget: recon\n    params: {{{recon_params}}}\n  - gadget: image_export\n")


def _run(recon_params: str, path: Path):
    return run_offline(parse_chain_text(_chain(recon_params)), path, device="cpu").images


def _meta(img: ismrmrd.Image) -> dict[str, list[str]]:
    meta = ismrmrd.Meta.deserialize(img.attribute_string)
    return {k: meta[k] if isinstance(meta[k], list) else [meta[k]] for k in meta.keys()}


def _data(images) -> np.ndarray:
    return np.stack([np.asarray(im.data) for im in images])


# ---------------------------------------------------------------------------------------------
# quick first series


def test_quick_series_comes_first_and_both_series_are_right(cine_file):
    images = _run("method: cg_sense, max_iter: 8, quick: zero_filled, quick_params: {coil_combine: rss}",
                  cine_file)
    series = [im.getHead().image_series_index for im in images]
    assert series == [0] * FRAMES + [1] * FRAMES, series   # the preliminary series leaves first
    quick, final = images[:FRAMES], images[FRAMES:]
    plain_quick = _run("method: zero_filled, coil_combine: rss", cine_file)
    plain_final = _run("method: cg_sense, max_iter: 8", cine_file)
    np.testing.assert_array_equal(_data(quick), _data(plain_quick))
    np.testing.assert_array_equal(_data(final), _data(plain_final))
    mq, mf = _meta(quick[0]), _meta(final[0])
    assert mq["ReconMethod"] == ["zero_filled"] and mq["ReconSeries"] == ["preliminary"]
    assert mq["ImageComment"] == ["torchgadgets_zero_filled_preliminary"]
    assert mq["ReconFinalMethod"] == ["cg_sense"]
    assert mf["ReconMethod"] == ["cg_sense"] and mf["ReconSeries"] == ["final"]
    assert mf["ImageComment"] == ["torchgadgets_cg_sense"]
    assert [im.getHead().phase for im in final] == list(range(FRAMES))


def test_quick_params_are_validated_like_the_method_params():
    with pytest.raises(ChainError, match=r"quick_params.*unknown parameter.*max_iterations.*'cg_sense'"):
        ReconParams.from_mapping({"method": "zero_filled", "quick": "cg_sense",
                                  "quick_params": {"max_iterations": 3}}, "t.yaml")
    with pytest.raises(ChainError, match="unknown reconstruction method 'nope'"):
        ReconParams.from_mapping({"method": "zero_filled", "quick": "nope"}, "t.yaml")
    with pytest.raises(ChainError, match="max_time_s"):
        ReconParams.from_mapping({"method": "zero_filled", "quick": "cg_sense",
                                  "quick_params": {"max_time_s": -1}}, "t.yaml")
    with pytest.raises(ChainError, match="without 'quick'"):
        ReconParams.from_mapping({"method": "zero_filled", "quick_params": {"max_iter": 3}}, "t.yaml")
    p = ReconParams.from_mapping({"method": "zero_filled", "quick": "cg_sense",
                                  "quick_params": {"max_iter": "4"}})
    assert p.quick_params == {"max_iter": 4}


def _server_kwargs() -> dict:
    """Sessions in threads where the server offers it (the test-only method lives in this process)."""
    if "isolation" in inspect.signature(ReconServer).parameters:
        return {"isolation": "thread"}
    return {}


def test_server_streams_the_preliminary_series_before_the_final_one_exists(cine_file, tmp_path, test_methods):
    """The main method blocks until the client holds the preliminary images: only a server that
    forwards the first series at once gets through this session."""
    chains = tmp_path / "chains"
    chains.mkdir()
    (chains / "gated.yaml").write_text(_chain("method: test_gated, quick: zero_filled"))
    from gadgets.ismrmrd_io import read_ismrmrd

    xml, acqs, _ = read_ismrmrd(cine_file)
    srv = ReconServer(port=0, chains_dir=chains, device="cpu", max_sessions=1, **_server_kwargs()).start()
    try:
        import socket

        with socket.create_connection(("127.0.0.1", srv.port), timeout=TIMEOUT) as sock:
            sock.settimeout(TIMEOUT)
            payload = encode_message(ConfigFile("gated")) + encode_message(Header(xml)) + \
                b"".join(encode_message(a) for a in acqs) + encode_message(Close())
            sock.sendall(payload)
            reader = MessageReader(socket_read_exact(sock))
            received: list = []
            while True:
                msg = reader.read_message()
                received.append(msg)
                if isinstance(msg, ismrmrd.Image) and not RELEASE.is_set():
                    assert msg.getHead().image_series_index == 0
                    assert _meta(msg)["ReconSeries"] == ["preliminary"]
                    RELEASE.set()   # only now may the final series be computed
                if isinstance(msg, Close):
                    break
    finally:
        srv.shutdown(graceful=False, timeout=TIMEOUT)
    images = [m for m in received if isinstance(m, ismrmrd.Image)]
    texts = [getattr(m, "text", "") for m in received if not isinstance(m, (ismrmrd.Image, Close))]
    assert not any("ERROR" in t for t in texts), texts
    assert [im.getHead().image_series_index for im in images] == [0] * FRAMES + [1] * FRAMES
    methods = [_meta(im)["ReconMethod"] for im in images]
    assert methods == [["zero_filled"]] * FRAMES + [["test_gated"]] * FRAMES
    # the gated method returns the zero-filled SENSE images: both series agree
    np.testing.assert_allclose(_data(images[FRAMES:]), _data(images[:FRAMES]), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# progress lines


def test_progress_lines_at_info_with_stage_step_and_eta(cine_file, caplog):
    with caplog.at_level(logging.INFO, logger="torchgadgets"):
        _run("method: cg_sense, max_iter: 6, progress_log_s: 1e-9", cine_file)
    lines = [r.getMessage() for r in caplog.records
             if r.levelno == logging.INFO and "cg_sense" in r.getMessage()]
    steps = [ln for ln in lines if "/6 (" in ln]
    assert steps, lines
    assert any("ETA" in ln and "s elapsed" in ln for ln in steps), steps
    assert any("6/6 (100%)" in ln for ln in steps), steps
    with pytest.raises(ChainError, match="progress_log_s"):
        ReconParams.from_mapping({"method": "cg_sense", "progress_log_s": 0})


# ---------------------------------------------------------------------------------------------
# temporal super-resolution


def test_output_times_rule():
    t = torch.tensor([0.0, 0.1, 0.2, 0.4], dtype=torch.float64)
    t_out, pos = output_times(t, upsampling=2)
    assert len(t_out) == 2 * 3 + 1 and torch.equal(t_out[::2], t)
    assert torch.allclose(t_out[1::2], torch.tensor([0.05, 0.15, 0.3], dtype=torch.float64))
    assert torch.equal(pos, torch.arange(7, dtype=torch.float64) / 2)
    t_out, pos = output_times(t, frames_out=5)
    assert torch.allclose(t_out, torch.linspace(0, 0.4, 5, dtype=torch.float64))
    assert torch.allclose(pos, torch.tensor([0, 1, 2, 2.5, 3], dtype=torch.float64))
    with pytest.raises(ValueError, match="at least 2"):
        output_times(t[:1], upsampling=2)


@pytest.mark.parametrize("option,n_out", [("temporal_upsampling: 3", 3 * (FRAMES - 1) + 1),
                                          ("frames_out: 10", 10)])
def test_temporal_superresolution_through_a_chain(cine_file, test_methods, option, n_out):
    plain = _run("method: zero_filled", cine_file)
    images = _run(f"method: test_lerp, {option}", cine_file)
    assert len(images) == n_out
    heads = [im.getHead() for im in images]
    assert [h.phase for h in heads] == list(range(n_out))
    assert len({h.image_series_index for h in heads}) == 1
    trigger = [float(_meta(im)["TriggerTime_ms"][0]) for im in images]
    assert all(b > a for a, b in zip(trigger, trigger[1:])), trigger
    stamps = [h.acquisition_time_stamp for h in heads]
    assert all(b > a for a, b in zip(stamps, stamps[1:])), stamps
    plain_stamps = [im.getHead().acquisition_time_stamp for im in plain]
    assert stamps[0] == plain_stamps[0] and stamps[-1] == plain_stamps[-1]
    if option.startswith("temporal_upsampling"):
        np.testing.assert_array_equal(_data(images[::3]), _data(plain))   # every K-th frame is acquired
        assert stamps[::3] == plain_stamps
        assert [float(_meta(im)["TriggerTime_ms"][0]) for im in plain] == trigger[::3]
    else:   # first and last output times are the first and last acquired frames
        np.testing.assert_array_equal(_data(images)[[0, -1]], _data(plain)[[0, -1]])
    assert "ReconTemporalUpsampling" in _meta(images[0])


def test_temporal_superresolution_chain_build_errors(test_methods):
    with pytest.raises(ChainError, match="'frames_out'.*'cg_sense'.*supports_output_times"):
        ReconParams.from_mapping({"method": "cg_sense", "frames_out": 20}, "t.yaml")
    with pytest.raises(ChainError, match="'temporal_upsampling'.*'zero_filled'"):
        ReconParams.from_mapping({"method": "zero_filled", "temporal_upsampling": 2}, "t.yaml")
    with pytest.raises(ChainError, match="either 'frames_out' or 'temporal_upsampling'"):
        ReconParams.from_mapping({"method": "test_lerp", "frames_out": 20, "temporal_upsampling": 2},
                                 "t.yaml")
    with pytest.raises(ChainError, match="must be >= 1"):
        ReconParams.from_mapping({"method": "test_lerp", "frames_out": -3}, "t.yaml")
    p = ReconParams.from_mapping({"method": "test_lerp", "temporal_upsampling": "4"})
    assert p.temporal_upsampling == 4


@pytest.mark.skipif("inr" not in METHODS, reason="the INR method is not registered yet")
def test_inr_temporal_superresolution_through_a_chain(cine_file):
    quick = get_method("inr").quick_params
    items = ", ".join(f"{k}: {v}" for k, v in quick.items())
    plain = _run(f"method: inr, {items}" if items else "method: inr", cine_file)
    images = _run(f"method: inr, temporal_upsampling: 2, {items}" if items else
                  "method: inr, temporal_upsampling: 2", cine_file)
    assert len(plain) == FRAMES and len(images) == 2 * (FRAMES - 1) + 1
    assert [im.getHead().phase for im in images] == list(range(len(images)))
    np.testing.assert_allclose(_data(images[::2]), _data(plain), rtol=1e-4,
                               atol=1e-4 * float(np.abs(_data(plain)).max()))
