"""Defects a review of the Redis queue found, each shown by a test that failed before its fix:
a late `running` reviving an ended job, CLAIM's scan window, serve's /metrics without Redis."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import anyio
import coredis
import pytest
import requests

from supervisor import jobs
from supervisor.queues import _redis_scripts as S
from supervisor.queues import open_queue
from supervisor.queues.redis import RedisQueue
from supervisor.queues.redis_feed import RedisFeed
from tests.helpers import free_ports, recorder_container, write_api
from tests.redis_server import RedisServer
from tests.test_serve import start_serve

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")

JOB = "7e5c6d1f0000beef"
LEASE = 1.0


async def new_job(q: RedisQueue, n: int) -> None:
    await q.create_job(JOB, "api", "digest", b"{}", "t0")
    assert await q.enqueue(JOB, (b'{"item": %d}' % i for i in range(n))) == n


@pytest.mark.anyio
async def test_a_late_pod_does_not_make_an_ended_job_run_again(redis_url: str) -> None:
    # A worker reads the job as running and joins it; before its JobExecution.run marks it
    # running (with its start time), the job is stopped through the API (or its last pod
    # records `succeeded`). The late mark must not undo that end.
    async with open_queue(redis_url, lease=LEASE) as q:
        assert isinstance(q, RedisQueue)
        await new_job(q, 1)
        await q.set_status(JOB, jobs.RUNNING)
        watch = await q.watch_jobs("api")
        await q.set_status(JOB, jobs.STOPPED, end_time="t2")
        # the late pod's execution.run: refused
        assert not await q.set_status(JOB, jobs.RUNNING, start_time="t1")
        record = await q.get_job(JOB)
        assert record is not None
        assert record.status == jobs.STOPPED
        assert [j.job_id for j in await q.running_jobs("api")] == []
        with anyio.fail_after(5):
            assert not await watch.wait(0.2)  # idle workers are not woken for it


@pytest.mark.anyio
async def test_a_returned_batch_behind_many_live_ones_is_claimed(redis_url: str) -> None:
    n = 41  # 40 held by a live consumer, then one given back
    async with (
        open_queue(redis_url, lease=LEASE) as q,
        coredis.Redis.from_url(redis_url) as r,
    ):
        assert isinstance(q, RedisQueue)
        await new_job(q, n)
        k = S.job_keys(JOB)
        await r.xreadgroup(S.GROUP, "live", {k.stream: ">"}, count=n)
        last = S.entry_id(n - 1)
        held = [S.entry_id(seq) for seq in range(n - 1)]
        # what GIVE_BACK_SOME does with a batch read ahead and not sent
        await r.xclaim(k.stream, S.GROUP, S.RETURNED, 0, [last], idle=10**9, justid=True)
        await r.sadd(k.returned, [last])

        async def live_consumer() -> None:  # renews its 40 leases, as a busy pod's feed does
            while True:
                await r.xclaim(k.stream, S.GROUP, "live", 0, held, justid=True)
                await anyio.sleep(LEASE / 5)

        got = None
        async with anyio.create_task_group() as tg:
            tg.start_soon(live_consumer)
            async with q.open_feed(JOB, max_attempts=3, buffer=2) as feed:
                assert isinstance(feed, RedisFeed)
                with anyio.move_on_after(4 * LEASE):
                    got = await feed.receive()
            tg.cancel_scope.cancel()
    assert got is not None and got.seq == n - 1


def test_serve_metrics_answer_while_redis_is_away(tmp_path: Path) -> None:
    # docs/deploy.md: serve is "alive while /metrics answers", which "answers whenever the
    # supervisor does"; a Redis outage must not get serve restarted by its liveness probe.
    (tmp_path / "redis").mkdir()
    server = RedisServer(tmp_path / "redis")
    server.start()
    rec = tmp_path / "rec"
    rec.mkdir()
    api_file = write_api(
        tmp_path / "api.yaml", [recorder_container(RECORD_DIR=str(rec))], port=free_ports(1)
    )
    serve = start_serve(tmp_path, [api_file], "--queue", server.url())
    try:
        assert requests.get(f"{serve.url}/metrics", timeout=10).status_code == 200
        server.kill()
        deadline = time.monotonic() + 6  # past the 2 s cache of the queue's figures
        codes = []
        while time.monotonic() < deadline:
            try:
                codes.append(requests.get(f"{serve.url}/metrics", timeout=5).status_code)
            except requests.RequestException as e:
                codes.append(repr(e))  # type: ignore[arg-type]
            time.sleep(0.5)
        assert set(codes) == {200}, codes
    finally:
        assert serve.stop() == 128 + signal.SIGTERM
        server.kill()
