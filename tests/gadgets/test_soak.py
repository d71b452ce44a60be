"""Soak test (issue 14): for a bounded time, a mix of normal, idle, trickling, malformed and
disconnecting clients against one server; every normal session must be served correctly, every
malformed one answered TEXT + CLOSE, and the server must end with no session left running.
"""

from __future__ import annotations

import random
import socket
import threading
import time

import ismrmrd
import numpy as np
import pytest

from gadgets.ismrmrd_io import scan_to_ismrmrd
from gadgets.stream.chain import chain_context, parse_chain_text
from gadgets.stream.protocol import (Close, ConfigFile, Header, MessageReader, Text, encode_message,
                                     socket_read_exact)
from gadgets.stream.runner import run_chain
from gadgets.stream.server import ReconServer
from recon_core.phantoms import simulate_scan

SOAK_S = 20.0           # how long the attackers run
TIMEOUT = 60.0
CHAIN = """\
chain:
  - gadget: noise
  - gadget: remove_oversampling
  - gadget: buffer
  - gadget: coil_estimate
    params: {method: walsh}
  - gadget: recon
    params: {method: cg_sense, max_iter: 3}
  - gadget: image_export
"""


@pytest.fixture(scope="module")
def soak_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("soak")
    chains = root / "chains"
    chains.mkdir()
    (chains / "small.yaml").write_text(CHAIN)
    scan = simulate_scan("cartesian", matrix=32, n_frames=1, n_coils=4, accel=2, acs_lines=12)
    xml, acqs = scan_to_ismrmrd(scan, protocol_name="soak", measurement_id="5_6_7_8")
    wire = [encode_message(a) for a in acqs]
    spec = parse_chain_text(CHAIN, "small.yaml")
    fresh = [ismrmrd.Acquisition.deserialize_from(_reader(w[2:])) for w in wire]
    outs, res = run_chain(spec, fresh, chain_context(spec, "cpu", header_xml=xml), timeout=TIMEOUT)
    assert not res.errors
    reference = np.stack([np.asarray(o.data) for o in outs])
    return {"chains": chains, "xml": xml, "wire": wire, "reference": reference}


def _reader(data: bytes):
    pos = [0]

    def read(n: int) -> bytes:
        chunk = data[pos[0]:pos[0] + n]
        pos[0] += n
        return chunk

    return read


def _replies(sock: socket.socket) -> list:
    reader = MessageReader(socket_read_exact(sock))
    out = []
    while True:
        msg = reader.read_message()
        out.append(msg)
        if isinstance(msg, Close):
            return out


def test_soak_mixed_clients(soak_env):
    env = soak_env
    srv = ReconServer(port=0, chains_dir=env["chains"], device="cpu", max_sessions=2, read_timeout_s=5.0,
                      handshake_timeout_s=3.0, session_timeout_s=30.0, max_pending_per_peer=300).start()
    stop = threading.Event()
    failures: list[str] = []
    counts = {"normal": 0, "malformed": 0, "disconnect": 0, "trickle": 0}
    lock = threading.Lock()
    session = encode_message(ConfigFile("small")) + encode_message(Header(env["xml"]))
    full = session + b"".join(env["wire"]) + encode_message(Close())
    rng = random.Random(14)
    garbage = [
        (999).to_bytes(2, "little") + b"\0" * 8,                                   # unknown id
        (3).to_bytes(2, "little") + (1 << 31).to_bytes(4, "little"),               # header over the limit
        encode_message(Header(env["xml"])),                                        # header before config
        session + b"\x00",                                                         # truncated id
        encode_message(ConfigFile("small")) + encode_message(Header("<not-xml")),  # bad header
        session + env["wire"][3][:100],                                            # truncated acquisition
        bytes(rng.getrandbits(8) for _ in range(300)),                             # noise
    ]

    def record(kind: str, ok: bool, what: str = "") -> None:
        with lock:
            counts[kind] += ok
            if not ok:
                failures.append(f"{kind}: {what}")

    def normal() -> None:
        while not stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", srv.port), timeout=TIMEOUT) as s:
                    s.settimeout(TIMEOUT)
                    s.sendall(full)
                    msgs = _replies(s)
                images = np.stack([np.asarray(m.data) for m in msgs if isinstance(m, ismrmrd.Image)])
                texts = [m.text for m in msgs if isinstance(m, Text) and "ERROR" in m.text]
                ok = not texts and np.allclose(images, env["reference"], rtol=1e-4, atol=1e-6)
                record("normal", ok, str(texts))
            except Exception as exc:  # noqa: BLE001 - any failure of a normal session is a finding
                record("normal", False, repr(exc))

    def malformed() -> None:
        i = 0
        while not stop.is_set():
            payload = garbage[i % len(garbage)]
            i += 1
            try:
                with socket.create_connection(("127.0.0.1", srv.port), timeout=TIMEOUT) as s:
                    s.settimeout(TIMEOUT)
                    s.sendall(payload)
                    s.shutdown(socket.SHUT_WR)
                    msgs = _replies(s)
                error = any(isinstance(m, Text) and "ERROR" in m.text for m in msgs)
                ok = isinstance(msgs[-1], Close) and error
                record("malformed", ok, f"payload {i % len(garbage)}: {msgs[-3:]}")
            except Exception as exc:  # noqa: BLE001
                record("malformed", False, f"payload {(i - 1) % len(garbage)}: {exc!r}")
            time.sleep(0.1)

    def disconnecting() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            cut = full if i % 2 else full[:len(full) // 2]      # after CLOSE, or mid-stream
            try:
                with socket.create_connection(("127.0.0.1", srv.port), timeout=TIMEOUT) as s:
                    s.sendall(cut)
                record("disconnect", True)
            except OSError as exc:
                record("disconnect", False, repr(exc))
            time.sleep(0.3)

    def trickle() -> None:
        while not stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", srv.port), timeout=TIMEOUT) as s:
                    for b in session:
                        if stop.is_set():
                            break
                        s.send(bytes([b]))
                        time.sleep(0.25)
                record("trickle", True)
            except OSError:
                record("trickle", True)      # dropped by the server at its handshake deadline: intended

    idle = [socket.create_connection(("127.0.0.1", srv.port), timeout=TIMEOUT) for _ in range(150)]
    threads = [threading.Thread(target=f, daemon=True) for f in
               (normal, normal, malformed, malformed, disconnecting, trickle, trickle, trickle)]
    t0 = time.monotonic()
    try:
        for t in threads:
            t.start()
        time.sleep(SOAK_S)
    finally:
        stop.set()
        for t in threads:
            t.join(TIMEOUT)
        for s in idle:
            s.close()
    try:
        assert not failures, failures[:5]
        assert counts["normal"] >= 4 and counts["malformed"] >= 3 and counts["disconnect"] >= 5, counts
        deadline = time.monotonic() + TIMEOUT
        while srv.active_sessions and time.monotonic() < deadline:
            time.sleep(0.1)
        assert srv.active_sessions == 0
        assert srv.dropped["handshake timeout"] >= 150
        assert time.monotonic() - t0 < SOAK_S + TIMEOUT
    finally:
        srv.shutdown(graceful=False, timeout=TIMEOUT)
