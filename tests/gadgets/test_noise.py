"""Tests of the ``noise`` gadget (prewhitening) and the noise dependency store."""

from __future__ import annotations

import logging

import ismrmrd
import numpy as np
import pytest

from gadgets.base import ChainError
from gadgets.buffer import BufferGadget
from gadgets.messages import NoiseStatistics
from gadgets.noise import NoiseGadget, NoiseParams
from gadgets.stream.storage import NoiseStore, noise_summary, sanitize_measurement_id
from tests.gadgets.harness import Harness, make_context, run_gadgets

N_CH = 6
N_RO = 64


def header_xml(measurement_id: str | None = None, dependency: tuple[str, str] | None = None,
               bandwidth: float | None = 0.5, channels: int = N_CH, ny: int = 32) -> str:
    """A minimal 2D Cartesian header with optional measurement id / dependency / receiver bandwidth."""
    info = ""
    if measurement_id is not None or dependency is not None:
        dep = ""
        if dependency is not None:
            dep = (f"<measurementDependency><dependencyType>{dependency[0]}</dependencyType>"
                   f"<measurementID>{dependency[1]}</measurementID></measurementDependency>")
        mid = f"<measurementID>{measurement_id}</measurementID>" if measurement_id else ""
        info = (f"<measurementInformation>{mid}<patientPosition>HFS</patientPosition>{dep}"
                "</measurementInformation>")
    bw = (f"<relativeReceiverNoiseBandwidth>{bandwidth}</relativeReceiverNoiseBandwidth>"
          if bandwidth is not None else "")
    return f"""<?xml version="1.0"?>
<ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD">
  {info}
  <acquisitionSystemInformation>{bw}<receiverChannels>{channels}</receiverChannels>
  </acquisitionSystemInformation>
  <experimentalConditions><H1resonanceFrequency_Hz>63500000</H1resonanceFrequency_Hz></experimentalConditions>
  <encoding>
    <encodedSpace><matrixSize><x>{N_RO}</x><y>{ny}</y><z>1</z></matrixSize>
      <fieldOfView_mm><x>256</x><y>256</y><z>5</z></fieldOfView_mm></encodedSpace>
    <reconSpace><matrixSize><x>{N_RO}</x><y>{ny}</y><z>1</z></matrixSize>
      <fieldOfView_mm><x>256</x><y>256</y><z>5</z></fieldOfView_mm></reconSpace>
    <encodingLimits><kspace_encoding_step_1><minimum>0</minimum><maximum>{ny - 1}</maximum>
      <center>{ny // 2}</center></kspace_encoding_step_1></encodingLimits>
    <trajectory>cartesian</trajectory>
  </encoding>
</ismrmrdHeader>"""


def correlated(cov: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Complex Gaussian ``[C, n]`` with covariance ``cov``."""
    chol = np.linalg.cholesky(cov)
    w = (rng.standard_normal((cov.shape[0], n)) + 1j * rng.standard_normal((cov.shape[0], n))) / np.sqrt(2)
    return (chol @ w).astype(np.complex64)


def stream(cov: np.ndarray, n_noise: int = 40, n_lines: int = 32, noise_dwell: float = 5.0,
           data_dwell: float = 5.0, seed: int = 0) -> list[ismrmrd.Acquisition]:
    """Noise scans then pure-noise "imaging" lines; data noise variance scales as noise_dwell/data_dwell."""
    rng = np.random.default_rng(seed)
    acqs = []
    scan = 0
    for _ in range(n_noise):
        a = ismrmrd.Acquisition.from_array(correlated(cov, N_RO, rng), None, scan_counter=scan,
                                           sample_time_us=noise_dwell)
        a.set_flag(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)
        acqs.append(a)
        scan += 1
    acqs.extend(lines(cov * (noise_dwell / data_dwell), n_lines, data_dwell, rng, scan))
    return acqs


def lines(cov: np.ndarray, n_lines: int, dwell: float, rng: np.random.Generator, scan0: int = 0):
    out = []
    for e1 in range(n_lines):
        a = ismrmrd.Acquisition.from_array(correlated(cov, N_RO, rng), None, scan_counter=scan0 + e1,
                                           sample_time_us=dwell, center_sample=N_RO // 2)
        a.idx.kspace_encode_step_1 = e1
        if e1 == n_lines - 1:
            a.set_flag(ismrmrd.ACQ_LAST_IN_SLICE)
        out.append(a)
    return out


def sample_cov(acqs) -> np.ndarray:
    x = np.concatenate([np.asarray(a.data, dtype=np.complex128) for a in acqs], axis=1)
    return x @ x.conj().T / x.shape[1]


@pytest.fixture
def psi() -> np.ndarray:
    """A correlated coil noise covariance with unequal coil noise levels (mean diagonal 4)."""
    rng = np.random.default_rng(3)
    g = (rng.standard_normal((N_CH, N_CH)) + 1j * rng.standard_normal((N_CH, N_CH))) / np.sqrt(2)
    b = np.eye(N_CH) + 0.6 * g / np.sqrt(N_CH)
    cov = b @ b.conj().T
    return 4.0 * cov / np.real(np.trace(cov)) * N_CH


def test_prewhitening_gives_identity_covariance(psi):
    ctx = make_context(header_xml(bandwidth=0.5))
    acqs = stream(psi)
    before = sample_cov(acqs[40:])
    assert np.abs(before - np.eye(N_CH)).max() > 0.5          # really correlated and not unit
    out = run_gadgets([NoiseGadget(ctx=ctx)], acqs)
    assert len(out) == 32                                       # the 40 noise scans are consumed
    assert not any(a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT) for a in out)
    assert all(a.data.dtype == np.complex64 for a in out)
    after = sample_cov(out)
    assert np.abs(after - np.eye(N_CH)).max() < 0.08
    assert ctx.options["prewhitened"] is True
    assert ctx.options["noise_scans"] == 40
    assert ctx.options["noise_statistics"].covariance.shape == (N_CH, N_CH)


def test_dwell_time_and_bandwidth_scaling(psi):
    # data sampled twice as fast carry twice the noise variance; bandwidth 0.5 cancels the factor 2
    ctx = make_context(header_xml(bandwidth=0.5))
    out = run_gadgets([NoiseGadget(ctx=ctx)], stream(psi, noise_dwell=10.0, data_dwell=5.0, seed=1))
    assert np.abs(sample_cov(out) - np.eye(N_CH)).max() < 0.08
    # the Siemens default bandwidth 0.793 (no header entry): whitened variance 2·0.793
    ctx = make_context(header_xml(bandwidth=None))
    out = run_gadgets([NoiseGadget(ctx=ctx)], stream(psi, seed=2))
    assert np.abs(sample_cov(out) - 2 * 0.793 * np.eye(N_CH)).max() < 0.15


def test_skip_channels_left_untouched(psi):
    ctx = make_context(header_xml(bandwidth=0.5))
    acqs = stream(psi, seed=4)
    raw = [a.data.copy() for a in acqs[40:]]
    params = NoiseParams.from_mapping({"skip_channels": "1"})
    out = run_gadgets([NoiseGadget(params, ctx)], acqs)
    for a, r in zip(out, raw):
        np.testing.assert_array_equal(a.data[1], r[1])
    keep = [0, 2, 3, 4, 5]
    c = sample_cov(out)[np.ix_(keep, keep)]
    assert np.abs(c - np.eye(len(keep))).max() < 0.08


def test_disabled_is_pass_through(psi):
    ctx = make_context(header_xml())
    acqs = stream(psi, n_noise=3, n_lines=2)
    raw = [a.data.copy() for a in acqs]
    out = run_gadgets([NoiseGadget(NoiseParams(enabled=False), ctx)], acqs)
    assert len(out) == 5
    for a, r in zip(out, raw):
        np.testing.assert_array_equal(a.data, r)


def test_dependency_saved_then_loaded(psi, tmp_path):
    # measurement 1: a noise-only dependency stream
    ctx1 = make_context(header_xml(measurement_id="45190_1234_noise"), storage_dir=tmp_path)
    out = run_gadgets([NoiseGadget(ctx=ctx1)], stream(psi, n_lines=0))
    assert out == []
    stored = NoiseStore(tmp_path).load("45190_1234_noise")
    assert stored is not None and stored.covariance.shape == (N_CH, N_CH)
    assert stored.dwell_time_us == 5.0 and stored.n_samples == 40 * N_RO
    np.testing.assert_allclose(stored.covariance, psi, atol=0.25)

    # measurement 2: no noise scans, header names the dependency → data are prewhitened
    ctx2 = make_context(header_xml(measurement_id="45190_1234_img", dependency=("Noise", "45190_1234_noise")),
                        storage_dir=tmp_path)
    rng = np.random.default_rng(7)
    out = run_gadgets([NoiseGadget(ctx=ctx2), BufferGadget(ctx=ctx2)], lines(psi, 32, 5.0, rng))
    assert len(out) == 1 and out[0].prewhitened
    k = out[0].kspace[0].numpy().reshape(N_CH, -1).astype(np.complex128)
    assert np.abs(k @ k.conj().T / k.shape[1] - np.eye(N_CH)).max() < 0.08
    # an imaging stream that itself contains noise scans saves them under its own id
    ctx3 = make_context(header_xml(measurement_id="other/../id"), storage_dir=tmp_path)
    run_gadgets([NoiseGadget(ctx=ctx3)], stream(psi, n_noise=4, n_lines=2))
    assert NoiseStore(tmp_path).load("other/../id") is not None


def test_missing_dependency_warns_and_continues(psi, tmp_path, caplog):
    ctx = make_context(header_xml(measurement_id="m2", dependency=("Noise", "does_not_exist")),
                       storage_dir=tmp_path)
    rng = np.random.default_rng(8)
    acqs = lines(psi, 32, 5.0, rng)
    raw = [a.data.copy() for a in acqs]
    with caplog.at_level(logging.WARNING):
        out = run_gadgets([NoiseGadget(ctx=ctx), BufferGadget(ctx=ctx)], acqs)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "does_not_exist" in warnings[0].getMessage() and str(tmp_path) in warnings[0].getMessage()
    assert len(out) == 1 and not out[0].prewhitened
    np.testing.assert_array_equal(out[0].kspace[0, :, 5].numpy(), raw[5])


def test_channel_mismatch_warns_and_skips(psi, tmp_path, caplog):
    NoiseStore(tmp_path).save("n8", NoiseStatistics(covariance=np.eye(8), dwell_time_us=5.0, n_samples=100))
    ctx = make_context(header_xml(dependency=("Noise", "n8")), storage_dir=tmp_path)
    acqs = lines(psi, 4, 5.0, np.random.default_rng(9))
    raw = [a.data.copy() for a in acqs]
    with caplog.at_level(logging.WARNING):
        out = run_gadgets([NoiseGadget(ctx=ctx)], acqs)
    assert any("8 channels" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    for a, r in zip(out, raw):
        np.testing.assert_array_equal(a.data, r)
    assert ctx.options["prewhitened"] is False


def test_no_noise_and_no_dependency_is_quiet(psi, caplog):
    ctx = make_context(header_xml())
    with caplog.at_level(logging.WARNING):
        out = run_gadgets([NoiseGadget(ctx=ctx)], lines(psi, 3, 5.0, np.random.default_rng(1)))
    assert len(out) == 3 and not caplog.records
    assert ctx.options.get("prewhitened") is False


def test_noise_scan_channel_change_is_an_error(psi):
    ctx = make_context(header_xml())
    acqs = stream(psi, n_noise=2, n_lines=1)
    bad = ismrmrd.Acquisition.from_array(np.zeros((3, N_RO), np.complex64), None, scan_counter=99)
    bad.set_flag(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)
    h = Harness([NoiseGadget(ctx=ctx)])
    h.push(acqs[0])
    with pytest.raises(Exception, match=r"noise scan 99: active_channels is 3"):
        h.push(bad)


def test_params_are_validated():
    with pytest.raises(ChainError, match="skip_channels"):
        NoiseParams.from_mapping({"skip_channels": "-1"})
    with pytest.raises(ChainError, match="unknown parameter"):
        NoiseParams.from_mapping({"nope": 1})


# ---------------------------------------------------------------------------------------------- store


def test_store_round_trip_and_summary(tmp_path):
    cov = np.diag([1.0, 4.0, 9.0]).astype(np.complex128)
    cov[0, 1], cov[1, 0] = 0.5 + 0.5j, 0.5 - 0.5j
    stats = NoiseStatistics(covariance=cov, dwell_time_us=2.5, n_samples=1000, measurement_id="abc",
                            channel_names=["H1", "H2", "B3"])
    store = NoiseStore(tmp_path / "deps")
    assert store.load("abc") is None
    path = store.save("abc", stats)
    assert path.parent == (tmp_path / "deps").resolve() and "abc" in store
    back = store.load("abc")
    np.testing.assert_array_equal(back.covariance, cov)
    assert (back.dwell_time_us, back.n_samples, back.measurement_id, back.channel_names) == \
        (2.5, 1000, "abc", ["H1", "H2", "B3"])
    s = noise_summary(back)
    assert s["status"] == "success" and s["channels"] == 3
    assert (s["min_sigma"], s["max_sigma"], s["mean_sigma"]) == pytest.approx((1.0, 3.0, 2.0))
    assert s["noise_dwell_time_us"] == 2.5
    assert noise_summary(None)["status"] == "failed"


@pytest.mark.parametrize("mid", ["../../etc/passwd", "/abs/path", "..", "a\\b", "x" * 300, "ü-id"])
def test_store_ids_cannot_escape(tmp_path, mid):
    store = NoiseStore(tmp_path)
    p = store.path_for(mid)
    assert p.parent == tmp_path.resolve()
    store.save(mid, NoiseStatistics(covariance=np.eye(2), dwell_time_us=1.0, n_samples=2))
    assert store.load(mid).measurement_id == mid
    assert sorted(q.name for q in tmp_path.iterdir()) == [p.name]


def test_sanitised_ids_do_not_collide():
    assert sanitize_measurement_id("a/b") != sanitize_measurement_id("a_b")
    assert sanitize_measurement_id("plain_ID-1.2") == "plain_ID-1.2"
    with pytest.raises(ValueError):
        sanitize_measurement_id("  ")
