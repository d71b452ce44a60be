"""GRAPPA benchmark: quality and time of ``grappa`` against our CG-SENSE, BART ``pics`` SENSE and the
direct k-space GRAPPA reference, on the data GRAPPA is for (uniform ky undersampling + calibration).

Run::

    python -m bench.grappa --json /tmp/me/grappa.json                  # all cases (~5-10 min on 2 cores)
    python -m bench.grappa --cases debian_r2 debian_r4 brain_r4 --no-bart

Cases:

* ``debian_r2`` / ``debian_r4``: ``ismrmrd_generate_cartesian_shepp_logan -m 128 -c 8 -a R -w 24 -C
  -n 0.02`` (Debian ismrmrd-tools): R interleaved repetitions of R-fold data with 24 calibration lines
  each, one image per repetition (the chains do not merge repetitions). Reference: the file's
  ``phantom`` × the root-sum-of-squares of its ``csm`` (what a perfect SENSE-type combination of the
  prewhitened data gives).
* ``phantom_r{2,3,4}_s{seed}``: :func:`recon_core.phantoms.simulate_scan` Cartesian, 128², 12 coils,
  uniform R with 24 embedded ACS lines, correlated coil noise and a noise scan (the bench.quality
  phantom pipeline; reference = object × whitened receive profile).
* ``brain_r4``: the real 16-channel brain (``/work/shared/data``, evaluation only), uniform R = 4 with
  24 embedded ACS lines; reference = the fully sampled file through the ``default`` chain.

Rows (every one of ours runs through a chain by ``run_offline``, noise prewhitening and the chain's
ESPIRiT maps included): ``grappa`` (``cartesian_grappa``), ``grappa_kspace`` (the same chain with
``domain: kspace``: the kernel convolved in k-space, acquired lines put back), ``cg_sense`` (the
``default`` chain's recon, 30 CG iterations with λ = 0.01, in the same per-repetition chain),
``zero_filled``; ``bart_l2`` = ``bart pics -l2 -r 0.01``
with ``bart ecalib`` maps on the same calibration data and the same prewhitened k-space as the recon
gadget gets (see :mod:`bench.bart`). Metrics: PSNR / SSIM of magnitudes after one least-squares scale
inside the support, averaged over a case's images; ``time s`` = the recon gadget's ``ReconTime_s``
(BART: process wall time). The table ends with ``grappa − bart_l2`` and ``grappa − cg_sense`` in dB
and the time ratios. Timings are wall time on whatever machine runs this (noisy when shared).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

Tensor = torch.Tensor

SEEDS = (0, 1, 2)
PHANTOM_R = (2, 3, 4)
DEBIAN_R = (2, 4)
ALL_CASES = ([f"debian_r{r}" for r in DEBIAN_R] + [f"phantom_r{r}_s{s}" for r in PHANTOM_R for s in SEEDS]
             + ["brain_r4"])
OURS = ("grappa", "grappa_kspace", "cg_sense", "zero_filled")


def _ours_spec(row_name: str):
    """(chain name, method, params) of one of our rows."""
    if row_name == "grappa":
        return "cartesian_grappa", "grappa", {}
    if row_name == "grappa_kspace":
        return "cartesian_grappa", "grappa", {"domain": "kspace"}
    if row_name == "cg_sense":   # the recon of the `default` chain, in the same per-repetition chain
        return "cartesian_grappa", "cg_sense", {"max_iter": 30, "lam": 0.01}
    return "cartesian_grappa", "zero_filled", {}


#: extra ``buffer`` parameters for every row (``--acs-in-data``: calibration-only lines join the
#: imaging k-space, for the buffer gadget versions that have that option)
BUFFER_EXTRA: dict[str, Any] = {}


def _chain(chain: str, method: str, params: dict[str, Any]):
    import copy

    from gadgets.stream.chain import load_chain

    spec = copy.deepcopy(load_chain(chain))
    for g in spec.gadgets:
        if g.gadget == "buffer" and BUFFER_EXTRA:
            g.params = {**(g.params or {}), **BUFFER_EXTRA}
        if g.gadget == "recon":
            own = dict(g.params or {}) if (g.params or {}).get("method") == method else {}
            g.params = {**own, "method": method, **params}
    spec.name = f"{chain}+{method}"
    return spec


def _scale_metrics(images: Tensor, refs: Tensor, support: Tensor) -> tuple[float, float]:
    from recon_core.metrics import psnr, scale_to_reference, ssim

    ps, ss = [], []
    for i in range(images.shape[0]):
        g = refs[min(i, refs.shape[0] - 1)].abs()
        x = scale_to_reference(images[i].abs(), g, support)
        ps.append(float(psnr(x, g)))
        ss.append(float(ssim(x, g)))
    return float(np.mean(ps)), float(np.mean(ss))


def _meta(attr: str, name: str) -> str:
    import re

    m = re.search(rf"<name>{re.escape(name)}</name>\s*<value>([^<]*)</value>", attr or "")
    return m.group(1) if m else ""


def run_ours(row_name: str, path: Path, refs: Tensor, support: Tensor, device: str) -> dict[str, Any]:
    from gadgets.offline import run_offline

    chain, method, params = _ours_spec(row_name)
    res = run_offline(_chain(chain, method, params), path, None, device=device)
    x = torch.from_numpy(np.stack([np.asarray(im.data[0, 0]) for im in res.images]))
    p, s = _scale_metrics(x, refs, support)
    secs = [float(_meta(im.attribute_string, "ReconTime_s") or "nan") for im in res.images]
    return {"method": row_name, "chain": f"{chain} ({method}{', ' + str(params) if params else ''})",
            "psnr": p, "ssim": s, "seconds": float(np.nansum(secs)), "images": len(res.images)}


def chain_buffers(path: Path, device: str = "cpu") -> list[Any]:
    """The prewhitened k-space buffers (one per slice/repetition) that the recon gadget of
    ``cartesian_grappa`` receives: noise → remove_oversampling → buffer."""
    from gadgets.ismrmrd_io import iter_ismrmrd, parse_header
    from gadgets.messages import KSpaceBuffer
    from gadgets.stream.chain import build_chain, chain_context

    spec = _chain("cartesian_grappa", "grappa", {})
    spec.gadgets = [g for g in spec.gadgets if g.gadget in ("noise", "remove_oversampling", "buffer")]
    stream = iter_ismrmrd(path)
    xml = next(stream)
    ctx = chain_context(spec, default_device=device, header=parse_header(xml, str(path)), header_xml=xml)
    gadgets = build_chain(spec, ctx)
    out: list[Any] = []

    def through(msgs: list[Any], start: int) -> None:
        for g in gadgets[start:]:
            nxt: list[Any] = []
            for m in msgs:
                nxt.extend(g.handle(m))
            msgs = nxt
        out.extend(m for m in msgs if isinstance(m, KSpaceBuffer))

    for msg in stream:
        through([msg], 0)
    for i, g in enumerate(gadgets):
        through(list(g.flush()), i + 1)
    return out


def run_bart_l2(bufs: Sequence[Any], refs: Tensor, support: Tensor) -> dict[str, Any]:
    """``bart ecalib`` on each buffer's calibration (its flagged block, else the embedded ACS) and
    ``bart pics -l2 -r 0.01`` on its k-space (the same prewhitened data our recon gets)."""
    from bench import bart as B
    from bench.quality import espirit_kernel
    from recon_core.trajectories import acs_region

    images, secs = [], 0.0
    with B.BartSession() as sess:
        for buf in bufs:
            k = buf.kspace[:, :, :, :].cpu()                     # [1, C, Ny, Nx]
            _, c, ny, nx = k.shape
            calib = torch.zeros(c, ny, nx, dtype=torch.complex64)
            if buf.calibration is not None:
                blk = buf.calibration.cpu()
                sy, sx = blk.shape[-2:]
                y0, x0 = ny // 2 - sy // 2, nx // 2 - sx // 2
                calib[:, y0:y0 + sy, x0:x0 + sx] = blk
            else:
                (y0, y1), (x0, x1) = acs_region(buf.mask.cpu())
                calib[:, y0:y1, x0:x1] = k[0, :, y0:y1, x0:x1]
                sy, sx = y1 - y0, x1 - x0
            size = (min(sy, 24), min(sx, 24))
            maps, call = sess.ecalib(calib, size, extra=("-k", "{0}:{0}:1".format(espirit_kernel(*size))))
            secs += call.seconds
            x, call = sess.pics(k, maps, B.BART_VARIANTS["bart_l2"].args, tag="l2")
            secs += call.seconds
            images.append(x[0])
    x = torch.stack(images)
    p, s = _scale_metrics(x, refs, support)
    return {"method": "bart_l2", "chain": "bart ecalib + pics -l2 -r 0.01", "psnr": p, "ssim": s,
            "seconds": secs, "images": len(images)}


def make_case(name: str, workdir: Path) -> tuple[Path, Tensor, Tensor, str]:
    """(ISMRMRD file, references [n, Ny, Nx], support [Ny, Nx], description) of case ``name``."""
    if name.startswith("debian_r"):
        import h5py

        r = int(name.split("_r")[1])
        path = workdir / f"shepp_logan_r{r}.h5"
        path.unlink(missing_ok=True)   # the generator appends to an existing file
        subprocess.run(["ismrmrd_generate_cartesian_shepp_logan", "-m", "128", "-c", "8", "-a", str(r), "-w",
                        "24", "-C", "-n", "0.02", "-o", str(path)], check=True, capture_output=True,
                       cwd=workdir)
        with h5py.File(path, "r") as f:
            ph, csm = f["dataset/phantom"][:], f["dataset/csm"][:]
        obj = np.abs(ph["real"] + 1j * ph["imag"])[0]
        prof = np.sqrt((np.abs(csm["real"] + 1j * csm["imag"]) ** 2).sum(axis=(0, 1)))
        ref = torch.from_numpy((obj * prof).astype(np.float32))[None]
        desc = f"Debian Shepp-Logan 128², 8 coils, R={r}, 24 cal. lines, noise 0.02"
        return path, ref, torch.from_numpy(obj > 0), desc
    from bench import quality as Q

    if name == "brain_r4":
        case = Q.make_case("brain_r4", use_cache=False)
        sup = case.support if case.support.ndim == 2 else case.support[0]
        return Path(case.input_path), case.ground_truth, sup, case.desc
    r, seed = (int(v) for v in name[len("phantom_r"):].split("_s"))
    spec = dict(kind="cartesian", accel=r, acs_lines=24, mask_kind="uniform",
                desc=f"phantom uniform R={r}, 24 ACS, seed {seed}")
    case = Q._phantom_case(name, spec, small=False, seed=seed, frames=1, use_cache=False)
    sup = case.support if case.support.ndim == 2 else case.support[0]
    return Path(case.input_path), case.ground_truth, sup, case.desc


def run(cases: Sequence[str], bart: bool = True, device: str = "cpu", log=print) -> list[dict[str, Any]]:
    from bench.bart import bart_available

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="tg_grappa_") as tmp:
        for name in cases:
            path, refs, support, desc = make_case(name, Path(tmp))
            for m in OURS:
                row = run_ours(m, path, refs, support, device)
                rows.append({"case": name, "desc": desc, **row})
                log(f"{name:16s} {m:14s} {row['psnr']:6.2f} dB  {row['ssim']:.4f}  {row['seconds']:.2f} s")
            if bart and bart_available():
                row = run_bart_l2(chain_buffers(path), refs, support)
                rows.append({"case": name, "desc": desc, **row})
                log(f"{name:16s} {'bart_l2':14s} {row['psnr']:6.2f} dB  {row['ssim']:.4f}  "
                    f"{row['seconds']:.2f} s")
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    by_case: dict[str, dict[str, dict[str, Any]]] = {}
    for r in rows:
        by_case.setdefault(r["case"], {})[r["method"]] = r
    cols = ["grappa", "grappa_kspace", "cg_sense", "bart_l2", "zero_filled"]
    head = (f"{'case':16s} " + " ".join(f"{c:>13s}" for c in cols)
            + "  Δ bart dB  Δ cg dB  Δ kspace dB  t grappa s  t bart/grappa  t cg/grappa")
    lines = ["PSNR dB / SSIM per method (mean over the case's images); Δ = grappa − other", head]
    for case, d in by_case.items():
        cells = []
        for c in cols:
            r = d.get(c)
            cells.append(f"{r['psnr']:6.2f}/{r['ssim']:.3f}" if r else f"{'—':>13s}")
        g = d.get("grappa")

        def delta(o: str) -> str:
            return f"{g['psnr'] - d[o]['psnr']:+.2f}" if g and o in d else "—"

        def ratio(o: str) -> str:
            return f"{d[o]['seconds'] / g['seconds']:.1f}" if g and o in d and g["seconds"] > 0 else "—"

        lines.append(f"{case:16s} " + " ".join(f"{c:>13s}" for c in cells)
                     + f"  {delta('bart_l2'):>9s}  {delta('cg_sense'):>7s}  {delta('grappa_kspace'):>11s}"
                     + f"  {g['seconds'] if g else float('nan'):10.3f}  {ratio('bart_l2'):>13s}"
                     + f"  {ratio('cg_sense'):>11s}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.grappa", description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", nargs="+", default=list(ALL_CASES), help=f"cases (default: all: {ALL_CASES})")
    ap.add_argument("--no-bart", action="store_true", help="leave out the BART rows")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--acs-in-data", action="store_true",
                    help="buffer acs_in_data: calibration-only lines also in the imaging k-space "
                         "(all rows, BART too)")
    ap.add_argument("--json", type=Path, required=True, help="where to write the result rows (JSON)")
    a = ap.parse_args(argv)
    generator = "ismrmrd_generate_cartesian_shepp_logan"
    if any(c.startswith("debian") for c in a.cases) and shutil.which(generator) is None:
        print(f"{generator} not installed: leaving out the debian cases", file=sys.stderr)
        a.cases = [c for c in a.cases if not c.startswith("debian")]
    if a.acs_in_data:
        BUFFER_EXTRA["acs_in_data"] = True
    t0 = time.perf_counter()
    rows = run(a.cases, bart=not a.no_bart, device=a.device)
    print(format_table(rows))
    print(f"total {time.perf_counter() - t0:.0f} s")
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps({"rows": rows, "cases": list(a.cases)}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
