"""Progress display for long reconstructions: a bar on a terminal, periodic log lines otherwise."""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import TextIO

from recon_core.methods.base import ProgressEvent


class TerminalProgress:
    """A progress sink ``(gadget, event) -> None`` for :class:`~gadgets.base.ChainContext`.

    On a TTY it redraws one line per (gadget, method, stage); elsewhere (CI logs, servers) it writes
    a log line at most every ``interval_s`` seconds and at the end of each stage.
    """

    def __init__(self, stream: TextIO | None = None, width: int = 28, interval_s: float = 5.0,
                 logger: logging.Logger | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.width = width
        self.interval_s = interval_s
        self.logger = logger
        self._lock = threading.Lock()
        self._last: dict[tuple[str, str, str], float] = {}
        self._open_line = False

    def __call__(self, gadget: str, event: ProgressEvent) -> None:
        key = (gadget, event.method, event.stage)
        done = event.total > 0 and event.step >= event.total
        metrics = " ".join(f"{k}={v:.3g}" for k, v in event.metrics.items())
        frac = min(max(event.step / event.total, 0.0), 1.0) if event.total > 0 else 0.0
        with self._lock:
            if self.tty:
                filled = int(round(frac * self.width))
                bar = "█" * filled + "░" * (self.width - filled)
                line = (f"\r[{gadget}:{event.method}] {event.stage:<8} {bar} {event.step}/{event.total} "
                        f"{event.elapsed_s:6.1f}s {metrics}")
                self.stream.write(line[:160].ljust(100))
                self._open_line = not done
                if done:
                    self.stream.write("\n")
                self.stream.flush()
                return
            now = time.monotonic()
            if done or now - self._last.get(key, 0.0) >= self.interval_s:
                self._last[key] = now
                text = (f"[{gadget}:{event.method}] {event.stage} {event.step}/{event.total} "
                        f"({100 * frac:.0f}%) {event.elapsed_s:.1f}s {metrics}")
                if self.logger is not None:
                    self.logger.info(text)
                else:
                    self.stream.write(text + "\n")
                    self.stream.flush()

    def close(self) -> None:
        with self._lock:
            if self.tty and self._open_line:
                self.stream.write("\n")
                self.stream.flush()
                self._open_line = False
