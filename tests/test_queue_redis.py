"""The Redis queue's own promises: leases renewed, a dead consumer's batches claimed, Lua
dead-lettering, one completion claim, a Redis restart, start-up errors, its logs."""

from __future__ import annotations

import gc
import io
import logging
import signal
import subprocess
import sys
import textwrap
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import anyio
import coredis
import msgspec
import pytest

from supervisor.logs import Logger
from supervisor.queues import _redis_scripts as S
from supervisor.queues import open_queue
from supervisor.queues._redis_client import forward_redis_logs
from supervisor.queues.base import (
    LOST_DELIVERY_CAP,
    AttemptRecord,
    Delivery,
    QueueConnectError,
    QueueFullError,
)
from supervisor.queues.redis import RedisQueue
from supervisor.queues.redis_feed import Demand, RedisFeed, look, read_ahead
from tests.helpers import child_env
from tests.redis_server import RedisServer

# coredis 6.9 leaves the memory streams of every connection that failed to open unclosed,
# and several tests here make connections fail (Redis killed, unreachable, a wrong password):
# their ResourceWarnings, raised whenever the garbage collector runs, are not ours. They are
# collected at the end of the module, so none lands in another module's test.
pytestmark = [pytest.mark.anyio, pytest.mark.filterwarnings("ignore::ResourceWarning")]


@pytest.fixture(scope="module", autouse=True)
def _no_coredis_leftovers_after_the_module() -> Iterator[None]:
    yield
    _collect_coredis_leftovers()


JOB = "7e5c6d1f00000001"
LEASE = 1.0


def body(i: int) -> bytes:
    return b'{"item": %d}' % i


async def new_job(q: RedisQueue, n: int) -> None:
    await q.create_job(JOB, "api", "digest", b"{}", "t0")
    assert await q.enqueue(JOB, (body(i) for i in range(n))) == n


async def test_a_batch_longer_than_the_lease_is_not_delivered_twice(redis_url: str) -> None:
    seen: list[tuple[str, Delivery]] = []
    async with open_queue(redis_url, lease=LEASE) as a, open_queue(redis_url, lease=LEASE) as b:
        await new_job(a, 1)  # type: ignore[arg-type]
        with anyio.fail_after(20):
            async with a.open_feed(JOB, max_attempts=3) as fa:
                d = await fa.receive()
                assert d is not None
                async with b.open_feed(JOB, max_attempts=3) as fb:
                    async with anyio.create_task_group() as tg:

                        async def other() -> None:
                            while (e := await fb.receive()) is not None:
                                seen.append(("b", e))
                                fb.ack(e, 0.1)

                        tg.start_soon(other)
                        await anyio.sleep(3 * LEASE)  # the batch takes 3 leases; A is alive
                        fa.ack(d, 3 * LEASE)
                        await fa.flush()
        p = await a.progress(JOB)
    assert seen == []
    assert (p.succeeded, p.failed_attempts, p.in_queue) == (1, 0, 0)


@pytest.mark.parametrize(
    ("before", "asked", "after"),
    [
        (Demand.IDLE, False, Demand.IDLE),  # never asked: nothing read
        (Demand.IDLE, True, Demand.ASKING),
        (Demand.ASKING, True, Demand.ASKING),
        (Demand.ASKING, False, Demand.STOPPED),  # a look without an ask: give back
        (Demand.STOPPED, False, Demand.STOPPED),
        (Demand.STOPPED, True, Demand.ASKING),  # asked again: read again
    ],
)
def test_demand_after_a_look(before: Demand, asked: bool, after: Demand) -> None:
    assert look(before, asked=asked) == after


@pytest.mark.parametrize(
    ("buffer", "rate", "want"),
    [
        (32, 0.0, 32),  # nothing settled yet: the least
        (32, 100.0, 32),  # a slow worker: the least (5 batches would do)
        (32, 1400.0, 70),  # the 10 ms sleeper at c=16: 50 ms of batches
        (32, 7000.0, 256),  # a fast worker: capped at 8x
        (2, 1e6, 16),
    ],
)
def test_read_ahead_holds_about_50_ms_of_batches(buffer: int, rate: float, want: int) -> None:
    assert read_ahead(buffer, rate) == want


async def pending_of(r: coredis.Redis[bytes], consumer: str) -> int | None:
    """How many batches ``consumer`` holds in the job's group (None: it never read)."""
    for c in await r.xinfo_consumers(S.job_keys(JOB).stream, S.GROUP):
        if c[b"name"] == consumer.encode():
            return int(c[b"pending"])
    return None


async def drain(feed: RedisFeed) -> list[Delivery]:
    got = []
    while (d := await feed.receive()) is not None:
        got.append(d)
        feed.ack(d, 0.1)
    return got


async def test_after_a_flush_a_feed_counts_what_the_other_pods_settled(redis_url: str) -> None:
    # What the pod that wins the completion sends in /on-job-complete and records as the end.
    n = 10
    async with open_queue(redis_url, lease=LEASE) as a, open_queue(redis_url, lease=LEASE) as b:
        await new_job(a, n)  # type: ignore[arg-type]
        with anyio.fail_after(20):
            async with a.open_feed(JOB, max_attempts=1, buffer=2) as fa:
                async with b.open_feed(JOB, max_attempts=1, buffer=2) as fb:
                    first = await fa.receive()
                    assert first is not None
                    fa.ack(first, 0.1)
                    await fa.flush()  # A's counters now: 1 succeeded
                    got = await drain(fb)  # B settles all the rest
                    await fb.flush()
                await fa.flush()
                p = fa.progress()
    assert len(got) == n - 1
    assert (p.succeeded, p.dead, p.in_flight, p.in_queue) == (n, 0, 0, 0), p


async def test_a_feed_nobody_asks_reads_nothing(redis_url: str) -> None:
    n = 6
    async with (
        open_queue(redis_url, lease=LEASE) as a,
        open_queue(redis_url, lease=LEASE) as b,
        coredis.Redis.from_url(redis_url) as r,
    ):
        await new_job(a, n)  # type: ignore[arg-type]
        with anyio.fail_after(20):  # a feed that read ahead would keep B waiting forever
            async with a.open_feed(JOB, max_attempts=3, buffer=4) as fa:
                assert isinstance(fa, RedisFeed)
                async with b.open_feed(JOB, max_attempts=3, buffer=4) as fb:
                    assert isinstance(fb, RedisFeed)
                    got = await drain(fb)
                assert await pending_of(r, fa.consumer) is None  # never read at all
        p = await a.progress(JOB)
    assert sorted(d.seq for d in got) == list(range(n))
    assert {d.attempt for d in got} == {1}
    assert (p.succeeded, p.failed_attempts, p.dead) == (n, 0, 0)


async def test_a_feed_whose_consumer_stops_asking_gives_back_its_read_ahead(
    redis_url: str,
) -> None:
    n = 8
    async with (
        open_queue(redis_url, lease=LEASE) as a,
        open_queue(redis_url, lease=LEASE) as b,
        coredis.Redis.from_url(redis_url) as r,
    ):
        await new_job(a, n)  # type: ignore[arg-type]
        with anyio.fail_after(20):
            async with a.open_feed(JOB, max_attempts=3, buffer=4) as fa:
                assert isinstance(fa, RedisFeed)
                first = await fa.receive()  # one ask: A reads ahead, then nobody asks
                assert first is not None
                assert await pending_of(r, fa.consumer) == 4
                fa.ack(first, 0.1)
                await fa.flush()
                async with b.open_feed(JOB, max_attempts=3, buffer=4) as fb:
                    assert isinstance(fb, RedisFeed)
                    got = await drain(fb)  # A's three unsent batches come back to B
                assert await pending_of(r, fa.consumer) == 0
                assert await fa.receive() is None  # asked again, it reads: nothing left
        p = await a.progress(JOB)
    assert sorted(d.seq for d in got) == list(range(1, n))
    assert {d.attempt for d in got} == {1}  # given back uncounted
    assert (p.succeeded, p.failed_attempts, p.dead) == (n, 0, 0)


CONSUMER = """
import sys, anyio
from supervisor.queues import open_queue

async def main():
    async with open_queue(sys.argv[1], lease=float(sys.argv[2])) as q:
        async with q.open_feed(
            sys.argv[3], max_attempts=int(sys.argv[4]), count_lost=sys.argv[6] == "1"
        ) as feed:
            n = 0
            while n < int(sys.argv[5]):
                await feed.receive()
                n += 1
            print("holding", flush=True)
            await anyio.sleep_forever()

anyio.run(main)
"""


async def _kill_a_consumer_holding(
    redis_url: str, n: int, max_attempts: int, *, count_lost: bool = True
) -> None:
    """A consumer in another process receives ``n`` batches and is SIGKILLed holding them."""
    args = [sys.executable, "-c", textwrap.dedent(CONSUMER), redis_url, str(LEASE), JOB]
    args += [str(max_attempts), str(n), "1" if count_lost else "0"]
    proc = await anyio.open_process(args, env=child_env(), stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        with anyio.fail_after(20):
            assert (await proc.stdout.receive()).startswith(b"holding")
    finally:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        await proc.aclose()


async def test_a_dead_consumers_batches_are_claimed_after_its_lease(redis_url: str) -> None:
    n = 5
    async with open_queue(redis_url, lease=LEASE) as q:
        await new_job(q, n)  # type: ignore[arg-type]
        await _kill_a_consumer_holding(redis_url, n, max_attempts=3)
        with anyio.fail_after(20):
            async with q.open_feed(JOB, max_attempts=3) as feed:
                got = []
                while (d := await feed.receive()) is not None:
                    got.append(d)
                    feed.ack(d, 0.1)
        p = await q.progress(JOB)
    assert sorted(d.seq for d in got) == list(range(n))
    assert {d.attempt for d in got} == {2}  # the lost delivery counted
    assert (p.succeeded, p.failed_attempts, p.dead) == (n, n, 0)


async def test_a_batch_lost_on_its_last_delivery_is_dead_lettered(redis_url: str) -> None:
    async with open_queue(redis_url, lease=LEASE) as q:
        assert isinstance(q, RedisQueue)
        await new_job(q, 2)
        await _kill_a_consumer_holding(redis_url, 2, max_attempts=1)
        with anyio.fail_after(20):
            async with q.open_feed(JOB, max_attempts=1) as feed:
                assert await feed.receive() is None
        letters = await q.dead_letters(JOB)
        p = await q.progress(JOB)
    assert [letter.batch for letter in letters] == [0, 1]
    assert [a.attempt for a in letters[0].attempts] == [1]
    assert "lease expired" in (letters[0].attempts[0].error or "")
    assert (p.dead, p.succeeded, p.in_queue) == (2, 0, 0)


async def test_a_batch_that_kills_every_pod_is_dead_after_the_cap(redis_url: str) -> None:
    # Without a dead-letter setting lost deliveries are not attempts, but a batch that kills
    # each pod it reaches must not go round for ever: after LOST_DELIVERY_CAP it is dead.
    async with open_queue(redis_url, lease=LEASE) as q:
        assert isinstance(q, RedisQueue)
        await new_job(q, 1)
        for _ in range(LOST_DELIVERY_CAP):
            await _kill_a_consumer_holding(redis_url, 1, max_attempts=1, count_lost=False)
        with anyio.fail_after(20):
            async with q.open_feed(JOB, max_attempts=1, count_lost=False) as feed:
                assert await feed.receive() is None
        (letter,) = await q.dead_letters(JOB)
        p = await q.progress(JOB)
    assert [a.attempt for a in letter.attempts] == [1] * LOST_DELIVERY_CAP
    assert all("lease expired" in (a.error or "") for a in letter.attempts)
    assert (p.dead, p.succeeded, p.failed_attempts, p.in_queue) == (1, 0, 1, 0)


async def test_dead_lettering_moves_acks_and_counts_in_one_step(redis_url: str) -> None:
    async with open_queue(redis_url, lease=LEASE) as q, coredis.Redis.from_url(redis_url) as r:
        assert isinstance(q, RedisQueue)
        await new_job(q, 3)
        with anyio.fail_after(10):
            async with q.open_feed(JOB, max_attempts=2) as feed:
                while (d := await feed.receive()) is not None:
                    if d.seq == 2:
                        feed.fail(d, AttemptRecord(attempt=d.attempt, status=500))
                    else:
                        feed.ack(d, 0.1)
        k = S.job_keys(JOB)
        # Acked and dead entries are deleted: nothing of the job's batches is left.
        assert await r.xlen(k.stream) == 0
        assert await r.exists([k.attempts]) == 0
        (entry,) = await r.xrange(k.dead)
        assert entry.field_values[b"body"] == body(2)
        (letter,) = await q.dead_letters(JOB)
        assert [a.status for a in letter.attempts] == [500, 500]


async def test_exactly_one_of_many_concurrent_claimers_gets_the_completion(
    redis_url: str,
) -> None:
    winners: list[int] = []
    async with open_queue(redis_url) as setup:
        await new_job(setup, 0)  # type: ignore[arg-type]

    async def claimer(i: int) -> None:
        async with open_queue(redis_url) as q, q.completion(JOB) as mine:
            if mine:
                winners.append(i)
                await anyio.sleep(0.2)  # the call runs while others try

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            for i in range(8):
                tg.start_soon(claimer, i)
    assert len(winners) == 1


async def test_a_dead_claimers_completion_is_claimed_after_its_lease(redis_url: str) -> None:
    async with open_queue(redis_url) as q:
        assert isinstance(q, RedisQueue)
        await new_job(q, 0)
        with anyio.fail_after(20):
            # A claimer that dies mid-call: its claim stays until the lease runs out.
            with anyio.CancelScope() as scope:
                async with q.completion(JOB, lease=LEASE) as mine:
                    assert mine
                    k = S.job_keys(JOB)
                    async with coredis.Redis.from_url(redis_url) as r:
                        await r.set(k.complete, b"someone-dead", px=int(LEASE * 1000))
                    scope.cancel()
            async with q.completion(JOB, lease=LEASE) as mine:
                assert not mine
            while True:
                async with q.completion(JOB, lease=LEASE) as mine:
                    if mine:
                        break
                await anyio.sleep(LEASE / 4)
            async with q.completion(JOB) as mine:
                assert not mine


async def test_a_redis_restart_mid_job_loses_no_acknowledged_batch(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    server.start()
    n = 40
    got: Counter[int] = Counter()
    try:
        async with open_queue(server.url(), lease=5.0) as q:
            await new_job(q, n)  # type: ignore[arg-type]
            with anyio.fail_after(40):
                async with q.open_feed(JOB, max_attempts=3, buffer=8) as feed:
                    for _ in range(n // 2):
                        d = await feed.receive()
                        assert d is not None
                        got[d.seq] += 1
                        feed.ack(d, 0.1)
                    await feed.flush()
                    held = await feed.receive()
                    assert held is not None
                    got[held.seq] += 1
                    server.kill()
                    feed.ack(held, 0.1)  # buffered while Redis is away
                    server.start()
                    await feed.flush()
                    while (d := await feed.receive()) is not None:
                        got[d.seq] += 1
                        feed.ack(d, 0.1)
            p = await q.progress(JOB)
    finally:
        server.kill()
    assert sorted(got) == list(range(n))
    assert (p.succeeded, p.in_queue, p.dead) == (n, 0, 0)


async def test_a_full_redis_refuses_the_job_in_one_sentence_and_keeps_none_of_it(
    tmp_path: Path,
) -> None:
    server = RedisServer(tmp_path, "--maxmemory", "2mb", "--maxmemory-policy", "noeviction")
    server.start()
    try:
        async with open_queue(server.url()) as q, coredis.Redis.from_url(server.url()) as r:
            await q.create_job(JOB, "api", "digest", b"{}", "t0")
            big = (b'{"item": "%s"}' % (b"x" * 4096) for _ in range(2000))  # 8 MiB
            with anyio.fail_after(30), pytest.raises(QueueFullError) as caught:
                await q.enqueue(JOB, big, chunk=64)
            message = str(caught.value)
            assert "maxmemory" in message and JOB in message and "xxxx" not in message
            assert await r.keys(f"supervisor:{{{JOB}}}:*") == set()
            assert not await r.sismember(S.JOBS, JOB)
            assert await q.get_job(JOB) is None
            # Redis itself keeps working: with room again, the same job goes in.
            await q.create_job(JOB, "api", "digest", b"{}", "t0")
            assert await q.enqueue(JOB, (body(i) for i in range(10))) == 10
    finally:
        server.kill()


async def test_unreachable_redis_is_one_sentence(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)  # its port, never started
    with anyio.fail_after(30), pytest.raises(QueueConnectError, match="cannot reach Redis at"):
        async with open_queue(server.url()):
            pass
    _collect_coredis_leftovers()


def _collect_coredis_leftovers() -> None:
    """coredis 6.9 leaves the memory streams of a connection that failed to open unclosed:
    collect them now, quietly, instead of warning in whichever test runs next."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


async def test_a_wrong_password_is_one_sentence(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, "--requirepass", "right")
    server.start()
    try:
        with anyio.fail_after(30):
            with pytest.raises(QueueConnectError, match="refused the password") as e:
                async with open_queue(server.url(password="wrong")):
                    pass
            assert "wrong" not in str(e.value)
            with pytest.raises(QueueConnectError, match="needs a password: put it in the queue"):
                async with open_queue(server.url()):
                    pass
            _collect_coredis_leftovers()
            async with open_queue(server.url(password="right")) as q:
                assert q.url == server.url().replace("redis://", "redis://:***@")
    finally:
        server.kill()


async def test_coredis_log_records_become_json_lines() -> None:
    out = io.StringIO()
    async with forward_redis_logs(Logger(out, api_name="api")):
        logging.getLogger("coredis.connection").warning("lost %s", "it")
    await anyio.lowlevel.checkpoint()
    line = msgspec.json.decode(out.getvalue())
    assert (line["event"], line["level"], line["message"]) == ("redis_client", "warning", "lost it")
    assert line["api_name"] == "api"


async def test_watchers_in_other_processes_all_wake_and_a_watch_outlives_redis(
    tmp_path: Path,
) -> None:
    # Each worker has its own client: one job started wakes every one of them (a list and
    # BLPOP would wake one). While Redis is away a wait reports it and times out; once Redis
    # is back the same watch wakes on the next event.
    server = RedisServer(tmp_path)
    server.start()
    out = io.StringIO()
    try:
        async with (
            open_queue(server.url()) as serve,
            open_queue(server.url(), log=Logger(out)) as first,
            open_queue(server.url()) as second,
        ):
            await new_job(serve, 1)  # type: ignore[arg-type]
            watches = [await q.watch_jobs("api") for q in (first, second)]
            woken: list[bool] = []

            async def wait(i: int) -> None:
                woken.append(await watches[i].wait(30))

            with anyio.fail_after(20):
                async with anyio.create_task_group() as tg:
                    for i in range(2):
                        tg.start_soon(wait, i)
                    await anyio.wait_all_tasks_blocked()
                    await serve.set_status(JOB, "running")
                assert woken == [True, True]
                server.kill()
                assert not await watches[0].wait(0.5)
                assert '"doing":"waiting for jobs"' in out.getvalue()
                server.start()
                assert await serve.try_join(JOB, "a", 1, LEASE)
                await serve.leave(JOB, "a")
                assert await watches[0].wait(30)
                assert await watches[1].wait(30)
    finally:
        server.kill()
    _collect_coredis_leftovers()  # the connections tried while Redis was away


async def test_an_idle_worker_s_look_for_jobs_waits_for_redis(tmp_path: Path) -> None:
    # running_jobs is what an idle worker asks between waits: Redis away, it retries (and
    # says so) instead of raising out of the worker.
    server = RedisServer(tmp_path)
    server.start()
    retrying = anyio.Event()

    class Out(io.StringIO):
        def write(self, s: str) -> int:
            if '"doing":"looking for running jobs"' in s:
                retrying.set()
            return super().write(s)

    try:
        async with open_queue(server.url(), log=Logger(Out())) as q:
            await new_job(q, 1)  # type: ignore[arg-type]
            await q.set_status(JOB, "running")
            server.kill()
            found: list[str] = []

            async def look() -> None:
                found.extend(j.job_id for j in await q.running_jobs("api"))

            with anyio.fail_after(30):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(look)
                    await retrying.wait()
                    server.start()
            assert found == [JOB]
    finally:
        server.kill()
    _collect_coredis_leftovers()
