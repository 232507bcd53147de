"""Reading a user's file (an API file, a job file) whole, with a bound.

A path may name a FIFO (``<(...)`` in a shell) or a device: reading is what decides its size,
so the read stops one byte past ``limit`` instead of filling memory from ``/dev/zero``.
"""

from __future__ import annotations

import os
import sys
from typing import BinaryIO

__all__ = ["API_FILE_LIMIT", "JOB_FILE_LIMIT", "TooLarge", "read_limited"]

API_FILE_LIMIT = 16 * 1024 * 1024  # bytes: an API file is a few kilobytes
JOB_FILE_LIMIT = 256 * 1024 * 1024  # bytes: an item_list this big belongs in files or S3


class TooLarge(ValueError):
    def __init__(self, limit: int) -> None:
        super().__init__(f"the file is larger than {limit // (1024 * 1024)} MiB")
        self.limit = limit


def read_limited(path: str | os.PathLike[str], limit: int) -> bytes:
    """The bytes of ``path`` (``-``: stdin); :class:`TooLarge` past ``limit``, else OSError."""
    if os.fspath(path) == "-":
        return _read(sys.stdin.buffer, limit)
    with open(path, "rb") as f:
        return _read(f, limit)


def _read(f: BinaryIO, limit: int) -> bytes:
    data = f.read(limit + 1)
    if len(data) > limit:
        raise TooLarge(limit)
    return data
