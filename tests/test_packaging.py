"""A user's install: build the wheel, install it into a fresh virtual environment, run the CLI elsewhere.

The wheel is built from a copy of the package sources (so the build leaves nothing in the checkout),
installed with ``--no-deps`` into ``python -m venv --system-site-packages`` (torch and the other
dependencies come from the outer environment, nothing is downloaded), and the ``torchgadgets`` script
of that venv runs from a temporary directory: the chains and weights must come from the installed
package data, found through importlib.resources, not from the source tree.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("setup.cfg", "pyproject.toml", "README.md", "MANIFEST.in", "gadgets", "recon_core")


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return res


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    root = tmp_path_factory.mktemp("packaging")
    src = root / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "*.h5")
    for name in SOURCES:
        p = REPO / name
        (shutil.copytree(p, src / name, ignore=ignore) if p.is_dir() else shutil.copy2(p, src / name))
    env = dict(os.environ, PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)
    wheels = root / "wheels"
    res = _run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-w",
                str(wheels)], root, env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    wheel = next(wheels.glob("torchgadgets-*.whl"))
    venv_dir = root / "venv"
    res = _run([sys.executable, "-m", "venv", "--system-site-packages", str(venv_dir)], root, env)
    assert res.returncode == 0, res.stderr
    bindir = venv_dir / ("Scripts" if os.name == "nt" else "bin")
    # --ignore-installed: the outer environment may hold torchgadgets too (CI installs it there); pip
    # would call that "already satisfied" and put nothing into the venv
    res = _run([str(bindir / "python"), "-m", "pip", "install", "--no-deps", "--ignore-installed", str(wheel)],
               root, env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    work = root / "elsewhere"
    work.mkdir()
    return {"wheel": wheel, "bin": bindir, "work": work, "env": env}


def test_wheel_carries_chains_and_weights(venv):
    names = set(zipfile.ZipFile(venv["wheel"]).namelist())
    for needed in ("gadgets/chains/default.yaml", "gadgets/chains/selection.yaml",
                   "gadgets/chains/gadgetron/external_buffers.xml", "recon_core/weights/registry.json",
                   "recon_core/weights/dc_cnn_fast.pt", "gadgets/external.py"):
        assert needed in names, needed


def test_installed_cli_lists_chains_and_reconstructs(venv):
    exe, work, env = str(venv["bin"] / "torchgadgets"), venv["work"], venv["env"]
    res = _run([str(venv["bin"] / "python"), "-c", "import gadgets, recon_core.training.weights as w; "
                "print(gadgets.__file__); print(w.resolve_weights('dc_cnn_fast').path)"], work, env)
    assert res.returncode == 0, res.stderr
    site = str(venv["bin"].parent)
    assert all(line.startswith(site) for line in res.stdout.split()), res.stdout   # the installed copy
    res = _run([exe, "chains"], work, env)
    assert res.returncode == 0, res.stderr
    listed = {line.split()[0] for line in res.stdout.splitlines() if line.strip()}
    assert {"default", "cartesian_sense", "radial_cine_cg_sense"} <= listed, res.stdout
    res = _run([exe, "phantom", "small.h5", "--matrix", "32", "--frames", "2", "--coils", "4", "--accel", "2",
                "--acs", "8"], work, env)
    assert res.returncode == 0, res.stderr
    res = _run([exe, "run", "default", "small.h5", "-o", "out.h5", "-G", "g", "-q", "--device", "cpu"],
               work, env)
    assert res.returncode == 0, res.stderr
    assert "image(s) from chain 'default'" in res.stdout and (work / "out.h5").is_file()


def test_installed_cli_errors_are_one_line(venv):
    exe, work, env = str(venv["bin"] / "torchgadgets"), venv["work"], venv["env"]
    res = _run([exe, "run", "no_such_chain", "missing.h5", "-q"], work, env)
    assert res.returncode != 0
    # log lines (timestamped WARNINGs of the chain loader) aside, the error is one line
    lines = [ln for ln in res.stderr.splitlines() if ln.strip() and not re.match(r"\d{4}-\d\d-\d\d ", ln)]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("torchgadgets run: unknown chain 'no_such_chain'"), res.stderr
    assert "Traceback" not in res.stderr
    res = _run([exe, "health", "-p", "1", "--timeout", "2"], work, env)
    assert res.returncode == 1 and len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_unexpected_errors_are_one_line_and_debug_shows_the_traceback(monkeypatch, capsys):
    from gadgets import cli

    def broken(args):
        raise RuntimeError("chain directory unreadable\nsecond line of detail")

    monkeypatch.setattr(cli, "cmd_chains", broken)
    assert cli.main(["chains"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["torchgadgets chains: RuntimeError: chain directory unreadable … (--debug for the traceback)"]
    with pytest.raises(RuntimeError, match="chain directory unreadable"):
        cli.main(["--debug", "chains"])
