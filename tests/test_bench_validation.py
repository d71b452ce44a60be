"""Smoke test of ``python -m bench.validation --quick``: three tiny family cases through the chains
(and the BART λ sweep when ``bart`` is installed); the table prints and every number is finite."""

from __future__ import annotations

import json
import math

import pytest

from bench import validation as V
from bench.bart import bart_available


@pytest.mark.parametrize("bart", [False, True], ids=["ours", "with_bart"])
def test_quick_run_prints_table_and_finite_numbers(bart, tmp_path, capsys):
    if bart and not bart_available():
        pytest.skip("bart not on PATH")
    out = tmp_path / "v.json"
    argv = ["--quick", "--json", str(out), "--no-cache"] + ([] if bart else ["--no-bart"])
    if bart:
        argv += ["--cases", "q_rad"]   # one case is enough for the BART sweep
    assert V.main(argv) == 0
    text = capsys.readouterr().out
    assert "| case | data |" in text and "Spread over the cases" in text
    data = json.loads(out.read_text())
    names = [c["case"] for c in data["cases"]]
    assert names == (["q_rad"] if bart else [c.name for c in V.QUICK])
    for c in data["cases"]:
        assert c["case"] in text
        for m in V.METHODS:
            r = c["ours"][m]
            assert r["status"] == "ok" and math.isfinite(r["psnr"]) and r["psnr"] > 10 and r["seconds"] > 0
        if bart:
            assert len(c["bart"]) == len(V.BART_LAMBDAS)
            assert all(b["status"] == "ok" and math.isfinite(b["psnr"]) for b in c["bart"])
            assert math.isfinite(c["delta_db"]) and c["time_ratio"] > 0
            assert c["best_bart"]["lam"] in V.BART_LAMBDAS
        else:
            assert c["bart"] == [] and c["delta_db"] is None
