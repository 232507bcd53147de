"""Waking idle workers on the embedded queue: :class:`EmbeddedJobWatch` (see ``embedded.py``
for the queue).

One process uses the queue file, so there is nothing to watch outside it: the queue itself
announces, in memory, each time a job of an API may have become joinable (a job started
running, a pod left a running one) on its :class:`Joinable`, and a watch waits for an
announcement of its API after the last one it has seen.
"""

from __future__ import annotations

import anyio
import anyio.lowlevel

__all__ = ["EmbeddedJobWatch", "Joinable"]


class Joinable:
    """In-process announcements that a job of an API may have become joinable: a count per
    API, and an event set (then replaced) at each one."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}
        self._changed = anyio.Event()

    def announce(self, api_name: str) -> None:
        self._counts[api_name] = self._counts.get(api_name, 0) + 1
        changed, self._changed = self._changed, anyio.Event()
        changed.set()

    def count(self, api_name: str) -> int:
        return self._counts.get(api_name, 0)

    async def changed(self) -> None:
        await self._changed.wait()


class EmbeddedJobWatch:
    """The :class:`~supervisor.queues.base.JobWatch` of the embedded queue (in memory). Made
    by :meth:`~supervisor.queues.embedded.EmbeddedQueue.watch_jobs`."""

    def __init__(self, joinable: Joinable, api_name: str) -> None:
        self._joinable = joinable
        self._api = api_name
        self._seen = joinable.count(api_name)

    async def wait(self, timeout: float) -> bool:  # noqa: ASYNC109 - see JobWatch.wait
        """``True`` once the API had an announcement since the last seen; else ``False``
        after ``timeout``."""
        await anyio.lowlevel.checkpoint()
        with anyio.move_on_after(timeout):
            while (count := self._joinable.count(self._api)) == self._seen:
                await self._joinable.changed()
            self._seen = count
            return True
        return False
