"""Reconstructions as Ray tasks: the server's ``--ray`` mode and ``torchgadgets run --ray`` (issue 16).

The front door (:class:`~gadgets.stream.server.ReconServer`) keeps the wire protocol, the limits, the
buffering and the order of the replies. A session in Ray mode (:class:`RaySession`) reads the whole
session (acquisitions up to CLOSE), puts the buffer into Ray's object store **once** (headers as
bytes, samples and trajectories as numpy arrays: workers map them without a copy), and runs the chain
as one Ray task that declares what it needs: ``num_cpus``, ``num_gpus=1`` when the chain runs on CUDA,
and ``memory`` estimated from the buffer size. The task runs the chain exactly as the offline path
does and returns the output messages, which the session sends to the client in the chain's order.

Faults: the buffer stays referenced by the session until its images are sent, so a worker process
that dies (killed, out of memory, node lost) makes Ray run the task again elsewhere from the same
object (``max_retries``); the client sees a delay only. A failure *in the data* is not retried:
gadget errors come back as the chain's ``"[gadget] ERROR: ..."`` lines (``ChainError`` /
``GadgetError`` while building or running the chain are such lines too) and exceptions are not
retried (``retry_exceptions=False``), so a bad dataset fails once with TEXT + CLOSE.

Batch (:func:`run_batch`): each input file is read by the driver and shipped through the object
store (workers need no shared file system), reconstructed by :func:`gadgets.offline.run_offline` in a
task, and the output HDF5 comes back as bytes, written as ``OUTDIR/<stem>.h5`` (via a ``.part`` file
and a rename, so an existing output is always complete and a rerun skips it: resumable).

Addresses: ``local`` starts an in-process Ray (``num_cpus`` CPUs, no dashboard), ``auto`` joins the
cluster this machine belongs to, ``HOST:PORT`` (or ``ray://HOST:PORT``) a running cluster's head.
If Ray is already initialised in this process it is used as it is.

Test hooks (environment of the workers): ``TORCHGADGETS_RAY_PID_DIR`` — each attempt writes its
process id to ``<dir>/attempt-<n>.pid`` (n claimed exclusively: one more than the attempts before,
unique among concurrent tasks); when ``<dir>/hold_s`` exists, attempt 1 waits that many seconds
before reconstructing (so a test can kill it mid-task).
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import ismrmrd

from gadgets.base import ChainError, GadgetError
from gadgets.stream.chain import ChainSpec, build_chain, chain_context, load_chain
from gadgets.stream.runner import ChainResult, ChainRunner
from gadgets.stream.session import Session, _error, _register_gadgets

log = logging.getLogger("torchgadgets.ray")

__all__ = ["connect", "RayBackend", "RaySession", "RayJob", "run_batch", "BatchReport", "pack_messages",
           "unpack_messages", "default_max_retries"]

default_max_retries = 3
_MiB = 1 << 20


# ---------------------------------------------------------------------------------------------
# connecting

def connect(address: str = "local", num_cpus: Optional[int] = None, num_gpus: Optional[int] = None) -> Any:
    """Connect to (or start) Ray; returns the ``ray`` module.

    ``local``: an in-process Ray with ``num_cpus`` CPUs (default 2) and no dashboard; ``auto``: the
    cluster this machine belongs to; ``HOST:PORT`` / ``ray://HOST:PORT``: that cluster. A Ray already
    initialised in this process is used as it is.
    """
    import ray

    if ray.is_initialized():
        return ray
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING,
                              "log_to_driver": False}
    if address == "local":
        kwargs.update(num_cpus=num_cpus or 2, num_gpus=num_gpus)
        ray.init(**kwargs)
    else:
        ray.init(address=address, **kwargs)
    return ray


# ---------------------------------------------------------------------------------------------
# moving messages

def pack_messages(messages: Sequence[Any]) -> list[tuple]:
    """Messages → tuples of bytes and numpy arrays (zero-copy in Ray's object store)."""
    out: list[tuple] = []
    for m in messages:
        if isinstance(m, ismrmrd.Acquisition):
            out.append(("acq", bytes(m.getHead()), m.data, m.traj))
        elif isinstance(m, ismrmrd.Image):
            out.append(("img", bytes(m.getHead()), m.attribute_string or "", m.data))
        elif isinstance(m, ismrmrd.Waveform):
            out.append(("wav", bytes(m.getHead()), m.data))
        else:                      # Text, DICOM, ...: small, pickled as they are
            out.append(("obj", m))
    return out


def unpack_messages(packed: Sequence[tuple]) -> list[Any]:
    """The inverse of :func:`pack_messages` (arrays are copied: the chain may change them in place)."""
    out: list[Any] = []
    for item in packed:
        kind = item[0]
        if kind == "acq":
            head = ismrmrd.AcquisitionHeader.from_buffer_copy(item[1])
            out.append(ismrmrd.Acquisition(head, item[2].copy(), item[3].copy()))
        elif kind == "img":
            head = ismrmrd.ImageHeader.from_buffer_copy(item[1])
            img = ismrmrd.Image(head, attribute_string=item[2] or None)
            img.data[:] = item[3]
            out.append(img)
        elif kind == "wav":
            head = ismrmrd.WaveformHeader.from_buffer_copy(item[1])
            out.append(ismrmrd.Waveform(head, item[2].copy()))
        else:
            out.append(item[1])
    return out


def _buffer_bytes(packed: Sequence[tuple]) -> int:
    n = 0
    for item in packed:
        for part in item[1:]:
            n += getattr(part, "nbytes", None) or (len(part) if isinstance(part, (bytes, str)) else 0)
    return n


# ---------------------------------------------------------------------------------------------
# the task bodies (run on a Ray worker)

def _test_hooks() -> None:
    pid_dir = os.environ.get("TORCHGADGETS_RAY_PID_DIR")
    if not pid_dir:
        return
    folder = Path(pid_dir)
    folder.mkdir(parents=True, exist_ok=True)
    # Claim the next attempt number with an exclusive create, then publish the pid file by a rename:
    # concurrent tasks (several sessions on one cluster) never share a number, and a reader never
    # sees a half-written pid file.
    attempt = len(list(folder.glob("attempt-*.claim"))) + 1
    while True:
        try:
            os.close(os.open(folder / f"attempt-{attempt}.claim", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            break
        except FileExistsError:
            attempt += 1
    tmp = folder / f"attempt-{attempt}.{os.getpid()}.tmp"
    tmp.write_text(str(os.getpid()))
    os.replace(tmp, folder / f"attempt-{attempt}.pid")
    hold_file = folder / "hold_s"
    hold = float(hold_file.read_text() or 0) if hold_file.exists() else 0.0
    if attempt == 1 and hold > 0:
        time.sleep(hold)


def _set_threads(num_cpus: float) -> None:
    import torch

    torch.set_num_threads(max(1, int(num_cpus)))


def _recon_body(spec: ChainSpec, header_xml: str, packed: list, device: str, noise_store_dir: Optional[str],
                gadgets: dict, queue_size: int, num_cpus: float) -> dict:
    """One session's reconstruction on a worker: the chain over the buffered messages."""
    t0 = time.perf_counter()
    _test_hooks()
    _set_threads(num_cpus)
    outputs: list[Any] = []
    try:
        _register_gadgets(gadgets)
        ctx = chain_context(spec, device, header_xml=header_xml,
                            storage_dir=Path(noise_store_dir) if noise_store_dir else None)
        chain = build_chain(spec, ctx)
    except (ChainError, GadgetError) as exc:
        return {"outputs": [], "errors": [f"[chain] ERROR: {exc}"], "pid": os.getpid(), "device": device,
                "wall_s": time.perf_counter() - t0}
    runner = ChainRunner(chain, ctx, queue_size=queue_size, on_output=outputs.append)
    for msg in unpack_messages(packed):
        if not runner.put(msg):
            break
    runner.close()
    result = runner.wait()
    return {"outputs": pack_messages(outputs), "errors": list(result.errors), "pid": os.getpid(),
            "device": str(ctx.device), "wall_s": time.perf_counter() - t0}


def _file_body(spec: ChainSpec, name: str, data: bytes, out_group: str, in_group: str, device: Optional[str],
               num_cpus: float) -> dict:
    """One input file's offline reconstruction on a worker; returns the output HDF5 as bytes."""
    from gadgets.offline import run_offline

    t0 = time.perf_counter()
    _test_hooks()
    _set_threads(num_cpus)
    with tempfile.TemporaryDirectory(prefix="torchgadgets-ray-") as tmp:
        src = Path(tmp) / "in.h5"
        dst = Path(tmp) / "out.h5"
        src.write_bytes(data)
        try:
            res = run_offline(spec, src, dst, out_group, in_group=in_group, device=device, raise_on_error=False)
        except (ChainError, GadgetError, OSError, ValueError) as exc:
            return {"name": name, "h5": None, "errors": [f"[run] ERROR: {exc}"], "images": 0,
                    "pid": os.getpid(), "wall_s": time.perf_counter() - t0}
        h5 = dst.read_bytes() if dst.exists() else None
        return {"name": name, "h5": h5, "errors": list(res.result.errors), "images": len(res.images),
                "pid": os.getpid(), "wall_s": time.perf_counter() - t0}


# ---------------------------------------------------------------------------------------------
# resources

def _wants_gpu(device: str, cluster_gpus: float) -> bool:
    d = (device or "auto").strip().lower()
    return d.startswith("cuda") or (d == "auto" and cluster_gpus > 0)


def _largest_node_memory(ray: Any) -> float:
    best = 0.0
    for node in ray.nodes():
        if node.get("Alive"):
            best = max(best, float(node.get("Resources", {}).get("memory", 0.0)))
    return best


class RayBackend:
    """Submits reconstructions to Ray with declared resources (one per session or per file).

    ``num_cpus`` per task; ``num_gpus`` (default 1) for chains whose device is CUDA (or ``auto`` when
    the cluster has GPUs); ``memory_factor`` × buffer bytes + ``memory_base`` bytes as the memory
    estimate (capped at the largest node, so a task is never unschedulable for its estimate alone);
    ``max_retries`` runs after a worker died.
    """

    def __init__(self, address: str = "local", num_cpus: float = 1.0, num_gpus: float = 1.0,
                 max_retries: int = default_max_retries, memory_factor: float = 6.0,
                 memory_base: int = 256 * _MiB, local_cpus: Optional[int] = None) -> None:
        self.ray = connect(address, num_cpus=local_cpus)
        self.address = address
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self.max_retries = max_retries
        self.memory_factor = memory_factor
        self.memory_base = memory_base
        ray = self.ray
        self._recon = ray.remote(max_retries=max_retries, retry_exceptions=False)(_recon_body)
        self._file = ray.remote(max_retries=max_retries, retry_exceptions=False)(_file_body)
        self._cluster_gpus = float(ray.cluster_resources().get("GPU", 0.0))
        self._node_memory = _largest_node_memory(ray)

    def resources(self, device: str, nbytes: int) -> dict[str, Any]:
        """The Ray options of a task for ``device`` on a buffer of ``nbytes``."""
        memory = int(self.memory_factor * nbytes + self.memory_base)
        if self._node_memory > 0:
            memory = min(memory, int(self._node_memory * 0.9))
        gpus = self.num_gpus if _wants_gpu(device, self._cluster_gpus) else 0
        return {"num_cpus": self.num_cpus, "num_gpus": gpus, "memory": max(memory, 1)}

    def submit_session(self, spec: ChainSpec, header_xml: str, messages: Sequence[Any], device: str,
                       noise_store_dir: Optional[Path], gadgets: dict, queue_size: int,
                       on_output: Callable[[Any], None]) -> "RayJob":
        """Ship one session's buffer to the object store once and run its chain as a task."""
        packed = pack_messages(messages)
        chain_device = spec.device or device
        opts = self.resources(chain_device, _buffer_bytes(packed))
        ref_data = self.ray.put(packed)
        ref = self._recon.options(**opts).remote(spec, header_xml, ref_data, chain_device,
                                                 str(noise_store_dir) if noise_store_dir else None,
                                                 dict(gadgets), queue_size, opts["num_cpus"])
        log.debug("submitted %s (%d messages, %s)", spec.name, len(packed), opts)
        return RayJob(self.ray, ref, ref_data, on_output, opts)

    def submit_file(self, spec: ChainSpec, path: Path, out_group: str, in_group: str,
                    device: Optional[str]) -> Any:
        data = Path(path).read_bytes()
        opts = self.resources(spec.device or device or "auto", len(data))
        return self._file.options(**opts).remote(spec, str(path), self.ray.put(data), out_group, in_group,
                                                 device, opts["num_cpus"])


class RayJob:
    """A running session task with the runner interface the session waits on (``wait``, ``cancel``).

    :meth:`wait` raises ``TimeoutError`` while the task runs; when it is done the outputs are passed
    to ``on_output`` in order and the :class:`ChainResult` is returned. The buffer's object
    reference is held until then, so a retry after a worker's death has the data.
    """

    def __init__(self, ray: Any, ref: Any, data_ref: Any, on_output: Callable[[Any], None],
                 resources: dict[str, Any]) -> None:
        self.ray = ray
        self.ref = ref
        self.data_ref = data_ref
        self.on_output = on_output
        self.resources = resources
        self.info: dict[str, Any] = {}
        self._result: Optional[ChainResult] = None
        self._cancelled = False
        self._t0 = time.perf_counter()

    def wait(self, timeout: Optional[float] = None) -> ChainResult:
        if self._result is not None:
            return self._result
        ready, _ = self.ray.wait([self.ref], timeout=timeout)
        if not ready:
            raise TimeoutError("reconstruction still running on the Ray cluster")
        try:
            out = self.ray.get(self.ref)
        except Exception as exc:  # noqa: BLE001 - a failed task (data, retries exhausted, cancelled)
            text = str(exc).strip().splitlines()
            reason = "cancelled" if self._cancelled else f"{type(exc).__name__}: {text[-1] if text else ''}"
            self._result = ChainResult(errors=[f"[ray] ERROR: the reconstruction task failed ({reason})"],
                                       cancelled=self._cancelled, wall_s=time.perf_counter() - self._t0)
            self.data_ref = None
            return self._result
        self.info = {k: v for k, v in out.items() if k != "outputs"}
        outputs = unpack_messages(out["outputs"])
        for msg in outputs:
            self.on_output(msg)
        self._result = ChainResult(errors=list(out["errors"]), wall_s=time.perf_counter() - self._t0,
                                   outputs=len(outputs))
        self.data_ref = None
        return self._result

    def cancel(self, reason: str = "") -> None:
        if self._result is None and not self._cancelled:
            self._cancelled = True
            try:
                self.ray.cancel(self.ref, force=True)
            except Exception:  # noqa: BLE001 - already finished or gone
                pass


# ---------------------------------------------------------------------------------------------
# the session in Ray mode

class RaySession(Session):
    """A :class:`Session` whose chain runs as a Ray task on the whole session's buffer.

    Everything before the data (config, header, limits, chain resolution, queries) and after it
    (deadline, client watch, TEXT errors, CLOSE last) is the plain session's; only where the chain
    runs differs.
    """

    backend: RayBackend

    def _stream(self, request: tuple[str, str], xml: str, parsed: Any, pending: Any) -> list[str]:
        from gadgets.stream.protocol import Close

        self._check_resources(parsed)
        spec = self._resolve_chain(request, parsed)
        self.summary.chain = spec.name
        self.summary.kind = "recon"
        protocol = str(getattr(getattr(parsed, "measurementInformation", None), "protocolName", None) or "")
        self._open_raw_recorder(xml, protocol)
        buffered: list[Any] = []
        while True:
            msg = pending if pending is not None else self._read()
            pending = None
            if isinstance(msg, Close):
                break
            if isinstance(msg, (ismrmrd.Acquisition, ismrmrd.Waveform, ismrmrd.Image)):
                self._take_data(msg)
                buffered.append(msg)
                if self._stop.is_set():
                    raise _error("server", "server shutting down; session cancelled")
            else:
                self._take_control(msg)
        job = self.backend.submit_session(spec, xml, buffered, self.cfg.device, self.cfg.noise_store_dir,
                                          self.cfg.gadgets, self.cfg.queue_size, self._on_output)
        del buffered
        self.runner = job  # type: ignore[assignment]  # same wait/cancel interface as ChainRunner
        self.log.info("chain %s submitted to Ray (%s)", spec.name, job.resources)
        result = self._wait_chain()
        if job.info:
            self.log.info("chain %s ran on Ray worker pid %s (%s) in %.2f s", spec.name, job.info.get("pid"),
                          job.info.get("device"), float(job.info.get("wall_s", 0.0)))
        return list(result.errors)


def make_session_factory(backend: RayBackend) -> Callable[..., RaySession]:
    """A constructor with :class:`Session`'s signature whose sessions use ``backend``."""

    def factory(*args: Any, **kwargs: Any) -> RaySession:
        s = RaySession(*args, **kwargs)
        s.backend = backend
        return s

    return factory


# ---------------------------------------------------------------------------------------------
# batch

@dataclass
class BatchReport:
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, list[str]] = field(default_factory=dict)
    wall_s: float = 0.0


def output_name(path: Path) -> str:
    return Path(path).stem + ".h5"


def run_batch(chain: str | os.PathLike | ChainSpec, inputs: Sequence[Path], outdir: Path,
              backend: RayBackend, out_group: str = "dataset_recon", in_group: str = "dataset",
              device: Optional[str] = None, chains_dir: Optional[Path] = None,
              progress: Optional[Callable[[BatchReport, int], None]] = None) -> BatchReport:
    """Reconstruct ``inputs`` in parallel on Ray into ``outdir/<stem>.h5``; finished outputs are skipped.

    ``progress(report, total)`` is called after every finished file. Files whose chain reported
    errors get no output (so a rerun tries them again) and are listed in ``report.failed``.
    """
    t0 = time.perf_counter()
    spec = chain if isinstance(chain, ChainSpec) else load_chain(chain, chains_dir, allow_paths=True)
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    names: dict[str, Path] = {}
    for p in inputs:
        name = output_name(Path(p))
        if name in names:
            raise ValueError(f"two inputs would write the same output {name}: {names[name]} and {p}")
        names[name] = Path(p)
    report = BatchReport()
    pending: dict[Any, str] = {}
    for name, path in names.items():
        if (outdir / name).exists():
            report.skipped.append(name)
            continue
        pending[backend.submit_file(spec, path, out_group, in_group, device)] = name
    total = len(names)
    if progress is not None:
        progress(report, total)
    ray = backend.ray
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            name = pending.pop(ref)
            try:
                out = ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - the task failed (retries exhausted / exception)
                text = str(exc).strip().splitlines()
                report.failed[name] = [f"[ray] ERROR: {type(exc).__name__}: {text[-1] if text else ''}"]
                continue
            if out["errors"] or out["h5"] is None:
                report.failed[name] = list(out["errors"]) or ["[run] ERROR: no output written"]
                continue
            part = outdir / (name + ".part")
            part.write_bytes(out["h5"])
            os.replace(part, outdir / name)
            report.done.append(name)
        if progress is not None:
            progress(report, total)
    report.wall_s = time.perf_counter() - t0
    return report


def print_progress(report: BatchReport, total: int, stream: Any = None) -> None:
    """One progress line, rewritten in place: ``[ray] 3/10 files (1 skipped, 0 failed)``."""
    stream = stream or sys.stderr
    n = len(report.done) + len(report.skipped) + len(report.failed)
    stream.write(f"\r[ray] {n}/{total} files ({len(report.skipped)} skipped, {len(report.failed)} failed)")
    if n >= total:
        stream.write("\n")
    stream.flush()
