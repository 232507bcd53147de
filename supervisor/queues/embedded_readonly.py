"""Reading an embedded queue file without opening the queue: :func:`read_jobs` (``list
--root``), while a supervisor may be writing to it. Nothing is created or changed: no
:class:`~supervisor.queues._sqlite.Storage`, no schema set-up, no ``-wal`` file left behind.
The queue itself is in ``embedded.py``.
"""

from __future__ import annotations

import sqlite3
import urllib.parse
from pathlib import Path

from supervisor.queues._sqlite import JOB_COLUMNS, job_from_row
from supervisor.queues.base import JobRecord, QueueError

__all__ = ["read_jobs"]


def read_jobs(path: Path, api_name: str | None = None) -> list[JobRecord]:
    """The jobs in the queue file ``path`` (of ``api_name``, or all), newest first, read
    without creating or changing anything, while a supervisor may be writing to it.

    With a ``-wal`` file beside it (a supervisor has it open, or was killed with it open) the
    file is read read-only through the WAL, taking part in SQLite's locking as any reader
    does. Without one, the file is complete in itself and is read as immutable (a read-only
    open would create the ``-wal`` and ``-shm`` files and leave them); if the file changed
    meanwhile (a supervisor opened it), it is read again.
    """
    wal = path.with_name(path.name + "-wal")
    uri = "file:" + urllib.parse.quote(str(path.absolute()))
    for _ in range(10):
        if wal.exists():
            return _select_jobs(path, uri + "?mode=ro", api_name)
        before = _identity(path)
        jobs = _select_jobs(path, uri + "?mode=ro&immutable=1", api_name)
        if not wal.exists() and _identity(path) == before:
            return jobs
    raise QueueError(f"the queue file {path} kept changing while being read; try again.")


def _identity(path: Path) -> tuple[int, int, int]:
    try:
        st = path.stat()
    except OSError as e:
        raise QueueError(f"cannot read the queue file {path}: {e.strerror or e}") from None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _select_jobs(path: Path, uri: str, api_name: str | None) -> list[JobRecord]:
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=10.0, isolation_level=None)
    except sqlite3.Error as e:
        raise QueueError(f"cannot open the queue file {path}: {e}") from None
    try:
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        if version == 3:
            columns = JOB_COLUMNS
        elif version == 2:  # before jobs.worker_counts
            columns = JOB_COLUMNS.replace("worker_counts", "NULL")
        else:
            raise QueueError(
                f"{path} is not a queue file this supervisor reads (queue format {version})."
            )
        where, args = ("", ()) if api_name is None else (" WHERE api_name = ?", (api_name,))
        rows = conn.execute(f"SELECT {columns} FROM jobs{where} ORDER BY job_id", args)
        return [job_from_row(row) for row in rows]
    except sqlite3.Error as e:
        raise QueueError(f"cannot read the queue file {path}: {e}") from None
    finally:
        conn.close()
