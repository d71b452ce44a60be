"""Load every chain file Gadgetron ships and print a table: loaded (our gadgets) / refused (reason).

Usage::

    python -m bench.gadgetron_chains [--repo GIT_DIR | --dir FOLDER] [--build] [--json OUT.json]
    python -m bench.gadgetron_chains --quality [--chains default Generic_Cartesian_Grappa.xml …] [--json OUT.json]

``--repo`` reads ``*/config/*.xml`` from a bare Gadgetron mirror (``fetch github:gadgetron/gadgetron``:
``/work/.mirror/gadgetron+gadgetron/repo`` by default) with ``git show``; ``--dir`` reads a folder of
XML files (e.g. ``tests/data/gadgetron_chains``). ``--build`` also instantiates each loaded chain's
gadgets (parameters checked by each gadget). No file may crash the loader: anything other than a
ChainError is reported as ``CRASH`` and makes the exit status 1.

``--quality``: the Debian Shepp-Logan phantom (``ismrmrd_generate_cartesian_shepp_logan -m 128 -c 8
-a R -w 24 -C -n 0.02``, R = 2 and 4, calibration lines) through the shipped chains (offline runner),
PSNR of each repetition's image against the file's ``phantom`` (one least-squares scale), next to
BART ``pics -l2 -r 0.01`` SENSE (``ecalib`` maps from the 24 calibration lines) on the same prewhitened,
oversampling-removed k-space (imaging + calibration lines).
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Iterator

from gadgets.base import ChainError
from gadgets.stream.chain import build_chain, chain_context, parse_chain_text

DEFAULT_REPO = Path("/work/.mirror/gadgetron+gadgetron/repo")


def repo_chain_files(git_dir: Path) -> Iterator[tuple[str, str]]:
    """(path, text) of every ``config/*.xml`` at the mirror's HEAD."""
    names = subprocess.run(["git", f"--git-dir={git_dir}", "ls-tree", "-r", "--name-only", "HEAD"], check=True,
                           capture_output=True, text=True).stdout.split()
    for name in sorted(n for n in names if "/config/" in n and n.endswith(".xml")):
        text = subprocess.run(["git", f"--git-dir={git_dir}", "show", f"HEAD:{name}"], check=True,
                              capture_output=True).stdout.decode("utf-8", "replace")
        yield name, text


def dir_chain_files(folder: Path) -> Iterator[tuple[str, str]]:
    for p in sorted(folder.rglob("*.xml")):
        yield str(p.relative_to(folder)), p.read_text(encoding="utf-8", errors="replace")


def classify(name: str, text: str, build: bool = False) -> dict[str, str]:
    """``{"file", "status": loaded|refused|CRASH, "detail"}`` for one chain file."""
    try:
        spec = parse_chain_text(text, Path(name).name)
        if build:
            build_chain(spec, chain_context(spec, "cpu"))
        return {"file": name, "status": "loaded", "detail": " -> ".join(spec.gadget_names)}
    except ChainError as exc:
        return {"file": name, "status": "refused", "detail": str(exc).split("\n")[0]}
    except Exception as exc:  # noqa: BLE001 - the point is to report any crash
        return {"file": name, "status": "CRASH", "detail": f"{type(exc).__name__}: {exc}"}


def shepp_logan(folder: Path, accel: int, matrix: int = 128, coils: int = 8, calib: int = 24,
                noise: float = 0.02) -> Path:
    """The Debian generator's phantom file (ismrmrd-tools), R = ``accel``, with calibration lines."""
    out = folder / f"shepp_logan_r{accel}.h5"
    subprocess.run(["ismrmrd_generate_cartesian_shepp_logan", "-m", str(matrix), "-c", str(coils), "-a", str(accel),
                    "-w", str(calib), "-C", "-n", str(noise), "-o", str(out)], check=True, capture_output=True,
                   cwd=folder)
    return out


def phantom_of(path: Path):
    """The generator's ``phantom`` dataset as a magnitude tensor ``[Ny, Nx]``."""
    import h5py
    import numpy as np
    import torch

    with h5py.File(path, "r") as f:
        ph = f["dataset/phantom"][:]
    return torch.from_numpy(np.abs(ph["real"] + 1j * ph["imag"])[0].astype(np.float32))


def psnr_vs_phantom(image, gt) -> float:
    """PSNR (dB) of a magnitude image after one least-squares scale to the phantom."""
    import torch

    from recon_core import metrics

    import numpy as np

    x = torch.from_numpy(np.abs(np.asarray(image)).astype(np.float32))
    return float(metrics.psnr(metrics.scale_to_reference(x, gt), gt))


def chain_psnrs(chain: str, path: Path) -> list[tuple[int, int, float]]:
    """(repetition, series index, PSNR) of every image of ``chain`` on ``path`` (image series only)."""
    from gadgets.offline import run_offline
    from gadgets.stream.chain import load_chain

    gt = phantom_of(path)
    res = run_offline(load_chain(chain, allow_paths=True), path, None)
    out = []
    for im in res.images:
        head = im.getHead()
        if "GFactor" in (im.attribute_string or "") or head.image_series_index >= 10:
            continue                       # g-factor / SNR / std maps
        out.append((int(head.repetition), int(head.image_series_index), psnr_vs_phantom(im.data[0, 0], gt)))
    return out


def bart_psnrs(path: Path, filtered: bool = False) -> list[float]:
    """BART pics l2-SENSE per repetition on the k-space our buffer sorts (prewhitened, oversampling
    removed), imaging + calibration lines, ecalib maps from the calibration block. ``filtered``: the
    BART image then gets the Gaussian k-space filter of Gadgetron's generic chains (RO and E1, sigma
    1), for a like-for-like comparison with chains that apply it."""
    import ismrmrd
    import torch

    from bench.bart import BartSession
    from gadgets.buffer import BufferGadget
    from gadgets.ismrmrd_io import read_ismrmrd
    from gadgets.noise import NoiseGadget
    from gadgets.oversampling import RemoveOversamplingGadget
    from gadgets.base import ChainContext

    header, acqs, _ = read_ismrmrd(path)
    ctx = ChainContext(header=ismrmrd.xsd.CreateFromDocument(header), header_xml=header)
    gadgets = [NoiseGadget(ctx=ctx), RemoveOversamplingGadget(ctx=ctx), BufferGadget(ctx=ctx)]

    def push(msgs, i):
        for m in msgs:
            if i == len(gadgets):
                yield m
            else:
                yield from push(gadgets[i].handle(m), i + 1)

    bufs = [b for a in acqs for b in push([a], 0)]
    for i, g in enumerate(gadgets):
        bufs += list(push(g.flush(), i + 1))
    gt = phantom_of(path)
    out = []
    with BartSession() as bart:
        for b in bufs:
            k = b.kspace[0].clone()                              # [C, Ny, Nx]
            cal = b.calibration
            ny = k.shape[-2]
            if cal is not None:
                r0 = ny // 2 - cal.shape[-2] // 2
                rows = slice(r0, r0 + cal.shape[-2])
                empty = k[:, rows].abs().sum(dim=(0, 2)) == 0
                k[:, rows] = torch.where(empty[None, :, None], cal, k[:, rows])
            calib = (cal.shape[-2], cal.shape[-1]) if cal is not None else (24, 24)
            maps, _ = bart.ecalib(k, calib)
            img, _ = bart.pics(k[None], maps, ("-l2", "-r", "0.01"))
            if filtered:
                from gadgets.image_ops import KSpaceFilterGadget, KSpaceFilterParams
                from gadgets.messages import ImageSeries

                kf = KSpaceFilterGadget(KSpaceFilterParams(ro="gaussian", e1="gaussian"), ctx)
                img = next(iter(kf.process(ImageSeries(images=img.to(torch.complex64), meta=dict(b.meta))))).images
            out.append(psnr_vs_phantom(img[0], gt))
    return out


QUALITY_CHAINS = ("default", "default.xml", "Generic_Cartesian_Grappa.xml", "Generic_Cartesian_Grappa_T2W.xml",
                  "grappa_cpu.xml")


def quality(chains: list[str], folder: Path) -> dict:
    """Per-repetition PSNR of each chain and of BART at R = 2 and 4 (see the module docstring)."""
    import time

    result: dict = {}
    for accel in (2, 4):
        path = shepp_logan(folder, accel)
        row: dict = {"bart_pics_l2": bart_psnrs(path), "bart_pics_l2_kfilter": bart_psnrs(path, filtered=True)}
        for c in chains:
            t0 = time.perf_counter()
            row[c] = {"psnr": [p for _, _, p in chain_psnrs(c, path)], "time_s": time.perf_counter() - t0}
        result[f"R{accel}"] = row
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repo", type=Path, default=None, help="bare Gadgetron git mirror")
    ap.add_argument("--dir", type=Path, default=None, help="folder of chain XML files instead")
    ap.add_argument("--build", action="store_true", help="also build each loaded chain's gadgets")
    ap.add_argument("--json", type=Path, default=None, help="write the table as JSON here")
    ap.add_argument("--quality", action="store_true", help="PSNR of the shipped chains vs BART on the "
                                                           "phantom")
    ap.add_argument("--chains", nargs="*", default=list(QUALITY_CHAINS), help="chains for --quality")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    if args.quality:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            res = quality(args.chains, Path(tmp))
        for r, row in res.items():
            bart, bart_f = row["bart_pics_l2"], row["bart_pics_l2_kfilter"]
            print(f"{r}: {'BART pics -l2 -r 0.01':<36} " + "  ".join(f"{p:.2f}" for p in bart))
            print(f"{r}: {'BART pics + Gaussian k-space filter':<36} " + "  ".join(f"{p:.2f}" for p in bart_f))
            for c in args.chains:
                ps = row[c]["psnr"]
                ref = bart_f if c.startswith("Generic_") else bart
                print(f"{r}: {c:<36} " + "  ".join(f"{p:.2f}" for p in ps) +
                      f"   (worst repetition vs BART{' + filter' if ref is bart_f else ''}: "
                      f"{min(a - b for a, b in zip(ps, ref)):+.2f} dB, {row[c]['time_s']:.1f} s)")
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(res, indent=1))
        return 0
    if args.dir is not None:
        files = list(dir_chain_files(args.dir))
    else:
        repo = args.repo or DEFAULT_REPO
        if not repo.exists():
            print(f"no Gadgetron mirror at {repo} (fetch github:gadgetron/gadgetron, or use --dir)", file=sys.stderr)
            return 2
        files = list(repo_chain_files(repo))
    rows = [classify(n, t, args.build) for n, t in files]
    width = max((len(r["file"]) for r in rows), default=10)
    for r in rows:
        print(f"{r['file']:<{width}}  {r['status']:<7}  {r['detail'][:160]}")
    counts = {s: sum(r["status"] == s for r in rows) for s in ("loaded", "refused", "CRASH")}
    print(f"\n{len(rows)} files: {counts['loaded']} loaded, {counts['refused']} refused, {counts['CRASH']} "
          "crashed")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"counts": counts, "rows": rows}, indent=1))
    return 1 if counts["CRASH"] else 0


if __name__ == "__main__":
    sys.exit(main())
