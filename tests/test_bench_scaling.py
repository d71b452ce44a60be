"""Smoke test of bench.scaling: --quick on tiny sizes prints the table; exponents are finite."""

from __future__ import annotations

import json
import math

from bench import scaling


def test_fit_exponent_recovers_a_power_law() -> None:
    sizes = [8, 16, 32]
    assert abs(scaling.fit_exponent(sizes, [3.0 * s ** 2 for s in sizes]) - 2.0) < 1e-9
    assert math.isnan(scaling.fit_exponent([8], [1.0]))


def test_quick_run_table_and_finite_exponents(tmp_path, capsys) -> None:
    out = tmp_path / "scaling.json"
    assert scaling.main(["--quick", "--methods", "zero_filled", "cg_sense", "--axes", "matrix", "coils",
                         "--sessions", "1", "2", "--acquisitions", "50", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| method | axis | sizes | seconds | peak MiB | time exponent | memory exponent |" in text
    assert "| sessions | MB | seconds | aggregate MB/s | status |" in text
    data = json.loads(out.read_text())
    assert [(f["method"], f["axis"]) for f in data["fits"]] == [
        ("zero_filled", "matrix"), ("zero_filled", "coils"), ("cg_sense", "matrix"), ("cg_sense", "coils")]
    for f in data["fits"]:
        assert len(f["sizes"]) == len(f["seconds"]) == 3
        assert all(t > 0 for t in f["seconds"])
        assert math.isfinite(f["time_exponent"])
        # RSS growth can be 0 when the allocator reuses memory; a fit needs two positive points
        if sum(m > 0 for m in f["peak_mib"]) >= 2:
            assert math.isfinite(f["memory_exponent"])
    assert all(r["status"] == "ok" for r in data["rows"])
    assert [s["sessions"] for s in data["server"]] == [1, 2]
    assert all(s["status"] == "ok" and s["mb_per_s"] > 0 for s in data["server"])
