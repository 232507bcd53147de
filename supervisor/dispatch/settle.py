"""What becomes of a batch attempt: :func:`attempt_fate` decides, :func:`settle_failure` does.

An attempt that ended in ``200`` is acked. A failed attempt (any other status, a network error, the per-batch timeout) is recorded with
the status, the head of the response body and the tail of the port owner's stderr, unless the
container was restarted by its liveness probe while the batch was in flight: then the batch is
released for another try without counting an attempt. Whether a failed attempt is retried or
dead-lettered is the feed's decision (``Feed.fail``: ``max_attempts``).
"""

from __future__ import annotations

import enum
from typing import Protocol

from supervisor.jobs import rfc3339
from supervisor.logs import Logger
from supervisor.queues.base import AttemptRecord, Delivery, Feed

__all__ = ["BODY_HEAD", "Fate", "Target", "attempt_fate", "settle_failure"]

BODY_HEAD = 1024  # bytes of a failed response's body kept in its attempt record


class Fate(enum.Enum):
    """What becomes of one attempt to deliver a batch."""

    ACK = "ACK"  # the worker answered 200: the batch is done
    FAIL = "FAIL"  # a failed attempt, counted: the feed retries it or dead-letters it
    RELEASE = "RELEASE"  # the container restarted under it: another try, not counted

    def __repr__(self) -> str:
        return self.value


def attempt_fate(status: int | None, *, generation: int, generation_now: int) -> Fate:
    """The fate of an attempt that ended with ``status`` (``None``: no response -- a network
    error or the batch timeout), sent while the pod's containers were at ``generation`` and
    settled at ``generation_now`` (a restart bumps it)."""
    if status == 200:
        return Fate.ACK
    if generation_now != generation:
        return Fate.RELEASE
    return Fate.FAIL


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
    fate = attempt_fate(status, generation=generation, generation_now=target.generation)
    assert fate is not Fate.ACK, "a 200 is acked, not settled"
    if fate is Fate.RELEASE:
        log.info("batch_released", batch=d.seq, reason="container restarted")
        feed.release(d)
        return
    # A worker usually logs the reason just before it answers: the line is in the stderr
    # pipe by now, and owner_stderr_tail() reads what the pipe holds before it answers.
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
