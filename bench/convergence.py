"""Convergence of a long-running method: PSNR/SSIM of its progress previews every N steps.

Uses the quality benchmark's cases and chains (``bench.quality.make_case``, ``chain_for``: the fit runs
through ``run_offline`` as ``torchgadgets run`` would) and the ``preview`` that methods attach to progress
events (``preview_every``), so the fit is run once and sampled along the way::

    python -m bench.convergence --case radial21 --method tdip --every 250 \\
        --param n_steps=3000 --param channels=64 --param lr_step=1000
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Optional, Sequence

import torch


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line entry point (``python -m bench.convergence``)."""
    import numpy as np

    from bench.quality import CASES, _metrics, chain_for, make_case
    from gadgets.offline import run_offline
    from recon_core.device import resolve_device
    from recon_core.methods import ProgressEvent

    ap = argparse.ArgumentParser(prog="python -m bench.convergence", description=__doc__.split("\n")[0])
    ap.add_argument("--case", default="radial21", choices=list(CASES))
    ap.add_argument("--method", default="tdip", help="a method with a 'preview_every' parameter")
    ap.add_argument("--every", type=int, default=250, help="steps between previews")
    ap.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                    help="method parameter (repeatable; VALUE parsed as JSON if possible)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    params: dict[str, Any] = {}
    for item in args.param:
        key, sep, val = item.partition("=")
        if not sep:
            ap.error(f"--param {item!r}: expected NAME=VALUE")
        try:
            params[key] = json.loads(val)
        except json.JSONDecodeError:
            params[key] = val
    params["preview_every"] = args.every
    dev = resolve_device(args.device)
    if args.seed:
        params["seed"] = args.seed
    case = make_case(args.case, seed=args.seed)
    print(f"case {args.case} ({case.desc}), method {args.method} {params}, device {dev}, "
          f"torch threads {torch.get_num_threads()}")
    print("| step | time s | loss | PSNR dB | SSIM |\n|---:|---:|---:|---:|---:|")
    t0 = time.perf_counter()

    def on_progress(_gadget: str, ev: ProgressEvent) -> None:
        if ev.preview is not None:
            m = _metrics(ev.preview(), case)
            print(f"| {ev.step} | {time.perf_counter() - t0:.0f} | {ev.metrics.get('loss', float('nan')):.3e} | "
                  f"{m['psnr']:.2f} | {m['ssim']:.4f} |", flush=True)

    res = run_offline(chain_for(case, args.method, params), case.input_path, None, device=str(dev),
                      progress=on_progress)
    x = torch.from_numpy(np.stack([np.asarray(im.data[0, 0], dtype=np.float32) for im in res.images]))
    m = _metrics(x, case)
    print(f"final: PSNR {m['psnr']:.2f} dB, SSIM {m['ssim']:.4f}, {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
