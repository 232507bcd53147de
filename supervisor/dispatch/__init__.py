"""Dispatch: pull batches from the feed, ``POST /`` them to a pod, ack or fail them (SPEC §2, §5).

* :func:`dispatch_pod` sends a job's batches to one pod from ``--concurrency`` in-flight slots,
  each with its own keep-alive connection and a request head built once; a batch is acked only
  on status 200. Two engines do it with the same rules: :mod:`.epoll` (one task, one epoll
  set; used where ``select.epoll`` exists) and :mod:`.slots` (one task per slot; anywhere).
* :mod:`.settle`: what happens to an attempt that did not get a 200 (a failed attempt with its
  evidence, or a release when the container was restarted under it).
* :func:`send_job_complete`: the job's one ``POST /on-job-complete``.
"""

from __future__ import annotations

import select
from typing import Literal

from supervisor.dispatch.epoll import dispatch_epoll
from supervisor.dispatch.job_complete import send_job_complete
from supervisor.dispatch.settle import Target
from supervisor.dispatch.slots import dispatch_slots
from supervisor.logs import Logger
from supervisor.queues.base import Feed

__all__ = ["ENGINES", "Engine", "Target", "dispatch_pod", "send_job_complete"]

Engine = Literal["epoll", "slots"]
ENGINES: tuple[Engine, ...] = ("epoll", "slots") if hasattr(select, "epoll") else ("slots",)


async def dispatch_pod(
    feed: Feed,
    pod: Target,
    *,
    job_id: str,
    concurrency: int = 1,
    batch_timeout: float | None = None,
    log: Logger,
    engine: Engine | None = None,
) -> None:
    """Send batches to ``pod`` from ``concurrency`` slots until the feed has no more work.

    ``engine`` picks the implementation (default: the first of :data:`ENGINES`).
    """
    headers = [("Content-Type", "application/json"), ("X-Cortex-Job-ID", job_id)]
    run = dispatch_epoll if (engine or ENGINES[0]) == "epoll" else dispatch_slots
    await run(
        feed,
        pod,
        headers=headers,
        concurrency=concurrency,
        batch_timeout=batch_timeout,
        log=log,
    )
