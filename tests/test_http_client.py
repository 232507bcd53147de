"""request() and a keep-alive driver (both driving ClientConnection) against real servers on
127.0.0.1.

The servers here are raw anyio listeners scripted per test, so every byte the client writes
is captured and every byte it reads (including resets and early closes) is chosen.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import anyio
import anyio.abc
import pytest

from supervisor.http.client import post_head_prefix, request
from supervisor.http.errors import (
    ConnectError,
    LocalProtocolError,
    ReadError,
    ReadTimeout,
    RemoteProtocolError,
)
from supervisor.http.response import KEEP_BODY
from supervisor.http.response import Response as ClientResponse
from supervisor.http.server import Request, Response, start_server
from tests.http_pool import ConnectionPool

pytestmark = pytest.mark.anyio

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"
ConnHandler = Callable[["Peer"], Awaitable[None]]


class Peer:
    """The server side of one raw connection: read whole requests, write bytes."""

    def __init__(self, stream: anyio.abc.SocketStream, index: int) -> None:
        self.stream = stream
        self.index = index  # 0 for the first connection the server accepted
        self.buf = b""

    async def read_request(self) -> bytes | None:
        """The raw bytes of the next request (head + Content-Length body); None at EOF."""
        while b"\r\n\r\n" not in self.buf:
            try:
                self.buf += await self.stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return None
        head, _, rest = self.buf.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(rest) < length:
            rest += await self.stream.receive()
        self.buf = rest[length:]
        return head + b"\r\n\r\n" + rest[:length]

    async def send(self, data: bytes) -> None:
        await self.stream.send(data)

    async def reset(self) -> None:
        """Close with RST instead of FIN."""
        raw = self.stream.extra(anyio.abc.SocketAttribute.raw_socket)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await self.stream.aclose()


class RawServer:
    def __init__(self, script: ConnHandler) -> None:
        self.script = script
        self.connections = 0
        self.requests: list[bytes] = []
        self.port = 0

    async def _on_connection(self, stream: anyio.abc.SocketStream) -> None:
        peer = Peer(stream, self.connections)
        self.connections += 1
        async with stream:
            await self.script(peer)


@asynccontextmanager
async def raw_server(script: ConnHandler) -> AsyncIterator[RawServer]:
    server = RawServer(script)
    async with await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0) as listener:
        server.port = listener.extra(anyio.abc.SocketAttribute.local_port)
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, server._on_connection)
            try:
                yield server
            finally:
                tg.cancel_scope.cancel()


def answering(server_box: list[RawServer], response: bytes = OK) -> ConnHandler:
    """A script answering every request on the connection with ``response``."""

    async def script(peer: Peer) -> None:
        while (req := await peer.read_request()) is not None:
            server_box[0].requests.append(req)
            await peer.send(response)

    return script


@asynccontextmanager
async def answering_server(response: bytes = OK) -> AsyncIterator[RawServer]:
    box: list[RawServer] = []
    async with raw_server(answering(box, response)) as server:
        box.append(server)
        yield server


async def closed_port() -> int:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port: int = listener.extra(anyio.abc.SocketAttribute.local_port)
    await listener.aclose()
    return port


class Poster(ConnectionPool):
    """One keep-alive connection posting to ``path`` with ``headers`` (what dispatch does)."""

    def __init__(
        self, host: str, port: int, *, path: str = "/", headers: list[tuple[str, str]] = ()
    ) -> None:
        super().__init__(host, port, max_connections=1, keep_body=KEEP_BODY)
        self._path = path.encode()
        self._headers = [(k.encode(), v.encode()) for k, v in headers]

    async def post(
        self, body: bytes, extra: list[tuple[bytes, bytes]] | None = None
    ) -> ClientResponse:
        return await self.request(b"POST", self._path, [*self._headers, *(extra or [])], body)


# -- one keep-alive connection ---------------------------------------------------------------


async def test_exact_bytes_on_the_wire() -> None:
    with anyio.fail_after(10):
        async with answering_server() as server:
            headers = [("Content-Type", "application/json"), ("X-Cortex-Job-ID", "job-1")]
            async with Poster("127.0.0.1", server.port, headers=headers) as client:
                response = await client.post(b'[{"a":1},2]')
                await client.post(b"[3]", [(b"X-Attempt", b"2")])
            assert response.status == 200
            assert response.body_head == b"ok"
            assert response.headers == [(b"content-length", b"2"), (b"content-type", b"text/plain")]
            assert response.keep_alive
    host = f"127.0.0.1:{server.port}".encode()
    assert server.requests == [
        b"POST / HTTP/1.1\r\nHost: " + host + b"\r\nContent-Type: application/json\r\n"
        b"X-Cortex-Job-ID: job-1\r\nContent-Length: 11\r\n\r\n" + b'[{"a":1},2]',
        b"POST / HTTP/1.1\r\nHost: " + host + b"\r\nContent-Type: application/json\r\n"
        b"X-Cortex-Job-ID: job-1\r\nX-Attempt: 2\r\nContent-Length: 3\r\n\r\n[3]",
    ]


async def test_path_host_and_big_body() -> None:
    body = b"[" + b"1," * 200_000 + b"1]"
    with anyio.fail_after(10):
        async with answering_server() as server:
            client = Poster(
                "127.0.0.1", server.port, path="/on-job-complete", headers=[("Host", "api")]
            )
            async with client:
                assert (await client.post(body)).status == 200
    assert server.requests == [
        b"POST /on-job-complete HTTP/1.1\r\nHost: api\r\nContent-Length: %d\r\n\r\n" % len(body)
        + body
    ]


async def test_many_posts_reuse_one_connection() -> None:
    with anyio.fail_after(20):
        async with answering_server() as server:
            async with Poster("127.0.0.1", server.port) as client:
                for i in range(300):
                    response = await client.post(b"[%d]" % i)
                    assert response.status == 200
    assert server.connections == 1
    assert len(server.requests) == 300


async def test_connection_close_response_reconnects() -> None:
    closing = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"

    async def script(peer: Peer) -> None:
        if await peer.read_request() is not None:
            await peer.send(closing)

    with anyio.fail_after(10):
        async with raw_server(script) as server, Poster("127.0.0.1", server.port) as client:
            for _ in range(5):
                response = await client.post(b"[]")
                assert response.status == 200
                assert not response.keep_alive
    assert server.connections == 5


async def test_idle_close_by_server_is_detected_before_reuse() -> None:
    closed = anyio.Event()

    async def script(peer: Peer) -> None:
        if await peer.read_request() is not None:
            await peer.send(OK)  # keep-alive response...
        if peer.index == 0:
            await peer.stream.aclose()  # ...then an idle close, as uvicorn does after 5 s
            closed.set()
        else:
            while await peer.read_request() is not None:
                await peer.send(OK)

    with anyio.fail_after(10):
        async with raw_server(script) as server, Poster("127.0.0.1", server.port) as client:
            assert (await client.post(b"[1]")).keep_alive
            await closed.wait()
            assert (await client.post(b"[2]")).status == 200  # no error: fresh connection
    assert server.connections == 2


async def test_reset_after_request_is_a_read_error_and_not_retried() -> None:
    requests = 0

    async def script(peer: Peer) -> None:
        nonlocal requests
        if await peer.read_request() is not None:
            requests += 1
            await peer.reset()

    with anyio.fail_after(10):
        async with raw_server(script) as server, Poster("127.0.0.1", server.port) as client:
            with pytest.raises((ReadError, RemoteProtocolError)):
                await client.post(b"[1]")
    assert requests == 1  # a POST the server may have processed is never re-sent


async def test_reset_mid_response() -> None:
    async def script(peer: Peer) -> None:
        if await peer.read_request() is not None:
            await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
            await peer.reset()

    with anyio.fail_after(10):
        async with raw_server(script) as server, Poster("127.0.0.1", server.port) as client:
            with pytest.raises((ReadError, RemoteProtocolError)):
                await client.post(b"[1]")


async def test_close_mid_body_then_recovery() -> None:
    async def script(peer: Peer) -> None:
        if await peer.read_request() is None:
            return
        if peer.index == 0:
            await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        else:
            await peer.send(OK)

    with anyio.fail_after(10):
        async with raw_server(script) as server, Poster("127.0.0.1", server.port) as client:
            with pytest.raises(RemoteProtocolError, match="3 of 10 bytes"):
                await client.post(b"[1]")
            assert (await client.post(b"[1]")).body_head == b"ok"


async def test_no_response_at_all() -> None:
    async def script(peer: Peer) -> None:
        await peer.read_request()

    with anyio.fail_after(10):
        async with raw_server(script) as server, Poster("127.0.0.1", server.port) as client:
            with pytest.raises(RemoteProtocolError, match="without sending a response"):
                await client.post(b"[1]")


async def test_garbage_response() -> None:
    async def script(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(b"SSH-2.0-OpenSSH\r\n\r\n")

    with anyio.fail_after(10):
        async with raw_server(script) as server, Poster("127.0.0.1", server.port) as client:
            with pytest.raises(RemoteProtocolError, match="status line"):
                await client.post(b"[1]")


async def test_connect_refused() -> None:
    port = await closed_port()
    with anyio.fail_after(10):
        async with Poster("127.0.0.1", port) as client:
            with pytest.raises(ConnectError, match=f"127.0.0.1:{port}"):
                await client.post(b"[1]")


async def test_error_body_is_kept_short_and_connection_reused() -> None:
    page = b"E" * 100_000
    error = b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: %d\r\n\r\n" % len(page) + page
    with anyio.fail_after(10):
        async with answering_server(error) as server:
            async with Poster("127.0.0.1", server.port) as client:
                for _ in range(3):
                    response = await client.post(b"[1]")
                    assert response.status == 500
                    assert response.body_head == page[:1024]
                    assert response.body_length == len(page)
    assert server.connections == 1


async def test_chunked_and_informational_responses() -> None:
    chunked = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3;x=1\r\nabc\r\n2\r\nde\r\n0\r\nX-Trailer: t\r\n\r\n"
    )
    with anyio.fail_after(10):
        async with answering_server(chunked) as server:
            async with Poster("127.0.0.1", server.port) as client:
                for _ in range(2):
                    response = await client.post(b"[1]")
                    assert (response.status, response.body_head) == (200, b"abcde")
    assert server.connections == 1


async def test_cancelled_post_discards_the_connection() -> None:
    got_request = anyio.Event()

    async def script(peer: Peer) -> None:
        while await peer.read_request() is not None:
            if peer.index == 0:
                got_request.set()  # and never answer
            else:
                await peer.send(OK)

    with anyio.fail_after(10):
        async with raw_server(script) as server, Poster("127.0.0.1", server.port) as client:
            async with anyio.create_task_group() as tg:

                async def post_and_hang() -> None:
                    await client.post(b"[1]")

                tg.start_soon(post_and_hang)
                await got_request.wait()
                tg.cancel_scope.cancel()
            assert (await client.post(b"[2]")).status == 200
    assert server.connections == 2


async def test_misuse_is_a_local_protocol_error() -> None:
    with pytest.raises(LocalProtocolError):
        post_head_prefix("127.0.0.1", 1, headers=[("Content-Length", "5")])
    with pytest.raises(LocalProtocolError):
        post_head_prefix("127.0.0.1", 1, headers=[("X-Bad", "a\r\nInjected: 1")])
    with pytest.raises(LocalProtocolError):
        post_head_prefix("127.0.0.1", 1, headers=[("Bad Name", "x")])
    with pytest.raises(LocalProtocolError):
        post_head_prefix("127.0.0.1", 1, path="/a b")
    client = Poster("127.0.0.1", 1)
    await client.aclose()
    with pytest.raises(LocalProtocolError):
        await client.post(b"[]")


# -- ConnectionPool ------------------------------------------------------------------------


async def test_pool_reuses_and_bounds_connections() -> None:
    with anyio.fail_after(20):
        async with answering_server() as server:
            async with ConnectionPool("127.0.0.1", server.port, max_connections=4) as pool:

                async def one(i: int) -> None:
                    response = await pool.request(
                        b"POST", b"/", [(b"X-I", b"%d" % i)], body=b"[%d]" % i
                    )
                    assert response.status == 200

                for _ in range(3):
                    async with anyio.create_task_group() as tg:
                        for i in range(20):
                            tg.start_soon(one, i)
                assert 1 <= pool.idle_connections <= 4
    assert server.connections <= 4
    assert len(server.requests) == 60
    assert server.requests[0].startswith(b"POST / HTTP/1.1\r\nHost: 127.0.0.1:")


async def test_pool_follows_the_port_and_keeps_header_order() -> None:
    with anyio.fail_after(10):
        async with answering_server() as first, answering_server() as second:
            port = [first.port]
            async with ConnectionPool("127.0.0.1", lambda: port[0]) as pool:
                headers = [(b"Host", b"h"), (b"content-length", b"2"), (b"X-Z", b"z")]
                await pool.request(b"POST", b"/x?y=1", headers, b"[]")
                port[0] = second.port
                await pool.request(b"POST", b"/x?y=1", headers, b"[]")
                with pytest.raises(LocalProtocolError):
                    await pool.request(b"POST", b"/", [(b"Content-Length", b"9")], b"[]")
    expected = b"POST /x?y=1 HTTP/1.1\r\nHost: h\r\ncontent-length: 2\r\nX-Z: z\r\n\r\n[]"
    assert first.requests == second.requests == [expected]


async def test_pool_without_port_is_a_connect_error() -> None:
    async with ConnectionPool("127.0.0.1", lambda: None) as pool:
        with pytest.raises(ConnectError):
            await pool.request(b"POST", b"/", [], b"")


# -- request() -----------------------------------------------------------------------------


async def test_one_shot_request() -> None:
    seen: list[Request] = []

    async def handler(req: Request) -> Response:
        seen.append(req)
        return Response(404, [(b"X-Reply", b"1")], b"not here")

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            port = await tg.start(start_server, "127.0.0.1", 0, handler)
            response = await request(
                "127.0.0.1",
                port,
                "POST",
                "/on-job-complete",
                headers=[("Content-Type", "application/json")],
                body=b'{"message":"job_complete"}',
            )
            tg.cancel_scope.cancel()
    assert (response.status, response.body_head) == (404, b"not here")
    assert response.header(b"x-reply") == b"1"
    assert not response.keep_alive
    assert seen[0].body == b'{"message":"job_complete"}'
    assert seen[0].header("connection") == b"close"
    assert seen[0].header("content-type") == b"application/json"


async def test_one_shot_request_timeout_and_refusal() -> None:
    async def script(peer: Peer) -> None:
        await peer.read_request()
        await anyio.sleep_forever()

    with anyio.fail_after(10):
        async with raw_server(script) as server:
            with pytest.raises(ReadTimeout):
                await request("127.0.0.1", server.port, "GET", "/", timeout=0.2)
        with pytest.raises(ConnectError):
            await request("127.0.0.1", await closed_port(), "GET", "/")
