"""What both dispatch engines do with a batch whose attempt did not end in ``200``.

A failed attempt (any other status, a network error, the per-batch timeout) is recorded with
the status, the head of the response body and the tail of the port owner's stderr, unless the
container was restarted by its liveness probe while the batch was in flight: then the batch is
released for another try without counting an attempt (SPEC §3 Liveness).
"""

from __future__ import annotations

from typing import Protocol

import anyio

from supervisor.jobs import rfc3339
from supervisor.logs import Logger
from supervisor.queues.base import AttemptRecord, Delivery, Feed

__all__ = ["BODY_HEAD", "Target", "settle_failure"]

BODY_HEAD = 1024  # bytes of a failed response's body kept in its attempt record
_STDERR_SETTLE = 0.02  # seconds, on the failure path only


class Target(Protocol):
    """What dispatch needs of a pod (:class:`supervisor.pod.Pod` is one)."""

    @property
    def port(self) -> int:
        """The port batches are posted to."""
        ...

    @property
    def serving(self) -> bool:
        """Whether batches may be sent now (ready, port owned)."""
        ...

    @property
    def generation(self) -> int:
        """Bumped whenever a container is restarted."""
        ...

    async def wait_serving(self, value: bool = True) -> None:
        """Wait until :attr:`serving` is ``value``."""
        ...

    def owner_stderr_tail(self, limit: int = 2048) -> str:
        """The last lines the port owner wrote to stderr."""
        ...


async def settle_failure(
    feed: Feed,
    target: Target,
    d: Delivery,
    *,
    generation: int,
    status: int | None,
    error: str | None,
    head: bytes,
    log: Logger,
) -> None:
    """Release ``d`` (its container restarted since ``generation``) or record a failed attempt."""
    if target.generation != generation:
        log.info("batch_released", batch=d.seq, reason="container restarted")
        feed.release(d)
        return
    # A worker usually logs the reason just before it answers; give our relay of its stderr
    # pipe a moment to read that line so the tail we keep includes it.
    await anyio.sleep(_STDERR_SETTLE)
    record = AttemptRecord(
        attempt=d.attempt,
        status=status,
        error=error,
        response_head=head[:BODY_HEAD].decode("utf-8", "replace"),
        stderr_tail=target.owner_stderr_tail(),
        time=rfc3339(),
    )
    log.warning("batch_failed", batch=d.seq, attempt=d.attempt, status=status, error=error)
    feed.fail(d, record)
