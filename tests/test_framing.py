"""Every way a worker may legally frame its answer ends the exchange: dispatch,
``/on-job-complete`` and the HTTP probe, against one real worker process with a port per
framing (``tests/workers/framings.py``).

A batch is acked on 200 only; any other status is a failed attempt, in every framing. After
an answer that ends the connection (close-delimited, HTTP/1.0, ``Connection: close``, a
close after a keep-alive answer) the next batch goes out on a new connection; after a
keep-alive answer, on the same one.
"""

from __future__ import annotations

import io
import json
import select
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from supervisor.config import HTTPGetAction, Probe
from supervisor.dispatch import dispatch_pod, send_job_complete
from supervisor.http.client import request
from supervisor.logs import Logger
from supervisor.probes import ProbeResult, check
from supervisor.queues.base import Progress
from supervisor.queues.embedded import EmbeddedQueue
from tests.helpers import TESTS, FakePod

pytestmark = pytest.mark.anyio

JOB = "f0a1b2c3d4e5f607"
WORKER = TESTS / "workers" / "framings.py"

# (framing, whether one connection carries every batch)
FRAMINGS = [
    ("length", True),
    ("chunked", True),
    ("interim", True),
    ("no_content", True),
    ("close_delimited", False),
    ("http10_stdlib", False),
    ("http10_length", False),
    ("connection_close", False),
    ("length_then_close", False),
]
# The status each batch asks the worker for: 200s are acked, the rest are failed attempts.
STATUSES = [200, 500, 200, 404, 200, 503, 200]


@pytest.fixture(scope="module")
def ports() -> Iterator[dict[str, int]]:
    """The framing worker's ports by framing; the worker lives as long as this module."""
    proc = subprocess.Popen(
        [sys.executable, "-u", str(WORKER)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        assert ready, "the framing worker did not start within 30 s"
        found: dict[str, int] = json.loads(proc.stdout.readline())
        yield found
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        proc.stdout.close()


async def stats(port: int) -> dict[str, int]:
    """POSTs and the connections that carried them since the last call (then reset)."""
    r = await request("127.0.0.1", port, "GET", "/stats", timeout=10)
    assert r.status == 200
    counts: dict[str, int] = json.loads(r.body_head)
    return counts


async def dispatch(
    tmp_path: Path,
    port: int,
    statuses: list[int],
    *,
    concurrency: int = 1,
) -> Progress:
    """Dispatch one batch per status to ``port`` (one attempt each); the final progress."""
    queue = await EmbeddedQueue.open(tmp_path / "q.sqlite3", dead_letter_root=tmp_path / "dl")
    batches = [json.dumps([{"i": i, "status": s}]).encode() for i, s in enumerate(statuses)]
    async with queue:
        await queue.create_job(JOB, "api", "digest", b"{}", "t0")
        await queue.enqueue(JOB, iter(batches))
        async with queue.open_feed(JOB, max_attempts=1) as feed:
            with anyio.fail_after(20):
                await dispatch_pod(
                    feed,
                    FakePod(port),
                    job_id=JOB,
                    concurrency=concurrency,
                    log=Logger(io.StringIO()),
                )
            return feed.progress()


@pytest.mark.parametrize(("framing", "keep_alive"), FRAMINGS)
async def test_every_framing_ends_every_batch(
    tmp_path: Path, ports: dict[str, int], framing: str, keep_alive: bool
) -> None:
    port = ports[framing]
    await stats(port)  # forget what earlier tests sent
    progress = await dispatch(tmp_path, port, STATUSES)
    n = len(STATUSES)
    ok = 0 if framing == "no_content" else STATUSES.count(200)  # 204 is not 200
    assert (progress.succeeded, progress.dead, progress.failed_attempts) == (ok, n - ok, n - ok)
    assert progress.in_flight == progress.in_queue == 0
    assert await stats(port) == {"posts": n, "connections": 1 if keep_alive else n}


@pytest.mark.parametrize("framing", ["close_delimited", "http10_stdlib", "length_then_close"])
async def test_connection_ending_answers_under_concurrency(
    tmp_path: Path, ports: dict[str, int], framing: str
) -> None:
    port = ports[framing]
    await stats(port)
    progress = await dispatch(tmp_path, port, [200] * 40, concurrency=4)
    assert (progress.succeeded, progress.failed_attempts) == (40, 0)
    assert await stats(port) == {"posts": 40, "connections": 40}


@pytest.mark.parametrize(("framing", "_keep_alive"), FRAMINGS)
async def test_job_complete_ends_on_every_framing(
    ports: dict[str, int], framing: str, _keep_alive: bool
) -> None:
    with anyio.fail_after(20):
        handled = await send_job_complete(
            ports[framing], job_id=JOB, succeeded=1, failed=0, log=Logger(io.StringIO())
        )
    assert handled


@pytest.mark.parametrize(("framing", "_keep_alive"), FRAMINGS)
async def test_http_probe_ends_on_every_framing(
    ports: dict[str, int], framing: str, _keep_alive: bool
) -> None:
    probe = Probe(http_get=HTTPGetAction(port=ports[framing], path="/"), timeout_seconds=10)
    with anyio.fail_after(20):
        result = await check(probe)
    status = 204 if framing == "no_content" else 200
    assert result == ProbeResult(True, f"HTTP {status}")
