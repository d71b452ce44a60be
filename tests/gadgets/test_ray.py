"""Ray scale-out (issue 16) on a local Ray on loopback with 2 CPUs: ``serve --ray`` sessions equal the
plain server's images, a killed worker is retried from the buffered data, a data error fails once
with TEXT + CLOSE, and a batch ``run --ray`` equals serial offline runs and resumes."""

from __future__ import annotations

import io
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from gadgets.cli import main as cli_main  # noqa: E402
from gadgets.ismrmrd_io import scan_to_ismrmrd, write_ismrmrd  # noqa: E402
from gadgets.offline import run_offline  # noqa: E402
from gadgets.stream.client import run_client  # noqa: E402
from gadgets.stream.h5out import read_images  # noqa: E402
from gadgets.stream.server import ReconServer  # noqa: E402
from recon_core.phantoms import simulate_scan  # noqa: E402

TIMEOUT = 60.0
SMALL_CHAIN = """\
description: small test chain (Walsh maps, 3 CG iterations)
chain:
  - gadget: noise
  - gadget: remove_oversampling
  - gadget: buffer
    params: {trigger: slice}
  - gadget: coil_estimate
    params: {method: walsh}
  - gadget: recon
    params: {method: cg_sense, max_iter: 3}
  - gadget: image_export
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    chains = root / "chains"
    chains.mkdir()
    (chains / "small.yaml").write_text(SMALL_CHAIN)
    (chains / "bad_param.yaml").write_text(SMALL_CHAIN.replace("method: cg_sense", "method: no_such_method"))
    files = []
    for seed in range(3):
        scan = simulate_scan("cartesian", matrix=32, n_frames=1, n_coils=4, accel=2, acs_lines=12, seed=seed)
        xml, acqs = scan_to_ismrmrd(scan, protocol_name="ray_test")
        path = root / "inputs" / f"scan{seed}.h5"
        path.parent.mkdir(exist_ok=True)
        write_ismrmrd(path, xml, acqs)
        files.append(path)
    pids = root / "pids"
    os.environ["TORCHGADGETS_RAY_PID_DIR"] = str(pids)      # inherited by the Ray workers
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield {"root": root, "chains": chains, "files": files, "pids": pids}
    ray.shutdown()


@pytest.fixture(scope="module")
def servers(env):
    plain = ReconServer(port=0, chains_dir=env["chains"], device="cpu", max_sessions=4, isolation="thread",
                        read_timeout_s=TIMEOUT).start()
    onray = ReconServer(port=0, chains_dir=env["chains"], device="cpu", max_sessions=4, read_timeout_s=TIMEOUT,
                        ray_address="auto").start()
    yield plain, onray
    for srv in (plain, onray):
        srv.shutdown(graceful=False, timeout=TIMEOUT)


def _client(port: int, data: Path, out: Path, config: str = "small") -> tuple[int, str]:
    buf = io.StringIO()
    rc = run_client("127.0.0.1", port, str(data), outfile=str(out), out_group="g", config=config,
                    timeout_ms=5000, out=buf, err=buf, read_timeout_s=TIMEOUT)
    return rc, buf.getvalue()


def _images(path: Path, group: str = "g") -> np.ndarray:
    series = read_images(path, group)
    return np.concatenate([series[k].data for k in sorted(series)])


def _clear_pids(env) -> None:
    env["pids"].mkdir(exist_ok=True)
    for f in env["pids"].iterdir():
        f.unlink()


def _concurrent(port: int, files: list[Path], out: Path, tag: str) -> list[tuple[int, str, Path]]:
    results: list = [None] * len(files)

    def one(i: int) -> None:
        target = out / f"{tag}{i}.h5"
        rc, text = _client(port, files[i], target)
        results[i] = (rc, text, target)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(files))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert all(r is not None for r in results), "a client did not finish"
    return results


def test_four_sessions_on_ray_equal_plain_server(env, servers, tmp_path):
    plain, onray = servers
    files = [env["files"][i % 3] for i in range(4)]
    ref = _concurrent(plain.port, files, tmp_path, "plain")
    got = _concurrent(onray.port, files, tmp_path, "ray")
    for (rc0, t0, p0), (rc1, t1, p1) in zip(ref, got):
        assert rc0 == 0, t0
        assert rc1 == 0, t1
        a, b = _images(p0), _images(p1)
        assert a.shape == b.shape == (1, 1, 1, 32, 32)
        assert float(np.abs(a).max()) > 0
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)
    # the Ray server's sessions really ran remotely (one task each) and ended ok
    # (the client has the server's CLOSE before the server adds the session's summary: wait for it)
    ok = onray.wait_for_summaries(lambda s: s.kind == "recon", 4, TIMEOUT)
    assert len(ok) >= 4 and all(s.outcome == "ok" and s.images_sent == 1 for s in ok[-4:])


def test_killed_worker_is_retried_and_session_completes(env, servers, tmp_path):
    plain, onray = servers
    _clear_pids(env)
    (env["pids"] / "hold_s").write_text("30")
    try:
        box: dict = {}
        t = threading.Thread(target=lambda: box.update(res=_client(onray.port, env["files"][0],
                                                                   tmp_path / "killed.h5")))
        t.start()
        first = env["pids"] / "attempt-1.pid"
        deadline = time.monotonic() + TIMEOUT
        while not first.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.exists(), "the task never started"
        pid = int(first.read_text())
        assert pid != os.getpid()
        os.kill(pid, signal.SIGKILL)
        t.join(TIMEOUT)
        assert not t.is_alive()
    finally:
        (env["pids"] / "hold_s").unlink()
    rc, text = box["res"]
    assert rc == 0, text
    assert (env["pids"] / "attempt-2.pid").exists(), "the task was not retried"
    assert int((env["pids"] / "attempt-2.pid").read_text()) != pid
    ref_rc, ref_text = _client(plain.port, env["files"][0], tmp_path / "ref.h5")
    assert ref_rc == 0, ref_text
    np.testing.assert_allclose(_images(tmp_path / "killed.h5"), _images(tmp_path / "ref.h5"), rtol=1e-5, atol=1e-7)


def test_data_error_fails_once_with_text_and_close(env, servers, tmp_path):
    plain, onray = servers
    _clear_pids(env)
    rc, text = _client(onray.port, env["files"][0], tmp_path / "bad.h5", config="bad_param")
    assert rc != 0
    assert "ERROR" in text and "no_such_method" in text, text
    assert sorted(p.name for p in env["pids"].glob("attempt-*.pid")) == ["attempt-1.pid"], "retried a data error"
    # the client returns on the server's CLOSE, before the server's worker has added the session's
    # summary (the session still waits for the client to close its side): wait for the summary
    last = onray.wait_for_summaries(lambda s: s.chain == "bad_param", 1, TIMEOUT)[-1]
    assert last.close_sent and last.outcome == "error"
    assert len([e for e in last.errors if "no_such_method" in e]) == 1


def test_batch_run_on_ray_equals_serial_and_resumes(env, tmp_path, capsys):
    chain = str(env["chains"] / "small.yaml")
    serial = tmp_path / "serial"
    serial.mkdir()
    for f in env["files"]:
        run_offline(chain, f, serial / f"{f.stem}.h5", "dataset_recon", device="cpu")
    outdir = tmp_path / "batch"
    pattern = str(env["files"][0].parent / "scan*.h5")
    rc = cli_main(["run", chain, pattern, "--ray", "auto", "-o", str(outdir), "--device", "cpu"])
    assert rc == 0
    assert sorted(p.name for p in outdir.iterdir()) == ["scan0.h5", "scan1.h5", "scan2.h5"]
    for f in env["files"]:
        a = _images(serial / f"{f.stem}.h5", "dataset_recon")
        b = _images(outdir / f"{f.stem}.h5", "dataset_recon")
        assert float(np.abs(a).max()) > 0
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)
    assert not np.allclose(_images(outdir / "scan0.h5", "dataset_recon"), _images(outdir / "scan1.h5", "dataset_recon"))
    # resumable: remove one output, rerun → only that one is reconstructed
    (outdir / "scan1.h5").unlink()
    before = (outdir / "scan0.h5").stat().st_mtime_ns
    capsys.readouterr()
    rc = cli_main(["run", chain, str(env["files"][0].parent), "--ray", "auto", "-o", str(outdir), "-q",
                   "--device", "cpu"])
    assert rc == 0
    assert "1 reconstructed, 2 skipped" in capsys.readouterr().out
    assert (outdir / "scan1.h5").exists() and (outdir / "scan0.h5").stat().st_mtime_ns == before
    np.testing.assert_allclose(_images(outdir / "scan1.h5", "dataset_recon"),
                               _images(serial / "scan1.h5", "dataset_recon"), rtol=1e-5, atol=1e-7)


def test_compose_example_parses_as_torchgadgets_commands():
    """docker/ray-compose.yml: the head runs ``serve --ray auto`` (valid options), workers join it."""
    import shlex

    import yaml

    from gadgets.cli import build_parser

    doc = yaml.safe_load((Path(__file__).resolve().parents[2] / "docker" / "ray-compose.yml").read_text())
    head = doc["services"]["head"]["command"][0]
    ray_part, serve_part = head.split("&& exec ")
    assert ray_part.startswith("ray start --head --port=6379")
    argv = shlex.split(serve_part)
    assert argv[0] == "torchgadgets"
    args = build_parser().parse_args(argv[1:])
    assert args.command == "serve" and args.ray == "auto" and args.host == "0.0.0.0" and args.port == 9002
    worker = doc["services"]["worker"]["command"][0]
    assert worker.startswith("ray start --address=head:6379 --block")
