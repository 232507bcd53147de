"""No client connection outlives its use: a closed peer is noticed, a stalled request gets
408, an idle keep-alive connection is closed.

The proxy's open sockets are counted from ``/proc`` (``server_sockets``): its side of every
connection on its port.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import anyio.abc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from supervisor.http._timeouts import Timeouts
from supervisor.http.response import ResponseParser
from tests.helpers import server_sockets
from tests.test_proxy import Upstream, post, proxy_in_front_of

pytestmark = pytest.mark.anyio

GOOD = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\n[1]"
PARTIAL = {
    "head": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Le",
    "body": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc",
}
QUICK = Timeouts(read=0.2, idle=0.2)


async def wait_no_sockets(port: int) -> None:
    """Until the proxy holds no connection on ``port`` (bounded). Nothing tells the test when
    the proxy closes a socket whose peer is gone, so this looks at ``/proc`` now and then."""
    with anyio.fail_after(10):
        while server_sockets(port):  # noqa: ASYNC110 -- /proc offers nothing to await
            await anyio.sleep(0.02)


async def read_to_end(stream: anyio.abc.SocketStream) -> bytes:
    """Everything the proxy sends until it closes the connection (bounded)."""
    got = b""
    with anyio.fail_after(10):
        while True:
            try:
                got += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return got


@asynccontextmanager
async def proxy(timeouts: Timeouts | None = None) -> AsyncIterator[int]:
    async with proxy_in_front_of(Upstream(), timeouts=timeouts) as port:
        yield port


@pytest.mark.parametrize("part", ["head", "body"])
async def test_clients_closing_mid_request_leave_no_socket(part: str) -> None:
    async with proxy() as port:  # default timeouts: only noticing the close can free them
        for _ in range(20):
            stream = await anyio.connect_tcp("127.0.0.1", port)
            await stream.send(PARTIAL[part])
            await stream.aclose()
        await wait_no_sockets(port)
        with anyio.fail_after(10):
            assert (await post(port)).status == 200


async def test_garbage_then_half_close_gets_400_then_close() -> None:
    async with proxy() as port:
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            await stream.send(b"garbage")  # printf garbage | nc -q 1
            await stream.send_eof()
            answer = await read_to_end(stream)
        assert answer.startswith(b"HTTP/1.1 400 ")
        assert b"\r\nConnection: close\r\n" in answer
        await wait_no_sockets(port)


async def test_a_whole_request_then_half_close_still_gets_its_answer() -> None:
    async with proxy() as port:
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            await stream.send(GOOD + GOOD)
            await stream.send_eof()
            answer = await read_to_end(stream)
        assert answer.count(b"HTTP/1.1 200 OK\r\n") == 2
        assert answer.endswith(b"ok")
        await wait_no_sockets(port)


@pytest.mark.parametrize("part", ["head", "body"])
async def test_a_stalled_head_or_body_gets_408_then_close(part: str) -> None:
    async with proxy(Timeouts(read=0.2, idle=60)) as port:
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            await stream.send(PARTIAL[part])
            answer = await read_to_end(stream)
        parser = ResponseParser(keep_body=None)
        parser.receive_data(answer)
        response = parser.next_response()
        assert response is not None
        assert response.status == 408
        assert (b"connection", b"close") in response.headers
        assert b"0.2 seconds" in response.body_head
        await wait_no_sockets(port)


async def test_idle_connections_are_closed_without_an_answer() -> None:
    async with proxy(Timeouts(read=60, idle=0.2)) as port:
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            await stream.send(GOOD)
            first = await read_to_end(stream)  # answered, then closed once idle
        assert first.startswith(b"HTTP/1.1 200 OK\r\n")
        assert first.endswith(b"ok")
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            assert await read_to_end(stream) == b""  # a fresh one that never speaks
        await wait_no_sockets(port)


# One client's script: ("write", n) sends its request's next n bytes; "pause" lets the proxy
# run; "shut" half-closes; "close" closes.
_STEP = st.one_of(
    st.tuples(st.just("write"), st.integers(1, 60)),
    st.sampled_from([("pause", 0), ("shut", 0), ("close", 0)]),
)
_WIRE = st.one_of(
    st.just(GOOD),
    st.just(GOOD + GOOD),
    st.just(PARTIAL["body"] + b"0123456789"),
    st.binary(min_size=1, max_size=40),
    st.just(b"garbage\r\n\r\n"),
)


@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(clients=st.lists(st.tuples(_WIRE, st.lists(_STEP, max_size=6)), min_size=1, max_size=4))
async def test_any_partial_writes_and_closes_leave_no_socket(
    clients: list[tuple[bytes, list[tuple[str, int]]]],
) -> None:
    async with proxy(QUICK) as port:
        streams = [await anyio.connect_tcp("127.0.0.1", port) for _ in clients]
        try:
            sent = [0] * len(clients)
            writable = [True] * len(clients)
            for turn in range(max(len(steps) for _, steps in clients)):
                for i, (wire, steps) in enumerate(clients):
                    if turn >= len(steps) or not writable[i]:
                        continue
                    action, n = steps[turn]
                    stream = streams[i]
                    try:
                        if action == "write" and sent[i] < len(wire):
                            await stream.send(wire[sent[i] : sent[i] + n])
                            sent[i] += n
                        elif action == "pause":
                            await anyio.sleep(0.01)
                        elif action == "shut":
                            await stream.send_eof()
                            writable[i] = False
                        elif action == "close":
                            await stream.aclose()
                            writable[i] = False
                    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                        writable[i] = False  # the proxy answered and closed first
            # Clients left open are closed by the proxy's timeouts.
            await wait_no_sockets(port)
            with anyio.fail_after(10):
                assert (await post(port)).status == 200
        finally:
            for stream in streams:
                await stream.aclose()
