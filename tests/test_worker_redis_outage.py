"""Worker pods while their Redis goes away: killed mid-job (AOF on) and started again a few
seconds later, the pods wait, keep what they hold and carry on; nothing acknowledged is lost
and the job gets one ``/on-job-complete``."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from supervisor import jobs
from tests.redis_server import RedisServer
from tests.test_worker import (
    Worker,
    api,
    batch_items,
    completions,
    submit,
    wait_end,
    wait_for,
    workers,
)

__all__ = ["api", "workers"]  # fixtures used here, from the worker tests


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of this test's own (the session's one is shared): killed and started again."""
    directory = tmp_path / "redis"
    directory.mkdir()
    with RedisServer(directory).running() as server:
        yield server


@pytest.fixture
def redis_url(own_redis: RedisServer) -> str:  # the workers fixture connects here
    return own_redis.url()


def test_workers_wait_for_a_restarted_redis_and_lose_nothing(
    own_redis: RedisServer,
    redis_url: str,
    workers: Callable[..., Worker],
    api: tuple[Path, Path, int],
) -> None:
    _, rec, _ = api
    pods = [workers(i, "--concurrency", "2") for i in range(2)]
    n = 120
    job_id = submit(redis_url, n, workers=2)
    wait_for(lambda: len(batch_items(rec)) >= 20, "a part of the job done")
    own_redis.kill()  # SIGKILL: what was fsynced to the AOF is what comes back
    outage = time.monotonic()
    for p in pods:  # every pod notices, and keeps trying
        p.wait_event("redis_unavailable")
    done_during_outage = len(batch_items(rec))
    wait_for(lambda: time.monotonic() - outage > 3, "a few seconds of outage", timeout=10)
    own_redis.start()
    record = wait_end(redis_url, job_id)
    assert record.status == jobs.SUCCEEDED, [p.log.read_text()[-3000:] for p in pods]
    items = [i for i, _ in batch_items(rec)]
    assert sorted(set(items)) == list(range(n))  # none lost (a few may have gone twice)
    assert record.succeeded == n and record.dead == 0  # each counted once
    assert len(items) >= done_during_outage
    (complete,) = completions(rec)
    assert ["X-Cortex-Batches-Succeeded", str(n)] in complete["headers"]
    for p in pods:
        assert p.events("redis_back"), p.log.read_text()[-3000:]
        p.wait_event("job_left")
        assert p.proc.poll() is None  # still a pod, waiting for the next job
