"""The bench's inputs: items, the batch bodies built from them, job and NDJSON files.

Items are small JSON objects of about ``size`` bytes (80 by default: 1,000,000 of them make the
~80 MB item_list of the split scenario). A batch body is what the supervisor sends for them:
``[`` + the items joined by ``,`` + ``]``, so wrk and the Python peers post the same bytes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

_WORDS = b"alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike".split()


def item(i: int, size: int = 80) -> bytes:
    head = b'{"id":%d,"score":0.%03d,"text":"' % (i, i % 1000)
    text = b" ".join(_WORDS[(i + k) % len(_WORDS)] for k in range(size // 5 + 2))
    room = max(1, size - len(head) - 2)
    return head + text[:room] + b'"}'


def items(n: int, size: int = 80) -> list[bytes]:
    return [item(i, size) for i in range(n)]


def bodies(all_items: list[bytes], batch_size: int, limit: int) -> Iterator[bytes]:
    """The first ``limit`` batch bodies of ``all_items`` cut into batches of ``batch_size``."""
    for k in range(limit):
        chunk = all_items[k * batch_size : (k + 1) * batch_size]
        if not chunk:
            return
        yield b"[" + b",".join(chunk) + b"]"


def write_bodies(path: Path, all_items: list[bytes], batch_size: int, limit: int = 1000) -> Path:
    """One body per line (items hold no newline), for wrk's Lua script and the peers."""
    with path.open("wb") as f:
        for body in bodies(all_items, batch_size, limit):
            f.write(body + b"\n")
    return path


def write_item_list_job(path: Path, job_items: list[bytes], batch_size: int) -> Path:
    with path.open("wb") as f:
        f.write(b'{"workers":1,"item_list":{"batch_size":%d,"items":[' % batch_size)
        step = 65536
        for k in range(0, len(job_items), step):
            if k:
                f.write(b",")
            f.write(b",".join(job_items[k : k + step]))
        f.write(b"]}}\n")
    return path


def write_ndjson(path: Path, n: int, size: int = 80) -> Path:
    with path.open("wb") as f:
        step = 65536
        for k in range(0, n, step):
            f.write(b"\n".join(item(i, size) for i in range(k, min(n, k + step))) + b"\n")
    return path
