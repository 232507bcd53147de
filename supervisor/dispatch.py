"""Dispatch: pull a batch from the feed, ``POST /`` it to the pod, ack or fail it (SPEC §2, §5).

The hot path is one loop per in-flight slot (``--concurrency K`` per pod), each with its own
keep-alive connection and a pre-built request head; no task is spawned per batch and nothing
is JSON-encoded per batch. A batch is acked only on status 200. Any other status, a network
error or the per-batch timeout is a failed attempt, recorded with the status, the head of the
response body and the tail of the port owner's stderr, unless the container was restarted by
its liveness probe while the batch was in flight: then the batch is released for another try
without counting an attempt (SPEC §3 Liveness).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import anyio

from supervisor.http.client import BatchClient, request
from supervisor.http.errors import HTTPError
from supervisor.jobs import rfc3339
from supervisor.logs import Logger
from supervisor.pod import Pod
from supervisor.queues.base import AttemptRecord, Feed

__all__ = ["dispatch_pod", "send_job_complete"]

_BODY_HEAD = 1024
_ON_COMPLETE_TIMEOUT = 60.0  # seconds for the worker to handle /on-job-complete
_STDERR_SETTLE = 0.02  # seconds, on the failure path only


async def dispatch_pod(
    feed: Feed,
    pod: Pod,
    *,
    job_id: str,
    concurrency: int = 1,
    batch_timeout: float | None = None,
    log: Logger,
) -> None:
    """Send batches to ``pod`` from ``concurrency`` slots until the feed has no more work."""
    async with anyio.create_task_group() as tg:
        for slot in range(concurrency):
            tg.start_soon(_slot, feed, pod, job_id, batch_timeout, log.bind(slot=slot))


async def _slot(
    feed: Feed, pod: Pod, job_id: str, batch_timeout: float | None, log: Logger
) -> None:
    client = BatchClient(
        "127.0.0.1",
        pod.port,
        headers=[("Content-Type", "application/json"), ("X-Cortex-Job-ID", job_id)],
    )
    perf = time.perf_counter
    try:
        while True:
            d = await feed.receive()
            if d is None:
                return
            if not pod.serving:
                await pod.wait_serving()
            generation = pod.generation
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
                head = r.body_head[:_BODY_HEAD]
            if pod.generation != generation:
                log.info("batch_released", batch=d.seq, reason="container restarted")
                feed.release(d)
                continue
            # A worker usually logs the reason just before it answers; give our relay of its
            # stderr pipe a moment to read that line so the tail we keep includes it.
            await anyio.sleep(_STDERR_SETTLE)
            record = AttemptRecord(
                attempt=d.attempt,
                status=status,
                error=error,
                response_head=head.decode("utf-8", "replace"),
                stderr_tail=pod.owner_stderr_tail(),
                time=rfc3339(),
            )
            log.warning("batch_failed", batch=d.seq, attempt=d.attempt, status=status, error=error)
            feed.fail(d, record)
    finally:
        with anyio.CancelScope(shield=True):
            await client.aclose()


async def send_job_complete(
    port: int,
    *,
    job_id: str,
    succeeded: int,
    failed: int,
    log: Logger,
) -> bool:
    """The one ``POST /on-job-complete`` of a job; 404 counts as handled. True if handled."""
    headers: Sequence[tuple[str, str]] = (
        ("Content-Type", "application/json"),
        ("X-Cortex-Job-ID", job_id),
        ("X-Cortex-Batches-Succeeded", str(succeeded)),
        ("X-Cortex-Batches-Failed", str(failed)),
    )
    try:
        r = await request(
            "127.0.0.1",
            port,
            "POST",
            "/on-job-complete",
            headers=headers,
            body=b'{"message":"job_complete"}',
            timeout=_ON_COMPLETE_TIMEOUT,
        )
    except (HTTPError, TimeoutError, OSError) as e:
        log.warning("on_job_complete_failed", port=port, error=str(e))
        return False
    handled = 200 <= r.status < 300 or r.status == 404
    level = log.info if handled else log.warning
    level("on_job_complete", port=port, status=r.status)
    return handled
