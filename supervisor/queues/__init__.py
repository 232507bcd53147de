"""Job queues: one interface (:mod:`supervisor.queues.base`), two backends.

:func:`open_queue` chooses the backend from the queue's URL: a file path (or
``sqlite://<path>``) is the embedded queue, ``redis://`` or ``rediss://`` the Redis one. The
rest of the supervisor only sees :class:`~supervisor.queues.base.JobQueue`.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from supervisor.logs import Logger
from supervisor.queues.base import JobQueue, QueueConnectError

__all__ = ["is_redis_url", "open_queue"]


def is_redis_url(url: str | os.PathLike[str]) -> bool:
    """Whether ``url`` names a Redis queue (``redis://`` or ``rediss://``)."""
    return isinstance(url, str) and url.startswith(("redis://", "rediss://"))


@asynccontextmanager
async def open_queue(
    url_or_path: str | os.PathLike[str],
    *,
    log: Logger | None = None,
    lease: float | None = None,
    dead_letter_root: str | os.PathLike[str] | None = None,
) -> AsyncIterator[JobQueue]:
    """Open the queue at ``url_or_path`` for the block: the embedded queue for a path (or
    ``sqlite://<path>``), the Redis queue for ``redis://`` / ``rediss://`` (``lease``: how
    long a batch stays with a consumer that stopped renewing it). ``dead_letter_root`` is
    the embedded queue's folder of dead-letter files."""
    if is_redis_url(url_or_path):
        try:
            from supervisor.queues.redis import LEASE, RedisQueue
        except ImportError as e:  # coredis is the `redis` extra
            raise QueueConnectError(
                f"the Redis queue needs coredis (pip install 'cortex-batch-supervisor[redis]'): {e}"
            ) from None
        async with RedisQueue.open(
            str(url_or_path), lease=LEASE if lease is None else lease, log=log
        ) as queue:
            yield queue
        return
    from supervisor.queues.embedded import EmbeddedQueue

    path = os.fspath(url_or_path)
    if path.startswith("sqlite://"):
        path = path.removeprefix("sqlite://")
    elif "://" in path:
        raise QueueConnectError(
            f"the queue {path} is neither a file nor a redis:// or rediss:// URL."
        )
    async with await EmbeddedQueue.open(path, dead_letter_root=dead_letter_root) as embedded:
        yield embedded
