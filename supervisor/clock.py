"""Time, injected: what probes and pods wait on, so their tests replay events on a manual clock.

:class:`Clock` is the little the lifecycle code needs of time: ``now()`` and
``sleep_until()``. :data:`REAL` is anyio's clock. :class:`ManualClock` is a clock that moves
only when told (``advance``): every sleeper whose deadline has come wakes, in deadline order,
and ``advance`` returns once each has run up to its next wait. Tests use it to replay a probe's
history (initial delay, periods, thresholds) or a pod's restart backoff in microseconds, the
way honcho injects its clock and trio's tests use ``MockClock``.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Protocol

import anyio
import anyio.lowlevel

__all__ = ["REAL", "AnyioClock", "Clock", "ManualClock"]


class Clock(Protocol):
    def now(self) -> float:
        """Seconds on a monotonic scale."""
        ...

    async def sleep_until(self, deadline: float) -> None:
        """Return once ``now() >= deadline``."""
        ...


class AnyioClock:
    """The event loop's own clock."""

    def now(self) -> float:
        return anyio.current_time()

    async def sleep_until(self, deadline: float) -> None:
        await anyio.sleep_until(deadline)


REAL = AnyioClock()


class ManualClock:
    """A clock for tests: time stands still until :meth:`advance` moves it."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        self._sleepers: list[tuple[float, int, anyio.Event]] = []
        self._order = itertools.count()

    def now(self) -> float:
        return self._now

    async def sleep_until(self, deadline: float) -> None:
        if deadline <= self._now:
            await anyio.lowlevel.checkpoint()
            return
        woken = anyio.Event()
        heapq.heappush(self._sleepers, (deadline, next(self._order), woken))
        await woken.wait()

    async def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds``, waking every sleeper due on the way, each at its
        own deadline, and let the woken tasks run until they block again."""
        target = self._now + seconds
        await anyio.wait_all_tasks_blocked()
        while self._sleepers and self._sleepers[0][0] <= target:
            deadline, _, woken = heapq.heappop(self._sleepers)
            self._now = max(self._now, deadline)
            woken.set()
            await anyio.wait_all_tasks_blocked()
        self._now = target
