"""The streaming chain runner: stages in threads, bounded queues, flush, errors, cancel, progress."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import pytest

from gadgets import registry
from gadgets.base import ChainContext, Gadget, GadgetParams
from gadgets.stream.chain import parse_chain_text
from gadgets.stream.runner import ChainRunner, run_chain
from recon_core.methods.base import ProgressEvent

# -- small test gadgets --------------------------------------------------------------------------


@dataclass
class Item:
    """A message the test gadgets accept."""

    value: int


class Other:
    """A message no test gadget accepts (must pass through unchanged)."""

    def __init__(self, tag: str) -> None:
        self.tag = tag


@dataclass
class AddParams(GadgetParams):
    add: int = 1


class Add(Gadget):
    name = "add"
    Params = AddParams
    accepts = (Item,)

    def process(self, msg):
        yield Item(msg.value + self.params.add)


@dataclass
class GroupParams(GadgetParams):
    size: int = 3


class Group(Gadget):
    """Sums groups of ``size`` items; flush emits the partial last group."""

    name = "group"
    Params = GroupParams
    accepts = (Item,)

    def __init__(self, params=None, ctx=None):
        super().__init__(params, ctx)
        self.pending: list[int] = []
        self.flushed = False

    def process(self, msg):
        self.pending.append(msg.value)
        if len(self.pending) == self.params.size:
            yield Item(sum(self.pending))
            self.pending = []

    def flush(self):
        self.flushed = True
        if self.pending:
            yield Item(sum(self.pending))
            self.pending = []


class Slow(Gadget):
    name = "slow"
    accepts = (Item,)
    delay_s = 0.01

    def process(self, msg):
        time.sleep(self.delay_s)
        yield msg


class Fail(Gadget):
    """Raises on the item with value 5."""

    name = "boom"
    accepts = (Item,)

    def process(self, msg):
        if msg.value == 5:
            raise self.error(f"cannot handle value {msg.value}")
        yield msg


class Crash(Gadget):
    name = "crash"
    accepts = (Item,)

    def process(self, msg):
        raise ZeroDivisionError("division by zero")
        yield msg


class Recorder(Gadget):
    """Keeps what it saw and whether it was flushed."""

    name = "recorder"
    accepts = (Item,)

    def __init__(self, params=None, ctx=None):
        super().__init__(params, ctx)
        self.seen: list[int] = []
        self.flushed = False

    def process(self, msg):
        self.seen.append(msg.value)
        yield msg

    def flush(self):
        self.flushed = True
        return iter(())


class Progress(Gadget):
    name = "progress"
    accepts = (Item,)

    def process(self, msg):
        self.ctx.report(self.name, ProgressEvent("fake", msg.value, 3, "iter", {"res": 0.5}))
        yield msg


class Gate(Gadget):
    """Blocks every message until ``release`` is set (a long reconstruction that honours stop)."""

    name = "gate"
    accepts = (Item,)

    def __init__(self, params=None, ctx=None):
        super().__init__(params, ctx)
        self.release = threading.Event()

    def process(self, msg):
        deadline = time.monotonic() + 10
        while not self.release.wait(0.005):
            if self.ctx.stop_requested():
                return
            if time.monotonic() > deadline:
                raise self.error("test gate never released")
        yield msg


def items(n: int, start: int = 0) -> list[Item]:
    return [Item(i) for i in range(start, start + n)]


@pytest.fixture(params=[True, False], ids=["threads", "sync"])
def threads(request) -> bool:
    return request.param


# -- tests ---------------------------------------------------------------------------------------


def test_order_passthrough_and_flush(threads):
    ctx = ChainContext()
    group = Group(GroupParams(size=3), ctx)
    msgs = [Item(1), Other("a"), Item(2), Item(3), Other("b"), Item(4)]
    outs, result = run_chain([Add(AddParams(add=10), ctx), group], msgs, ctx, threads=threads, timeout=10)
    # Others pass through both gadgets unchanged and in order; the last partial group comes from flush
    assert [o.tag if isinstance(o, Other) else o.value for o in outs] == ["a", 11 + 12 + 13, "b", 14]
    assert outs[0] is msgs[1]
    assert group.flushed
    assert result.ok and result.errors == []
    assert [(s.name, s.received, s.emitted, s.flushed) for s in result.stages] == [
        ("add", 6, 6, True), ("group", 6, 4, True)]
    assert result.inputs == 6 and result.outputs == 4


def test_long_stream_keeps_order(threads):
    ctx = ChainContext()
    outs, result = run_chain([Add(ctx=ctx), Add(ctx=ctx), Add(ctx=ctx)], items(300), ctx, threads=threads,
                             queue_size=4, timeout=30)
    assert [o.value for o in outs] == list(range(3, 303))
    assert result.ok


def test_empty_chain_echoes(threads):
    ctx = ChainContext()
    msgs = [Other("x"), Item(3)]
    outs, result = run_chain([], msgs, ctx, threads=threads)
    assert outs == msgs and result.ok and result.stages == []


def test_run_chain_from_spec(monkeypatch):
    monkeypatch.setitem(registry.GADGETS, "t_add", f"{__name__}:Add")
    spec = parse_chain_text("chain:\n  - gadget: t_add\n    params: {add: 5}\n  - gadget: t_add\n")
    outs, result = run_chain(spec, items(3), ChainContext(), timeout=10)
    assert [o.value for o in outs] == [6, 7, 8] and result.ok


def test_outputs_iterator():
    ctx = ChainContext()
    runner = ChainRunner([Add(ctx=ctx)], ctx, queue_size=2)
    got: list[int] = []
    consumer = threading.Thread(target=lambda: got.extend(o.value for o in runner.outputs(timeout=10)))
    consumer.start()
    for m in items(20):
        assert runner.put(m)
    runner.close()
    result = runner.wait(10)
    consumer.join(10)
    assert got == list(range(1, 21)) and result.ok


def test_back_pressure_bounds_queues():
    ctx = ChainContext()
    slow = Slow(ctx=ctx)
    runner = ChainRunner([Add(ctx=ctx), slow], ctx, queue_size=2, on_output=lambda m: None)
    depths: list[int] = []
    t0 = time.perf_counter()
    for m in items(30):
        assert runner.put(m)
        depths.extend(runner.queue_depths())
    put_time = time.perf_counter() - t0
    runner.close()
    result = runner.wait(20)
    assert result.ok and result.stages[1].received == 30
    assert max(depths) <= 2
    assert max(depths) == 2          # the queue did fill: the producer was held back
    # at most 2 (queue 0) + 1 (in add) + 2 (queue 1) + 1 (in slow) messages can be ahead of the
    # slow stage, so the producer must have waited for more than 30 - 8 of its 10 ms steps
    assert put_time >= (30 - 8) * Slow.delay_s


def test_acquisitions_keep_flowing_while_later_stage_works():
    ctx = ChainContext()
    first, gate = Recorder(ctx=ctx), Gate(ctx=ctx)
    runner = ChainRunner([first, gate], ctx, queue_size=64, on_output=lambda m: None)
    for m in items(20):
        assert runner.put(m)
    deadline = time.monotonic() + 10
    while len(first.seen) < 20 and time.monotonic() < deadline:
        time.sleep(0.005)
    # the first stage has processed everything while the second is still busy with message 0
    assert first.seen == list(range(20))
    assert runner.result().stages[1].emitted == 0
    gate.release.set()
    runner.close()
    result = runner.wait(10)
    assert result.ok and result.outputs == 20


@pytest.mark.parametrize("queue_size", [1, 4])
def test_error_in_middle_stage_reported_without_deadlock(queue_size):
    ctx = ChainContext()
    downstream = Recorder(ctx=ctx)
    runner = ChainRunner([Add(AddParams(add=0), ctx), Fail(ctx=ctx), downstream], ctx, queue_size=queue_size,
                         on_output=lambda m: None)
    accepted = 0
    stopped = threading.Event()

    def producer():
        nonlocal accepted
        for m in items(100000):          # far more than all queues can hold
            if not runner.put(m):
                break
            accepted += 1
        stopped.set()

    t = threading.Thread(target=producer, daemon=True)
    t.start()
    assert stopped.wait(10), "producer blocked after the error"
    assert runner.put(Item(0)) is False          # returns at once, does not block
    runner.close()
    result = runner.wait(10)
    assert result.errors == ["[boom] ERROR: cannot handle value 5"]
    assert not result.ok
    assert accepted < 100000
    # downstream finished what had reached it before the error, and got nothing after it
    assert downstream.seen == [0, 1, 2, 3, 4]
    assert not downstream.flushed                 # no flush of a broken stream


def test_sync_error_and_other_exception_types():
    ctx = ChainContext()
    outs, result = run_chain([Crash(ctx=ctx), Recorder(ctx=ctx)], items(5), ctx, threads=False)
    assert outs == [] and result.errors == ["[crash] ERROR: ZeroDivisionError: division by zero"]
    assert result.stages[0].received == 1       # feeding stopped at the first failure


def test_error_in_flush_and_in_sink():
    class BadFlush(Recorder):
        name = "badflush"

        def flush(self):
            raise self.error("buffer incomplete")

    ctx = ChainContext()
    _, result = run_chain([BadFlush(ctx=ctx), Recorder(ctx=ctx)], items(3), ctx, timeout=10)
    assert result.errors == ["[badflush] ERROR: buffer incomplete"]

    def sink(msg):
        raise ConnectionResetError("client went away")

    runner = ChainRunner([Add(ctx=ctx)], ctx, on_output=sink)
    runner.put(Item(1))
    runner.close()
    result = runner.wait(10)
    assert result.errors == ["[output] ERROR: ConnectionResetError: client went away"]


def test_error_traceback_logged(caplog):
    ctx = ChainContext()
    with caplog.at_level("DEBUG", logger="torchgadgets"):
        run_chain([Crash(ctx=ctx)], items(1), ctx, timeout=10)
    assert "[crash] ERROR: ZeroDivisionError" in caplog.text
    assert any(r.exc_info and r.exc_info[0] is ZeroDivisionError for r in caplog.records)


def test_cancel_stops_a_running_chain():
    ctx = ChainContext()
    gate = Gate(ctx=ctx)
    runner = ChainRunner([Add(ctx=ctx), gate], ctx, queue_size=2, on_output=lambda m: None)
    for m in items(3):
        runner.put(m)
    assert ctx.stop_requested() is False
    runner.cancel("client vanished")
    assert ctx.stop_requested() is True
    assert runner.put(Item(9)) is False
    result = runner.wait(10)
    assert result.cancelled and not result.ok and result.errors == []


def test_wait_requires_close_or_cancel():
    ctx = ChainContext()
    runner = ChainRunner([Add(ctx=ctx)], ctx)
    with pytest.raises(RuntimeError, match="close"):
        runner.wait(1)
    runner.close()
    assert runner.wait(10).ok
    with pytest.raises(RuntimeError, match="after close"):
        runner.put(Item(1))


def test_progress_events_reach_the_sink(threads):
    events: list[tuple[str, int, str]] = []
    callers: set[str] = set()

    def sink(gadget: str, event: ProgressEvent) -> None:
        events.append((gadget, event.step, event.stage))
        callers.add(threading.current_thread().name)

    ctx = ChainContext(progress=sink, chain_name="p")
    outs, result = run_chain([Progress(ctx=ctx)], items(3, start=1), ctx, threads=threads, timeout=10)
    assert result.ok and len(outs) == 3
    assert events == [("progress", 1, "iter"), ("progress", 2, "iter"), ("progress", 3, "iter")]
    if threads:
        assert callers == {"p:0:progress"}      # reported from the stage's own thread


def test_context_manager_closes_and_cancels():
    ctx = ChainContext()
    got: list[int] = []
    with ChainRunner([Add(ctx=ctx)], ctx, on_output=lambda m: got.append(m.value)) as runner:
        runner.put(Item(1))
    assert got == [2] and runner.result().ok
    with pytest.raises(KeyError):
        with ChainRunner([Gate(ctx=ctx)], ctx) as runner:
            runner.put(Item(1))
            raise KeyError("caller failed")
    assert runner.result().cancelled
