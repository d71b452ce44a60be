"""How cost grows: time and peak memory per method as matrix, frames and coils grow; server throughput.

``python -m bench.scaling [--quick] [--methods M ...] [--axes A ...] [--sessions K ...] [--budget-s S]
[--json PATH]``

For each method and each axis (matrix 64/128/256, frames 8/16/32, coils 8/16/32) the other two stay at
their base value (64², 8 frames, 8 coils); each point is a phantom case of ``bench.quality`` (radial,
13 golden-angle spokes per frame; GRAPPA on a Cartesian case with uniform R = 4 and 24 ACS lines at
128², which GRAPPA needs) reconstructed through its shipped chain with ``run_offline`` (the path of
``torchgadgets run``). The fitted exponent ``p`` is the slope of log(time) against log(size) (least
squares): cost ∝ size^p along that axis.

Budget (the default run finishes within 10 minutes on a 2-core machine):

* every iteration-like parameter (``bench.quality``'s words: iter, step, round, outer, inner, ...) is
  capped at :data:`ITER_CAP` = 4 (``bench.quality``'s small mode caps at 10): every point of a method
  runs the same number of iterations, so the exponents measure how one run's cost grows;
* the base point is shared by the three axes (7 reconstructions per method, not 9);
* one warm-up per method (imports, first-call allocations) at the ``--quick`` base size;
* a whole-run budget (``--budget-s``, 570 s): a point is skipped (and shown as such) when the
  elapsed time plus a quadratic extrapolation of the previous point on its axis would pass it, so
  the run always ends; methods run cheapest first; the server rows run first (about half a minute).

``--quick`` uses 32–64², 4–8 frames and 4–8 coils (about a minute).

The server rows send the ``bench.stream`` passthrough ingest from 1, 2 and 4 concurrent clients
to one ``ReconServer`` (as many session slots) and report the aggregate MB/s.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

#: cheapest first: when the budget runs out, the skipped points are the most expensive method's
METHODS = ("zero_filled", "grappa", "cg_sense", "l1_wavelet", "grasp", "kt_slr")
#: GRAPPA needs uniform ky undersampling with calibration lines (it refuses variable-density masks)
CARTESIAN_UNIFORM = dict(kind="cartesian", accel=4, acs_lines=24, mask_kind="uniform",
                         desc="Cartesian uniform R=4, 24 ACS lines (at 128²)")
CASE_OF = {"grappa": "cart_u4"}             # every other method: radial13
ITER_CAP = 4                                  # iterations (steps, rounds, ...) per run at every point
BUDGET_S = 570.0                              # the default run's budget: later points are skipped
BASE = dict(matrix=64, frames=8, coils=8)     # frames/coils axes at 64²: the default run stays short
AXES = dict(matrix=(64, 128, 256), frames=(8, 16, 32), coils=(8, 16, 32))
QUICK_BASE = dict(matrix=32, frames=4, coils=4)
QUICK_AXES = dict(matrix=(32, 48, 64), frames=(4, 6, 8), coils=(4, 6, 8))


@contextlib.contextmanager
def _sizes(matrix: int, frames: int, coils: int) -> Iterator[None]:
    """bench.quality's case sizes set to these for the block (its ``_sizes`` reads ``FULL``)."""
    from bench import quality as Q

    saved = dict(Q.FULL)
    Q.FULL.update(matrix=matrix, frames=frames, coils=coils, calib=min(24, max(8, matrix // 4)))
    try:
        yield
    finally:
        Q.FULL.clear()
        Q.FULL.update(saved)


def fit_exponent(sizes: Sequence[float], times: Sequence[float]) -> float:
    """Least-squares slope of log(time) on log(size) over the finite, positive points (nan if < 2)."""
    pts = [(math.log(s), math.log(t)) for s, t in zip(sizes, times) if t > 0 and math.isfinite(t)]
    if len(pts) < 2:
        return float("nan")
    x, y = np.array(pts).T
    return float(np.polyfit(x, y, 1)[0])


def iteration_caps(method: str, cap: int = ITER_CAP) -> dict[str, int]:
    """``method``'s iteration-like parameters capped at ``cap`` (bench.quality's small-mode rule)."""
    from bench import quality as Q

    return {k: min(int(v), cap) for k, v in Q.method_overrides(method, small=True).items()}


def _case(name: str, seed: int) -> Any:
    from bench import quality as Q

    if name == "cart_u4":
        return Q._phantom_case(name, CARTESIAN_UNIFORM, small=False, seed=seed, frames=None, use_cache=True)
    return Q.make_case(name, small=False, seed=seed)


def run_point(method: str, matrix: int, frames: int, coils: int, seed: int = 0,
              cap: int = ITER_CAP) -> dict[str, Any]:
    """One reconstruction of ``method`` at this size through its chain (iterations capped at ``cap``);
    bench.quality's result row."""
    from bench import quality as Q

    with _sizes(matrix, frames, coils):
        case = _case(CASE_OF.get(method, "radial13"), seed)
    row = Q.run_method(method, case, torch.device("cpu"), small=False, seed=0,
                       overrides=iteration_caps(method, cap))
    row.update(matrix=matrix, frames=frames, coils=coils)
    return row


def server_throughput(concurrency: Sequence[int], acquisitions: int, samples: int = 256,
                      coils: int = 8) -> list[dict[str, Any]]:
    """Aggregate passthrough ingest MB/s with ``k`` clients at once, for each ``k`` in ``concurrency``."""
    from bench.stream import _session, _synthetic
    from gadgets.stream.protocol import ConfigFile, Header, encode_message
    from gadgets.stream.server import ReconServer

    xml, body = _synthetic(acquisitions, samples, coils)
    preamble = encode_message(ConfigFile("passthrough")) + encode_message(Header(xml))
    mb = (len(preamble) + sum(map(len, body)) + 2) / 1e6
    out = []
    with ReconServer(port=0, max_sessions=max(concurrency), read_timeout_s=600) as srv:
        blob = b"".join(body)                            # joined before the clock, as bench.stream does
        _session(srv.port, preamble, b"".join(body[:20]), 20)                 # warm-up
        for k in concurrency:
            errors: list[BaseException] = []

            def client() -> None:
                try:
                    _session(srv.port, preamble, blob, len(body))
                except BaseException as exc:  # reported below
                    errors.append(exc)

            threads = [threading.Thread(target=client) for _ in range(k)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join(600)
            wall = time.perf_counter() - t0
            out.append(dict(sessions=k, mb=k * mb, seconds=wall, mb_per_s=k * mb / wall,
                            status="ok" if not errors else f"error: {errors[0]}"[:200]))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.scaling", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (about a minute)")
    ap.add_argument("--methods", nargs="*", default=list(METHODS))
    ap.add_argument("--axes", nargs="*", default=list(AXES), choices=list(AXES))
    ap.add_argument("--sessions", type=int, nargs="*", default=[1, 2, 4],
                    help="concurrent sessions for the server rows (none: skip them)")
    ap.add_argument("--acquisitions", type=int, default=None, help="per session in the server rows")
    ap.add_argument("--json", type=Path, default=None, help="write all rows here")
    ap.add_argument("--iter-cap", type=int, default=ITER_CAP, help="iterations (steps, rounds) per run")
    ap.add_argument("--budget-s", type=float, default=BUDGET_S,
                    help="points that would start after this many seconds are skipped")
    args = ap.parse_args(argv)
    base, axes = (QUICK_BASE, QUICK_AXES) if args.quick else (BASE, AXES)
    t_start = time.perf_counter()

    n_acq = args.acquisitions or (300 if args.quick else 2000)
    server = server_throughput(args.sessions, n_acq) if args.sessions else []
    for srow in server:
        print(f"  server {srow['sessions']} session(s): {srow['mb_per_s']:.0f} MB/s  {srow['status']}",
              flush=True)

    rows: list[dict[str, Any]] = []
    fits: list[dict[str, Any]] = []
    skipped = 0
    for method in args.methods:
        if time.perf_counter() - t_start < args.budget_s:
            run_point(method, **QUICK_BASE, cap=args.iter_cap)   # warm-up: imports, first calls, chains
        done: dict[tuple[int, int, int], dict[str, Any]] = {}   # the base point serves every axis
        took: dict[tuple[int, int, int], float] = {}              # wall seconds of each point run
        for axis in args.axes:
            pts = []
            prev: tuple[int, float] | None = None                 # (size, wall s) of the last point
            for v in axes[axis]:
                size = dict(base, **{axis: v})
                key = (size["matrix"], size["frames"], size["coils"])
                guess = prev[1] * (v / prev[0]) ** 2 if prev is not None else 0.0
                if key in done:
                    r = dict(done[key], shared=True)
                elif time.perf_counter() - t_start + guess >= args.budget_s:
                    skipped += 1
                    r = dict(method=method, seconds=float("nan"), peak_mib=float("nan"), **size,
                             status=f"skipped: it would end after the run's budget of {args.budget_s:g} s")
                else:
                    t_point = time.perf_counter()
                    r = done[key] = run_point(method, **size, cap=args.iter_cap)
                    took[key] = time.perf_counter() - t_point
                if key in took:
                    prev = (v, took[key])
                r["axis"] = axis
                rows.append(r)
                pts.append((v, r.get("seconds", float("nan")), r.get("peak_mib", float("nan"))))
                print(f"  {method:<12} {axis:<7} {v:>4}: {r.get('seconds', float('nan')):8.2f} s "
                      f"{r.get('peak_mib', float('nan')):8.1f} MiB  {r.get('status', '')[:80]}", flush=True)
            fits.append(dict(method=method, axis=axis, sizes=[p[0] for p in pts],
                             seconds=[p[1] for p in pts], peak_mib=[p[2] for p in pts],
                             time_exponent=fit_exponent([p[0] for p in pts], [p[1] for p in pts]),
                             memory_exponent=fit_exponent([p[0] for p in pts], [p[2] for p in pts])))
    wall = time.perf_counter() - t_start

    cli = argv if argv is not None else sys.argv[1:]
    print(f"command: python -m bench.scaling {' '.join(cli)}".rstrip())
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPU(s), torch "
          f"{torch.__version__} ({torch.get_num_threads()} threads), load average "
          f"{os.getloadavg() if hasattr(os, 'getloadavg') else 'n/a'}")
    print(f"base size {base}; recon time = the recon gadget's ReconTime_s; memory = peak RSS growth; "
          f"iterations capped at {args.iter_cap}; whole run {wall:.0f} s"
          + (f"; {skipped} point(s) skipped (budget {args.budget_s:g} s)" if skipped else ""))
    print("| method | axis | sizes | seconds | peak MiB | time exponent | memory exponent |")
    print("|---|---|---|---|---|---:|---:|")
    for f in fits:
        print(f"| {f['method']} | {f['axis']} | {'/'.join(map(str, f['sizes']))} | "
              f"{'/'.join(f'{t:.2f}' for t in f['seconds'])} | "
              f"{'/'.join(f'{m:.0f}' for m in f['peak_mib'])} | "
              f"{f['time_exponent']:.2f} | {f['memory_exponent']:.2f} |")
    if server:
        print()
        print(f"server passthrough ingest ({n_acq} acquisitions x 8 coils x 256 samples per session)")
        print("| sessions | MB | seconds | aggregate MB/s | status |")
        print("|---:|---:|---:|---:|---|")
        for s in server:
            print(f"| {s['sessions']} | {s['mb']:.1f} | {s['seconds']:.2f} | {s['mb_per_s']:.0f} | "
                  f"{s['status']} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(fits=fits, server=server, wall_s=wall, skipped=skipped,
                                             iter_cap=args.iter_cap, budget_s=args.budget_s,
                                             rows=[{k: v for k, v in r.items() if k != "traceback"}
                                                   for r in rows]), indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
