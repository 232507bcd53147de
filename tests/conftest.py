from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from supervisor.linux import become_subreaper
from supervisor.proctable import scan_stats
from tests.redis_server import RedisServer


@pytest.fixture(params=[pytest.param("asyncio", id="asyncio"), pytest.param("trio", id="trio")])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=["asyncio", "trio"])
def backend(request: pytest.FixtureRequest) -> str:
    """The event loop of a `supervisor` subprocess (tests that drive the real command)."""
    return str(request.param)


@pytest.fixture
def subreaper() -> Iterator[None]:
    """Orphans of the test reparent to this process (not to a PID 1 that may never reap them)
    and whatever is left of them is reaped afterwards."""
    if not become_subreaper():
        pytest.skip("this system has no PR_SET_CHILD_SUBREAPER")
    try:
        yield
    finally:
        become_subreaper(False)
        reap_leftovers()


def reap_leftovers() -> None:
    """Reap this process's zombie children that nobody else waits for."""
    me = os.getpid()
    for stat in scan_stats().values():
        if stat.ppid == me and stat.state == "Z":
            os.waitpid(stat.pid, os.WNOHANG)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One ``redis-server`` for the session (skips if it is not installed)."""
    with RedisServer(tmp_path_factory.mktemp("redis")).running() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session's Redis, emptied for this test."""
    redis_server.flush()
    return redis_server.url()
