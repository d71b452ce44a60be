"""Server hardening (issue 14) over loopback: each attack, then a normal session served correctly
while (or right after) it runs. Servers run on 127.0.0.1, port 0, with a 32² 4-coil phantom.

Finding → tests: 1 idle/trickling connections (accept phase, caps, deadlines); 2 disconnect after
CLOSE, session time limit, SIGTERM; 3 YAML alias bomb, capped texts; 4 header limits and memory
estimate; 5 paths from inline chains; 6 non-finite samples; 7 message / queue / session bytes;
8 a crashing session process; 9 chain name length, folder redaction, client exit code, NaN dwell
time logged once, one access line per session.
"""

from __future__ import annotations

import io
import os
import queue
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import tracemalloc
from pathlib import Path

import ismrmrd
import ismrmrd.xsd
import numpy as np
import pytest

from gadgets.base import Gadget, GadgetParams
from gadgets.ismrmrd_io import read_ismrmrd, scan_to_ismrmrd, write_ismrmrd
from gadgets.stream.chain import chain_context, load_chain, parse_chain_text
from gadgets.base import ChainError
from gadgets.stream.client import run_client
from gadgets.stream.protocol import (Close, ConfigFile, ConfigText, Header, MessageReader, ProtocolLimits,
                                     Query, Response, Text, encode_message, socket_read_exact)
from gadgets.stream.runner import ByteBoundedQueue, run_chain
from gadgets.stream.server import ReconServer
from recon_core.phantoms import simulate_scan

TIMEOUT = 60.0
SMALL_CHAIN = """\
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
#: an inline chain whose reconstruction runs for minutes unless stopped (the issue's attack)
LONG_CHAIN = ("chain:\n  - gadget: noise\n  - gadget: remove_oversampling\n  - gadget: buffer\n"
              "  - gadget: coil_estimate\n  - gadget: recon\n"
              "    params: {method: tdip, n_steps: 50000, channels: 4}\n  - gadget: image_export\n")
CRASH_CHAIN = "chain:\n  - gadget: crash_test\n  - gadget: image_export\n"


class CrashParams(GadgetParams):
    pass


class CrashGadget(Gadget):
    """Test-only gadget: kills its own process (a native crash / OOM kill, as far as the server sees)."""

    name = "crash_test"
    Params = CrashParams
    accepts = (ismrmrd.Acquisition,)

    def process(self, msg):
        os.kill(os.getpid(), signal.SIGKILL)
        yield msg


# ---------------------------------------------------------------------------------------------
# fixtures and helpers


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("harden")
    chains = root / "chains"
    chains.mkdir()
    (chains / "small.yaml").write_text(SMALL_CHAIN)
    (chains / "crash.yaml").write_text(CRASH_CHAIN)
    scan = simulate_scan("cartesian", matrix=32, n_frames=1, n_coils=4, accel=2, acs_lines=12)
    xml, acqs = scan_to_ismrmrd(scan, protocol_name="harden", measurement_id="1_2_3_4")
    data = root / "in.h5"
    write_ismrmrd(data, xml, acqs)
    spec = load_chain("small", chains)
    ctx = chain_context(spec, "cpu", header_xml=xml)
    outs, res = run_chain(spec, read_ismrmrd(data)[1], ctx, timeout=TIMEOUT)
    assert not res.errors, res.errors
    return {"root": root, "chains": chains, "xml": xml, "acqs": acqs, "data": data,
            "reference": np.stack([np.asarray(o.data) for o in outs])}


@pytest.fixture(scope="module")
def server(env):
    srv = ReconServer(port=0, chains_dir=env["chains"], device="cpu", max_sessions=2, read_timeout_s=10.0,
                      handshake_timeout_s=3.0, max_pending_per_peer=400, max_pending=1000,
                      gadgets={"crash_test": f"{__name__}:CrashGadget"}).start()
    yield srv
    srv.shutdown(graceful=False, timeout=TIMEOUT)


def connect(port: int, timeout: float = TIMEOUT) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.settimeout(timeout)
    return sock


def read_replies(sock: socket.socket) -> list:
    reader = MessageReader(socket_read_exact(sock))
    msgs = []
    while True:
        msg = reader.read_message()
        msgs.append(msg)
        if isinstance(msg, Close):
            return msgs


def raw_session(port: int, payload: bytes) -> list:
    with connect(port) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        return read_replies(sock)


def begin(config, xml: str) -> bytes:
    """CONFIG (file or text) + HEADER on the wire."""
    return encode_message(config) + encode_message(Header(xml))


def acq_bytes(acqs) -> bytes:
    return b"".join(encode_message(a) for a in acqs)


def texts_of(msgs) -> list[str]:
    return [m.text for m in msgs if isinstance(m, Text) and not m.text.startswith("[server] INFO:")]


def images_of(msgs) -> np.ndarray:
    return np.stack([np.asarray(m.data) for m in msgs if isinstance(m, ismrmrd.Image)])


def normal_session(env, port: int) -> None:
    """A full session over the wire: images equal to the offline chain's, no error, CLOSE last."""
    msgs = raw_session(port, begin(ConfigFile("small"), env["xml"])
                       + acq_bytes(env["acqs"]) + encode_message(Close()))
    assert isinstance(msgs[-1], Close) and not texts_of(msgs), texts_of(msgs)
    np.testing.assert_allclose(images_of(msgs), env["reference"], rtol=1e-4, atol=1e-6)


def header_with(xml: str, **changes) -> str:
    """The header with ``encodedSpace``/``receiverChannels`` fields replaced (no schema check)."""
    hdr = ismrmrd.xsd.CreateFromDocument(xml)
    enc = hdr.encoding[0]
    for key, value in changes.items():
        if key == "channels":
            hdr.acquisitionSystemInformation.receiverChannels = value
        elif key.startswith("enc_"):
            setattr(enc.encodedSpace.matrixSize, key[4:], value)
        elif key.startswith("lim_"):
            getattr(enc.encodingLimits, key[4:]).maximum = value
    return ismrmrd.xsd.ToXML(hdr)


def wait_for(predicate, timeout: float = TIMEOUT, step: float = 0.05) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


# ---------------------------------------------------------------------------------------------
# 3: YAML alias bomb; capped error texts


def alias_bomb(levels: int = 9) -> str:
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]")
    lines.append("chain:\n  - gadget: recon\n    params: {method: cg_sense, max_iter: *a%d}" % (levels - 1))
    return "\n".join(lines) + "\n"


def test_alias_bomb_refused_before_expansion():
    text = alias_bomb()
    assert len(text) < 2500              # ~2 KB on the wire, 9**9 strings once expanded
    tracemalloc.start()
    try:
        with pytest.raises(ChainError, match="anchors and aliases"):
            parse_chain_text(text)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 5 << 20, peak


def test_alias_bomb_over_the_wire_then_normal_session(env, server):
    t0 = time.monotonic()
    msgs = raw_session(server.port, begin(ConfigText(alias_bomb()), env["xml"])
                       + encode_message(Close()))
    texts = texts_of(msgs)
    assert time.monotonic() - t0 < 20 and isinstance(msgs[-1], Close)
    assert len(texts) == 1 and "anchors and aliases" in texts[0] and len(texts[0]) < 1000
    normal_session(env, server.port)


def test_error_text_capped(env, server):
    """A parameter of the wrong type whose value is 200 kB: the TEXT quoting it stays bounded."""
    chain = "chain:\n  - gadget: recon\n    params: {method: cg_sense, max_iter: '" + "x" * 200_000 + "'}\n"
    msgs = raw_session(server.port, begin(ConfigText(chain), env["xml"])
                       + encode_message(Close()))
    texts = texts_of(msgs)
    assert texts and all(len(t) <= 4000 for t in texts) and "max_iter" in texts[0]
    assert "characters cut" in texts[0]


# ---------------------------------------------------------------------------------------------
# 9: chain names, folder redaction, client exit code, logging


def test_long_chain_name_and_no_folder_in_errors(env, server):
    msgs = raw_session(server.port, begin(ConfigFile("a" * 600), env["xml"])
                       + encode_message(Close()))
    texts = texts_of(msgs)
    assert len(texts) == 1 and "too long" in texts[0] and "internal error" not in texts[0]
    msgs = raw_session(server.port, begin(ConfigFile("no_such_chain"), env["xml"])
                       + encode_message(Close()))
    text = texts_of(msgs)[0]
    assert "no_such_chain" in text and "small" in text           # names the chain and lists the available
    assert str(env["chains"]) not in text and str(env["chains"].resolve()) not in text
    assert str(env["root"]) not in text
    normal_session(env, server.port)


def test_client_exit_code_on_error_without_images(env, server, tmp_path):
    buf = io.StringIO()
    rc = run_client("127.0.0.1", server.port, str(env["data"]), outfile=str(tmp_path / "o.h5"), config="nope",
                    out=buf, err=buf, read_timeout_s=TIMEOUT)
    assert rc == 1 and "ERROR" in buf.getvalue() and "sent no images" in buf.getvalue()
    rc = run_client("127.0.0.1", server.port, str(env["data"]), outfile=str(tmp_path / "ok.h5"),
                    config="small", out=buf, err=buf, read_timeout_s=TIMEOUT)
    assert rc == 0, buf.getvalue()


def test_nan_dwell_logged_once_and_one_access_line(env, caplog):
    """Thread sessions (their log records reach caplog): a NaN ``sample_time_us`` on every acquisition
    gives one warning line; each session gives exactly one access line with peer, chain, images,
    seconds and outcome."""
    acqs = [ismrmrd.Acquisition.deserialize_from(io.BytesIO(encode_message(a)[2:]).read) for a in env["acqs"]]
    for a in acqs:
        a.sample_time_us = float("nan")
    import logging

    access: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: access.append(record.getMessage())    # type: ignore[method-assign]
    logging.getLogger("torchgadgets.access").addHandler(handler)
    srv = ReconServer(port=0, chains_dir=env["chains"], device="cpu", max_sessions=1,
                      isolation="thread").start()
    try:
        with caplog.at_level("INFO", logger="torchgadgets"):
            msgs = raw_session(srv.port, begin(ConfigFile("small"), env["xml"])
                               + acq_bytes(acqs) + encode_message(Close()))
            raw_session(srv.port, encode_message(Query(1, "torchgadgets::version")) + encode_message(Close()))
            assert wait_for(lambda: len(srv.summaries) == 2)
    finally:
        srv.shutdown(graceful=False, timeout=TIMEOUT)
        logging.getLogger("torchgadgets.access").removeHandler(handler)
    assert isinstance(msgs[-1], Close) and np.isfinite(images_of(msgs)).all()
    dwell = [r for r in caplog.records if "sample_time_us" in r.getMessage()]
    assert len(dwell) == 1, [r.getMessage() for r in dwell]
    assert len(access) == 2, access
    assert "peer 127.0.0.1:" in access[0] and "chain small" in access[0] and "images 1" in access[0]
    assert "seconds" in access[0] and "outcome ok" in access[0] and "kind query" in access[1]


# ---------------------------------------------------------------------------------------------
# 6: non-finite samples


def test_one_inf_sample_is_zeroed_with_a_warning(env, server):
    acqs = [ismrmrd.Acquisition.deserialize_from(io.BytesIO(encode_message(a)[2:]).read) for a in env["acqs"]]
    imaging = [i for i, a in enumerate(acqs) if not a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)]
    k = imaging[len(imaging) // 2]
    payload = begin(ConfigFile("small"), env["xml"])
    acqs[k].data[1, 7] = np.inf
    payload += acq_bytes(acqs) + encode_message(Close())
    msgs = raw_session(server.port, payload)
    texts = texts_of(msgs)
    assert len(texts) == 1 and "WARNING" in texts[0] and f"scan_counter {acqs[k].scan_counter}" in texts[0]
    received = images_of(msgs)
    assert np.isfinite(received).all()
    # the offline chain on the same data with that sample set to 0 gives the same images
    acqs[k].data[1, 7] = 0
    spec = load_chain("small", env["chains"])
    fresh = [ismrmrd.Acquisition.deserialize_from(io.BytesIO(encode_message(a)[2:]).read) for a in acqs]
    outs, res = run_chain(spec, fresh, chain_context(spec, "cpu", header_xml=env["xml"]), timeout=TIMEOUT)
    np.testing.assert_allclose(received, np.stack([np.asarray(o.data) for o in outs]), rtol=1e-4, atol=1e-6)
    normal_session(env, server.port)


# ---------------------------------------------------------------------------------------------
# 4: header-driven allocation


@pytest.mark.parametrize("changes, needle", [
    ({"enc_y": 100000},
     "encoding[0]/encodedSpace/matrixSize/y is 100000, outside the schema type unsignedShort"),
    ({"enc_x": 10000, "enc_y": 10000},
     "encoding[0]/encodedSpace/matrixSize/x is 10000, above this server's limit"),
    ({"lim_phase": 70000}, "encoding[0]/encodingLimits/phase/maximum is 70000"),
    ({"channels": 5000}, "receiverChannels is 5000, above this server's limit of 256"),
    ({"enc_x": 1024, "enc_y": 1024, "channels": 128, "lim_phase": 63}, "memory limit per session"),
])
def test_header_limits(env, server, changes, needle):
    t0 = time.monotonic()
    msgs = raw_session(server.port, begin(ConfigFile("small"), header_with(env["xml"], **changes))
                       + acq_bytes(env["acqs"][:3]) + encode_message(Close()))
    texts = texts_of(msgs)
    assert len(texts) == 1 and needle in texts[0], texts
    assert time.monotonic() - t0 < 20 and isinstance(msgs[-1], Close)


def test_header_limits_then_normal_session(env, server):
    normal_session(env, server.port)


# ---------------------------------------------------------------------------------------------
# 5: paths from the network


@pytest.mark.parametrize("params, key", [
    ("{png: %s/evil.png}", "png"), ("{gif: %s/evil.gif}", "gif"), ("{dicom_dir: %s/dicom}", "dicom_dir"),
])
def test_inline_chain_may_not_write_files(env, server, tmp_path, params, key):
    target = tmp_path / "written_by_client"
    chain = SMALL_CHAIN.replace("  - gadget: image_export\n",
                                "  - gadget: image_export\n    params: " + params % target + "\n")
    msgs = raw_session(server.port, begin(ConfigText(chain), env["xml"])
                       + acq_bytes(env["acqs"]) + encode_message(Close()))
    texts = texts_of(msgs)
    assert len(texts) == 1 and key in texts[0] and "network" in texts[0]
    assert not target.exists()


def test_inline_chain_may_not_choose_noise_folder(env, server, tmp_path):
    target = tmp_path / "noise_by_client"
    chain = SMALL_CHAIN.replace("  - gadget: noise\n",
                                f"  - gadget: noise\n    params: {{store_dir: {target}}}\n")
    msgs = raw_session(server.port, begin(ConfigText(chain), env["xml"])
                       + acq_bytes(env["acqs"]) + encode_message(Close()))
    assert "store_dir" in texts_of(msgs)[0] and not target.exists()
    # the same chain without the folder is served (inline chains: the safe subset)
    msgs = raw_session(server.port, begin(ConfigText(SMALL_CHAIN), env["xml"])
                       + acq_bytes(env["acqs"]) + encode_message(Close()))
    np.testing.assert_allclose(images_of(msgs), env["reference"], rtol=1e-4, atol=1e-6)


def test_inline_chains_off(env):
    srv = ReconServer(port=0, chains_dir=env["chains"], device="cpu", max_sessions=1,
                      inline_chains="off").start()
    try:
        msgs = raw_session(srv.port, begin(ConfigText(SMALL_CHAIN), env["xml"])
                           + acq_bytes(env["acqs"]) + encode_message(Close()))
        assert "does not accept chains sent inline" in texts_of(msgs)[0]
        normal_session(env, srv.port)
    finally:
        srv.shutdown(graceful=False, timeout=TIMEOUT)


# ---------------------------------------------------------------------------------------------
# 1: idle and slow connections


def test_normal_session_while_hundreds_of_idle_and_trickling_connections(env, server):
    idle = [connect(server.port) for _ in range(300)]
    stop = threading.Event()
    payload = begin(ConfigFile("small"), env["xml"])

    def trickle() -> None:     # slowloris: one byte of a valid session every 0.2 s
        with connect(server.port) as s:
            for b in payload:
                if stop.is_set():
                    return
                try:
                    s.send(bytes([b]))
                except OSError:
                    return
                time.sleep(0.2)

    slow = [threading.Thread(target=trickle, daemon=True) for _ in range(4)]
    for t in slow:
        t.start()
    try:
        t0 = time.monotonic()
        normal_session(env, server.port)
        normal_session(env, server.port)
        assert time.monotonic() - t0 < 40
        # idle connections are answered TEXT + CLOSE once the handshake deadline (3 s) has passed
        assert wait_for(lambda: server.dropped["handshake timeout"] >= 300, 20), server.dropped
        for s in idle[:5]:
            msgs = read_replies(s)
            assert "no config and ISMRMRD header within 3 s" in msgs[0].text and isinstance(msgs[-1], Close)
    finally:
        stop.set()
        for s in idle:
            s.close()
        for t in slow:
            t.join(5)


def test_query_answered_before_close_in_the_accept_phase(env, server):
    """A client that waits for its RESPONSE before sending CLOSE is answered at once."""
    with connect(server.port) as s:
        s.sendall(encode_message(Query(42, "torchgadgets::device")))
        reader = MessageReader(socket_read_exact(s))
        s.settimeout(10)                  # answered by the accept thread: no session process needed
        answer = reader.read_message()
        s.settimeout(TIMEOUT)
        assert answer == Response(42, "cpu")
        s.sendall(encode_message(Close()))
        assert isinstance(reader.read_message(), Close)


def test_cap_per_peer_drops_the_oldest(env):
    srv = ReconServer(port=0, chains_dir=env["chains"], device="cpu", max_sessions=1, max_pending_per_peer=20,
                      handshake_timeout_s=60.0).start()
    try:
        first = [connect(srv.port) for _ in range(10)]
        time.sleep(0.3)
        later = [connect(srv.port) for _ in range(20)]
        for s in first:               # the 10 oldest are dropped with TEXT + CLOSE, at once
            msgs = read_replies(s)
            assert "too many connections from 127.0.0.1" in msgs[0].text and isinstance(msgs[-1], Close)
        normal_session(env, srv.port)   # a new client is always read
        for s in first + later:
            s.close()
    finally:
        srv.shutdown(graceful=False, timeout=TIMEOUT)


@pytest.mark.parametrize("read_timeout, session_timeout, needle", [
    (5.0, 4.0, b"session time limit of 4 s"),          # the session deadline
    (3.0, None, b"no complete message within 3 s"),    # the read timeout bounds a whole message
])
def test_trickling_data_phase_ends_at_a_deadline(env, read_timeout, session_timeout, needle):
    """1 byte every 0.5 s after a valid header: each recv is quick, but a deadline ends the session."""
    srv = ReconServer(port=0, chains_dir=env["chains"], device="cpu", max_sessions=1,
                      read_timeout_s=read_timeout, session_timeout_s=session_timeout).start()
    try:
        with connect(srv.port) as s:
            s.sendall(begin(ConfigFile("small"), env["xml"]))
            data = acq_bytes(env["acqs"])
            t0 = time.monotonic()
            s.settimeout(0.5)
            got = b""
            for b in data:
                try:
                    s.send(bytes([b]))
                except OSError:
                    break
                try:
                    got += s.recv(1 << 16)
                    if got:
                        break
                except socket.timeout:
                    pass
            s.settimeout(TIMEOUT)
            rest = got
            while True:
                chunk = s.recv(1 << 16)
                if not chunk:
                    break
                rest += chunk
            elapsed = time.monotonic() - t0
        assert needle in rest and elapsed < 15, rest[-300:]
        normal_session(env, srv.port)
    finally:
        srv.shutdown(graceful=False, timeout=TIMEOUT)


# ---------------------------------------------------------------------------------------------
# 2: disconnect after CLOSE, session time limit, SIGTERM


def test_client_disconnect_after_close_cancels_the_reconstruction(env, server):
    normal_session(env, server.port)       # session processes are warm
    assert wait_for(lambda: server.active_sessions == 0)
    before = len(server.summaries)
    s = connect(server.port)
    s.sendall(begin(ConfigText(LONG_CHAIN), env["xml"]) + acq_bytes(env["acqs"])
              + encode_message(Close()))
    assert wait_for(lambda: server.active_sessions >= 1, 10)
    time.sleep(1.0)
    s.close()                      # gone while its (minutes long) reconstruction runs
    t0 = time.monotonic()
    assert wait_for(lambda: len(server.summaries) > before, 40)
    assert time.monotonic() - t0 < 30     # detected ~2 s after the close; the fit stops at its next step
    summary = server.summaries[-1]
    assert summary.outcome == "client gone" and summary.images_sent == 0, summary
    normal_session(env, server.port)


def test_session_time_limit_stops_a_long_reconstruction(env):
    srv = ReconServer(port=0, chains_dir=env["chains"], device="cpu", max_sessions=1,
                      session_timeout_s=5.0).start()
    try:
        t0 = time.monotonic()
        with connect(srv.port) as s:     # stays connected and reading
            s.sendall(begin(ConfigText(LONG_CHAIN), env["xml"])
                      + acq_bytes(env["acqs"]) + encode_message(Close()))
            msgs = read_replies(s)
        assert time.monotonic() - t0 < 20
        assert any("session time limit of 5 s" in t for t in texts_of(msgs)) and isinstance(msgs[-1], Close)
        normal_session(env, srv.port)
    finally:
        srv.shutdown(graceful=False, timeout=TIMEOUT)


SERVE_SCRIPT = textwrap.dedent("""
    import sys
    from gadgets.stream.server import ReconServer, install_signal_handlers
    srv = ReconServer(port=0, chains_dir=sys.argv[1], device="cpu", max_sessions=1, shutdown_grace_s=2.0)
    install_signal_handlers(srv)
    srv._bind()
    print(srv.port, flush=True)
    srv.serve_forever()
""")


def test_sigterm_finishes_within_a_bounded_time(env):
    proc = subprocess.Popen([sys.executable, "-c", SERVE_SCRIPT, str(env["chains"])], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        port = int(proc.stdout.readline())
        with connect(port) as s:
            s.sendall(begin(ConfigText(LONG_CHAIN), env["xml"])
                      + acq_bytes(env["acqs"]) + encode_message(Close()))
            time.sleep(3.0)               # the reconstruction is running
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            msgs = read_replies(s)
        assert proc.wait(30) == 0
        assert time.monotonic() - t0 < 25
        assert any("shutting down" in t for t in texts_of(msgs)) and isinstance(msgs[-1], Close)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


# ---------------------------------------------------------------------------------------------
# 7: bytes: messages, queues, sessions


def _vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_big_image_message_bounded_memory():
    """Reading a 64 MiB IMAGE costs about twice its size (payload + the image), not 3-4x."""
    img = ismrmrd.Image.from_array(np.ones((1, 1024, 4096, 4), np.float32))   # 64 MiB of pixels
    wire = encode_message(img)
    a, b = socket.socketpair()
    sender = threading.Thread(target=lambda: (a.sendall(wire), a.close()), daemon=True)
    sender.start()
    del img
    tracemalloc.start()
    try:
        msg = MessageReader(socket_read_exact(b), ProtocolLimits()).read_message()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        b.close()
    sender.join(10)
    assert isinstance(msg, ismrmrd.Image) and msg.data.nbytes == 64 << 20
    assert peak < 2.3 * (64 << 20), peak / (64 << 20)


def test_image_above_the_limit_refused_without_reading(env, server):
    head = ismrmrd.ImageHeader()
    head.data_type = 5
    head.matrix_size[:] = (16384, 16384, 1)
    head.channels = 1        # 1 GiB claimed; nothing of it is sent
    payload = begin(ConfigFile("small"), env["xml"]) + \
        (1022).to_bytes(2, "little") + bytes(head) + (0).to_bytes(8, "little")
    msgs = raw_session(server.port, payload)
    assert "above the limit" in texts_of(msgs)[0] and isinstance(msgs[-1], Close)


def test_session_data_budget(env):
    srv = ReconServer(port=0, chains_dir=env["chains"], device="cpu", max_sessions=1,
                      max_session_bytes=600 << 10).start()
    try:
        many = env["acqs"] * 40       # 1.4 MB of samples; the header's estimate is ~0.3 MB
        msgs = raw_session(srv.port, begin(ConfigFile("small"), env["xml"])
                           + acq_bytes(many) + encode_message(Close()))
        assert any("--max-session-memory" in t for t in texts_of(msgs)) and isinstance(msgs[-1], Close)
        normal_session(env, srv.port)
    finally:
        srv.shutdown(graceful=False, timeout=TIMEOUT)


def test_byte_bounded_queue():
    q = ByteBoundedQueue(maxsize=100, maxbytes=2 << 20)
    mib = np.zeros(1 << 20, np.uint8)
    q.put(mib, timeout=0.1)
    q.put(mib, timeout=0.1)
    with pytest.raises(queue.Full):
        q.put(mib, timeout=0.1)                 # 3 MiB > 2 MiB
    assert q.nbytes == 2 << 20 and q.qsize() == 2
    q.get(timeout=0.1)
    q.get(timeout=0.1)
    q.put(np.zeros(8 << 20, np.uint8), timeout=0.1)   # an empty queue takes any one message
    with pytest.raises(queue.Full):
        q.put(np.zeros(1, np.uint8), timeout=0.1)
    assert q.get(timeout=0.1).nbytes == 8 << 20
    with pytest.raises(queue.Empty):
        q.get(timeout=0.05)


def test_server_rss_bounded_under_idle_and_big_messages(env):
    """A server process (sessions in threads, so the server's own memory is what is measured): 200
    idle connections and 5 IMAGE messages claiming 1 GiB each leave its peak RSS within 300 MiB of
    what it had after one normal session."""
    script = textwrap.dedent("""
        import sys
        from gadgets.stream.server import ReconServer
        srv = ReconServer(port=0, chains_dir=sys.argv[1], device="cpu", max_sessions=1, isolation="thread",
                          handshake_timeout_s=3.0)
        srv._bind()
        print(srv.port, flush=True)
        srv.serve_forever()
    """)
    proc = subprocess.Popen([sys.executable, "-c", script, str(env["chains"])], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        port = int(proc.stdout.readline())
        normal_session(env, port)
        base = _vm_hwm_kib(proc.pid)
        idle = [connect(port) for _ in range(200)]
        head = ismrmrd.ImageHeader()
        head.data_type = 5
        head.matrix_size[:] = (16384, 16384, 1)
        head.channels = 1
        for _ in range(5):
            msgs = raw_session(port, begin(ConfigFile("small"), env["xml"])
                               + (1022).to_bytes(2, "little") + bytes(head) + (0).to_bytes(8, "little"))
            assert isinstance(msgs[-1], Close)
        normal_session(env, port)
        peak = _vm_hwm_kib(proc.pid)
        for s in idle:
            s.close()
        assert peak - base < 300 * 1024, (base, peak)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()


# ---------------------------------------------------------------------------------------------
# 8: session isolation


def test_crashing_session_costs_only_itself(env, server, tmp_path):
    results: dict = {}

    def normal() -> None:
        buf = io.StringIO()
        results["rc"] = run_client("127.0.0.1", server.port, str(env["data"]), outfile=str(tmp_path / "n.h5"),
                                   out_group="g", config="small", out=buf, err=buf, read_timeout_s=TIMEOUT)
        results["text"] = buf.getvalue()

    t = threading.Thread(target=normal)
    t.start()
    msgs = raw_session(server.port, begin(ConfigFile("crash"), env["xml"])
                       + acq_bytes(env["acqs"]) + encode_message(Close()))
    t.join(TIMEOUT)
    texts = texts_of(msgs)
    assert any("worker process ended abnormally (signal 9 (SIGKILL))" in x for x in texts), texts
    assert isinstance(msgs[-1], Close)
    assert results.get("rc") == 0, results
    from gadgets.stream.h5out import read_images

    series = read_images(tmp_path / "n.h5", "g")
    got = np.stack([x for s in series.values() for x in s.data]).reshape(env["reference"].shape)
    np.testing.assert_allclose(got, env["reference"], rtol=1e-4, atol=1e-6)
    normal_session(env, server.port)
