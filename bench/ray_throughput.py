"""Throughput of the server with and without Ray (issue 16), through the product's path.

``python -m bench.ray_throughput [--sessions N --clients C --matrix M --coils K --chain NAME --repeats R
--json PATH]``

Rows (each a fresh server on loopback; clients are :func:`gadgets.stream.client.run_client` threads
sending the same phantom file):

* **plain, S sessions** — :class:`ReconServer` without Ray, ``max_sessions=S`` (a process per
  session), ``torch_threads=1``.
* **ray, W workers** — ``ReconServer(ray_address=...)`` on an in-process Ray started with ``W`` CPUs
  (each task declares 1 CPU, so at most ``W`` reconstructions run at once).

Throughput = sessions / wall time of ``--sessions`` sessions sent by ``--clients`` concurrent clients
(sessions per minute), after a warm-up round (Ray workers import torch and the gadgets on their first
task). Overhead = median single-session latency (one client, one at a time, ``--repeats`` runs after
one warm-up) through Ray with 1 worker minus through the plain server with 1 session, in threads
(same process, warm) and with a process per session (the default). Also printed: the object-store put of one session's buffer and the round trip of an empty
Ray task (the fixed costs inside that overhead).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _phantom(folder: Path, matrix: int, coils: int, frames: int) -> Path:
    from gadgets.ismrmrd_io import scan_to_ismrmrd, write_ismrmrd
    from recon_core.phantoms import simulate_scan

    scan = simulate_scan("cartesian", matrix=matrix, n_frames=frames, n_coils=coils, accel=2, acs_lines=16)
    xml, acqs = scan_to_ismrmrd(scan, protocol_name="ray_bench")
    path = folder / "phantom.h5"
    write_ismrmrd(path, xml, acqs)
    return path


def _session(port: int, data: Path, out: Path, chain: str) -> float:
    from gadgets.stream.client import run_client

    buf = io.StringIO()
    t0 = time.perf_counter()
    rc = run_client("127.0.0.1", port, str(data), outfile=str(out), out_group="g", config=chain,
                    timeout_ms=10000, out=buf, err=buf, read_timeout_s=600.0)
    if rc != 0:
        raise RuntimeError(f"session failed (rc {rc}): {buf.getvalue()[-500:]}")
    return time.perf_counter() - t0


def _throughput(port: int, data: Path, tmp: Path, chain: str, sessions: int, clients: int) -> float:
    """Sessions per minute for ``sessions`` sessions from ``clients`` concurrent clients."""
    todo = list(range(sessions))
    lock = threading.Lock()
    errors: list[str] = []

    def client(k: int) -> None:
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop()
            try:
                _session(port, data, tmp / f"c{k}_{i}.h5", chain)
            except RuntimeError as exc:
                errors.append(str(exc))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(errors[0])
    return 60.0 * sessions / wall


def _latency(port: int, data: Path, tmp: Path, chain: str, repeats: int) -> float:
    _session(port, data, tmp / "warm.h5", chain)
    return statistics.median(_session(port, data, tmp / f"lat{i}.h5", chain) for i in range(repeats))


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=8)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--matrix", type=int, default=64)
    ap.add_argument("--coils", type=int, default=8)
    ap.add_argument("--frames", type=int, default=1)
    ap.add_argument("--chain", default="cartesian_sense")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Ray worker CPU counts to measure")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args(argv)

    import ray

    from gadgets.ismrmrd_io import read_ismrmrd
    from gadgets.stream.ray_backend import pack_messages
    from gadgets.stream.server import ReconServer

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="ray_bench-") as tmpdir:
        tmp = Path(tmpdir)
        data = _phantom(tmp, args.matrix, args.coils, args.frames)
        common = dict(port=0, device="cpu", read_timeout_s=600.0, torch_threads=1, access_log=False)
        plain_latency = thread_latency = None
        with ReconServer(max_sessions=1, isolation="thread", **common) as srv:
            thread_latency = _latency(srv.port, data, tmp, args.chain, args.repeats)
        for s in sorted(set(args.workers)):
            with ReconServer(max_sessions=s, **common) as srv:
                if s == 1:
                    plain_latency = _latency(srv.port, data, tmp, args.chain, args.repeats)
                _throughput(srv.port, data, tmp, args.chain, s, s)       # warm-up
                spm = _throughput(srv.port, data, tmp, args.chain, args.sessions, args.clients)
            rows.append({"mode": "plain", "parallel": s, "sessions_per_min": spm})
            print(f"plain server, {s} session(s) at a time: {spm:.1f} sessions/min", flush=True)
        ray_latency = put_s = empty_s = None
        for w in sorted(set(args.workers)):
            ray.init(num_cpus=w, include_dashboard=False, log_to_driver=False)
            try:
                with ReconServer(max_sessions=max(args.clients, 2), ray_address="auto", **common) as srv:
                    if w == 1:
                        ray_latency = _latency(srv.port, data, tmp, args.chain, args.repeats)
                        packed = pack_messages(read_ismrmrd(data)[1])
                        t0 = time.perf_counter()
                        for _ in range(args.repeats):
                            ray.put(packed)
                        put_s = (time.perf_counter() - t0) / args.repeats
                        empty = ray.remote(lambda: 0)
                        ray.get(empty.remote())
                        t0 = time.perf_counter()
                        for _ in range(10):
                            ray.get(empty.remote())
                        empty_s = (time.perf_counter() - t0) / 10
                    _throughput(srv.port, data, tmp, args.chain, 2 * w, 2 * w)   # warm-up: every worker imports
                    spm = _throughput(srv.port, data, tmp, args.chain, args.sessions, args.clients)
            finally:
                ray.shutdown()
            rows.append({"mode": "ray", "parallel": w, "sessions_per_min": spm})
            print(f"ray, {w} worker(s): {spm:.1f} sessions/min", flush=True)

    print()
    print(f"chain {args.chain}, Cartesian phantom {args.matrix}x{args.matrix}, {args.coils} coils, "
          f"{args.frames} frame(s); {args.sessions} sessions from {args.clients} clients; "
          f"{os.cpu_count()} CPU(s), {platform.processor() or platform.machine()}")
    print(f"{'mode':<8}{'parallel':>10}{'sessions/min':>15}")
    for r in rows:
        print(f"{r['mode']:<8}{r['parallel']:>10}{r['sessions_per_min']:>15.1f}")
    summary: dict[str, Any] = {"rows": rows, "args": {k: str(v) for k, v in vars(args).items()}}
    if plain_latency is not None and ray_latency is not None:
        print(f"single-session latency (median of {args.repeats}): plain server {plain_latency:.3f} s (a process "
              f"per session), plain server in threads {thread_latency:.3f} s, ray 1 worker {ray_latency:.3f} s")
        print(f"Ray adds {ray_latency - thread_latency:+.3f} s per reconstruction against the in-process "
              f"session ({ray_latency - plain_latency:+.3f} s against a process per session); object put of the "
              f"buffer {put_s * 1e3:.1f} ms, empty task round trip {empty_s * 1e3:.1f} ms")
        summary.update(plain_latency_s=plain_latency, thread_latency_s=thread_latency, ray_latency_s=ray_latency,
                       ray_overhead_vs_thread_s=ray_latency - thread_latency,
                       ray_overhead_vs_process_s=ray_latency - plain_latency, put_s=put_s, empty_task_s=empty_s)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
