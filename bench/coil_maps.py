"""Coil maps of the shipped chains against BART ``ecalib``: CG-SENSE PSNR per case, with the spread.

For each case a phantom scan is written as an ISMRMRD file and reconstructed through the product's
path (:func:`gadgets.offline.run_offline`): the chain as shipped (CG-SENSE with the chain's own coil
maps) and the same chain with ``method: zero_filled``. BART gets the very k-space the chain's
``coil_estimate`` gadget sees (the chain's gadgets up to it: prewhitened, oversampling removed,
sorted), ``bart ecalib`` on the time-averaged k-space (Cartesian: the fully sampled centre of the
union of all frames' lines, at most 24 × 24; non-Cartesian: the centre of the DCF-weighted gridding
of all frames) and ``bart pics -S -l2 -r 0.01``. PSNR: magnitude, one least-squares scale to the
ground truth inside the body (as ``torchgadgets demo``), per frame, averaged.

Cases: Cartesian cine with few calibration lines per frame (variable-density random lines plus
``acs`` central lines flagged as calibration, several seeds / coil counts / accelerations / noise
levels), golden-angle radial and spiral cine. Command::

    python -m bench.coil_maps [--matrix 96] [--frames 12] [--cases cart0 radial …] [--no-bart]
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gadgets.ismrmrd_io import iter_ismrmrd, parse_header, scan_to_ismrmrd, write_ismrmrd
from gadgets.messages import KSpaceBuffer
from gadgets.offline import run_offline
from gadgets.stream.chain import ChainSpec, build_chain, chain_context, load_chain
from recon_core import metrics
from recon_core.phantoms import PhantomScan, simulate_scan
from recon_core.trajectories import acs_region

#: name → (chain, simulate_scan keywords). Cartesian: ``acs`` central lines per frame + random lines.
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "cart0": ("default", dict(kind="cartesian", n_coils=12, accel=8, acs_lines=6, seed=0)),
    "cart1": ("default", dict(kind="cartesian", n_coils=12, accel=8, acs_lines=8, seed=1)),
    "cart2": ("default", dict(kind="cartesian", n_coils=8, accel=8, acs_lines=6, seed=2)),
    "cart3": ("default", dict(kind="cartesian", n_coils=8, accel=6, acs_lines=8, seed=3)),
    "cart4": ("default", dict(kind="cartesian", n_coils=12, accel=10, acs_lines=4, seed=4, noise_std=0.02)),
    "cart5": ("default", dict(kind="cartesian", n_coils=8, accel=6, acs_lines=4, seed=5, noise_std=0.005)),
    "radial": ("radial_cine_cg_sense", dict(kind="radial", n_coils=12, spokes_per_frame=13, seed=0)),
    "spiral": ("spiral_cine_cg_sense", dict(kind="spiral", n_coils=12, interleaves=32,
                                            interleaves_per_frame=4, seed=0)),
}


def with_method(spec: ChainSpec, **params: Any) -> ChainSpec:
    """A copy of ``spec`` whose recon gadget runs with ``params`` (e.g. ``method="zero_filled"``)."""
    out = copy.deepcopy(spec)
    for g in out.gadgets:
        if g.gadget == "recon":
            g.params = dict(params)
    return out


def chain_buffers(spec: ChainSpec, path: Path) -> list[KSpaceBuffer]:
    """The k-space buffers that reach ``coil_estimate`` in ``spec`` for the file ``path``."""
    head = copy.deepcopy(spec)
    cut = [g.gadget for g in head.gadgets].index("coil_estimate")
    head.gadgets = head.gadgets[:cut]
    stream = iter_ismrmrd(path, "dataset")
    xml = next(stream)
    ctx = chain_context(head, default_device="cpu", header=parse_header(xml, str(path)), header_xml=xml)
    gadgets = build_chain(head, ctx)

    def through(msgs: list[Any], start: int) -> list[Any]:
        for g in gadgets[start:]:
            msgs = [o for m in msgs for o in g.handle(m)]
        return msgs

    out = []
    for msg in stream:
        out += through([msg], 0)
    for i, g in enumerate(gadgets):
        out += through(list(g.flush()), i + 1)
    return [b for b in out if isinstance(b, KSpaceBuffer)]


def score(images: torch.Tensor, scan: PhantomScan) -> float:
    """PSNR (dB) after one least-squares scale to the ground truth inside the body."""
    gt = scan.ground_truth.abs()
    x = metrics.scale_to_reference(images.abs().to(torch.float32).cpu(), gt, scan.body_mask)
    return float(metrics.psnr(x, gt))


def _images(res: Any) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(im.data[0, 0], dtype=np.float32) for im in res.images]))


def _meta(res: Any, name: str) -> str:
    m = re.search(rf"<name>{name}</name><value>([^<]*)</value>", res.images[0].attribute_string)
    return m.group(1) if m else "-"


def bart_sense(buf: KSpaceBuffer, calib: int = 24) -> torch.Tensor:
    """``bart ecalib`` on the time-averaged data of ``buf``, then ``bart pics -S -l2 -r 0.01``."""
    from bench.bart import BART_VARIANTS, BartSession

    args = BART_VARIANTS["bart_l2"].args
    with BartSession() as b:
        if buf.is_cartesian:
            mask = buf.mask.cpu()
            ksp = buf.kspace.cpu() * mask[:, None]
            counts = mask.sum(0)
            avg = ksp.sum(0) / counts.clamp_min(1)[None]
            region = acs_region(counts > 0, max_size=calib)
            if region is None:
                raise ValueError("no fully sampled centre in the time-averaged k-space")
            (y0, y1), (x0, x1) = region
            maps, _ = b.ecalib(avg * (counts > 0), (y1 - y0, x1 - x0))
            img, _ = b.pics(ksp, maps, args)
        else:
            maps, _ = b.ecalib_noncart(buf.kspace.cpu(), buf.trajectory.cpu(), buf.dcf.cpu(), buf.matrix,
                                       calib)
            img, _ = b.pics(buf.kspace.cpu(), maps, args, traj=buf.trajectory.cpu())
    return img


def run_case(name: str, matrix: int, frames: int, bart: bool, workdir: Path) -> dict[str, Any]:
    chain_name, kw = CASES[name]
    kw = dict(kw)
    kind = kw.pop("kind")
    scan = simulate_scan(kind, matrix=matrix, n_frames=frames, **kw)
    path = workdir / f"{name}.h5"
    header, acqs = scan_to_ismrmrd(scan)
    write_ismrmrd(path, header, acqs, ground_truth=scan.ground_truth, overwrite=True)
    spec = load_chain(chain_name)
    t0 = time.perf_counter()
    ours = run_offline(spec, path, None, device="cpu")
    t_ours = time.perf_counter() - t0
    zf = run_offline(with_method(spec, method="zero_filled"), path, None, device="cpu")
    row = dict(case=name, chain=chain_name, kind=kind, coils=kw.get("n_coils"), seed=kw.get("seed"),
               detail=(f"R={kw['accel']} acs={kw['acs_lines']} noise={kw.get('noise_std', 0.01)}"
                       if kind == "cartesian" else
                       f"{kw.get('spokes_per_frame', kw.get('interleaves_per_frame'))}/frame"),
               ours=score(_images(ours), scan), zf=score(_images(zf), scan), t_ours=t_ours,
               maps=_meta(ours, "CoilMaps"), calib=_meta(ours, "CoilCalibration"),
               coverage=_meta(ours, "CoilMapCoverage"), bart=float("nan"))
    if bart:
        (buf,) = chain_buffers(spec, path)
        row["bart"] = score(bart_sense(buf), scan)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--matrix", type=int, default=96)
    ap.add_argument("--frames", type=int, default=12)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--no-bart", action="store_true")
    args = ap.parse_args(argv)
    from bench.bart import bart_available

    bart = bart_available() and not args.no_bart
    rows = []
    with tempfile.TemporaryDirectory(prefix="tg_coilmaps_") as tmp:
        for name in args.cases:
            r = run_case(name, args.matrix, args.frames, bart, Path(tmp))
            rows.append(r)
            print(f"[{name}] ours {r['ours']:.2f}  zero-filled {r['zf']:.2f}  BART {r['bart']:.2f}  "
                  f"maps {r['maps']} ({r['calib']}, coverage {r['coverage']})", file=sys.stderr, flush=True)
    print(f"CG-SENSE PSNR (dB), {args.matrix}², {args.frames} frames; ours = the chain as shipped (its own "
          f"coil maps); BART = ecalib (time-averaged) + pics -l2 -r 0.01 on the same k-space")
    print(f"{'case':<8} {'chain':<22} {'coils':>5} {'setting':<26} {'zero-f':>7} {'ours':>7} {'BART':>7} "
          f"{'ours-zf':>8} {'ours-BART':>9}  maps / calibration / coverage")
    for r in rows:
        print(f"{r['case']:<8} {r['chain']:<22} {r['coils']:>5} {r['detail']:<26} {r['zf']:7.2f} "
              f"{r['ours']:7.2f} {r['bart']:7.2f} {r['ours'] - r['zf']:8.2f} {r['ours'] - r['bart']:9.2f}  "
              f"{r['maps']} / {r['calib']} / {r['coverage']}")
    gain = np.array([r["ours"] - r["zf"] for r in rows])
    print(f"ours - zero-filled: min {gain.min():.2f}, median {np.median(gain):.2f}, max {gain.max():.2f} dB")
    if bart:
        diff = np.array([r["ours"] - r["bart"] for r in rows])
        print(f"ours - BART:        min {diff.min():.2f}, median {np.median(diff):.2f}, "
              f"max {diff.max():.2f} dB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
