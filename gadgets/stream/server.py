"""The streaming reconstruction server (Gadgetron / MRD compatible, PROTOCOL.md).

:class:`ReconServer` listens on ``127.0.0.1:9002`` by default (``host`` widens it). A connection
goes through two phases:

* **Accept phase** — one thread with a selector reads every new connection's CONFIG / HEADER
  messages without blocking (no thread or worker per connection). A connection leaves it when its
  HEADER (or CLOSE, or anything the session must answer) has arrived. Limits: ``handshake_timeout_s``
  from connect to header (a deadline, not per ``recv``: trickling bytes does not extend it);
  ``max_pending`` connections in this phase, at most ``max_pending_per_peer`` from one address —
  beyond either cap the *oldest* such connection is answered TEXT + CLOSE and dropped, so a new
  client is always read; bytes and messages before the header are bounded too. A connection that
  times out or is dropped gets ``"[server] ERROR: ..."`` + CLOSE. QUERY messages of this phase are
  answered here at once (a client may wait for the RESPONSE before it sends anything else).
* **Session** — the connection, with the bytes already read, is served by one of ``max_sessions``
  workers (:class:`~gadgets.stream.session.Session`: state machine, chain, full-duplex replies,
  TEXT errors and CLOSE last), in its own **process** by default (``isolation="process"``: a
  ``forkserver`` child per session, forked from a process that has torch and the gadgets imported;
  each worker starts its next session's process while it waits for a connection, so a session does
  not wait for a process to start; a crash, a native fault or an out-of-memory kill costs that
  session only — the server answers its client TEXT + CLOSE and serves on). ``isolation="thread"``
  runs sessions as threads of the server process (as before; used where a session must share the
  process, e.g. for debugging). The session deadline (``session_timeout_s``) counts from accept.

Devices: each session process opens its own CUDA context on first use (the forkserver never
touches CUDA, so children can); ``max_sessions`` bounds how many contexts share a GPU.

Threads and torch: ``torch_threads`` sets the intra-op threads of every session (``0`` →
``cpu_count // max_sessions`` so concurrent sessions do not oversubscribe the cores; ``None`` leaves
torch's default).

Shutdown: :meth:`ReconServer.request_shutdown` is safe to call from a signal handler
(:func:`install_signal_handlers`: first SIGTERM/SIGINT = graceful — stop accepting, connections not
yet served get TEXT "server shutting down" + CLOSE, running sessions get ``shutdown_grace_s`` to
finish and are then cancelled; a second signal cancels at once). :meth:`serve_forever` returns
within about ``shutdown_grace_s`` + 10 s of the first signal.

Every session ends with one INFO line on the ``torchgadgets.access`` logger (peer, chain, images,
seconds, outcome); with ``access_log=True`` (default) that logger prints even when the rest of the
logging is at WARNING.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import multiprocessing
import multiprocessing.reduction
import os
import queue
import selectors
import signal
import socket
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from gadgets.ismrmrd_io import warm_header_parser
from gadgets.stream.protocol import (Close, MessageId, MessageReader, ProtocolError, ProtocolLimits, Response,
                                     Text, control_frame_length, encode_message)
from gadgets.stream.selection import SelectionRules, load_rules
from gadgets.stream.session import Session, SessionConfig, SessionSummary, access_log, answer_query

__all__ = ["ReconServer", "install_signal_handlers", "default_torch_threads", "parse_size", "DEFAULT_PORT"]

DEFAULT_PORT = 9002
_POLL_S = 0.2
_RECV_CHUNK = 1 << 16
_MAX_PRELUDE_MESSAGES = 64        # QUERY / TEXT messages allowed before the header
_CANCEL_GRACE_S = 10.0            # a cancelled session process is killed after this long
_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_GiB = 1 << 30
log = logging.getLogger("torchgadgets.server")

#: Modules the session forkserver imports once, so a session process starts without importing them
#: (``gadgets.cli``: what the ``torchgadgets`` script imports, which multiprocessing runs again in
#: every child as its main module; see :func:`_forkserver_preload`).
_PRELOAD = ["torch", "numpy", "ismrmrd", "gadgets.stream.session", "gadgets.stream.runner", "gadgets.noise",
            "gadgets.oversampling", "gadgets.buffer", "gadgets.coils", "gadgets.recon", "gadgets.export",
            "gadgets.stream.server", "gadgets.cli"]


def _forkserver_preload() -> list[str]:
    """:data:`_PRELOAD` plus the main module when it was run by name (``python -m pkg.mod``):
    multiprocessing imports it again in every child before the child runs (so its ``__main__``
    objects can be unpickled); imported once in the forkserver, that costs each session process
    almost nothing. Not for ``pkg.__main__`` (multiprocessing leaves those alone)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    name = getattr(spec, "name", None)
    if not name or name == "__main__" or name.endswith(".__main__") or name in _PRELOAD:
        return list(_PRELOAD)
    return _PRELOAD + [name]


def parse_size(text: str) -> int:
    """Bytes of a size given as ``123``, ``64K``, ``256M``, ``8G`` (powers of 1024); for the CLI."""
    t = str(text).strip().upper().removesuffix("B").removesuffix("I")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(t[-1:], 1)
    number = t[:-1] if scale != 1 else t
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"not a size: {text!r} (examples: 4096, 64K, 256M, 8G)") from None
    if value <= 0:
        raise ValueError(f"a size must be positive, got {text!r}")
    return int(value * scale)


def default_torch_threads(max_sessions: int) -> int:
    """Torch intra-op threads so that ``max_sessions`` concurrent sessions share the cores."""
    return max(1, (os.cpu_count() or 1) // max(1, max_sessions))


def quiet_deprecations() -> None:
    """Silence DeprecationWarnings of third-party packages (torch prints one at the first session)
    so an operator's console shows the server's own lines only."""
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\..*")


def setup_access_log(enabled: bool = True) -> None:
    """Make the per-session line of ``torchgadgets.access`` visible (INFO) even when the logging
    configuration shows warnings only; no-op when disabled or already set up."""
    logger = logging.getLogger("torchgadgets.access")
    if not enabled or getattr(logger, "_torchgadgets_setup", False):
        return
    logger._torchgadgets_setup = True  # type: ignore[attr-defined]
    logger.setLevel(logging.INFO)
    if not logging.getLogger().isEnabledFor(logging.INFO) and not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_LOG_FORMAT))
        logger.addHandler(handler)
        logger.propagate = False


def _send_now(sock: socket.socket, text: str, linger_s: float = 0.0) -> None:
    """Best effort TEXT + CLOSE on a socket (blocking or not), then end our side and close it.

    ``linger_s``: read (and discard) what the client still sends for up to that long before closing,
    so unread input does not turn into a TCP reset that destroys the CLOSE before it is read.
    """
    try:
        data = encode_message(Text(text)) + encode_message(Close())
        sock.settimeout(1.0)
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        end = time.monotonic() + linger_s
        sock.settimeout(0.1)
        while time.monotonic() < end:
            try:
                if not sock.recv(_RECV_CHUNK):
                    break
            except socket.timeout:
                continue
    except OSError:
        pass
    finally:
        sock.close()


@dataclass
class _Pending:
    """A connection in the accept phase."""

    sock: socket.socket
    peer: str
    host: str
    sid: str
    started: float
    buf: bytearray = field(default_factory=bytearray)
    scanned: int = 0          # bytes of ``buf`` already framed
    messages: int = 0
    queries: int = 0          # QUERY messages answered in the accept phase


@dataclass
class _Ready:
    """A connection handed from the accept phase to a worker."""

    sock: socket.socket
    peer: str
    sid: str
    prelude: bytes
    started: float
    queries: int = 0


class _Running:
    """A session being served, thread or process; :meth:`cancel` stops it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.session: Optional[Session] = None
        self.process: Optional[Any] = None
        self.stop: Optional[Any] = None           # the session process's stop event
        self.cancel_at: Optional[float] = None

    def cancel(self) -> None:
        if self.cancel_at is None:
            self.cancel_at = time.monotonic()
        if self.session is not None and self.session.runner is not None:
            self.session.runner.cancel("server shutdown")
        if self.stop is not None:
            self.stop.set()
        try:
            self.sock.shutdown(socket.SHUT_RD)   # unblock a read waiting for the client
        except OSError:
            pass


def _session_main(jobs: Any, config: SessionConfig, rules_from: Any, log_level: int, access: bool, stop: Any,
                  result: Any) -> None:
    """Body of a session process: set up, wait for its connection on ``jobs``, serve it, and send the
    summary back through ``result``.

    The process is started before its connection arrives (:class:`_SessionProcess`), so the set-up
    (process start, logging, selection rules) is done while the worker waits for a client. The job is
    ``(peer, sid, prelude, started, queries, family, type, proto)`` followed by the socket's file
    descriptor; None or a closed ``jobs`` (the server stops) ends the process unused. The selection
    rules hold compiled matchers (not picklable): they are loaded again from ``rules_from`` (the file
    or chain folder the server loaded them from)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)      # the server process decides (it sets ``stop``)
    logging.basicConfig(level=log_level, format=_LOG_FORMAT, stream=sys.stderr)
    quiet_deprecations()
    setup_access_log(access)
    config = dataclasses.replace(config, rules=load_rules(rules_from))
    warm_header_parser()                               # off the critical path: no client yet
    if config.torch_threads:
        import torch

        torch.set_num_threads(config.torch_threads)
    try:
        job = jobs.recv()
        if job is None:
            return
        fd = multiprocessing.reduction.recv_handle(jobs)
    except (EOFError, OSError):
        return
    jobs.close()
    peer, sid, prelude, started, queries, family, kind, proto = job
    sock = socket.socket(family, kind, proto, fileno=fd)
    session = Session(sock, peer, sid, config, chain_logger=logging.getLogger(f"torchgadgets.session.{sid}"),
                      stop_event=stop, prelude=prelude, started=started, answered_queries=queries)
    summary = session.run()
    try:
        result.send(summary)
    except (OSError, ValueError, TypeError) as exc:  # a summary that cannot be pickled: the basics
        result.send(SessionSummary(session_id=summary.session_id, peer=summary.peer, chain=summary.chain,
                                   images_sent=summary.images_sent, errors=[str(exc)],
                                   close_sent=summary.close_sent, wall_s=summary.wall_s,
                                   kind=summary.kind, outcome=summary.outcome))
    result.close()


class _SessionProcess:
    """A session process started ahead of its connection (see :func:`_session_main`)."""

    def __init__(self, mp: Any, config: SessionConfig, rules_from: Any, access: bool, name: str) -> None:
        self.result, send_end = mp.Pipe(duplex=False)
        self.jobs, child_jobs = mp.Pipe(duplex=True)       # a socket pair: carries the connection's fd
        self.stop = mp.Event()
        level = logging.getLogger("torchgadgets").getEffectiveLevel()
        self.proc = mp.Process(target=_session_main, name=name, daemon=True,
                               args=(child_jobs, dataclasses.replace(config, rules=None), rules_from, level,
                                     access, self.stop, send_end))
        try:
            self.proc.start()
        except BaseException:
            for c in (self.result, send_end, self.jobs, child_jobs):
                c.close()
            raise
        send_end.close()
        child_jobs.close()

    def hand(self, item: "_Ready") -> None:
        """Give the process its connection (raises OSError when the process is gone)."""
        sock = item.sock
        self.jobs.send((item.peer, item.sid, item.prelude, item.started, item.queries, sock.family, sock.type,
                        sock.proto))
        multiprocessing.reduction.send_handle(self.jobs, sock.fileno(), self.proc.pid)
        self.jobs.close()

    def retire(self) -> None:
        """End a process that was not given a connection (the server stops, or it is not needed)."""
        try:
            self.jobs.send(None)
        except (OSError, ValueError):
            pass
        self.jobs.close()
        self.result.close()
        self.proc.join(2.0)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


def _bytes_reader(data: bytes) -> Callable[[int], bytes]:
    pos = [0]

    def read(n: int) -> bytes:
        chunk = data[pos[0]:pos[0] + n]
        pos[0] += n
        return chunk

    return read


class ReconServer:
    """A multi-session reconstruction server (see the module docstring).

    Parameters
    ----------
    host, port
        Listen address; ``127.0.0.1`` by default, port 0 picks a free port (see :attr:`port`).
    chains_dir
        Chain directory for names sent with CONFIG_FILE and for ``selection.yaml`` (default: the
        chain directory in use, ``$TORCHGADGETS_CHAINS`` or ``gadgets/chains/``).
    device
        Default device of chains (``auto | cpu | cuda[:N]``; a chain's ``device:`` overrides it).
    max_sessions
        Sessions reconstructing at the same time.
    queue_limit
        Sessions (header received) waiting for a free worker; beyond that they stay in the accept
        phase, unread, until one is free (their handshake deadline then no longer applies).
    save_raw_dir
        When set, every session's raw data are saved there as ISMRMRD before reconstruction.
    noise_store_dir
        Noise dependency folder (noise gadgets save/load there; dependency queries read it).
    read_timeout_s
        A client silent this long while the server waits for its data ends the session (also the
        send timeout for a client that stops reading). None: wait forever.
    limits
        Protocol size limits.
    queue_size, queue_bytes
        Capacity of the queue in front of each chain stage, in messages and in bytes.
    torch_threads
        See the module docstring (None: leave torch alone; 0: automatic).
    selection_file
        Selection rules file; default ``<chains_dir>/selection.yaml``.
    chain_timeout_s
        Longest wait for a chain to finish after CLOSE (None: no limit).
    handshake_timeout_s
        Deadline from connect to a complete ISMRMRD header (None: none).
    session_timeout_s
        Deadline from connect to the end of the session, reconstruction included (None: none).
    max_pending, max_pending_per_peer
        Connections in the accept phase, in all and from one address (the oldest is dropped).
    max_matrix, max_channels, max_session_bytes
        Header limits and the memory budget of one session (see :class:`SessionConfig`).
    inline_chains
        ``safe`` (chains sent inline may not name files) or ``off`` (refused).
    isolation
        ``process`` (a process per session) or ``thread``.
    shutdown_grace_s
        After a graceful shutdown request, how long running sessions may take before they are
        cancelled.
    gadgets
        Extra gadget registrations ``name → "module:Class"`` (site gadgets; tests).
    access_log
        Print the per-session line (see the module docstring).
    ray_address, ray_options
        Run every reconstruction as a Ray task (``local`` | ``auto`` | ``HOST:PORT``; options of
        :class:`~gadgets.stream.ray_backend.RayBackend`). Sessions are then threads of this process
        (they only buffer and stream; the work is on the cluster). None: Ray is not imported.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
                 chains_dir: Union[str, os.PathLike[str], None] = None, device: str = "auto",
                 max_sessions: int = 2, queue_limit: int = 16,
                 save_raw_dir: Union[str, os.PathLike[str], None] = None,
                 noise_store_dir: Union[str, os.PathLike[str], None] = None,
                 read_timeout_s: Optional[float] = 300.0, limits: ProtocolLimits = ProtocolLimits(),
                 queue_size: int = 64, torch_threads: Optional[int] = None,
                 selection_file: Union[str, os.PathLike[str], None] = None,
                 chain_timeout_s: Optional[float] = None, backlog: int = 128,
                 handshake_timeout_s: Optional[float] = 30.0, session_timeout_s: Optional[float] = 3600.0,
                 max_pending: int = 512, max_pending_per_peer: int = 64,
                 max_matrix: int = 1024, max_channels: int = 256, max_session_bytes: int = 8 * _GiB,
                 queue_bytes: int = 256 << 20, inline_chains: str = "safe", isolation: str = "process",
                 shutdown_grace_s: float = 30.0, gadgets: Optional[Mapping[str, str]] = None,
                 access_log: bool = True, ray_address: Optional[str] = None,
                 ray_options: Optional[Mapping[str, Any]] = None) -> None:
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be at least 1, got {max_sessions}")
        if queue_limit < 1:
            raise ValueError(f"queue_limit must be at least 1, got {queue_limit}")
        for name, value in (("read_timeout_s", read_timeout_s), ("handshake_timeout_s", handshake_timeout_s),
                            ("session_timeout_s", session_timeout_s)):
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive or None, got {value}")
        if max_pending < 1 or max_pending_per_peer < 1:
            raise ValueError("max_pending and max_pending_per_peer must be at least 1")
        if inline_chains not in ("safe", "off"):
            raise ValueError(f"inline_chains must be 'safe' or 'off', got {inline_chains!r}")
        if isolation not in ("process", "thread"):
            raise ValueError(f"isolation must be 'process' or 'thread', got {isolation!r}")
        self.host = host
        self._requested_port = int(port)
        self.max_sessions = max_sessions
        self.queue_limit = queue_limit
        self.backlog = backlog
        self.handshake_timeout_s = handshake_timeout_s
        self.max_pending = max_pending
        self.max_pending_per_peer = max_pending_per_peer
        self._session_cls: Callable[..., Session] = Session
        self.ray_backend: Any = None
        if ray_address is not None:
            from gadgets.stream.ray_backend import RayBackend, make_session_factory

            self.ray_backend = RayBackend(ray_address, **dict(ray_options or {}))
            self._session_cls = make_session_factory(self.ray_backend)
            isolation = "thread"
        self.isolation = isolation
        self.shutdown_grace_s = shutdown_grace_s
        self.access_log = access_log
        chains = Path(chains_dir) if chains_dir is not None else None
        self._rules_from = selection_file if selection_file is not None else chains
        rules: SelectionRules = load_rules(self._rules_from)
        threads = torch_threads
        if threads == 0:
            threads = default_torch_threads(max_sessions)
        self.config = SessionConfig(
            chains_dir=chains, device=device, queue_size=queue_size,
            save_raw_dir=Path(save_raw_dir) if save_raw_dir is not None else None,
            noise_store_dir=Path(noise_store_dir) if noise_store_dir is not None else None,
            read_timeout_s=read_timeout_s, limits=limits, rules=rules, torch_threads=threads,
            chain_timeout_s=chain_timeout_s, session_timeout_s=session_timeout_s, max_matrix=max_matrix,
            max_channels=max_channels, max_session_bytes=max_session_bytes, queue_bytes=queue_bytes,
            inline_chains=inline_chains, gadgets=dict(gadgets or {}))
        self._max_prelude_bytes = 2 * limits.max_text_bytes + 4096
        self._ready: queue.Queue[_Ready] = queue.Queue()
        self._listener: Optional[socket.socket] = None
        self._accepting = threading.Event()
        self._stopping = threading.Event()        # no new connections
        self._cancel = threading.Event()          # cancel running sessions (non-graceful)
        self._lock = threading.Lock()
        self._active: dict[str, _Running] = {}
        self._finished = threading.Condition(self._lock)   # notified when a session's summary is added
        self._counter = 0
        self._threads: list[threading.Thread] = []
        self._acceptor: Optional[threading.Thread] = None
        self._mp: Any = None
        self._spawned = itertools.count(1)        # names of the session processes started ahead
        #: the last 1000 sessions' summaries (monitoring, tests)
        self.summaries: collections.deque[SessionSummary] = collections.deque(maxlen=1000)
        self.dropped: collections.Counter[str] = collections.Counter()   # accept-phase drops by reason

    # -- properties ----------------------------------------------------------------------------
    @property
    def port(self) -> int:
        """The port actually listened on (resolved after :meth:`start` / :meth:`serve_forever`)."""
        if self._listener is not None:
            try:
                self._bound_port = int(self._listener.getsockname()[1])
            except OSError:  # listener already closed by shutdown(): keep the last bound port
                pass
        return getattr(self, "_bound_port", None) or self._requested_port

    @property
    def accepting(self) -> bool:
        """True while new connections are accepted."""
        return self._accepting.is_set()

    @property
    def active_sessions(self) -> int:
        """Sessions running now."""
        with self._lock:
            return len(self._active)

    def wait_for_summaries(self, match: Callable[[SessionSummary], bool], count: int = 1,
                           timeout: Optional[float] = None) -> list[SessionSummary]:
        """The summaries of finished sessions for which ``match`` is true (oldest first), once there
        are at least ``count`` of them.

        A client has its CLOSE before the server's worker has added the session's summary (the
        session still lingers for the client to close its side), so monitoring code and tests wait
        here instead of reading :attr:`summaries` right after the client returns.

        Raises
        ------
        TimeoutError
            Fewer than ``count`` matching summaries after ``timeout`` seconds (None: wait forever).
        """
        def found() -> list[SessionSummary]:
            return [s for s in self.summaries if match(s)]

        with self._finished:
            if not self._finished.wait_for(lambda: len(found()) >= count, timeout):
                raise TimeoutError(f"{len(found())} of {count} matching session summaries after {timeout} s "
                                   f"({len(self._active)} session(s) still running)")
            return found()

    # -- lifecycle -----------------------------------------------------------------------------
    def _bind(self) -> None:
        if self._listener is not None:
            return
        setup_access_log(self.access_log)
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self._requested_port))
            sock.listen(self.backlog)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._listener = sock
        if self.isolation == "process":
            self._mp = multiprocessing.get_context("forkserver")
            self._mp.set_forkserver_preload(_forkserver_preload())
        for slot in range(self.max_sessions):
            t = threading.Thread(target=self._worker, args=(slot,), name=f"torchgadgets-worker-{slot}",
                                 daemon=True)
            self._threads.append(t)
            t.start()
        self._accepting.set()
        log.info("listening on %s:%d (%d session(s) at a time in %ss, device %s, chains %s%s)", self.host,
                 self.port, self.max_sessions, self.isolation, self.config.device,
                 self.config.chains_dir or "default",
                 f", raw data to {self.config.save_raw_dir}" if self.config.save_raw_dir else "")

    def start(self) -> "ReconServer":
        """Bind and serve in a background thread; returns self (use :attr:`port`)."""
        self._bind()
        self._acceptor = threading.Thread(target=self._accept_loop, name="torchgadgets-accept", daemon=True)
        self._acceptor.start()
        return self

    def serve_forever(self) -> None:
        """Bind and serve in the calling thread until a shutdown is requested; then wait for sessions
        (at most ``shutdown_grace_s``, then they are cancelled). Third-party DeprecationWarnings are
        silenced (:func:`quiet_deprecations`): an operator's console shows the server's lines."""
        quiet_deprecations()
        self._bind()
        self._accept_loop()
        self._join_workers(self.shutdown_grace_s)
        if any(t.is_alive() for t in self._threads):
            log.warning("sessions still running %g s after the shutdown request: cancelling them",
                        self.shutdown_grace_s)
            self.request_shutdown(graceful=False)
            self._join_workers(_CANCEL_GRACE_S + 5.0)

    def request_shutdown(self, graceful: bool = True) -> None:
        """Stop accepting (non-blocking, signal-safe); ``graceful=False`` also cancels running sessions."""
        self._stopping.set()
        if not graceful:
            self._cancel.set()
            with self._lock:
                running = list(self._active.values())
            for r in running:
                r.cancel()

    def shutdown(self, graceful: bool = True, timeout: Optional[float] = None) -> None:
        """Stop accepting, let running sessions finish (or cancel them), and wait for the threads."""
        self.request_shutdown(graceful)
        if self._acceptor is not None and self._acceptor is not threading.current_thread():
            self._acceptor.join(timeout)
        self._join_workers(timeout)

    def _join_workers(self, timeout: Optional[float]) -> None:
        end = None if timeout is None else time.monotonic() + timeout
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(None if end is None else max(0.0, end - time.monotonic()))
        alive = [t.name for t in self._threads if t.is_alive()]
        if alive:
            log.warning("workers still running after %s s: %s", timeout, alive)

    def __enter__(self) -> "ReconServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.shutdown(graceful=True, timeout=60.0)

    # -- accept phase --------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        listener = self._listener
        if listener is None:
            raise RuntimeError("_accept_loop() before _bind()")
        sel = selectors.DefaultSelector()
        sel.register(listener, selectors.EVENT_READ, None)
        pending: dict[int, _Pending] = {}
        held: collections.deque[_Pending] = collections.deque()   # header complete, no room in the queue
        try:
            while not self._stopping.is_set():
                for key, _ in sel.select(timeout=_POLL_S):
                    if key.data is None:
                        self._accept_some(listener, sel, pending, held)
                    else:
                        p = key.data
                        if p.sock.fileno() in pending:
                            self._read_some(p, sel, pending, held)
                self._expire(sel, pending)
                while held and self._ready.qsize() < self.queue_limit:
                    self._hand_off(held.popleft())
        finally:
            port = listener.getsockname()[1]
            sel.close()
            listener.close()
            self._accepting.clear()
            for p in list(pending.values()) + list(held):
                self._drop(p, "server shutting down; connection not served", "shutdown")
            log.info("no longer accepting connections on port %d", port)

    def _accept_some(self, listener: socket.socket, sel: selectors.BaseSelector,
                     pending: dict[int, _Pending], held: collections.deque[_Pending]) -> None:
        for _ in range(64):
            try:
                conn, addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("accept failed: %s", exc)
                return
            conn.setblocking(False)
            host = str(addr[0])
            with self._lock:
                self._counter += 1
                sid = f"s{self._counter}"
            p = _Pending(conn, f"{host}:{addr[1]}", host, sid, time.monotonic())
            same = [q for q in pending.values() if q.host == host]
            if len(same) >= self.max_pending_per_peer:
                oldest = min(same, key=lambda q: q.started)
                self._unregister(oldest, sel, pending)
                self._drop(oldest, f"too many connections from {host} waiting for their header (at most "
                                   f"{self.max_pending_per_peer}, --max-pending-per-peer); oldest dropped",
                           "per-peer cap")
            elif len(pending) + len(held) >= self.max_pending:
                if not pending:      # every place taken by sessions waiting for a worker: refuse this one
                    self._drop(p, f"server busy: {len(held)} sessions are waiting for a free worker "
                                  f"(--max-pending {self.max_pending})", "busy")
                    continue
                oldest = min(pending.values(), key=lambda q: q.started)
                self._unregister(oldest, sel, pending)
                self._drop(oldest, f"too many connections waiting for their header (at most "
                                   f"{self.max_pending}, --max-pending); oldest dropped", "pending cap")
            pending[conn.fileno()] = p
            sel.register(conn, selectors.EVENT_READ, p)
            log.debug("[%s %s] connection accepted (%d in the accept phase)", sid, p.peer, len(pending))

    def _unregister(self, p: _Pending, sel: selectors.BaseSelector, pending: dict[int, _Pending]) -> None:
        pending.pop(p.sock.fileno(), None)
        try:
            sel.unregister(p.sock)
        except (KeyError, ValueError, OSError):
            pass

    def _drop(self, p: _Pending, reason: str, kind: str) -> None:
        self.dropped[kind] += 1
        log.info("[%s %s] dropped before its header: %s", p.sid, p.peer, reason)
        _send_now(p.sock, f"[server] ERROR: {reason}")

    def _read_some(self, p: _Pending, sel: selectors.BaseSelector, pending: dict[int, _Pending],
                   held: collections.deque[_Pending]) -> None:
        try:
            chunk = p.sock.recv(_RECV_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:          # the client ended before its header: let a session answer what it sent
            self._unregister(p, sel, pending)
            if p.buf:
                self._queue(p, held)
            else:
                p.sock.close()
            return
        p.buf += chunk
        limits = self.config.limits
        while True:
            n = control_frame_length(memoryview(p.buf)[p.scanned:], limits)
            if n is None:
                break
            mid = int.from_bytes(p.buf[p.scanned:p.scanned + 2], "little")
            if n < 0 or mid in (MessageId.HEADER, MessageId.CLOSE):
                self._unregister(p, sel, pending)
                self._queue(p, held)       # a header (or something the session must answer)
                return
            p.messages += 1
            if mid == MessageId.QUERY and self._answer_now(p, n):
                continue                   # answered here: a client may wait for it before going on
            p.scanned += n
        if p.messages > _MAX_PRELUDE_MESSAGES or len(p.buf) > self._max_prelude_bytes:
            self._unregister(p, sel, pending)
            self._drop(p, f"more than {_MAX_PRELUDE_MESSAGES} messages or {self._max_prelude_bytes} bytes "
                          f"before the ISMRMRD header", "prelude size")

    def _answer_now(self, p: _Pending, n: int) -> bool:
        """Answer a QUERY of the accept phase at once (RESPONSE) and take it out of the buffer."""
        try:
            reader = MessageReader(_bytes_reader(bytes(p.buf[p.scanned:p.scanned + n])), self.config.limits)
            q = reader.read_message()
            data = encode_message(Response(q.correlation_id, answer_query(q.text, self.config.device)))
            p.sock.settimeout(1.0)
            try:
                p.sock.sendall(data)
            finally:
                p.sock.setblocking(False)
        except (ProtocolError, OSError, AttributeError):
            return False                   # leave it to the session (it reports a bad query)
        del p.buf[p.scanned:p.scanned + n]
        p.queries += 1
        return True

    def _expire(self, sel: selectors.BaseSelector, pending: dict[int, _Pending]) -> None:
        if self.handshake_timeout_s is None:
            return
        now = time.monotonic()
        for p in [q for q in pending.values() if now - q.started > self.handshake_timeout_s]:
            self._unregister(p, sel, pending)
            self._drop(p, f"no config and ISMRMRD header within {self.handshake_timeout_s:g} s of connecting "
                          f"(--handshake-timeout); connection closed", "handshake timeout")

    def _queue(self, p: _Pending, held: collections.deque[_Pending]) -> None:
        if self._ready.qsize() < self.queue_limit and not held:
            self._hand_off(p)
        else:
            held.append(p)

    def _hand_off(self, p: _Pending) -> None:
        p.sock.setblocking(True)
        self._ready.put(_Ready(p.sock, p.peer, p.sid, bytes(p.buf), p.started, p.queries))

    # -- workers -------------------------------------------------------------------------------
    def _worker(self, slot: int) -> None:
        chain_logger = logging.getLogger(f"torchgadgets.session.w{slot}")
        spare_box: list[Optional[_SessionProcess]] = [None]   # the next session's process, started ahead
        try:
            self._serve_slot(slot, chain_logger, spare_box)
        finally:
            if spare_box[0] is not None:
                spare_box[0].retire()

    def _next_process(self, slot: int) -> Optional[_SessionProcess]:
        """Start the process of this worker's next session (None when it cannot be started; the
        session then starts one itself, or runs in a thread)."""
        try:
            return _SessionProcess(self._mp, self.config, self._rules_from, self.access_log,
                                   f"torchgadgets-w{slot}-{next(self._spawned)}")
        except (OSError, RuntimeError, ValueError) as exc:
            log.warning("cannot start a session process ahead (%s: %s)", type(exc).__name__, exc)
            return None

    def _serve_slot(self, slot: int, chain_logger: logging.Logger,
                    spare_box: list[Optional[_SessionProcess]]) -> None:
        """The worker's loop: take a connection from the queue and serve it (in the process started
        for it while the worker waited, or in a thread)."""
        while True:
            if self.isolation == "process" and spare_box[0] is None and not self._stopping.is_set():
                spare_box[0] = self._next_process(slot)
            try:
                item = self._ready.get(timeout=_POLL_S)
            except queue.Empty:
                if self._stopping.is_set() and not self._accepting.is_set():
                    return
                continue
            if self._stopping.is_set():
                log.info("[%s %s] rejected: server shutting down", item.sid, item.peer)
                _send_now(item.sock, "[server] ERROR: server shutting down; connection not served")
                continue
            running = _Running(item.sock)
            with self._lock:
                self._active[item.sid] = running
            summary: Optional[SessionSummary] = None
            try:
                if self.isolation == "process":
                    spare, spare_box[0] = spare_box[0], None
                    summary = self._run_process(item, running, spare)
                else:
                    summary = self._run_thread(item, running, chain_logger)
            except Exception as exc:  # the worker must survive whatever one session does
                log.exception("[%s %s] worker error", item.sid, item.peer)
                summary = SessionSummary(session_id=item.sid, peer=item.peer,
                                         errors=[f"[server] ERROR: internal error: {type(exc).__name__}"],
                                         outcome="crashed")
                _send_now(item.sock, summary.errors[0])
            finally:
                # the summary is published before the session stops counting as active, in one step:
                # whoever sees ``active_sessions`` drop (or waits in wait_for_summaries) finds it
                with self._finished:
                    if summary is not None:
                        self.summaries.append(summary)
                    self._active.pop(item.sid, None)
                    self._finished.notify_all()

    def _run_thread(self, item: _Ready, running: _Running, chain_logger: logging.Logger) -> SessionSummary:
        session = self._session_cls(item.sock, item.peer, item.sid, self.config, chain_logger=chain_logger,
                                    stop_event=self._cancel, prelude=item.prelude, started=item.started,
                                    answered_queries=item.queries)
        running.session = session
        if self._cancel.is_set():
            running.cancel()
        return session.run()                # catches every Exception of the session itself

    def _run_process(self, item: _Ready, running: _Running, spare: Optional[_SessionProcess] = None
                     ) -> SessionSummary:
        """Serve ``item`` in ``spare`` (a process started ahead) or, when there is none or it is gone,
        in a new process."""
        t0 = time.perf_counter()
        sp: Optional[_SessionProcess] = spare
        for attempt in range(2):        # the process started ahead, or (it is gone) a new one
            if sp is None or not sp.proc.is_alive():
                if sp is not None:
                    sp.retire()
                try:
                    sp = _SessionProcess(self._mp, self.config, self._rules_from, self.access_log,
                                         f"torchgadgets-{item.sid}")
                except (OSError, RuntimeError, ValueError) as exc:   # no session process: a thread serves it
                    log.warning("[%s %s] cannot start a session process (%s: %s); serving this session in a "
                                "thread", item.sid, item.peer, type(exc).__name__, exc)
                    return self._run_thread(item, running,
                                            logging.getLogger(f"torchgadgets.session.{item.sid}"))
            try:
                sp.hand(item)
                break
            except (OSError, ValueError) as exc:       # it ended before it got the connection
                log.info("[%s %s] session process gone before its connection (%s); starting another",
                         item.sid, item.peer, exc)
                sp.retire()
                sp = None
        else:
            log.warning("[%s %s] no session process took the connection; serving this session in a thread",
                        item.sid, item.peer)
            return self._run_thread(item, running, logging.getLogger(f"torchgadgets.session.{item.sid}"))
        assert sp is not None
        proc, recv_end = sp.proc, sp.result
        running.stop = sp.stop
        running.process = proc
        if self._cancel.is_set():
            running.cancel()
        summary: Optional[SessionSummary] = None
        while summary is None and (proc.is_alive() or recv_end.poll()):
            if recv_end.poll(_POLL_S):
                try:
                    summary = recv_end.recv()
                except (EOFError, OSError):
                    break
            if running.cancel_at is not None and time.monotonic() - running.cancel_at > _CANCEL_GRACE_S:
                proc.kill()
        proc.join(_CANCEL_GRACE_S)
        if proc.is_alive():
            proc.kill()
            proc.join()
        recv_end.close()
        if summary is not None:
            item.sock.close()
            return summary
        code = proc.exitcode
        if code is not None and code < 0:
            how = f"signal {-code} ({signal.Signals(-code).name})"
        else:
            how = f"exit code {code}"
        line = (f"[server] ERROR: the session's worker process ended abnormally ({how}); this session is "
                f"lost, the server goes on")
        log.error("[%s %s] %s", item.sid, item.peer, line)
        summary = SessionSummary(session_id=item.sid, peer=item.peer, errors=[line], kind="recon",
                                 wall_s=time.perf_counter() - t0, outcome="crashed")
        _send_now(item.sock, line, linger_s=2.0)
        summary.close_sent = True
        access_log(summary)
        return summary


def install_signal_handlers(server: ReconServer,
                            signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)) -> Callable[[], None]:
    """Make SIGTERM/SIGINT shut ``server`` down: first signal graceful, second cancels sessions.

    Must be called from the main thread. Returns a function restoring the previous handlers.
    """
    previous = {sig: signal.getsignal(sig) for sig in signals}
    count = {"n": 0}

    def handler(signum: int, frame: Any) -> None:
        count["n"] += 1
        graceful = count["n"] == 1
        log.warning("signal %d: %s shutdown", signum, "graceful" if graceful else "immediate")
        server.request_shutdown(graceful=graceful)

    for sig in signals:
        signal.signal(sig, handler)

    def restore() -> None:
        for sig, h in previous.items():
            signal.signal(sig, h)

    return restore
