"""One split measurement in a fresh interpreter: ``python -m bench.splitjob MODE FORMAT PATH``.

MODE is ``idle`` (imports only: the baseline peak RSS), ``read`` (just read the file),
``stdlib`` (json.loads + json.dumps of each batch) or ``ours`` (supervisor.jobs.decode_submission
+ supervisor.split.iter_batches); FORMAT is ``item_list`` (PATH is a job JSON file) or
``ndjson`` (PATH is an NDJSON file, batches of 100 lines). Prints ``{"seconds", "batches",
"body_bytes", "maxrss_kib"}``: the work's wall time (imports excluded) and the process's peak
RSS at the end, which the caller compares with an ``idle`` run's.

Peak RSS is ``VmHWM`` from /proc/self/status, not ``ru_maxrss``: a child that subprocess
starts with vfork inherits its parent's ``ru_maxrss`` across exec (the bench process holds
hundreds of MB), while ``VmHWM`` belongs to the new address space. Elsewhere, ``ru_maxrss``.
"""

from __future__ import annotations

import itertools
import json
import resource
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from supervisor.jobs import decode_submission
from supervisor.split import iter_batches

BATCH = 100


def _read(fmt: str, path: Path) -> Iterator[bytes]:
    if fmt == "item_list":
        yield path.read_bytes()  # what `supervisor run` does with a job file
        return
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            yield chunk


def _stdlib(fmt: str, path: Path) -> Iterator[bytes]:
    if fmt == "item_list":
        job = json.loads(path.read_bytes())
        items = job["item_list"]["items"]
        size = job["item_list"]["batch_size"]
        for k in range(0, len(items), size):
            yield json.dumps(items[k : k + size]).encode()
        return
    with path.open("rb") as f:
        lines = (line for line in f if line.strip())
        while batch := list(itertools.islice(lines, BATCH)):
            yield json.dumps([json.loads(line) for line in batch]).encode()


def _ours(fmt: str, path: Path) -> Iterator[bytes]:
    if fmt == "item_list":
        sub = decode_submission(path.read_bytes(), str(path))
    else:
        where = sys.argv[3]  # an s3:// URL as given (a Path would fold its `//`)
        job = {"workers": 1, "delimited_files": {"s3_paths": [where], "batch_size": BATCH}}
        sub = decode_submission(json.dumps(job).encode())
    return iter_batches(sub)


def peak_rss_kib() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def main() -> None:
    mode, fmt, path = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    batches = body_bytes = 0
    t0 = time.perf_counter()
    if mode != "idle":
        work = {"read": _read, "stdlib": _stdlib, "ours": _ours}[mode]
        for body in work(fmt, path):
            batches += 1
            body_bytes += len(body)
    seconds = time.perf_counter() - t0
    maxrss = peak_rss_kib()
    out = {"seconds": seconds, "batches": batches, "body_bytes": body_bytes, "maxrss_kib": maxrss}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
