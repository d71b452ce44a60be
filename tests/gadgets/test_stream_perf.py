"""The streaming fast paths keep the wire exact: acquisitions decoded into one wire-shaped buffer, the
echo chain sending those bytes back, replies written in ``sendmsg`` batches by the session's outbox.

Each test checks byte-for-byte agreement with :func:`encode_message` (the reference encoder) or with
what was sent, including sanitised samples and many messages per batch; the outbox's error path
ends the session's sends.
"""

from __future__ import annotations

import io
import socket
import threading

import ismrmrd
import numpy as np
import pytest

from gadgets.ismrmrd_io import scan_to_ismrmrd
from gadgets.stream.protocol import (Close, ConfigFile, ConnectionClosedError, Header, MessageReader, Text,
                                     encode_message, socket_read_exact)
from gadgets.stream.server import ReconServer
from gadgets.stream.session import _Outbox, send_buffers
from recon_core.phantoms import simulate_scan

TIMEOUT = 30.0


def _messages_to_close(raw: bytes) -> list:
    """The messages decoded from ``raw`` up to and including the server's CLOSE."""
    reader = MessageReader(io.BytesIO(raw).read)
    msgs = []
    while True:
        msgs.append(reader.read_message())
        if isinstance(msgs[-1], Close):
            return msgs


def _drain(sock: socket.socket, into: bytearray, until: int | None = None) -> threading.Thread:
    """A started thread that receives from ``sock`` into ``into`` until ``until`` bytes (or EOF)."""

    def run() -> None:
        while until is None or len(into) < until:
            chunk = sock.recv(1 << 16)
            if not chunk:
                return
            into.extend(chunk)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _acquisitions(n: int, coils: int = 4, samples: int = 64, traj_dims: int = 0, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        data = (rng.standard_normal((coils, samples))
                + 1j * rng.standard_normal((coils, samples))).astype(np.complex64)
        traj = rng.standard_normal((samples, traj_dims)).astype(np.float32) if traj_dims else None
        acq = ismrmrd.Acquisition.from_array(data, traj)
        acq.scan_counter = i
        acq.idx.kspace_encode_step_1 = i % 16
        acq.sample_time_us = 2.5
        out.append(acq)
    return out


def _header_xml(coils: int = 4) -> str:
    scan = simulate_scan("cartesian", matrix=16, n_frames=1, n_coils=coils, accel=1, acs_lines=0,
                         readout_oversampling=1)
    return scan_to_ismrmrd(scan)[0]


@pytest.mark.parametrize("traj_dims", [0, 2, 3])
def test_decoded_acquisition_is_views_of_its_exact_wire_bytes(traj_dims):
    acqs = _acquisitions(5, coils=3, samples=37, traj_dims=traj_dims)
    blob = b"".join(encode_message(a) for a in acqs)
    for source in ("bytes", "socket"):
        if source == "bytes":
            reader = MessageReader(io.BytesIO(blob).read)      # no read_into: the copy path
        else:
            a, b = socket.socketpair()
            threading.Thread(target=lambda: (a.sendall(blob), a.close()), daemon=True).start()
            reader = MessageReader(socket_read_exact(b))        # payload received into the buffer
        for ref in acqs:
            got = reader.read_message()
            assert got == ref
            acq, wire = reader.last_wire
            assert acq is got
            assert bytes(wire) == encode_message(ref)
            assert got.data.flags.writeable and got.data.flags.aligned and got.traj.flags.aligned
            # header and arrays are views of the wire bytes: changes show in them and in the encoding
            got.data[0, 0] = 7 + 1j
            got.sample_time_us = 0.0
            assert bytes(wire) == encode_message(got)
        if source == "socket":
            b.close()


def test_last_wire_is_none_for_other_messages():
    reader = MessageReader(io.BytesIO(encode_message(Text("hi")) + encode_message(_acquisitions(1)[0])).read)
    assert isinstance(reader.read_message(), Text) and reader.last_wire is None
    assert isinstance(reader.read_message(), ismrmrd.Acquisition) and reader.last_wire is not None


def test_send_buffers_many_and_partial_sends_arrive_in_order():
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)       # partial sendmsg calls
    rng = np.random.default_rng(1)
    bufs = [rng.integers(0, 256, int(rng.integers(1, 3000)), dtype=np.uint8).tobytes() for _ in range(1500)]
    bufs += [memoryview(bytearray(b"x" * 70000))[5:]]                # a view, larger than the socket buffer
    want = b"".join(bytes(x) for x in bufs)
    got = bytearray()

    t = _drain(b, got, len(want))
    send_buffers(a, bufs)
    t.join(TIMEOUT)
    assert bytes(got) == want
    a.close()
    b.close()


def test_outbox_keeps_order_across_threads_and_reports_a_gone_peer():
    a, b = socket.socketpair()
    errors: list = []
    box = _Outbox(a, limit_bytes=1 << 16, on_error=errors.append)
    msgs = [bytes([i % 251]) * (100 + i) for i in range(600)]
    got = bytearray()
    want = b"".join(msgs)

    t = _drain(b, got, len(want))
    for i, m in enumerate(msgs):         # urgent and batched puts, as chain outputs and echoed data
        box.put(m, urgent=i % 7 == 0)
    box.flush(TIMEOUT)
    t.join(TIMEOUT)
    assert bytes(got) == want and not errors
    b.close()                            # the client goes away
    with pytest.raises(ConnectionClosedError):
        for _ in range(200):
            box.put(b"z" * 60000)
            box.flush(TIMEOUT)
    assert len(errors) == 1 and isinstance(errors[0], ConnectionClosedError)
    box.close()
    a.close()


def _echo_session(port: int, payload: bytes) -> tuple[list, bytes]:
    """Send bytes and read the replies up to CLOSE; (messages, the raw bytes of the replies)."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        raw = bytearray()
        while True:
            chunk = sock.recv(1 << 16)
            if not chunk:
                break
            raw.extend(chunk)
    return _messages_to_close(bytes(raw)), bytes(raw)


def test_echo_chain_returns_the_exact_bytes_and_sanitises_in_them():
    acqs = _acquisitions(300, coils=4, samples=64, traj_dims=2)
    sent = [encode_message(a) for a in acqs]
    bad = _acquisitions(1, coils=4, samples=64, traj_dims=2, seed=5)[0]
    bad.scan_counter = 300
    bad.data[1, 3] = np.nan
    bad.traj[2, 1] = np.inf
    bad.sample_time_us = float("nan")
    clean = _acquisitions(1, coils=4, samples=64, traj_dims=2, seed=5)[0]
    clean.scan_counter = 300
    clean.data[1, 3] = 0
    clean.traj[2, 1] = 0
    clean.sample_time_us = 0.0
    payload = (encode_message(ConfigFile("passthrough")) + encode_message(Header(_header_xml()))
               + b"".join(sent) + encode_message(bad) + encode_message(Close()))
    with ReconServer(port=0, isolation="thread", access_log=False, read_timeout_s=TIMEOUT) as srv:
        msgs, raw = _echo_session(srv.port, payload)
        summary = srv.wait_for_summaries(lambda s: s.chain == "passthrough", 1, TIMEOUT)[-1]
    echoed = [m for m in msgs if isinstance(m, ismrmrd.Acquisition)]
    assert len(echoed) == 301
    # every clean acquisition comes back byte for byte, in order
    assert all(encode_message(g) == s for g, s in zip(echoed[:300], sent))
    assert b"".join(sent) in raw
    # the bad one comes back sanitised (NaN/Inf samples 0, NaN dwell time 0), with a warning TEXT
    assert encode_message(echoed[300]) == encode_message(clean)
    assert any(isinstance(m, Text) and "scan_counter 300: 2 non-finite" in m.text for m in msgs)
    assert isinstance(msgs[-1], Close)
    assert summary.acquisitions == 301 and summary.outcome == "ok" and summary.nonfinite_acquisitions == 1


def _payload(kind: str) -> bytes:
    acqs = _acquisitions(200, coils=4, samples=64, traj_dims=2)
    acqs[57].data[0, 0] = np.nan                           # sanitised (warning TEXT) mid-stream
    acqs[120].sample_time_us = float("nan")
    if kind == "channels":                                  # above --max-channels 6 after 150 clean ones
        wide = _acquisitions(1, coils=8, samples=64, traj_dims=2, seed=3)[0]
        wide.scan_counter = 150
        acqs.insert(150, wide)
    parts = [encode_message(ConfigFile("passthrough")), encode_message(Header(_header_xml()))]
    parts += [encode_message(a) for a in acqs[:100]] + [encode_message(Text("client note"))]
    parts += [encode_message(a) for a in acqs[100:]] + [encode_message(Close())]
    return b"".join(parts)


@pytest.mark.parametrize("kind", ["clean", "channels", "memory"])
def test_echo_burst_replies_equal_the_message_by_message_path(kind, monkeypatch):
    """The echo chain's in-place path (clean acquisitions already received go back undecoded) gives
    the very bytes the decoding path gives: echoes, warnings and their order, errors, CLOSE."""
    from gadgets.stream.session import Session

    payload = _payload(kind)
    limits = dict(max_channels=6) if kind == "channels" else {}
    if kind == "memory":
        limits = dict(max_session_bytes=90 * (4 * 64 * 8 + 64 * 2 * 4))    # about 90 acquisitions
    replies = {}
    for mode in ("burst", "one by one"):
        if mode == "one by one":
            monkeypatch.setattr(Session, "_echo_burst", lambda self, feeding: feeding)
        with ReconServer(port=0, isolation="thread", access_log=False, read_timeout_s=TIMEOUT,
                         **limits) as srv:
            msgs, raw = _echo_session(srv.port, payload)
            summary = srv.wait_for_summaries(lambda s: s.chain == "passthrough", 1, TIMEOUT)[-1]
        replies[mode] = (raw, summary.acquisitions, summary.bytes_received, summary.messages_sent,
                         summary.outcome, summary.errors)
        texts = [m.text for m in msgs if isinstance(m, Text)]
        assert any("non-finite" in t for t in texts) and isinstance(msgs[-1], Close)
        if kind == "clean":
            assert summary.outcome == "ok" and summary.acquisitions == 200
        elif kind == "channels":
            assert any("scan_counter 150: active_channels 8 is above this server's limit of 6" in t
                       for t in texts)
        else:
            assert any("more than" in t and "--max-session-memory" in t for t in texts)
    assert replies["burst"] == replies["one by one"]


def _trickle_session(port: int, payload: bytes, seed: int) -> tuple[list, bytes]:
    """As :func:`_echo_session`, but the payload goes out in random pieces (1 byte to 40 KB) with
    short pauses, so messages, headers and ids straddle the server's receives at random places."""
    rng = np.random.default_rng(seed)
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        raw = bytearray()

        t = _drain(sock, raw)
        pos = 0
        while pos < len(payload):
            n = int(rng.choice([1, 2, 3, 340, 341, 342, 343, int(rng.integers(1, 40000))]))
            sock.sendall(payload[pos:pos + n])
            pos += n
            if rng.random() < 0.05:
                threading.Event().wait(0.002)
        sock.shutdown(socket.SHUT_WR)
        t.join(TIMEOUT)
    return _messages_to_close(bytes(raw)), bytes(raw)


def _mixed_payload(kind: str) -> bytes:
    """Runs of different shapes (samples, channels, trajectory), clean ones and, one at a time, the
    things the echo burst must leave to the message-by-message path."""
    acqs = []
    for group, (n, coils, samples, traj) in enumerate([(40, 4, 64, 2), (1, 4, 32, 0), (30, 2, 128, 3),
                                                      (25, 4, 64, 2), (3, 1, 0, 0), (20, 4, 64, 2)]):
        acqs += _acquisitions(n, coils=coils, samples=samples, traj_dims=traj, seed=group)
    for i, a in enumerate(acqs):
        a.scan_counter = i
    acqs[10].data[3, 63] = np.inf                          # the last value of a run's message
    acqs[44].traj[0, 0] = np.nan                           # first value, in a run of another shape
    acqs[60].sample_time_us = float("inf")                 # a dwell time in the middle of a run
    acqs[70].user_float[2] = float("nan")                  # a NaN in the header outside the checked fields
    acqs[71].available_channels = 7                        # a field the burst does not compare
    wire = [encode_message(a) for a in acqs]
    if kind == "compressed":         # flag 53 (bit 52 of flags) set in the bytes: encode_message refuses it
        flagged = bytearray(wire[80])
        flags = int.from_bytes(flagged[4:12], "little") | (1 << 52)
        flagged[4:12] = flags.to_bytes(8, "little")
        wire[80] = bytes(flagged)
    parts = [encode_message(ConfigFile("passthrough")), encode_message(Header(_header_xml()))]
    parts += wire[:50] + [encode_message(Text("note"))] + wire[50:] + [encode_message(Close())]
    return b"".join(parts)


@pytest.mark.parametrize("kind, trickle", [("mixed", False), ("mixed", True), ("compressed", True)])
def test_echo_runs_of_mixed_shapes_equal_the_message_by_message_path(kind, trickle, monkeypatch):
    """Runs of several shapes, non-finite values at a run's first and last values, a non-finite
    dwell time inside a run, NaN in unchecked header fields, a compressed acquisition; sent at once or
    in random pieces: the burst's replies, counts and errors equal those of the decoding path."""
    from gadgets.stream.session import Session

    payload = _mixed_payload(kind)
    replies = {}
    for mode in ("burst", "one by one"):
        if mode == "one by one":
            monkeypatch.setattr(Session, "_echo_burst", lambda self, feeding: feeding)
        with ReconServer(port=0, isolation="thread", access_log=False, read_timeout_s=TIMEOUT) as srv:
            msgs, raw = (_trickle_session(srv.port, payload, seed=7) if trickle
                         else _echo_session(srv.port, payload))
            summary = srv.wait_for_summaries(lambda s: s.chain == "passthrough", 1, TIMEOUT)[-1]
        replies[mode] = (raw, summary.acquisitions, summary.bytes_received, summary.messages_sent,
                         summary.outcome, summary.errors, summary.nonfinite_acquisitions)
        texts = [m.text for m in msgs if isinstance(m, Text)]
        assert isinstance(msgs[-1], Close)
        if kind == "mixed":
            assert summary.outcome == "ok" and summary.acquisitions == 119
            assert summary.nonfinite_acquisitions == 2 and sum("non-finite" in t for t in texts) == 2
        else:
            assert any("compression flag 53" in t for t in texts) and summary.acquisitions == 80
    assert replies["burst"] == replies["one by one"]


def test_outbox_send_now_only_when_nothing_is_queued_and_keeps_order():
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)       # the socket takes only part at once
    errors: list = []
    box = _Outbox(a, limit_bytes=1 << 20, on_error=errors.append)
    first = memoryview(bytes(range(256)) * 64)                     # 16 KiB
    sent = box.send_now(first)
    assert 0 < sent < len(first)                                   # what the socket took, at once
    box.put(bytes(first[sent:]), urgent=False)                     # the rest, queued
    assert box.send_now(memoryview(b"late")) == 0                  # something is queued: never ahead of it
    box.put(b"late", urgent=False)
    got = bytearray()
    want = bytes(first) + b"late"

    t = _drain(b, got, len(want))
    box.flush(TIMEOUT)
    t.join(TIMEOUT)
    assert bytes(got) == want and not errors
    b.close()
    for _ in range(100):                                           # a gone peer: kept, reported once
        box.send_now(memoryview(b"x" * 4096))
        if errors:
            break
    assert len(errors) == 1 and isinstance(errors[0], ConnectionClosedError)
    with pytest.raises(ConnectionClosedError):
        box.put(b"y")
    box.close()
    a.close()
