"""The queue contract: the same tests against every backend (embedded, Redis), on asyncio
and trio."""

from __future__ import annotations

import signal
import sys
import textwrap
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from supervisor.queues import open_queue
from supervisor.queues.base import (
    LOST_DELIVERY_CAP,
    AttemptRecord,
    Delivery,
    Feed,
    JobQueue,
    LostDelivery,
    QueueError,
    after_lost_delivery,
)
from tests.helpers import child_env

pytestmark = pytest.mark.anyio

JOB = "7e5c6d1f00000001"
LEASE = 2.0  # the Redis feeds' lease (nothing here waits for one to run out)


def body(i: int) -> bytes:
    return b'[{"item": %d}, "x"]' % i


def record(d: Delivery, error: str = "boom") -> AttemptRecord:
    return AttemptRecord(attempt=d.attempt, status=500, error=error, time="2024-01-01T00:00:00Z")


@pytest.fixture(params=["embedded", "redis"])
def queue_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "embedded":
        return str(tmp_path / "queue.db")
    return str(request.getfixturevalue("redis_url"))


@pytest.fixture
async def queue(queue_url: str) -> AsyncIterator[JobQueue]:
    async with open_queue(queue_url, lease=LEASE) as q:
        yield q


async def new_job(q: JobQueue, n: int, job_id: str = JOB, digest: str = "digest") -> None:
    await q.create_job(job_id, "api", digest, b'{"job_id": "%s"}' % job_id.encode(), "t0")
    assert await q.enqueue(job_id, (body(i) for i in range(n))) == n


async def drain(feed: Feed) -> list[Delivery]:
    got = []
    while (d := await feed.receive()) is not None:
        got.append(d)
        feed.ack(d, 0.5)
    return got


async def test_every_batch_delivered_once_to_concurrent_consumers(queue: JobQueue) -> None:
    n = 300
    await new_job(queue, n)
    seen: list[Delivery] = []

    async def consume(feed: Feed) -> None:
        while (d := await feed.receive()) is not None:
            seen.append(d)
            await anyio.lowlevel.checkpoint()
            feed.ack(d, 0.25)

    with anyio.fail_after(30):
        async with queue.open_feed(JOB, max_attempts=3, buffer=64) as feed:
            async with anyio.create_task_group() as tg:
                for _ in range(8):
                    tg.start_soon(consume, feed)
            await feed.flush()
            p = feed.progress()
    assert sorted(d.seq for d in seen) == list(range(n))
    assert all(d.body == body(d.seq) and d.attempt == 1 for d in seen)
    assert (p.total, p.succeeded, p.in_flight, p.in_queue) == (n, n, 0, 0)
    stored = await queue.progress(JOB)
    assert (stored.succeeded, stored.dead, stored.in_queue) == (n, 0, 0)
    assert stored.average_time_per_batch == pytest.approx(0.25)


async def test_one_attempt_then_dead_letter(queue: JobQueue) -> None:
    await new_job(queue, 3)
    with anyio.fail_after(10):
        async with queue.open_feed(JOB, max_attempts=1) as feed:
            while (d := await feed.receive()) is not None:
                if d.seq == 1:
                    feed.fail(d, record(d))
                else:
                    feed.ack(d, 0.1)
    (letter,) = await queue.dead_letters(JOB)
    assert (letter.job_id, letter.batch, bytes(letter.body)) == (JOB, 1, body(1))
    assert [a.attempt for a in letter.attempts] == [1]
    assert letter.attempts[0].error == "boom"
    p = await queue.progress(JOB)
    assert (p.succeeded, p.dead, p.failed_attempts, p.in_queue) == (2, 1, 1, 0)


async def test_three_attempts_then_dead_letter(queue: JobQueue) -> None:
    await new_job(queue, 1)
    attempts = []
    with anyio.fail_after(10):
        async with queue.open_feed(JOB, max_attempts=3) as feed:
            while (d := await feed.receive()) is not None:
                attempts.append(d.attempt)
                feed.fail(d, record(d, f"try {d.attempt}"))
    assert attempts == [1, 2, 3]
    (letter,) = await queue.dead_letters(JOB)
    assert [(a.attempt, a.error) for a in letter.attempts] == [
        (1, "try 1"),
        (2, "try 2"),
        (3, "try 3"),
    ]
    p = await queue.progress(JOB)
    assert (p.succeeded, p.dead, p.failed_attempts) == (0, 1, 3)


async def test_fails_twice_then_succeeds(queue: JobQueue) -> None:
    await new_job(queue, 2)
    got = []
    with anyio.fail_after(10):
        async with queue.open_feed(JOB, max_attempts=3) as feed:
            while (d := await feed.receive()) is not None:
                got.append((d.seq, d.attempt))
                if d.seq == 0 and d.attempt < 3:
                    feed.fail(d, record(d))
                else:
                    feed.ack(d, 0.1)
    assert Counter(seq for seq, _ in got) == {0: 3, 1: 1}
    assert await queue.dead_letters(JOB) == []
    p = await queue.progress(JOB)
    assert (p.succeeded, p.dead, p.failed_attempts) == (2, 0, 2)


async def test_release_gives_the_batch_back_uncounted(queue: JobQueue) -> None:
    await new_job(queue, 1)
    with anyio.fail_after(10):
        async with queue.open_feed(JOB, max_attempts=1) as feed:
            d = await feed.receive()
            assert d is not None
            feed.release(d)
            again = await feed.receive()
            assert again == d
            feed.ack(again, 0.1)
            assert await feed.receive() is None


async def test_close_wakes_every_waiter(queue: JobQueue) -> None:
    await new_job(queue, 1)
    results: list[Delivery | None] = []
    with anyio.fail_after(10):
        async with queue.open_feed(JOB, max_attempts=1) as feed:
            held = await feed.receive()  # in flight: the others must wait
            assert held is not None

            async def wait() -> None:
                results.append(await feed.receive())

            async with anyio.create_task_group() as tg:
                for _ in range(3):
                    tg.start_soon(wait)
                tg.start_soon(feed.wait_closed)
                await anyio.wait_all_tasks_blocked()
                feed.close()
    assert results == [None, None, None]


async def test_resume_delivers_only_what_was_not_acked(queue_url: str) -> None:
    n = 20
    with anyio.fail_after(20):
        async with open_queue(queue_url, lease=LEASE) as q:
            await new_job(q, n)
            async with q.open_feed(JOB, max_attempts=3, buffer=8) as feed:
                for _ in range(n // 2):
                    d = await feed.receive()
                    assert d is not None
                    feed.ack(d, 0.1)
                held = await feed.receive()  # in flight when the feed is left: back
                assert held is not None
        async with open_queue(queue_url, lease=LEASE) as q:
            async with q.open_feed(JOB, max_attempts=3) as feed:
                rest = await drain(feed)
            p = await q.progress(JOB)
    assert len(rest) == n - n // 2
    assert held.seq in {d.seq for d in rest}
    assert [d.attempt for d in rest] == [1] * len(rest)  # leaving gives batches back uncounted
    assert (p.succeeded, p.in_queue, p.in_flight) == (n, 0, 0)


NEXT, SAME, DEAD = LostDelivery.NEXT_ATTEMPT, LostDelivery.SAME_ATTEMPT, LostDelivery.DEAD


@pytest.mark.parametrize(
    ("attempt", "lost", "max_attempts", "count_lost", "expected"),
    [
        # A dead-letter setting: a lost delivery is an attempt, as SQS counts receives.
        (1, 1, 3, True, NEXT),
        (2, 2, 3, True, NEXT),
        (3, 3, 3, True, DEAD),
        (1, 1, 1, True, DEAD),
        (2, 1, 3, True, NEXT),  # one failure, then a loss: the loss is the second attempt
        # None: delivered again as the same attempt, until the cap.
        (1, 1, 1, False, SAME),
        (1, LOST_DELIVERY_CAP - 1, 1, False, SAME),
        (1, LOST_DELIVERY_CAP, 1, False, DEAD),
        (3, 1, 3, False, SAME),  # even on the last attempt: the loss is not the batch's fault
        (2, LOST_DELIVERY_CAP, 3, False, DEAD),
    ],
)
def test_after_a_lost_delivery(
    attempt: int, lost: int, max_attempts: int, count_lost: bool, expected: LostDelivery
) -> None:
    assert after_lost_delivery(attempt, lost, max_attempts, count_lost=count_lost) is expected


LOSER = """
import os, signal, sys, anyio
from supervisor.queues import open_queue

async def main(url, lease, job, n):
    async with open_queue(url, lease=lease) as q:
        async with q.open_feed(job, max_attempts=1, count_lost=False) as feed:
            for _ in range(n):
                await feed.receive()
            os.kill(os.getpid(), signal.SIGKILL)  # dies holding them

anyio.run(main, sys.argv[1], float(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
"""


async def test_a_lost_delivery_without_dead_letters_comes_back_uncounted(queue_url: str) -> None:
    # Without a dead-letter setting a batch is tried once; a pod killed under it must not
    # use that one attempt: the batch is delivered again, as attempt 1, to whoever is left.
    n = 3
    async with open_queue(queue_url, lease=LEASE) as q:
        await new_job(q, n)
    with anyio.fail_after(30):
        child = await anyio.run_process(
            [sys.executable, "-c", textwrap.dedent(LOSER), queue_url, str(LEASE), JOB, str(n)],
            env=child_env(),
            check=False,
        )
        assert child.returncode == -signal.SIGKILL, child.stderr.decode()
        async with open_queue(queue_url, lease=LEASE) as q:
            async with q.open_feed(JOB, max_attempts=1, count_lost=False) as feed:
                got = await drain(feed)
            p = await q.progress(JOB)
            assert await q.dead_letters(JOB) == []
    assert sorted((d.seq, d.attempt) for d in got) == [(i, 1) for i in range(n)]
    assert (p.succeeded, p.dead, p.failed_attempts) == (n, 0, 0)


async def test_an_empty_job_ends_at_once(queue: JobQueue) -> None:
    await new_job(queue, 0)
    with anyio.fail_after(10):
        async with queue.open_feed(JOB, max_attempts=1) as feed:
            assert await feed.receive() is None
    assert (await queue.progress(JOB)).total == 0


async def test_bad_input_leaves_nothing_enqueued(queue: JobQueue) -> None:
    def batches() -> list[bytes]:
        raise ValueError("bad item")

    def gen():  # type: ignore[no-untyped-def]
        yield body(0)
        yield from batches()

    await queue.create_job(JOB, "api", "d", b"{}", "t0")
    with pytest.raises(ValueError, match="bad item"):
        await queue.enqueue(JOB, gen())
    assert await queue.get_job(JOB) is None


async def test_an_end_state_is_final(queue: JobQueue) -> None:
    # A pod that joined just before the job was stopped (or completed by its other pods)
    # marks it running late: the job stays ended, and stays out of the running jobs.
    await new_job(queue, 1)
    assert await queue.set_status(JOB, "running", start_time="t1")
    assert await queue.set_status(JOB, "stopped", end_time="t2")
    assert not await queue.set_status(JOB, "running", start_time="t3")
    assert not await queue.set_status(JOB, "succeeded", end_time="t4")
    job = await queue.get_job(JOB)
    assert job is not None and (job.status, job.start_time, job.end_time) == ("stopped", "t1", "t2")
    assert await queue.running_jobs("api") == []


async def test_a_job_being_enqueued_is_in_progress_until_deleted(queue: JobQueue) -> None:
    # What a serve that starts looks at before it calls an `enqueuing` job abandoned.
    assert not await queue.enqueue_in_progress(JOB)
    await new_job(queue, 3)
    assert await queue.enqueue_in_progress(JOB)  # its submitter has not given it a status
    await queue.delete_job(JOB)
    assert not await queue.enqueue_in_progress(JOB)


async def test_jobs_are_listed_found_and_deleted(queue: JobQueue) -> None:
    a, b = "7e5c6d1f00000001", "7e5c6d1f00000002"
    await new_job(queue, 2, a, digest="one")
    await new_job(queue, 2, b, digest="two")
    with pytest.raises(QueueError, match="already exists"):
        await queue.create_job(a, "api", "one", b"{}", "t0")
    assert [j.job_id for j in await queue.list_jobs()] == [a, b]
    assert [j.job_id for j in await queue.list_jobs("api")] == [a, b]
    assert await queue.list_jobs("other") == []
    found = await queue.find_latest("api", "two")
    assert found is not None and found.job_id == b and found.total_batches == 2
    await queue.set_status(a, "running", start_time="t1")
    job = await queue.get_job(a)
    assert job is not None and (job.status, job.start_time, job.end_time) == ("running", "t1", None)
    await queue.set_status(a, "succeeded", end_time="t2", worker_counts=b'{"succeeded": 1}')
    job = await queue.get_job(a)
    assert job is not None and (job.status, job.start_time, job.end_time) == (
        "succeeded",
        "t1",
        "t2",
    )
    assert job.worker_counts == b'{"succeeded": 1}'
    assert job.spec_json == b'{"job_id": "%s"}' % a.encode()
    await queue.delete_job(a)
    assert await queue.get_job(a) is None
    assert [j.job_id for j in await queue.list_jobs()] == [b]
    with pytest.raises(QueueError, match="no job"):
        await queue.set_status(a, "running")


async def test_the_first_start_time_is_kept(queue: JobQueue) -> None:
    # Every pod that joins a shared job marks it running with its own clock: the job started
    # when the first one did.
    await new_job(queue, 1)
    await queue.set_status(JOB, "running", start_time="t1")
    await queue.set_status(JOB, "running", start_time="t2")
    job = await queue.get_job(JOB)
    assert job is not None and (job.status, job.start_time) == ("running", "t1")


async def test_running_jobs_are_those_running_of_the_api(queue: JobQueue) -> None:
    # What an idle worker reads every few seconds: only the running jobs of its API.
    a, b, c = "7e5c6d1f00000001", "7e5c6d1f00000002", "7e5c6d1f00000003"
    for job_id in (a, b):
        await new_job(queue, 1, job_id)
    await queue.create_job(c, "other", "d", b"{}", "t0")
    await queue.enqueue(c, iter([body(0)]))
    assert await queue.running_jobs("api") == []
    for job_id in (a, b, c):
        await queue.set_status(job_id, "running", start_time="t1")
    assert [j.job_id for j in await queue.running_jobs("api")] == [a, b]
    assert [j.job_id for j in await queue.running_jobs("other")] == [c]
    await queue.set_status(a, "succeeded", end_time="t2")
    await queue.delete_job(b)
    assert await queue.running_jobs("api") == []
    (job,) = await queue.running_jobs("other")
    assert (job.status, job.total_batches) == ("running", 1)


async def test_misuse_is_refused(queue: JobQueue) -> None:
    await queue.create_job(JOB, "api", "d", b"{}", "t0")
    with pytest.raises(QueueError, match="not finished enqueueing"):
        async with queue.open_feed(JOB, max_attempts=1):
            pass
    await queue.enqueue(JOB, iter([body(0), body(1)]))
    with anyio.fail_after(10):
        async with queue.open_feed(JOB, max_attempts=1) as feed:
            with pytest.raises(QueueError, match="already has an open feed"):
                async with queue.open_feed(JOB, max_attempts=1):
                    pass
            with pytest.raises(QueueError, match="while its feed is open"):
                await queue.delete_job(JOB)
            d = await feed.receive()
            assert d is not None
            feed.ack(d, 0.1)
            with pytest.raises(QueueError, match="not in flight"):
                feed.ack(d, 0.1)
        with pytest.raises(QueueError, match="no longer open"):
            feed.ack(d, 0.1)


async def test_an_error_in_the_block_propagates_and_acks_are_kept(queue: JobQueue) -> None:
    await new_job(queue, 3)
    with anyio.fail_after(10), pytest.raises(RuntimeError, match="consumer broke"):
        async with queue.open_feed(JOB, max_attempts=1) as feed:
            d = await feed.receive()
            assert d is not None
            feed.ack(d, 0.1)
            raise RuntimeError("consumer broke")
    assert (await queue.progress(JOB)).succeeded == 1


async def test_completion_is_claimed_once_and_only_when_done(queue: JobQueue) -> None:
    await new_job(queue, 2)
    with anyio.fail_after(10):
        async with queue.open_feed(JOB, max_attempts=1) as feed:
            d = await feed.receive()
            assert d is not None
            feed.ack(d, 0.1)
            await feed.flush()
            async with queue.completion(JOB) as mine:
                assert not mine  # a batch is still pending
            await drain(feed)
            await feed.flush()
        async with queue.completion(JOB) as mine:
            assert mine
        async with queue.completion(JOB) as mine:
            assert not mine  # sent already


async def test_a_failed_completion_can_be_claimed_again(queue: JobQueue) -> None:
    await new_job(queue, 0)
    with anyio.fail_after(10):
        with pytest.raises(OSError, match="refused"):
            async with queue.completion(JOB) as mine:
                assert mine
                raise OSError("connection refused")
        async with queue.completion(JOB) as mine:
            assert mine


async def test_pods_join_up_to_workers_and_heartbeat(queue: JobQueue) -> None:
    await new_job(queue, 1)
    with anyio.fail_after(10):
        assert await queue.try_join(JOB, "a", 2, LEASE)
        assert await queue.try_join(JOB, "b", 2, LEASE)
        assert not await queue.try_join(JOB, "c", 2, LEASE)  # two live pods: full
        assert await queue.try_join(JOB, "a", 2, LEASE)  # a pod already in may come back
        await queue.heartbeat(JOB, "a", "ready", LEASE)
        await queue.heartbeat(JOB, "b", "stopped", LEASE)  # b is done with the job
        beats = {b.pod_id: b for b in await queue.pods(JOB)}
        assert {p: b.state for p, b in beats.items()} == {"a": "ready", "b": "stopped"}
        assert all(0 <= b.age < LEASE and b.lease == LEASE for b in beats.values())
        assert await queue.try_join(JOB, "c", 2, LEASE)
        await queue.leave(JOB, "c")
        assert {b.pod_id for b in await queue.pods(JOB)} == {"a", "b"}
        assert await queue.pods("7e5c6d1f0000ffff") == []


async def test_a_silent_pod_leaves_its_place(queue: JobQueue) -> None:
    await new_job(queue, 1)
    with anyio.fail_after(10):
        assert await queue.try_join(JOB, "a", 1, 0.2)
        assert not await queue.try_join(JOB, "b", 1, LEASE)
        await anyio.sleep(0.3)  # a's lease of 0.2 s runs out (no event to await: time is it)
        assert await queue.try_join(JOB, "b", 1, LEASE)


async def test_a_job_that_starts_or_a_pod_that_leaves_wakes_its_api_s_watchers(
    queue: JobQueue,
) -> None:
    # What wakes an idle worker at once instead of at its next look: every watcher of the API
    # (several idle workers all wake), none of another API; the timeouts of 30 s are never
    # reached (fail_after(10)): a wait that returns True returned because of the event.
    other_job = "7e5c6d1f00000002"
    await new_job(queue, 1)
    await queue.create_job(other_job, "other", "d", b"{}", "t0")
    await queue.enqueue(other_job, iter([body(0)]))
    with anyio.fail_after(10):
        watches = [await queue.watch_jobs("api") for _ in range(2)]
        other = await queue.watch_jobs("other")
        woken: list[bool] = []

        async def wait(i: int) -> None:
            woken.append(await watches[i].wait(30))

        async with anyio.create_task_group() as tg:
            for i in range(2):
                tg.start_soon(wait, i)
            await anyio.wait_all_tasks_blocked()
            await queue.set_status(JOB, "running", start_time="t1")
        assert woken == [True, True]
        assert not await other.wait(0.1)
        # Already running: a pod joining marks it running again, which wakes nobody.
        await queue.set_status(JOB, "running", start_time="t2")
        assert not await watches[0].wait(0.1)
        # A pod leaving frees its place: announced, even to a watcher not waiting yet.
        assert await queue.try_join(JOB, "a", 1, LEASE)
        await queue.leave(JOB, "a")
        assert await watches[0].wait(30)
        assert await watches[1].wait(30)
        assert not await watches[0].wait(0.1)  # each announcement wakes a watcher once
        await queue.leave(JOB, "a")  # gone already: nothing freed
        assert not await watches[0].wait(0.1)
        await queue.set_status(other_job, "running")
        assert await other.wait(30)
        assert not await watches[0].wait(0.1)
