"""Streaming benchmark: ingest throughput and CLOSE→last-image latency of the server (loopback).

``python -m bench.stream [--acquisitions N --samples S --coils C --matrix M --repeats R]``

Rows:

* **ingest, passthrough** — a client sends CONFIG ``passthrough`` + header + N acquisitions + CLOSE
  (the acquisitions in one ``sendall``, as the reference sends its bytes) while a reader thread
  decodes the echoed messages, until the server's CLOSE; MB/s (bytes sent / wall time) and
  acquisitions/s.
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
import logging
import os
import platform
import socket
import statistics
import sys
import threading
import time
from typing import Callable

import ismrmrd
import numpy as np

from gadgets.stream.protocol import (Close, ConfigFile, Header, MessageReader, Query, Response,
                                     encode_message, socket_read_exact)
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


def _session(port: int, preamble: bytes, body: list[bytes]) -> tuple[float, float, int]:
    """Send preamble + body + CLOSE, read replies until CLOSE; (total s, close→last s, images)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=600)
    images = 0
    t_close = [0.0]
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        done = threading.Event()
        err: list[BaseException] = []

        def reader() -> None:
            nonlocal images
            try:
                r = MessageReader(socket_read_exact(sock))
                while True:
                    m = r.read_message()
                    if isinstance(m, ismrmrd.Image):
                        images += 1
                    if isinstance(m, Close):
                        break
            except Exception as exc:  # reported to the caller
                err.append(exc)
            finally:
                done.set()

        th = threading.Thread(target=reader, daemon=True)
        t0 = time.perf_counter()
        th.start()
        sock.sendall(preamble)
        sock.sendall(b"".join(body))          # one send, as the raw socket reference sends its bytes
        t_close[0] = time.perf_counter()
        sock.sendall(encode_message(Close()))
        done.wait(600)
        t1 = time.perf_counter()
        th.join(5)
        if err:
            raise err[0]
    finally:
        sock.close()
    return t1 - t0, t1 - t_close[0], images


def _session_ready(port: int, preamble: bytes, body: list[bytes]) -> tuple[float, float]:
    """Preamble + QUERY, wait for the RESPONSE (the session is up), then body + CLOSE until the
    server's CLOSE; (connect → RESPONSE s, first acquisition → CLOSE s)."""
    t0 = time.perf_counter()
    sock = socket.create_connection(("127.0.0.1", port), timeout=600)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        r = MessageReader(socket_read_exact(sock))
        sock.sendall(preamble + encode_message(Query(1, "torchgadgets::version")))
        while not isinstance(r.read_message(), Response):
            pass
        t1 = time.perf_counter()
        err: list[BaseException] = []

        def reader() -> None:
            try:
                while not isinstance(r.read_message(), Close):
                    pass
            except Exception as exc:  # reported to the caller
                err.append(exc)

        th = threading.Thread(target=reader, daemon=True)
        th.start()
        sock.sendall(b"".join(body))
        sock.sendall(encode_message(Close()))
        th.join(600)
        t2 = time.perf_counter()
        if err:
            raise err[0]
    finally:
        sock.close()
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
    payload = preamble + b"".join(body) + encode_message(Close())
    mb = len(payload) / 1e6

    from gadgets.ismrmrd_io import scan_to_ismrmrd
    from recon_core.phantoms import simulate_scan

    scan = simulate_scan("cartesian", matrix=args.matrix, n_frames=args.frames, n_coils=args.coils, accel=2,
                         acs_lines=16, readout_oversampling=1)
    pxml, pacqs = scan_to_ismrmrd(scan, protocol_name="bench_stream")
    pbody = [encode_message(a) for a in pacqs]
    ppre = encode_message(ConfigFile("default")) + encode_message(Header(pxml))
    ppayload = ppre + b"".join(pbody) + encode_message(Close())

    rows = []
    with ReconServer(port=0, device=args.device, max_sessions=1, read_timeout_s=600) as srv:
        _session(srv.port, preamble, body[:50])                                  # warm-up
        ingest = _median(lambda: _session(srv.port, preamble, body), args.repeats)
        ready = _median(lambda: _session_ready(srv.port, preamble, body), args.repeats)
        raw = _median(lambda: _raw_echo(payload), args.repeats)
        _session(srv.port, ppre, pbody)                                          # warm-up
        lat = _median(lambda: _session(srv.port, ppre, pbody), args.repeats)
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
