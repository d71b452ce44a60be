"""Server tests over loopback: our client, ismrmrd's ProtocolSerializer and hand-built bytes against
:class:`ReconServer` on 127.0.0.1 (port 0), with a small phantom and small chains in tmp folders.

Every test checks the session shape (CLOSE last) and that the server goes on serving.
"""

from __future__ import annotations

import io
import json
import os
import socket
import struct
import threading
import time
from importlib import metadata
from pathlib import Path

import ismrmrd
import ismrmrd.serialization as mser
import ismrmrd.xsd
import numpy as np
import pytest

from gadgets.ismrmrd_io import read_ismrmrd, scan_to_ismrmrd, write_ismrmrd
from gadgets.stream.chain import chain_context, load_chain
from gadgets.stream.client import run_client
from gadgets.stream.h5out import read_images
from gadgets.stream.protocol import (Close, ConfigFile, ConfigText, DependencyQuery, Header, MessageReader,
                                     Query, Response, Text, encode_message, meta_from_xml, socket_read_exact)
from gadgets.stream.runner import run_chain
from gadgets.stream.server import ReconServer
from gadgets.stream.session import NOISE_DEPENDENCY_PREFIX, QUERY_KEYS, dependency_request
from gadgets.stream.storage import NoiseStore
from recon_core.phantoms import simulate_scan

TIMEOUT = 30.0
MEASUREMENT_ID = "4242_1111_2222_7"

SMALL_CHAIN = """\
description: small test chain (Walsh maps, 3 CG iterations)
chain:
  - gadget: noise
  - gadget: remove_oversampling
  - gadget: buffer
    params: {trigger: slice}
  - gadget: coil_estimate
    params: {method: walsh}
  - gadget: recon
    params: {method: cg_sense, max_iter: 3}
  - gadget: image_export
"""
BAD_PARAM_CHAIN = SMALL_CHAIN.replace("method: cg_sense", "method: no_such_method")
SELECTION = """\
version: 1
generic_names: [auto, scanner_generic]
rules:
  - name: cartesian small
    match: {trajectory: cartesian, protocol: "^server_test"}
    chain: small
default: passthrough
"""
DEPENDENCY_XML = """<?xml version="1.0" encoding="UTF-8"?>
<gadgetronStreamConfiguration xsi:schemaLocation="http://gadgetron.sf.net/gadgetron gadgetron.xsd"
        xmlns="http://gadgetron.sf.net/gadgetron" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
    <writer><slot>1019</slot><dll>gadgetron_mricore</dll><classname>DependencyQueryWriter</classname></writer>
    <gadget>
      <name>NoiseSummary</name><dll>gadgetron_mricore</dll><classname>NoiseSummaryGadget</classname>
      <property><name>noise_file</name><value>{value}</value></property>
    </gadget>
</gadgetronStreamConfiguration>
"""


# ---------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    chains = root / "chains"
    chains.mkdir()
    (chains / "small.yaml").write_text(SMALL_CHAIN)
    (chains / "bad_param.yaml").write_text(BAD_PARAM_CHAIN)
    (chains / "passthrough.yaml").write_text("chain: []\n")
    (chains / "selection.yaml").write_text(SELECTION)
    scan = simulate_scan("cartesian", matrix=32, n_frames=1, n_coils=4, accel=2, acs_lines=12)
    xml, acqs = scan_to_ismrmrd(scan, protocol_name="server_test_cart", measurement_id=MEASUREMENT_ID)
    data = root / "in.h5"
    write_ismrmrd(data, xml, acqs)
    # offline reference: the same chain, no network (on a separate copy: the noise gadget
    # prewhitens acquisition data in place)
    spec = load_chain("small", chains)
    ctx = chain_context(spec, "cpu", header_xml=xml)
    outs, res = run_chain(spec, read_ismrmrd(data)[1], ctx, timeout=TIMEOUT)
    assert not res.errors, res.errors
    reference = np.stack([np.asarray(o.data) for o in outs])
    return {"root": root, "chains": chains, "xml": xml, "acqs": acqs, "data": data, "reference": reference}


@pytest.fixture(scope="module")
def server(env):
    srv = ReconServer(port=0, chains_dir=env["chains"], device="cpu", max_sessions=2, queue_limit=4,
                      save_raw_dir=env["root"] / "raw", noise_store_dir=env["root"] / "noise",
                      read_timeout_s=3.0).start()
    yield srv
    srv.shutdown(graceful=False, timeout=TIMEOUT)
    assert srv.active_sessions == 0


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    sock.settimeout(TIMEOUT)
    return sock


def read_replies(sock: socket.socket) -> list:
    """Read every message until CLOSE; then the server must end the stream (EOF)."""
    reader = MessageReader(socket_read_exact(sock))
    msgs = []
    while True:
        msg = reader.read_message()
        msgs.append(msg)
        if isinstance(msg, Close):
            break
    sock.settimeout(5.0)
    assert sock.recv(1) == b"", "the server must send nothing after CLOSE"
    return msgs


def raw_session(port: int, payload: bytes, half_close: bool = True) -> list:
    """Send bytes, optionally half-close, and read the replies up to CLOSE."""
    with connect(port) as sock:
        sock.sendall(payload)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        return read_replies(sock)


def acquisition_bytes(acqs) -> bytes:
    """Wire bytes of acquisitions (the objects are never put into a chain here, so stay pristine)."""
    return b"".join(encode_message(a) for a in acqs)


def images_of(msgs) -> np.ndarray:
    return np.stack([np.asarray(m.data) for m in msgs if isinstance(m, ismrmrd.Image)])


def texts_of(msgs) -> list[str]:
    """TEXT messages, without the server's INFO lines (a half-closed client's reconstruction that runs
    longer than the disconnect probe interval gets "[server] INFO: reconstruction running")."""
    return [m.text for m in msgs if isinstance(m, Text) and not m.text.startswith("[server] INFO:")]


def assert_serves_next(port: int) -> None:
    """The server still answers a normal (query) session."""
    msgs = raw_session(port, encode_message(Query(7, "torchgadgets::version")) + encode_message(Close()))
    assert isinstance(msgs[0], Response) and msgs[0].correlation_id == 7 and msgs[0].text
    assert isinstance(msgs[-1], Close)


def wait_idle(server: ReconServer) -> None:
    """Wait until no session runs (summaries are complete then)."""
    deadline = time.monotonic() + TIMEOUT
    while server.active_sessions and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.active_sessions == 0


def client(env, port: int, out: Path, config: str = "small", **kw) -> tuple[int, str]:
    buf = io.StringIO()
    rc = run_client("127.0.0.1", port, str(env["data"]), outfile=str(out), out_group="g", config=config,
                    timeout_ms=5000, out=buf, err=buf, read_timeout_s=TIMEOUT, **kw)
    return rc, buf.getvalue()


# ---------------------------------------------------------------------------------------------
# normal sessions


def test_client_roundtrip_matches_offline(env, server, tmp_path):
    rc, text = client(env, server.port, tmp_path / "out.h5")
    assert rc == 0, text
    series = read_images(tmp_path / "out.h5", "g")
    assert list(series) == [0]
    data = series[0].data
    assert data.shape == (1, 1, 1, 32, 32)
    np.testing.assert_allclose(data.reshape(env["reference"].shape), env["reference"], rtol=1e-4, atol=1e-6)
    assert float(np.abs(data).max()) > 0


def test_config_name_with_extension_and_unknown_name(env, server):
    payload = encode_message(ConfigFile("small.yaml")) + encode_message(Header(env["xml"])) \
        + acquisition_bytes(env["acqs"]) + encode_message(Close())
    msgs = raw_session(server.port, payload)
    assert images_of(msgs).shape[0] == 1 and isinstance(msgs[-1], Close)
    msgs = raw_session(server.port, encode_message(ConfigFile("../etc/passwd")) + encode_message(Header(env["xml"]))
                       + encode_message(Close()))
    assert any("invalid chain name" in t for t in texts_of(msgs)) and isinstance(msgs[-1], Close)
    msgs = raw_session(server.port, encode_message(ConfigFile("nope")) + encode_message(Header(env["xml"]))
                       + encode_message(Close()))
    assert any("unknown chain 'nope'" in t for t in texts_of(msgs)) and isinstance(msgs[-1], Close)


def test_ismrmrd_protocol_serializer_stream(env, server):
    buf = io.BytesIO()
    ser = mser.ProtocolSerializer(buf)
    ser.serialize(mser.ConfigFile("small"))
    ser.serialize(ismrmrd.xsd.CreateFromDocument(env["xml"]))
    for a in env["acqs"]:
        ser.serialize(a)
    ser.close()
    msgs = raw_session(server.port, buf.getvalue())
    assert isinstance(msgs[-1], Close) and not texts_of(msgs)
    np.testing.assert_allclose(images_of(msgs), env["reference"], rtol=1e-4, atol=1e-6)


def test_hand_built_mrd_stream_with_json_override(env, server):
    """PROTOCOL.md §11 shape of the MRD client: NUL-terminated texts, JSON TEXT after the header."""
    def text(mid: int, s: str) -> bytes:
        raw = s.encode() + b"\0"
        return struct.pack("<HI", mid, len(raw)) + raw

    name = b"no_such_chain_overridden".ljust(1024, b"\0")
    parts = [struct.pack("<H", 1) + name, text(3, env["xml"]),
             text(5, json.dumps({"parameters": {"config": "small", "other": 1}}))]
    for a in env["acqs"]:
        head = bytes(a.getHead())
        assert len(head) == 340
        parts.append(struct.pack("<H", 1008) + head + a.traj.astype("<f4").tobytes()
                     + a.data.astype("<c8").tobytes())
    parts.append(struct.pack("<H", 4))
    msgs = raw_session(server.port, b"".join(parts))
    assert isinstance(msgs[-1], Close) and not texts_of(msgs)
    np.testing.assert_allclose(images_of(msgs), env["reference"], rtol=1e-4, atol=1e-6)


def test_four_concurrent_sessions(env, server, tmp_path):
    results: dict[int, tuple[int, str]] = {}

    def one(i: int) -> None:
        results[i] = client(env, server.port, tmp_path / f"out{i}.h5")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT * 2)
    assert sorted(results) == [0, 1, 2, 3]
    for i in range(4):
        rc, text = results[i]
        assert rc == 0, text
        data = read_images(tmp_path / f"out{i}.h5", "g")[0].data
        np.testing.assert_allclose(data.reshape(env["reference"].shape), env["reference"], rtol=1e-4, atol=1e-6)


def test_queries(server):
    payload = b"".join(encode_message(Query(i, k)) for i, k in enumerate(QUERY_KEYS)) \
        + encode_message(Query(999, "no::such::key")) + encode_message(Close())
    msgs = raw_session(server.port, payload)
    answers = {m.correlation_id: m.text for m in msgs if isinstance(m, Response)}
    keys = dict(enumerate(QUERY_KEYS))
    assert answers[999] == "Unknown query"
    by_key = {keys[i]: a for i, a in answers.items() if i in keys}
    assert by_key["ismrmrd::version"] == metadata.version("ismrmrd")
    assert by_key["torchgadgets::device"] == "cpu"
    assert by_key["gadgetron::info::cuda"] in ("YES", "NO")
    assert by_key["gadgetron::cuda::devices"].isdigit()
    assert "torchgadgets" in by_key["gadgetron::version"]
    assert isinstance(msgs[-1], Close)
    # queries are also answered during the stream
    buf = io.StringIO()
    assert run_client("127.0.0.1", server.port, info_key="gadgetron::info", out=buf, err=buf) == 0
    assert "CUDA support" in buf.getvalue()


def test_selection_auto_and_generic_names(env, server):
    for name in ("auto", "scanner_generic"):
        msgs = raw_session(server.port, encode_message(ConfigFile(name)) + encode_message(Header(env["xml"]))
                           + acquisition_bytes(env["acqs"]) + encode_message(Close()))
        assert not texts_of(msgs) and isinstance(msgs[-1], Close)
        np.testing.assert_allclose(images_of(msgs), env["reference"], rtol=1e-4, atol=1e-6)
    wait_idle(server)
    summary = [s for s in server.summaries if s.selection][-1]
    assert summary.chain == "small" and "cartesian small" in summary.selection


# ---------------------------------------------------------------------------------------------
# errors: CLOSE last, server goes on


def mixed_channel_acquisitions(acqs) -> list:
    """Acquisition 5 with 2 instead of 4 channels: the buffer gadget fails at run time."""
    out = list(acqs)
    head = out[5].getHead()
    head.active_channels = head.available_channels = 2
    bad = ismrmrd.Acquisition(head)
    bad.data[:] = out[5].data[:2]
    out[5] = bad
    return out


def test_runtime_chain_error_then_close(env, server, tmp_path):
    acqs = mixed_channel_acquisitions(env["acqs"])
    write_ismrmrd(tmp_path / "bad.h5", env["xml"], acqs)
    buf = io.StringIO()
    rc = run_client("127.0.0.1", server.port, str(tmp_path / "bad.h5"), outfile=str(tmp_path / "o.h5"),
                    out_group="g", config="small", out=buf, err=buf, read_timeout_s=TIMEOUT)
    # the session ended properly (TEXT errors + CLOSE), but with an ERROR and no image: exit code 1
    assert rc == 1, buf.getvalue()
    assert "[buffer] ERROR:" in buf.getvalue() and "active_channels" in buf.getvalue()
    assert "answered 1 error(s) and sent no images" in buf.getvalue()
    msgs = raw_session(server.port, encode_message(ConfigFile("small")) + encode_message(Header(env["xml"]))
                       + acquisition_bytes(acqs) + encode_message(Close()))
    assert isinstance(msgs[-1], Close) and isinstance(msgs[-2], Text)
    assert msgs[-2].text.startswith("[buffer] ERROR:") and not images_of_safe(msgs)
    assert_serves_next(server.port)


def test_bad_method_parameter_then_close(env, server):
    msgs = raw_session(server.port, encode_message(ConfigFile("bad_param")) + encode_message(Header(env["xml"]))
                       + acquisition_bytes(env["acqs"]) + encode_message(Close()))
    errs = texts_of(msgs)
    assert len(errs) == 1 and errs[0].startswith("[chain] ERROR:") and "no_such_method" in errs[0]
    assert isinstance(msgs[-1], Close)
    assert_serves_next(server.port)


def test_network_fit_method_through_the_server(env, server):
    """A method that fits a network (TD-DIP, autograd) runs through the server like any other:
    images come back with its preset in the meta, no TEXT error, CLOSE last."""
    chain = ("version: 1\nname: tdip_small\nchain:\n  - gadget: noise\n  - gadget: remove_oversampling\n"
             "  - gadget: buffer\n  - gadget: coil_estimate\n"
             "  - gadget: recon\n    params: {method: tdip, n_steps: 4, channels: 4}\n  - gadget: image_export\n")
    msgs = raw_session(server.port, encode_message(ConfigText(chain)) + encode_message(Header(env["xml"]))
                       + acquisition_bytes(env["acqs"]) + encode_message(Close()))
    assert not texts_of(msgs), texts_of(msgs)
    images = images_of_safe(msgs)
    assert len(images) == 1 and np.isfinite(images[0].data).all() and np.abs(images[0].data).max() > 0
    assert "<value>tdip</value>" in images[0].attribute_string and "ReconPreset" in images[0].attribute_string
    assert isinstance(msgs[-1], Close)


def test_network_chain_may_not_name_files(env, server, tmp_path):
    """An inline chain (CONFIG id 2) that sets a file-naming method parameter (TD-DIP's checkpoint)
    is refused before anything runs, nothing is written, and the server serves the next client."""
    target = tmp_path / "written_by_client.pt"
    chain = ("version: 1\nname: sneaky\nchain:\n  - gadget: buffer\n  - gadget: coil_estimate\n"
             f"  - gadget: recon\n    params: {{method: tdip, n_steps: 2, channels: 2, checkpoint: {target}}}\n")
    msgs = raw_session(server.port, encode_message(ConfigText(chain)) + encode_message(Header(env["xml"]))
                       + acquisition_bytes(env["acqs"]) + encode_message(Close()))
    errs = texts_of(msgs)
    assert len(errs) == 1 and errs[0].startswith("[chain] ERROR:") and "checkpoint" in errs[0], errs
    assert "over the network" in errs[0] and isinstance(msgs[-1], Close)
    assert not target.exists()
    assert_serves_next(server.port)


@pytest.mark.parametrize("header, needle", [
    ("<ismrmrdHeader><oops", "invalid ISMRMRD header"),
    ('<?xml version="1.0"?><ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD"></ismrmrdHeader>', "experimentalConditions"),
    ("", "header is empty"),
])
def test_bad_header_then_close(env, server, header, needle):
    msgs = raw_session(server.port, encode_message(ConfigFile("small")) + encode_message(Header(header))
                       + acquisition_bytes(env["acqs"][:3]) + encode_message(Close()))
    assert any(needle in t for t in texts_of(msgs)), texts_of(msgs)
    assert isinstance(msgs[-1], Close) and not images_of_safe(msgs)
    assert_serves_next(server.port)


def images_of_safe(msgs) -> list:
    return [m for m in msgs if isinstance(m, ismrmrd.Image)]


def test_state_machine_violations(env, server):
    msgs = raw_session(server.port, encode_message(Header(env["xml"])))
    assert "header before config" in texts_of(msgs)[0] and isinstance(msgs[-1], Close)
    msgs = raw_session(server.port, encode_message(ConfigFile("small")) + encode_message(ConfigText("chain: []")))
    assert "second config" in texts_of(msgs)[0] and isinstance(msgs[-1], Close)
    msgs = raw_session(server.port, encode_message(ConfigFile("small")) + encode_message(Header(env["xml"]))
                       + acquisition_bytes(env["acqs"][:2]) + encode_message(Header(env["xml"])))
    assert any("second ISMRMRD header" in t for t in texts_of(msgs)) and isinstance(msgs[-1], Close)
    assert_serves_next(server.port)


@pytest.mark.parametrize("case", ["random", "unknown_id", "truncated", "absurd_length", "huge_acquisition"])
def test_bad_bytes_then_next_client(env, server, case):
    rng = np.random.default_rng(3)
    if case == "random":
        payload = b"\x39\x30" + rng.integers(0, 256, 4000, dtype=np.uint8).tobytes()   # id 12345 first
        needle = "unknown message id 12345"
    elif case == "unknown_id":
        payload = encode_message(ConfigFile("small")) + struct.pack("<H", 1001) + b"\0" * 64
        needle = "unknown message id 1001"
    elif case == "truncated":
        payload = encode_message(ConfigFile("small")) + encode_message(Header(env["xml"])) \
            + encode_message(env["acqs"][1])[:500]
        needle = "stream ended while reading"
    elif case == "absurd_length":
        payload = struct.pack("<HI", 2, 0xFFFFFFF0) + b"<config/>"
        needle = "above the limit"
    else:
        head = env["acqs"][1].getHead()
        head.number_of_samples, head.active_channels = 65535, 1024
        payload = encode_message(ConfigFile("small")) + encode_message(Header(env["xml"])) \
            + struct.pack("<H", 1008) + bytes(head)
        needle = "above the limit"
    msgs = raw_session(server.port, payload)
    errs = texts_of(msgs)
    assert any(needle in t for t in errs), errs
    assert isinstance(msgs[-1], Close)
    assert_serves_next(server.port)


def test_client_vanishes_mid_stream(env, server, tmp_path):
    wait_idle(server)
    before = len(server.summaries)
    sock = connect(server.port)
    sock.sendall(encode_message(ConfigFile("small")) + encode_message(Header(env["xml"]))
                 + acquisition_bytes(env["acqs"][:5]))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))   # reset on close
    sock.close()
    deadline = time.monotonic() + TIMEOUT
    while len(server.summaries) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    gone = server.summaries[before]
    assert any("connection lost" in e for e in gone.errors), gone.errors
    rc, text = client(env, server.port, tmp_path / "after.h5")
    assert rc == 0, text


def test_stalled_client_times_out(env, server):
    t0 = time.monotonic()
    with connect(server.port) as sock:
        sock.sendall(encode_message(ConfigFile("small")) + encode_message(Header(env["xml"]))
                     + acquisition_bytes(env["acqs"][:3]))
        msgs = read_replies(sock)                       # no CLOSE from us: the server gives up
    assert 2.5 < time.monotonic() - t0 < TIMEOUT
    assert any("stalled" in t for t in texts_of(msgs)) and isinstance(msgs[-1], Close)
    assert_serves_next(server.port)


# ---------------------------------------------------------------------------------------------
# dependency query, raw data


def test_dependency_request_detection():
    assert dependency_request(DEPENDENCY_XML.replace("{value}", "X_1")) == "X_1"
    assert dependency_request("chain: []") is None
    two = DEPENDENCY_XML.replace("</gadgetronStreamConfiguration>",
                                 "<gadget><name>a</name><dll>d</dll><classname>NoiseAdjustGadget</classname>"
                                 "</gadget></gadgetronStreamConfiguration>")
    assert dependency_request(two) is None


def test_dependency_query(env, server, tmp_path):
    # a session with an in-stream noise scan stores the noise statistics under its measurement id
    rc, text = client(env, server.port, tmp_path / "n.h5")
    assert rc == 0, text
    assert MEASUREMENT_ID in NoiseStore(env["root"] / "noise")
    payload = encode_message(ConfigText(DEPENDENCY_XML.replace("{value}", NOISE_DEPENDENCY_PREFIX + MEASUREMENT_ID))) \
        + encode_message(Close())
    msgs = raw_session(server.port, payload)
    assert [type(m) for m in msgs] == [DependencyQuery, Close]
    meta = meta_from_xml(msgs[0].meta_xml)
    assert meta["status"] == ["success"] and meta["channels"] == ["4"]
    lo, mean, hi = (float(meta[k][0]) for k in ("min_sigma", "mean_sigma", "max_sigma"))
    assert 0 < lo <= mean <= hi and float(meta["noise_dwell_time_us"][0]) == pytest.approx(2.5)
    stored = NoiseStore(env["root"] / "noise").load(MEASUREMENT_ID)
    sig = np.sqrt(np.real(np.diag(stored.covariance)))
    assert hi == pytest.approx(sig.max(), rel=1e-6)
    # unknown measurement → status failed, still 1019 + CLOSE
    msgs = raw_session(server.port, encode_message(ConfigText(DEPENDENCY_XML.replace(
        "{value}", NOISE_DEPENDENCY_PREFIX + "unknown"))) + encode_message(Close()))
    assert [type(m) for m in msgs] == [DependencyQuery, Close]
    assert meta_from_xml(msgs[0].meta_xml)["status"] != ["success"]


def test_saved_raw_data_replays_to_same_images(env, server, tmp_path):
    wait_idle(server)
    rc, text = client(env, server.port, tmp_path / "out.h5")
    assert rc == 0, text
    wait_idle(server)
    summary = server.summaries[-1]
    raw = summary.raw_path
    assert raw is not None and raw.is_file() and raw.parent == env["root"] / "raw"
    assert "server_test_cart" in raw.name and summary.session_id in raw.name
    header, acqs, _ = read_ismrmrd(raw)
    assert header == env["xml"] and len(acqs) == len(env["acqs"])
    np.testing.assert_array_equal(acqs[5].data, env["acqs"][5].data)
    spec = load_chain("small", env["chains"])
    outs, res = run_chain(spec, acqs, chain_context(spec, "cpu", header_xml=header), timeout=TIMEOUT)
    assert not res.errors
    received = read_images(tmp_path / "out.h5", "g")[0].data
    np.testing.assert_allclose(np.stack([o.data for o in outs]).reshape(received.shape), received,
                               rtol=1e-5, atol=1e-7)


def test_raw_file_written_before_reconstruction_finishes(env, server):
    """Data are on disk (flushed) while the session is still open (read from this process while the
    session's process holds the file open for writing: HDF5 file locking off for the reader)."""
    import h5py
    with connect(server.port) as sock:
        sock.sendall(encode_message(ConfigFile("passthrough")) + encode_message(Header(env["xml"]))
                     + acquisition_bytes(env["acqs"][:4]))
        reader = MessageReader(socket_read_exact(sock))
        for _ in range(4):
            assert isinstance(reader.read_message(), ismrmrd.Acquisition)   # echoed: all 4 arrived
        files = sorted((env["root"] / "raw").glob("*.h5"), key=os.path.getmtime)
        with h5py.File(files[-1], "r", locking=False) as fh:
            assert len(fh["dataset/data"]) == 4
        sock.sendall(encode_message(Close()))
        msgs = read_replies(sock)
    assert msgs == [Close()]


# ---------------------------------------------------------------------------------------------
# shutdown


def test_graceful_shutdown(env, tmp_path):
    srv = ReconServer(port=0, chains_dir=env["chains"], device="cpu", max_sessions=1, read_timeout_s=10.0).start()
    port = srv.port
    stopper = None
    try:
        with connect(port) as sock:
            sock.sendall(encode_message(ConfigFile("small")) + encode_message(Header(env["xml"]))
                         + acquisition_bytes(env["acqs"][:6]))
            deadline = time.monotonic() + TIMEOUT
            while srv.active_sessions == 0 and time.monotonic() < deadline:
                time.sleep(0.02)
            stopper = threading.Thread(target=srv.shutdown, kwargs={"graceful": True, "timeout": TIMEOUT})
            stopper.start()
            while srv.accepting and time.monotonic() < deadline:
                time.sleep(0.02)
            assert not srv.accepting
            with pytest.raises(OSError):
                socket.create_connection(("127.0.0.1", port), timeout=2.0).close()
            sock.sendall(acquisition_bytes(env["acqs"][6:]) + encode_message(Close()))
            msgs = read_replies(sock)
        assert not texts_of(msgs) and isinstance(msgs[-1], Close)
        np.testing.assert_allclose(images_of(msgs), env["reference"], rtol=1e-4, atol=1e-6)
    finally:
        if stopper is None:
            srv.shutdown(graceful=False, timeout=TIMEOUT)
        else:
            stopper.join(TIMEOUT)
    assert srv.active_sessions == 0 and not stopper.is_alive()


def test_immediate_shutdown_cancels_session(env):
    srv = ReconServer(port=0, chains_dir=env["chains"], device="cpu", max_sessions=1, read_timeout_s=10.0).start()
    with connect(srv.port) as sock:
        sock.sendall(encode_message(ConfigFile("small")) + encode_message(Header(env["xml"])))
        deadline = time.monotonic() + TIMEOUT
        while srv.active_sessions == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        srv.shutdown(graceful=False, timeout=TIMEOUT)
        msgs = read_replies(sock)
    assert any("shutting down" in t for t in texts_of(msgs)) and isinstance(msgs[-1], Close)
    assert srv.active_sessions == 0
