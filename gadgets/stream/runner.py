"""Run a chain of gadgets as a stream: one thread per gadget, bounded queues between them.

Acquisitions keep flowing into the buffer while a later stage reconstructs the previous slice;
when a stage is slower than its input, its bounded queue fills and :meth:`ChainRunner.put` blocks
(back-pressure) instead of buffering a whole scan in memory.

End of stream: :meth:`ChainRunner.close` sends an end marker; each stage, on receiving it, calls its
gadget's ``flush()``, forwards what that yields and passes the marker on. Outputs of the last stage
go to the ``on_output`` callback (called from the last stage's thread) or can be iterated with
:meth:`ChainRunner.outputs`.

Errors: an exception in any stage (or in ``on_output``) stops the chain. It is recorded as
``"[gadget] ERROR: message"`` in :attr:`ChainResult.errors` and logged (traceback at debug level).
The failing stage forwards nothing more and nobody flushes; the producer and the stages upstream of
it stop at once and drop what is queued, and :meth:`ChainRunner.put` returns False without blocking,
so a producer still reading from a socket never deadlocks; stages downstream finish the messages
already queued to them (images of earlier slices still reach the client) and then stop.
``ctx.stop_requested()`` turns True so long reconstructions can end early. The caller (server, CLI)
reports the errors (TEXT message to the client) and closes. :meth:`ChainRunner.cancel` stops every
stage at once without an error, e.g. when the client vanished.

Memory: each queue is bounded by messages (``queue_size``) *and* by bytes (``queue_bytes``, the
array payloads of the queued messages, :func:`message_nbytes`); a queue always takes one message,
however large, so a chain never deadlocks on a big one.

``threads=False`` runs every message through all stages synchronously in the caller's thread
(same semantics, deterministic; for tests and debugging).
"""

from __future__ import annotations

import collections
import contextlib
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import numpy as np

from gadgets.base import MAX_ERROR_CHARS, ChainContext, Gadget, GadgetError, cap_text
from gadgets.stream.chain import ChainSpec, build_chain
from recon_core.methods.base import StopRequested

_POLL_S = 0.05          # how often blocked puts/gets look at the stop flag


class _Marker:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<{self.name}>"


_END = _Marker("end of stream")
_ABORT = _Marker("abort")


def message_nbytes(msg: Any) -> int:
    """Bytes of the arrays a message holds (numpy arrays and torch tensors, one attribute level deep)."""
    import torch

    def size(v: Any) -> int:
        if isinstance(v, np.ndarray):
            return int(v.nbytes)
        if isinstance(v, torch.Tensor):
            return int(v.element_size() * v.numel())
        return 0

    if isinstance(msg, (np.ndarray, torch.Tensor)):
        return size(msg)
    data = getattr(msg, "data", None)
    total = size(data) if not callable(data) else 0
    traj = getattr(msg, "traj", None)
    total += size(traj) if not callable(traj) else 0
    attrs = getattr(msg, "__dict__", None)
    if isinstance(attrs, dict):
        total += sum(size(v) for k, v in attrs.items() if k not in ("data", "traj"))
    return total


class ByteBoundedQueue:
    """A FIFO bounded by item count and by bytes (:func:`message_nbytes`); the ``queue.Queue``
    calls the runner uses (``put(timeout)``, ``get(timeout)``, ``get_nowait``, ``qsize``), raising
    ``queue.Full`` / ``queue.Empty`` like it. An empty queue accepts any one item."""

    def __init__(self, maxsize: int, maxbytes: Optional[int]) -> None:
        self.maxsize = maxsize
        self.maxbytes = maxbytes
        self._items: "collections.deque[tuple[Any, int]]" = collections.deque()
        self._bytes = 0
        self._cond = threading.Condition()

    def _fits(self, n: int) -> bool:
        if not self._items:
            return True
        if len(self._items) >= self.maxsize:
            return False
        return self.maxbytes is None or self._bytes + n <= self.maxbytes

    def put(self, item: Any, timeout: Optional[float] = None) -> None:
        n = 0 if isinstance(item, _Marker) else message_nbytes(item)
        with self._cond:
            if not self._cond.wait_for(lambda: self._fits(n), timeout):
                raise queue.Full
            self._items.append((item, n))
            self._bytes += n
            self._cond.notify_all()

    def get(self, timeout: Optional[float] = None) -> Any:
        with self._cond:
            if not self._cond.wait_for(lambda: bool(self._items), timeout):
                raise queue.Empty
            item, n = self._items.popleft()
            self._bytes -= n
            self._cond.notify_all()
            return item

    def get_nowait(self) -> Any:
        return self.get(timeout=0)

    def qsize(self) -> int:
        with self._cond:
            return len(self._items)

    @property
    def nbytes(self) -> int:
        """Bytes queued now."""
        with self._cond:
            return self._bytes


@contextlib.contextmanager
def _iterating(produced: Iterable[Any]) -> Iterator[Iterator[Any]]:
    """Iterate what a gadget produced; close it afterwards if it is a generator (early stop)."""
    it = iter(produced)
    try:
        yield it
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()


@dataclass
class StageStats:
    """Counts of one stage: messages received and emitted, time spent inside the gadget."""

    name: str
    received: int = 0
    emitted: int = 0
    busy_s: float = 0.0
    flushed: bool = False


@dataclass
class ChainResult:
    """Outcome of a chain run.

    ``errors`` holds ``"[gadget] ERROR: message"`` lines (empty when the run succeeded);
    ``stages`` the per-stage counts; ``wall_s`` the time from start to the last stage finishing.
    """

    errors: list[str] = field(default_factory=list)
    stages: list[StageStats] = field(default_factory=list)
    wall_s: float = 0.0
    inputs: int = 0
    outputs: int = 0
    cancelled: bool = False

    @property
    def ok(self) -> bool:
        """True when no error occurred and the run was not cancelled."""
        return not self.errors and not self.cancelled


def _stage_name(gadget: Gadget) -> str:
    return gadget.name or type(gadget).__name__


def format_error(stage: str, exc: BaseException) -> str:
    """The one-line form of a stage error, ``"[gadget] ERROR: message"``.

    A :class:`GadgetError` keeps the gadget name and message it was raised with; any other exception
    is attributed to ``stage`` and keeps its type name (``ValueError: ...``).
    """
    if isinstance(exc, GadgetError):
        return cap_text(f"[{exc.gadget}] ERROR: {exc.detail}", MAX_ERROR_CHARS)
    return cap_text(f"[{stage}] ERROR: {type(exc).__name__}: {exc}", MAX_ERROR_CHARS)


class ChainRunner:
    """Run gadgets as a stream (see the module docstring).

    Parameters
    ----------
    gadgets
        Configured gadgets, in chain order (from :func:`gadgets.stream.chain.build_chain`); may be
        empty (echo chain).
    ctx
        The chain context shared by the gadgets; its ``logger`` receives the runner's log lines and
        its ``stop_requested`` is extended to report :meth:`cancel` and errors.
    queue_size
        Capacity of the queue in front of each stage (messages); ``put`` blocks when full.
    queue_bytes
        Capacity of each queue in bytes of message arrays (None: unbounded by bytes).
    on_output
        Called with every output of the last stage, from that stage's thread. When None, outputs
        are kept for :meth:`outputs`.
    threads
        False runs everything synchronously in the caller's thread (inside ``put``/``close``).
    """

    def __init__(self, gadgets: Sequence[Gadget], ctx: ChainContext, queue_size: int = 64,
                 on_output: Optional[Callable[[Any], None]] = None, threads: bool = True,
                 queue_bytes: Optional[int] = None) -> None:
        if queue_size < 1:
            raise ValueError(f"queue_size must be at least 1, got {queue_size}")
        self.gadgets = list(gadgets)
        self.ctx = ctx
        self.log = ctx.logger
        self.queue_size = queue_size
        self.threaded = threads
        self._on_output = on_output
        self._stats = [StageStats(_stage_name(g)) for g in self.gadgets]
        self._queues = [ByteBoundedQueue(queue_size, queue_bytes) for _ in self.gadgets]
        self._out: queue.Queue[Any] = queue.Queue()          # unbounded: wait() must never block on it
        self._stop = threading.Event()          # set on the first error or cancel (ctx.stop_requested)
        self._stop_below = -1                   # stages with a lower index stop at once (see _halted)
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._errors: list[str] = []
        self._cancelled = False
        self._closed = False
        self._inputs = 0
        self._outputs = 0
        self._finished_stages = 0
        self._t0 = time.perf_counter()
        self._t_end: Optional[float] = None
        previous = ctx.stop_requested
        ctx.stop_requested = lambda: self._stop.is_set() or previous()
        self._threads: list[threading.Thread] = []
        if threads:
            for i, g in enumerate(self.gadgets):
                t = threading.Thread(target=self._run_stage, args=(i,), daemon=True,
                                     name=f"{ctx.chain_name or 'chain'}:{i}:{self._stats[i].name}")
                self._threads.append(t)
            for t in self._threads:
                t.start()

    # -- producer side -------------------------------------------------------------------------
    def put(self, msg: Any) -> bool:
        """Feed one message to the first stage; blocks while its queue is full.

        Returns False (without blocking) once the chain has stopped after an error or
        :meth:`cancel`: the message is discarded and the producer should stop reading.
        """
        if self._closed:
            raise RuntimeError("ChainRunner.put() after close()")
        if self._stop.is_set():
            return False
        self._inputs += 1
        if self.threaded:
            return self._emit(-1, msg)
        return self._sync_push(0, msg)

    def pass_through(self, n: int) -> bool:
        """A chain without gadgets only hands each message to ``on_output`` unchanged: a caller that
        sends ``n`` such messages back itself (the server's echo of received bytes) counts them here,
        as in and out. Returns False (count nothing) once the chain has stopped, like :meth:`put`."""
        if self.gadgets:
            raise RuntimeError("pass_through() is only for a chain without gadgets")
        if self._closed:
            raise RuntimeError("ChainRunner.pass_through() after close()")
        if self._stop.is_set():
            return False
        self._inputs += n
        with self._lock:
            self._outputs += n
        return True

    def close(self) -> None:
        """Signal end of stream: stages flush in order and the end marker travels down the chain."""
        if self._closed:
            return
        self._closed = True
        if not self.threaded:
            self._sync_flush()
            self._finish()
            return
        if not self.gadgets:
            self._finish()
            return
        self._enqueue(0, _END, waiter=-1)

    def cancel(self, reason: str = "cancelled") -> None:
        """Stop every stage as soon as possible (client vanished); not recorded as an error."""
        if self._done.is_set():
            return
        self.log.info("chain %s: %s; stopping", self.ctx.chain_name or "?", reason)
        self._cancelled = True
        with self._lock:
            self._stop_below = len(self.gadgets) + 1
        self._stop.set()
        if not self.threaded or not self.gadgets:
            self._finish()

    # -- consumer side -------------------------------------------------------------------------
    def outputs(self, timeout: Optional[float] = None) -> Iterator[Any]:
        """Iterate the outputs of the last stage until the chain finishes (when no ``on_output``).

        ``timeout`` bounds the wait for each next output (``queue.Empty`` → TimeoutError).
        """
        if self._on_output is not None:
            raise RuntimeError("outputs go to the on_output callback of this ChainRunner")
        while True:
            try:
                item = self._out.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"no output from chain {self.ctx.chain_name!r} within {timeout} s"
                                   ) from None
            if item is _END:
                self._out.put(_END)      # later iterations end too
                return
            yield item

    def wait(self, timeout: Optional[float] = None) -> ChainResult:
        """Wait until every stage has finished and return the :class:`ChainResult`.

        Raises
        ------
        RuntimeError
            Neither :meth:`close` nor :meth:`cancel` was called and no error stopped the chain
            (the stages would wait for input forever).
        TimeoutError
            Stages still running after ``timeout`` seconds (named in the message).
        """
        if not (self._closed or self._stop.is_set()):
            raise RuntimeError("call close() (end of stream) or cancel() before wait()")
        if not self._done.wait(timeout):
            alive = [t.name for t in self._threads if t.is_alive()]
            raise TimeoutError(f"chain {self.ctx.chain_name!r} still running after {timeout} s: stages "
                               f"{alive}")
        for t in self._threads:
            t.join()
        return self.result()

    def result(self) -> ChainResult:
        """A snapshot of the current counts and errors (final once the chain has finished)."""
        end = self._t_end if self._t_end is not None else time.perf_counter()
        with self._lock:
            return ChainResult(errors=list(self._errors),
                               stages=[StageStats(s.name, s.received, s.emitted, s.busy_s, s.flushed)
                                       for s in self._stats],
                               wall_s=end - self._t0, inputs=self._inputs, outputs=self._outputs,
                               cancelled=self._cancelled)

    def queue_depths(self) -> list[int]:
        """Messages waiting in front of each stage now (monitoring; never above ``queue_size``)."""
        return [q.qsize() for q in self._queues]

    @property
    def failed(self) -> bool:
        """True once an error has stopped the chain."""
        with self._lock:
            return bool(self._errors)

    def __enter__(self) -> "ChainRunner":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.cancel(f"caller raised {exc_type.__name__}")
        else:
            self.close()
        if self.threaded:
            self._done.wait()

    # -- internals -----------------------------------------------------------------------------
    # Stage indices: -1 is the producer, 0..n-1 the gadgets, n the output. Stages below
    # ``_stop_below`` stop at once; after an error in stage k that is k + 1, so the producer and
    # upstream stages stop (their queues are drained), while downstream stages finish the messages
    # already queued to them (e.g. images of earlier slices still reach the client), then meet the
    # abort marker and stop without flushing. cancel() stops everything.
    def _halted(self, i: int) -> bool:
        return i < self._stop_below

    def _fail(self, index: int, stage: str, exc: BaseException) -> None:
        if isinstance(exc, StopRequested) and self._stop.is_set():
            self.log.info("[%s] stopped on request: %s", stage, exc)
            return
        line = format_error(stage, exc)
        with self._lock:
            self._errors.append(line)
            self._stop_below = max(self._stop_below, index + 1)
        self.log.error("chain %s: %s", self.ctx.chain_name or "?", line)
        self.log.debug("traceback of the error in stage %s", stage, exc_info=exc)
        self._stop.set()

    def _finish(self) -> None:
        if self._done.is_set():
            return
        self._t_end = time.perf_counter()
        with self._lock:
            n_err = len(self._errors)
        self.log.info("chain %s finished in %.3f s: %d in, %d out, %d error(s)%s", self.ctx.chain_name or "?",
                      self._t_end - self._t0, self._inputs, self._outputs, n_err,
                      ", cancelled" if self._cancelled else "")
        self._out.put(_END)
        self._done.set()

    def _deliver(self, msg: Any) -> bool:
        """Hand one message to the output side; an exception in ``on_output`` stops the chain."""
        n = len(self.gadgets)
        if self._halted(n):
            return False
        if self._on_output is not None:
            try:
                self._on_output(msg)
            except Exception as exc:  # the sink (e.g. a client socket) failed: report, stop
                self._fail(n, "output", exc)
                return False
        else:
            self._out.put(msg)
        with self._lock:
            self._outputs += 1
        return True

    def _enqueue(self, i: int, item: Any, waiter: int) -> bool:
        """Put into stage ``i``'s queue, blocking while full, giving up once stage ``waiter`` halts."""
        q = self._queues[i]
        while not self._halted(waiter):
            try:
                q.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _emit(self, i: int, msg: Any) -> bool:
        """Stage ``i`` (-1: the producer) sends ``msg`` to the next stage or to the output."""
        if self._halted(i):
            return False
        if i >= 0:
            self._stats[i].emitted += 1
        if i + 1 == len(self.gadgets):
            return self._deliver(msg)
        return self._enqueue(i + 1, msg, waiter=i)

    def _next(self, i: int) -> Any:
        q = self._queues[i]
        while not self._halted(i):
            try:
                return q.get(timeout=_POLL_S)
            except queue.Empty:
                continue
        return _ABORT

    def _drain(self, i: int) -> None:
        q = self._queues[i]
        while True:
            try:
                q.get_nowait()
            except queue.Empty:
                return

    def _run_stage(self, i: int) -> None:
        gadget, stats = self.gadgets[i], self._stats[i]
        ended = False
        try:
            while True:
                item = self._next(i)
                if item is _ABORT:
                    return
                if item is _END:
                    t = time.perf_counter()
                    with _iterating(gadget.flush()) as outs:
                        for out in outs:
                            stats.busy_s += time.perf_counter() - t
                            if not self._emit(i, out):
                                return
                            t = time.perf_counter()
                    stats.busy_s += time.perf_counter() - t
                    stats.flushed = True
                    ended = True
                    if i + 1 < len(self.gadgets):
                        self._enqueue(i + 1, _END, waiter=i)
                    return
                stats.received += 1
                t = time.perf_counter()
                with _iterating(gadget.handle(item)) as outs:
                    for out in outs:
                        stats.busy_s += time.perf_counter() - t
                        if not self._emit(i, out):
                            return
                        t = time.perf_counter()
                stats.busy_s += time.perf_counter() - t
        except Exception as exc:
            self._fail(i, stats.name, exc)
        finally:
            if not ended and i + 1 < len(self.gadgets):
                # tell the next stage that nothing more comes; it keeps going until it gets there
                self._enqueue(i + 1, _ABORT, waiter=i + 1)
            self._drain(i)          # free memory held by messages nobody will process
            with self._lock:
                self._finished_stages += 1
                last = self._finished_stages == len(self.gadgets)
            self.log.debug("stage %s finished: %d in, %d out, %.3f s busy", stats.name, stats.received,
                           stats.emitted, stats.busy_s)
            if last:
                self._finish()

    # synchronous mode ------------------------------------------------------------------------
    def _sync_push(self, i: int, msg: Any) -> bool:
        """Run ``msg`` through stages ``i``… in the caller's thread; False once the chain stopped."""
        if i == len(self.gadgets):
            return self._deliver(msg)
        gadget, stats = self.gadgets[i], self._stats[i]
        stats.received += 1
        try:
            t = time.perf_counter()
            with _iterating(gadget.handle(msg)) as outs:
                for out in outs:
                    stats.busy_s += time.perf_counter() - t
                    stats.emitted += 1
                    if not self._sync_push(i + 1, out):
                        return False
                    t = time.perf_counter()
            stats.busy_s += time.perf_counter() - t
        except Exception as exc:
            self._fail(i, stats.name, exc)
            self._finish()
            return False
        return not self._stop.is_set()

    def _sync_flush(self) -> None:
        for i, (gadget, stats) in enumerate(zip(self.gadgets, self._stats)):
            if self._stop.is_set():
                return
            try:
                t = time.perf_counter()
                with _iterating(gadget.flush()) as outs:
                    for out in outs:
                        stats.busy_s += time.perf_counter() - t
                        stats.emitted += 1
                        if not self._sync_push(i + 1, out):
                            return
                        t = time.perf_counter()
                stats.busy_s += time.perf_counter() - t
                stats.flushed = True
            except Exception as exc:
                self._fail(i, stats.name, exc)
                self._finish()
                return


def run_chain(spec_or_gadgets: Union[ChainSpec, Sequence[Gadget]], messages: Iterable[Any], ctx: ChainContext,
              *, threads: bool = True, queue_size: int = 64,
              timeout: Optional[float] = None) -> tuple[list[Any], ChainResult]:
    """Run a whole stream offline: feed ``messages``, close, and collect every output.

    Parameters
    ----------
    spec_or_gadgets
        A :class:`ChainSpec` (built with :func:`build_chain` against ``ctx``) or configured gadgets.
    messages
        The input stream (e.g. acquisitions read from an ISMRMRD file); feeding stops early when
        the chain fails.
    ctx
        The chain context (header, device, logger, progress sink).
    threads
        False: synchronous mode in the caller's thread.
    queue_size, timeout
        Queue capacity per stage; seconds to wait for the chain to finish after the last input.

    Returns
    -------
    outputs, result
        The last stage's outputs in order, and the :class:`ChainResult` (check ``result.errors``).
    """
    gadgets = build_chain(spec_or_gadgets, ctx) if isinstance(spec_or_gadgets, ChainSpec) else spec_or_gadgets
    outputs: list[Any] = []
    runner = ChainRunner(gadgets, ctx, queue_size=queue_size, on_output=outputs.append, threads=threads)
    try:
        for msg in messages:
            if not runner.put(msg):
                break
    except BaseException:
        runner.cancel("input stream raised")
        raise
    runner.close()
    result = runner.wait(timeout)
    return outputs, result
