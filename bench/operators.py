"""Speed of the encoding operators on a cine-sized radial problem, per NUFFT backend (and BART).

Run ``python -m bench.operators`` (full size: 208², 18 frames, 12 coils, 13 golden-angle spokes ×
416 samples per frame) or ``python -m bench.operators --small`` for a quick check.

For each backend it times, with the median of ``--repeats`` runs after one warm-up call:
the raw multi-coil NUFFT forward ``[F, C, N, N] → [F, C, M]`` and adjoint, the SENSE normal
operator ``AᴴA`` plain (adjoint∘forward) and by Toeplitz embedding (plus the one-off Toeplitz
kernel precompute), and ``--cg-iters`` iterations of conjugate gradients on ``AᴴA x = Aᴴy`` with
either normal operator. When ``bart`` is on PATH it also times ``bart nufft`` (forward) and
``bart nufft -a`` (adjoint) on the same coil images and trajectory, as subprocess wall time from
this process: that includes BART's start-up and reading/writing its ``.cfl`` files.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

# finufft and torch each bring an OpenMP runtime; with the default (active) wait policy the idle
# threads of one spin after a call and slow the other's next operations by up to 100x on a shared
# machine. This entry point asks for passive waiting unless the caller chose otherwise; it only
# takes effect when torch has not been imported yet (i.e. under `python -m bench.operators`).
_OMP_SET_HERE = "torch" not in sys.modules and "OMP_WAIT_POLICY" not in os.environ
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from recon_core.cfl import readcfl, writecfl
from recon_core.nufft import available_backends, get_backend  # noqa: E402
from recon_core.operators import NonCartesianSense  # noqa: E402

Tensor = torch.Tensor

FULL = dict(n=208, frames=18, coils=12, spokes=13, readout=416)
SMALL = dict(n=48, frames=4, coils=4, spokes=8, readout=96)
GOLDEN_DEG = 180.0 / ((1 + math.sqrt(5)) / 2)  # 111.246°


# ----------------------------------------------------------------------------------------------
# problem


def radial_trajectory(spokes: int, readout: int, frames: int) -> Tensor:
    """Golden-angle radial ``[F, 2, spokes·readout]`` (ky, kx) radians/voxel, 2× readout oversampling."""
    try:
        from recon_core.trajectories import golden_angle_radial
    except ImportError:  # pragma: no cover - the trajectories module is written in parallel
        i = torch.arange(frames * spokes, dtype=torch.float64).reshape(frames, spokes)
        theta = torch.remainder(i * math.radians(GOLDEN_DEG), 2 * math.pi)
        r = (torch.arange(readout, dtype=torch.float64) - readout / 2) * (2 * math.pi / readout)
        traj = torch.stack([torch.sin(theta)[..., None] * r, torch.cos(theta)[..., None] * r], dim=1)
        return traj.reshape(frames, 2, -1).to(torch.float32)
    return golden_angle_radial(spokes, readout, frames, angle="golden", readout_oversampling=2.0)


def synthetic_maps(coils: int, n: int) -> Tensor:
    """Smooth coil sensitivities: Gaussians around a ring, with a linear phase, normalised by RSS."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, n), torch.linspace(-1, 1, n), indexing="ij")
    maps = []
    for c in range(coils):
        a = 2 * math.pi * c / coils
        cy, cx = 1.2 * math.sin(a), 1.2 * math.cos(a)
        mag = torch.exp(-((y - cy) ** 2 + (x - cx) ** 2) / 1.5)
        maps.append(mag * torch.exp(1j * (a + 0.5 * (x * math.cos(a) + y * math.sin(a)))))
    s = torch.stack(maps).to(torch.complex64)
    return (s / torch.sqrt(torch.sum(s.abs() ** 2, dim=0, keepdim=True))).to(torch.complex64)


def phantom(frames: int, n: int) -> Tensor:
    """A moving disc on a static ellipse background (complex64, ``[F, n, n]``)."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, n), torch.linspace(-1, 1, n), indexing="ij")
    out = []
    for f in range(frames):
        r = 0.15 + 0.05 * math.sin(2 * math.pi * f / max(frames, 1))
        img = ((x / 0.8) ** 2 + (y / 0.9) ** 2 < 1).float() * 0.5
        img = img + ((x - 0.1) ** 2 + y ** 2 < r ** 2).float()
        out.append(img)
    return torch.stack(out).to(torch.complex64)


# ----------------------------------------------------------------------------------------------
# timing helpers


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time in seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cg(normal: Callable[[Tensor], Tensor], b: Tensor, iters: int) -> Tensor:
    """Plain conjugate gradients on ``normal(x) = b`` (fixed iteration count, for timing)."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rr = torch.sum(r.abs() ** 2)
    for _ in range(iters):
        q = normal(p)
        alpha = rr / torch.real(torch.sum(p.conj() * q))
        x = x + alpha * p
        r = r - alpha * q
        rr_new = torch.sum(r.abs() ** 2)
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x


# ----------------------------------------------------------------------------------------------
# BART


def bart_arrays(coil_images: Tensor, traj: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Our ``[F, C, Ny, Nx]`` coil images and ``[F, 2, M]`` radians/voxel trajectory in BART layout.

    BART: image dims ``[x, y, z, coil, …, time(10)]``; trajectory ``[3, M, 1, …, time(10)]`` with
    component 0 = x, 1 = y, in units of cycles per FOV (``k · N / 2π``).
    """
    F, C, Ny, Nx = coil_images.shape
    img = np.zeros((Nx, Ny, 1, C) + (1,) * 6 + (F,), dtype=np.complex64)
    img[:, :, 0, :, 0, 0, 0, 0, 0, 0, :] = coil_images.numpy().transpose(3, 2, 1, 0)
    t = traj.double().numpy()                                            # [F, 2, M]
    bt = np.zeros((3, t.shape[2], 1) + (1,) * 7 + (F,), dtype=np.complex64)
    bt[0, :, 0, 0, 0, 0, 0, 0, 0, 0, :] = (t[:, 1] * Nx / (2 * math.pi)).T
    bt[1, :, 0, 0, 0, 0, 0, 0, 0, 0, :] = (t[:, 0] * Ny / (2 * math.pi)).T
    return img, bt


def run_bart(args: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    subprocess.run(["bart", *args], check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - t0


def bart_from_ours(kdata_bart: np.ndarray, F: int, C: int) -> np.ndarray:
    """BART k-space ``[1, M, 1, C, …, F]`` → our ``[F, C, M]``."""
    M = kdata_bart.shape[1]
    k = kdata_bart.reshape(M, C, F, order="F")  # all other BART dims are singletons
    return np.ascontiguousarray(k.transpose(2, 1, 0))


def scaled_rel_error(a: np.ndarray, ref: np.ndarray) -> tuple[complex, float]:
    """Best complex scale ``s`` with ``a ≈ s·ref`` and the relative residual (conventions check)."""
    a = a.astype(np.complex128).ravel()
    ref = ref.astype(np.complex128).ravel()
    s = np.vdot(ref, a) / np.vdot(ref, ref)
    return complex(s), float(np.linalg.norm(a - s * ref) / np.linalg.norm(a))


# ----------------------------------------------------------------------------------------------
# main


def _bare_finufft_rows(be, coil_images: Tensor, kdata: Tensor, traj: Tensor, shape: tuple[int, int],
                       repeats: int) -> list[tuple[str, str, float]]:
    """The same transforms as ``be`` by a bare finufft call: one plan, n_trans = coils, setpts per frame.

    Same points, same [frames, coils] batch, same thread count and tolerance as our operator; the
    arrays are converted to numpy outside the timed region (the library's best case).
    """
    import finufft

    F, C, M = kdata.shape
    nthreads = be.threads_for(M, C, shape)
    pts = np.ascontiguousarray(traj.numpy(), dtype=np.float32)
    img, ksp = coil_images.numpy(), kdata.numpy()

    def run(kind: int, src: np.ndarray, out: np.ndarray) -> None:
        plan = finufft.Plan(kind, shape, n_trans=C, eps=be.eps, isign=-1 if kind == 2 else 1,
                            dtype="complex64", nthreads=nthreads)
        for f in range(F):
            plan.setpts(pts[f if pts.shape[0] > 1 else 0, 0], pts[f if pts.shape[0] > 1 else 0, 1])
            plan.execute(src[f], out=out[f])

    kout, iout = np.empty((F, C, M), np.complex64), np.empty((F, C) + tuple(shape), np.complex64)
    return [("finufft bare", "nufft forward", median_time(lambda: run(2, img, kout), repeats)),
            ("finufft bare", "nufft adjoint", median_time(lambda: run(1, ksp, iout), repeats)),
            ("ours/bare paired", "nufft forward",
             paired_ratio(lambda: be.forward(coil_images, traj), lambda: run(2, img, kout), repeats)),
            ("ours/bare paired", "nufft adjoint",
             paired_ratio(lambda: be.adjoint(kdata, traj, shape), lambda: run(1, ksp, iout), repeats))]


def paired_ratio(ours: Callable[[], object], bare: Callable[[], object], repeats: int) -> float:
    """Median over alternating runs of time(ours) / time(bare): load changes on a shared machine hit
    both sides of each pair alike (order swapped every pair)."""
    ratios = []
    for i in range(max(7, 2 * repeats)):
        t = {}
        for name, fn in ((("o", ours), ("b", bare)) if i % 2 == 0 else (("b", bare), ("o", ours))):
            t0 = time.perf_counter()
            fn()
            t[name] = time.perf_counter() - t0
        ratios.append(t["o"] / t["b"])
    return statistics.median(ratios)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.operators", description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="a much smaller problem for a quick check")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per entry (median reported)")
    ap.add_argument("--cg-iters", type=int, default=10, help="CG iterations timed per normal operator")
    ap.add_argument("--backends", nargs="*", default=None,
                    help=f"NUFFT backends (default: all installed of {available_backends()})")
    ap.add_argument("--no-bart", action="store_true", help="skip BART even when it is on PATH")
    args = ap.parse_args(argv)

    p = SMALL if args.small else FULL
    n, F, C = p["n"], p["frames"], p["coils"]
    backends = args.backends or [b for b in available_backends() if b != "auto"]
    torch.manual_seed(0)

    cli = argv if argv is not None else sys.argv[1:]
    print(f"command: {' '.join([sys.executable, '-m', 'bench.operators', *cli])}")
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("n/a",)
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__} with {torch.get_num_threads()} threads, load average {load}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}"
          f"{' (set by this script)' if _OMP_SET_HERE else ''}")
    print(f"problem: {n}x{n}, {F} frames, {C} coils, {p['spokes']} spokes x {p['readout']} samples per frame "
          f"(golden angle {GOLDEN_DEG:.3f} deg), complex64, CPU; median of {args.repeats} runs")

    traj = radial_trajectory(p["spokes"], p["readout"], F)
    maps = synthetic_maps(C, n)
    x = phantom(F, n)
    coil_images = x.unsqueeze(1) * maps                                    # [F, C, n, n]
    M = traj.shape[2]
    rows: list[tuple[str, str, float]] = []
    notes: list[str] = []

    with torch.no_grad():
        for name in backends:
            be = get_backend(name)
            kdata = be.forward(coil_images, traj)
            rows.append((name, "nufft forward",
                         median_time(lambda: be.forward(coil_images, traj), args.repeats)))
            rows.append((name, "nufft adjoint",
                         median_time(lambda: be.adjoint(kdata, traj, (n, n)), args.repeats)))
            if name == "finufft":
                rows += _bare_finufft_rows(be, coil_images, kdata, traj, (n, n), args.repeats)
            plain = NonCartesianSense(maps, traj, (n, n), backend=be)
            toep = NonCartesianSense(maps, traj, (n, n), backend=be, toeplitz=True)
            rows.append((name, "SENSE normal, plain", median_time(lambda: plain.normal(x), args.repeats)))
            rows.append((name, "Toeplitz precompute",
                         median_time(toep.precompute_toeplitz, max(1, args.repeats // 2))))
            rows.append((name, "SENSE normal, Toeplitz", median_time(lambda: toep.normal(x), args.repeats)))
            ref = plain.normal(x)
            err = float(torch.linalg.vector_norm(toep.normal(x) - ref) / torch.linalg.vector_norm(ref))
            b = plain.adjoint(plain(x))
            cg_reps = max(1, args.repeats // 2)
            rows.append((name, f"CG {args.cg_iters} it, plain",
                         median_time(lambda: cg(plain.normal, b, args.cg_iters), cg_reps, warmup=0)))
            rows.append((name, f"CG {args.cg_iters} it, Toeplitz",
                         median_time(lambda: cg(toep.normal, b, args.cg_iters), cg_reps, warmup=0)))
            xp, xt = cg(plain.normal, b, args.cg_iters), cg(toep.normal, b, args.cg_iters)
            cg_diff = float(torch.linalg.vector_norm(xp - xt) / torch.linalg.vector_norm(xp))
            notes.append(f"{name}: Toeplitz normal vs adjoint∘forward rel. diff {err:.1e}; "
                         f"CG solutions differ by {cg_diff:.1e}")

        if shutil.which("bart") and not args.no_bart:
            threads = torch.get_num_threads()
            env = dict(os.environ, OMP_NUM_THREADS=str(threads))
            with tempfile.TemporaryDirectory(prefix="bench_bart_") as tmp:
                d = Path(tmp)
                img, bt = bart_arrays(coil_images, traj)
                writecfl(d / "img", img)
                writecfl(d / "traj", bt)
                fwd = ["nufft", str(d / "traj"), str(d / "img"), str(d / "ksp")]
                adj = ["nufft", "-a", "-d", f"{n}:{n}:1", str(d / "traj"), str(d / "ksp"), str(d / "adj")]
                run_bart(fwd, env)
                reps = max(1, min(args.repeats, 3))
                for label, cmd in (("nufft forward", fwd), ("nufft adjoint", adj)):
                    rows.append(("bart", label, median_time(lambda: run_bart(cmd, env), reps, warmup=0)))
                kb = bart_from_ours(readcfl(d / "ksp"), F, C)
                ours = get_backend(backends[-1]).forward(coil_images, traj).numpy()
                s, e = scaled_rel_error(kb, ours)
                mib = (img.nbytes + 2 * F * C * M * 8) / 2 ** 20
                notes.append(f"bart (OMP_NUM_THREADS={threads}): times are subprocess wall time incl. "
                             f"start-up and cfl file I/O ({mib:.1f} MiB per call); "
                             f"BART forward = {abs(s):.3f}·exp(i{np.angle(s):+.3f}) × ours "
                             f"({backends[-1]}), residual {e:.1e}")

    times = {(b, op): t for b, op, t in rows}
    paired = [r for r in rows if r[0] == "ours/bare paired"]
    rows = [r for r in rows if r[0] != "ours/bare paired"]
    for _, op, ratio in paired:
        notes.append(f"{op}: our finufft operator / bare finufft call (same points, batch, threads, eps) = "
                     f"{ratio:.2f}x paired median (separate medians: "
                     f"{times[('finufft', op)] / times[('finufft bare', op)]:.2f}x; target <= 1.2x)")
    fastest: dict[str, float] = {}
    for _, op, t in rows:
        key = _op_key(op)
        fastest[key] = min(t, fastest.get(key, math.inf))
    print()
    print(f"| {'backend':<13} | {'operation':<24} | {'median ms':>10} | {'x fastest':>9} |")
    print(f"|{'-' * 15}|{'-' * 26}|{'-' * 11}:|{'-' * 10}:|")
    for be_name, op, t in rows:
        print(f"| {be_name:<13} | {op:<24} | {t * 1e3:>10.1f} | {t / fastest[_op_key(op)]:>9.2f} |")
    print()
    print("ratios: to the fastest entry of the same operation in this run; 'normal' rows and CG rows share a "
          "column each (plain vs Toeplitz, across backends)")
    for note in notes:
        print("note:", note)
    return 0


def _op_key(op: str) -> str:
    if op.startswith("SENSE normal"):
        return "normal"
    if op.startswith("CG"):
        return "cg"
    return op


if __name__ == "__main__":
    sys.exit(main())
