"""SQLite storage of the embedded queue: schema, connection settings, row mapping.

Shared by :mod:`supervisor.queues.embedded` (jobs, enqueueing) and
:mod:`supervisor.queues.embedded_feed` (dispatch); see the former for the theory.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final, TypeVar

import msgspec

from supervisor.queues.base import (
    AttemptRecord,
    DeadLetter,
    JobRecord,
    Progress,
    QueueError,
    dead_letter_name,
)

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
