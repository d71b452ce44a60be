"""Smoke test of the quality benchmark machinery (bench/quality.py, bench/bart.py) on a tiny case."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import bart as B
from bench import quality as Q

ROW_KEYS = {"case", "method", "source", "kind", "psnr", "ssim", "nrmse", "seconds", "peak_mib", "status", "params"}


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """One end-to-end ``main`` run: tiny radial case, zero_filled + cg_sense, no BART."""
    out = tmp_path_factory.mktemp("quality") / "q.json"
    rc = Q.main(["--small", "--methods", "zero_filled", "cg_sense", "--cases", "radial21", "--no-bart",
                 "--no-cache", "--device", "cpu", "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    data["__figure__"] = str(out.with_suffix(".png"))
    return data


def test_figure_written(small_run):
    """The labelled figure: one block (the case) of reference + 2 methods, each panel stacking the
    frame, its error map and the x-t profile; the JSON holds no image arrays."""
    from PIL import Image

    im = np.asarray(Image.open(small_run["__figure__"]))
    n = Q.SMALL["matrix"] * 2                          # zoom 2
    assert im.shape[1] >= 3 * n and im.shape[0] >= 2 * n + n // 2
    assert all(not k.startswith("_") for r in small_run["rows"] for k in r)


def test_json_structure(small_run):
    d = small_run
    assert {"command", "machine", "metric_definition", "rows", "small", "seed"} <= set(d)
    assert d["small"] is True and d["seed"] == 0
    assert "PSNR = 10·log10" in d["metric_definition"] and "SSIM" in d["metric_definition"]
    assert d["machine"]["torch_threads"] >= 1 and d["machine"]["device"] == "cpu"
    rows = d["rows"]
    assert [r["method"] for r in rows] == ["zero_filled", "cg_sense"]
    for r in rows:
        assert ROW_KEYS <= set(r), ROW_KEYS - set(r)
        assert r["status"] == "ok", r["status"]
        assert r["case"] == "radial21" and r["source"] == "ours"
        for k in ("psnr", "ssim", "nrmse", "seconds"):
            assert math.isfinite(r[k]), (k, r[k])
        assert 0 < r["ssim"] <= 1 and r["nrmse"] > 0 and r["seconds"] > 0
        assert "estimated" in r["maps_note"] and r["chain"] == "radial_cine_cg_sense"
        assert r["preset"] == "fast" and r["chain_seconds"] >= r["seconds"]
    cg = rows[1]
    assert cg["params"] == {"max_iter": Q.SMALL_ITER_CAP}        # small mode caps iterations
    assert cg["time_vs_cg_sense"] == pytest.approx(1.0)


def test_cg_sense_beats_zero_filled(small_run):
    zf, cg = small_run["rows"]
    assert cg["psnr"] > zf["psnr"] + 1.0
    assert cg["ssim"] > zf["ssim"]
    assert cg["nrmse"] < zf["nrmse"]


def test_format_table(small_run):
    rows = small_run["rows"]
    table = Q.format_table(rows)
    lines = table.splitlines()
    assert lines[0].startswith("| case | method | PSNR dB | SSIM | NRMSE | time s |")
    assert len(lines) == 2 + len(rows)
    assert all(ln.count("|") == lines[0].count("|") for ln in lines)
    assert "| radial21 | cg_sense |" in table
    # BART ratio section appears when a BART row of a matching kind is present
    fake = dict(rows[1], method="bart_l2", source="bart", kind="l2", psnr=rows[1]["psnr"] - 2.0,
                seconds=rows[1]["seconds"] * 4)
    all_rows = [dict(r) for r in rows] + [fake]
    Q._add_ratios(all_rows)
    v = all_rows[-1]["vs_ours"]
    assert v["method"] == "cg_sense" and v["psnr_diff_db"] == pytest.approx(2.0)
    assert v["time_ratio"] == pytest.approx(0.25)
    assert "Ours ÷ BART" in Q.format_table(all_rows)


def test_chain_takes_the_method_parameters_of_its_shipped_chain():
    """A method swapped into a case's chain runs with the method parameters its own shipped chain for that
    trajectory sets (spiral_cine_inr's eps), and never with that chain's gadget options."""
    def recon_params(case_chain: str, method: str) -> dict:
        case = Q.Case(name="c", desc="", input_path=Path("unused.h5"), chain=case_chain,
                      kspace=torch.zeros(1, 1, 4, 4, dtype=torch.complex64),
                      ground_truth=torch.ones(1, 4, 4), support=torch.ones(4, 4, dtype=torch.bool))
        spec = Q.chain_for(case, method, {"seed": 3})
        return next(g.params for g in spec.gadgets if g.gadget == "recon")

    spiral = recon_params(Q.CHAIN_FOR_KIND["spiral"], "inr")
    assert spiral["method"] == "inr" and spiral["eps"] == pytest.approx(1e-2) and spiral["seed"] == 3
    assert "nufft_backend" not in spiral and "max_iter" not in spiral       # gadget option; cg_sense's
    assert "eps" not in recon_params(Q.CHAIN_FOR_KIND["radial"], "inr")     # radial keeps the paper's
    assert recon_params("default", "cg_sense")["lam"] == pytest.approx(0.01)  # the case chain's own
    assert "quick" not in recon_params("default", "convdecoder")


def test_failing_method_is_reported_not_raised(tmp_path):
    case = Q.Case(name="tiny", desc="", input_path=tmp_path / "missing.h5", chain="default",
                  kspace=torch.zeros(1, 2, 8, 8, dtype=torch.complex64),
                  ground_truth=torch.ones(1, 8, 8), support=torch.ones(8, 8, dtype=torch.bool))
    row = Q.run_method("cg_sense", case, torch.device("cpu"))
    assert row["status"].startswith("error: ") and "missing.h5" in row["status"] and math.isnan(row["psnr"])


def test_bart_layouts_roundtrip():
    rng = np.random.default_rng(0)
    f, c, ny, nx, m = 3, 2, 6, 5, 7
    k = torch.from_numpy((rng.standard_normal((f, c, ny, nx)) + 1j * rng.standard_normal((f, c, ny, nx))).astype(np.complex64))
    b = B.cart_kspace_to_bart(k)
    assert b.shape == (nx, ny, 1, c) + (1,) * 6 + (f,)
    assert b[4, 3, 0, 1, 0, 0, 0, 0, 0, 0, 2] == k.numpy()[2, 1, 3, 4]
    kn = k.reshape(f, c, -1)[..., :m]
    bn = B.noncart_kspace_to_bart(kn)
    assert bn.shape == (1, m, 1, c) + (1,) * 6 + (f,) and bn[0, 5, 0, 1, 0, 0, 0, 0, 0, 0, 2] == kn.numpy()[2, 1, 5]
    traj = torch.rand(f, 2, m) * 2 * math.pi - math.pi
    bt = B.traj_to_bart(traj, (ny, nx))
    assert bt.shape == (3, m) + (1,) * 8 + (f,)
    assert bt[0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 1].real == pytest.approx(float(traj[1, 1, 3]) * nx / (2 * math.pi), rel=1e-5)
    assert bt[1, 3, 0, 0, 0, 0, 0, 0, 0, 0, 1].real == pytest.approx(float(traj[1, 0, 3]) * ny / (2 * math.pi), rel=1e-5)
    maps = k[0]
    assert torch.equal(B.maps_from_bart(B.maps_to_bart(maps)), maps)
    img = k[:, 0]                                               # [F, Ny, Nx]
    bimg = np.asfortranarray(img.numpy().transpose(2, 1, 0)).reshape((nx, ny) + (1,) * 8 + (f,), order="F")
    assert torch.equal(B.images_from_bart(bimg, f), img)


@pytest.mark.skipif(not B.bart_available(), reason="bart not on PATH")
def test_bart_nufft_matches_ours():
    from recon_core.operators import Nufft
    from recon_core.trajectories import golden_angle_radial

    n = 16
    traj = golden_angle_radial(5, 2 * n, n_frames=2)
    y, x = torch.meshgrid(torch.arange(n) - n / 2, torch.arange(n) - n / 2, indexing="ij")
    blob = torch.exp(-((y - 2) ** 2 + (x + 1) ** 2) / 8.0)          # smooth: both NUFFTs are accurate
    img = torch.stack([blob, blob.roll(3, 1)]).to(torch.complex64) * torch.polar(torch.ones(()), torch.tensor(0.4))
    ours = Nufft(traj, (n, n))(img[:, None])[:, 0]
    with B.BartSession(threads=1) as sess:
        s, err = sess.nufft_scale(img, traj, ours)
        call = sess.calls[-1]
        assert call.seconds > 0 and (math.isnan(call.peak_rss_mib) or call.peak_rss_mib > 0)
    assert err < 1e-2 and abs(abs(s) - 1) < 1e-2


def test_convergence_bench_samples_previews(capsys):
    from bench.convergence import main as convergence_main

    assert convergence_main(["--case", "radial13", "--every", "2", "--param", "n_steps=4",
                             "--param", "channels=2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    rows = [ln for ln in out.splitlines() if ln.startswith("| 2 |") or ln.startswith("| 4 |")]
    assert len(rows) == 2 and "final: PSNR" in out


@pytest.mark.parametrize("high_water_mark", [True, False])
def test_peak_memory_sees_a_transient_allocation(monkeypatch, high_water_mark):
    """PeakMemory reports a 200 MB block that lives only inside the block (kernel high-water mark, or
    the sampling fallback where the reset is refused), and does not count memory freed before it."""
    if not high_water_mark:
        monkeypatch.setattr(Q, "_reset_high_water_mark", lambda: False)
    before = np.ones(75_000_000)          # 600 MB, freed before the measurement
    del before
    with Q.PeakMemory(torch.device("cpu")) as pm:
        block = np.ones(25_000_000)
        time.sleep(0.05)                  # the sampler's period is 5 ms
        del block
    assert 150 < pm.peak_mib < 400, pm.peak_mib
    if not high_water_mark:
        assert "sampled" in pm.method
