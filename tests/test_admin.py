"""The admin endpoints over real HTTP on 127.0.0.1, on both event loops."""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from prometheus_client.parser import text_string_to_metric_families

from supervisor.admin import Admin, serve_admin
from supervisor.http.client import Response, request
from supervisor.http.server import Request, json_response, start_server
from supervisor.http.server import Response as ServerResponse
from supervisor.logs import Logger
from supervisor.metrics import CONTENT_TYPE, Metrics

pytestmark = pytest.mark.anyio


class Pod:
    """What a command would know of itself: a readiness flag and some status."""

    def __init__(self) -> None:
        self.ready = False
        self.status: dict[str, Any] = {
            "jobs": [{"api_name": "api", "job_id": "j1", "succeeded": 2, "failed": 1}],
            "pods": [{"index": 0, "containers": [{"name": "api", "pid": 4242, "ready": False}]}],
            "port_owner": None,
        }


@asynccontextmanager
async def admin_server(admin: Admin, logger: Logger | None = None) -> AsyncIterator[int]:
    async with anyio.create_task_group() as tg:
        port: int = await tg.start(
            lambda task_status: serve_admin(
                "127.0.0.1", 0, admin, logger=logger, task_status=task_status
            )
        )
        try:
            yield port
        finally:
            tg.cancel_scope.cancel()


async def get(port: int, target: str, method: str = "GET") -> Response:
    return await request("127.0.0.1", port, method, target, timeout=10)


def body_json(response: Response) -> Any:
    return json.loads(response.body_head)


async def test_healthz_follows_readiness() -> None:
    pod = Pod()
    with anyio.fail_after(10):
        async with admin_server(Admin(lambda: pod.ready, lambda: pod.status)) as port:
            not_ready = await get(port, "/healthz")
            pod.ready = True
            ready = await get(port, "/healthz")
            pod.ready = False
            again = await get(port, "/healthz?verbose=1")
    assert (not_ready.status, body_json(not_ready)) == (503, {"ready": False})
    assert (ready.status, body_json(ready)) == (200, {"ready": True})
    assert ready.header(b"content-type") == b"application/json"
    assert again.status == 503


async def test_status_is_the_json_of_status() -> None:
    pod = Pod()
    with anyio.fail_after(10):
        async with admin_server(Admin(lambda: pod.ready, lambda: pod.status)) as port:
            first = await get(port, "/status")
            pod.status["pods"][0]["containers"][0]["ready"] = True
            second = await get(port, "/status")
    assert first.status == 200
    assert first.header(b"content-type") == b"application/json"
    assert body_json(first) == {
        "jobs": [{"api_name": "api", "job_id": "j1", "succeeded": 2, "failed": 1}],
        "pods": [{"index": 0, "containers": [{"name": "api", "pid": 4242, "ready": False}]}],
        "port_owner": None,
    }
    assert body_json(second)["pods"][0]["containers"][0]["ready"] is True


async def test_metrics_parse_with_the_right_counts() -> None:
    metrics = Metrics()
    metrics.job_started("api", "j1")
    metrics.batch_succeeded("api", "j1", 0.2)
    metrics.batch_succeeded("api", "j1", 0.7)
    metrics.batch_failed("api", "j1")
    metrics.in_flight("api", "j1", 4)
    metrics.container_ready("api", 0, "api", True)
    metrics.container_restarts("api", 0, "api", 2)
    with anyio.fail_after(10):
        async with admin_server(Admin(lambda: True, dict, metrics)) as port:
            response = await get(port, "/metrics")
            metrics.batch_succeeded("api", "j1", 0.1)  # the next scrape sees it
            later = await get(port, "/metrics")
    assert response.status == 200
    assert response.header(b"content-type") == CONTENT_TYPE.encode()
    values = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.body_head.decode())
        for sample in family.samples
    }
    j1 = (("api_name", "api"), ("job_id", "j1"))
    container = (("api_name", "api"), ("container", "api"), ("pod", "0"))
    assert values["cortex_batch_succeeded_total", j1] == 2
    assert values["cortex_batch_failed_total", j1] == 1
    assert values["cortex_time_per_batch_seconds_count", j1] == 2
    assert values["cortex_time_per_batch_seconds_sum", j1] == pytest.approx(0.9)
    assert values["supervisor_batches_in_flight", j1] == 4
    assert values["supervisor_container_ready", container] == 1
    assert values["supervisor_container_restarts_total", container] == 2
    assert any(name == "process_cpu_seconds_total" for name, _ in values)
    later_values = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(later.body_head.decode())
        for sample in family.samples
    }
    assert later_values["cortex_batch_succeeded_total", j1] == 3


async def test_metrics_off_other_methods_and_other_paths() -> None:
    with anyio.fail_after(10):
        async with admin_server(Admin(lambda: True, dict)) as port:
            no_metrics = await get(port, "/metrics")
            post = await get(port, "/healthz", method="POST")
            delete = await get(port, "/status", method="DELETE")
            head = await get(port, "/healthz", method="HEAD")
            other = await get(port, "/jobs")
            root = await get(port, "/")
    assert no_metrics.status == 404 and body_json(no_metrics)["kind"] == "not_found"
    assert post.status == 405 and post.header(b"allow") == b"GET, HEAD"
    assert delete.status == 405
    assert head.status == 200 and head.body_head == b""
    assert other.status == 404 and "/healthz" in body_json(other)["message"]
    assert root.status == 404


async def test_route_leaves_other_paths_to_the_caller() -> None:
    """A command with its own listener tries the admin routes first, then its own."""
    admin = Admin(lambda: True, lambda: {"jobs": []})

    async def handler(request: Request) -> ServerResponse:
        return await admin.route(request) or json_response(200, {"own": request.path})

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            port: int = await tg.start(
                lambda task_status: start_server("127.0.0.1", 0, handler, task_status=task_status)
            )
            own = await get(port, "/jobs/j1")
            status = await get(port, "/status")
            tg.cancel_scope.cancel()
    assert body_json(own) == {"own": "/jobs/j1"}
    assert body_json(status) == {"jobs": []}


async def test_serve_admin_logs_the_bound_port() -> None:
    stream = io.StringIO()
    with anyio.fail_after(10):
        async with admin_server(Admin(lambda: True, dict), Logger(stream)) as port:
            pass
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(line["event"], line["port"]) for line in lines] == [("admin_listening", port)]
