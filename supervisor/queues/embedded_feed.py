"""The dispatch side of the embedded queue: :class:`EmbeddedFeed` (see ``embedded.py``)."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from operator import itemgetter
from pathlib import Path

import anyio
import anyio.lowlevel
import msgspec

from supervisor.queues._feed import FeedBookkeeping
from supervisor.queues._sqlite import (
    BUFFER_BYTES,
    COMMIT_WINDOW,
    DEAD,
    PAGE,
    PENDING,
    SEQ_BITS,
    SPAN_BODY,
    SPAN_BYTES,
    SUCCEEDED,
    Storage,
    pread,
    record_decoder,
    transaction,
    write_dead_letter,
)
from supervisor.queues.base import (
    AttemptRecord,
    DeadLetter,
    Delivery,
    JobRecord,
    Progress,
    QueueError,
)

__all__ = ["EmbeddedFeed"]

_length = itemgetter(3)  # of a (seq, attempts, offset, length) row


def _runs(seqs: list[int]) -> list[tuple[int, int]]:
    """``seqs`` as sorted runs of consecutive numbers: ``[5, 3, 4, 9]`` -> ``[(3, 5), (9, 9)]``."""
    ordered = sorted(seqs)
    out: list[tuple[int, int]] = []
    lo = hi = ordered[0]
    for seq in ordered[1:]:
        if seq != hi + 1:
            out.append((lo, hi))
            lo = seq
        hi = seq
    out.append((lo, hi))
    return out


class EmbeddedFeed(FeedBookkeeping):
    """The consuming side of one job (:class:`~supervisor.queues.base.Feed`).

    Made by :meth:`EmbeddedQueue.open_feed`; see the module docstring for how it works.
    """

    __slots__ = (
        "_acks",
        "_base",
        "_body_fd",
        "_body_path",
        "_buffer",
        "_cursor",
        "_dead",
        "_dead_letter_dir",
        "_deads",
        "_exhausted",
        "_failed_attempts",
        "_feeder_scope",
        "_feeder_wakeup",
        "_hurry",
        "_jid",
        "_limit",
        "_low_water",
        "_stopping",
        "_storage",
        "_succeeded",
        "_time_sum",
        "_total",
        "_unsaved_time",
    )

    def __init__(
        self,
        storage: Storage,
        jid: int,
        job: JobRecord,
        max_attempts: int,
        buffer: int,
        body_fd: int,
        dead_letter_dir: Path,
    ) -> None:
        super().__init__(job.job_id, max_attempts)
        self._storage = storage
        self._jid = jid
        self._body_fd = body_fd  # the job's body file, read-only; owned by open_feed
        self._body_path = storage.body_path(jid)
        self._dead_letter_dir = dead_letter_dir
        self._base = jid << SEQ_BITS
        self._buffer = buffer
        self._limit = buffer  # rows to hold; lowered for big bodies (see _run_feeder)
        self._low_water = buffer // 2
        self._total = job.total_batches or 0
        # Counters, including what is buffered but not committed yet.
        self._succeeded = job.succeeded
        self._dead = job.dead
        self._failed_attempts = job.failed_attempts
        self._time_sum = job.time_per_batch_sum
        # Delivery state.
        self._cursor = -1  # the last seq read from the file
        self._exhausted = False  # every pending batch has been read into memory
        self._feeder_wakeup: anyio.Event | None = None
        self._feeder_scope = anyio.CancelScope()
        # Commit buffers.
        self._acks: list[int] = []
        self._deads: list[tuple[int, bytes]] = []  # seq, body
        self._unsaved_time = 0.0
        self._hurry: anyio.Event | None = None  # set to end a group-commit window early
        self._stopping = False  # leaving open_feed: commit what is left, then stop

    # -- the consumer's side --------------------------------------------------------------

    def receive_nowait(self) -> Delivery | None:
        """Like :meth:`receive` without waiting: raises ``anyio.WouldBlock`` when no batch is
        ready yet but more may come (the feeder is reading, or batches in flight may fail)."""
        if self._closed:
            return None
        ready = self._ready
        if ready:
            d = ready.popleft()
            self._in_flight[d.seq] = d.attempt
            if len(ready) <= self._low_water and self._feeder_wakeup is not None:
                self._wake_feeder()
            return d
        if self._exhausted and not self._in_flight:
            return None
        raise anyio.WouldBlock

    def ack(self, d: Delivery, elapsed: float) -> None:
        """``d`` succeeded after ``elapsed`` seconds (committed in the background)."""
        self._resolve(d)
        self._succeeded += 1
        self._time_sum += elapsed
        self._unsaved_time += elapsed
        self._acks.append(d.seq)
        self._buffered()

    def fail(self, d: Delivery, record: AttemptRecord) -> None:
        """``d``'s attempt failed: retry it later, or dead-letter it if it was the last."""
        dead = self._fail_attempt(d, record)
        self._failed_attempts += 1
        if dead:
            self._dead += 1
            self._deads.append((d.seq, d.body))
        self._buffered()

    def progress(self) -> Progress:
        """The job's counters now (including acks not committed yet)."""
        in_flight = len(self._in_flight)
        ok = self._succeeded
        return Progress(
            total=self._total,
            succeeded=ok,
            dead=self._dead,
            failed_attempts=self._failed_attempts,
            in_flight=in_flight,
            in_queue=max(0, self._total - ok - self._dead - in_flight),
            average_time_per_batch=self._time_sum / ok if ok else None,
        )

    # -- bookkeeping ----------------------------------------------------------------------

    def _buffered(self) -> None:
        self._n_buffered += 1
        self._wake_committer()
        if not self._in_flight and not self._ready and self._exhausted:
            self._wake_receivers()

    def _wake_producer(self) -> None:
        self._wake_feeder()

    def _wake_feeder(self) -> None:
        wakeup = self._feeder_wakeup
        if wakeup is not None:
            self._feeder_wakeup = None
            wakeup.set()

    def _hurry_committer(self) -> None:
        hurry = self._hurry
        if hurry is not None:
            self._hurry = None
            hurry.set()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Run the feeder and the committer for the block; on the way out, stop them once
        every ack is committed (:meth:`EmbeddedQueue.open_feed` wraps its caller in this)."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._run_feeder)
            tg.start_soon(self._run_committer)
            try:
                yield
            finally:
                self._shut_down()

    def _shut_down(self) -> None:
        self._stopping = True
        self.close()
        self._feeder_scope.cancel()
        self._wake_committer()
        self._hurry_committer()

    # -- the feeder -----------------------------------------------------------------------

    async def _run_feeder(self) -> None:
        with self._feeder_scope:
            while not self._exhausted and not self._closed:
                if len(self._ready) > self._low_water:
                    wakeup = self._feeder_wakeup = anyio.Event()
                    await wakeup.wait()
                    continue
                ready = self._ready
                want = max(1, min(PAGE, self._limit - len(ready)))
                room = BUFFER_BYTES - sum(len(d.body) for d in ready)
                page, size, exhausted = await self._storage.run_io(
                    self._read_page, self._cursor, want, room
                )
                ready.extend(page)
                if page:
                    self._cursor = page[-1].seq
                    # Bound the buffer by bytes too: 1,024 batches of 256 KiB would be 256 MiB.
                    per_row = max(1, size // len(page))
                    self._limit = max(2, min(self._buffer, BUFFER_BYTES // per_row))
                    self._low_water = self._limit // 2
                if exhausted:
                    self._exhausted = True
                self._wake_receivers()

    def _read_page(self, after: int, limit: int, room: int) -> tuple[list[Delivery], int, bool]:
        """Worker thread: the next pending batches after seq ``after``, at most ``limit`` and
        ``room`` bytes of bodies (but at least one batch); their total size; and whether they
        are the last. The rows are read under the connection's lock, the bodies after it."""
        rows = self._storage.call(partial(self._select_page, after, limit))
        exhausted = len(rows) < limit
        size = sum(map(_length, rows))
        if size > room and len(rows) > 1:
            # The row limit follows the sizes seen so far; the lengths in the rows bound the
            # page by bytes too (a first page of 512 bodies of 256 KiB would be 128 MiB).
            size = 0
            for k, row in enumerate(rows):
                if size + row[3] > room and k:
                    del rows[k:]
                    exhausted = False
                    break
                size += row[3]
        return self._read_bodies(rows, size), size, exhausted

    def _select_page(
        self, after: int, limit: int, conn: sqlite3.Connection
    ) -> list[tuple[int, int, int, int]]:
        base = self._base
        return conn.execute(
            "SELECT id - ?, attempts, offset, length FROM batches "
            f"WHERE id > ? AND id < ? AND state = {PENDING} ORDER BY id LIMIT ?",
            (base, base + after, base + (1 << SEQ_BITS), limit),
        ).fetchall()

    def _read_bodies(self, rows: list[tuple[int, int, int, int]], size: int) -> list[Delivery]:
        """Deliveries of ``rows`` (seq, attempts, offset, length; ``size`` bytes in all).

        Bodies are stored in seq order. Adjacent small bodies are read with one ``pread`` of
        at most ``SPAN_BYTES`` and sliced (usually the whole page at once); a big body is
        read alone, straight into its ``bytes`` (slicing would copy it once more).
        """
        if not rows:
            return []
        first, last = rows[0], rows[-1]
        start, end = first[2], last[2] + last[3]
        if end - start == size <= SPAN_BYTES:  # adjacent (they are stored in seq order)
            data = self._pread(first[0], start, end)
            return [Delivery(seq, data[o - start : o - start + n], a + 1) for seq, a, o, n in rows]
        page: list[Delivery] = []
        i, count = 0, len(rows)
        while i < count:
            seq, attempts, start, length = rows[i]
            end = start + length
            j = i + 1
            if length < SPAN_BODY:
                while j < count:
                    _, _, offset, n = rows[j]
                    if offset != end or n >= SPAN_BODY or end + n - start > SPAN_BYTES:
                        break
                    end += n
                    j += 1
            data = self._pread(seq, start, end)
            if j == i + 1:
                page.append(Delivery(seq, data, attempts + 1))
            else:
                page.extend(
                    Delivery(seq, data[o - start : o - start + n], a + 1)
                    for seq, a, o, n in rows[i:j]
                )
            i = j
        return page

    def _pread(self, seq: int, start: int, end: int) -> bytes:
        """Bytes ``start`` to ``end`` of the body file, where batch ``seq``'s body begins."""
        try:
            data = pread(self._body_fd, end - start, start)
        except OSError as e:
            raise QueueError(f"cannot read the body file {self._body_path}: {e}") from e
        if data is None:
            raise QueueError(
                f"the body file {self._body_path} of job {self._job_id} is shorter than its "
                f"batches say (batch {seq} and on need bytes {start} to {end}): it was "
                "truncated or replaced under the queue."
            )
        return data

    # -- the committer --------------------------------------------------------------------

    async def _run_committer(self) -> None:
        try:
            while True:
                if self._n_committed == self._n_buffered:
                    if self._stopping:
                        return
                    wakeup = self._committer_wakeup = anyio.Event()
                    await wakeup.wait()
                    continue
                if not self._stopping and self._commit_done is None:
                    # Group commit: let acks gather for a moment so a busy feed costs one
                    # transaction per window, not one per batch (a flush() skips the wait).
                    # Acks do not wake us meanwhile; flush() and shutdown do.
                    hurry = self._hurry = anyio.Event()
                    with anyio.move_on_after(COMMIT_WINDOW):
                        await hurry.wait()
                    self._hurry = None
                await self._commit_buffered()
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):
                await self._commit_buffered()
            raise
        finally:
            self._stopped = True
            done, self._commit_done = self._commit_done, None
            if done is not None:
                done.set()

    async def _commit_buffered(self) -> None:
        if self._n_committed == self._n_buffered:
            return
        target = self._n_buffered
        acks, self._acks = self._acks, []
        failed, self._failed = self._failed, []
        deads, self._deads = self._deads, []
        time_sum, self._unsaved_time = self._unsaved_time, 0.0
        committed = False

        def commit(conn: sqlite3.Connection) -> None:
            nonlocal committed
            self._commit(acks, failed, deads, time_sum, conn)
            committed = True

        try:
            await self._storage.run(commit)
        finally:
            if committed:
                self._n_committed = target
                done, self._commit_done = self._commit_done, None
                if done is not None:
                    done.set()
            else:  # cancelled before the thread ran, or rolled back: keep it for next time
                self._acks[:0] = acks
                self._failed[:0] = failed
                self._deads[:0] = deads
                self._unsaved_time += time_sum

    def _commit(
        self,
        acks: list[int],
        failed: list[tuple[int, int, bytes]],
        deads: list[tuple[int, bytes]],
        time_sum: float,
        conn: sqlite3.Connection,
    ) -> None:
        base = self._base
        with transaction(conn):
            if failed:
                conn.executemany(
                    "INSERT OR REPLACE INTO attempts (id, attempt, record) VALUES (?, ?, ?)",
                    [(base + seq, attempt, record) for seq, attempt, record in failed],
                )
                conn.executemany(
                    "UPDATE batches SET attempts = max(attempts, ?) WHERE id = ?",
                    [(attempt, base + seq) for seq, attempt, _ in failed],
                )
            for seq, body in deads:
                records = conn.execute(
                    "SELECT record FROM attempts WHERE id = ? ORDER BY attempt", (base + seq,)
                )
                letter = DeadLetter(
                    job_id=self._job_id,
                    batch=seq,
                    body=msgspec.Raw(body),
                    attempts=[record_decoder.decode(r) for (r,) in records],
                )
                try:
                    write_dead_letter(self._dead_letter_dir, letter)
                except OSError as e:
                    raise QueueError(
                        f"cannot write the dead letter of batch {seq} of job {self._job_id}: {e}"
                    ) from e
            if deads:
                conn.executemany(
                    f"UPDATE batches SET state = {DEAD} WHERE id = ?",
                    [(base + seq,) for seq, _ in deads],
                )
            if acks:
                # Acks come mostly in order: one statement per run of consecutive batches
                # (a window of 125 acks commits in ~50 us instead of ~200 us, one per row).
                conn.executemany(
                    f"UPDATE batches SET state = {SUCCEEDED} WHERE id BETWEEN ? AND ?",
                    [(base + lo, base + hi) for lo, hi in _runs(acks)],
                )
            conn.execute(
                "UPDATE jobs SET succeeded = succeeded + ?, dead = dead + ?, "
                "failed_attempts = failed_attempts + ?, "
                "time_per_batch_sum = time_per_batch_sum + ? WHERE jid = ?",
                (len(acks), len(deads), len(failed), time_sum, self._jid),
            )
