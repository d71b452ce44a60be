"""One reconstruction session = one TCP connection (PROTOCOL.md §3), run by :class:`Session`.

State machine (PROTOCOL.md §3.2):

* **CONFIG** — 1 CONFIG_FILE (a chain *name*, looked up only in the chain directory with
  :func:`~gadgets.stream.chain.load_chain` ``allow_paths=False``; ``default.xml`` names the XML twin;
  ``auto`` and the selection file's ``generic_names`` defer the choice to the rules of
  :mod:`.selection` once the header is known), 2 CONFIG_TEXT (inline YAML or Gadgetron XML),
  6 QUERY (answered with 7), 5 TEXT (logged), 4 CLOSE (query-only session). 3 → error.
* **HEADER** — 3 HEADER (parsed and checked with ``gadgets.ismrmrd_io.parse_header`` *before* any chain is
  built; a bad header ends the session with a TEXT naming the problem), 5, 6, 4 (no header: no
  reconstruction; a dependency query is answered here). 1/2 → error.
* **STREAM** — right after the header the MRD variant may send a TEXT with JSON whose
  ``parameters.customconfig`` / ``parameters.config`` overrides the chain name (PROTOCOL.md §8);
  then 1008/1026/1022 go into the :class:`~gadgets.stream.runner.ChainRunner`, 5 is logged, 6
  answered, 4 closes the chain's input; 1/2/3 → error.
* **FINISHED** — wait for the chain; its errors go out as TEXT ``"[gadget] ERROR: …"``; CLOSE is
  always the last message (written in a ``finally``).

Full duplex: the chain's outputs are written to the socket from the runner's ``on_output`` (the
last stage's thread) while this thread still reads acquisitions; a lock serialises writes.

Dependency query (PROTOCOL.md §3.3): an inline Gadgetron chain whose only gadget is
``NoiseSummaryGadget`` is answered by the session itself with a 1019 MetaContainer from the
server's :class:`~gadgets.stream.storage.NoiseStore`, then CLOSE. NoiseSummaryGadget is not a
streaming gadget (it consumes nothing, needs the server's noise store and only makes sense in the
input-less VOID state), so it is recognised here instead of being added to the gadget registry,
where it could be put into ordinary chains.

Hardening (issue 14): the server's accept phase hands a session its CONFIG/HEADER bytes already
read (``prelude``); a whole-session deadline (``session_timeout_s``) bounds every read and the wait
for the chain; after CLOSE the socket is watched and a client that disconnects cancels its
reconstruction (``ChainContext.stop_requested``); the header's matrix, encoding limits and channel
count are checked against the schema's types and :class:`SessionConfig`'s limits, and the memory of
the session is estimated before any chain is built; non-finite samples are set to 0 on arrival with
a warning TEXT naming the acquisition, and non-finite pixels never leave the server; input bytes per
session are bounded; every TEXT and log line is capped in length and never names the server's
chain folder.

Raw-data safety: with a raw folder every session's header and acquisitions/waveforms are written
to an ISMRMRD file *before* they enter the chain, flushed message by message
(:class:`RawRecorder`), so a killed reconstruction can be replayed offline.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import os
import platform
import re
import select
import socket
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import ismrmrd
import numpy as np

from gadgets.base import ChainError, cap_text
from gadgets.ismrmrd_io import IsmrmrdFileError, parse_header
from gadgets.stream.chain import build_chain, chain_context, load_chain, parse_chain_text
from gadgets.stream.protocol import (Close, ConfigFile, ConfigText, ConnectionClosedError, DependencyQuery,
                                     DicomWithName, Header, Message, MessageReader,
                                     PeerTimeoutError, ProtocolError, ProtocolLimits, Query, Response, Text,
                                     RecvBuffer, encode_message, meta_to_xml, socket_read_exact)
from gadgets.stream.protocol import _ACQ_ID, _ACQ_PREFIX, _COMPRESSION_MASK, _acq_fields
from gadgets.stream.runner import ChainResult, ChainRunner
from gadgets.stream.selection import SelectionRules, select_chain
from gadgets.stream.storage import NoiseStore, noise_summary

__all__ = ["Session", "SessionConfig", "SessionSummary", "RawRecorder", "answer_query", "QUERY_KEYS",
           "dependency_request", "NOISE_DEPENDENCY_PREFIX"]

#: Prefix of the ``noise_file`` property the C++ client puts before the measurement id.
NOISE_DEPENDENCY_PREFIX = "GadgetronNoiseCovarianceMatrix_"
#: Messages that may be written back to the client (everything else a chain emits is dropped).
_WRITABLE = (ismrmrd.Image, ismrmrd.Acquisition, ismrmrd.Waveform, Text, DicomWithName, DependencyQuery)
_LINGER_S = 2.0             # after our CLOSE: how long to wait for the peer to close its side
_WAIT_POLL_S = 0.2          # how often the wait for the chain looks at the socket and the deadline
_MAX_WARNINGS = 10          # non-finite warnings sent per session (then one summary line)
_C8 = np.dtype(np.complex64)
_ACQ_ID_LO, _ACQ_ID_HI = _ACQ_ID           # the ACQUISITION id's two bytes (little-endian u16)
_ACQ_ID_U16 = _ACQ_ID_LO | _ACQ_ID_HI << 8
_OUTBOX_BYTES = 8 << 20     # replies queued for the writer thread before a sender waits (back-pressure)
_AHEAD_BYTES = 1 << 20      # a session's read-ahead buffer: one recv takes up to this much
_DIRECT_BYTES = 1 << 17     # a payload this large (still missing) is received straight into its array
_U16 = 65535                # xs:unsignedShort, the schema type of matrix sizes and encoding limits
_GiB = 1 << 30
#: Encoding-limit counters of the ISMRMRD header that multiply a buffer's frames.
_FRAME_COUNTERS = ("phase", "contrast", "repetition", "set", "average")
_LIMIT_FIELDS = ("kspace_encoding_step_0", "kspace_encoding_step_1", "kspace_encoding_step_2", "average",
                 "slice", "contrast", "phase", "repetition", "set", "segment")


# ---------------------------------------------------------------------------------------------
# configuration / results


@dataclass
class SessionConfig:
    """What every session of a server shares (set by :class:`~gadgets.stream.server.ReconServer`)."""

    chains_dir: Optional[Path] = None
    device: str = "auto"
    queue_size: int = 64
    save_raw_dir: Optional[Path] = None
    noise_store_dir: Optional[Path] = None
    read_timeout_s: Optional[float] = 300.0
    limits: ProtocolLimits = field(default_factory=ProtocolLimits)
    rules: Optional[SelectionRules] = None
    torch_threads: Optional[int] = None
    chain_timeout_s: Optional[float] = None
    #: whole-session limit (accept to CLOSE sent); the chain is cancelled when it is reached
    session_timeout_s: Optional[float] = 3600.0
    #: largest matrix size per axis (encoded and recon space) a header may ask for
    max_matrix: int = 1024
    #: most receiver channels (header ``receiverChannels`` and acquisitions' ``active_channels``)
    max_channels: int = 256
    #: memory one session may use: the header's estimate and the data received are checked against it
    max_session_bytes: int = 8 * _GiB
    #: bytes queued in front of each chain stage (besides ``queue_size`` messages)
    queue_bytes: int = 256 * (1 << 20)
    #: chains sent inline (CONFIG_TEXT): ``safe`` (no parameter may name a file) or ``off``
    inline_chains: str = "safe"
    #: after the client half-closed: seconds without output before an INFO TEXT tests the connection
    disconnect_probe_s: float = 2.0
    #: longest error TEXT / log line (characters)
    max_text_chars: int = 4000
    #: extra gadget registrations (name → "module:Class") applied in each session process
    gadgets: dict[str, str] = field(default_factory=dict)


@dataclass
class SessionSummary:
    """Outcome of one session (kept by the server for monitoring and tests)."""

    session_id: str
    peer: str
    chain: str = ""
    selection: str = ""
    acquisitions: int = 0
    waveforms: int = 0
    images_sent: int = 0
    messages_sent: int = 0
    errors: list[str] = field(default_factory=list)
    raw_path: Optional[Path] = None
    close_sent: bool = False
    wall_s: float = 0.0
    kind: str = "none"          # none | query | dependency | recon
    outcome: str = ""           # ok | error | client gone | timeout | cancelled | crashed
    bytes_received: int = 0
    nonfinite_acquisitions: int = 0


# ---------------------------------------------------------------------------------------------
# queries


def _version(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"


def _torchgadgets_version() -> str:
    import gadgets

    return str(getattr(gadgets, "__version__", "unknown"))


def _cuda_devices() -> list[str]:
    import torch

    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def _cuda_memory() -> str:
    import torch

    if not torch.cuda.is_available():
        return "0"
    return ", ".join(f"{torch.cuda.get_device_properties(i).total_memory // (1 << 20)} MB"
                     for i in range(torch.cuda.device_count()))


def _cuda_capabilities() -> str:
    import torch

    if not torch.cuda.is_available():
        return ""
    return ", ".join("%d.%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count()))


def _memory() -> str:
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return f"{pages // (1 << 20)} MB"
    except (ValueError, OSError, AttributeError):
        return "unknown"


def _info(device: str) -> str:
    import torch

    devs = _cuda_devices()
    return "\n".join([
        f"Version: {_torchgadgets_version()} (torchgadgets, Gadgetron 4 protocol)",
        f"Python: {platform.python_version()}",
        f"torch: {torch.__version__}",
        f"ismrmrd: {_version('ismrmrd')}",
        f"System memory: {_memory()}",
        "Python support: YES",
        "Matlab support: NO",
        f"CUDA support: {'YES' if devs else 'NO'}",
        f"CUDA devices: {len(devs)}" + (f" ({', '.join(devs)})" if devs else ""),
        f"Default device: {device}",
    ])


def _query_table(device: str) -> dict[str, Callable[[], str]]:
    import torch

    return {
        "gadgetron::version": lambda: f"{_torchgadgets_version()}-torchgadgets",
        "gadgetron::build": lambda: f"torchgadgets {_torchgadgets_version()} (python {platform.python_version()})",
        "gadgetron::info": lambda: _info(device),
        "gadgetron::info::memory": _memory,
        "gadgetron::info::python": lambda: "YES",
        "gadgetron::info::matlab": lambda: "NO",
        "gadgetron::info::cuda": lambda: "YES" if torch.cuda.is_available() else "NO",
        "gadgetron::cuda::devices": lambda: str(len(_cuda_devices())),
        "gadgetron::cuda::driver": lambda: str(torch.version.cuda or "N/A"),
        "gadgetron::cuda::runtime": lambda: str(torch.version.cuda or "N/A"),
        "gadgetron::cuda::memory": _cuda_memory,
        "gadgetron::cuda::capabilities": _cuda_capabilities,
        "torchgadgets::version": _torchgadgets_version,
        "torchgadgets::device": lambda: str(device),
        "torchgadgets::torch": lambda: str(torch.__version__),
        "ismrmrd::version": lambda: _version("ismrmrd"),
    }


#: Query keys the server answers (anything else gets ``"Unknown query"``).
QUERY_KEYS: tuple[str, ...] = tuple(_query_table("auto"))


def answer_query(key: str, device: str = "auto") -> str:
    """The RESPONSE text for a QUERY key (``"Unknown query"`` for keys not in :data:`QUERY_KEYS`)."""
    fn = _query_table(device).get(key.strip())
    return fn() if fn is not None else "Unknown query"


# ---------------------------------------------------------------------------------------------
# dependency query


def dependency_request(text: str) -> Optional[str]:
    """The ``noise_file`` of an inline chain whose only gadget is ``NoiseSummaryGadget``, else None.

    Only Gadgetron XML is inspected (YAML chains never name Gadgetron classes). Documents with a
    DOCTYPE or entity declarations are not treated as dependency chains (they go to the normal
    chain parser, which refuses them).
    """
    body = text.lstrip("\ufeff \t\r\n")
    if not body.startswith("<") or "NoiseSummaryGadget" not in body or "<!" in body:
        return None
    try:
        root = ET.fromstring(body)
    except ET.ParseError:
        return None
    local = lambda tag: tag.rsplit("}", 1)[-1]  # noqa: E731 - tiny helper
    gadgets = [el for el in root.iter() if local(el.tag) == "gadget"]
    if len(gadgets) != 1:
        return None
    g = gadgets[0]
    fields = {local(c.tag): (c.text or "").strip() for c in g}
    classname = g.get("classname") or fields.get("classname", "")
    if classname != "NoiseSummaryGadget":
        return None
    for prop in g:
        if local(prop.tag) != "property":
            continue
        name = prop.get("name")
        value = prop.get("value")
        if name is None:
            kids = {local(c.tag): (c.text or "").strip() for c in prop}
            name, value = kids.get("name"), kids.get("value")
        if name == "noise_file":
            return value or ""
    return ""


# ---------------------------------------------------------------------------------------------
# raw recorder


_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


class RawRecorder:
    """Append a session's header and data to an ISMRMRD file as they arrive (raw-data safety).

    The file is ``<folder>/<YYYYmmdd-HHMMSS>_<session>_<protocolName>.h5`` (group ``dataset``);
    each acquisition/waveform is appended and the file flushed before the message goes on to the
    reconstruction, so what arrived survives a crash of the reconstruction.
    """

    def __init__(self, folder: Path, session_id: str, header_xml: str, protocol_name: str) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        proto = _SAFE.sub("_", protocol_name or "unknown").strip("._") or "unknown"
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime())
        path = folder / f"{stamp}_{session_id}_{proto[:64]}.h5"
        n = 1
        while path.exists():
            path = folder / f"{stamp}_{session_id}_{proto[:64]}_{n}.h5"
            n += 1
        self.path = path
        self.acquisitions = 0
        self.waveforms = 0
        self._ds = ismrmrd.Dataset(str(path), "dataset", create_if_needed=True)
        self._ds.write_xml_header(header_xml.encode("utf-8"))
        self._flush()

    def _flush(self) -> None:
        handle = getattr(self._ds, "_file", None)
        if handle is not None:
            handle.flush()

    def append(self, msg: Any) -> None:
        """Append one acquisition or waveform (other messages are ignored) and flush."""
        if isinstance(msg, ismrmrd.Acquisition):
            self._ds.append_acquisition(msg)
            self.acquisitions += 1
        elif isinstance(msg, ismrmrd.Waveform):
            self._ds.append_waveform(msg)
            self.waveforms += 1
        else:
            return
        self._flush()

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self._ds is not None:
            self._ds.close()
            self._ds = None  # type: ignore[assignment]


# ---------------------------------------------------------------------------------------------
# session


def _reset_as_closed(read_exact: Callable[[int], bytes]) -> Callable[[int], bytes]:
    """``socket_read_exact`` lets a TCP reset through as OSError; report it as a closed peer."""

    def read(n: int) -> bytes:
        try:
            return read_exact(n)
        except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError) as exc:
            raise ConnectionClosedError(f"connection reset by the peer: {exc}") from None

    fill = getattr(read_exact, "read_into", None)
    if fill is not None:
        def read_into(view: memoryview) -> None:
            try:
                fill(view)
            except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError) as exc:
                raise ConnectionClosedError(f"connection reset by the peer: {exc}") from None

        read.read_into = read_into  # type: ignore[attr-defined]
    return read


#: most buffers per ``sendmsg`` (Linux IOV_MAX is 1024)
_IOV_BATCH = 512


def send_buffers(sock: socket.socket, bufs: list[bytes]) -> None:
    """Write every buffer of ``bufs`` to ``sock``, many per system call (``sendmsg``: one gather).

    Raises the socket's errors (``socket.timeout`` when the peer accepts nothing for the socket's
    timeout, ``OSError`` when it is gone); partial sends are continued.
    """
    i = 0
    first: Optional[memoryview] = None       # the unsent rest of bufs[i] after a partial send
    while i < len(bufs):
        chunk = bufs[i:i + _IOV_BATCH]
        if first is not None:
            chunk[0] = first
        sent = sock.sendmsg(chunk)
        first = None
        for b in chunk:
            if sent >= len(b):
                sent -= len(b)
                i += 1
            else:
                first = memoryview(b)[sent:]
                break


class _Outbox:
    """The session's replies in the order they were sent, written to the client by one thread.

    The session (reading thread, chain stages) only appends encoded messages; the writer thread takes
    everything queued and writes it with one ``sendmsg`` per batch, so a reply stream of many small
    messages costs few system calls and the session keeps reading while the client receives. The
    common path takes no lock: senders append to a deque and wake the writer only when it sleeps
    (a lock per message, handed between two threads under the GIL, cost more than the send saved).
    At most ``limit_bytes`` are queued: :meth:`put` waits beyond that (back-pressure, as a blocking
    send). A write error (the client gone, or not reading for the socket's timeout) is kept and
    raised by every later :meth:`put` and :meth:`flush`; ``on_error`` is called once with it.
    """

    def __init__(self, sock: socket.socket, limit_bytes: int, on_error: Callable[[ProtocolError], None],
                 name: str = "torchgadgets-writer") -> None:
        self.sock = sock
        self.limit_bytes = limit_bytes
        self.wake_bytes = min(limit_bytes, 256 << 10)
        self._on_error = on_error
        self._name = name
        self._queue: collections.deque[Any] = collections.deque()
        self._put_bytes = 0             # written by senders only (under the session's send lock)
        self._sent_bytes = 0            # written by the writer thread only
        self._wake = threading.Event()  # set by a sender when the writer sleeps (or to stop it)
        self._sleeping = False
        self._progress = threading.Condition(threading.Lock())   # writer → waiting senders / flush
        self._sending = threading.Lock()     # held by whichever thread writes (writer or send_here)
        self._error: Optional[ProtocolError] = None
        self._stopping = False
        self._thread: Optional[threading.Thread] = None

    def _raise(self) -> None:
        err = self._error
        assert err is not None
        raise type(err)(str(err))

    def put(self, data: Any, urgent: bool = True) -> None:
        """Queue one message's bytes (waits while more than ``limit_bytes`` are queued). Senders are
        serialised by the caller (the session's send lock).

        ``urgent`` wakes the writer now; otherwise it is woken once ``wake_bytes`` are queued or by
        :meth:`kick` (the session's reading thread kicks before it waits for the client), so a burst
        of echoed messages costs one wake-up (a GIL hand-off) per batch, not one per message.
        """
        if self._error is not None:
            self._raise()
        n = len(data)
        if self._put_bytes - self._sent_bytes + n > self.limit_bytes and self._put_bytes > self._sent_bytes:
            with self._progress:
                self._progress.wait_for(lambda: self._error is not None or self._put_bytes - self._sent_bytes
                                        + n <= self.limit_bytes or self._put_bytes == self._sent_bytes)
            if self._error is not None:
                self._raise()
        self._queue.append(data)
        self._put_bytes += n
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()
        elif urgent:
            if self._sleeping:
                self._wake.set()
        elif self._put_bytes - self._sent_bytes >= self.wake_bytes:
            self.send_here()

    def kick(self) -> None:
        """Write what is queued from the calling thread now, unless the writer is at it (then it
        writes it); cheap when nothing is queued. Never raises (a failure is kept, see the class)."""
        if self._put_bytes != self._sent_bytes:
            self.send_here()

    def send_here(self) -> None:
        """Write the queue in the calling thread (the session's reader, at a batch's end, before it
        waits for the client): no hand-off to the writer thread, so no GIL switch per batch."""
        if not self._sending.acquire(blocking=False):
            return                          # the writer is sending: it takes the rest with it
        try:
            self._send_queued()
        finally:
            self._sending.release()

    def send_now(self, data: memoryview) -> int:
        """Write what the socket accepts of ``data`` at once, without waiting and without a copy, when
        nothing is queued and nobody is writing (else 0); the caller queues the rest with :meth:`put`.
        The reader thread sends echoes straight from its receive buffer this way. A failure is kept
        (see the class) and makes the next :meth:`put` raise."""
        if self._error is not None or self._put_bytes != self._sent_bytes or not len(data):
            return 0
        if not self._sending.acquire(blocking=False):
            return 0
        try:
            if self._put_bytes != self._sent_bytes or not _poll(self.sock, select.POLLOUT, 0):
                return 0
            return self.sock.send(data, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError, socket.timeout):
            return 0
        except (OSError, ValueError) as exc:     # reset, broken pipe, socket closed under us
            self._failed(ConnectionClosedError(f"connection to the client lost while sending: {exc}"))
            return 0
        finally:
            self._sending.release()

    def flush(self, timeout: Optional[float] = None) -> None:
        """Wait until everything queued so far is written; raises the write error if there was one."""
        target = self._put_bytes
        self.kick()
        with self._progress:
            if not self._progress.wait_for(lambda: self._error is not None or self._sent_bytes >= target,
                                           timeout):
                raise PeerTimeoutError(f"client did not accept {target - self._sent_bytes} bytes within "
                                       f"{timeout} s")
        if self._error is not None:
            self._raise()

    def close(self) -> None:
        """Stop the writer thread once it has written what is queued (or failed)."""
        self._stopping = True
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _run(self) -> None:
        queue_ = self._queue
        while True:
            if not queue_:
                self._sleeping = True
                if not queue_ and not self._stopping:    # (re-checked: a put may just have come)
                    self._wake.wait()
                self._wake.clear()
                self._sleeping = False
                if not queue_:
                    if self._stopping:
                        return
                    continue
            with self._sending:
                self._send_queued()
            if self._error is not None:
                return

    def _send_queued(self) -> None:
        """Send batches until the queue is empty (caller holds ``_sending``); a failure is kept."""
        queue_ = self._queue
        while queue_ and self._error is None:
            batch = []
            while queue_ and len(batch) < _IOV_BATCH:
                batch.append(queue_.popleft())
            try:
                send_buffers(self.sock, batch)
            except socket.timeout:
                self._failed(PeerTimeoutError(f"client did not accept data for {self.sock.gettimeout()} s"))
                return
            except (OSError, ValueError) as exc:     # reset, broken pipe, socket closed under us
                self._failed(ConnectionClosedError(f"connection to the client lost while sending: {exc}"))
                return
            with self._progress:
                self._sent_bytes += sum(len(b) for b in batch)
                self._progress.notify_all()

    def _failed(self, err: ProtocolError) -> None:
        with self._progress:
            self._error = err
            self._queue.clear()
            self._progress.notify_all()
        self._on_error(err)


class _SessionLog(logging.LoggerAdapter):
    """Prefixes the session id and peer, and caps every line at ``limit`` characters."""

    def __init__(self, logger: logging.Logger, prefix: str, limit: int) -> None:
        super().__init__(logger, {"prefix": prefix})
        self.limit = limit

    def log(self, level: int, msg: Any, *args: Any, **kwargs: Any) -> None:
        if self.isEnabledFor(level):
            text = str(msg) % args if args else str(msg)
            self.logger.log(level, "[%s] %s", self.extra["prefix"], cap_text(text, self.limit), **kwargs)


class _Fatal(Exception):
    """Ends the session: the message goes to the client as TEXT, then CLOSE."""

    def __init__(self, line: str) -> None:
        super().__init__(line)
        self.line = line


def _error(where: str, message: str) -> _Fatal:
    return _Fatal(f"[{where}] ERROR: {message}")


class _TimeLimit(_Fatal):
    """The whole-session deadline passed."""


def _poll_events(sock: socket.socket, mask: int, timeout: Optional[float]) -> int:
    """Events of ``sock`` (``select.poll``: no FD_SETSIZE limit) within ``timeout`` s (None: wait)."""
    poller = select.poll()
    poller.register(sock, mask)
    ready = poller.poll(None if timeout is None else max(0, int(math.ceil(timeout * 1000))))
    return ready[0][1] if ready else 0


def _poll(sock: socket.socket, mask: int, timeout: Optional[float]) -> bool:
    """True when ``sock`` has data (or EOF / an error to report) within ``timeout`` seconds."""
    return bool(_poll_events(sock, mask, timeout))


def _limit_of(limits: Any, name: str) -> Any:
    return getattr(limits, name, None) if limits is not None else None


def header_problems(parsed: Any, max_matrix: int, max_channels: int) -> list[str]:
    """Fields of a parsed ISMRMRD header that exceed the schema's types or the server's limits.

    Matrix sizes and encoding limits are ``xs:unsignedShort`` in the schema (0..65535; the XML
    binding does not enforce it); matrix sizes must also be at most ``max_matrix`` per axis and the
    receiver channels at most ``max_channels``. Returns one message per offending field (empty: fine).
    """
    problems: list[str] = []
    for e, enc in enumerate(getattr(parsed, "encoding", None) or []):
        for space in ("encodedSpace", "reconSpace"):
            ms = getattr(getattr(enc, space, None), "matrixSize", None)
            for axis in ("x", "y", "z"):
                v = getattr(ms, axis, None) if ms is not None else None
                if v is None:
                    continue
                where = f"encoding[{e}]/{space}/matrixSize/{axis}"
                if not 0 <= int(v) <= _U16:
                    problems.append(f"{where} is {v}, outside the schema type unsignedShort (0..65535)")
                elif int(v) > max_matrix:
                    problems.append(f"{where} is {v}, above this server's limit of {max_matrix} "
                                    f"(--max-matrix)")
        for name in _LIMIT_FIELDS:
            lim = _limit_of(getattr(enc, "encodingLimits", None), name)
            for part in ("minimum", "maximum", "center"):
                v = getattr(lim, part, None) if lim is not None else None
                if v is not None and not 0 <= int(v) <= _U16:
                    problems.append(f"encoding[{e}]/encodingLimits/{name}/{part} is {v}, outside the schema "
                                    f"type unsignedShort (0..65535)")
    channels = getattr(getattr(parsed, "acquisitionSystemInformation", None), "receiverChannels", None)
    if channels is not None:
        if not 0 <= int(channels) <= _U16:
            problems.append(f"acquisitionSystemInformation/receiverChannels is {channels}, outside the "
                            f"schema type unsignedShort (0..65535)")
        elif int(channels) > max_channels:
            problems.append(f"acquisitionSystemInformation/receiverChannels is {channels}, above this "
                            f"server's limit of {max_channels} (--max-channels)")
    return problems


def estimate_session_bytes(parsed: Any) -> int:
    """Rough peak memory (bytes) of reconstructing what the header describes, before any allocation.

    Per encoding: the k-space buffer (encoded matrix × channels × frames × complex64, plus its
    sample counts) twice, and four copies of the coil images at the recon matrix (coil maps, the
    method's working arrays); frames are the product of the phase, contrast, repetition, set and
    average counts of ``encodingLimits``. Channels: ``receiverChannels`` (1 when absent; the
    acquisitions' own channel counts are checked as they arrive).
    """
    channels = getattr(getattr(parsed, "acquisitionSystemInformation", None), "receiverChannels", None) or 1
    total = 0
    for enc in getattr(parsed, "encoding", None) or []:
        def size(space: str) -> int:
            ms = getattr(getattr(enc, space, None), "matrixSize", None)
            if ms is None:
                return 1
            dims = [max(1, int(getattr(ms, a, 1) or 1)) for a in ("x", "y", "z")]
            return dims[0] * dims[1] * dims[2]
        frames = 1
        for name in _FRAME_COUNTERS:
            lim = _limit_of(getattr(enc, "encodingLimits", None), name)
            mx = getattr(lim, "maximum", None) if lim is not None else None
            frames *= max(1, int(mx or 0) + 1)
        kspace = size("encodedSpace") * frames * (8 * int(channels) + 4)
        images = size("reconSpace") * frames * 8 * int(channels)
        total += 2 * kspace + 4 * images
    return total


def _mib(n: float) -> str:
    return f"{n / (1 << 20):.3g} MiB"


_access = logging.getLogger("torchgadgets.access")


def access_log(summary: SessionSummary, limit: int = 4000) -> None:
    """The one INFO line per session an operator reads (logger ``torchgadgets.access``)."""
    first_error = next((e for e in summary.errors if "ERROR" in e), "")
    line = (f"session {summary.session_id} peer {summary.peer} kind {summary.kind} chain "
            f"{summary.chain or '-'} acquisitions {summary.acquisitions} images {summary.images_sent} "
            f"seconds {summary.wall_s:.2f} outcome {summary.outcome or '-'}")
    _access.info("%s", cap_text(line + (f": {first_error}" if first_error else ""), limit))


def _register_gadgets(extra: dict[str, str]) -> None:
    """Add a server's extra gadget registrations (``name → "module:Class"``) to the registry."""
    if extra:
        from gadgets import registry

        for name, target in extra.items():
            registry.GADGETS.setdefault(name, target)


#: u16 words of an acquisition message (id + AcquisitionHeader) that :func:`_clean_run` compares: the id,
#: the word with the compression flags (bits 52/53 of ``flags``), number_of_samples, active_channels,
#: trajectory_dimensions and the high word of sample_time_us (its exponent: all ones = NaN/Inf)
_AH = ismrmrd.AcquisitionHeader
_RUN_WORDS = np.array([0, (2 + _AH.flags.offset + 6) // 2, (2 + _AH.number_of_samples.offset) // 2,
                       (2 + _AH.active_channels.offset) // 2, (2 + _AH.trajectory_dimensions.offset) // 2,
                       (2 + _AH.sample_time_us.offset + 2) // 2])
_RUN_MASK = np.array([0xFFFF, _COMPRESSION_MASK >> 48, 0xFFFF, 0xFFFF, 0xFFFF, 0x7F80], dtype=np.uint16)
_F32_EXPONENT = 0x7F80


def _clean_run(buf: memoryview, pos: int, k: int, size: int, ns: int, nc: int, nt: int) -> int:
    """How many of the ``k`` messages of ``size`` bytes at ``buf[pos:]`` are, in order, uncompressed
    acquisitions of ``ns`` samples × ``nc`` channels × ``nt`` trajectory dimensions with a finite
    dwell time and finite samples and trajectory. Their headers and values are read in place through
    strided numpy views (unaligned where the stream puts them): a few calls for the whole run."""
    heads = np.ndarray((k, _ACQ_PREFIX // 2), np.dtype("<u2"), buf, pos, (size, 2))[:, _RUN_WORDS] & _RUN_MASK
    heads ^= np.array([_ACQ_ID_U16, 0, ns, nc, nt, _F32_EXPONENT], dtype=np.uint16)
    ok = ~heads[:, :5].any(axis=1)
    ok &= heads[:, 5] != 0                       # exponent not all ones: a finite dwell time
    n_values = size - _ACQ_PREFIX
    if n_values:
        values = np.ndarray((k, n_values // 4), np.dtype("<f4"), buf, pos + _ACQ_PREFIX, (size, 4))
        ok &= np.isfinite(values).all(axis=1)
    return k if ok.all() else int(ok.argmin())


class Session:
    """Serve one connection (see the module docstring); :meth:`run` never raises ``Exception``.

    Parameters
    ----------
    sock
        The connected socket (closed by :meth:`run`).
    peer
        ``"host:port"`` for logs.
    session_id
        Short id (``s12``) used in logs and raw file names.
    config
        Server-wide settings.
    chain_logger
        Logger handed to the chain context (its gadgets log through children of it).
    stop_event
        Set by a non-graceful server shutdown: the chain is cancelled.
    prelude
        Bytes of this connection the server already read (its CONFIG/HEADER phase); read first.
    started
        ``time.monotonic()`` when the connection was accepted: the session deadline counts from it.
    answered_queries
        QUERY messages the server already answered in its accept phase (the summary counts them).
    """

    def __init__(self, sock: socket.socket, peer: str, session_id: str, config: SessionConfig,
                 chain_logger: Optional[logging.Logger] = None,
                 stop_event: Optional[threading.Event] = None, prelude: bytes = b"",
                 started: Optional[float] = None, answered_queries: int = 0) -> None:
        self.sock = sock
        self.cfg = config
        self.summary = SessionSummary(session_id=session_id, peer=peer,
                                      kind="query" if answered_queries else "none")
        self.log = _SessionLog(logging.getLogger("torchgadgets.server"), f"{session_id} {peer}",
                               config.max_text_chars)
        self._chain_logger = chain_logger or logging.getLogger("torchgadgets.session")
        self._stop = stop_event or threading.Event()
        self._wlock = threading.Lock()
        self._peer_gone = False
        self._outbox = _Outbox(sock, _OUTBOX_BYTES, self._send_failed, name=f"torchgadgets-{session_id}-send")
        self._prelude = memoryview(bytes(prelude))
        self._started = started if started is not None else time.monotonic()
        self._deadline = (self._started + config.session_timeout_s) if config.session_timeout_s else None
        self._msg_deadline: Optional[float] = None
        self._ahead = RecvBuffer(_AHEAD_BYTES)   # bytes received ahead of the current field (one recv, many)
        self._recv_error: Optional[OSError] = None   # a reset seen by the echo burst, reported by _read_into
        source = self._read_exact
        fill = self._read_into

        def read(n: int) -> bytes:
            return source(n)

        read.read_into = fill  # type: ignore[attr-defined]  # payloads straight into their arrays
        self._reader = MessageReader(_reset_as_closed(read), config.limits)
        self.runner: Optional[ChainRunner] = None
        self._recorder: Optional[RawRecorder] = None
        self._dropped: set[str] = set()
        self._warnings = 0
        self._dwell_warned = False
        self._last_output = time.monotonic()
        self._outcome = ""
        self._echo: Optional[tuple[Any, memoryview]] = None   # (message, its received bytes): see _stream

    # -- reading -------------------------------------------------------------------------------
    def _read_exact(self, n: int) -> bytes:
        """``n`` bytes: first from the prelude, then from the socket, within the session deadline.

        Each ``recv`` waits at most ``read_timeout_s`` (a stalled client) and never past the session
        deadline (a client trickling bytes cannot stretch the session).
        """
        ahead = self._ahead
        if not len(self._prelude) and ahead.pending() >= n:
            return ahead.take(n)                       # already received: no poll, no recv
        buf = bytearray(n)
        self._read_into(memoryview(buf))
        return buf if n > (1 << 16) else bytes(buf)

    def _read_into(self, view: memoryview) -> None:
        """Fill ``view`` (the prelude, then bytes received ahead, then the socket), with the limits of
        :meth:`_read_exact`; payloads are received straight into their arrays this way."""
        ahead = self._ahead
        n = len(view)
        got = 0
        if len(self._prelude):
            take = min(n, len(self._prelude))
            view[:take] = self._prelude[:take]
            self._prelude = self._prelude[take:]
            got = take
        if not len(self._prelude):
            got += ahead.take_into(view[got:])
        while got < n:
            if self._recv_error is not None:             # (seen by the echo burst, reported here)
                exc = self._recv_error
                raise ConnectionClosedError(f"connection reset by the peer after {got} of {n} bytes ({exc})",
                                            received=got)
            if not self._wait_readable(n - got, n):     # socket closed under us (server shutdown)
                raise ConnectionClosedError("connection closed", received=got)
            direct = n - got >= _DIRECT_BYTES          # large payloads straight into their buffer
            try:
                k = (self.sock.recv_into(view[got:], min(n - got, 1 << 20)) if direct
                     else ahead.fill(self.sock.recv_into))
            except (socket.timeout, BlockingIOError, InterruptedError):
                continue
            except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError) as exc:
                raise ConnectionClosedError(f"connection reset by the peer after {got} of {n} bytes ({exc})",
                                            received=got) from None
            if k == 0:
                raise ConnectionClosedError(f"connection closed by the peer after {got} of {n} bytes",
                                            received=got)
            got += k if direct else ahead.take_into(view[got:])

    def _wait_readable(self, missing: int, n: int) -> bool:
        """Wait until the client's next bytes can be received, at most until the message's read deadline
        (``read_timeout_s``) and the session deadline (raising their errors; ``missing`` of ``n`` bytes
        name what was pending). Replies this thread queued go out first. False: the socket was closed
        under us (server shutdown)."""
        now = time.monotonic()
        timeout = None
        if self._msg_deadline is not None:
            timeout = max(0.0, self._msg_deadline - now)
        if self._deadline is not None:
            left = self._deadline - now
            if left <= 0:
                raise self._time_limit()
            timeout = left if timeout is None else min(timeout, left)
        if timeout is not None and timeout <= 0:
            raise self._slow(missing, n)
        self._outbox.kick()                  # replies queued by this thread go out while it waits
        # wait with poll: the socket's own timeout stays the send timeout of the output thread
        try:
            readable = _poll(self.sock, select.POLLIN | select.POLLPRI, timeout)
        except (ValueError, OSError):
            return False
        if not readable:
            if self._deadline is not None and time.monotonic() >= self._deadline:
                raise self._time_limit()
            raise self._slow(missing, n)
        return True

    def _slow(self, missing: int, n: int) -> PeerTimeoutError:
        return PeerTimeoutError(f"no complete message within {self.cfg.read_timeout_s:g} s (--read-timeout; "
                                f"{missing} of {n} bytes of a field still pending)")

    def _time_limit(self) -> _TimeLimit:
        self._outcome = "timeout"
        return _TimeLimit(f"[server] ERROR: session time limit of {self.cfg.session_timeout_s:g} s reached "
                          f"(--session-timeout); session ended")

    # -- writing -------------------------------------------------------------------------------
    def _send_failed(self, err: ProtocolError) -> None:
        """The writer thread could not write (client gone or not reading): the session notices."""
        self._peer_gone = True
        self.log.info("sending to the client failed: %s", err)

    def send(self, msg: Message) -> None:
        """Queue one message for the client (thread-safe: the reader thread and the chain's last stage
        both send); the message is encoded (copied) here, so the sender may reuse its arrays at once.
        The writer thread writes it (:class:`_Outbox`); :meth:`flush` waits for that.

        Non-finite pixels of an image are set to 0 first (with a warning TEXT): no NaN/Inf leaves
        the server.
        """
        if isinstance(msg, ismrmrd.Image):
            self._finite_image(msg)
        data = encode_message(msg)
        with self._wlock:
            if self._peer_gone:
                raise ConnectionClosedError("the client connection is gone")
            self._outbox.put(data)
            self.summary.messages_sent += 1
            if isinstance(msg, ismrmrd.Image):
                self.summary.images_sent += 1
            self._last_output = time.monotonic()

    def _send_wire(self, wire: memoryview) -> None:
        """Queue an acquisition that goes back exactly as it arrived (the echo chain): its bytes."""
        with self._wlock:
            if self._peer_gone:
                raise ConnectionClosedError("the client connection is gone")
            self._outbox.put(wire, urgent=False)      # (this thread kicks the writer before it waits)
            self.summary.messages_sent += 1
            self._last_output = time.monotonic()

    def flush(self, timeout: Optional[float] = None) -> None:
        """Wait until every message sent so far is written to the socket (raises the write error)."""
        self._outbox.flush(timeout)

    def _warn(self, text: str) -> None:
        """A warning TEXT to the client (the first few per session) and the log."""
        self.log.warning("%s", text)
        self._warnings += 1
        if self._warnings <= _MAX_WARNINGS:
            try:
                self.send(Text(cap_text(f"[server] WARNING: {text}", self.cfg.max_text_chars)))
            except (ProtocolError, OSError):
                pass

    def _finite_image(self, img: ismrmrd.Image) -> None:
        data = img.data
        if data.dtype.kind not in "fc":
            return
        bad = ~np.isfinite(data)
        if bad.any():
            n = int(bad.sum())
            data[bad] = 0
            self._warn(f"image {self.summary.images_sent}: {n} non-finite pixel(s) (NaN/Inf) set to 0")

    def _sanitize(self, acq: ismrmrd.Acquisition) -> None:
        """Non-finite samples (and trajectory values) of an arriving acquisition are set to 0."""
        if not math.isfinite(acq.sample_time_us):
            if not self._dwell_warned:
                self._dwell_warned = True
                self.log.warning("acquisition scan_counter %d: sample_time_us is %s; treated as unknown (0) "
                                 "for this and later acquisitions (logged once per session)",
                                 acq.scan_counter, acq.sample_time_us)
            acq.sample_time_us = 0.0
        n = 0
        for arr in (acq.data, acq.traj):
            if not arr.size:
                continue
            # one pass over the real values (a float32 view of complex samples) without a warning
            # state to set up per message; the mask and the count only for a bad acquisition
            flat = arr.reshape(-1).view(np.float32) if arr.flags.c_contiguous and arr.dtype == _C8 else arr
            if np.count_nonzero(np.isfinite(flat)) != flat.size:     # (faster than .all() here)
                bad = ~np.isfinite(arr)
                n += int(bad.sum())
                arr[bad] = 0
        if n:
            self.summary.nonfinite_acquisitions += 1
            self._warn(f"acquisition scan_counter {acq.scan_counter}: {n} non-finite sample(s) (NaN/Inf) "
                       f"set to 0")

    def _on_output(self, msg: Any) -> None:
        echo = self._echo
        if echo is not None:
            self._echo = None
            if msg is echo[0]:
                self._send_wire(echo[1])
                return
        if isinstance(msg, _WRITABLE):
            self.send(msg)
            return
        kind = type(msg).__name__
        if kind not in self._dropped:
            self._dropped.add(kind)
            self.log.warning("chain output of type %s has no writer; dropped (like Gadgetron without a "
                             "matching <writer>)", kind)

    # -- entry point ---------------------------------------------------------------------------
    def run(self) -> SessionSummary:
        """Serve the connection to the end; always tries to finish with TEXT errors + CLOSE."""
        t0 = time.perf_counter()
        errors: list[str] = []
        self.log.info("session started")
        if self.cfg.torch_threads:
            import torch

            torch.set_num_threads(self.cfg.torch_threads)
        try:
            if self.cfg.read_timeout_s is not None:
                self.sock.settimeout(self.cfg.read_timeout_s)
            errors.extend(self._serve())
        except _Fatal as exc:
            errors.append(exc.line)
            self._abort_chain("session time limit" if isinstance(exc, _TimeLimit) else "session error")
        except ConnectionClosedError as exc:
            if self._stop.is_set():
                errors.append("[server] ERROR: server shutting down; session cancelled")
                self._outcome = "cancelled"
            else:
                errors.append(f"[server] ERROR: client connection lost: {exc}")
                self._outcome = "client gone"
            self._abort_chain("client vanished")
        except PeerTimeoutError as exc:
            errors.append(f"[server] ERROR: client stalled: {exc}")
            self._outcome = "client stalled"
            self._abort_chain("client stalled")
        except ProtocolError as exc:
            errors.append(f"[server] ERROR: {exc}")
            self._abort_chain("protocol error")
        except Exception as exc:  # isolation: nothing inside a session may take the server down
            self.log.exception("internal error")
            errors.append(f"[server] ERROR: internal error: {type(exc).__name__}: {exc}")
            self._abort_chain("internal error")
        finally:
            self._finish_raw(errors)
            if self._warnings > _MAX_WARNINGS:
                errors.insert(0, f"[server] WARNING: {self._warnings - _MAX_WARNINGS} more warning(s) not "
                                 f"sent ({self.summary.nonfinite_acquisitions} acquisition(s) had non-finite "
                                 f"samples)")
            errors = [cap_text(self._redact(e), self.cfg.max_text_chars) for e in errors]
            self.summary.errors = errors
            self._close_connection(errors)
            self.summary.wall_s = time.perf_counter() - t0
            self.summary.outcome = self._outcome or ("error" if any("ERROR" in e for e in errors) else "ok")
            self.log.info("session finished in %.2f s: chain %s, %d acquisitions, %d images sent, %d error(s)%s",
                          self.summary.wall_s, self.summary.chain or "-", self.summary.acquisitions,
                          self.summary.images_sent, len(errors), "" if not errors else ": " + " | ".join(errors))
            access_log(self.summary, self.cfg.max_text_chars)
        return self.summary

    def _redact(self, text: str) -> str:
        """Error text without the server's absolute chain folder (clients see chain names only)."""
        from gadgets.stream.chain import default_chains_dir

        folders = {self.cfg.chains_dir or default_chains_dir()}
        out = text
        for folder in folders:
            for form in sorted({str(folder), str(Path(folder).resolve()), os.path.abspath(folder)}, key=len,
                               reverse=True):
                if len(form) > 1:
                    out = out.replace(form + os.sep, "").replace(form, "the server's chain directory")
        return out

    # -- state machine -------------------------------------------------------------------------
    def _read(self) -> Message:
        """The next message; ``read_timeout_s`` bounds the wait for the *whole* message, so a client
        trickling bytes cannot hold the session (a slow message ends it like a silent client)."""
        self._msg_deadline = time.monotonic() + self.cfg.read_timeout_s if self.cfg.read_timeout_s else None
        return self._reader.read_message()

    def _answer(self, q: Query) -> None:
        text = answer_query(q.text, self.cfg.device)
        self.log.info("query %r -> %r", q.text, text if len(text) < 80 else text[:77] + "...")
        self.send(Response(q.correlation_id, text))
        if self.summary.kind == "none":
            self.summary.kind = "query"

    def _serve(self) -> list[str]:
        # CONFIG
        request: Optional[tuple[str, str]] = None
        while request is None:
            msg = self._read()
            if isinstance(msg, ConfigFile):
                request = ("name", msg.name)
                self.log.info("config file %r", msg.name)
            elif isinstance(msg, ConfigText):
                request = ("text", msg.text)
                self.log.info("inline config (%d characters)", len(msg.text))
                if self.cfg.inline_chains == "off" and dependency_request(msg.text) is None:
                    raise _error("server", "this server does not accept chains sent inline (CONFIG_TEXT 2); "
                                           "send the name of one of its chains (CONFIG_FILE 1)")
            elif isinstance(msg, Query):
                self._answer(msg)
            elif isinstance(msg, Text):
                self.log.info("client text: %s", msg.text)
            elif isinstance(msg, Close):
                self.log.info("CLOSE before any config")
                return []
            elif isinstance(msg, Header):
                raise _error("server", "Received ISMRMRD header before config file.")
            else:
                raise _error("server", f"message {type(msg).__name__} not allowed before the config "
                                       f"(expected CONFIG_FILE 1, CONFIG_TEXT 2, QUERY 6 or CLOSE 4)")
        dependency = dependency_request(request[1]) if request[0] == "text" else None
        # HEADER
        header: Optional[Header] = None
        while header is None:
            msg = self._read()
            if isinstance(msg, Header):
                header = msg
            elif isinstance(msg, Query):
                self._answer(msg)
            elif isinstance(msg, Text):
                self.log.info("client text: %s", msg.text)
            elif isinstance(msg, Close):
                if dependency is not None:
                    self._reply_dependency(dependency)
                else:
                    self.log.info("CLOSE without a header: nothing to reconstruct")
                return []
            elif isinstance(msg, (ConfigFile, ConfigText)):
                raise _error("server", "Received second config file. Only one allowed.")
            else:
                raise _error("server", f"message {type(msg).__name__} not allowed before the ISMRMRD header "
                                       f"(expected HEADER 3, TEXT 5, QUERY 6 or CLOSE 4)")
        if dependency is not None:
            # a dependency chain has no data; answer at CLOSE, ignore anything before it
            while not isinstance(self._read(), Close):
                pass
            self._reply_dependency(dependency)
            return []
        xml = header.xml.rstrip("\0")
        parsed = self._validate_header(xml)
        # MRD variant: a JSON TEXT right after the header may override the chain name
        pending: Optional[Message] = self._read()
        if isinstance(pending, Text):
            override = self._json_override(pending.text)
            if override is not None:
                self.log.info("MRD JSON config overrides the chain: %r", override)
                request = ("name", override)
                pending = None
        return self._stream(request, xml, parsed, pending)

    def _echo_burst(self, feeding: bool) -> bool:
        """The echo chain without raw recording: acquisitions go back without being decoded into
        objects, a run of equal-shaped ones at a time. Each run already received in full is checked
        in place, with a few numpy calls over all its headers and samples at once, exactly as
        :meth:`_take_data` and the reader check one message (compression flag, samples × channels /
        trajectory limits, ``--max-channels``, the session's byte budget, a finite dwell time, finite
        samples and trajectory), then copied once out of the receive buffer and queued as one reply.
        When the next message is a clean-looking acquisition not yet received in full, more bytes are
        received (within the same deadlines as the reader's) and the burst goes on. The first message
        that is not such an acquisition ends the burst; the normal path then reads it and reports,
        sanitises or refuses it exactly as before (so warnings keep their place in the reply stream).
        A client that disconnects or resets is left to the normal path too, which reports it as ever.
        Returns ``feeding`` (False once the chain has stopped: the rest is discarded until CLOSE, as
        with :meth:`ChainRunner.put`).
        """
        if len(self._prelude) or self._peer_gone or self._recv_error is not None:
            return feeding
        ahead = self._ahead
        fresh = True                     # the front message is a new one: its read deadline starts now
        while True:
            feeding, consumed, want = self._echo_run(feeding)
            if self._stop.is_set():
                raise _error("server", "server shutting down; session cancelled")
            if not want:                 # the front message is for the message-by-message path
                return feeding
            if consumed or fresh:
                rt = self.cfg.read_timeout_s
                self._msg_deadline = time.monotonic() + rt if rt else None
                fresh = False
            have = ahead.pending()
            if not self._wait_readable(want - have, want):
                return feeding
            try:
                k = ahead.fill(self.sock.recv_into)
            except (socket.timeout, BlockingIOError, InterruptedError):
                continue
            except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError) as exc:
                self._recv_error = exc
                return feeding
            if k == 0:                   # EOF (it stays): the reader reports where it ended
                return feeding

    def _echo_run(self, feeding: bool) -> tuple[bool, int, int]:
        """Echo the clean acquisitions at the front of the receive buffer (see :meth:`_echo_burst`);
        ``(feeding, messages consumed, want)``: ``want`` is the size in bytes of the front message
        still being received (a clean-looking acquisition that fits the buffer, or 2 for the next
        message's id), 0 when the front message is for the message-by-message path."""
        ahead = self._ahead
        mv = ahead.pending_view()
        avail = len(mv)
        lim = self.cfg.limits.max_acquisition_values
        max_channels = self.cfg.max_channels
        budget = self.cfg.max_session_bytes - self.summary.bytes_received
        runs: list[tuple[int, int]] = []          # (start, end) of each clean run in ``mv``
        pos = 0
        count = 0
        received = 0
        want = 0
        while True:
            left = avail - pos
            if left < _ACQ_PREFIX:
                if left < 2 or (mv[pos] == _ACQ_ID_LO and mv[pos + 1] == _ACQ_ID_HI):
                    want = _ACQ_PREFIX if left >= 2 else 2
                break
            if mv[pos] != _ACQ_ID_LO or mv[pos + 1] != _ACQ_ID_HI:
                break
            flags, ns, nc, nt = _acq_fields(mv, pos + 2)
            n_data, n_traj = ns * nc, ns * nt
            if flags & _COMPRESSION_MASK or nc > max_channels or n_data > lim or n_traj > lim:
                break
            payload = 4 * n_traj + 8 * n_data
            size = _ACQ_PREFIX + payload
            k = left // size
            if payload:
                k = min(k, (budget - received) // payload)
            if k == 0:
                if left < size and size <= ahead.capacity and received + payload <= budget:
                    want = size
                break
            good = _clean_run(mv, pos, k, size, ns, nc, nt)
            if good:
                runs.append((pos, pos + good * size))
                pos += good * size
                count += good
                received += good * payload
            if good < k:
                break
        if not count:
            return feeding, 0, want
        self._reader.messages_read += count
        self.summary.acquisitions += count
        self.summary.bytes_received += received
        assert self.runner is not None
        if feeding and not self.runner.pass_through(count):
            self.log.info("chain stopped; discarding the rest of the stream until CLOSE")
            feeding = False
        if feeding:
            # the runs go back straight from the receive buffer as far as the socket takes them now
            # (nothing else queued before them); the rest is copied once into the outbox
            with self._wlock:
                if self._peer_gone:
                    raise ConnectionClosedError("the client connection is gone")
                for start, end in runs:
                    run = mv[start:end]
                    sent = self._outbox.send_now(run)
                    if sent < end - start:
                        self._outbox.put(bytes(run[sent:]), urgent=False)
                self.summary.messages_sent += count
                self._last_output = time.monotonic()
        del mv
        ahead.skip(pos)
        return feeding, count, want

    def _validate_header(self, xml: str) -> Any:
        if not xml.strip():
            raise _error("server", "ISMRMRD header is empty")
        try:
            return parse_header(xml, "HEADER message")
        except IsmrmrdFileError as exc:
            raise _error("server", f"invalid ISMRMRD header: {exc}") from None

    def _json_override(self, text: str) -> Optional[str]:
        body = text.strip().rstrip("\0")
        if not body.startswith("{"):
            return None
        try:
            obj = json.loads(body)
        except json.JSONDecodeError as exc:
            self.log.warning("TEXT after the header looks like JSON but does not parse (%s); ignored", exc)
            return None
        params = obj.get("parameters") if isinstance(obj, dict) else None
        if not isinstance(params, dict):
            return None
        for key in ("customconfig", "config"):
            value = params.get(key)
            if isinstance(value, str) and value.strip():
                return value.strip()
        return None

    def _resolve_chain(self, request: tuple[str, str], parsed: Any) -> Any:
        kind, value = request
        if kind == "name" and len(value.encode("utf-8")) > 255:
            raise _error("chain", f"chain name of {len(value.encode('utf-8'))} bytes is too long (at most "
                                  f"255 bytes, a file name)")
        try:
            if kind == "text":   # a chain from the network: no file names in its parameters
                return dataclasses.replace(parse_chain_text(value, "<inline config>", name="inline"), trusted=False)
            rules = self.cfg.rules
            generic = rules.is_generic(value) if rules is not None else value.strip() == "auto"
            if generic:
                if rules is None:
                    raise ChainError(f"config {value!r} asks for chain selection but the server has no "
                                     f"selection rules")
                name, desc, facts = select_chain(parsed, rules)
                self.summary.selection = desc
                self.log.info("config %r: selected chain %r by %s (protocol %r, trajectory %s, %d phase(s), "
                              "matrix %s, %d channel(s))", value, name, desc, facts["protocol"],
                              facts["trajectory"], facts["phases"], facts["matrix"], facts["channels"])
                value = name
            return load_chain(value, self.cfg.chains_dir, allow_paths=False)
        except ChainError as exc:
            raise _error("chain", str(exc)) from None
        except OSError as exc:   # e.g. a name the file system refuses
            reason = exc.strerror or type(exc).__name__
            raise _error("chain", f"cannot open chain {value[:80]!r}: {reason}") from None

    def _check_resources(self, parsed: Any) -> None:
        """Refuse a header that asks for more than the server allows, before anything is allocated."""
        problems = header_problems(parsed, self.cfg.max_matrix, self.cfg.max_channels)
        if problems:
            raise _error("server", "ISMRMRD header refused: " + "; ".join(problems[:8])
                         + (f"; and {len(problems) - 8} more" if len(problems) > 8 else ""))
        need = estimate_session_bytes(parsed)
        if need > self.cfg.max_session_bytes:
            raise _error("server", f"ISMRMRD header refused: reconstructing encoding/encodedSpace/"
                                   f"matrixSize x receiverChannels x frames needs about {_mib(need)}, above "
                                   f"this server's memory limit per session of "
                                   f"{_mib(self.cfg.max_session_bytes)} (--max-session-memory)")

    def _count_input(self, msg: Any) -> None:
        """Bound the data one session may send (acquisitions, waveforms, images)."""
        if isinstance(msg, ismrmrd.Acquisition):
            if msg.active_channels > self.cfg.max_channels:
                raise _error("server", f"acquisition scan_counter {msg.scan_counter}: active_channels "
                                       f"{msg.active_channels} is above this server's limit of "
                                       f"{self.cfg.max_channels} (--max-channels)")
            n = msg.data.nbytes + msg.traj.nbytes
        elif isinstance(msg, ismrmrd.Image):
            n = msg.data.nbytes
        elif isinstance(msg, ismrmrd.Waveform):
            n = msg.data.nbytes
        else:
            n = 0
        self.summary.bytes_received += n
        if self.summary.bytes_received > self.cfg.max_session_bytes:
            raise _error("server", f"the session sent more than {_mib(self.cfg.max_session_bytes)} of data, "
                                   f"this server's memory limit per session (--max-session-memory)")

    def _take_data(self, msg: Any) -> None:
        """An arriving data message (acquisition, waveform, image): counted against the session's
        limits, non-finite samples sanitised, saved to the raw file when recording."""
        self._count_input(msg)
        if isinstance(msg, ismrmrd.Acquisition):
            self.summary.acquisitions += 1
            self._sanitize(msg)
        elif isinstance(msg, ismrmrd.Waveform):
            self.summary.waveforms += 1
        self._record(msg)

    def _take_control(self, msg: Any) -> None:
        """A non-data message after the header, before CLOSE: TEXT is logged, QUERY answered; a second
        config or header, or any other message, ends the session with an error naming it."""
        if isinstance(msg, Text):
            self.log.info("client text: %s", msg.text)
        elif isinstance(msg, Query):
            self._answer(msg)
        elif isinstance(msg, (ConfigFile, ConfigText)):
            raise _error("server", "Received second config file. Only one allowed.")
        elif isinstance(msg, Header):
            raise _error("server", "Received second ISMRMRD header. Only one allowed.")
        else:
            raise _error("server", f"message {type(msg).__name__} cannot be sent to the server")

    def _open_raw_recorder(self, xml: str, protocol: str) -> None:
        """Start saving the raw stream (``--save-raw``) before any data enters the chain."""
        if self.cfg.save_raw_dir is None:
            return
        try:
            self._recorder = RawRecorder(self.cfg.save_raw_dir, self.summary.session_id, xml, protocol)
        except (OSError, ValueError) as exc:
            raise _error("raw", f"cannot create the raw data file in {self.cfg.save_raw_dir}: {exc}") from None
        self.summary.raw_path = self._recorder.path
        self.log.info("saving raw data to %s", self._recorder.path)

    def _stream(self, request: tuple[str, str], xml: str, parsed: Any, pending: Optional[Message]) -> list[str]:
        self._check_resources(parsed)
        spec = self._resolve_chain(request, parsed)
        self.summary.chain = spec.name
        self.summary.kind = "recon"
        protocol = str(getattr(getattr(parsed, "measurementInformation", None), "protocolName", None) or "")
        self._open_raw_recorder(xml, protocol)
        try:
            ctx = chain_context(spec, self.cfg.device, header=parsed, header_xml=xml,
                                logger=self._chain_logger, storage_dir=self.cfg.noise_store_dir)
            ctx.stop_requested = self._stop.is_set
            _register_gadgets(self.cfg.gadgets)
            gadgets = build_chain(spec, ctx)
        except ChainError as exc:
            raise _error("chain", str(exc)) from None
        self.log.info("chain %s (%s) on %s: %s", spec.name, spec.source, ctx.device,
                      " -> ".join(g.name or type(g).__name__ for g in gadgets) or "(echo)")
        self.runner = ChainRunner(gadgets, ctx, queue_size=self.cfg.queue_size, on_output=self._on_output,
                                  queue_bytes=self.cfg.queue_bytes)
        echo = not gadgets      # the echo chain: the runner hands every message straight back (this thread)
        burst = echo and self._recorder is None
        reader = self._reader
        feeding = True
        while True:
            if burst and pending is None:
                feeding = self._echo_burst(feeding)
            msg = pending if pending is not None else self._read()
            pending = None
            if isinstance(msg, Close):
                break
            if isinstance(msg, (ismrmrd.Acquisition, ismrmrd.Waveform, ismrmrd.Image)):
                self._take_data(msg)
                last = reader.last_wire
                if echo and last is not None and last[0] is msg:
                    # its header and arrays are views of the received bytes (sanitised in place), and
                    # nothing runs between here and _on_output: those bytes are its encoding
                    self._echo = last
                if feeding and not self.runner.put(msg):
                    feeding = False   # the chain failed: keep reading (and saving) until CLOSE
                    self.log.info("chain stopped; discarding the rest of the stream until CLOSE")
                if self._stop.is_set():
                    raise _error("server", "server shutting down; session cancelled")
            else:
                self._take_control(msg)
        self.runner.close()
        result: ChainResult = self._wait_chain()
        return list(result.errors)

    def _wait_chain(self) -> ChainResult:
        """Wait for the chain after CLOSE while watching the deadline, the server and the client.

        A client that disconnects now cancels its reconstruction. TCP cannot tell a client that only
        half-closed (and still reads) from one that is gone, so once the client's side has ended
        and the chain has sent nothing for ``disconnect_probe_s``, an INFO TEXT is sent: a vanished
        client answers it with a reset, which the next look at the socket sees.
        """
        assert self.runner is not None
        chain_deadline = time.monotonic() + self.cfg.chain_timeout_s if self.cfg.chain_timeout_s else None
        eof = False
        last_probe = 0.0
        while True:
            try:
                result = self.runner.wait(_WAIT_POLL_S)
            except TimeoutError:
                pass
            else:
                if result.errors and self._stop.is_set():   # the chain failed because the shutdown stopped it
                    self._outcome = "cancelled"
                    raise _error("server", "server shutting down; session cancelled")
                return result
            now = time.monotonic()
            if self._stop.is_set():
                self._outcome = "cancelled"
                raise _error("server", "server shutting down; session cancelled")
            if self._deadline is not None and now >= self._deadline:
                raise self._time_limit()
            if chain_deadline is not None and now >= chain_deadline:
                limit = self.cfg.chain_timeout_s
                raise _error("server", f"the chain did not finish within {limit:g} s after CLOSE")
            state = self._peek_client()
            if state == "gone":
                self._outcome = "client gone"
                raise ConnectionClosedError("the client disconnected while its data were reconstructed")
            eof = eof or state == "eof"
            probe = self.cfg.disconnect_probe_s
            if eof and now - self._last_output >= probe and now - last_probe >= probe:
                last_probe = now
                try:
                    self.send(Text(f"[server] INFO: reconstruction running ({now - self._started:.0f} s)"))
                    self.flush()
                except (ProtocolError, OSError):
                    self._outcome = "client gone"
                    raise ConnectionClosedError("the client disconnected while its data were reconstructed"
                                                ) from None

    def _peek_client(self) -> str:
        """``gone`` (reset / error), ``eof`` (the client's side ended) or ``open``; consumes nothing."""
        if self._peer_gone:
            return "gone"
        try:
            events = _poll_events(self.sock, select.POLLIN, 0.0)
        except (OSError, ValueError):
            return "gone"
        if events & (select.POLLERR | select.POLLNVAL):
            return "gone"
        if not events & (select.POLLIN | select.POLLHUP):
            return "open"
        try:
            data = self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError, socket.timeout):
            return "open"
        except OSError:
            return "gone"
        return "eof" if not data else "open"

    def _record(self, msg: Any) -> None:
        if self._recorder is None:
            return
        try:
            self._recorder.append(msg)
        except (OSError, ValueError, RuntimeError) as exc:
            path = self._recorder.path
            self._recorder.close()
            self._recorder = None
            raise _error("raw", f"cannot append to the raw data file {path}: {exc}") from None

    def _reply_dependency(self, noise_file: str) -> None:
        self.summary.kind = "dependency"
        mid = noise_file[len(NOISE_DEPENDENCY_PREFIX):] if noise_file.startswith(NOISE_DEPENDENCY_PREFIX) \
            else noise_file
        stats = None
        if self.cfg.noise_store_dir is not None and mid:
            try:
                stats = NoiseStore(self.cfg.noise_store_dir).load(mid)
            except ValueError as exc:
                self.log.warning("noise dependency %r unreadable: %s", mid, exc)
        summary = noise_summary(stats)
        self.log.info("dependency query for %r: %s", mid, summary.get("status"))
        self.send(DependencyQuery(meta_to_xml(summary)))

    # -- ending --------------------------------------------------------------------------------
    def _abort_chain(self, reason: str) -> None:
        if self.runner is None:
            return
        self.runner.cancel(reason)
        try:
            self.runner.wait(30.0)
        except (TimeoutError, RuntimeError) as exc:
            self.log.warning("chain did not stop after cancel: %s", exc)

    def _finish_raw(self, errors: list[str]) -> None:
        if self._recorder is None:
            return
        try:
            self._recorder.close()
            self.log.info("raw data saved: %s (%d acquisitions, %d waveforms)", self._recorder.path,
                          self._recorder.acquisitions, self._recorder.waveforms)
        except (OSError, ValueError, RuntimeError) as exc:
            errors.append(f"[raw] ERROR: closing {self._recorder.path}: {exc}")

    def _close_connection(self, errors: list[str]) -> None:
        """Send error TEXTs then CLOSE (always last), then close the socket without losing them."""
        try:
            for line in errors:
                self.send(Text(line))
            self.send(Close())
            self.flush()
            self.summary.close_sent = True
        except (ProtocolError, OSError) as exc:
            self.log.info("could not send the final messages (client gone): %s", exc)
        finally:
            self._outbox.close()
        try:
            self.sock.shutdown(socket.SHUT_WR)
            # read until the client closes (bounded), so unread input does not turn into a TCP reset
            # that could destroy our CLOSE before the client reads it
            self.sock.settimeout(0.2)
            deadline = time.monotonic() + _LINGER_S
            while time.monotonic() < deadline:
                try:
                    if not self.sock.recv(1 << 16):
                        break
                except socket.timeout:
                    continue
        except OSError:
            pass
        finally:
            self.sock.close()
