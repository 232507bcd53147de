"""The embedded job queue: one SQLite file (and a body file per job), for jobs run on one
machine (where it lives and how a job resumes: docs/operations.md, "The root" and "Resume and
re-run").

Theory of operation
-------------------
Storage. One SQLite file in WAL mode with ``synchronous=NORMAL``: a committed transaction
survives the process being killed (not necessarily a power cut). Beside it, in
``<file>-bodies/``, one append-only *body file* per job holds the batch bodies. Tables:

* ``jobs``: one row per job, with its counters (succeeded, dead, failed attempts, sum of
  times per batch). ``jid`` is a small integer key; the job's body file is ``<jid>.bin``.
* ``batches(id, state, attempts, offset, length)``: one row per batch, keyed by
  ``id = jid << 32 | seq``, so a job's batches are one rowid range, inserted in order and
  read in order with no extra index. ``offset`` and ``length`` locate its body in the body
  file, where bodies follow each other in ``seq`` order. The bodies stay out of SQLite
  because reading them back from a plain file with ``pread`` is several times faster than
  reading blobs, and marking a batch done rewrites a small row only.
* ``attempts(id, attempt, record)``: each failed attempt's :class:`AttemptRecord`, which
  become the dead letter's ``attempts``, also across crashes.

One :class:`~supervisor.queues._sqlite.Storage` owns the connection: one worker thread at
a time uses it, under its lock; no sqlite call and no read or write of a body file runs on
the event loop thread. The queue and its feeds reach the file only through it.

Enqueueing reads the caller's (blocking) iterator in chunks, so memory stays flat: a chunk
(at most ``chunk`` batches or ``CHUNK_BYTES``) is pulled from the iterator in a worker thread
of its own, outside the storage (splitting reads files and costs CPU; a bad item raises on
the enqueueing side), then handed to the storage, which appends its bodies to the body file
and then commits its rows, so a committed row always points at bytes already written. At the end the body file is
``fdatasync``-ed before ``total_batches`` is set (which marks the job enqueued and lets a
feed open it), so once a job is marked enqueued its bodies are on disk, even across a power
cut. It is all or nothing: if the iterator raises, the job's rows and its body file are
deleted. ``enqueue`` always starts from scratch: batches already stored for the job (a
crash while enqueueing) are deleted first and the body file is emptied. If ``enqueue`` is
cancelled, what it stored stays until the next ``enqueue`` or ``delete_job`` of that job.
``delete_job`` deletes the rows, then the body file; body files of jobs that no longer
exist (a crash in between, a failed removal) are removed when the queue is opened. A file
written by an older supervisor (format 1, bodies in SQLite) is refused with a message
saying to remove it.

Dispatching (:class:`EmbeddedFeed`) keeps the hot path in memory:

* a *feeder* task reads pending batches in ``seq`` order, a page of a few hundred rows per
  worker-thread call, into a bounded ``ready`` deque whenever it falls to half full (at most
  32 MiB of bodies, or one body if bigger). The rows are selected under the lock, then
  the bodies are read with ``pread`` from a descriptor the feed keeps open: adjacent small
  bodies with one read, big ones one read each. A body file shorter than its rows say
  raises :class:`QueueError` rather than deliver a cut body;
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
attempt number after the last *persisted* failed attempt. That is the rule of a lost
delivery without a dead-letter setting (``base.after_lost_delivery``), which the Redis
queue shares; here it holds with a dead-letter setting too, and there is no cap on lost
deliveries: only the process itself loses a delivery, and only a person re-running the
command delivers it again, so nothing loops by itself.

Pods sharing a job (heartbeats, joining, leaving) and the watch for joinable jobs
(:meth:`EmbeddedQueue.watch_jobs`) live in memory: this process is the only one that uses
the file, so a job starting or a pod leaving is announced by this queue object itself
(``embedded_watch.py``).

Reading the jobs of a queue file without opening the queue, while a supervisor may be
writing to it (``list --root``), is ``embedded_readonly.py``.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, suppress
from functools import partial
from pathlib import Path

import anyio
import anyio.abc
import anyio.lowlevel
import msgspec

from supervisor.errors import raise_single
from supervisor.jobs import END_STATES
from supervisor.lifecycle import may_join
from supervisor.queues._sqlite import (
    CHUNK_BYTES,
    JOB_COLUMNS,
    SEQ_BITS,
    Storage,
    create_body_file,
    dead_letter_seq,
    job_from_row,
    sync_body_file,
    transaction,
    writing,
)
from supervisor.queues.base import (
    RUNNING,
    DeadLetter,
    Heartbeat,
    JobRecord,
    Progress,
    QueueError,
    progress_of,
)
from supervisor.queues.embedded_feed import EmbeddedFeed
from supervisor.queues.embedded_watch import EmbeddedJobWatch, Joinable

__all__ = ["EmbeddedFeed", "EmbeddedQueue"]

_dead_letter_decoder = msgspec.json.Decoder(DeadLetter)


def _take(batches: Iterator[bytes], chunk: int) -> tuple[list[bytes], bool]:
    """Worker thread: the next bodies from ``batches``, up to ``chunk`` of them or
    ``CHUNK_BYTES``; and whether ``batches`` is exhausted."""
    bodies: list[bytes] = []
    size = 0
    for body in batches:
        bodies.append(body)
        size += len(body)
        if len(bodies) >= chunk or size >= CHUNK_BYTES:
            return bodies, False
    return bodies, True


def _delete_batches(conn: sqlite3.Connection, jid: int) -> None:
    lo, hi = jid << SEQ_BITS, (jid + 1) << SEQ_BITS
    for table in ("batches", "attempts"):
        conn.execute(f"DELETE FROM {table} WHERE id >= ? AND id < ?", (lo, hi))


def _jid(conn: sqlite3.Connection, job_id: str) -> int:
    row = conn.execute("SELECT jid FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
    if row is None:
        raise QueueError(f"there is no job {job_id}.")
    return int(row[0])


def _clear_batches(job_id: str, conn: sqlite3.Connection) -> int:
    with transaction(conn):
        jid = _jid(conn, job_id)
        _delete_batches(conn, jid)
        conn.execute(
            "UPDATE jobs SET total_batches = NULL, succeeded = 0, dead = 0, "
            "failed_attempts = 0, time_per_batch_sum = 0 WHERE jid = ?",
            (jid,),
        )
    return jid


class EmbeddedQueue(anyio.abc.AsyncResource):
    """The :class:`~supervisor.queues.base.JobQueue` kept in one SQLite file and body files.

    Open it with ``async with await EmbeddedQueue.open(path) as queue:``. Dead letters go to
    ``dead_letter_root/<job_id>/`` (default: ``dead-letters/`` beside the file).
    """

    def __init__(self, storage: Storage, dead_letter_root: Path) -> None:
        self._storage = storage
        self._dead_letter_root = dead_letter_root
        self._feeds: dict[str, EmbeddedFeed | None] = {}  # None while opening
        self._completions: set[str] = set()  # jobs whose /on-job-complete was claimed
        # job_id -> pod_id -> (state, monotonic time, lease): in memory, this process only
        self._beats: dict[str, dict[str, tuple[str, float, float]]] = {}
        self._joinable = Joinable()
        self._enqueuing: set[str] = set()  # created here, not given a status yet

    @classmethod
    async def open(
        cls, path: str | os.PathLike[str], *, dead_letter_root: str | os.PathLike[str] | None = None
    ) -> EmbeddedQueue:
        """Open (creating if needed) the queue file at ``path``."""
        file = Path(path)
        storage = await Storage.open(file)
        root = file.parent / "dead-letters" if dead_letter_root is None else Path(dead_letter_root)
        return cls(storage, root)

    @property
    def path(self) -> Path:
        """The SQLite file."""
        return self._storage.path

    @property
    def url(self) -> str:
        """``sqlite://<file>``."""
        return f"sqlite://{self._storage.path}"

    async def aclose(self) -> None:
        """Close the file. Feeds must have been left before."""
        await self._storage.aclose()

    # -- plumbing -------------------------------------------------------------------------

    def _not_feeding(self, job_id: str, doing: str) -> None:
        if job_id in self._feeds:
            raise QueueError(f"cannot {doing} job {job_id} while its feed is open.")

    # -- jobs -----------------------------------------------------------------------------

    async def create_job(
        self, job_id: str, api_name: str, digest: str, spec_json: bytes, created_time: str
    ) -> None:
        """Store a new job with status ``enqueuing`` and no batches."""

        def create(conn: sqlite3.Connection) -> None:
            with transaction(conn):
                if conn.execute("SELECT 1 FROM jobs WHERE job_id = ?", (job_id,)).fetchone():
                    raise QueueError(f"job {job_id} already exists.")
                conn.execute(
                    "INSERT INTO jobs (job_id, api_name, digest, spec_json, status, "
                    "created_time) VALUES (?, ?, ?, ?, 'enqueuing', ?)",
                    (job_id, api_name, digest, spec_json, created_time),
                )

        await self._storage.run(create)
        self._enqueuing.add(job_id)

    async def enqueue_in_progress(self, job_id: str) -> bool:
        """Whether this process is creating or enqueuing the job (one process per file)."""
        await anyio.lowlevel.checkpoint()
        return job_id in self._enqueuing

    async def enqueue(self, job_id: str, batches: Iterator[bytes], *, chunk: int = 2048) -> int:
        """Store ``batches`` as seq 0, 1, ... and return how many (see the module docstring)."""
        if chunk < 1:
            raise ValueError("chunk must be at least 1")
        self._not_feeding(job_id, "enqueue")
        storage = self._storage
        jid = await storage.run(partial(_clear_batches, job_id))
        path = storage.body_path(jid)
        count = 0
        try:
            with writing(path):
                fd = await storage.run_io(create_body_file, path)
            try:
                offset = 0
                done = False
                while not done:
                    # The iterator (the splitter: file reads, CPU) runs in a thread of its
                    # own, outside the storage: a bad item raises here.
                    bodies, done = await anyio.to_thread.run_sync(_take, batches, chunk)
                    if count + len(bodies) > 1 << SEQ_BITS:
                        raise QueueError(f"a job holds at most {1 << SEQ_BITS} batches.")
                    if bodies:
                        offset = await storage.append(jid, fd, count, offset, bodies)
                        count += len(bodies)
                    del bodies  # memory stays at one chunk
                with writing(path):
                    await storage.run_io(sync_body_file, fd, path)
            finally:
                os.close(fd)
        except BaseException:  # cancelled too: its client never got an answer
            self._enqueuing.discard(job_id)
            with anyio.CancelScope(shield=True):
                await storage.run(partial(self._delete_rows, jid))
            raise

        def finish(conn: sqlite3.Connection) -> None:
            with transaction(conn):
                conn.execute("UPDATE jobs SET total_batches = ? WHERE jid = ?", (count, jid))

        await storage.run(finish)
        return count

    def _delete_rows(self, jid: int, conn: sqlite3.Connection) -> None:
        """Delete the job and its batches, then its body file."""
        with transaction(conn):
            _delete_batches(conn, jid)
            conn.execute("DELETE FROM jobs WHERE jid = ?", (jid,))
        with suppress(OSError):  # the job is gone: if this fails, the next open removes it
            self._storage.body_path(jid).unlink(missing_ok=True)

    async def set_status(
        self,
        job_id: str,
        status: str,
        *,
        start_time: str | None = None,
        end_time: str | None = None,
        worker_counts: bytes | None = None,
    ) -> bool:
        """Set the job's status, and its end time and final worker counts when given; the
        start time only if none is stored (the first pod to start the job sets it). False,
        and nothing changed, if the job has ended already."""
        self._enqueuing.discard(job_id)

        def update(conn: sqlite3.Connection) -> tuple[str, str] | None:
            with transaction(conn):
                row = conn.execute(
                    "SELECT api_name, status FROM jobs WHERE job_id = ?", (job_id,)
                ).fetchone()
                if row is None:
                    raise QueueError(f"there is no job {job_id}.")
                if row[1] in END_STATES:
                    return None
                conn.execute(
                    "UPDATE jobs SET status = ?, start_time = coalesce(start_time, ?), "
                    "end_time = coalesce(?, end_time), "
                    "worker_counts = coalesce(?, worker_counts) WHERE job_id = ?",
                    (status, start_time, end_time, worker_counts, job_id),
                )
                return row[0], row[1]

        changed = await self._storage.run(update)
        if changed is None:
            return False
        api_name, was = changed
        if status == RUNNING and was != RUNNING:
            self._joinable.announce(api_name)
        return True

    async def get_job(self, job_id: str) -> JobRecord | None:
        """The job as stored (counters as of the last commit), or ``None``."""

        def get(conn: sqlite3.Connection) -> JobRecord | None:
            row = conn.execute(
                f"SELECT {JOB_COLUMNS} FROM jobs WHERE job_id = ?", (job_id,)
            ).fetchone()
            return None if row is None else job_from_row(row)

        return await self._storage.run(get)

    async def list_jobs(self, api_name: str | None = None) -> list[JobRecord]:
        """Jobs of ``api_name`` (or all), newest first."""

        def select(conn: sqlite3.Connection) -> list[JobRecord]:
            if api_name is None:
                rows = conn.execute(f"SELECT {JOB_COLUMNS} FROM jobs ORDER BY job_id")
            else:
                rows = conn.execute(
                    f"SELECT {JOB_COLUMNS} FROM jobs WHERE api_name = ? ORDER BY job_id",
                    (api_name,),
                )
            return [job_from_row(row) for row in rows]

        return await self._storage.run(select)

    async def running_jobs(self, api_name: str) -> list[JobRecord]:
        """The running jobs of ``api_name``, newest first."""

        def select(conn: sqlite3.Connection) -> list[JobRecord]:
            rows = conn.execute(
                f"SELECT {JOB_COLUMNS} FROM jobs WHERE api_name = ? AND status = ? ORDER BY job_id",
                (api_name, RUNNING),
            )
            return [job_from_row(row) for row in rows]

        return await self._storage.run(select)

    async def find_latest(self, api_name: str, digest: str) -> JobRecord | None:
        """The newest job of ``api_name`` with ``digest`` (the same command), in any state."""

        def find(conn: sqlite3.Connection) -> JobRecord | None:
            row = conn.execute(
                f"SELECT {JOB_COLUMNS} FROM jobs WHERE api_name = ? AND digest = ? "
                "ORDER BY job_id LIMIT 1",
                (api_name, digest),
            ).fetchone()
            return None if row is None else job_from_row(row)

        return await self._storage.run(find)

    async def delete_job(self, job_id: str) -> None:
        """Forget the job and its batches; its dead-letter files stay. Unknown ids are ignored."""
        self._not_feeding(job_id, "delete")
        self._enqueuing.discard(job_id)

        def delete(conn: sqlite3.Connection) -> None:
            row = conn.execute("SELECT jid FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
            if row is not None:
                self._delete_rows(int(row[0]), conn)

        await self._storage.run(delete)

    async def progress(self, job_id: str) -> Progress:
        """The job's counters: live from memory while its feed is open, else as stored."""
        feed = self._feeds.get(job_id)
        if feed is not None:
            await anyio.lowlevel.checkpoint()
            return feed.progress()
        job = await self.get_job(job_id)
        if job is None:
            raise QueueError(f"there is no job {job_id}.")
        return progress_of(job, 0)

    def dead_letter_dir(self, job_id: str) -> Path:
        """``dead_letter_root/<job_id>``: one ``batch-<seq>.json`` per dead batch."""
        return self._dead_letter_root / job_id

    async def list_dead_letters(self, job_id: str) -> list[Path]:
        """The job's dead-letter files, ordered by batch number."""
        directory = self.dead_letter_dir(job_id)

        def scan() -> list[Path]:
            try:
                found = [(dead_letter_seq(p), p) for p in directory.iterdir()]
            except FileNotFoundError:
                return []
            return [p for seq, p in sorted((s, p) for s, p in found if s is not None)]

        return await anyio.to_thread.run_sync(scan)

    # -- pods sharing a job: in memory (one process shares nothing with another here) -------

    async def try_join(self, job_id: str, pod_id: str, workers: int, lease: float) -> bool:
        """Admit ``pod_id`` while fewer than ``workers`` other pods are live."""
        await anyio.lowlevel.checkpoint()
        if not may_join(self._heartbeats(job_id), pod_id, workers):
            return False
        self._beats.setdefault(job_id, {})[pod_id] = ("creating", time.monotonic(), lease)
        return True

    async def heartbeat(self, job_id: str, pod_id: str, state: str, lease: float) -> None:
        """Note ``pod_id``'s state."""
        await anyio.lowlevel.checkpoint()
        self._beats.setdefault(job_id, {})[pod_id] = (state, time.monotonic(), lease)

    async def leave(self, job_id: str, pod_id: str) -> None:
        """Forget ``pod_id``'s heartbeat; if the job runs, wake the watchers of its API."""
        await anyio.lowlevel.checkpoint()
        if self._beats.get(job_id, {}).pop(pod_id, None) is None:
            return
        job = await self.get_job(job_id)
        if job is not None and job.status == RUNNING:
            self._joinable.announce(job.api_name)

    async def watch_jobs(self, api_name: str) -> EmbeddedJobWatch:
        """Watch for jobs of ``api_name`` that may have become joinable (in memory)."""
        await anyio.lowlevel.checkpoint()
        return EmbeddedJobWatch(self._joinable, api_name)

    async def pods(self, job_id: str) -> list[Heartbeat]:
        """The last heartbeat of each pod of the job."""
        await anyio.lowlevel.checkpoint()
        return self._heartbeats(job_id)

    def _heartbeats(self, job_id: str) -> list[Heartbeat]:
        now = time.monotonic()
        return [
            Heartbeat(pod_id, state, now - at, lease)
            for pod_id, (state, at, lease) in self._beats.get(job_id, {}).items()
        ]

    async def dead_letters(self, job_id: str) -> list[DeadLetter]:
        """The job's dead letters (the content of its files), by batch number."""
        paths = await self.list_dead_letters(job_id)

        def read() -> list[DeadLetter]:
            return [_dead_letter_decoder.decode(p.read_bytes()) for p in paths]

        return await anyio.to_thread.run_sync(read)

    @asynccontextmanager
    async def completion(self, job_id: str) -> AsyncIterator[bool]:
        """Claim the job's one ``/on-job-complete`` (in this process: one file, one
        supervisor): ``True`` once, when every batch is resolved and nothing is in flight."""
        progress = await self.progress(job_id)
        finished = progress.total is not None and progress.in_flight == progress.in_queue == 0
        if not finished or job_id in self._completions:
            yield False
            return
        self._completions.add(job_id)
        ok = False
        try:
            yield True
            ok = True
        finally:
            if not ok:
                self._completions.discard(job_id)

    # -- dispatch -------------------------------------------------------------------------

    @asynccontextmanager
    async def open_feed(
        self, job_id: str, *, max_attempts: int, count_lost: bool = True, buffer: int = 1024
    ) -> AsyncIterator[EmbeddedFeed]:
        """Consume the job's pending batches (one feed per job at a time).

        Leaving the block closes the feed and commits every ack and failure reported.
        ``count_lost`` changes nothing here: a delivery is lost only with this process, and
        the resume delivers it again uncounted (see the module docstring).
        """
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if buffer < 1:
            raise ValueError("buffer must be at least 1")
        if job_id in self._feeds:
            raise QueueError(f"job {job_id} already has an open feed.")
        self._feeds[job_id] = None
        try:

            def load(conn: sqlite3.Connection) -> tuple[int, JobRecord, int]:
                jid = _jid(conn, job_id)
                row = conn.execute(
                    f"SELECT {JOB_COLUMNS} FROM jobs WHERE jid = ?", (jid,)
                ).fetchone()
                job = job_from_row(row)
                if job.total_batches is None:
                    raise QueueError(f"job {job_id} has not finished enqueueing.")
                try:
                    fd = os.open(self._storage.body_path(jid), os.O_RDONLY)
                except OSError as e:
                    raise QueueError(f"cannot open the body file of job {job_id}: {e}") from e
                return jid, job, fd

            jid, job, fd = await self._storage.run(load)
            try:
                feed = EmbeddedFeed(
                    self._storage, jid, job, max_attempts, buffer, fd, self.dead_letter_dir(job_id)
                )
                self._feeds[job_id] = feed
                async with feed.running():
                    yield feed
            except BaseExceptionGroup as group:
                # One failure (the caller's, or a database error) is raised as itself.
                raise_single(group)
            finally:
                os.close(fd)  # the feeder's reads are over: its thread calls are not abandoned
        finally:
            del self._feeds[job_id]
