"""The portable dispatch engine: one task per in-flight slot, each with its own
:class:`~supervisor.http.client.BatchClient` (a keep-alive connection and a pre-built request
head). Runs wherever anyio does; :mod:`supervisor.dispatch.epoll` is the faster engine used
where ``select.epoll`` exists. No task is spawned per batch and nothing is JSON-encoded per
batch. A batch is acked only on status 200; see :mod:`supervisor.dispatch.settle` for the rest.
"""

from __future__ import annotations

import time

import anyio

from supervisor.dispatch.settle import Target, settle_failure
from supervisor.http.client import BatchClient
from supervisor.http.errors import HTTPError
from supervisor.logs import Logger
from supervisor.queues.base import Feed

__all__ = ["dispatch_slots"]


async def dispatch_slots(
    feed: Feed,
    target: Target,
    *,
    headers: list[tuple[str, str]],
    concurrency: int,
    batch_timeout: float | None,
    log: Logger,
) -> None:
    """Send batches to ``target`` from ``concurrency`` slots until the feed has no more work."""
    async with anyio.create_task_group() as tg:
        for slot in range(concurrency):
            tg.start_soon(_slot, feed, target, headers, batch_timeout, log.bind(slot=slot))


async def _slot(
    feed: Feed,
    target: Target,
    headers: list[tuple[str, str]],
    batch_timeout: float | None,
    log: Logger,
) -> None:
    client = BatchClient("127.0.0.1", target.port, headers=headers)
    perf = time.perf_counter
    try:
        while True:
            d = await feed.receive()
            if d is None:
                return
            if not target.serving and not await _wait_serving_or_closed(feed, target):
                feed.release(d)  # the feed was closed while the pod was not ready
                return
            generation = target.generation
            t0 = perf()
            status: int | None = None
            error: str | None = None
            head = b""
            try:
                if batch_timeout is None:
                    r = await client.post(d.body)
                else:
                    with anyio.fail_after(batch_timeout):
                        r = await client.post(d.body)
            except TimeoutError:
                # post() drops a connection whose exchange was interrupted; the next one is fresh.
                error = f"timed out after {batch_timeout:g}s"
            except HTTPError as e:
                error = str(e)
            else:
                if r.status == 200:
                    feed.ack(d, perf() - t0)
                    continue
                status = r.status
                head = r.body_head
            await settle_failure(
                feed,
                target,
                d,
                generation=generation,
                status=status,
                error=error,
                head=head,
                log=log,
            )
    finally:
        with anyio.CancelScope(shield=True):
            await client.aclose()


async def _wait_serving_or_closed(feed: Feed, target: Target) -> bool:
    """Wait until ``target`` serves (True) or the feed is closed (False)."""
    serving = False
    async with anyio.create_task_group() as tg:

        async def wait_serving() -> None:
            nonlocal serving
            await target.wait_serving()
            serving = True
            tg.cancel_scope.cancel()

        async def wait_closed() -> None:
            await feed.wait_closed()
            tg.cancel_scope.cancel()

        tg.start_soon(wait_serving)
        tg.start_soon(wait_closed)
    return serving
