"""Validation family: the classical temporal methods against BART ``pics`` temporal TV with λ swept per case.

Run::

    python -m bench.validation                       # the family (11 cases; ≈ 20-40 min on 2 shared cores)
    python -m bench.validation --quick               # 3 tiny cases (a smoke check, < 1 min)
    python -m bench.validation --json /tmp/me/v.json --cases rad_a cart_b --methods grasp

The family is built here (not the project's tuning phantom of ``bench.quality``): cine scans from
:func:`recon_core.phantoms.simulate_scan` of :class:`~recon_core.phantoms.CardiacPhantom` with a drawn
:class:`~recon_core.phantoms.AnatomyVariation` (body shape, organ jitter, contrast, extra blobs, wall
motion, coil array) per case, matrices 96–160, 8–20 coils, noise 0.5–3 %, golden-angle radial 8–34
spokes, Cartesian variable-density R 4–12, spiral 2–8 interleaves per frame. Frames are kept at 8–12
(not the 16+ of a clinical cine) so the whole family runs in well under an hour on a CPU.

For every case, each of ``grasp``, ``l_plus_s`` and ``kt_slr`` runs with its DEFAULT parameters
through the shipped chain of its data kind, exactly as ``torchgadgets run`` runs it
(:func:`bench.quality.run_method`: the case written as ISMRMRD, noise prewhitening, the chain's own
ESPIRiT maps); BART ``pics -S -e -R T:1024:0:λ`` (the ``bart_tv_t`` variant of
:data:`bench.bart.BART_VARIANTS`, default iterations) runs on the same prewhitened k-space for λ on
a log grid (:data:`BART_LAMBDAS`), with maps from ``bart ecalib`` (for non-Cartesian data on the
DCF-weighted gridded time average, as :func:`bench.quality.run_bart_case` does); the best PSNR is
reported. Metrics: :func:`bench.quality._metrics` (magnitude, one LS scale inside the body, PSNR
per frame averaged). Times: ours = the recon gadget's ``ReconTime_s`` (maps excluded), BART = wall
time of the ``bart pics`` call (start-up and ``.cfl`` I/O included, ``ecalib`` excluded).

Tune defaults on THIS family only, never on ``/work/shared/data``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from bench import quality as Q

Tensor = torch.Tensor

#: our temporal methods compared with BART temporal TV
METHODS: tuple[str, ...] = ("grasp", "l_plus_s", "kt_slr")

#: λ grid of the BART sweep (BART's scaled units, factor 2 apart around bench.quality's 0.01)
BART_LAMBDAS: tuple[float, ...] = (0.00125, 0.0025, 0.005, 0.01, 0.02, 0.04)


@dataclass(frozen=True)
class FamilyCase:
    """One validation case: ``simulate_scan`` arguments plus the anatomy variation's seed."""

    name: str
    kind: str
    matrix: int
    frames: int
    coils: int
    noise: float
    seed: int
    spokes: int = 13
    accel: float = 8.0
    acs: int = 8
    interleaves: int = 32
    per_frame: int = 4
    strength: float = 1.0

    def desc(self) -> str:
        acq = {"radial": f"GA radial {self.spokes} spokes",
               "cartesian": f"Cartesian VD R={self.accel:g}, {self.acs} ACS",
               "spiral": f"spiral {self.per_frame}/{self.interleaves}"}[self.kind]
        return (f"{acq}, {self.matrix}², {self.frames} fr, {self.coils} coils, "
                f"noise {100 * self.noise:.1f} %, "
                f"anatomy #{self.seed}")

    def scan_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = dict(matrix=self.matrix, n_frames=self.frames, n_coils=self.coils,
                                  noise_std=self.noise)
        if self.kind == "radial":
            kw["spokes_per_frame"] = self.spokes
        elif self.kind == "cartesian":
            kw.update(accel=self.accel, acs_lines=self.acs, mask_kind="variable_density",
                      readout_oversampling=1)
        else:
            kw.update(interleaves=self.interleaves, interleaves_per_frame=self.per_frame)
        return kw


#: the default family (11 cases): kinds, sizes, coils, noise and acceleration spread over the ranges
FAMILY: tuple[FamilyCase, ...] = (
    FamilyCase("rad_a", "radial", 96, 10, 8, 0.010, seed=101, spokes=13),
    FamilyCase("rad_b", "radial", 128, 8, 12, 0.020, seed=102, spokes=8),
    FamilyCase("rad_c", "radial", 160, 8, 16, 0.005, seed=103, spokes=21),
    FamilyCase("rad_d", "radial", 112, 12, 20, 0.030, seed=104, spokes=34),
    FamilyCase("cart_a", "cartesian", 96, 12, 8, 0.010, seed=105, accel=4, acs=8),
    FamilyCase("cart_b", "cartesian", 128, 10, 12, 0.020, seed=106, accel=8, acs=8),
    FamilyCase("cart_c", "cartesian", 144, 8, 16, 0.005, seed=107, accel=12, acs=10),
    FamilyCase("spir_a", "spiral", 96, 10, 10, 0.010, seed=108, interleaves=16, per_frame=2),
    FamilyCase("spir_b", "spiral", 128, 8, 14, 0.030, seed=109, interleaves=32, per_frame=8),
    FamilyCase("spir_c", "spiral", 112, 12, 12, 0.005, seed=110, interleaves=24, per_frame=4),
    FamilyCase("rad_e", "radial", 128, 10, 8, 0.015, seed=111, spokes=17),
)

#: ``--quick``: three tiny cases (one per kind) for the smoke test
QUICK: tuple[FamilyCase, ...] = (
    FamilyCase("q_rad", "radial", 32, 4, 4, 0.01, seed=201, spokes=8),
    FamilyCase("q_cart", "cartesian", 32, 4, 4, 0.01, seed=202, accel=4, acs=6),
    FamilyCase("q_spir", "spiral", 32, 4, 4, 0.01, seed=203, interleaves=16, per_frame=4),
)

#: iteration caps of the quick mode (tiny problems, a smoke check only)
QUICK_OVERRIDES: dict[str, dict[str, Any]] = {
    "grasp": {"admm_iters": 3, "cg_iters": 2, "rounds": 1, "iters_per_round": 2},
    "l_plus_s": {"max_iter": 3},
    "kt_slr": {"outer_iters": 1, "inner_iters": 2, "cg_iters": 2},
}
QUICK_BART_ITERS = 10

CACHE_DIR = Q.CACHE_DIR / "validation"


def build_case(fc: FamilyCase, use_cache: bool = True) -> Q.Case:
    """Simulate ``fc`` (cached), write it as ISMRMRD and return a :class:`bench.quality.Case`."""
    from recon_core.phantoms import AnatomyVariation, CardiacPhantom, simulate_scan
    from recon_core.trajectories import default_dcf

    t0 = time.perf_counter()
    key = repr(fc) + "_v1"
    stem = CACHE_DIR / f"{fc.name}_{hashlib.sha1(key.encode()).hexdigest()[:12]}"
    pt, h5 = stem.with_suffix(".pt"), stem.with_suffix(".h5")
    d: Optional[dict[str, Tensor]] = None
    if use_cache and pt.is_file() and h5.is_file():
        try:
            got = torch.load(pt, weights_only=True)
            if got.get("_key") == key:   # type: ignore[union-attr]
                d = got
        except Exception:   # a corrupt cache entry is recomputed
            d = None
    if d is None:
        var = AnatomyVariation.random(fc.seed, strength=fc.strength)
        phantom = CardiacPhantom(fc.matrix, fc.frames, fc.coils, variation=var)
        s = simulate_scan(fc.kind, seed=fc.seed, phantom=phantom, **fc.scan_kwargs())
        d, h5 = Q.write_scan_for_chain(s, h5, f"validation_{fc.name}", use_cache)
        if use_cache:
            torch.save({**d, "_key": key}, pt)   # type: ignore[dict-item]
    k = d["kspace"]
    n = fc.matrix
    case = Q.Case(name=fc.name, desc=fc.desc(), input_path=h5, chain=Q.CHAIN_FOR_KIND[fc.kind], kspace=k,
                  ground_truth=d["ground_truth"], support=d["body_mask"],
                  sim_seconds=time.perf_counter() - t0)
    calib = min(24, max(8, n // 5))
    if fc.kind == "cartesian":
        mask = d["mask"]
        case.mask = mask
        cnt = mask.sum(0)
        kavg = k.sum(0) / cnt.clamp_min(1)[None].to(k.dtype)
        case.calib_kspace, case.calib_size = Q._bart_calibration(kavg, cnt > 0, calib)
    else:
        case.trajectory = d["trajectory"]
        case.dcf = default_dcf(case.trajectory, (n, n), kind=fc.kind)
        case.calib_size = (calib, calib)
    return case


def bart_sweep(case: Q.Case, lambdas: Sequence[float], iters: Optional[int] = None,
               repeat: int = 1) -> tuple[list[dict[str, Any]], str]:
    """``bart pics`` temporal TV on ``case`` for each λ (maps from ``bart ecalib`` computed once);
    with ``repeat`` > 1 each call runs that many times and the shortest wall time is kept."""
    from bench import bart as B
    from recon_core.operators import Nufft

    rows: list[dict[str, Any]] = []
    with B.BartSession() as sess:
        try:
            scale: complex = 1.0
            if case.is_cartesian:
                assert case.calib_kspace is not None
                maps, call = sess.ecalib(case.calib_kspace, case.calib_size,
                                         extra=("-k", "{0}:{0}:1".format(Q.espirit_kernel(*case.calib_size))))
                note = f"bart ecalib -r {case.calib_size[1]}:{case.calib_size[0]} on the time-averaged ACS"
            else:
                assert case.trajectory is not None and case.dcf is not None
                maps, _calls = sess.ecalib_noncart(case.kspace, case.trajectory, case.dcf, case.image_shape,
                                                   calib=case.calib_size[0])
                ours = Nufft(case.trajectory, case.image_shape)(case.ground_truth[:, None])[:, 0]
                scale, err = sess.nufft_scale(case.ground_truth, case.trajectory, ours)
                note = (f"bart ecalib -r {case.calib_size[0]} on the DCF-weighted gridded time average; "
                        f"bart nufft = {abs(scale):.4g} x ours (rel. residual {err:.1e})")
        except B.BartError as exc:
            return [], f"BART maps failed: {exc}"
        for lam in lambdas:
            args = B.tv_t_args(lam)
            row: dict[str, Any] = {"case": case.name, "method": "bart_tv_t", "source": "bart", "lam": lam,
                                   "args": " ".join(args)}
            try:
                x, call = sess.pics(case.kspace, maps, args, traj=case.trajectory, iters=iters, tag="sweep")
                secs = [call.seconds]
                for _ in range(repeat - 1):
                    secs.append(sess.pics(case.kspace, maps, args, traj=case.trajectory, iters=iters,
                                          tag="sweep")[1].seconds)
                row.update(Q._metrics(x * complex(scale), case))
                row.update(seconds=min(secs), status="ok", all_seconds=secs)
            except B.BartError as exc:
                row.update(psnr=float("nan"), seconds=float("nan"), status=f"error: {exc}"[:300])
            row.pop("_images", None)
            rows.append(row)
    return rows, note


def run_family(cases: Sequence[FamilyCase], methods: Sequence[str] = METHODS, bart: bool = True,
               quick: bool = False, use_cache: bool = True,
               overrides: Optional[dict[str, dict[str, Any]]] = None,
               log: Any = None,
               bart_lambdas: Optional[dict[str, Sequence[float]]] = None,
               repeat: int = 1) -> list[dict[str, Any]]:
    """Run ``methods`` (defaults, through the chains) and the BART sweep on every case; a summary per case.

    ``bart_lambdas`` maps a case name to its own λ grid (e.g. only the best λ of an earlier full
    sweep, for a same-process time ratio at a fraction of the cost; key ``"*"`` = every case);
    default :data:`BART_LAMBDAS`. ``repeat`` > 1 runs each of ours and each BART call that many times
    and keeps the shortest time (the results are deterministic; this takes the load of a shared
    machine out of the time ratio).
    """
    from bench.bart import bart_available

    say = log or (lambda s: print(s, file=sys.stderr, flush=True))
    dev = torch.device("cpu")
    use_bart = bart and bart_available()
    out: list[dict[str, Any]] = []
    for fc in cases:
        case = build_case(fc, use_cache=use_cache)
        summary: dict[str, Any] = {"case": fc.name, "desc": fc.desc(), "ours": {}, "bart": [],
                                   "bart_note": ""}
        for m in methods:
            ov = dict(QUICK_OVERRIDES.get(m, {})) if quick else {}
            ov.update((overrides or {}).get(m, {}))
            row = Q.run_method(m, case, dev, small=False, overrides=ov)
            if repeat > 1 and row["status"] == "ok":
                secs = [row["seconds"]] + [Q.run_method(m, case, dev, small=False, overrides=ov)["seconds"]
                                           for _ in range(repeat - 1)]
                row["seconds"] = min(secs)
            row.pop("_images", None)
            row.pop("traceback", None)
            summary["ours"][m] = {"psnr": row["psnr"], "ssim": row.get("ssim"), "seconds": row["seconds"],
                                  "status": row["status"], "params": row.get("params", {})}
            say(f"[{fc.name}] {m:<9} PSNR {row['psnr']:.2f} dB  {row['seconds']:.2f} s  {row['status'][:80]}")
        if use_bart:
            grid = BART_LAMBDAS
            if bart_lambdas:
                grid = tuple(bart_lambdas.get(fc.name, bart_lambdas.get("*", BART_LAMBDAS)))
            brows, note = bart_sweep(case, grid, iters=QUICK_BART_ITERS if quick else None, repeat=repeat)
            summary["bart"], summary["bart_note"] = brows, note
            for r in brows:
                say(f"[{fc.name}] bart λ={r['lam']:<7g} PSNR {r['psnr']:.2f} dB  {r['seconds']:.2f} s")
        _summarise(summary)
        out.append(summary)
    return out


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _summarise(s: dict[str, Any]) -> None:
    """Best of ours, best BART λ, and the two comparisons of the issue (ΔPSNR, time ratio)."""
    ours = [(m, r) for m, r in s["ours"].items() if r["status"] == "ok" and _finite(r["psnr"])]
    s["best_ours"] = max(ours, key=lambda t: t[1]["psnr"])[0] if ours else None
    bart = [r for r in s["bart"] if r.get("status") == "ok" and _finite(r.get("psnr"))]
    best_b = max(bart, key=lambda r: r["psnr"]) if bart else None
    s["best_bart"] = ({"lam": best_b["lam"], "psnr": best_b["psnr"], "seconds": best_b["seconds"]}
                      if best_b else None)
    if s["best_ours"] and best_b:
        o = s["ours"][s["best_ours"]]
        s["delta_db"] = o["psnr"] - best_b["psnr"]
        s["time_ratio"] = o["seconds"] / best_b["seconds"] if best_b["seconds"] > 0 else None
        # the fastest of ours within 0.3 dB of BART, if any (the issue's target, met by any method)
        ok = [(m, r) for m, r in ours if r["psnr"] >= best_b["psnr"] - 0.3]
        s["target_met_by"] = min(ok, key=lambda t: t[1]["seconds"])[0] if ok else None
        s["target_met"] = any(r["seconds"] <= 0.5 * best_b["seconds"] for _m, r in ok)
    else:
        s["delta_db"] = s["time_ratio"] = s["target_met_by"] = None
        s["target_met"] = None


def _f(v: Any, fmt: str) -> str:
    return format(v, fmt) if _finite(v) else "—"


def format_tables(summaries: Sequence[dict[str, Any]], methods: Sequence[str] = METHODS) -> str:
    """One markdown table (a row per case) and the spread (median, min, max) of ΔPSNR and time ratio."""
    cols = " | ".join(f"{m} dB (s)" for m in methods)
    lines = [f"| case | data | {cols} | BART best λ | BART dB (s) | best ours − BART dB | t ours/BART "
             "| target |",
             "|---|---|" + "---:|" * len(methods) + "---:|---:|---:|---:|---|"]
    for s in summaries:
        cells = []
        for m in methods:
            r = s["ours"].get(m)
            cells.append(f"{_f(r['psnr'], '.2f')} ({_f(r['seconds'], '.1f')})" if r else "—")
        b = s.get("best_bart")
        bl = _f(b["lam"], "g") if b else "—"
        bc = f"{_f(b['psnr'], '.2f')} ({_f(b['seconds'], '.1f')})" if b else "—"
        tgt = "—" if s.get("target_met") is None else ("yes" if s["target_met"] else "no")
        lines.append(f"| {s['case']} | {s['desc']} | " + " | ".join(cells) +
                     f" | {bl} | {bc} | {_f(s.get('delta_db'), '+.2f')} | "
                     f"{_f(s.get('time_ratio'), '.2f')} | {tgt} |")
    lines += ["", "Spread over the cases (best of ours per case vs the best BART λ of that case):", "",
              "| quantity | median | min | max |", "|---|---:|---:|---:|"]
    for key, label, fmt in (("delta_db", "best ours − BART (dB)", "+.2f"),
                            ("time_ratio", "time best ours ÷ BART", ".2f")):
        vals = [s[key] for s in summaries if _finite(s.get(key))]
        if vals:
            lines.append(f"| {label} | {statistics.median(vals):{fmt}} | {min(vals):{fmt}} | "
                         f"{max(vals):{fmt}} |")
        else:
            lines.append(f"| {label} | — | — | — |")
    for m in methods:
        d = [s["ours"][m]["psnr"] - s["best_bart"]["psnr"] for s in summaries
             if s.get("best_bart") and m in s["ours"] and _finite(s["ours"][m]["psnr"])]
        if d:
            lines.append(f"| {m} − BART (dB) | {statistics.median(d):+.2f} | {min(d):+.2f} | {max(d):+.2f} |")
    met = [s for s in summaries if s.get("target_met") is not None]
    if met:
        lines.append("")
        lines.append(f"target (within 0.3 dB of BART at ≤ 0.5× its time): met on "
                     f"{sum(1 for s in met if s['target_met'])} of {len(met)} cases")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line entry point (``python -m bench.validation``)."""
    from bench.bart import bart_available, bart_version

    ap = argparse.ArgumentParser(prog="python -m bench.validation", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="three tiny cases, capped iterations (smoke check)")
    ap.add_argument("--json", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument("--cases", nargs="+", default=None, help="case names (default: the whole family)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--no-bart", action="store_true", help="skip the BART sweep")
    ap.add_argument("--no-cache", action="store_true", help="re-simulate the scans")
    ap.add_argument("--bart-lambdas", nargs="+", default=None, metavar="[CASE=]LAM",
                    help="BART λ grid instead of the default: LAM for every case, CASE=LAM for one case "
                         "(repeatable; e.g. each case's best λ from an earlier full sweep)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run ours and each BART call this many times and keep the shortest time")
    ap.add_argument("--param", action="append", default=[], metavar="METHOD.NAME=VALUE",
                    help="override a method parameter (for tuning studies; the table then is not 'defaults')")
    args = ap.parse_args(argv)
    pool = QUICK if args.quick else FAMILY
    if args.cases:
        names = {c.name: c for c in FAMILY + QUICK}
        bad = [n for n in args.cases if n not in names]
        if bad:
            ap.error(f"unknown case(s) {bad}; available: {list(names)}")
        pool = tuple(names[n] for n in args.cases)
    overrides = Q._parse_overrides(args.param)
    bart_grid: dict[str, list[float]] = {}
    for item in args.bart_lambdas or []:
        key, _, val = item.rpartition("=")
        try:
            bart_grid.setdefault(key or "*", []).append(float(val))
        except ValueError:
            ap.error(f"--bart-lambdas: not a number in {item!r}")
    use_bart = not args.no_bart and bart_available()
    cmd = " ".join(["python -m bench.validation"] +
                   [shlex.quote(a) for a in (sys.argv[1:] if argv is None else list(argv))])
    t0 = time.perf_counter()
    summaries = run_family(pool, args.methods, bart=use_bart, quick=args.quick, use_cache=not args.no_cache,
                           overrides=overrides, bart_lambdas=bart_grid or None, repeat=max(1, args.repeat))
    total = time.perf_counter() - t0
    print(f"\n# Validation family{' (--quick)' if args.quick else ''}\n")
    print(f"command: {cmd}")
    print(f"torch threads {torch.get_num_threads()}, BART {bart_version() or 'absent'}"
          f"{'' if use_bart else ' (not used)'}; BART λ grid {bart_grid or list(BART_LAMBDAS)} "
          f"(pics -S -e -R T:1024:0:λ, {'-i %d' % QUICK_BART_ITERS if args.quick else 'default iterations'})")
    print(f"ours: defaults through the shipped chains{'' if not overrides else f' except {overrides}'}"
          f"{' (quick iteration caps)' if args.quick else ''}; time = recon gadget ReconTime_s; "
          "BART time = bart pics wall time"
          f"{f' (shortest of {args.repeat} runs each)' if args.repeat > 1 else ''}")
    for s in summaries:
        if s.get("bart_note"):
            print(f"  {s['case']}: {s['bart_note']}")
    print()
    print(format_tables(summaries, args.methods))
    print(f"\ntotal {total:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"command": cmd, "quick": args.quick, "cases": summaries,
                                         "bart_lambdas": bart_grid or list(BART_LAMBDAS),
                                         "total_seconds": total},
                                        indent=1, default=str))
        print(f"results: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
