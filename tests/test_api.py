"""The job API's routing (a table) and its server facing garbage (hypothesis), in process."""

from __future__ import annotations

import functools
import io
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from supervisor.admin import Admin
from supervisor.api import Action, JobAPI, Route, route
from supervisor.config import BatchAPI
from supervisor.http._timeouts import Timeouts
from supervisor.http.server import start_server
from supervisor.layout import Layout
from supervisor.logs import Logger
from supervisor.queues.embedded import EmbeddedQueue
from supervisor.service import JobService, ServiceSettings

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    ("method", "target", "expected"),
    [
        ("POST", "/sum", Route(Action.SUBMIT, "sum")),
        ("POST", "/sum?dryRun=true", Route(Action.DRY_RUN, "sum")),
        ("POST", "/sum?dryRun=false", Route(Action.SUBMIT, "sum")),
        ("GET", "/sum?jobID=7f", Route(Action.STATUS, "sum", "7f")),
        ("GET", "/sum", Route(Action.LIST, "sum")),
        ("GET", "/sum?jobID=", Route(Action.LIST, "sum")),
        ("DELETE", "/sum?jobID=7f", Route(Action.STOP, "sum", "7f")),
        ("DELETE", "/sum", Route(Action.STOP, "sum")),  # 400: jobID is required
        ("GET", "/batch/sum?jobID=7f", Route(Action.STATUS, "sum", "7f")),
        ("POST", "/batch/sum", Route(Action.SUBMIT, "sum")),
        ("GET", "/sum/dead-letters?jobID=7f", Route(Action.DEAD_LETTERS, "sum", "7f")),
        ("POST", "/sum/dead-letters?jobID=7f", Route(Action.RETRY_DEAD_LETTERS, "sum", "7f")),
        ("GET", "/batch/sum/dead-letters?jobID=7f", Route(Action.DEAD_LETTERS, "sum", "7f")),
        ("PUT", "/sum", Route(None, "sum", allow="GET, POST, DELETE")),
        ("DELETE", "/sum/dead-letters", Route(None, "sum", allow="GET, POST")),
        ("GET", "/", None),
        ("GET", "/batch", None),
        ("GET", "/sum/other", None),
        ("GET", "/a/b/c", None),
        ("GET", "/my%20api?jobID=1", Route(Action.STATUS, "my api", "1")),
    ],
)
def test_routes(method: str, target: str, expected: Route | None) -> None:
    assert route(method, target) == expected


@asynccontextmanager
async def job_api(tmp_path: Path) -> AsyncIterator[int]:
    api = msgspec.convert(
        {
            "name": "sum",
            "kind": "BatchAPI",
            "pod": {"port": 1, "containers": [{"name": "a", "command": ["true"]}]},
        },
        BatchAPI,
    )
    layout = Layout(tmp_path / "root")
    layout.prepare()
    log = Logger(io.StringIO())
    async with await EmbeddedQueue.open(layout.queue_path) as queue:
        service = JobService([api], queue, ServiceSettings(layout=layout, endpoint="x"), log)
        admin = Admin(ready=service.ready, status=service.admin_status)
        handler = JobAPI(service, admin, token=None, log=log)
        quick = Timeouts(read=0.5, idle=0.5)
        async with anyio.create_task_group() as tg:
            await tg.start(service.run)
            port = await tg.start(
                functools.partial(start_server, "127.0.0.1", 0, handler.handle, timeouts=quick)
            )
            yield port
            tg.cancel_scope.cancel()


async def healthz(port: int) -> bytes:
    async with await anyio.connect_tcp("127.0.0.1", port) as s:
        await s.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        with anyio.fail_after(10):
            while True:
                try:
                    data += await s.receive()
                except anyio.EndOfStream:
                    return data


_WIRE = st.one_of(
    st.binary(max_size=300),
    st.builds(
        lambda method, path, body: (
            b"%s %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
            % (method, path, len(body), body)
        ),
        st.sampled_from([b"GET", b"POST", b"DELETE", b"PUT", b"G\x00T"]),
        st.sampled_from([b"/sum", b"/sum?jobID=1", b"/batch/sum", b"/sum/dead-letters", b"/%ff"]),
        st.binary(max_size=200),
    ),
)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(wires=st.lists(_WIRE, min_size=1, max_size=4))
async def test_any_bytes_get_an_answer_or_a_close(tmp_path: Path, wires: list[bytes]) -> None:
    async with job_api(tmp_path) as port:
        for wire in wires:
            async with await anyio.connect_tcp("127.0.0.1", port) as s:
                await s.send(wire)
                await s.send_eof()
                answer = b""
                with anyio.fail_after(10):
                    while True:
                        try:
                            answer += await s.receive()
                        except (anyio.EndOfStream, anyio.BrokenResourceError):
                            break
                assert answer == b"" or answer.startswith(b"HTTP/1.1 "), answer[:80]
                assert not answer.startswith(b"HTTP/1.1 5"), answer[:300]
        assert (await healthz(port)).startswith(b"HTTP/1.1 200")
