"""A Pod on its own: readiness gating, liveness restarts, port ownership (real processes)."""

from __future__ import annotations

import io
import socket
import sys
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from supervisor.clock import ManualClock
from supervisor.config import BatchAPI
from supervisor.errors import PodError
from supervisor.lifecycle import PodState
from supervisor.logs import Logger
from supervisor.pod import Pod
from tests.helpers import RECORDER, free_ports

pytestmark = pytest.mark.anyio


def make_api(port: int, containers: list[dict[str, Any]]) -> BatchAPI:
    return msgspec.convert(
        {"name": "t", "kind": "BatchAPI", "pod": {"port": port, "containers": containers}}, BatchAPI
    )


def recorder(name: str = "api", **env: str) -> dict[str, Any]:
    return {"name": name, "command": [sys.executable, "-u", str(RECORDER)], "env": env}


def make_pod(api: BatchAPI, tmp_path: Path) -> tuple[Pod, io.StringIO]:
    out = io.StringIO()
    pod = Pod(api, env={"CORTEX_MNT_DIR": str(tmp_path)}, log=Logger(out), grace=2, cwd=tmp_path)
    return pod, out


def pod_error(match: str) -> pytest.RaisesGroup[PodError]:
    """A PodError, however deep in task-group exception groups it arrives."""
    return pytest.RaisesGroup(
        pytest.RaisesExc(PodError, match=match), flatten_subgroups=True, allow_unwrapped=True
    )


async def test_readiness_lost_pauses_and_returns(tmp_path: Path) -> None:
    port = free_ports()
    ready = tmp_path / "ready"
    ready.touch()
    api = make_api(
        port,
        [
            {
                **recorder(RECORD_DIR=str(tmp_path), READY_FILE=str(ready)),
                "readiness_probe": {
                    "http_get": {"port": port, "path": "/healthz"},
                    "period_seconds": 1,
                    "failure_threshold": 1,
                },
            }
        ],
    )
    pod, _ = make_pod(api, tmp_path)
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            await tg.start(pod.run)
            await pod.wait_serving()
            assert pod.owner is not None and pod.owner.container == "api"
            ready.unlink()
            await pod.wait_serving(False)
            assert not pod.gate.ready
            ready.touch()
            await pod.wait_serving()
            tg.cancel_scope.cancel()
    assert pod.state is PodState.STOPPED


async def test_liveness_failure_restarts_container(tmp_path: Path) -> None:
    port = free_ports()
    dead = tmp_path / "dead"
    api = make_api(
        port,
        [
            {
                **recorder(RECORD_DIR=str(tmp_path), DEAD_FILE=str(dead)),
                "liveness_probe": {
                    "http_get": {"port": port, "path": "/live"},
                    "initial_delay_seconds": 1,  # as in Kubernetes: give the server time to bind
                    "period_seconds": 1,
                    "failure_threshold": 1,
                },
            }
        ],
    )
    pod, log = make_pod(api, tmp_path)
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            await tg.start(pod.run)
            await pod.wait_serving()
            first_pid = pod.children["api"].pid
            generation = pod.generation
            dead.touch()
            while pod.restarts["api"] == 0:
                await pod.wait_changed()
            dead.unlink()
            while pod.children["api"].pid == first_pid:
                await pod.wait_changed()
            await pod.wait_serving()
            assert pod.generation > generation
            tg.cancel_scope.cancel()
    assert "container_restart" in log.getvalue()


async def test_foreign_port_owner_is_refused(tmp_path: Path) -> None:
    port = free_ports()
    api = make_api(port, [{"name": "idle", "command": ["sleep", "60"]}])
    pod, _ = make_pod(api, tmp_path)
    with socket.socket() as stranger:
        stranger.bind(("127.0.0.1", port))
        stranger.listen()
        with anyio.fail_after(30), pod_error(r"not a container|supervisor itself"):
            async with anyio.create_task_group() as tg:
                await tg.start(pod.run)


async def test_two_containers_on_one_port_is_refused(tmp_path: Path) -> None:
    port = free_ports()
    api = make_api(
        port,
        [
            recorder("one", RECORD_DIR=str(tmp_path), REUSE_PORT="1"),
            recorder("two", RECORD_DIR=str(tmp_path), REUSE_PORT="1"),
        ],
    )
    pod, _ = make_pod(api, tmp_path)
    with anyio.fail_after(30), pod_error("claimed by 2 containers"):
        async with anyio.create_task_group() as tg:
            await tg.start(pod.run)


async def test_restart_backoff_on_a_manual_clock(tmp_path: Path) -> None:
    """A container failing liveness is restarted after 1 s, then 2 s, ...: replayed on a
    manual clock, so the test never waits for them (and a respawn can only come from the
    clock moving)."""
    clock = ManualClock()
    api = make_api(
        free_ports(),
        [
            {
                "name": "w",
                "command": [sys.executable, "-c", "import time; time.sleep(3600)"],
                "liveness_probe": {"exec": {"command": ["false"]}, "failure_threshold": 1},
            }
        ],
    )
    pod = Pod(api, env={}, log=Logger(io.StringIO()), grace=2, cwd=tmp_path, clock=clock)

    async def restarted(n: int) -> None:
        while pod.restarts["w"] < n:
            await pod.wait_changed()

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            await tg.start(pod.run)
            first = pod.children["w"].pid
            await restarted(1)  # liveness failed (a real exec probe) and the container stopped
            await clock.advance(0.99)
            assert pod.children["w"].pid == first  # still backing off
            await clock.advance(0.01)
            while pod.children["w"].pid == first:
                await pod.wait_changed()
            await restarted(2)
            await clock.advance(1.99)  # the second backoff is 2 s
            second = pod.children["w"].pid
            assert pod.restarts["w"] == 2 and second != first
            await clock.advance(0.01)
            while pod.children["w"].pid == second:
                await pod.wait_changed()
            tg.cancel_scope.cancel()
