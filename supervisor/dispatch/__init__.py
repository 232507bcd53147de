"""Dispatch: pull batches from the feed, ``POST /`` them to a pod, ack or fail them.

* :func:`dispatch_pod` sends a job's batches to one pod from ``--concurrency`` in-flight slots,
  each with its own keep-alive connection and a request head built once; a batch is acked only
  on status 200. The engine is :mod:`.epoll` (one task, one epoll set; Linux).
* :mod:`.settle`: what happens to an attempt that did not get a 200 (a failed attempt with its
  evidence, or a release when the container was restarted under it).
* :func:`send_job_complete`: the job's one ``POST /on-job-complete``.
"""

from __future__ import annotations

from supervisor.dispatch.epoll import dispatch_epoll
from supervisor.dispatch.job_complete import send_job_complete
from supervisor.dispatch.settle import Target
from supervisor.logs import Logger
from supervisor.queues.base import Feed

__all__ = ["Target", "dispatch_pod", "send_job_complete"]


async def dispatch_pod(
    feed: Feed,
    pod: Target,
    *,
    job_id: str,
    concurrency: int = 1,
    batch_timeout: float | None = None,
    log: Logger,
) -> None:
    """Send batches to ``pod`` from ``concurrency`` slots until the feed has no more work."""
    headers = [("Content-Type", "application/json"), ("X-Cortex-Job-ID", job_id)]
    await dispatch_epoll(
        feed,
        pod,
        headers=headers,
        concurrency=concurrency,
        batch_timeout=batch_timeout,
        log=log,
    )
