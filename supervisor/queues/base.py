"""The job queue interface shared by every backend (the user's view: docs/job-file.md,
"Attempts and dead letters"; docs/operations.md, "Resume and re-run" and "Dead letters").

A queue stores jobs (one :class:`JobRecord` each) and their batches. Producing is
:meth:`JobQueue.enqueue`; consuming goes through a :class:`Feed`, opened per job with
:meth:`JobQueue.open_feed`::

    async with queue.open_feed(job_id, max_attempts=3) as feed:
        while (d := await feed.receive()) is not None:
            ...  # POST d.body, then feed.ack(d, elapsed) or feed.fail(d, record)

Delivery is at-least-once: a batch received but neither acked nor failed when the process
dies is delivered again when the job is re-opened. A batch whose ack was committed (after
:meth:`Feed.flush`, or when the feed is left) is never delivered again. Each failed attempt
is persisted; when ``attempt == max_attempts`` fails, the batch is dead-lettered: kept with
each attempt's record (:meth:`JobQueue.dead_letters`; the embedded queue writes
``dead_letter_dir(job_id)/batch-<seq>.json``) and counted as ``dead``.

A *lost* delivery is one whose consumer died holding it (its pod was killed, its process
SIGKILLed): nobody acked or failed it. What happens next is :func:`after_lost_delivery`:
with ``count_lost`` (the job has a dead-letter setting, whose ``max_receive_count`` counts
receives as SQS does) the lost delivery is a failed attempt; without it the batch is
delivered again as the same attempt, up to :data:`LOST_DELIVERY_CAP` lost deliveries, after
which it is dead (a batch that kills every pod it reaches must not loop for ever). The
Redis queue applies this rule when it claims a batch whose lease ran out. The embedded queue
loses deliveries only with its own process, and a resume (a person re-running the command)
delivers them again uncounted, whatever ``count_lost`` says: the same rule without a
dead-letter setting, with the person as the cap.

A feed reads batches ahead of what its consumer takes. Where other processes consume the same
job (Redis), what one feed read ahead is kept from them, so that feed reads only for a
consumer that asks (:meth:`Feed.receive`, :meth:`Feed.receive_nowait`): nothing before the
first ask, and what it read and did not hand out goes back once a look (every third of the
lease) finds no ask since the one before: one to two thirds of the lease after the last ask.
A consumer that cannot send (its pod is not serving) therefore does not ask, and
releases (:meth:`Feed.release`) what it took and did not send.

The embedded backend (``embedded.py``, one SQLite file) implements this for one machine; the
Redis backend (``redis.py``) for many.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from contextlib import AbstractAsyncContextManager
from typing import Final, Protocol

import msgspec

from supervisor.errors import BadInput, SupervisorError
from supervisor.jobs import RUNNING

__all__ = [
    "LOST_DELIVERY_CAP",
    "RUNNING",
    "AttemptRecord",
    "DeadLetter",
    "Delivery",
    "Feed",
    "Heartbeat",
    "JobQueue",
    "JobRecord",
    "JobWatch",
    "LostDelivery",
    "Progress",
    "QueueConnectError",
    "QueueError",
    "QueueFullError",
    "after_lost_delivery",
    "dead_letter_name",
    "progress_of",
]


class QueueError(SupervisorError):
    """The queue was used wrongly (unknown job, a second feed, a stale delivery) or is broken."""


LOST_DELIVERY_CAP: Final = 3
"""Lost deliveries after which a batch fails for good when they are not counted as attempts.

Three: a pod dying under a batch for reasons of its own (a node drained, an eviction, an OOM
kill caused by something else) three times in a row is rare, so a healthy batch is not
given up; and a batch that kills every pod it reaches costs three pods and three leases
before it is dead-lettered, instead of taking the job's pods down one after the other for
ever."""


class LostDelivery(enum.Enum):
    """What becomes of a batch whose delivery was lost (:func:`after_lost_delivery`)."""

    NEXT_ATTEMPT = "next_attempt"  # the lost delivery was a failed attempt; deliver the next
    SAME_ATTEMPT = "same_attempt"  # not counted: deliver it again as the same attempt
    DEAD = "dead"  # failed for good: dead-letter it, with each lost delivery's record


def after_lost_delivery(
    attempt: int, lost: int, max_attempts: int, *, count_lost: bool
) -> LostDelivery:
    """The decision for a batch whose delivery as ``attempt`` was lost, ``lost`` being its
    lost deliveries so far, this one included (see the module docstring)."""
    if count_lost:
        return LostDelivery.NEXT_ATTEMPT if attempt < max_attempts else LostDelivery.DEAD
    return LostDelivery.SAME_ATTEMPT if lost < LOST_DELIVERY_CAP else LostDelivery.DEAD


class QueueFullError(QueueError):
    """The queue has no room for the job (Redis at its ``maxmemory`` refuses writes): one
    sentence; what the job had stored is deleted."""


class QueueConnectError(QueueError, BadInput):
    """The queue named by the configuration cannot be used (unreachable, wrong password):
    one sentence, exit code 2."""


class Delivery(msgspec.Struct, frozen=True, gc=False):
    """One batch handed to a consumer: ``seq`` counts from 0, ``attempt`` from 1."""

    seq: int
    body: bytes
    attempt: int


class AttemptRecord(msgspec.Struct, frozen=True, kw_only=True):
    """What happened on one failed attempt, as kept in a dead letter."""

    attempt: int
    status: int | None = None  # the HTTP status, if a response arrived
    error: str | None = None  # "connection reset", "timed out after 30s", ...
    response_head: str = ""  # first bytes of the response body, decoded with replacement
    stderr_tail: str = ""  # the tail of the port owner's stderr
    time: str = ""  # RFC3339


class DeadLetter(msgspec.Struct, frozen=True):
    """The content of ``batch-<seq>.json`` (``body`` is the batch JSON, byte for byte)."""

    job_id: str
    batch: int
    body: msgspec.Raw
    attempts: list[AttemptRecord]


class JobRecord(msgspec.Struct, kw_only=True):
    """A job as the queue stores it. ``spec_json`` is opaque to the queue."""

    job_id: str
    api_name: str
    digest: str  # identifies submission + API, to find a job to resume
    spec_json: bytes
    status: str
    created_time: str
    start_time: str | None = None
    end_time: str | None = None
    total_batches: int | None = None  # None until enqueueing has finished
    succeeded: int = 0
    dead: int = 0  # batches that failed for good
    failed_attempts: int = 0
    time_per_batch_sum: float = 0.0
    worker_counts: bytes | None = None  # JSON of the final worker_counts, once ended


class Heartbeat(msgspec.Struct, frozen=True):
    """A pod's last word on a shared job: its state (a ``PodState`` value), how many
    seconds ago it said so, and the lease it promised to speak again within."""

    pod_id: str
    state: str
    age: float
    lease: float


class Progress(msgspec.Struct, kw_only=True):
    """A job's counters; ``in_queue`` is what is neither resolved nor in flight."""

    total: int | None
    succeeded: int
    dead: int
    failed_attempts: int
    in_flight: int
    in_queue: int
    average_time_per_batch: float | None  # seconds, over succeeded batches


def progress_of(job: JobRecord, in_flight: int = 0) -> Progress:
    """A job's counters as stored, with ``in_flight`` batches (0 when no feed is open)."""
    total = job.total_batches
    return Progress(
        total=total,
        succeeded=job.succeeded,
        dead=job.dead,
        failed_attempts=job.failed_attempts,
        in_flight=in_flight,
        in_queue=0 if total is None else max(0, total - job.succeeded - job.dead - in_flight),
        average_time_per_batch=job.time_per_batch_sum / job.succeeded if job.succeeded else None,
    )


def dead_letter_name(seq: int) -> str:
    """The file name of batch ``seq``'s dead letter."""
    return f"batch-{seq}.json"


class Feed(Protocol):
    """The consuming side of one job (see the module docstring)."""

    async def receive(self) -> Delivery | None:
        """The next batch to send; ``None`` once the job has no more work or the feed is closed.

        "No more work" means every batch succeeded or is dead and nothing is in flight: while
        a batch is in flight, ``receive`` waits, because a failure may deliver it again.
        """
        ...

    def receive_nowait(self) -> Delivery | None:
        """:meth:`receive` without waiting, for the dispatch hot path: raises
        ``anyio.WouldBlock`` when no batch is ready yet but more may come."""
        ...

    def ack(self, d: Delivery, elapsed: float) -> None:
        """``d`` succeeded after ``elapsed`` seconds (buffered; durable after :meth:`flush`)."""
        ...

    def fail(self, d: Delivery, record: AttemptRecord) -> None:
        """``d``'s attempt failed: deliver it again later, or dead-letter it after the last."""
        ...

    def release(self, d: Delivery) -> None:
        """Give ``d`` back uncounted (its worker was restarted under it); it comes next."""
        ...

    def close(self) -> None:
        """Stop: every :meth:`receive` returns ``None`` from now on; pending batches stay."""
        ...

    async def wait_closed(self) -> None:
        """Return once :meth:`close` has been called (a consumer holding a batch for a pod
        that is not ready gives it back then, instead of waiting for readiness forever)."""
        ...

    def progress(self) -> Progress:
        """The job's counters now, from memory."""
        ...

    async def flush(self) -> None:
        """Wait until every ack and failure reported so far is durable; then
        :meth:`progress` counts every batch the job's consumers settled, this one's and (on
        a shared queue) the other pods'."""
        ...


class JobWatch(Protocol):
    """Wakes an idle worker when a job of its API may have become joinable
    (:meth:`JobQueue.watch_jobs`)."""

    async def wait(self, timeout: float) -> bool:  # noqa: ASYNC109 - see JobWatch.wait
        """``True`` as soon as a job of the API may have become joinable -- it started
        running, or a pod left it -- since the watch was opened or since the last ``wait``
        that returned ``True`` (so nothing that happens between two waits is missed);
        ``False`` after ``timeout`` seconds without one. A hint, not a promise: the job may
        be full again by the time the caller looks, and a place freed by a pod that went
        silent is not announced (a caller looks again after ``timeout``).

        ``timeout`` rather than the caller's cancel scope: Redis blocks for it
        (``XREAD BLOCK``), and a blocking read cut by a cancellation costs its connection."""
        ...


class JobQueue(Protocol):
    """Jobs and their batches. Closed with :meth:`aclose` (or ``async with``)."""

    async def create_job(
        self, job_id: str, api_name: str, digest: str, spec_json: bytes, created_time: str
    ) -> None:
        """Store a new job with status ``enqueuing`` and no batches."""
        ...

    async def enqueue(self, job_id: str, batches: Iterator[bytes], *, chunk: int = 2048) -> int:
        """Store ``batches`` (seq 0, 1, ...) and return how many; all or nothing.

        If ``batches`` raises, the job and everything enqueued for it are deleted and the
        error propagates. Batches already stored for the job are replaced.
        """
        ...

    async def enqueue_in_progress(self, job_id: str) -> bool:
        """Whether a live process is creating or enqueuing the job now: a job found
        ``enqueuing`` without one was abandoned (its submitter died)."""
        ...

    async def set_status(
        self,
        job_id: str,
        status: str,
        *,
        start_time: str | None = None,
        end_time: str | None = None,
        worker_counts: bytes | None = None,
    ) -> bool:
        """Set the job's status (and the times and final worker counts that are given).

        ``start_time`` is kept only if the job has none yet: the job started when its first
        pod did, and later pods joining it do not move that. A job that was not running and
        now is wakes the :meth:`watch_jobs` watchers of its API. An end state is final:
        a job that has ended is left as it is and the call returns False (a pod that
        joined just before the job was stopped or completed must not make it run again).
        """
        ...

    async def get_job(self, job_id: str) -> JobRecord | None:
        """The job, or ``None``."""
        ...

    async def list_jobs(self, api_name: str | None = None) -> list[JobRecord]:
        """Jobs (of one API, or all), newest first."""
        ...

    async def running_jobs(self, api_name: str) -> list[JobRecord]:
        """The jobs of ``api_name`` whose status is ``running``, in :meth:`list_jobs`'s order;
        read without looking at the other jobs (an idle worker asks every few seconds)."""
        ...

    async def find_latest(self, api_name: str, digest: str) -> JobRecord | None:
        """The newest job with this digest (the same command), in any state."""
        ...

    async def delete_job(self, job_id: str) -> None:
        """Forget the job and its batches (dead-letter files stay)."""
        ...

    async def progress(self, job_id: str) -> Progress:
        """The job's counters (live while a feed is open)."""
        ...

    @property
    def url(self) -> str:
        """Where the queue is: ``sqlite://<file>``, or the Redis URL without its password."""
        ...

    async def dead_letters(self, job_id: str) -> list[DeadLetter]:
        """The job's dead letters, by batch number."""
        ...

    def open_feed(
        self, job_id: str, *, max_attempts: int, count_lost: bool = True, buffer: int = 1024
    ) -> AbstractAsyncContextManager[Feed]:
        """Consume the job's batches; leaving it commits everything acked or failed.

        ``count_lost``: a lost delivery counts as a failed attempt (the job has a dead-letter
        setting); else it is delivered again uncounted, up to :data:`LOST_DELIVERY_CAP`
        times (:func:`after_lost_delivery`).
        """
        ...

    def completion(self, job_id: str) -> AbstractAsyncContextManager[bool]:
        """Claim the job's one ``/on-job-complete``: ``True`` for the one caller that is to
        send it (the job enqueued, nothing pending or in flight, not claimed before);
        leaving the block normally marks it sent for good, with an error releases it."""
        ...

    # -- pods sharing a job (``supervisor worker``) -------------------------------------------

    async def try_join(self, job_id: str, pod_id: str, workers: int, lease: float) -> bool:
        """Admit ``pod_id`` to the job if fewer than ``workers`` other pods are live
        (:func:`supervisor.lifecycle.may_join`), atomically; an admitted pod counts as
        ``creating`` with ``lease`` until its first :meth:`heartbeat`."""
        ...

    async def watch_jobs(self, api_name: str) -> JobWatch:
        """Start watching for jobs of ``api_name`` that may have become joinable: open it
        before the first look at :meth:`running_jobs`, then :meth:`JobWatch.wait` between
        looks."""
        ...

    async def heartbeat(self, job_id: str, pod_id: str, state: str, lease: float) -> None:
        """``pod_id`` is in ``state`` and promises its next heartbeat within ``lease``."""
        ...

    async def leave(self, job_id: str, pod_id: str) -> None:
        """``pod_id`` no longer works on the job (its place is free at once, and the job's
        watchers are woken)."""
        ...

    async def pods(self, job_id: str) -> list[Heartbeat]:
        """The last heartbeat of each pod heard from recently (gone ones left out)."""
        ...

    async def aclose(self) -> None:
        """Release the queue's resources."""
        ...
