"""The streaming reconstruction server (Gadgetron / MRD compatible, PROTOCOL.md).

:class:`ReconServer` listens on ``127.0.0.1:9002`` by default (``host`` widens it). Each accepted
connection is one :class:`~gadgets.stream.session.Session` (state machine, chain choice, full-duplex
replies, TEXT errors and CLOSE last) run by one of ``max_sessions`` worker threads; further
connections wait in a bounded queue (``queue_limit``) and, behind it, in the kernel's accept
backlog, and run as soon as a worker is free. A session can fail in any way (bad bytes, client
gone, an exception or out-of-memory inside the chain): it ends with TEXT + CLOSE where the socket
allows, and the server goes on.

Threads and torch: sessions run in threads of one process, and torch's intra-op thread pool is
process-wide, so ``torch_threads`` sets one value for all sessions (``0`` → ``cpu_count //
max_sessions``, so concurrent sessions do not oversubscribe the cores; ``None`` leaves torch's
default). It is applied with ``torch.set_num_threads`` at the start of every session.

Shutdown: :meth:`ReconServer.request_shutdown` is safe to call from a signal handler
(:func:`install_signal_handlers`: first SIGTERM/SIGINT = graceful — stop accepting, running sessions
finish, connections still queued get TEXT "server shutting down" + CLOSE; a second signal = cancel
running sessions). :meth:`ReconServer.shutdown` does the same and waits.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import socket
import threading
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

from gadgets.stream.protocol import Close, MessageWriter, ProtocolLimits, Text, socket_write_all
from gadgets.stream.selection import SelectionRules, load_rules
from gadgets.stream.session import Session, SessionConfig, SessionSummary

__all__ = ["ReconServer", "install_signal_handlers", "default_torch_threads", "DEFAULT_PORT"]

DEFAULT_PORT = 9002
_POLL_S = 0.2
log = logging.getLogger("torchgadgets.server")


def default_torch_threads(max_sessions: int) -> int:
    """Torch intra-op threads so that ``max_sessions`` concurrent sessions share the cores."""
    return max(1, (os.cpu_count() or 1) // max(1, max_sessions))


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
        Accepted connections waiting for a free worker; beyond that, connections wait in the
        kernel's accept backlog.
    save_raw_dir
        When set, every session's raw data are saved there as ISMRMRD before reconstruction.
    noise_store_dir
        Noise dependency folder (noise gadgets save/load there; dependency queries read it).
    read_timeout_s
        A client silent this long while the server waits for its data ends the session (also the
        send timeout for a client that stops reading). None: wait forever.
    limits
        Protocol size limits.
    queue_size
        Queue capacity in front of each chain stage (back-pressure).
    torch_threads
        See the module docstring (None: leave torch alone; 0: automatic).
    selection_file
        Selection rules file; default ``<chains_dir>/selection.yaml``.
    chain_timeout_s
        Longest wait for a chain to finish after CLOSE (None: no limit).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
                 chains_dir: Union[str, os.PathLike[str], None] = None, device: str = "auto",
                 max_sessions: int = 2, queue_limit: int = 16,
                 save_raw_dir: Union[str, os.PathLike[str], None] = None,
                 noise_store_dir: Union[str, os.PathLike[str], None] = None,
                 read_timeout_s: Optional[float] = 300.0, limits: ProtocolLimits = ProtocolLimits(),
                 queue_size: int = 64, torch_threads: Optional[int] = None,
                 selection_file: Union[str, os.PathLike[str], None] = None,
                 chain_timeout_s: Optional[float] = None, backlog: int = 64) -> None:
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be at least 1, got {max_sessions}")
        if queue_limit < 1:
            raise ValueError(f"queue_limit must be at least 1, got {queue_limit}")
        if read_timeout_s is not None and read_timeout_s <= 0:
            raise ValueError(f"read_timeout_s must be positive or None, got {read_timeout_s}")
        self.host = host
        self._requested_port = int(port)
        self.max_sessions = max_sessions
        self.backlog = backlog
        chains = Path(chains_dir) if chains_dir is not None else None
        rules: SelectionRules = load_rules(selection_file if selection_file is not None else chains)
        threads = torch_threads
        if threads == 0:
            threads = default_torch_threads(max_sessions)
        self.config = SessionConfig(
            chains_dir=chains, device=device, queue_size=queue_size,
            save_raw_dir=Path(save_raw_dir) if save_raw_dir is not None else None,
            noise_store_dir=Path(noise_store_dir) if noise_store_dir is not None else None,
            read_timeout_s=read_timeout_s, limits=limits, rules=rules, torch_threads=threads,
            chain_timeout_s=chain_timeout_s)
        self._pending: queue.Queue[tuple[socket.socket, str, str]] = queue.Queue(maxsize=queue_limit)
        self._listener: Optional[socket.socket] = None
        self._accepting = threading.Event()
        self._stopping = threading.Event()        # no new connections
        self._cancel = threading.Event()          # cancel running sessions (non-graceful)
        self._lock = threading.Lock()
        self._active: dict[str, Session] = {}
        self._counter = 0
        self._threads: list[threading.Thread] = []
        self._acceptor: Optional[threading.Thread] = None
        self.summaries: list[SessionSummary] = []

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

    # -- lifecycle -----------------------------------------------------------------------------
    def _bind(self) -> None:
        if self._listener is not None:
            return
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self._requested_port))
            sock.listen(self.backlog)
            sock.settimeout(_POLL_S)
        except OSError:
            sock.close()
            raise
        self._listener = sock
        for slot in range(self.max_sessions):
            t = threading.Thread(target=self._worker, args=(slot,), name=f"torchgadgets-worker-{slot}",
                                 daemon=True)
            self._threads.append(t)
            t.start()
        self._accepting.set()
        log.info("listening on %s:%d (%d session(s) at a time, device %s, chains %s%s)", self.host, self.port,
                 self.max_sessions, self.config.device, self.config.chains_dir or "default",
                 f", raw data to {self.config.save_raw_dir}" if self.config.save_raw_dir else "")

    def start(self) -> "ReconServer":
        """Bind and serve in a background thread; returns self (use :attr:`port`)."""
        self._bind()
        self._acceptor = threading.Thread(target=self._accept_loop, name="torchgadgets-accept", daemon=True)
        self._acceptor.start()
        return self

    def serve_forever(self) -> None:
        """Bind and serve in the calling thread until a shutdown is requested; then wait for sessions."""
        self._bind()
        self._accept_loop()
        self._join_workers(None)

    def request_shutdown(self, graceful: bool = True) -> None:
        """Stop accepting (non-blocking, signal-safe); ``graceful=False`` also cancels running sessions."""
        self._stopping.set()
        if not graceful:
            self._cancel.set()
            with self._lock:
                sessions = list(self._active.values())
            for s in sessions:
                if s.runner is not None:
                    s.runner.cancel("server shutdown")
                try:
                    s.sock.shutdown(socket.SHUT_RD)   # unblock a read waiting for the client
                except OSError:
                    pass

    def shutdown(self, graceful: bool = True, timeout: Optional[float] = None) -> None:
        """Stop accepting, let running sessions finish (or cancel them), and wait for the threads."""
        self.request_shutdown(graceful)
        if self._acceptor is not None and self._acceptor is not threading.current_thread():
            self._acceptor.join(timeout)
        self._join_workers(timeout)

    def _join_workers(self, timeout: Optional[float]) -> None:
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout)
        alive = [t.name for t in self._threads if t.is_alive()]
        if alive:
            log.warning("workers still running after %s s: %s", timeout, alive)

    def __enter__(self) -> "ReconServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.shutdown(graceful=True, timeout=60.0)

    # -- accepting -----------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        listener = self._listener
        if listener is None:
            raise RuntimeError("_accept_loop() before _bind()")
        try:
            while not self._stopping.is_set():
                try:
                    conn, addr = listener.accept()
                except socket.timeout:
                    continue
                except OSError as exc:
                    if self._stopping.is_set():
                        break
                    log.warning("accept failed: %s", exc)
                    continue
                conn.settimeout(None)
                peer = f"{addr[0]}:{addr[1]}"
                with self._lock:
                    self._counter += 1
                    sid = f"s{self._counter}"
                log.info("[%s %s] connection accepted (%d running, %d waiting)", sid, peer, self.active_sessions,
                         self._pending.qsize())
                while True:
                    try:
                        self._pending.put((conn, peer, sid), timeout=_POLL_S)
                        break
                    except queue.Full:
                        if self._stopping.is_set():
                            self._reject(conn, peer, sid)
                            break
        finally:
            self._accepting.clear()
            port = listener.getsockname()[1]
            listener.close()
            log.info("no longer accepting connections on port %d", port)

    def _reject(self, conn: socket.socket, peer: str, sid: str) -> None:
        log.info("[%s %s] rejected: server shutting down", sid, peer)
        try:
            conn.settimeout(5.0)
            writer = MessageWriter(socket_write_all(conn))
            writer.write_message(Text("[server] ERROR: server shutting down; connection not served"))
            writer.write_message(Close())
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        except Exception as exc:  # protocol errors while rejecting must not stop the shutdown
            log.info("[%s %s] reject failed: %s", sid, peer, exc)
        finally:
            conn.close()

    # -- workers -------------------------------------------------------------------------------
    def _worker(self, slot: int) -> None:
        chain_logger = logging.getLogger(f"torchgadgets.session.w{slot}")
        while True:
            try:
                conn, peer, sid = self._pending.get(timeout=_POLL_S)
            except queue.Empty:
                if self._stopping.is_set() and not self._accepting.is_set():
                    return
                continue
            if self._stopping.is_set():
                self._reject(conn, peer, sid)
                continue
            session = Session(conn, peer, sid, self.config, chain_logger=chain_logger, stop_event=self._cancel)
            with self._lock:
                self._active[sid] = session
            try:
                session.run()                # catches every Exception of the session itself
            finally:
                with self._lock:
                    self.summaries.append(session.summary)
                    self._active.pop(sid, None)


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
