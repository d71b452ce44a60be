"""docker/Dockerfile checked statically (no Docker engine here), and its health check run for real.

Pinned CUDA base image, every COPY source present in the build context (the repository root), a
non-editable install, a non-root user, an ENTRYPOINT that is our console script with a CMD that our
argument parser accepts, and a HEALTHCHECK command that answers 0 against a running server and 1
when nothing listens.
"""

from __future__ import annotations

import configparser
import glob
import json
import re
import shlex
from pathlib import Path

import pytest

from gadgets.cli import build_parser, main as cli_main

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, "Dockerfile ends inside a continued line"
    return out


def _exec_form(text: str) -> list[str]:
    """A JSON exec-form argument list (``["a", "b"]``); shell form is split like a shell would."""
    text = text.strip()
    return json.loads(text) if text.startswith("[") else shlex.split(text)


def _one(name: str) -> str:
    found = [args for ins, args in instructions() if ins == name]
    assert len(found) == 1, f"expected one {name}, found {len(found)}"
    return found[0]


def test_base_image_is_a_pinned_cuda_image():
    froms = [args for ins, args in instructions() if ins == "FROM"]
    assert froms, "no FROM"
    for args in froms:
        image = args.split()[0]
        if "@sha256:" in image:
            assert re.fullmatch(r".+@sha256:[0-9a-f]{64}", image), image
            continue
        name, _, tag = image.rpartition(":")
        assert name and tag and tag != "latest", f"{image}: pin an exact tag or a digest"
        assert re.match(r"\d+\.\d+\.\d+", tag), f"{image}: tag {tag!r} is not an exact version"
    assert "cuda" in froms[-1].split()[0], "the runtime image must be a CUDA image"


def test_every_copy_source_exists_in_the_context():
    copies = [args for ins, args in instructions() if ins in ("COPY", "ADD")]
    assert copies
    for args in copies:
        parts = [p for p in shlex.split(args) if not p.startswith("--")]
        assert len(parts) >= 2, args
        for src in parts[:-1]:
            assert glob.glob(str(REPO / src)), f"COPY source {src!r} is not in the build context"
    # what the image installs from must be a buildable package: setup.cfg, pyproject.toml, both packages
    copied = " ".join(copies)
    for needed in ("setup.cfg", "pyproject.toml", "README.md", "gadgets", "recon_core"):
        assert needed in copied, needed


def test_install_is_not_editable_torch_first_and_user_not_root():
    runs = [args for ins, args in instructions() if ins == "RUN"]
    installs = [r for r in runs if "pip install" in r]
    assert installs and not any(re.search(r"pip install[^&]*\s(-e|--editable)\s", r) for r in installs)
    assert any("torch==" in r for r in installs), "pin torch (the CUDA build) explicitly"
    torch_at = next(i for i, r in enumerate(installs) if "torch==" in r)
    pkg_at = next(i for i, r in enumerate(installs) if "/tmp/src" in r)
    assert torch_at < pkg_at
    user = _one("USER").split(":")[0]
    assert user not in ("root", "0")


def test_entrypoint_is_our_console_script_and_cmd_parses():
    entry = _exec_form(_one("ENTRYPOINT"))
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    scripts = cfg["options.entry_points"]["console_scripts"]
    assert entry == ["torchgadgets"] and "torchgadgets = gadgets.cli:main" in scripts
    cmd = _exec_form(_one("CMD"))
    args = build_parser().parse_args(cmd)
    assert args.command == "serve" and args.host == "0.0.0.0" and args.port == 9002
    assert str(args.port) in _one("EXPOSE").split()


def test_healthcheck_answers_against_a_local_server():
    from gadgets.stream.server import ReconServer

    hc = _one("HEALTHCHECK")
    assert "--interval" in hc and "CMD" in hc
    cmd = _exec_form(hc.split("CMD", 1)[1])
    assert cmd[0] == "torchgadgets"
    args = build_parser().parse_args(cmd[1:])
    assert args.command == "health" and args.port == 9002 and args.timeout >= 10
    srv = ReconServer(port=0, device="cpu", max_sessions=1).start()
    try:
        port_args = [a if a != "9002" else str(srv.port) for a in cmd[1:]]
        assert cli_main(port_args) == 0
    finally:
        srv.shutdown(graceful=False, timeout=30)
    assert cli_main(port_args + ["--timeout", "2"]) == 1          # nothing listens any more: unhealthy


def test_docker_readme_documents_gpu_and_folders():
    text = (REPO / "docker" / "README.md").read_text()
    for needed in ("--gpus all", "/data/noise", "--save-raw", "--chains-dir", "torchgadgets external",
                   "docker build -f docker/Dockerfile"):
        assert needed in text, needed


@pytest.mark.parametrize("ignored", ["**/__pycache__", ".git"])
def test_dockerignore_next_to_the_dockerfile(ignored):
    assert ignored in (REPO / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
