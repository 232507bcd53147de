"""The embedded job queue: one SQLite file, for jobs run on one machine (SPEC §5, §7).

Theory of operation
-------------------
Storage. One SQLite file in WAL mode with ``synchronous=NORMAL``: a committed transaction
survives the process being killed (not necessarily a power cut, which we do not need). Tables:

* ``jobs``: one row per job, with its counters (succeeded, dead, failed attempts, sum of
  times per batch). ``jid`` is a small integer key.
* ``batches(id, state, attempts)`` and ``bodies(id, body)``: one row each per batch, keyed by
  ``id = jid << 32 | seq``, so a job's batches are one rowid range, inserted in order and
  read in order with no extra index. State and body are apart so that marking a batch done
  never rewrites its (up to 256 KiB) body.
* ``attempts(id, attempt, record)``: each failed attempt's :class:`AttemptRecord`, which
  become the dead letter's ``attempts``, also across crashes.

There is one connection, used by one worker thread at a time under a lock; no sqlite call
runs on the event loop thread.

Enqueueing reads the caller's (blocking) iterator in a worker thread and commits chunks, so
memory stays flat. It is all or nothing: if the iterator raises, the job's rows are deleted.
``enqueue`` always starts from scratch: batches already stored for the job (a crash while
enqueueing) are deleted first. If ``enqueue`` is cancelled, what it stored stays until the
next ``enqueue`` or ``delete_job`` of that job.

Dispatching (:class:`EmbeddedFeed`) keeps the hot path in memory:

* a *feeder* task reads pending batches in ``seq`` order, a page of a few hundred rows per
  worker-thread call, into a bounded ``ready`` deque whenever it falls to half full;
* ``receive`` pops from ``ready`` (no I/O), ``ack``/``fail`` append to commit buffers (no
  I/O) and wake the *committer* task, which commits everything buffered in one transaction,
  so under load thousands of acks share a commit and when idle an ack is committed at once;
* a failed batch that has attempts left is appended to the back of ``ready``: it is retried
  after the batches already buffered and before those not yet read (like an SQS visibility
  timeout, only without the wait). Its last failed attempt makes it dead: the committer
  writes ``batch-<seq>.json`` and then marks it dead, in the transaction that records the
  attempt, so a dead batch always has its file.

Counters change in the same transactions as batch states, so after a crash the job row
agrees with its batches. What was acked but not yet committed is delivered again, which is
the at-least-once promise; ``flush()`` (and leaving ``open_feed``) makes every ack so far
durable. An attempt in flight at a crash is not counted: the batch comes back with the
attempt number after the last *persisted* failed attempt.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self, TypeVar

import anyio
import anyio.lowlevel
import msgspec

from supervisor.jobs import END_STATES
from supervisor.queues.base import (
    AttemptRecord,
    DeadLetter,
    Delivery,
    JobRecord,
    Progress,
    QueueError,
    dead_letter_name,
)

__all__ = ["EmbeddedFeed", "EmbeddedQueue"]

T = TypeVar("T")

_SCHEMA_VERSION: Final = 1
_SEQ_BITS: Final = 32  # id = jid << 32 | seq
_PENDING: Final = 0
_SUCCEEDED: Final = 1
_DEAD: Final = 2
_PAGE: Final = 512  # rows per feeder read
_BUFFER_BYTES: Final = 32 << 20  # batch bodies held in memory ahead of the consumers, at most
_COMMIT_WINDOW: Final = 0.005  # seconds acks may wait to share a transaction
_CHUNK_BYTES: Final = 16 << 20  # an enqueue chunk also ends at this many bytes

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS jobs (
    jid INTEGER PRIMARY KEY,
    job_id TEXT NOT NULL UNIQUE,
    api_name TEXT NOT NULL,
    digest TEXT NOT NULL,
    spec_json BLOB NOT NULL,
    status TEXT NOT NULL,
    created_time TEXT NOT NULL,
    start_time TEXT,
    end_time TEXT,
    total_batches INTEGER,
    succeeded INTEGER NOT NULL DEFAULT 0,
    dead INTEGER NOT NULL DEFAULT 0,
    failed_attempts INTEGER NOT NULL DEFAULT 0,
    time_per_batch_sum REAL NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_by_api ON jobs (api_name, job_id);
CREATE TABLE IF NOT EXISTS batches (
    id INTEGER PRIMARY KEY,
    state INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS bodies (id INTEGER PRIMARY KEY, body BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS attempts (
    id INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    record BLOB NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS attempts_by_batch ON attempts (id, attempt);
"""

_JOB_COLUMNS: Final = (
    "job_id, api_name, digest, spec_json, status, created_time, start_time, end_time, "
    "total_batches, succeeded, dead, failed_attempts, time_per_batch_sum"
)

_record_encoder: Final = msgspec.json.Encoder()
_record_decoder: Final = msgspec.json.Decoder(AttemptRecord)
_dead_letter_encoder: Final = msgspec.json.Encoder()


def _job(row: Any) -> JobRecord:
    (job_id, api_name, digest, spec, status, created, start, end, total, ok, dead, failed, tpb) = (
        row
    )
    return JobRecord(
        job_id=job_id,
        api_name=api_name,
        digest=digest,
        spec_json=bytes(spec),
        status=status,
        created_time=created,
        start_time=start,
        end_time=end,
        total_batches=total,
        succeeded=ok,
        dead=dead,
        failed_attempts=failed,
        time_per_batch_sum=float(tpb),
    )


def _progress(job: JobRecord, in_flight: int) -> Progress:
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


@contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _connect(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
    try:
        # Big pages keep 256 KiB bodies in a few overflow pages instead of 64 (only takes
        # effect when the file is created, before WAL mode is switched on).
        conn.execute("PRAGMA page_size=65536")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA cache_size=-16384")
        conn.execute("PRAGMA mmap_size=17179869184")  # read pages straight from the page cache
        with _transaction(conn):
            (version,) = conn.execute("PRAGMA user_version").fetchone()
            if version not in (0, _SCHEMA_VERSION):
                raise QueueError(
                    f"{path} holds a queue of format {version}; this supervisor reads "
                    f"format {_SCHEMA_VERSION}."
                )
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
    except BaseException:
        conn.close()
        raise
    return conn


def _write_dead_letter(directory: Path, letter: DeadLetter) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / dead_letter_name(letter.batch)
    tmp = final.with_name(final.name + ".tmp")
    tmp.write_bytes(_dead_letter_encoder.encode(letter))
    os.replace(tmp, final)


def _dead_letter_seq(path: Path) -> int | None:
    name = path.name
    if not (name.startswith("batch-") and name.endswith(".json")):
        return None
    digits = name[len("batch-") : -len(".json")]
    return int(digits) if digits.isdigit() else None


class EmbeddedQueue:
    """The :class:`~supervisor.queues.base.JobQueue` kept in one SQLite file.

    Open it with ``async with await EmbeddedQueue.open(path) as queue:``. Dead letters go to
    ``dead_letter_root/<job_id>/`` (default: ``dead-letters/`` beside the file).
    """

    def __init__(self, conn: sqlite3.Connection, path: Path, dead_letter_root: Path) -> None:
        self._conn: sqlite3.Connection | None = conn
        self._path = path
        self._dead_letter_root = dead_letter_root
        self._lock = threading.Lock()
        self._feeds: dict[str, EmbeddedFeed | None] = {}  # None while opening

    @classmethod
    async def open(
        cls, path: str | os.PathLike[str], *, dead_letter_root: str | os.PathLike[str] | None = None
    ) -> EmbeddedQueue:
        """Open (creating if needed) the queue file at ``path``."""
        file = Path(path)
        try:
            conn = await anyio.to_thread.run_sync(_connect, file)
        except (sqlite3.Error, OSError) as e:
            raise QueueError(f"cannot open the queue file {file}: {e}") from e
        root = file.parent / "dead-letters" if dead_letter_root is None else Path(dead_letter_root)
        return cls(conn, file, root)

    @property
    def path(self) -> Path:
        """The SQLite file."""
        return self._path

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the file. Feeds must have been left before."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self._close_locked, conn)

    def _close_locked(self, conn: sqlite3.Connection) -> None:
        with self._lock:
            conn.close()

    # -- plumbing -------------------------------------------------------------------------

    def _locked(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        with self._lock:
            conn = self._conn
            if conn is None:
                raise QueueError(f"the queue {self._path} is closed.")
            try:
                return fn(conn)
            except sqlite3.Error as e:
                raise QueueError(f"the queue file {self._path} failed: {e}") from e

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(conn)`` in a worker thread, holding the connection's lock."""
        return await anyio.to_thread.run_sync(self._locked, fn)

    def _jid(self, conn: sqlite3.Connection, job_id: str) -> int:
        row = conn.execute("SELECT jid FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        if row is None:
            raise QueueError(f"there is no job {job_id}.")
        return int(row[0])

    def _not_feeding(self, job_id: str, doing: str) -> None:
        if job_id in self._feeds:
            raise QueueError(f"cannot {doing} job {job_id} while its feed is open.")

    # -- jobs -----------------------------------------------------------------------------

    async def create_job(
        self, job_id: str, api_name: str, digest: str, spec_json: bytes, created_time: str
    ) -> None:
        """Store a new job with status ``enqueuing`` and no batches."""

        def create(conn: sqlite3.Connection) -> None:
            with _transaction(conn):
                if conn.execute("SELECT 1 FROM jobs WHERE job_id = ?", (job_id,)).fetchone():
                    raise QueueError(f"job {job_id} already exists.")
                conn.execute(
                    "INSERT INTO jobs (job_id, api_name, digest, spec_json, status, "
                    "created_time) VALUES (?, ?, ?, ?, 'enqueuing', ?)",
                    (job_id, api_name, digest, spec_json, created_time),
                )

        await self._run(create)

    async def enqueue(self, job_id: str, batches: Iterator[bytes], *, chunk: int = 2048) -> int:
        """Store ``batches`` as seq 0, 1, ... and return how many (see the module docstring)."""
        if chunk < 1:
            raise ValueError("chunk must be at least 1")
        self._not_feeding(job_id, "enqueue")
        jid = await self._run(partial(self._clear_batches, job_id))
        count = 0
        try:
            while True:
                stored, done = await anyio.to_thread.run_sync(
                    self._enqueue_chunk, jid, batches, count, chunk
                )
                count += stored
                if done:
                    break
        except Exception:
            with anyio.CancelScope(shield=True):
                await self._run(partial(self._delete_rows, jid))
            raise

        def finish(conn: sqlite3.Connection) -> None:
            with _transaction(conn):
                conn.execute("UPDATE jobs SET total_batches = ? WHERE jid = ?", (count, jid))
            # Move the bodies from the WAL into the main file, where reads are memory-mapped.
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

        await self._run(finish)
        return count

    def _clear_batches(self, job_id: str, conn: sqlite3.Connection) -> int:
        with _transaction(conn):
            jid = self._jid(conn, job_id)
            self._delete_batches(conn, jid)
            conn.execute(
                "UPDATE jobs SET total_batches = NULL, succeeded = 0, dead = 0, "
                "failed_attempts = 0, time_per_batch_sum = 0 WHERE jid = ?",
                (jid,),
            )
        return jid

    @staticmethod
    def _delete_batches(conn: sqlite3.Connection, jid: int) -> None:
        lo, hi = jid << _SEQ_BITS, (jid + 1) << _SEQ_BITS
        for table in ("batches", "bodies", "attempts"):
            conn.execute(f"DELETE FROM {table} WHERE id >= ? AND id < ?", (lo, hi))

    def _delete_rows(self, jid: int, conn: sqlite3.Connection) -> None:
        with _transaction(conn):
            self._delete_batches(conn, jid)
            conn.execute("DELETE FROM jobs WHERE jid = ?", (jid,))

    def _enqueue_chunk(
        self, jid: int, batches: Iterator[bytes], first: int, chunk: int
    ) -> tuple[int, bool]:
        """Worker thread: read up to ``chunk`` batches (outside the lock), then commit them."""
        rows: list[tuple[int, bytes]] = []
        size = 0
        done = True
        base = (jid << _SEQ_BITS) + first
        for body in batches:
            rows.append((base + len(rows), body))
            size += len(body)
            if len(rows) >= chunk or size >= _CHUNK_BYTES:
                done = False
                break
        if first + len(rows) > 1 << _SEQ_BITS:
            raise QueueError(f"a job holds at most {1 << _SEQ_BITS} batches.")

        def insert(conn: sqlite3.Connection) -> None:
            with _transaction(conn):
                conn.executemany("INSERT INTO bodies (id, body) VALUES (?, ?)", rows)
                conn.executemany("INSERT INTO batches (id) VALUES (?)", ((i,) for i, _ in rows))

        if rows:
            self._locked(insert)
        return len(rows), done

    async def set_status(
        self,
        job_id: str,
        status: str,
        *,
        start_time: str | None = None,
        end_time: str | None = None,
    ) -> None:
        """Set the job's status, and its start/end time when given."""

        def update(conn: sqlite3.Connection) -> None:
            with _transaction(conn):
                cursor = conn.execute(
                    "UPDATE jobs SET status = ?, start_time = coalesce(?, start_time), "
                    "end_time = coalesce(?, end_time) WHERE job_id = ?",
                    (status, start_time, end_time, job_id),
                )
                if cursor.rowcount == 0:
                    raise QueueError(f"there is no job {job_id}.")

        await self._run(update)

    async def get_job(self, job_id: str) -> JobRecord | None:
        """The job as stored (counters as of the last commit), or ``None``."""

        def get(conn: sqlite3.Connection) -> JobRecord | None:
            row = conn.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE job_id = ?", (job_id,)
            ).fetchone()
            return None if row is None else _job(row)

        return await self._run(get)

    async def list_jobs(self, api_name: str | None = None) -> list[JobRecord]:
        """Jobs of ``api_name`` (or all), newest first."""

        def select(conn: sqlite3.Connection) -> list[JobRecord]:
            if api_name is None:
                rows = conn.execute(f"SELECT {_JOB_COLUMNS} FROM jobs ORDER BY job_id")
            else:
                rows = conn.execute(
                    f"SELECT {_JOB_COLUMNS} FROM jobs WHERE api_name = ? ORDER BY job_id",
                    (api_name,),
                )
            return [_job(row) for row in rows]

        return await self._run(select)

    async def find_resumable(self, api_name: str, digest: str) -> JobRecord | None:
        """The newest job of ``api_name`` with ``digest`` whose status is not an end state."""
        ends = sorted(END_STATES)
        marks = ", ".join("?" * len(ends))

        def find(conn: sqlite3.Connection) -> JobRecord | None:
            row = conn.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE api_name = ? AND digest = ? "
                f"AND status NOT IN ({marks}) ORDER BY job_id LIMIT 1",
                (api_name, digest, *ends),
            ).fetchone()
            return None if row is None else _job(row)

        return await self._run(find)

    async def delete_job(self, job_id: str) -> None:
        """Forget the job and its batches; its dead-letter files stay. Unknown ids are ignored."""
        self._not_feeding(job_id, "delete")

        def delete(conn: sqlite3.Connection) -> None:
            row = conn.execute("SELECT jid FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
            if row is not None:
                self._delete_rows(int(row[0]), conn)

        await self._run(delete)

    async def progress(self, job_id: str) -> Progress:
        """The job's counters: live from memory while its feed is open, else as stored."""
        feed = self._feeds.get(job_id)
        if feed is not None:
            await anyio.lowlevel.checkpoint()
            return feed.progress()
        job = await self.get_job(job_id)
        if job is None:
            raise QueueError(f"there is no job {job_id}.")
        return _progress(job, 0)

    def dead_letter_dir(self, job_id: str) -> Path:
        """``dead_letter_root/<job_id>``: one ``batch-<seq>.json`` per dead batch."""
        return self._dead_letter_root / job_id

    async def list_dead_letters(self, job_id: str) -> list[Path]:
        """The job's dead-letter files, ordered by batch number."""
        directory = self.dead_letter_dir(job_id)

        def scan() -> list[Path]:
            try:
                found = [(_dead_letter_seq(p), p) for p in directory.iterdir()]
            except FileNotFoundError:
                return []
            return [p for seq, p in sorted((s, p) for s, p in found if s is not None)]

        return await anyio.to_thread.run_sync(scan)

    # -- dispatch -------------------------------------------------------------------------

    @asynccontextmanager
    async def open_feed(
        self, job_id: str, *, max_attempts: int, buffer: int = 1024
    ) -> AsyncIterator[EmbeddedFeed]:
        """Consume the job's pending batches (one feed per job at a time).

        Leaving the block closes the feed and commits every ack and failure reported.
        """
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if buffer < 1:
            raise ValueError("buffer must be at least 1")
        if job_id in self._feeds:
            raise QueueError(f"job {job_id} already has an open feed.")
        self._feeds[job_id] = None
        try:

            def load(conn: sqlite3.Connection) -> tuple[int, JobRecord]:
                jid = self._jid(conn, job_id)
                row = conn.execute(
                    f"SELECT {_JOB_COLUMNS} FROM jobs WHERE jid = ?", (jid,)
                ).fetchone()
                return jid, _job(row)

            jid, job = await self._run(load)
            if job.total_batches is None:
                raise QueueError(f"job {job_id} has not finished enqueueing.")
            feed = EmbeddedFeed(self, jid, job, max_attempts, buffer)
            self._feeds[job_id] = feed
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(feed._run_feeder)
                    tg.start_soon(feed._run_committer)
                    try:
                        yield feed
                    finally:
                        feed._shut_down()
            except BaseExceptionGroup as group:
                # One failure (the caller's, or a database error) is raised as itself.
                if len(group.exceptions) != 1:
                    raise
                exc = group.exceptions[0]
                context = exc.__context__
                try:
                    raise exc
                finally:
                    exc.__context__ = context
                    del exc, group
        finally:
            del self._feeds[job_id]


class EmbeddedFeed:
    """The consuming side of one job (:class:`~supervisor.queues.base.Feed`).

    Made by :meth:`EmbeddedQueue.open_feed`; see the module docstring for how it works.
    """

    __slots__ = (
        "_acks",
        "_base",
        "_buffer",
        "_closed",
        "_commit_done",
        "_committer_wakeup",
        "_cursor",
        "_dead",
        "_dead_letter_dir",
        "_deads",
        "_exhausted",
        "_failed",
        "_failed_attempts",
        "_feeder_scope",
        "_feeder_wakeup",
        "_hurry",
        "_in_flight",
        "_jid",
        "_job_id",
        "_limit",
        "_low_water",
        "_max_attempts",
        "_n_buffered",
        "_n_committed",
        "_queue",
        "_ready",
        "_receivers_wakeup",
        "_stopped",
        "_stopping",
        "_succeeded",
        "_time_sum",
        "_total",
        "_unsaved_time",
    )

    def __init__(
        self, queue: EmbeddedQueue, jid: int, job: JobRecord, max_attempts: int, buffer: int
    ) -> None:
        self._queue = queue
        self._jid = jid
        self._job_id = job.job_id
        self._dead_letter_dir = queue.dead_letter_dir(job.job_id)
        self._base = jid << _SEQ_BITS
        self._max_attempts = max_attempts
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
        self._ready: deque[Delivery] = deque()
        self._in_flight: dict[int, int] = {}  # seq -> attempt
        self._cursor = -1  # the last seq read from the file
        self._exhausted = False  # every pending batch has been read into memory
        self._closed = False
        self._receivers_wakeup: anyio.Event | None = None
        self._feeder_wakeup: anyio.Event | None = None
        self._feeder_scope = anyio.CancelScope()
        # Commit buffers.
        self._acks: list[int] = []
        self._failed: list[tuple[int, int, bytes]] = []  # seq, attempt, encoded AttemptRecord
        self._deads: list[tuple[int, bytes]] = []  # seq, body
        self._unsaved_time = 0.0
        self._n_buffered = 0  # acks + failures reported
        self._n_committed = 0  # ... of which committed
        self._committer_wakeup: anyio.Event | None = None
        self._commit_done: anyio.Event | None = None
        self._hurry: anyio.Event | None = None  # set to end a group-commit window early
        self._stopping = False  # leaving open_feed: commit what is left, then stop
        self._stopped = False  # the committer has stopped: ack/fail are refused

    # -- the consumer's side --------------------------------------------------------------

    async def receive(self) -> Delivery | None:
        """The next batch, or ``None`` when the job has no more work or the feed is closed."""
        await anyio.lowlevel.checkpoint()
        while True:
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
            wakeup = self._receivers_wakeup
            if wakeup is None:
                wakeup = self._receivers_wakeup = anyio.Event()
            await wakeup.wait()

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
        self._resolve(d)
        self._failed_attempts += 1
        if record.attempt != d.attempt:
            record = msgspec.structs.replace(record, attempt=d.attempt)
        self._failed.append((d.seq, d.attempt, _record_encoder.encode(record)))
        if d.attempt < self._max_attempts:
            self._ready.append(Delivery(d.seq, d.body, d.attempt + 1))
            self._wake_receivers()
        else:
            self._dead += 1
            self._deads.append((d.seq, d.body))
        self._buffered()

    def release(self, d: Delivery) -> None:
        """Give ``d`` back without counting an attempt (its container was restarted under it):
        it is delivered again next, with the same attempt number."""
        self._resolve(d)
        self._ready.appendleft(d)
        self._wake_receivers()

    def close(self) -> None:
        """Stop: ``receive`` returns ``None`` from now on; unsent batches stay pending."""
        self._closed = True
        self._wake_receivers()
        self._wake_feeder()

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

    # -- bookkeeping ----------------------------------------------------------------------

    def _resolve(self, d: Delivery) -> None:
        if self._stopped:
            raise QueueError(f"the feed of job {self._job_id} is no longer open.")
        attempt = self._in_flight.pop(d.seq, None)
        if attempt != d.attempt:
            if attempt is not None:
                self._in_flight[d.seq] = attempt
            raise QueueError(f"batch {d.seq} attempt {d.attempt} is not in flight.")

    def _buffered(self) -> None:
        self._n_buffered += 1
        self._wake_committer()
        if not self._in_flight and not self._ready and self._exhausted:
            self._wake_receivers()

    def _wake_receivers(self) -> None:
        wakeup = self._receivers_wakeup
        if wakeup is not None:
            self._receivers_wakeup = None
            wakeup.set()

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

    def _wake_committer(self) -> None:
        wakeup = self._committer_wakeup
        if wakeup is not None:
            self._committer_wakeup = None
            wakeup.set()

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
                want = max(1, min(_PAGE, self._limit - len(self._ready)))
                rows = await self._queue._run(partial(self._read_page, self._cursor, want))
                ready = self._ready
                size = 0
                for seq, attempts, body in rows:
                    ready.append(Delivery(seq, body, attempts + 1))
                    size += len(body)
                if rows:
                    self._cursor = rows[-1][0]
                    # Bound the buffer by bytes too: 1,024 batches of 256 KiB would be 256 MiB.
                    per_row = max(1, size // len(rows))
                    self._limit = max(2, min(self._buffer, _BUFFER_BYTES // per_row))
                    self._low_water = self._limit // 2
                if len(rows) < want:
                    self._exhausted = True
                self._wake_receivers()

    def _read_page(
        self, after: int, limit: int, conn: sqlite3.Connection
    ) -> list[tuple[int, int, bytes]]:
        base = self._base
        return conn.execute(
            "SELECT b.id - ?, b.attempts, d.body FROM batches AS b "
            "JOIN bodies AS d ON d.id = b.id "
            f"WHERE b.id > ? AND b.id < ? AND b.state = {_PENDING} ORDER BY b.id LIMIT ?",
            (base, base + after, base + (1 << _SEQ_BITS), limit),
        ).fetchall()

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
                    with anyio.move_on_after(_COMMIT_WINDOW):
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
            await self._queue._run(commit)
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
        with _transaction(conn):
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
                    attempts=[_record_decoder.decode(r) for (r,) in records],
                )
                try:
                    _write_dead_letter(self._dead_letter_dir, letter)
                except OSError as e:
                    raise QueueError(
                        f"cannot write the dead letter of batch {seq} of job {self._job_id}: {e}"
                    ) from e
            if deads:
                conn.executemany(
                    f"UPDATE batches SET state = {_DEAD} WHERE id = ?",
                    [(base + seq,) for seq, _ in deads],
                )
            if acks:
                conn.executemany(
                    f"UPDATE batches SET state = {_SUCCEEDED} WHERE id = ?",
                    [(base + seq,) for seq in acks],
                )
            conn.execute(
                "UPDATE jobs SET succeeded = succeeded + ?, dead = dead + ?, "
                "failed_attempts = failed_attempts + ?, "
                "time_per_batch_sum = time_per_batch_sum + ? WHERE jid = ?",
                (len(acks), len(deads), len(failed), time_sum, self._jid),
            )
