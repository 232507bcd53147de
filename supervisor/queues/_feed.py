"""What every backend's feed does the same way: the consumer's side of the bookkeeping.

A feed holds batches in ``_ready`` (filled by a backend's producer task), hands them out
(``receive_nowait``, backend-specific: when to wake the producer differs), tracks the ones
in flight by ``seq -> attempt``, and buffers acks and failures for a committer task. This
base carries the parts that are the same for the embedded and the Redis feeds: waiting to
receive, giving a batch back, closing, waiting for the close, checking that a settled batch
really was in flight, what a failed attempt becomes (kept for the commit, retried next
unless it was the last), and waiting for the committer to catch up. The subclasses keep
their hot path (``receive_nowait``, ``ack``, ``fail``: their counters) and their I/O.
"""

from __future__ import annotations

from collections import deque

import anyio
import anyio.lowlevel
import msgspec

from supervisor.queues.base import AttemptRecord, Delivery, QueueError

__all__ = ["FeedBookkeeping"]

_record_encoder = msgspec.json.Encoder()


class FeedBookkeeping:
    """The consumer-side state and methods both feeds share (see the module docstring)."""

    __slots__ = (
        "_closed",
        "_closed_event",
        "_commit_done",
        "_committer_wakeup",
        "_failed",
        "_in_flight",
        "_job_id",
        "_max_attempts",
        "_n_buffered",
        "_n_committed",
        "_ready",
        "_receivers_wakeup",
        "_receiving",
        "_stopped",
    )

    def __init__(self, job_id: str, max_attempts: int) -> None:
        self._job_id = job_id
        self._max_attempts = max_attempts
        self._failed: list[tuple[int, int, bytes]] = []  # seq, attempt, encoded record: to commit
        self._ready: deque[Delivery] = deque()
        self._in_flight: dict[int, int] = {}  # seq -> attempt
        self._closed = False
        self._closed_event: anyio.Event | None = None  # created by the first wait_closed()
        self._receivers_wakeup: anyio.Event | None = None
        self._receiving = 0  # receive() calls waiting now (a consumer that asks and waits)
        self._n_buffered = 0  # acks and failures buffered so far ...
        self._n_committed = 0  # ... of which committed
        self._committer_wakeup: anyio.Event | None = None
        self._commit_done: anyio.Event | None = None
        self._stopped = False  # the committer has stopped: ack/fail are refused

    # -- what a subclass provides ---------------------------------------------------------

    def receive_nowait(self) -> Delivery | None:
        raise NotImplementedError

    def _wake_producer(self) -> None:
        """Wake the task that fills ``_ready`` (it sees ``_closed`` too)."""
        raise NotImplementedError

    def _hurry_committer(self) -> None:
        """End a group-commit window early (a backend without one does nothing)."""

    # -- shared ---------------------------------------------------------------------------

    async def receive(self) -> Delivery | None:
        """The next batch, or ``None`` when the job has no more work or the feed is closed."""
        await anyio.lowlevel.checkpoint()
        while True:
            try:
                return self.receive_nowait()
            except anyio.WouldBlock:
                pass
            wakeup = self._receivers_wakeup
            if wakeup is None:
                wakeup = self._receivers_wakeup = anyio.Event()
            self._receiving += 1
            try:
                await wakeup.wait()
            finally:
                self._receiving -= 1

    def release(self, d: Delivery) -> None:
        """Give ``d`` back without counting an attempt (its container was restarted under it):
        it is delivered again next, with the same attempt number."""
        self._resolve(d)
        self._ready.appendleft(d)
        self._wake_receivers()

    def close(self) -> None:
        """Stop: ``receive`` returns ``None`` from now on; unsent batches stay pending."""
        self._closed = True
        if self._closed_event is not None:
            self._closed_event.set()
        self._wake_receivers()
        self._wake_producer()

    async def wait_closed(self) -> None:
        """Return once :meth:`close` has been called."""
        if self._closed:
            await anyio.lowlevel.checkpoint()
            return
        if self._closed_event is None:
            self._closed_event = anyio.Event()
        await self._closed_event.wait()

    async def flush(self) -> None:
        """Wait until every ack and failure reported so far is committed."""
        target = self._n_buffered
        if self._n_committed >= target:
            await anyio.lowlevel.checkpoint()
            return
        while self._n_committed < target:
            if self._stopped:
                raise QueueError(f"the feed of job {self._job_id} stopped before committing.")
            done = self._commit_done
            if done is None:
                done = self._commit_done = anyio.Event()
            self._wake_committer()
            self._hurry_committer()
            await done.wait()

    def _resolve(self, d: Delivery) -> None:
        if self._stopped:
            raise QueueError(f"the feed of job {self._job_id} is no longer open.")
        attempt = self._in_flight.pop(d.seq, None)
        if attempt != d.attempt:
            if attempt is not None:
                self._in_flight[d.seq] = attempt
            raise QueueError(f"batch {d.seq} attempt {d.attempt} is not in flight.")

    def _fail_attempt(self, d: Delivery, record: AttemptRecord) -> bool:
        """``d``'s attempt failed: its record is kept for the commit and the batch is retried
        next, unless that was its last attempt (then True: it is dead)."""
        self._resolve(d)
        if record.attempt != d.attempt:
            record = msgspec.structs.replace(record, attempt=d.attempt)
        self._failed.append((d.seq, d.attempt, _record_encoder.encode(record)))
        if d.attempt < self._max_attempts:
            self._ready.append(Delivery(d.seq, d.body, d.attempt + 1))
            self._wake_receivers()
            return False
        return True

    def _wake_receivers(self) -> None:
        wakeup = self._receivers_wakeup
        if wakeup is not None:
            self._receivers_wakeup = None
            wakeup.set()

    def _wake_committer(self) -> None:
        wakeup = self._committer_wakeup
        if wakeup is not None:
            self._committer_wakeup = None
            wakeup.set()
