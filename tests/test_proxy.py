"""ProxyApp behind the relay, in front of a scripted raw upstream on 127.0.0.1."""

from __future__ import annotations

import functools
import os
import socket
import struct
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio
import anyio.abc
import msgspec
import pytest

from supervisor.http._timeouts import Timeouts
from supervisor.http.client import request
from supervisor.http.proxy import ProxyApp
from supervisor.http.relay import start_relay
from supervisor.http.response import Response as Parsed
from supervisor.http.response import ResponseParser
from tests.helpers import read_raw_request, serve_raw

pytestmark = pytest.mark.anyio

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class Upstream:
    """A raw HTTP server: records each request's bytes, answers with scripted bytes."""

    def __init__(self, reply: bytes | None = OK, *, reset: bool = False) -> None:
        self.reply = reply  # None: never answer
        self.reset = reset  # answer nothing, reset the connection after the request
        self.requests: list[bytes] = []
        self.connections = 0
        self.got_request = anyio.Event()

    async def serve(self, listener: anyio.abc.SocketListener) -> None:
        await listener.serve(self.on_connection)

    async def on_connection(self, stream: anyio.abc.SocketStream) -> None:
        self.connections += 1
        buf = b""
        async with stream:
            while True:
                while b"\r\n\r\n" not in buf:
                    try:
                        buf += await stream.receive()
                    except (anyio.EndOfStream, anyio.BrokenResourceError):
                        return
                head, _, rest = buf.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.lower() == b"content-length":
                        length = int(value)
                while len(rest) < length:
                    rest += await stream.receive()
                self.requests.append(head + b"\r\n\r\n" + rest[:length])
                buf = rest[length:]
                self.got_request.set()
                if self.reset:
                    raw = stream.extra(anyio.abc.SocketAttribute.raw_socket)
                    raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    return
                if self.reply is None:
                    await anyio.sleep_forever()
                else:
                    await stream.send(self.reply)


class ResettingUpstream(Upstream):
    """Reads each request on raw non-blocking sockets and holds the answer: :meth:`answer`
    sends a keep-alive 200 on the held connection and resets it at once."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[socket.socket] = []

    async def serve(self, listener: anyio.abc.SocketListener) -> None:
        await serve_raw(listener, self._read_one)

    async def _read_one(self, sock: socket.socket) -> None:
        self.connections += 1
        got = await read_raw_request(sock)
        if got is None:
            sock.close()
            return
        self.requests.append(got[0] + b"\r\n\r\n" + got[2])
        self.held.append(sock)
        self.got_request.set()

    def answer(self) -> None:
        """Answer the held request and reset its connection, with no checkpoint between."""
        sock = self.held.pop()
        sock.send(OK)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # on loopback the answer and the reset have both arrived now


class Ready:
    def __init__(self, value: bool) -> None:
        self.value = value

    def __call__(self) -> bool:
        return self.value


@asynccontextmanager
async def proxy_in_front_of(
    upstream: Upstream | None,
    *,
    ready: Ready | None = None,
    status: Callable[[], object] | None = None,
    upstream_timeout: float | None = None,
    pool_size: int = 64,
    timeouts: Timeouts | None = None,
) -> AsyncIterator[int]:
    """Start ``upstream`` (None: a port where nothing listens) and a proxy; yield its port."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    target = listener.extra(anyio.abc.SocketAttribute.local_port)
    if upstream is None:
        await listener.aclose()
    app = ProxyApp(
        target_host="127.0.0.1",
        target_port=lambda: target,
        is_ready=ready or Ready(True),
        status=status,
        upstream_timeout=upstream_timeout,
        pool_size=pool_size,
    )
    async with listener, anyio.create_task_group() as tg:
        if upstream is not None:
            tg.start_soon(upstream.serve, listener)
        settings = {} if timeouts is None else {"timeouts": timeouts}
        port = await tg.start(functools.partial(start_relay, "127.0.0.1", 0, app, **settings))
        try:
            yield port
        finally:
            tg.cancel_scope.cancel()


class Client:
    """One keep-alive client connection: answers are parsed, and their bytes kept in ``raw``."""

    def __init__(self, stream: anyio.abc.SocketStream) -> None:
        self.stream = stream
        self.parser = ResponseParser(keep_body=None)
        self.raw: list[bytes] = []

    async def send(self, data: bytes) -> None:
        await self.stream.send(data)

    async def answer(self) -> Parsed:
        got = b""
        while (response := self.parser.next_response()) is None:
            data = await self.stream.receive()
            got += data
            self.parser.receive_data(data)
        self.raw.append(got)
        return response

    async def exchange(self, data: bytes) -> Parsed:
        await self.send(data)
        return await self.answer()


@asynccontextmanager
async def client(port: int) -> AsyncIterator[Client]:
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        yield Client(stream)


async def raw_exchange(port: int, data: bytes) -> Parsed:
    async with client(port) as c:
        return await c.exchange(data)


async def post(port: int, path: str = "/", body: bytes = b"[1]") -> Parsed:
    return await request("127.0.0.1", port, "POST", path, body=body)


async def test_not_ready_gets_503_and_nothing_reaches_the_target() -> None:
    upstream = Upstream()
    ready = Ready(False)
    with anyio.fail_after(10):
        async with proxy_in_front_of(upstream, ready=ready) as port:
            refused = await post(port)
            refused_done = await post(port, "/on-job-complete", b'{"message":"job_complete"}')
            health = await request("127.0.0.1", port, "GET", "/healthz")
            assert upstream.connections == 0
            ready.value = True
            accepted = await post(port)
            health_after = await request("127.0.0.1", port, "GET", "/healthz")
    assert refused.status == refused_done.status == 503
    assert refused.header(b"retry-after") == b"1"
    assert refused.header(b"content-type") == b"application/json"
    assert b"not ready" in refused.body_head
    assert (health.status, health.body_head) == (503, b'{"ready":false}')
    assert (accepted.status, accepted.body_head) == (200, b"ok")
    assert (health_after.status, health_after.body_head) == (200, b'{"ready":true}')
    assert len(upstream.requests) == 1


async def test_forwarding_is_byte_exact_and_drops_hop_by_hop_headers() -> None:
    upstream = Upstream(
        b"HTTP/1.1 201 Created Here\r\nX-Reply: a\r\nConnection: keep-alive, X-Up-Hop\r\n"
        b"X-Up-Hop: 1\r\nKeep-Alive: timeout=5\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    )
    body = b'[{"id": 1, "x": "\xc3\xa9"}, 2]'
    sent = (
        b"POST /?x=1 HTTP/1.1\r\nHost: pod.local\r\nContent-Type: application/json\r\n"
        b"X-Cortex-Job-ID: j1\r\nConnection: keep-alive, X-Hop\r\nX-Hop: secret\r\n"
        b"Keep-Alive: timeout=5\r\nProxy-Authorization: Basic eA==\r\nTE: trailers\r\n"
        b"Upgrade: h2c\r\nExpect: 100-continue\r\nContent-Length: %d\r\nX-Last: z\r\n\r\n"
        % len(body)
    ) + body
    with anyio.fail_after(10):
        async with proxy_in_front_of(upstream) as port:
            response = await raw_exchange(port, sent)
    assert upstream.requests == [
        b"POST /?x=1 HTTP/1.1\r\nHost: pod.local\r\nContent-Type: application/json\r\n"
        b"X-Cortex-Job-ID: j1\r\nX-Last: z\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    ]
    assert (response.status, response.reason) == (201, b"Created Here")
    assert response.body_head == b"abcde"
    names = [name for name, _ in response.headers]
    assert names == [b"x-reply", b"set-cookie", b"set-cookie", b"content-length"]
    assert response.header(b"content-length") == b"5"


async def test_repeated_heads_and_answers_reuse_nothing_stale() -> None:
    """A keep-alive client repeating a head with other lengths; the answers change too."""
    upstream = Upstream()
    ready = Ready(True)
    head = b"POST %b HTTP/1.1\r\nHost: h\r\nX-N: 1\r\nContent-Length: %d\r\n\r\n"
    other = b"HTTP/1.1 202 Accepted\r\nX-Other: 1\r\nContent-Length: 3\r\n\r\nyes"
    answers: list[Parsed] = []
    with anyio.fail_after(10):
        async with proxy_in_front_of(upstream, ready=ready) as port:
            async with client(port) as c:
                answers.append(await c.exchange(head % (b"/", 3) + b"[1]"))
                answers.append(await c.exchange(head % (b"/", 5) + b"[1,2]"))
                ready.value = False
                answers.append(await c.exchange(head % (b"/on-job-complete", 2) + b"{}"))
                ready.value = True
                upstream.reply = other
                answers.append(await c.exchange(head % (b"/on-job-complete", 4) + b"{ } "))
                answers.append(await c.exchange(head % (b"/on-job-complete", 12) + b"[1,2,3,4,55]"))
    assert [(a.status, a.body_head) for a in answers] == [
        (200, b"ok"),
        (200, b"ok"),
        (503, answers[2].body_head),
        (202, b"yes"),
        (202, b"yes"),
    ]
    assert answers[4].header(b"x-other") == b"1"
    assert upstream.requests == [
        head % (b"/", 3) + b"[1]",
        head % (b"/", 5) + b"[1,2]",
        head % (b"/on-job-complete", 4) + b"{ } ",
        head % (b"/on-job-complete", 12) + b"[1,2,3,4,55]",
    ]


async def test_a_repeated_answer_is_relayed_the_same_and_a_closing_client_still_closes() -> None:
    """Identical worker answers give identical client answers; a change or a client asking
    to close is never answered with what was built for the one before."""
    first = b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nX-A: 1\r\nContent-Length: 2\r\n\r\nok"
    upstream = Upstream(first)
    head = b"POST / HTTP/1.1\r\nHost: h\r\n%bContent-Length: 2\r\n\r\n[]"
    answers: list[Parsed] = []
    with anyio.fail_after(10):
        async with proxy_in_front_of(upstream) as port:
            async with client(port) as c:
                answers += [await c.exchange(head % b"") for _ in range(3)]
                upstream.reply = first.replace(b"ok", b"no")
                answers.append(await c.exchange(head % b""))
                upstream.reply = first
                answers.append(await c.exchange(head % b""))
                answers.append(await c.exchange(head % b"Connection: close\r\n"))
                with pytest.raises(anyio.EndOfStream):
                    await c.stream.receive()
            raw = c.raw
    expected = b"HTTP/1.1 200 OK\r\nx-a: 1\r\nContent-Length: 2\r\n\r\nok"
    assert raw[:3] == [expected] * 3
    assert raw[3] == expected.replace(b"ok", b"no")
    assert raw[4] == expected
    assert answers[5].body_head == b"ok" and not answers[5].keep_alive
    assert answers[5].header(b"connection") == b"close"
    assert len(upstream.requests) == 6


class ClosingUpstream(Upstream):
    """Answers each request with ``reply`` and closes its side right behind it (no
    checkpoint between: the FIN is in the kernel before anyone can read the answer)."""

    async def on_connection(self, stream: anyio.abc.SocketStream) -> None:
        self.connections += 1
        async with stream:
            self.requests.append(await stream.receive())
            assert self.reply is not None
            raw = stream.extra(anyio.abc.SocketAttribute.raw_socket)
            with socket.socket(fileno=os.dup(raw.fileno())) as sock:
                sock.send(self.reply)  # a few bytes: the kernel takes them whole
                sock.shutdown(socket.SHUT_WR)


async def test_a_repeated_answer_never_makes_a_closing_connection_reusable() -> None:
    """The same bytes again and again, on connections that must not be reused: a worker
    answering ``Connection: close``, and one that closes after a keep-alive answer. Each
    answer is relayed alike (keep-alive to the client) and each request gets a fresh
    connection: none goes out on a connection the worker closed."""
    closing = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"
    head = b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\n[]"
    expected = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    for upstream in (Upstream(closing), ClosingUpstream(OK)):
        with anyio.fail_after(10):
            async with proxy_in_front_of(upstream) as port:
                async with client(port) as c:
                    for _ in range(4):
                        assert (await c.exchange(head)).status == 200
        assert c.raw == [expected] * 4
        assert upstream.connections == 4
        assert len(upstream.requests) == 4


async def test_upstream_reset_after_its_answer_costs_the_next_request_nothing() -> None:
    """The worker resets each connection right after answering on it: every request still
    gets its answer, each is forwarded once, on a fresh connection.

    The answer and the reset are sent from inside ``status()``, which the forwarding core
    asks the event loop's thread for and waits on: so it is not reading meanwhile, and finds
    both when it reads the answer. It hands the connection back to its pool, and the next
    request's ``send`` on it fails: the request must go out again on a new connection.
    """
    upstream = ResettingUpstream()

    def status() -> object:
        upstream.answer()
        return {}

    post = b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\n[%d]"
    answers: list[Parsed] = []
    with anyio.fail_after(10):
        async with proxy_in_front_of(upstream, status=status) as port:
            async with client(port) as c:
                for n in range(3):
                    upstream.got_request = anyio.Event()
                    await c.send(post % n)
                    await upstream.got_request.wait()
                    assert (await request("127.0.0.1", port, "GET", "/status")).status == 200
                    answers.append(await c.answer())
    assert [(a.status, a.body_head) for a in answers] == [(200, b"ok")] * 3
    assert [r[-3:] for r in upstream.requests] == [b"[0]", b"[1]", b"[2]"]
    assert upstream.connections == 3


async def test_chunked_request_is_forwarded_with_a_length() -> None:
    upstream = Upstream()
    sent = (
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\n\r\n"
        b"2\r\n[1\r\n1\r\n]\r\n0\r\n\r\n"
    )
    with anyio.fail_after(10):
        async with proxy_in_front_of(upstream) as port:
            response = await raw_exchange(port, sent)
    assert response.status == 200
    assert upstream.requests == [
        b"POST / HTTP/1.1\r\nHost: h\r\nX-A: 1\r\nContent-Length: 3\r\n\r\n[1]"
    ]


async def test_on_job_complete_is_forwarded_and_connections_are_reused() -> None:
    upstream = Upstream(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
    with anyio.fail_after(10):
        async with proxy_in_front_of(upstream) as port:
            for _ in range(3):
                response = await post(port, "/on-job-complete", b'{"message":"job_complete"}')
                assert response.status == 404
    assert upstream.connections == 1
    assert len(upstream.requests) == 3
    assert upstream.requests[0].startswith(b"POST /on-job-complete HTTP/1.1\r\n")
    assert upstream.requests[0].endswith(b'\r\n\r\n{"message":"job_complete"}')


async def test_target_down_or_resetting_gets_502() -> None:
    with anyio.fail_after(10):
        async with proxy_in_front_of(None) as port:
            down = await post(port)
        upstream = Upstream(reset=True)
        async with proxy_in_front_of(upstream) as port:
            reset = await post(port)
    assert down.status == 502
    assert b"could not be reached" in down.body_head
    assert reset.status == 502
    assert len(upstream.requests) == 1  # not retried


async def test_target_too_slow_gets_504() -> None:
    upstream = Upstream(reply=None)
    with anyio.fail_after(10):
        async with proxy_in_front_of(upstream, upstream_timeout=0.2) as port:
            response = await post(port)
    assert response.status == 504


async def test_admin_routes_and_unknown_ones() -> None:
    state = {"containers": [{"name": "api", "ready": True}], "port_owner": 1234}
    threads: list[int] = []

    def status_here() -> object:
        threads.append(threading.get_ident())
        return state

    with anyio.fail_after(10):
        async with proxy_in_front_of(Upstream(), status=status_here) as port:
            status = await request("127.0.0.1", port, "GET", "/status")
            wrong_method = await request("127.0.0.1", port, "GET", "/")
            post_health = await request("127.0.0.1", port, "POST", "/healthz")
            unknown = await request("127.0.0.1", port, "POST", "/elsewhere")
        async with proxy_in_front_of(Upstream()) as port:
            no_status = await request("127.0.0.1", port, "GET", "/status")
    assert status.status == 200
    assert msgspec.json.decode(status.body_head) == state
    assert threads == [threading.get_ident()]  # the pod's state is read on its own thread
    assert wrong_method.status == 405 and wrong_method.header(b"allow") == b"POST"
    assert post_health.status == 405
    assert unknown.status == 404
    assert no_status.status == 404


async def test_many_concurrent_requests() -> None:
    upstream = Upstream()
    with anyio.fail_after(20):
        async with proxy_in_front_of(upstream) as port:
            results: list[int] = []

            async def one(i: int) -> None:
                results.append((await post(port, body=b"[%d]" % i)).status)

            async with anyio.create_task_group() as tg:
                for i in range(50):
                    tg.start_soon(one, i)
    assert results == [200] * 50
    assert sorted(r.rpartition(b"\r\n\r\n")[2] for r in upstream.requests) == sorted(
        b"[%d]" % i for i in range(50)
    )


async def test_pipelined_requests_are_answered_in_order() -> None:
    upstream = Upstream()
    one = b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\n[1]"
    health = b"GET /healthz HTTP/1.1\r\nHost: h\r\n\r\n"
    last = b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nConnection: close\r\n\r\n[2]"
    with anyio.fail_after(10):
        async with proxy_in_front_of(upstream) as port:
            async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                await stream.send(one + health + last)
                parser = ResponseParser(keep_body=None)
                answers: list[Parsed] = []
                while len(answers) < 3:
                    response = parser.next_response()
                    if response is None:
                        parser.receive_data(await stream.receive())
                    else:
                        answers.append(response)
    assert [(a.status, a.body_head) for a in answers] == [
        (200, b"ok"),
        (200, b'{"ready":true}'),
        (200, b"ok"),
    ]
    assert answers[2].header(b"connection") == b"close"
    assert [r.rpartition(b"\r\n\r\n")[2] for r in upstream.requests] == [b"[1]", b"[2]"]


async def test_malformed_request_gets_400_and_nothing_is_forwarded() -> None:
    upstream = Upstream()
    with anyio.fail_after(10):
        async with proxy_in_front_of(upstream) as port:
            bad = await raw_exchange(port, b"POST / HTTP/1.1\r\nHost: h\r\nBad Name: x\r\n\r\n")
            missing = await raw_exchange(port, b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
    assert bad.status == missing.status == 400
    assert bad.header(b"connection") == b"close"
    assert upstream.requests == []


async def test_expect_continue_and_http10_without_host() -> None:
    upstream = Upstream()
    with anyio.fail_after(10):
        async with proxy_in_front_of(upstream) as port:
            async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                await stream.send(
                    b"POST / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\n"
                    b"Content-Length: 3\r\n\r\n"
                )
                continued = b""
                while b"\r\n\r\n" not in continued:
                    continued += await stream.receive()
                assert continued.startswith(b"HTTP/1.1 100 ")
                await stream.send(b"[1]")
                parser = ResponseParser(keep_body=None)
                while (response := parser.next_response()) is None:
                    parser.receive_data(await stream.receive())
            old = await raw_exchange(port, b"POST / HTTP/1.0\r\nContent-Length: 3\r\n\r\n[2]")
    assert response.status == 200
    assert old.status == 200 and old.header(b"connection") == b"close"
    assert upstream.requests[1].startswith(b"POST / HTTP/1.1\r\nHost: 127.0.0.1:")
    assert upstream.requests[1].endswith(b"\r\nContent-Length: 3\r\n\r\n[2]")


async def test_pool_size_bounds_upstream_connections() -> None:
    upstream = Upstream()
    with anyio.fail_after(20):
        async with proxy_in_front_of(upstream, pool_size=2) as port:
            results: list[int] = []

            async def one(i: int) -> None:
                results.append((await post(port, body=b"[%d]" % i)).status)

            async with anyio.create_task_group() as tg:
                for i in range(20):
                    tg.start_soon(one, i)
    assert results == [200] * 20
    assert upstream.connections <= 2
    assert len(upstream.requests) == 20
