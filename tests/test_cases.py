"""Run every declarative integration case in ``tests/cases/*.yaml`` (format: ``tests/cases/README.md``).

Each case goes through ``run_offline`` — the path of ``torchgadgets run`` — with a shipped chain,
and is scored against its reference (phantom ground truth or the fully sampled root-sum-of-squares)
after one least-squares scale inside the body / support.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from gadgets.ismrmrd_io import read_ismrmrd, scan_to_ismrmrd, write_ismrmrd
from gadgets.offline import run_offline
from gadgets.stream.chain import ChainSpec, load_chain
from recon_core import metrics
from recon_core.fft import ifft2c
from recon_core.phantoms import simulate_scan
from recon_core.trajectories import uniform_mask

CASES_DIR = Path(__file__).parent / "cases"
CASE_FILES = sorted(CASES_DIR.glob("*.yaml"))
_KEYS = {"description", "input", "chain", "params", "reference", "expect"}
_EXPECT = {"psnr_min", "nrmse_max", "beats"}


def load_case(path: Path) -> dict[str, Any]:
    """The case as a dict, with its keys checked (a misspelt key is an error naming the file)."""
    case = yaml.safe_load(path.read_text())
    unknown = set(case) - _KEYS
    if unknown or not {"input", "chain", "reference", "expect"} <= set(case):
        raise ValueError(f"{path.name}: keys must be {sorted(_KEYS)} (input, chain, reference, expect required); "
                         f"unknown: {sorted(unknown)}")
    if set(case["expect"]) - _EXPECT:
        raise ValueError(f"{path.name}: expect keys must be among {sorted(_EXPECT)}")
    if case["reference"] not in ("ground_truth", "fully_sampled_rss"):
        raise ValueError(f"{path.name}: reference must be ground_truth or fully_sampled_rss")
    return case


def _chain(case: dict[str, Any], method: str | None = None) -> ChainSpec:
    spec = copy.deepcopy(load_chain(case["chain"]))
    overrides = case.get("params") or {}
    names = {g.gadget for g in spec.gadgets}
    for name in overrides:
        if name not in names:
            raise ValueError(f"params names gadget {name!r}, which chain {case['chain']!r} does not have")
    for g in spec.gadgets:
        own = overrides.get(g.gadget, {})
        # another recon method: the chain's parameters were for its own method
        base = {} if g.gadget == "recon" and "method" in own else (g.params or {})
        g.params = dict(base, **own)
        if method is not None and g.gadget == "recon":
            g.params = {"method": method}
    return spec


def _prepare(case: dict[str, Any], shared_data: Path, tmp: Path) -> tuple[Path, torch.Tensor, torch.Tensor]:
    """(input file, reference magnitude [F, Ny, Nx], mask where to score [Ny, Nx] or [F, Ny, Nx])."""
    inp = case["input"]
    if "phantom" in inp:
        scan = simulate_scan(**inp["phantom"])
        header, acqs = scan_to_ismrmrd(scan)
        path = tmp / "input.h5"
        write_ismrmrd(path, header, acqs, ground_truth=scan.ground_truth)
        return path, scan.ground_truth.abs(), scan.body_mask
    source = shared_data / inp["file"]
    if not source.is_file():
        source = CASES_DIR / inp["file"]
    header, acqs, _ = read_ismrmrd(source)
    data = [a for a in acqs if not a.is_flag_set(19)]           # ACQ_IS_NOISE_MEASUREMENT
    ny = 1 + max(a.idx.kspace_encode_step_1 for a in data)
    n_ch, n_ro = data[0].active_channels, data[0].number_of_samples
    k = np.zeros((n_ch, ny, n_ro), np.complex64)
    for a in data:
        k[:, a.idx.kspace_encode_step_1, :] = a.data
    rss = ifft2c(torch.from_numpy(k)).abs().pow(2).sum(0).sqrt()
    nx = rss.shape[-1]
    if n_ro > ny:                                               # readout oversampling: recon matrix
        rss = rss[:, (nx - ny) // 2:(nx - ny) // 2 + ny]
    us = inp.get("undersample")
    path = source
    if us:
        mask = uniform_mask(ny, 1, int(us["accel"]), int(us["acs_lines"]), 1)[0][:, 0]
        keep = [a for a in acqs if a.is_flag_set(19) or mask[a.idx.kspace_encode_step_1] > 0]
        path = tmp / "input.h5"
        write_ismrmrd(path, header, keep)
    return path, rss[None], rss > 0.1 * rss.max()


def _score(images: list, ref: torch.Tensor, support: torch.Tensor) -> tuple[float, float]:
    x = torch.from_numpy(np.stack([np.asarray(im.data[0, 0]) for im in images])).abs()
    x = metrics.scale_to_reference(x, ref, support)
    psnr = float(metrics.psnr(x, ref))
    sup = support.expand_as(ref) if support.ndim == 2 else support
    nrmse = float(torch.linalg.vector_norm((x - ref)[sup]) / torch.linalg.vector_norm(ref[sup]))
    return psnr, nrmse


@pytest.mark.parametrize("case_file", CASE_FILES, ids=[p.stem for p in CASE_FILES])
def test_case(case_file: Path, shared_data: Path, tmp_path: Path) -> None:
    case = load_case(case_file)
    path, ref, support = _prepare(case, shared_data, tmp_path)
    res = run_offline(_chain(case), path, None, device="cpu")
    assert not res.result.errors and len(res.images) == ref.shape[0], (res.result.errors, len(res.images))
    psnr, nrmse = _score(res.images, ref, support)
    expect = case["expect"]
    line = f"{case_file.stem}: PSNR {psnr:.2f} dB, NRMSE {nrmse:.4f}, {res.wall_s:.1f} s"
    if "beats" in expect:
        other = run_offline(_chain(case, expect["beats"]["method"]), path, None, device="cpu")
        psnr_other, _ = _score(other.images, ref, support)
        line += f"; {expect['beats']['method']} {psnr_other:.2f} dB"
        assert psnr >= psnr_other + float(expect["beats"].get("margin_db", 0.0)), line
    print(line)
    if "psnr_min" in expect:
        assert psnr >= float(expect["psnr_min"]), line
    if "nrmse_max" in expect:
        assert nrmse <= float(expect["nrmse_max"]), line


def test_case_files_are_checked(tmp_path: Path) -> None:
    """A case with a misspelt key is refused with its file name (so a typo cannot skip a check)."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("input: {phantom: {kind: radial}}\nchain: default\nreference: ground_truth\n"
                   "expect: {psnr_minimum: 30}\n")
    with pytest.raises(ValueError, match="bad.yaml"):
        load_case(bad)
