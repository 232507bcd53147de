"""Storage of the embedded queue: :class:`Storage` (the connection, its lock, the worker-thread
calls), SQLite schema and settings, body files, row mapping.

Shared by :mod:`supervisor.queues.embedded` (jobs, enqueueing),
:mod:`supervisor.queues.embedded_feed` (dispatch) and, for the row mapping only,
:mod:`supervisor.queues.embedded_readonly` (reading a file without opening the queue); see the
first for the theory.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from itertools import accumulate, count
from pathlib import Path
from typing import Any, Final, TypeVar, TypeVarTuple, Unpack

import anyio
import msgspec

from supervisor.queues.base import (
    AttemptRecord,
    DeadLetter,
    JobRecord,
    QueueError,
    dead_letter_name,
)

T = TypeVar("T")
Args = TypeVarTuple("Args")

_SCHEMA_VERSION: Final = 3  # 3: jobs.worker_counts; 2: bodies in one file per job; 1: in SQLite
SEQ_BITS: Final = 32  # id = jid << 32 | seq
PENDING: Final = 0
SUCCEEDED: Final = 1
DEAD: Final = 2
PAGE: Final = 512  # rows per feeder read
BUFFER_BYTES: Final = 32 << 20  # batch bodies held in memory ahead of the consumers, at most
COMMIT_WINDOW: Final = 0.005  # seconds acks may wait to share a transaction
CHUNK_BYTES: Final = 16 << 20  # an enqueue chunk also ends at this many bytes
SPAN_BYTES: Final = 1 << 20  # the feeder reads contiguous small bodies with one pread, up to this
SPAN_BODY: Final = 16 << 10  # ... of bodies below this size (bigger ones: one pread each)
_IOV_MAX: Final = 1024  # buffers per writev (Linux)

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
    time_per_batch_sum REAL NOT NULL DEFAULT 0,
    worker_counts BLOB
);
CREATE INDEX IF NOT EXISTS jobs_by_api ON jobs (api_name, job_id);
CREATE TABLE IF NOT EXISTS batches (
    id INTEGER PRIMARY KEY,
    state INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    offset INTEGER NOT NULL,
    length INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS attempts (
    id INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    record BLOB NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS attempts_by_batch ON attempts (id, attempt);
"""

JOB_COLUMNS: Final = (
    "job_id, api_name, digest, spec_json, status, created_time, start_time, end_time, "
    "total_batches, succeeded, dead, failed_attempts, time_per_batch_sum, worker_counts"
)

record_decoder: Final = msgspec.json.Decoder(AttemptRecord)
_dead_letter_encoder: Final = msgspec.json.Encoder()


def job_from_row(row: Any) -> JobRecord:
    (
        job_id,
        api_name,
        digest,
        spec,
        status,
        created,
        start,
        end,
        total,
        ok,
        dead,
        failed,
        tpb,
        wc,
    ) = row
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
        worker_counts=None if wc is None else bytes(wc),
    )


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[None]:
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def connect(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA cache_size=-16384")
        conn.execute("PRAGMA mmap_size=17179869184")  # read pages straight from the page cache
        with transaction(conn):
            (version,) = conn.execute("PRAGMA user_version").fetchone()
            if version == 2:  # format 3 only adds a column: upgrade in place
                conn.execute("ALTER TABLE jobs ADD COLUMN worker_counts BLOB")
            elif version not in (0, _SCHEMA_VERSION):
                raise QueueError(_version_error(path, version))
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
            # Under the write lock, so no job is created meanwhile.
            _remove_orphan_body_files(conn, path)
    except BaseException:
        conn.close()
        raise
    return conn


class Storage:
    """The one owner of a queue file's SQLite connection: its lock, the worker-thread calls
    that use it, storing a job's batches (:meth:`append`), and its closing.
    :class:`~supervisor.queues.embedded.EmbeddedQueue` and its feeds reach the file only
    through it. The caller's batch iterator never runs inside it: the queue reads a chunk
    first, then hands it over.

    One worker thread at a time holds the connection (:meth:`call`); no sqlite call runs on
    the event loop's thread. Open with ``await Storage.open(path)``, close with
    :meth:`aclose`.
    """

    __slots__ = ("_conn", "_lock", "_path")

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn: sqlite3.Connection | None = conn
        self._lock = threading.Lock()
        self._path = path

    @classmethod
    async def open(cls, path: Path) -> Storage:
        """Open (creating or upgrading if needed) the queue file at ``path``."""
        try:
            conn = await anyio.to_thread.run_sync(connect, path)
        except (sqlite3.Error, OSError) as e:
            raise QueueError(f"cannot open the queue file {path}: {e}") from e
        return cls(conn, path)

    @property
    def path(self) -> Path:
        """The SQLite file."""
        return self._path

    def body_path(self, jid: int) -> Path:
        """The body file of job ``jid``."""
        return body_path(self._path, jid)

    def call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """In a worker thread: ``fn(conn)`` holding the connection's lock. An sqlite error
        becomes a :class:`QueueError`; so does a closed queue."""
        with self._lock:
            conn = self._conn
            if conn is None:
                raise QueueError(f"the queue {self._path} is closed.")
            try:
                return fn(conn)
            except sqlite3.Error as e:
                raise QueueError(f"the queue file {self._path} failed: {e}") from e

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """:meth:`call` in a worker thread."""
        return await anyio.to_thread.run_sync(self.call, fn)

    async def run_io(self, fn: Callable[[Unpack[Args]], T], *args: *Args) -> T:
        """``fn(*args)`` in a worker thread without the lock: file I/O (body files) that takes
        the connection with :meth:`call` only for its rows."""
        return await anyio.to_thread.run_sync(fn, *args)

    async def append(self, jid: int, fd: int, first: int, offset: int, bodies: list[bytes]) -> int:
        """Store ``bodies`` as batches ``first``, ``first + 1``, ... of job ``jid``: append
        them to its body file (open as ``fd``) at ``offset``, then commit their rows, so a
        committed row always points at bytes already written. Returns the end offset."""
        return await anyio.to_thread.run_sync(self._append, jid, fd, first, offset, bodies)

    def _append(self, jid: int, fd: int, first: int, offset: int, bodies: list[bytes]) -> int:
        lengths = list(map(len, bodies))
        starts = list(accumulate(lengths, initial=offset))  # one more: the end
        with writing(self.body_path(jid)):
            write_all(fd, bodies)  # before the rows that point at them are committed

        def insert(conn: sqlite3.Connection) -> None:
            with transaction(conn):
                conn.executemany(
                    "INSERT INTO batches (id, offset, length) VALUES (?, ?, ?)",
                    zip(count((jid << SEQ_BITS) + first), starts, lengths),
                )

        self.call(insert)
        return starts[-1]

    async def aclose(self) -> None:
        """Close the connection (once the call holding it, if any, is over)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self._close, conn)

    def _close(self, conn: sqlite3.Connection) -> None:
        with self._lock:
            conn.close()


def _version_error(path: Path, version: int) -> str:
    if version < 2:
        return (
            f"{path} was written by an older supervisor (queue format {version}, this one "
            f"reads format {_SCHEMA_VERSION}): remove it and its -wal and -shm files to start "
            "over (its jobs cannot be resumed)."
        )
    return (
        f"{path} was written by a newer supervisor (queue format {version}, this one reads "
        f"format {_SCHEMA_VERSION}): use that supervisor, or remove the file to start over."
    )


# -- body files ---------------------------------------------------------------------------


def body_dir(path: Path) -> Path:
    """The directory of the body files of the queue file ``path``: ``<path>-bodies``."""
    return path.with_name(path.name + "-bodies")


def body_path(path: Path, jid: int) -> Path:
    """The body file of job ``jid`` of the queue file ``path``."""
    return body_dir(path) / f"{jid}.bin"


def _remove_orphan_body_files(conn: sqlite3.Connection, path: Path) -> None:
    """Remove the body files of jobs that no longer exist (a crash right after a delete)."""
    directory = body_dir(path)
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return
    jids = {jid for (jid,) in conn.execute("SELECT jid FROM jobs")}
    for name in names:
        stem, dot, ext = name.partition(".")
        if dot and ext == "bin" and stem.isdigit() and int(stem) not in jids:
            (directory / name).unlink(missing_ok=True)


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """Raise an ``OSError`` of the block as a :class:`QueueError` naming the body file."""
    try:
        yield
    except OSError as e:
        raise QueueError(f"cannot write the body file {path}: {e}") from e


def create_body_file(path: Path) -> int:
    """Create (or empty) the body file ``path``; return a descriptor open for writing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)


def write_all(fd: int, parts: list[bytes]) -> None:
    """Write ``parts`` one after the other, a few syscalls for many parts, resuming short
    writes."""
    pending: list[bytes | memoryview] = list(parts)
    i = 0
    while i < len(pending):
        group = pending[i : i + _IOV_MAX]
        written = os.writev(fd, group)
        if written == 0 and any(map(len, group)):
            raise OSError(errno.EIO, "the file accepted no bytes")
        for part in group:
            if written < len(part):
                pending[i] = memoryview(part)[written:]
                break
            written -= len(part)
            i += 1


def sync_body_file(fd: int, path: Path) -> None:
    """Make the body file durable (a power cut included), with the directory entries
    leading to it."""
    os.fdatasync(fd)
    for directory in (path.parent, path.parent.parent):
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def pread(fd: int, length: int, offset: int) -> bytes | None:
    """The ``length`` bytes at ``offset``, or ``None`` if the file ends before."""
    data = os.pread(fd, length, offset)
    if len(data) == length:
        return data
    parts = [data]
    got = len(data)
    while got < length:
        more = os.pread(fd, length - got, offset + got)
        if not more:
            return None
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def write_dead_letter(directory: Path, letter: DeadLetter) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / dead_letter_name(letter.batch)
    tmp = final.with_name(final.name + ".tmp")
    tmp.write_bytes(_dead_letter_encoder.encode(letter))
    os.replace(tmp, final)


def dead_letter_seq(path: Path) -> int | None:
    name = path.name
    if not (name.startswith("batch-") and name.endswith(".json")):
        return None
    digits = name[len("batch-") : -len(".json")]
    return int(digits) if digits.isdigit() else None
