"""The embedded queue: delivery, attempts, dead letters, resume, body files, and a real SIGKILL
crash."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import sys
import textwrap
import traceback
from collections import Counter
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path

import anyio
import anyio.lowlevel
import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from supervisor.errors import JobError
from supervisor.jobs import new_job_id
from supervisor.queues import _sqlite
from supervisor.queues._sqlite import BUFFER_BYTES, body_dir, body_path
from supervisor.queues.base import AttemptRecord, DeadLetter, Delivery, JobQueue, QueueError
from supervisor.queues.embedded import EmbeddedFeed, EmbeddedQueue
from supervisor.queues.embedded_feed import _runs

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[1]
JOB = "7e5c6d1f00000001"


def body(i: int) -> bytes:
    return b'[{"item": %d}, "x"]' % i


async def new_job(q: EmbeddedQueue, n: int, *, job_id: str = JOB, chunk: int = 2048) -> None:
    await q.create_job(job_id, "api", "digest", b'{"job_id": "%s"}' % job_id.encode(), "t0")
    assert await q.enqueue(job_id, (body(i) for i in range(n)), chunk=chunk) == n


def record(
    d: Delivery,
    *,
    status: int | None = None,
    error: str | None = None,
    response_head: str = "",
    stderr_tail: str = "",
) -> AttemptRecord:
    return AttemptRecord(
        attempt=d.attempt,
        status=status,
        error=error,
        response_head=response_head,
        stderr_tail=stderr_tail,
        time="2024-01-01T00:00:00Z",
    )


async def drain(feed: EmbeddedFeed) -> list[Delivery]:
    """Receive everything (acking each) with one consumer."""
    got = []
    while (d := await feed.receive()) is not None:
        got.append(d)
        feed.ack(d, 0.5)
    return got


async def drain_reopened(path: Path, max_attempts: int) -> list[Delivery]:
    """Open the queue at ``path`` afresh (as after a crash) and :func:`drain` the job."""
    async with await EmbeddedQueue.open(path) as q:
        with anyio.fail_after(10):
            async with q.open_feed(JOB, max_attempts=max_attempts) as feed:
                return await drain(feed)


def table_counts(path: Path) -> dict[str, int]:
    conn = sqlite3.connect(path)
    try:
        return {
            t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
            for t in ("jobs", "batches", "attempts")
        }
    finally:
        conn.close()


def body_file(path: Path, job_id: str = JOB) -> Path:
    """The body file of ``job_id`` in the queue file ``path``."""
    conn = sqlite3.connect(path)
    try:
        (jid,) = conn.execute("SELECT jid FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
    finally:
        conn.close()
    return body_path(path, jid)


def body_files(path: Path) -> list[str]:
    directory = body_dir(path)
    return sorted(os.listdir(directory)) if directory.exists() else []


def succeeded_seqs(path: Path) -> set[int]:
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute("SELECT id FROM batches WHERE state = 1").fetchall()
        return {r[0] & 0xFFFFFFFF for r in rows}
    finally:
        conn.close()


async def test_every_batch_delivered_once_to_concurrent_consumers(tmp_path: Path) -> None:
    n, k = 1000, 8
    seen: list[Delivery] = []
    async with await EmbeddedQueue.open(tmp_path / "q.sqlite3") as eq:
        q: JobQueue = eq  # the embedded queue implements the interface
        await eq.create_job(JOB, "api", "digest", b"{}", "t0")
        assert await q.enqueue(JOB, (body(i) for i in range(n)), chunk=64) == n
        with anyio.fail_after(20):
            async with q.open_feed(JOB, max_attempts=1, buffer=50) as feed:

                async def consumer() -> None:
                    while (d := await feed.receive()) is not None:
                        seen.append(d)
                        if d.seq % 3 == 0:
                            await anyio.lowlevel.checkpoint()  # a "request" in between
                        feed.ack(d, 0.25)

                async with anyio.create_task_group() as tg:
                    for _ in range(k):
                        tg.start_soon(consumer)
                p = feed.progress()
                assert (p.total, p.succeeded, p.in_flight, p.in_queue) == (n, n, 0, 0)
                assert p.average_time_per_batch == pytest.approx(0.25)
                assert await feed.receive() is None
        job = await q.get_job(JOB)
        assert job is not None
        assert (job.total_batches, job.succeeded, job.dead, job.failed_attempts) == (n, n, 0, 0)
        assert job.time_per_batch_sum == pytest.approx(0.25 * n)
    assert sorted(d.seq for d in seen) == list(range(n))
    assert all(d.body == body(d.seq) and d.attempt == 1 for d in seen)


async def test_one_attempt_then_dead_letter(tmp_path: Path) -> None:
    raw = b'[ {"a":1} ,\t"\\u00e9 \xc3\xa9" , 1.50e3 ]'
    async with await EmbeddedQueue.open(tmp_path / "q.sqlite3") as q:
        await q.create_job(JOB, "api", "digest", b"{}", "t0")
        assert await q.enqueue(JOB, iter([body(0), raw, body(2)])) == 3
        with anyio.fail_after(10):
            async with q.open_feed(JOB, max_attempts=1) as feed:
                while (d := await feed.receive()) is not None:
                    if d.seq == 1:
                        assert d.body == raw
                        feed.fail(
                            d,
                            record(d, status=500, response_head="oops", stderr_tail="Trace\n"),
                        )
                    else:
                        feed.ack(d, 0.1)
                p = feed.progress()
                assert (p.succeeded, p.dead, p.failed_attempts, p.in_queue) == (2, 1, 1, 0)
        assert await q.list_dead_letters(JOB) == [q.dead_letter_dir(JOB) / "batch-1.json"]
        data = (q.dead_letter_dir(JOB) / "batch-1.json").read_bytes()
        job = await q.get_job(JOB)
        assert job is not None
        assert (job.succeeded, job.dead, job.failed_attempts) == (2, 1, 1)
    assert raw in data  # embedded byte for byte
    letter = msgspec.json.decode(data, type=DeadLetter)
    assert (letter.job_id, letter.batch, bytes(letter.body)) == (JOB, 1, raw)
    assert letter.attempts == [
        AttemptRecord(
            attempt=1,
            status=500,
            response_head="oops",
            stderr_tail="Trace\n",
            time="2024-01-01T00:00:00Z",
        )
    ]


async def test_three_attempts_then_dead_letter(tmp_path: Path) -> None:
    attempts = []
    async with await EmbeddedQueue.open(tmp_path / "q.sqlite3") as q:
        await new_job(q, 2)
        with anyio.fail_after(10):
            async with q.open_feed(JOB, max_attempts=3) as feed:
                while (d := await feed.receive()) is not None:
                    if d.seq == 0:
                        attempts.append(d.attempt)
                        feed.fail(d, record(d, error=f"timed out after {d.attempt}s"))
                    else:
                        feed.ack(d, 0.1)
        job = await q.get_job(JOB)
        assert job is not None
        assert (job.succeeded, job.dead, job.failed_attempts) == (1, 1, 3)
        (path,) = await q.list_dead_letters(JOB)
    assert attempts == [1, 2, 3]
    letter = msgspec.json.decode(path.read_bytes(), type=DeadLetter)
    assert bytes(letter.body) == body(0)
    assert [(a.attempt, a.error) for a in letter.attempts] == [
        (i, f"timed out after {i}s") for i in (1, 2, 3)
    ]


async def test_fails_twice_then_succeeds(tmp_path: Path) -> None:
    async with await EmbeddedQueue.open(tmp_path / "q.sqlite3") as q:
        await new_job(q, 1)
        with anyio.fail_after(10):
            async with q.open_feed(JOB, max_attempts=3) as feed:
                while (d := await feed.receive()) is not None:
                    if d.attempt < 3:
                        feed.fail(d, record(d, error="connection reset"))
                    else:
                        feed.ack(d, 2.0)
                p = feed.progress()
                assert (p.succeeded, p.dead, p.failed_attempts) == (1, 0, 2)
                assert p.average_time_per_batch == 2.0
        job = await q.get_job(JOB)
        assert job is not None
        assert (job.succeeded, job.dead, job.failed_attempts) == (1, 0, 2)
        assert await q.list_dead_letters(JOB) == []


async def test_close_wakes_every_waiter(tmp_path: Path) -> None:
    results: list[Delivery | None] = []
    async with await EmbeddedQueue.open(tmp_path / "q.sqlite3") as q:
        await new_job(q, 2)
        with anyio.fail_after(10):
            async with q.open_feed(JOB, max_attempts=1) as feed:
                held = [await feed.receive(), await feed.receive()]

                async def waiter() -> None:
                    results.append(await feed.receive())

                async with anyio.create_task_group() as tg:
                    for _ in range(5):
                        tg.start_soon(waiter)
                    await anyio.wait_all_tasks_blocked()
                    assert results == []  # the two batches in flight may still come back
                    feed.close()
                assert results == [None] * 5
                assert await feed.receive() is None
                for d in held:
                    assert d is not None
                    feed.ack(d, 0.1)  # in-flight batches may still finish
        job = await q.get_job(JOB)
        assert job is not None
        assert job.succeeded == 2


async def test_waiters_woken_by_retry_and_by_the_last_resolution(tmp_path: Path) -> None:
    results: list[Delivery | None] = []
    async with await EmbeddedQueue.open(tmp_path / "q.sqlite3") as q:
        await new_job(q, 1)
        with anyio.fail_after(10):
            async with q.open_feed(JOB, max_attempts=2) as feed:
                first = await feed.receive()
                assert first is not None

                async def waiter() -> None:
                    results.append(await feed.receive())

                async with anyio.create_task_group() as tg:
                    for _ in range(3):
                        tg.start_soon(waiter)
                    await anyio.wait_all_tasks_blocked()
                    assert results == []
                    feed.fail(first, record(first, status=503))
                    await anyio.wait_all_tasks_blocked()
                    # One waiter got the retry; the others wait for it to resolve.
                    (retry,) = results
                    assert retry == Delivery(0, body(0), 2)
                    feed.ack(retry, 0.1)
                assert results == [retry, None, None]


async def test_misuse_is_refused(tmp_path: Path) -> None:
    async with await EmbeddedQueue.open(tmp_path / "q.sqlite3") as q:
        await new_job(q, 2)
        with pytest.raises(QueueError, match="already exists"):
            await q.create_job(JOB, "api", "digest", b"{}", "t0")
        with anyio.fail_after(10):
            async with q.open_feed(JOB, max_attempts=2) as feed:
                with pytest.raises(QueueError, match="already has an open feed"):
                    async with q.open_feed(JOB, max_attempts=2):
                        pass
                with pytest.raises(QueueError, match="while its feed is open"):
                    await q.delete_job(JOB)
                d = await feed.receive()
                assert d is not None
                feed.fail(d, record(d))
                with pytest.raises(QueueError, match="not in flight"):
                    feed.ack(d, 0.1)  # attempt 1 was already failed
                await drain(feed)
            with pytest.raises(QueueError, match="no longer open"):
                feed.ack(d, 0.1)
            with pytest.raises(QueueError, match="there is no job"):
                async with q.open_feed("nope", max_attempts=1):
                    pass


async def test_an_error_in_the_block_propagates_and_acks_are_kept(tmp_path: Path) -> None:
    async with await EmbeddedQueue.open(tmp_path / "q.sqlite3") as q:
        await new_job(q, 10)
        with anyio.fail_after(10), pytest.raises(ValueError, match="consumer broke"):
            async with q.open_feed(JOB, max_attempts=1) as feed:
                for _ in range(4):
                    d = await feed.receive()
                    assert d is not None
                    feed.ack(d, 0.1)
                raise ValueError("consumer broke")
        job = await q.get_job(JOB)
        assert job is not None
        assert job.succeeded == 4


async def test_bad_input_leaves_nothing_enqueued(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite3"

    def bad() -> Iterator[bytes]:
        for i in range(35):
            yield body(i)
        raise JobError("data.ndjson line 36: not valid JSON")

    async with await EmbeddedQueue.open(path) as q:
        await q.create_job(JOB, "api", "digest", b"{}", "t0")
        with anyio.fail_after(10), pytest.raises(JobError, match="line 36"):
            await q.enqueue(JOB, bad(), chunk=10)
        assert await q.get_job(JOB) is None
        assert await q.list_jobs() == []
    assert table_counts(path) == {"jobs": 0, "batches": 0, "attempts": 0}
    assert body_files(path) == []


async def test_a_bad_item_raises_outside_the_storage(tmp_path: Path) -> None:
    """The iterator (the splitter) is read outside the storage: while it runs, the storage is
    free (its lock not held), earlier chunks are committed, and its error reaches the caller
    through no storage code; the job is then rolled back."""
    path = tmp_path / "q.sqlite3"
    seen: list[int] = []

    async with await EmbeddedQueue.open(path) as q:
        storage = q._storage

        def count_rows(conn: sqlite3.Connection) -> int:
            (n,) = conn.execute("SELECT count(*) FROM batches").fetchone()
            return int(n)

        def bad() -> Iterator[bytes]:
            for i in range(35):
                yield body(i)
            # A worker thread, as the splitter's: inside the storage this would deadlock.
            seen.append(storage.call(count_rows))
            raise JobError("data.ndjson line 36: not valid JSON")

        await q.create_job(JOB, "api", "digest", b"{}", "t0")
        with anyio.fail_after(10), pytest.raises(JobError, match="line 36") as caught:
            await q.enqueue(JOB, bad(), chunk=10)
        assert seen == [30]  # chunks 0-2 handed to the storage before chunk 3 was read
        files = {frame.filename for frame in traceback.extract_tb(caught.value.__traceback__)}
        assert _sqlite.__file__ not in files
        assert await q.list_jobs() == []
    assert table_counts(path) == {"jobs": 0, "batches": 0, "attempts": 0}
    assert body_files(path) == []


async def test_enqueue_again_starts_over(tmp_path: Path) -> None:
    async with await EmbeddedQueue.open(tmp_path / "q.sqlite3") as q:
        await new_job(q, 5)
        assert await q.enqueue(JOB, iter([b"[1]", b"[2]", b"[3]"])) == 3
        assert body_file(q.path).read_bytes() == b"[1][2][3]"  # emptied, then appended
        with anyio.fail_after(10):
            async with q.open_feed(JOB, max_attempts=1) as feed:
                got = await drain(feed)
        assert [(d.seq, d.body) for d in got] == [(0, b"[1]"), (1, b"[2]"), (2, b"[3]")]
        job = await q.get_job(JOB)
        assert job is not None
        assert (job.total_batches, job.succeeded) == (3, 3)


async def test_jobs_are_listed_found_and_deleted(tmp_path: Path) -> None:
    old, new = new_job_id(1_000_000_000), new_job_id(2_000_000_000)
    async with await EmbeddedQueue.open(tmp_path / "q.sqlite3") as q:
        await q.create_job(old, "api", "d1", b'{"a": 1}', "t1")
        await q.create_job(new, "api", "d1", b'{"a": 2}', "t2")
        await q.create_job("7000000000000000", "other", "d1", b"{}", "t3")
        assert [j.job_id for j in await q.list_jobs("api")] == [new, old]
        assert len(await q.list_jobs()) == 3
        job = await q.get_job(new)
        assert job is not None
        assert (job.status, job.spec_json, job.total_batches, job.start_time) == (
            "enqueuing",
            b'{"a": 2}',
            None,
            None,
        )

        found = await q.find_latest("api", "d1")
        assert found is not None and found.job_id == new
        await q.set_status(new, "succeeded", start_time="t4", end_time="t5", worker_counts=b"{}")
        found = await q.find_latest("api", "d1")  # ended jobs too: a re-run reports them
        assert found is not None and found.job_id == new
        assert (found.status, found.worker_counts) == ("succeeded", b"{}")
        await q.set_status(old, "running", start_time="t6")
        assert await q.find_latest("api", "d2") is None

        job = await q.get_job(new)
        assert job is not None
        assert (job.status, job.start_time, job.end_time) == ("succeeded", "t4", "t5")
        with pytest.raises(QueueError, match="there is no job"):
            await q.set_status("missing", "running")

        await new_job(q, 3, job_id="7000000000000001")
        p = await q.progress("7000000000000001")
        assert (p.total, p.succeeded, p.in_queue, p.average_time_per_batch) == (3, 0, 3, None)
        await q.delete_job("7000000000000001")
        assert await q.get_job("7000000000000001") is None
        await q.delete_job("7000000000000001")  # unknown ids are ignored
    assert table_counts(tmp_path / "q.sqlite3")["batches"] == 0


async def test_resume_delivers_only_what_was_not_acked(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite3"
    n = 100
    acked, failed, in_flight = set(), set(), set()
    async with await EmbeddedQueue.open(path) as q:
        await new_job(q, n)
        with anyio.fail_after(10):
            async with q.open_feed(JOB, max_attempts=3, buffer=16) as feed:
                for _ in range(30):
                    d = await feed.receive()
                    assert d is not None
                    if d.seq < 20:
                        feed.ack(d, 1.0)
                        acked.add(d.seq)
                    elif d.seq < 25 and d.attempt == 1:
                        feed.fail(d, record(d, status=500))
                        failed.add(d.seq)
                    else:
                        in_flight.add(d.seq)
                await feed.flush()
                feed.close()
    async with await EmbeddedQueue.open(path) as q:
        job = await q.get_job(JOB)
        assert job is not None
        assert (job.succeeded, job.dead, job.failed_attempts) == (20, 0, 5)
        assert job.time_per_batch_sum == pytest.approx(20.0)
        with anyio.fail_after(10):
            async with q.open_feed(JOB, max_attempts=3) as feed:
                p = feed.progress()
                assert (p.total, p.succeeded, p.in_queue) == (n, 20, 80)
                got = await drain(feed)
        job = await q.get_job(JOB)
        assert job is not None
        assert (job.succeeded, job.dead, job.failed_attempts) == (n, 0, 5)
    assert sorted(d.seq for d in got) == sorted(set(range(n)) - acked)
    assert in_flight <= {d.seq for d in got}
    assert {d.seq: d.attempt for d in got if d.attempt != 1} == dict.fromkeys(failed, 2)


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_acks_in_any_order_are_committed_exactly(tmp_path: Path, seed: int) -> None:
    """Acks are committed as runs of consecutive batches: gaps and disorder must survive."""
    path = tmp_path / "q.sqlite3"
    n = 300
    rng = random.Random(seed)
    async with await EmbeddedQueue.open(path) as q:
        await new_job(q, n)
        with anyio.fail_after(10):
            async with q.open_feed(JOB, max_attempts=3) as feed:
                taken = [await feed.receive() for _ in range(200)]
                rng.shuffle(taken)
                acked = set()
                for d in taken[: rng.randrange(50, 200)]:
                    assert d is not None
                    feed.ack(d, 0.5)
                    acked.add(d.seq)
                await feed.flush()
                feed.close()
    got = await drain_reopened(path, 3)
    assert sorted(d.seq for d in got) == sorted(set(range(n)) - acked)


@given(st.lists(st.integers(0, 60), min_size=1, unique=True))
def test_runs_cover_exactly_the_numbers(seqs: list[int]) -> None:
    runs = _runs(seqs)
    covered = [x for lo, hi in runs for x in range(lo, hi + 1)]
    assert covered == sorted(seqs)
    assert all(b[0] > a[1] + 1 for a, b in pairwise(runs))


CHILD = """
import os, signal, sys
import anyio
from supervisor.queues.base import AttemptRecord
from supervisor.queues.embedded import EmbeddedQueue

async def main(path, n):
    async with await EmbeddedQueue.open(path) as q:
        await q.create_job("JOB", "api", "digest", b"{}", "t0")
        await q.enqueue("JOB", (b"[%d]" % i for i in range(n)), chunk=100)
        async with q.open_feed("JOB", max_attempts=3, buffer=64) as feed:
            for _ in range(20):
                acked, failed = [], []
                for _ in range(10):
                    d = await feed.receive()
                    if d.attempt > 1:
                        print("inflight", d.seq, flush=True)  # a retry: leave it in flight
                    elif d.seq % 7 == 3:
                        feed.fail(d, AttemptRecord(attempt=d.attempt, error="boom"))
                        failed.append(d.seq)
                    else:
                        feed.ack(d, 0.01)
                        acked.append(d.seq)
                await feed.flush()
                print("acked", *acked, flush=True)
                print("failed", *failed, flush=True)
            for _ in range(5):
                print("inflight", (await feed.receive()).seq, flush=True)
            for _ in range(300):  # acked, not flushed: the crash comes while committing
                d = await feed.receive()
                if d.attempt == 1:
                    feed.ack(d, 0.01)
                await anyio.lowlevel.checkpoint()
            os.kill(os.getpid(), signal.SIGKILL)

anyio.run(main, sys.argv[1], int(sys.argv[2]))
"""


async def test_sigkill_mid_run_loses_no_flushed_ack(tmp_path: Path) -> None:
    path = tmp_path / "state" / "queue.sqlite3"
    n = 2000
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    with anyio.fail_after(60):
        child = await anyio.run_process(
            [sys.executable, "-c", textwrap.dedent(CHILD), str(path), str(n)], env=env, check=False
        )
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()
    flushed_acked: set[int] = set()
    flushed_failed: set[int] = set()
    in_flight: set[int] = set()
    for line in child.stdout.decode().splitlines():
        kind, *seqs = line.split()
        {"acked": flushed_acked, "failed": flushed_failed, "inflight": in_flight}[kind].update(
            map(int, seqs)
        )
    assert len(flushed_acked) > 100 and flushed_failed and in_flight

    succeeded = succeeded_seqs(path)
    async with await EmbeddedQueue.open(path) as q:
        job = await q.get_job("JOB")
        assert job is not None
        # Counters were committed with the batch states.
        assert (job.total_batches, job.succeeded, job.dead) == (n, len(succeeded), 0)
        assert job.failed_attempts == len(flushed_failed)
        assert flushed_acked <= succeeded
        with anyio.fail_after(20):
            async with q.open_feed("JOB", max_attempts=3) as feed:
                got = await drain(feed)
        job = await q.get_job("JOB")
        assert job is not None
        assert job.succeeded == n
    delivered = Counter(d.seq for d in got)
    assert max(delivered.values()) == 1
    assert not set(delivered) & flushed_acked
    assert set(delivered) | succeeded == set(range(n))
    assert not set(delivered) & succeeded
    assert in_flight <= set(delivered)
    attempts = {d.seq: d.attempt for d in got}
    assert {s: attempts[s] for s in flushed_failed} == dict.fromkeys(flushed_failed, 2)
    assert all(a == 1 for s, a in attempts.items() if s not in flushed_failed)


async def test_many_small_batches(tmp_path: Path) -> None:
    """Not a timing test: 20k batches through 32 consumers, all delivered once."""
    n = 20_000
    count = 0
    async with await EmbeddedQueue.open(tmp_path / "q.sqlite3") as q:
        await new_job(q, n)
        with anyio.fail_after(30):
            async with q.open_feed(JOB, max_attempts=1) as feed:

                async def consumer() -> None:
                    nonlocal count
                    while (d := await feed.receive()) is not None:
                        count += 1
                        feed.ack(d, 0.0)

                async with anyio.create_task_group() as tg:
                    for _ in range(32):
                        tg.start_soon(consumer)
        job = await q.get_job(JOB)
        assert job is not None
        assert (job.succeeded, count) == (n, n)


# -- body files -----------------------------------------------------------------------------

KIB = 1024


def sized(seq: int, size: int) -> bytes:
    """A body of ``size`` bytes that differs from batch to batch (except when tiny)."""
    head = b"%d:" % seq
    if size <= len(head):
        return head[:size]
    return head + bytes([65 + seq % 26]) * (size - len(head))


def mixed(n: int) -> list[bytes]:
    """Empty, tiny, small, 4 KiB and 256 KiB bodies: every read path of the feeder."""
    sizes = [0, 1, 80, 80, 4 * KIB, 80, 256 * KIB, 1, 80, 4 * KIB, 4 * KIB, 80]
    return [sized(i, sizes[i % len(sizes)]) for i in range(n)]


async def test_bodies_of_every_size_round_trip_in_order(tmp_path: Path) -> None:
    # 600 mixed (12.5 MiB), 1,000 of 4 KiB (runs longer than one read), 140 of 256 KiB
    # (35 MiB: more than the feeder may hold at once), then small ones again.
    bodies = mixed(600)
    bodies += [sized(600 + i, 4 * KIB) for i in range(1000)]
    bodies += [sized(1600 + i, 256 * KIB) for i in range(140)]
    bodies += [sized(1740 + i, 80) for i in range(300)]
    got: list[Delivery] = []
    path = tmp_path / "q.sqlite3"
    async with await EmbeddedQueue.open(path) as q:
        await q.create_job(JOB, "api", "digest", b"{}", "t0")
        with anyio.fail_after(20):
            assert await q.enqueue(JOB, iter(bodies), chunk=97) == len(bodies)
        assert body_file(path).stat().st_size == sum(map(len, bodies))
        with anyio.fail_after(20):
            async with q.open_feed(JOB, max_attempts=1) as feed:
                while (d := await feed.receive()) is not None:
                    # The bodies buffered stay within the bound (the first page included).
                    assert sum(len(r.body) for r in feed._ready) <= BUFFER_BYTES
                    got.append(d)
                    feed.ack(d, 0.0)
    assert [d.seq for d in got] == list(range(len(bodies)))
    assert [d.body for d in got] == bodies
    assert all(type(d.body) is bytes for d in got)


async def test_resume_reads_the_same_bodies(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite3"
    bodies = mixed(240)
    async with await EmbeddedQueue.open(path) as q:
        await q.create_job(JOB, "api", "digest", b"{}", "t0")
        assert await q.enqueue(JOB, iter(bodies), chunk=50) == len(bodies)
        with anyio.fail_after(10):
            async with q.open_feed(JOB, max_attempts=2) as feed:
                for _ in range(120):
                    d = await feed.receive()
                    assert d is not None
                    assert d.body == bodies[d.seq]
                    if d.seq % 3 == 0:
                        feed.ack(d, 0.1)  # leaves holes between the pending bodies
                    elif d.seq % 3 == 1:
                        feed.fail(d, record(d, status=500))
                await feed.flush()
                feed.close()
    got = await drain_reopened(path, 2)
    assert [d.seq for d in got] == [i for i in range(len(bodies)) if i >= 120 or i % 3]
    assert all(d.body == bodies[d.seq] for d in got)
    assert {d.seq for d in got if d.attempt == 2} == {i for i in range(120) if i % 3 == 1}


@pytest.mark.parametrize(
    ("size", "keep"),
    [(1000, 25_500), (256 * KIB, 600 * KIB)],  # read as one span / one read per body
    ids=["small", "big"],
)
async def test_a_truncated_body_file_is_an_error_not_a_wrong_body(
    tmp_path: Path, size: int, keep: int
) -> None:
    path = tmp_path / "q.sqlite3"
    async with await EmbeddedQueue.open(path) as q:
        await q.create_job(JOB, "api", "digest", b"{}", "t0")
        assert await q.enqueue(JOB, (sized(i, size) for i in range(50))) == 50
        os.truncate(body_file(path), keep)
        got: list[Delivery] = []
        with (
            anyio.fail_after(10),
            pytest.raises(
                QueueError, match=r"shorter than its batches say .* truncated or replaced"
            ),
        ):
            async with q.open_feed(JOB, max_attempts=1) as feed:
                while (d := await feed.receive()) is not None:
                    got.append(d)
                    feed.ack(d, 0.0)
        assert all(d.body == sized(d.seq, size) for d in got)

        body_file(path).unlink()
        with anyio.fail_after(10), pytest.raises(QueueError, match="cannot open the body file"):
            async with q.open_feed(JOB, max_attempts=1):
                pass


async def test_a_body_file_truncated_while_feeding_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite3"
    got: list[Delivery] = []
    async with await EmbeddedQueue.open(path) as q:
        await q.create_job(JOB, "api", "digest", b"{}", "t0")
        assert await q.enqueue(JOB, (sized(i, 1000) for i in range(200))) == 200
        with (
            anyio.fail_after(10),
            pytest.raises(
                QueueError, match=r"shorter than its batches say .* truncated or replaced"
            ),
        ):
            async with q.open_feed(JOB, max_attempts=1, buffer=8) as feed:
                while (d := await feed.receive()) is not None:
                    if not got:
                        os.truncate(body_file(path), 20_000)  # the feeder has read 8 at most
                    got.append(d)
                    feed.ack(d, 0.0)
        assert 0 < len(got) <= 20
        assert all(d.body == sized(d.seq, 1000) for d in got)
        job = await q.get_job(JOB)
        assert job is not None
        assert job.succeeded == len(got)  # what was acked before the error is kept


async def test_delete_job_removes_its_body_file(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite3"
    other = "7e5c6d1f00000002"
    async with await EmbeddedQueue.open(path) as q:
        await new_job(q, 10)
        await new_job(q, 3, job_id=other)
        kept = body_file(path, other)
        gone = body_file(path, JOB)
        assert gone.exists() and kept.exists()
        await q.delete_job(JOB)
        assert not gone.exists()
        assert body_files(path) == [kept.name]
    # A crash between deleting the rows and the file leaves the file: opening removes it.
    orphan = body_dir(path) / "99.bin"
    orphan.write_bytes(b"stale")
    async with await EmbeddedQueue.open(path) as q:
        assert body_files(path) == [kept.name]
        with anyio.fail_after(10):
            async with q.open_feed(other, max_attempts=1) as feed:
                assert [d.body for d in await drain(feed)] == [body(0), body(1), body(2)]


async def test_a_body_file_that_cannot_be_written_fails_the_enqueue(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite3"
    async with await EmbeddedQueue.open(path) as q:
        await q.create_job(JOB, "api", "digest", b"{}", "t0")
        body_dir(path).write_bytes(b"")  # a file where the directory should be
        with anyio.fail_after(10), pytest.raises(QueueError, match="cannot write the body file"):
            await q.enqueue(JOB, iter([body(0)]))
        assert await q.list_jobs() == []
    assert table_counts(path) == {"jobs": 0, "batches": 0, "attempts": 0}


async def test_empty_job_has_an_empty_body_file(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite3"
    async with await EmbeddedQueue.open(path) as q:
        await new_job(q, 0)
        assert body_file(path).read_bytes() == b""
        with anyio.fail_after(10):
            async with q.open_feed(JOB, max_attempts=1) as feed:
                assert await feed.receive() is None


@pytest.mark.parametrize(
    ("version", "says"),
    [(1, "was written by an older supervisor"), (4, "was written by a newer supervisor")],
)
async def test_a_file_of_another_format_is_refused(tmp_path: Path, version: int, says: str) -> None:
    path = tmp_path / "q.sqlite3"
    conn = sqlite3.connect(path)
    try:
        conn.execute("CREATE TABLE bodies (id INTEGER PRIMARY KEY, body BLOB NOT NULL)")
        conn.execute(f"PRAGMA user_version = {version}")
    finally:
        conn.close()
    with pytest.raises(QueueError) as info:
        await EmbeddedQueue.open(path)
    message = str(info.value)
    assert message.startswith(f"{path} {says}")
    assert "remove" in message
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone() == (version,)  # left as it was
    finally:
        conn.close()


async def test_a_format_2_file_is_upgraded_in_place(tmp_path: Path) -> None:
    """Format 3 only adds the final worker counts: a root written by the previous release
    keeps its jobs (a resume after upgrading the supervisor still works)."""
    path = tmp_path / "q.sqlite3"
    async with await EmbeddedQueue.open(path) as q:
        await new_job(q, 2)
    conn = sqlite3.connect(path)
    try:  # back to format 2: the column did not exist
        conn.execute("ALTER TABLE jobs DROP COLUMN worker_counts")
        conn.execute("PRAGMA user_version = 2")
        conn.commit()
    finally:
        conn.close()
    async with await EmbeddedQueue.open(path) as q:
        job = await q.get_job(JOB)
        assert job is not None and job.total_batches == 2 and job.worker_counts is None
        await q.set_status(JOB, "succeeded", worker_counts=b'{"succeeded":1}')
        job = await q.get_job(JOB)
        assert job is not None and job.worker_counts == b'{"succeeded":1}'
