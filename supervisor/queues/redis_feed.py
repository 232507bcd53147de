"""The dispatch side of the Redis queue: :class:`RedisFeed` (see ``redis.py``).

Reading on demand
-----------------
A batch a feed has read is its consumer's in Redis (pending, its lease renewed) even before
it is handed out, so a feed reads ahead only for a consumer that asks. Its reader takes a
*look* at the demand every third of the lease (and whenever an ask wakes it): the consumer
asked if it called ``receive_nowait`` since the previous look or waits in ``receive``.
:func:`look` turns that into a :class:`Demand`: ``IDLE`` until the first ask (a pod that never
gets ready reads nothing), ``ASKING`` while asks come (``ready`` is kept filled), ``STOPPED``
after a look without one (its pod stopped serving, or every slot is busy): then what was read
and not handed out is given back at once, claimable by any pod and uncounted (the
``returned`` set, as on leaving), and nothing more is read until the next ask.

How much to read ahead
----------------------
``buffer`` (twice the pod's concurrency) is the least a feed keeps ready. A pod that settles
batches fast would then read a few entries per round trip, and coredis costs about half a
millisecond of Python per call: :func:`read_ahead` lets the buffer grow to hold about
:data:`HOLD` seconds of batches at the rate this feed settles them, up to
:data:`MAX_READ_AHEAD` times ``buffer``. A slow worker's pod keeps ``buffer``; a fast one's
holds more, for at most about :data:`HOLD` seconds, so at the end of a job the other pods wait
that long at most for what it read.
"""

from __future__ import annotations

import enum
import os
import secrets
import socket
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import anyio
import anyio.lowlevel
import coredis
import coredis.exceptions

from supervisor.logs import Logger
from supervisor.queues import _redis_scripts as S
from supervisor.queues._feed import FeedBookkeeping
from supervisor.queues.base import (
    LOST_DELIVERY_CAP,
    AttemptRecord,
    Delivery,
    JobRecord,
    Progress,
)

__all__ = ["Demand", "RedisFeed", "consumer_name", "look", "read_ahead", "retrying"]

COMMIT_WINDOW = 0.005  # seconds acks gather before one commit, while busy
POLL = 1.0  # seconds between looks for lost batches while others hold the rest
BACKOFF_MAX = 5.0  # seconds, the longest wait between tries while Redis is away
READ_COUNT = 256  # entries per XREADGROUP / claim
GIVE_BACK_TIMEOUT = 10.0  # seconds to commit and give back on leaving
HOLD = 0.05  # seconds of batches, at the rate they are settled, a feed may hold ready
MAX_READ_AHEAD = 8  # times the least read-ahead (``buffer``)
RATE_WINDOW = 0.25  # seconds over which the settle rate is measured


# What "Redis is away" looks like through coredis: retried, in-flight batches kept.
TRANSIENT = (coredis.exceptions.ConnectionError, TimeoutError, OSError)


def consumer_name() -> str:
    """A consumer name unique to this feed: host, pid and a random part."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"


def _rfc3339() -> str:
    from supervisor.jobs import rfc3339

    return rfc3339()


class _Backoff:
    """Capped exponential backoff for retrying while Redis is away."""

    def __init__(self, log: Logger, what: str) -> None:
        self._log = log
        self._what = what
        self._delay = 0.0

    async def failed(self, e: BaseException) -> None:
        self._delay = min(BACKOFF_MAX, max(0.05, self._delay * 2))
        self._log.warning("redis_unavailable", doing=self._what, error=str(e), retry_in=self._delay)
        await anyio.sleep(self._delay)

    def succeeded(self) -> None:
        if self._delay:
            self._log.info("redis_back", doing=self._what)
        self._delay = 0.0


async def retrying(log: Logger, what: str, call: Any) -> Any:
    """Await ``call()`` until it gets through (Redis away: capped backoff)."""
    backoff = _Backoff(log, what)
    while True:
        try:
            result = await call()
        except TRANSIENT as e:
            await backoff.failed(e)
            continue
        backoff.succeeded()
        return result


class Demand(enum.Enum):
    """What the feed's consumer wants, as its reader last looked (see the module docstring)."""

    IDLE = "IDLE"  # it has not asked yet: nothing is read
    ASKING = "ASKING"  # it asked since the previous look: ``ready`` is kept filled
    STOPPED = "STOPPED"  # a look without an ask: give back what is unsent, read nothing

    def __repr__(self) -> str:
        return self.value


def look(state: Demand, *, asked: bool) -> Demand:
    """The demand after a look, from the one before and whether the consumer ``asked`` in
    between (called ``receive_nowait``, or is waiting in ``receive``). While it is
    ``STOPPED``, whatever the feed holds unsent goes back."""
    if asked:
        return Demand.ASKING
    if state is Demand.IDLE:
        return Demand.IDLE
    return Demand.STOPPED


def read_ahead(buffer: int, settled_per_s: float) -> int:
    """How many batches to keep ready: :data:`HOLD` seconds of them at the rate they are
    settled, at least ``buffer``, at most :data:`MAX_READ_AHEAD` times it."""
    return max(buffer, min(buffer * MAX_READ_AHEAD, int(settled_per_s * HOLD)))


class RedisFeed(FeedBookkeeping):
    """The consuming side of one job on Redis (:class:`~supervisor.queues.base.Feed`).

    Made by :meth:`RedisQueue.open_feed`. Three tasks serve it: the *reader* keeps ``ready``
    filled while the consumer asks (``XREADGROUP``, then claims of expired leases) and gives
    back what it read ahead when the consumer stops asking (the module docstring), the
    *committer* sends buffered acks and failures in one script call per group, the *renewer*
    renews the lease of every batch held every third of the lease. ``receive_nowait``,
    ``ack`` and ``fail`` never do I/O.
    """

    def __init__(
        self,
        client: coredis.Redis[bytes],
        job: JobRecord,
        *,
        max_attempts: int,
        count_lost: bool = True,
        buffer: int,
        lease: float,
        log: Logger,
    ) -> None:
        super().__init__(job.job_id, max_attempts)
        self._client = client
        self._keys = S.job_keys(job.job_id)
        self._count_lost = count_lost
        self._least = buffer  # what read_ahead grows from
        self._buffer = buffer
        self._low_water = buffer // 2
        self._lease = lease
        self._log = log
        self._consumer = consumer_name()
        self._commit = client.register_script(S.COMMIT)
        self._claim = client.register_script(S.CLAIM)
        self._renew = client.register_script(S.RENEW)
        self._give_back = client.register_script(S.GIVE_BACK)
        self._give_back_some = client.register_script(S.GIVE_BACK_SOME)
        self._read_counters = client.register_script(S.READ_COUNTERS)
        # Counters as Redis last said, plus what is buffered here and not committed yet.
        self._remote = (job.total_batches or 0, job.succeeded, job.dead, job.failed_attempts)
        self._remote_time = job.time_per_batch_sum
        self._local_ok = 0
        self._local_dead = 0
        self._local_failed = 0
        self._local_time = 0.0
        # Delivery state.
        self._done = False  # the job's stream is empty: nothing anywhere left to do
        self._reader_wakeup: anyio.Event | None = None
        self._asks = 0  # receive_nowait calls so far: the reader's measure of demand
        self._give_backs = 0  # times the reader gave back unsent batches (for the renewer)
        self._demand = Demand.IDLE  # as the reader last looked
        # Commit buffers.
        self._acks: list[tuple[int, float]] = []
        self._stopping = False

    @property
    def consumer(self) -> str:
        """This feed's consumer name in the job's group."""
        return self._consumer

    # -- the consumer's side --------------------------------------------------------------

    def receive_nowait(self) -> Delivery | None:
        """Like :meth:`receive` without waiting (``anyio.WouldBlock`` if nothing is ready)."""
        if self._closed:
            return None
        self._asks += 1
        ready = self._ready
        if ready:
            d = ready.popleft()
            self._in_flight[d.seq] = d.attempt
            if len(ready) <= self._low_water:
                self._wake_reader()
            return d
        if self._done and not self._in_flight:
            return None
        if self._demand is not Demand.ASKING:
            self._wake_reader()  # a reader that is not reading looks at once
        raise anyio.WouldBlock

    def ack(self, d: Delivery, elapsed: float) -> None:
        """``d`` succeeded after ``elapsed`` seconds (committed in the background)."""
        self._resolve(d)
        self._local_ok += 1
        self._local_time += elapsed
        self._acks.append((d.seq, elapsed))
        self._buffered()

    def fail(self, d: Delivery, record: AttemptRecord) -> None:
        """``d``'s attempt failed: retry it next, or dead-letter it if it was the last."""
        dead = self._fail_attempt(d, record)
        self._local_failed += 1
        self._local_dead += dead
        self._buffered()

    def progress(self) -> Progress:
        """The job's counters: Redis's as last seen, plus what is buffered here."""
        total, ok, dead, failed = self._remote
        ok += self._local_ok
        dead += self._local_dead
        in_flight = len(self._in_flight)
        time_sum = self._remote_time + self._local_time
        return Progress(
            total=total,
            succeeded=ok,
            dead=dead,
            failed_attempts=failed + self._local_failed,
            in_flight=in_flight,
            in_queue=max(0, total - ok - dead - in_flight),
            average_time_per_batch=time_sum / ok if ok else None,
        )

    async def flush(self) -> None:
        """Commit every ack and failure reported so far, then read the job's counters, so
        that :meth:`progress` also holds what the job's other pods committed (what a pod
        sends in ``/on-job-complete`` and records as the job's end)."""
        await super().flush()
        values = await retrying(
            self._log,
            "reading the job's counters",
            partial(self._run_script, self._read_counters, [self._keys.job], []),
        )
        self._set_counters(values)

    # -- bookkeeping ----------------------------------------------------------------------

    def _buffered(self) -> None:
        self._n_buffered += 1
        self._wake_committer()

    def _wake_producer(self) -> None:
        self._wake_reader()

    def _wake_reader(self) -> None:
        wakeup, self._reader_wakeup = self._reader_wakeup, None
        if wakeup is not None:
            wakeup.set()

    def _held(self) -> set[int]:
        held = {d.seq for d in self._ready}
        held.update(self._in_flight)
        held.update(seq for seq, _ in self._acks)
        held.update(seq for seq, _, _ in self._failed)
        return held

    def _set_counters(self, values: list[Any]) -> None:
        total, ok, dead, failed, time_sum = values
        self._remote = (int(total or 0), int(ok or 0), int(dead or 0), int(failed or 0))
        self._remote_time = float(time_sum or 0.0)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Run the reader, committer and renewer for the block; on the way out commit what
        is buffered and give back what is held (``RedisQueue.open_feed`` wraps its caller)."""
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._run_reader)
                tg.start_soon(self._run_committer)
                tg.start_soon(self._run_renewer)
                try:
                    yield
                finally:
                    self._stopping = True
                    self.close()
                    tg.cancel_scope.cancel()
        finally:
            await self._leave()

    async def _leave(self) -> None:
        with anyio.CancelScope(shield=True), anyio.move_on_after(GIVE_BACK_TIMEOUT):
            try:
                while self._n_committed < self._n_buffered:
                    await self._commit_buffered()
                await self._run_script(
                    self._give_back,
                    [self._keys.stream, self._keys.returned],
                    [S.GROUP, self._consumer],
                )
            except TRANSIENT as e:
                self._log.warning("redis_give_back_failed", error=str(e))
        self._stopped = True

    async def _run_script(self, script: Any, keys: list[Any], args: list[Any]) -> Any:
        return await script(keys=keys, args=args)

    # -- the reader -----------------------------------------------------------------------

    async def _run_reader(self) -> None:
        backoff = _Backoff(self._log, "reading batches")
        keys = self._keys
        claim_keys = [keys.job, keys.stream, keys.attempts, keys.dead, keys.returned, keys.lost]
        new = True  # XREADGROUP may still have entries never delivered
        patience = self._lease / 3
        asks = 0  # self._asks at the previous look
        next_look = 0.0
        rate_since, settled_then = anyio.current_time(), 0
        while not self._closed and not self._done:
            now = anyio.current_time()
            if now - rate_since >= RATE_WINDOW:
                rate = (self._n_buffered - settled_then) / (now - rate_since)
                self._buffer = read_ahead(self._least, rate)
                self._low_water = self._buffer // 2
                rate_since, settled_then = now, self._n_buffered
            if self._demand is not Demand.ASKING or now >= next_look:
                asked = self._asks != asks or self._receiving > 0
                demand = self._demand = look(self._demand, asked=asked)
                asks, next_look = self._asks, now + patience
                if demand is Demand.STOPPED:
                    await self._give_back_unsent()
                    if self._asks != asks or self._receiving > 0:
                        continue  # asked while giving back: look again now, not in a while
                if demand is not Demand.ASKING:  # until an ask wakes it (or the next look)
                    await self._reader_sleep(None if demand is Demand.IDLE else patience)
                    continue
            if len(self._ready) > self._low_water:
                await self._reader_sleep(next_look - now)
                continue
            want = max(1, min(READ_COUNT, self._buffer - len(self._ready)))
            try:
                got: list[Delivery] = []
                if new:
                    reply = await self._client.xreadgroup(
                        S.GROUP, self._consumer, {keys.stream: ">"}, count=want
                    )
                    entries = reply[keys.stream.encode()] if reply else ()
                    for e in entries:
                        entry, body = S.as_bytes(e.identifier), S.as_bytes(e.field_values[b"body"])
                        got.append(Delivery(S.seq_of(entry), body, 1))
                    new = len(entries) == want
                if not got:
                    out: list[Any] = await self._claim(
                        keys=claim_keys,
                        args=[
                            S.GROUP,
                            self._consumer,
                            int(self._lease * 1000),
                            want,
                            self._max_attempts,
                            _rfc3339(),
                            int(self._count_lost),
                            LOST_DELIVERY_CAP,
                        ],
                    )
                    n = int(out[0])
                    for k in range(n):
                        entry, body, attempt = out[1 + 3 * k : 4 + 3 * k]
                        got.append(Delivery(S.seq_of(entry), body, int(attempt)))
                    self._set_counters(out[1 + 3 * n :])
                if not got and not self._held() and self._n_committed == self._n_buffered:
                    if await self._client.xlen(keys.stream) == 0:
                        self._done = True
            except TRANSIENT as e:
                await backoff.failed(e)
                continue
            backoff.succeeded()
            if got:
                self._ready.extend(got)
                self._wake_receivers()
            elif self._done:
                self._wake_receivers()
            else:
                # Others hold the rest: look again for expired leases after a while, or
                # sooner when a commit here may have finished the job.
                await self._reader_sleep(min(POLL, patience))

    async def _reader_sleep(self, delay: float | None) -> None:
        """Wait for :meth:`_wake_reader`, at most ``delay`` seconds (``None``: no limit)."""
        wakeup = self._reader_wakeup = anyio.Event()
        with anyio.move_on_after(float("inf") if delay is None else delay):
            await wakeup.wait()

    async def _give_back_unsent(self) -> None:
        """Give back what ``ready`` holds (the consumer stopped asking), claimable at once and
        uncounted. A retry whose failure is not committed yet stays until it is: a failure
        commits only while its batch is still this consumer's."""
        failing = {seq for seq, _, _ in self._failed}
        back = [d.seq for d in self._ready if d.seq not in failing]
        if not back:
            return
        self._ready = deque(d for d in self._ready if d.seq in failing)
        self._give_backs += 1
        keys, ids = self._keys, [S.entry_id(seq) for seq in back]
        # The script gives back only what is still ours: a retry after a lost reply is harmless.
        n = await retrying(
            self._log,
            "giving back batches",
            partial(
                self._run_script,
                self._give_back_some,
                [keys.stream, keys.returned],
                [S.GROUP, self._consumer, *ids],
            ),
        )
        self._log.info("batches_given_back", batches=int(n), reason="no demand")

    # -- the renewer ----------------------------------------------------------------------

    async def _run_renewer(self) -> None:
        backoff = _Backoff(self._log, "renewing leases")
        while True:
            await anyio.sleep(self._lease / 3)
            try:
                held_ids = [S.entry_id(seq) for seq in sorted(self._held())]
                if not held_ids:
                    continue
                give_backs = self._give_backs
                mine: list[bytes] = await self._renew(
                    keys=[self._keys.stream], args=[S.GROUP, self._consumer, *held_ids]
                )
            except TRANSIENT as e:
                await backoff.failed(e)
                continue
            backoff.succeeded()
            if give_backs != self._give_backs:
                # Batches went back (and may have been claimed again) while the renewal was
                # on its way: its answer is out of date; the next renewal judges.
                continue
            lost = {S.seq_of(i) for i in held_ids} - {S.seq_of(S.as_bytes(i)) for i in mine}
            lost &= self._held()  # not those acked and committed meanwhile
            if lost:  # another consumer claimed them (this one was cut off too long)
                self._log.warning("redis_leases_lost", batches=sorted(lost))
                self._ready = deque(d for d in self._ready if d.seq not in lost)

    # -- the committer --------------------------------------------------------------------

    async def _run_committer(self) -> None:
        backoff = _Backoff(self._log, "committing acks")
        try:
            while True:
                if self._n_committed == self._n_buffered:
                    wakeup = self._committer_wakeup = anyio.Event()
                    await wakeup.wait()
                    continue
                if self._commit_done is None and not self._stopping:
                    await anyio.sleep(COMMIT_WINDOW)  # let a busy feed's acks share a call
                try:
                    await self._commit_buffered()
                except TRANSIENT as e:
                    await backoff.failed(e)
                    continue
                backoff.succeeded()
        finally:
            done, self._commit_done = self._commit_done, None
            if done is not None:
                done.set()

    async def _commit_buffered(self) -> None:
        if self._n_committed == self._n_buffered:
            return
        target = self._n_buffered
        acks, failed = list(self._acks), list(self._failed)
        args: list[Any] = [S.GROUP, self._consumer, self._max_attempts, len(failed)]
        for seq, attempt, record in failed:
            args += [S.entry_id(seq), attempt, record]
        for seq, elapsed in acks:
            args += [S.entry_id(seq), repr(elapsed)]
        keys = self._keys
        out: list[Any] = await self._commit(
            keys=[keys.job, keys.stream, keys.attempts, keys.dead], args=args
        )
        # Committed (a retry after a lost reply is harmless: see COMMIT).
        del self._acks[: len(acks)]
        del self._failed[: len(failed)]
        self._local_ok -= len(acks)
        self._local_time -= sum(e for _, e in acks)
        self._local_failed -= len(failed)
        for (seq, attempt, _), status in zip(failed, out[: len(failed)], strict=True):
            if attempt >= self._max_attempts:
                self._local_dead -= 1
            if int(status) == -1:  # the batch was not ours any more: forget its retry
                self._ready = deque(d for d in self._ready if d.seq != seq)
        self._set_counters(out[len(failed) :])
        self._n_committed = target
        done, self._commit_done = self._commit_done, None
        if done is not None:
            done.set()
        if not self._held():
            self._wake_reader()  # the job may be finished: the reader looks
