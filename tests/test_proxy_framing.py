"""Every way a worker may legally frame its answer ends the forwarded request: the proxy in
front of the framing worker (``tests/workers/framings.py``), a port per framing.

Each framing gets several POSTs on one keep-alive client connection, then several one-shot
clients (``Connection: close``): every answer comes back whole with the status the batch
asked for, nothing hangs, no request after an answer that ended the upstream connection gets
a 502, and no POST reaches the worker twice (a request written on a connection that then
closed is never sent again).
"""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest

from supervisor.http.client import request
from supervisor.http.proxy import ProxyApp
from supervisor.http.relay import start_relay
from tests import test_framing
from tests.test_proxy import client

pytestmark = pytest.mark.anyio

ports = test_framing.ports  # the framing worker, one per module
FRAMINGS = test_framing.FRAMINGS
STATUSES = [200, 500, 200, 404, 200]


@asynccontextmanager
async def proxy_to(target: int) -> AsyncIterator[int]:
    """A proxy forwarding to ``target``; yields its port."""
    app = ProxyApp(target_host="127.0.0.1", target_port=target, is_ready=lambda: True)
    async with anyio.create_task_group() as tg:
        port = await tg.start(functools.partial(start_relay, "127.0.0.1", 0, app))
        try:
            yield port
        finally:
            tg.cancel_scope.cancel()


def batch(status: int) -> bytes:
    return json.dumps([{"status": status}]).encode()


def post(body: bytes) -> bytes:
    return b"POST / HTTP/1.1\r\nHost: p\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)


@pytest.mark.parametrize(("framing", "keep_alive"), FRAMINGS)
async def test_every_framing_is_relayed_whole(
    ports: dict[str, int], framing: str, keep_alive: bool
) -> None:
    expected = [204 if framing == "no_content" else s for s in STATUSES]
    with anyio.fail_after(20):
        await test_framing.stats(ports[framing])  # forget what earlier tests sent
        async with proxy_to(ports[framing]) as port:
            async with client(port) as c:
                kept = [await c.exchange(post(batch(status))) for status in STATUSES]
            single = [
                await request("127.0.0.1", port, "POST", "/", body=batch(s), timeout=10)
                for s in STATUSES
            ]
        counts = await test_framing.stats(ports[framing])
    for answers in (kept, single):
        assert [r.status for r in answers] == expected
        body = b"" if framing == "no_content" else b'{"echo": %d}' % len(batch(200))
        assert [r.body_head for r in answers] == [body] * len(STATUSES)
    assert all(r.keep_alive for r in kept)
    n = 2 * len(STATUSES)
    assert counts["posts"] == n  # nothing was sent twice
    if not keep_alive:
        assert counts["connections"] == n


@pytest.mark.parametrize("framing", ["close_delimited", "http10_stdlib", "length_then_close"])
async def test_connection_ending_answers_under_concurrency(
    ports: dict[str, int], framing: str
) -> None:
    statuses: list[int] = []

    async def one_client(port: int) -> None:
        async with client(port) as c:
            statuses.extend([(await c.exchange(post(batch(200)))).status for _ in range(10)])

    with anyio.fail_after(30):
        await test_framing.stats(ports[framing])
        async with proxy_to(ports[framing]) as port, anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(one_client, port)
        assert await test_framing.stats(ports[framing]) == {"posts": 40, "connections": 40}
    assert statuses == [200] * 40
