"""How ``supervisor run`` shows progress: a bar on a TTY, JSON lines otherwise (docs/operations.md).

Both go to stderr; stdout is reserved for the final status JSON. The rendering is a pure
function of a :class:`~supervisor.queues.base.Progress` snapshot and the elapsed time, so it is
tested without a terminal.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import IO

import anyio

from supervisor.logs import Logger
from supervisor.queues.base import Progress

__all__ = ["ProgressReporter", "format_bar", "format_duration"]


def format_duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "--:--"
    s = int(seconds + 0.5)
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def format_bar(p: Progress, rate: float, width: int = 30, waiting: str | None = None) -> str:
    """``[#####.....] 1200/5000 done, 3 failed  410.2/s  ETA 00:09``, and ``  waiting: <why>``
    while no pod is ready."""
    total = p.total or 0
    finished = p.succeeded + p.dead
    frac = min(finished / total, 1.0) if total else 1.0
    fill = int(frac * width)
    remaining = max(total - finished, 0)
    eta = remaining / rate if rate > 0 else None
    line = (
        f"[{'#' * fill}{'.' * (width - fill)}] {p.succeeded}/{total} done, "
        f"{p.dead} failed  {rate:,.1f}/s  ETA {format_duration(eta)}"
    )
    return line if waiting is None else f"{line}  waiting: {waiting}"


class ProgressReporter:
    """Samples ``snapshot()`` and reports it until cancelled; ``final()`` prints the last line."""

    def __init__(
        self,
        snapshot: Callable[[], Progress],
        *,
        stream: IO[str],
        tty: bool,
        log: Logger,
        interval: float | None = None,
        waiting: Callable[[], str | None] | None = None,
    ) -> None:
        self._snapshot = snapshot
        self._waiting = waiting
        self._stream = stream
        self._tty = tty
        self._log = log
        self._interval = interval if interval is not None else (0.2 if tty else 2.0)
        self._start = time.monotonic()
        self._window: list[tuple[float, int]] = []

    def _rate(self, now: float, finished: int) -> float:
        """Batches per second over the last ~10 s (a moving window, so the ETA adapts)."""
        self._window.append((now, finished))
        while len(self._window) > 2 and now - self._window[0][0] > 10.0:
            self._window.pop(0)
        t0, f0 = self._window[0]
        if now - t0 <= 0:
            elapsed = now - self._start
            return finished / elapsed if elapsed > 0 else 0.0
        return (finished - f0) / (now - t0)

    def report(self) -> None:
        p = self._snapshot()
        now = time.monotonic()
        rate = self._rate(now, p.succeeded + p.dead)
        waiting = self._waiting() if self._waiting is not None else None
        if self._tty:
            try:
                self._stream.write("\r\x1b[K" + format_bar(p, rate, waiting=waiting))
                self._stream.flush()
            except (OSError, ValueError):
                pass
        else:
            finished = p.succeeded + p.dead
            remaining = max((p.total or 0) - finished, 0)
            self._log.info(
                "progress",
                total=p.total,
                succeeded=p.succeeded,
                failed=p.dead,
                failed_attempts=p.failed_attempts,
                in_flight=p.in_flight,
                rate=round(rate, 2),
                eta_seconds=round(remaining / rate, 1) if rate > 0 else None,
                **({} if waiting is None else {"waiting": waiting}),
            )

    def final(self) -> None:
        self.report()
        if self._tty:
            try:
                self._stream.write("\n")
                self._stream.flush()
            except (OSError, ValueError):
                pass

    async def run(self) -> None:
        while True:
            await anyio.sleep(self._interval)
            self.report()
