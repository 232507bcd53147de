"""The h11 server against raw sockets: bad input never crashes it, keep-alive works."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import anyio.abc
import pytest

from supervisor.http.response import Response as Parsed
from supervisor.http.response import ResponseParser
from supervisor.http.server import Request, Response, json_response, start_server

pytestmark = pytest.mark.anyio


async def app(request: Request) -> Response:
    if request.path == "/boom":
        raise RuntimeError("handler bug")
    if request.path == "/bad-header":
        return Response(200, [(b"X-Bad", b"a\r\nb")], b"x")
    if request.path == "/empty":
        return Response(204, [(b"Content-Length", b"99")], b"ignored")
    return json_response(
        200,
        {"method": request.method, "target": request.target, "body": request.body.decode()},
        headers=[(b"Content-Length", b"999"), (b"X-Query", request.query.encode())],
    )


@asynccontextmanager
async def server(max_body: int = 1000, max_head: int = 4096) -> AsyncIterator[int]:
    async with anyio.create_task_group() as tg:
        port = await tg.start(
            lambda task_status: start_server(
                "127.0.0.1", 0, app, max_body=max_body, max_head=max_head, task_status=task_status
            )
        )
        try:
            yield port
        finally:
            tg.cancel_scope.cancel()


async def exchange(
    port: int, data: bytes, count: int = 1, *, head: bool = False
) -> tuple[list[Parsed], bool]:
    """Send ``data`` and read ``count`` responses. If the last one says the connection ends,
    also wait for the server to close it and report ``True``."""
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(data)
        parser = ResponseParser(keep_body=None)
        responses: list[Parsed] = []
        while len(responses) < count:
            response = parser.next_response(head_request=head)
            if response is None:
                try:
                    parser.receive_data(await stream.receive())
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    parser.receive_data(b"")
                continue
            responses.append(response)
            if not response.keep_alive:
                break
        if responses[-1].keep_alive:
            return responses, False
        try:
            while await stream.receive():
                pass
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            pass
        return responses, True


async def test_simple_request_and_json_helper() -> None:
    with anyio.fail_after(10):
        async with server() as port:
            (response,), closed = await exchange(
                port, b"POST /x?a=1 HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc"
            )
    assert response.status == 200
    assert response.header(b"content-type") == b"application/json"
    assert response.header(b"content-length") == b"%d" % len(response.body_head)
    assert response.header(b"x-query") == b"a=1"
    assert response.body_head == b'{"method":"POST","target":"/x?a=1","body":"abc"}'
    assert response.keep_alive and not closed


async def test_keep_alive_pipelining() -> None:
    requests = b"".join(
        b"POST /%d HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\n\r\n%d" % (i, i) for i in range(5)
    )
    requests += b"GET /last HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
    with anyio.fail_after(10):
        async with server() as port:
            responses, closed = await exchange(port, requests, count=6)
    assert [r.status for r in responses] == [200] * 6
    assert [r.body_head for r in responses[:5]] == [
        b'{"method":"POST","target":"/%d","body":"%d"}' % (i, i) for i in range(5)
    ]
    assert not responses[5].keep_alive
    assert closed


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n",
        b"GET / HTTP/1.1\r\nBad Header\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: x\r\n\r\n",
        b"not http at all\r\n\r\n",
    ],
)
async def test_garbage_gets_400_and_close_while_others_work(garbage: bytes) -> None:
    with anyio.fail_after(10):
        async with server() as port:
            (bad,), closed = await exchange(port, garbage)
            (good,), _ = await exchange(port, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    assert bad.status == 400
    assert b"Invalid HTTP request" in bad.body_head
    assert closed and not bad.keep_alive
    assert good.status == 200


async def test_oversized_head_gets_431() -> None:
    # h11 bounds what it buffers while a head is incomplete; one read is at most 64 KiB.
    data = b"GET / HTTP/1.1\r\nHost: h\r\n" + b"X-Filler: " + b"a" * 200_000 + b"\r\n\r\n"
    with anyio.fail_after(10):
        async with server(max_head=4096) as port:
            (response,), closed = await exchange(port, data)
    assert response.status == 431
    assert closed


async def test_oversized_body_gets_413() -> None:
    with anyio.fail_after(10):
        async with server(max_body=1000) as port:
            head = b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5000\r\n\r\n"
            (by_length,), closed = await exchange(port, head + b"x" * 5000)
            assert by_length.status == 413 and closed
            chunked = b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
            chunked += b"200\r\n" + b"y" * 512 + b"\r\n"
            chunked += b"200\r\n" + b"y" * 512 + b"\r\n0\r\n\r\n"
            (by_chunks,), closed = await exchange(port, chunked)
            assert by_chunks.status == 413 and closed
            fits = b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1000\r\n\r\n" + b"z" * 1000
            (ok,), _ = await exchange(port, fits)
            assert ok.status == 200


async def test_handler_exception_gets_500_and_the_connection_keeps_serving() -> None:
    data = b"GET /boom HTTP/1.1\r\nHost: h\r\n\r\nGET /bad-header HTTP/1.1\r\nHost: h\r\n\r\n"
    data += b"GET /after HTTP/1.1\r\nHost: h\r\n\r\n"
    with anyio.fail_after(10):
        async with server() as port:
            responses, _ = await exchange(port, data, count=3)
    assert [r.status for r in responses] == [500, 500, 200]
    assert responses[0].body_head == b'{"kind":"internal_error","message":"Internal server error."}'
    assert b"/after" in responses[2].body_head


async def test_head_204_and_http10() -> None:
    with anyio.fail_after(10):
        async with server() as port:
            (head,), _ = await exchange(port, b"HEAD /h HTTP/1.1\r\nHost: h\r\n\r\n", head=True)
            async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                await stream.send(b"HEAD /h HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
                raw = b""
                with pytest.raises(anyio.EndOfStream):
                    while True:
                        raw += await stream.receive()
            (empty,), _ = await exchange(port, b"GET /empty HTTP/1.1\r\nHost: h\r\n\r\n")
            (old,), closed = await exchange(port, b"GET /old HTTP/1.0\r\n\r\n")
    assert head.status == 200 and head.body_head == b""
    assert int(head.header(b"content-length") or 0) > 0
    assert raw.endswith(b"\r\n\r\n")  # a head and no body
    assert empty.status == 204 and empty.header(b"content-length") is None
    assert old.status == 200 and not old.keep_alive and closed


async def test_expect_100_continue() -> None:
    with anyio.fail_after(10):
        async with server() as port, await anyio.connect_tcp("127.0.0.1", port) as stream:
            await stream.send(
                b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n"
            )
            first = await stream.receive()
            assert first.startswith(b"HTTP/1.1 100 ")
            await stream.send(b"hi")
            parser = ResponseParser()
            parser.receive_data(first)
            while (response := parser.next_response()) is None:
                parser.receive_data(await stream.receive())
    assert response.status == 200
    assert b'"body":"hi"' in response.body_head


async def test_client_vanishing_mid_request_does_not_hurt() -> None:
    with anyio.fail_after(10):
        async with server() as port:
            async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                await stream.send(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n\r\nab")
            async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                await stream.send(b"GET / HTTP/1.1\r\n")  # and close before the end of the head
            (good,), _ = await exchange(port, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    assert good.status == 200
