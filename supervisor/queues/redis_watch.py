"""Waking idle workers on the Redis queue: :class:`RedisJobWatch` (see ``redis.py`` for the
queue).

The script that sets a status, when a job starts running, and the one that lets a pod leave
a running job, add an entry (its API and job) to one small capped stream
(``_redis_scripts.JOINABLE``), in the same atomic step. An idle worker blocks on it
(``XREAD BLOCK`` from the last entry id it has seen, on a connection of the client's pool
that the blocking read holds alone) and looks for a job as soon as an entry of its API
arrives. A stream rather than a list: every idle worker reads every entry (a ``BLPOP``
hands each one to one waiter only), and reading from the last id seen misses nothing that
arrived while the worker was looking. The wait has a timeout, after which the worker looks
anyway: a place freed by a pod that went silent is not announced, and an entry missed
(Redis restarted without it) costs no more than the old poll.
"""

from __future__ import annotations

from typing import Any

import anyio
import anyio.lowlevel
import coredis

from supervisor.logs import Logger
from supervisor.queues import _redis_scripts as S
from supervisor.queues.redis_feed import TRANSIENT, _Backoff

__all__ = ["WATCH_COUNT", "WATCH_SLACK", "RedisJobWatch"]

WATCH_COUNT = 64  # joinable entries read per XREAD
WATCH_SLACK = 2.0  # seconds a blocking read may overrun its own timeout before it is cut


class RedisJobWatch:
    """The :class:`~supervisor.queues.base.JobWatch` on Redis: ``XREAD BLOCK`` on the joinable
    stream from the last entry id seen (see the module docstring). Made by
    :meth:`~supervisor.queues.redis.RedisQueue.watch_jobs`."""

    def __init__(self, client: coredis.Redis[bytes], api_name: str, last: bytes, log: Logger):
        self._client = client
        self._api = api_name.encode()
        self._last = last
        self._backoff = _Backoff(log, "waiting for jobs")

    async def wait(self, timeout: float) -> bool:  # noqa: ASYNC109 - see JobWatch.wait
        """``True`` once an entry of the API is in the stream after the last one seen;
        ``False`` after ``timeout`` (Redis away: retried with backoff until then)."""
        deadline = anyio.current_time() + timeout
        while (left := deadline - anyio.current_time()) > 0:
            if await self._read(left):
                return True
        await anyio.lowlevel.checkpoint()
        return False

    async def _read(self, left: float) -> bool:
        """One blocking read of at most ``left`` seconds: whether an entry of the API came."""
        reply: Any = None
        try:
            # A read that Redis never answers (a network cut) is cut here; coredis then drops
            # the connection it held.
            with anyio.move_on_after(left + WATCH_SLACK):
                reply = await self._client.xread(
                    {S.JOINABLE: self._last}, count=WATCH_COUNT, block=max(1, int(left * 1000))
                )
        except TRANSIENT as e:
            with anyio.move_on_after(left):
                await self._backoff.failed(e)
            return False
        self._backoff.succeeded()
        if not reply:
            return False
        entries = next(iter(reply.values()))
        self._last = S.as_bytes(entries[-1].identifier)
        return any(S.as_bytes(e.field_values.get(b"api", b"")) == self._api for e in entries)
