"""Streaming benchmark: ingest throughput and CLOSE→last-image latency of the server (loopback).

``python -m bench.stream [--acquisitions N --samples S --coils C --matrix M --repeats R]``

Rows:

* **ingest, passthrough** — a client sends CONFIG ``passthrough`` + header + N acquisitions + CLOSE
  (the acquisitions in one ``sendall``, as the reference sends its bytes) while a reader thread
  takes the echo until the server's CLOSE; MB/s (bytes sent / wall time) and acquisitions/s.
  The reader is as cheap as the reference's: it receives into one buffer (``recv_into``, 1 MiB a
  call, the buffer reused across runs) and finds message boundaries from the size fields (id,
  samples × channels × trajectory of an acquisition, lengths of TEXT / RESPONSE / image) without
  building objects. After the clock stops it checks that every acquisition came back, byte for byte,
  followed by CLOSE (a mismatch fails the run).
* **ingest passthrough, streaming** — the same session, timed from the first acquisition sent to the
  server's CLOSE, once the session is up (the client sends a QUERY after the header and waits for
  its RESPONSE, which the session process answers): the streaming rate itself, comparable with the
  raw socket echo, without the session's start-up.
* **session start** — connect to that RESPONSE: accept phase, session process, header check and
  chain set-up (the difference between the two ingest rows).
* **raw socket echo** (reference) — the same bytes through a plain loopback socket echoed by a
  thread in the same process (no parsing, no chain): the best the transport can do here.
* **default chain latency** — a phantom (``simulate_scan`` Cartesian, no readout oversampling) sent
  to the ``default`` chain; time from our CLOSE to the server's CLOSE (the last image is just
  before it), against the raw socket echo of the same bytes.

Every number is the median over ``--repeats`` runs; ratios are server / reference.
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import platform
import socket
import statistics
import struct
import sys
import threading
import time
from typing import Callable, Optional

import ismrmrd
import numpy as np

from gadgets.stream.protocol import (ACQUISITION_HEADER_SIZE, IMAGE_HEADER_SIZE, Close, ConfigFile,
                                     ConnectionClosedError, Header, MessageId, Query, encode_message)
from gadgets.stream.server import ReconServer


def _synthetic(n: int, samples: int, coils: int) -> tuple[str, list[bytes]]:
    from gadgets.ismrmrd_io import scan_to_ismrmrd
    from recon_core.phantoms import simulate_scan

    scan = simulate_scan("cartesian", matrix=32, n_frames=1, n_coils=coils, accel=1, acs_lines=0,
                         readout_oversampling=1)
    xml, _ = scan_to_ismrmrd(scan)
    rng = np.random.default_rng(0)
    msgs = []
    for i in range(n):
        acq = ismrmrd.Acquisition.from_array(
            (rng.standard_normal((coils, samples)) + 1j * rng.standard_normal((coils, samples))).astype(np.complex64))
        acq.scan_counter = i
        acq.idx.kspace_encode_step_1 = i % 32
        msgs.append(encode_message(acq))
    return xml, msgs


_IMG = ismrmrd.ImageHeader
_AH = ismrmrd.AcquisitionHeader
_ACQ_SIZES = struct.Struct("<" + "".join(       # (number_of_samples, active_channels, trajectory_dimensions)
    f"{pad}x{code}" if pad else code for pad, code in (
        (_AH.number_of_samples.offset, "H"),
        (_AH.active_channels.offset - _AH.number_of_samples.offset - 2, "H"),
        (_AH.trajectory_dimensions.offset - _AH.active_channels.offset - 2, "H"))))
_ITEMSIZE = {1: 2, 2: 2, 3: 4, 4: 4, 5: 4, 6: 8, 7: 8, 8: 16}


def _frame_length(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    """``(message id, total length)`` of the message at ``buf[pos:end]`` from its size fields alone
    (no objects built), or ``(id, 0)`` while the bytes that give its size have not all arrived."""
    have = end - pos
    if have < 2:
        return -1, 0
    mid = struct.unpack_from("<H", buf, pos)[0]
    if mid == MessageId.ACQUISITION:
        if have < 2 + ACQUISITION_HEADER_SIZE:
            return mid, 0
        ns, nc, nt = _ACQ_SIZES.unpack_from(buf, pos + 2)
        return mid, 2 + ACQUISITION_HEADER_SIZE + 4 * ns * nt + 8 * ns * nc
    if mid == MessageId.CLOSE:
        return mid, 2
    if mid == MessageId.TEXT:
        return (mid, 6 + struct.unpack_from("<I", buf, pos + 2)[0]) if have >= 6 else (mid, 0)
    if mid == MessageId.RESPONSE:
        return (mid, 18 + struct.unpack_from("<Q", buf, pos + 10)[0]) if have >= 18 else (mid, 0)
    if mid == MessageId.IMAGE:
        if have < 2 + IMAGE_HEADER_SIZE + 8:
            return mid, 0
        dtype = struct.unpack_from("<H", buf, pos + 2 + _IMG.data_type.offset)[0]
        nx, ny, nz = struct.unpack_from("<3H", buf, pos + 2 + _IMG.matrix_size.offset)
        ch = struct.unpack_from("<H", buf, pos + 2 + _IMG.channels.offset)[0]
        attrs = struct.unpack_from("<Q", buf, pos + 2 + IMAGE_HEADER_SIZE)[0]
        return mid, 2 + IMAGE_HEADER_SIZE + 8 + attrs + nx * ny * nz * ch * _ITEMSIZE[dtype]
    raise RuntimeError(f"bench client: unexpected message id {mid} in the reply stream")


class _Replies:
    """The bench's client reader: receives the server's replies into one buffer (``recv_into``, 1 MiB
    per call, as the raw echo's ``recv``) and finds message boundaries from the size fields, without
    decoding messages into objects; it counts acquisitions, images, TEXTs and RESPONSEs, and stops
    after ``until`` (a message id). The received bytes are kept, so a caller checks them afterwards
    (outside the timed part), e.g. that the echo equals what was sent, byte for byte. ``buf``: a buffer
    to receive into, reused across runs (its pages are touched once, as the reference's heap is)."""

    def __init__(self, sock: socket.socket, expect_bytes: int = 0, buf: Optional[bytearray] = None) -> None:
        self.sock = sock
        need = max(expect_bytes, 1 << 16) + (1 << 20)
        self.buf = buf if buf is not None and len(buf) >= need else bytearray(need)
        self.end = 0           # bytes received
        self.pos = 0           # bytes framed (whole messages)
        self.counts: collections.Counter[int] = collections.Counter()

    def read_until(self, until: int) -> None:
        view = memoryview(self.buf)
        pos, end = self.pos, self.end
        counts = self.counts
        try:
            while True:
                mid, size = _frame_length(view, pos, end)
                while size and pos + size <= end:      # whole messages already here
                    pos += size
                    counts[mid] += 1
                    if mid == until:
                        return
                    mid, size = _frame_length(view, pos, end)
                if end + (1 << 20) > len(self.buf):   # (only when the reply is larger than expected)
                    view.release()
                    self.buf.extend(bytes(len(self.buf)))
                    view = memoryview(self.buf)
                k = self.sock.recv_into(view[end:], 1 << 20)
                if not k:
                    raise ConnectionClosedError(f"server closed the connection after {end} reply bytes "
                                                f"without a message {until}")
                end += k
        finally:
            self.pos, self.end = pos, end
            view.release()

    def received(self, start: int = 0) -> bytes:
        """The framed reply bytes from ``start`` (a message boundary) on."""
        return bytes(memoryview(self.buf)[start:self.pos])


def _check_echo(replies: _Replies, start: int, body: bytes, n: int) -> None:
    """The echo chain must send back every acquisition, byte for byte, then CLOSE."""
    if replies.counts[MessageId.ACQUISITION] != n or replies.received(start) != body + _CLOSE:
        raise RuntimeError(f"echo mismatch: {replies.counts[MessageId.ACQUISITION]} of {n} acquisitions came "
                           f"back, other messages {dict(replies.counts)}")


_CLOSE = encode_message(Close())


_REPLY_BUFFER: dict[int, bytearray] = {}      # size → one reply buffer reused by every run of that size


def _reply_buffer(expect: int) -> bytearray:
    buf = _REPLY_BUFFER.get(expect)
    if buf is None:
        buf = _REPLY_BUFFER[expect] = bytearray(max(expect, 1 << 16) + (1 << 20))
        buf[::4096] = bytes(len(range(0, len(buf), 4096)))     # every page written once, before any clock
    return buf


def _read_until_close(replies: "_Replies", err: list[BaseException]) -> threading.Thread:
    """A started thread that reads the server's replies until its CLOSE (an error goes to ``err``)."""

    def reader() -> None:
        try:
            replies.read_until(MessageId.CLOSE)
        except Exception as exc:  # reported to the caller
            err.append(exc)

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    return th


def _session(port: int, preamble: bytes, body: bytes, n: int, echo: bool = True) -> tuple[float, float, int]:
    """Send preamble + body + CLOSE, read replies until CLOSE; (total s, close→last s, images)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=600)
    err: list[BaseException] = []
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        expect = len(body) if echo else 0
        replies = _Replies(sock, expect, _reply_buffer(expect))

        t0 = time.perf_counter()
        th = _read_until_close(replies, err)
        sock.sendall(preamble)
        sock.sendall(body)                    # one send, as the raw socket reference sends its bytes
        t_close = time.perf_counter()
        sock.sendall(_CLOSE)
        th.join(600)
        t1 = time.perf_counter()
    finally:
        sock.close()              # done with the server (a client closes after its CLOSE), then the checks
    if err:
        raise err[0]
    if echo:
        _check_echo(replies, 0, body, n)
    return t1 - t0, t1 - t_close, replies.counts[MessageId.IMAGE]


def _session_ready(port: int, preamble: bytes, body: bytes, n: int) -> tuple[float, float]:
    """Preamble + QUERY, wait for the RESPONSE (the session is up), then body + CLOSE until the
    server's CLOSE; (connect → RESPONSE s, first acquisition → CLOSE s)."""
    t0 = time.perf_counter()
    sock = socket.create_connection(("127.0.0.1", port), timeout=600)
    err: list[BaseException] = []
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        replies = _Replies(sock, len(body), _reply_buffer(len(body)))
        sock.sendall(preamble + encode_message(Query(1, "torchgadgets::version")))
        replies.read_until(MessageId.RESPONSE)
        start = replies.pos
        t1 = time.perf_counter()

        th = _read_until_close(replies, err)
        sock.sendall(body)
        sock.sendall(_CLOSE)
        th.join(600)
        t2 = time.perf_counter()
    finally:
        sock.close()
    if err:
        raise err[0]
    _check_echo(replies, start, body, n)
    return t1 - t0, t2 - t1


def _raw_echo(payload: bytes) -> tuple[float, float]:
    """Loopback echo of ``payload`` through a thread in this process; (total s, tail s)."""
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(1)

    def echo() -> None:
        conn, _ = lst.accept()
        with conn:
            while True:
                b = conn.recv(1 << 20)
                if not b:
                    break
                conn.sendall(b)

    th = threading.Thread(target=echo, daemon=True)
    th.start()
    cli = socket.create_connection(lst.getsockname())
    n = len(payload)
    got = 0

    def drain() -> None:
        nonlocal got
        while got < n:
            b = cli.recv(1 << 20)
            if not b:
                break
            got += len(b)

    rd = threading.Thread(target=drain, daemon=True)
    t0 = time.perf_counter()
    rd.start()
    cli.sendall(payload)
    t_end_send = time.perf_counter()
    rd.join(600)
    t1 = time.perf_counter()
    cli.close()
    th.join(5)
    lst.close()
    return t1 - t0, t1 - t_end_send


def _median(fn: Callable[[], tuple], repeats: int) -> tuple:
    runs = [fn() for _ in range(repeats)]
    return tuple(statistics.median(r[i] for r in runs) for i in range(len(runs[0])))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.stream", description=__doc__.splitlines()[0])
    ap.add_argument("--acquisitions", type=int, default=4000)
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--coils", type=int, default=8)
    ap.add_argument("--matrix", type=int, default=64, help="phantom matrix for the default-chain latency")
    ap.add_argument("--frames", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    xml, body = _synthetic(args.acquisitions, args.samples, args.coils)
    preamble = encode_message(ConfigFile("passthrough")) + encode_message(Header(xml))
    blob = b"".join(body)            # joined once, outside the timed part (as the reference's payload)
    n = len(body)
    payload = preamble + blob + encode_message(Close())
    mb = len(payload) / 1e6

    from gadgets.ismrmrd_io import scan_to_ismrmrd
    from recon_core.phantoms import simulate_scan

    scan = simulate_scan("cartesian", matrix=args.matrix, n_frames=args.frames, n_coils=args.coils, accel=2,
                         acs_lines=16, readout_oversampling=1)
    pxml, pacqs = scan_to_ismrmrd(scan, protocol_name="bench_stream")
    pbody = [encode_message(a) for a in pacqs]
    ppre = encode_message(ConfigFile("default")) + encode_message(Header(pxml))
    pblob = b"".join(pbody)
    ppayload = ppre + pblob + encode_message(Close())

    rows = []
    with ReconServer(port=0, device=args.device, max_sessions=1, read_timeout_s=600) as srv:
        _session(srv.port, preamble, b"".join(body[:50]), 50)                   # warm-up
        ingest = _median(lambda: _session(srv.port, preamble, blob, n), args.repeats)
        ready = _median(lambda: _session_ready(srv.port, preamble, blob, n), args.repeats)
        raw = _median(lambda: _raw_echo(payload), args.repeats)
        _session(srv.port, ppre, pblob, len(pbody), echo=False)                 # warm-up
        lat = _median(lambda: _session(srv.port, ppre, pblob, len(pbody), echo=False), args.repeats)
        praw = _median(lambda: _raw_echo(ppayload), args.repeats)
    rows.append(("ingest passthrough (echo)", f"{mb:.1f}", f"{ingest[0]:.3f}", f"{mb / ingest[0]:.0f}",
                 f"{args.acquisitions / ingest[0]:.0f}", f"{ingest[0] / raw[0]:.1f}x"))
    bmb = sum(map(len, body)) / 1e6
    rows.append(("ingest passthrough, streaming (session up)", f"{bmb:.1f}", f"{ready[1]:.3f}",
                 f"{bmb / ready[1]:.0f}", f"{args.acquisitions / ready[1]:.0f}", f"{ready[1] / raw[0]:.1f}x"))
    rows.append(("session start (connect -> RESPONSE)", "-", f"{ready[0]:.3f}", "-", "-", "-"))
    rows.append(("raw socket echo (ref)", f"{mb:.1f}", f"{raw[0]:.3f}", f"{mb / raw[0]:.0f}",
                 f"{args.acquisitions / raw[0]:.0f}", "1.0x"))
    pmb = len(ppayload) / 1e6
    rows.append((f"default chain CLOSE->last image ({int(lat[2])} img)", f"{pmb:.2f}", f"{lat[1]:.3f}", "-", "-",
                 f"{lat[1] / max(praw[0], 1e-9):.0f}x"))
    rows.append(("raw socket echo of same bytes (ref)", f"{pmb:.2f}", f"{praw[0]:.4f}", f"{pmb / praw[0]:.0f}",
                 "-", "1x"))
    import torch

    print(f"command: python -m bench.stream {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip())
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPU(s), python "
          f"{platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"device {args.device}")
    print(f"ingest: {args.acquisitions} acquisitions x {args.coils} coils x {args.samples} samples; latency: "
          f"phantom {args.matrix}^2, {args.frames} frame(s), {len(pacqs)} acquisitions; median of {args.repeats}")
    head = ("case", "MB", "time s", "MB/s", "acq/s", "ratio to ref")
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    line = lambda r: "| " + " | ".join(str(v).ljust(w) for v, w in zip(r, widths)) + " |"  # noqa: E731
    print(line(head))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
