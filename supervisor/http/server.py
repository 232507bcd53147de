"""A small, fast HTTP/1.1 server on raw non-blocking sockets (anyio waits).

Theory of operation
-------------------
:func:`serve` accepts connections on the raw sockets of an anyio socket listener (``accept``
until ``EAGAIN``, then :func:`anyio.wait_readable`) and runs one task per connection, driving
a :class:`~._rawsock.RawSocket` (one ``send`` syscall per response, no loop round trip). Each task
reads into a sans-IO :class:`~supervisor.http.request.RequestParser` until it yields a whole
request (head and body, at most ``max_body`` bytes), calls the handler, writes the response
in one ``send``, and loops while both sides allow keep-alive. Pipelined requests wait in the
parser's buffer and are answered in order. A client announcing ``Expect: 100-continue`` gets
``100 Continue`` once, when the server starts waiting for the body.

Nothing a client sends can crash the server: malformed bytes get 400 (431 when the head
exceeds ``max_head``, 501 for a transfer coding other than chunked), a body over ``max_body``
gets 413 (from ``Content-Length`` before reading the body, or as soon as a chunked body passes
the limit), then the connection is closed after a short lingering drain so the client can
read the answer. A head or body that does not arrive within ``timeouts.read`` gets 408 (then
the same close); a keep-alive connection idle for ``timeouts.idle`` is closed (the rule is
:mod:`~supervisor.http._timeouts`'s: one task sweeps the connections, and cancels the wait of
the overdue ones). A handler that raises gets a 500 and the connection keeps serving; so does a
handler returning an invalid response (bad status, header name or value). Cancellation is
never swallowed.

Handlers receive a :class:`Request` (whole body in memory) and return a :class:`Response`;
``Content-Length`` is always computed here, never taken from the handler, and
``Connection: close`` is added when the client does not keep the connection alive. Responses
are encoded with ``bytes`` joins and cached status lines (no h11 on this path: it cost tens of
microseconds per request, see issue 3; the parser is kept honest by differential tests
against h11 in ``tests/test_http_request.py``).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from http import HTTPStatus

import anyio
import anyio.abc
import msgspec
from anyio.streams.stapled import MultiListener

from supervisor.http._framing import TCHAR
from supervisor.http._rawsock import RawSocket
from supervisor.http._timeouts import DEFAULT_TIMEOUTS, Phase, Timeouts, Verdict, overdue
from supervisor.http.errors import RemoteProtocolError
from supervisor.http.request import MAX_BODY, MAX_HEAD, Request, RequestParser
from supervisor.logs import Logger

__all__ = [
    "Handler",
    "Request",
    "Response",
    "Timeouts",
    "accept_one",
    "drain",
    "encode_response",
    "error_answer",
    "error_body",
    "error_response",
    "json_response",
    "serve",
    "serve_sockets",
    "start_server",
    "status_line",
]

_RECEIVE_SIZE = 65536
LINGER_SECONDS = 1.0
"""How long a lingering close drains a rejected client (see :func:`drain`)."""
LINGER_BYTES = 16 * 1024 * 1024
ACCEPT_BACKOFF = 0.1
"""How long to stop accepting after ``accept`` failed (see :func:`accept_one`)."""
_PEER_GONE = (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream, OSError)
_NO_BODY_STATUSES = frozenset({204, 304})
_json_encode = msgspec.json.Encoder().encode


class Response(msgspec.Struct, gc=False):
    """What a handler returns. ``Content-Length`` and ``Transfer-Encoding`` are ignored."""

    status: int = 200
    headers: list[tuple[bytes, bytes]] = []
    body: bytes = b""
    reason: bytes = b""


Handler = Callable[[Request], Awaitable[Response]]


def json_response(
    status: int, obj: object, *, headers: Sequence[tuple[bytes, bytes]] = ()
) -> Response:
    """A response whose body is ``obj`` encoded as JSON (msgspec)."""
    return Response(status, [(b"Content-Type", b"application/json"), *headers], _json_encode(obj))


_KINDS = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "too_large",
    431: "header_too_large",
    500: "internal_error",
    501: "not_implemented",
    502: "bad_gateway",
    503: "not_ready",
    504: "gateway_timeout",
}


def error_body(status: int, message: str, kind: str | None = None) -> dict[str, str]:
    """Every error this project answers, in Cortex's shape: ``{"kind", "message"}``."""
    return {"kind": kind or _KINDS.get(status, "error"), "message": message}


def error_response(
    status: int,
    message: str,
    *,
    kind: str | None = None,
    headers: Sequence[tuple[bytes, bytes]] = (),
) -> Response:
    return json_response(status, error_body(status, message, kind), headers=headers)


_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_INTERNAL_ERROR = error_response(500, "Internal server error.")
_INVALID_RESPONSE = error_response(500, "The handler returned an invalid response.")
_STATUS_LINES: dict[tuple[int, bytes], bytes] = {}
# Bytes allowed in a header value or reason phrase we send (h11's rule: no NUL, CR, LF).
_VALUE_BYTES = bytes(b for b in range(256) if b not in (0x00, 0x0A, 0x0D))


async def serve(
    listener: anyio.abc.Listener[anyio.abc.SocketStream],
    handler: Handler,
    *,
    max_body: int = MAX_BODY,
    max_head: int = MAX_HEAD,
    logger: Logger | None = None,
    timeouts: Timeouts = DEFAULT_TIMEOUTS,
) -> None:
    """Serve HTTP/1.1 on every connection ``listener`` accepts, until cancelled."""
    await serve_sockets(
        listening_sockets(listener),
        handler,
        max_body=max_body,
        max_head=max_head,
        logger=logger,
        timeouts=timeouts,
    )


async def serve_sockets(
    sockets: Sequence[socket.socket],
    handler: Handler,
    *,
    max_body: int = MAX_BODY,
    max_head: int = MAX_HEAD,
    logger: Logger | None = None,
    timeouts: Timeouts = DEFAULT_TIMEOUTS,
) -> None:
    """Serve HTTP/1.1 on non-blocking listening ``sockets`` (one task per connection)."""
    settings = _Settings(handler, max_body, max_head, logger, timeouts)
    async with anyio.create_task_group() as tg:
        tg.start_soon(_sweep, settings)
        for sock in sockets:
            tg.start_soon(_accept_loop, sock, tg, settings)


class _Settings:
    """What every connection of one server shares, and the connections it watches."""

    __slots__ = ("handler", "logger", "max_body", "max_head", "timeouts", "watched")

    def __init__(
        self,
        handler: Handler,
        max_body: int,
        max_head: int,
        logger: Logger | None,
        timeouts: Timeouts,
    ) -> None:
        self.handler = handler
        self.max_body = max_body
        self.max_head = max_head
        self.logger = logger
        self.timeouts = timeouts
        self.watched: set[_Watched] = set()


class _Watched:
    """One connection's phase, for :func:`_sweep`, and the scope that stops its waits."""

    __slots__ = ("phase", "scope", "since", "verdict")

    def __init__(self, now: float) -> None:
        self.phase = Phase.IDLE
        self.since = now
        self.scope = anyio.CancelScope()
        self.verdict = Verdict.KEEP


async def _sweep(settings: _Settings) -> None:
    """Every ``timeouts.sweep`` seconds, stop the waits of the overdue connections."""
    timeouts = settings.timeouts
    watched = settings.watched
    while True:
        await anyio.sleep(timeouts.sweep)
        if not watched:
            continue
        now = time.monotonic()
        for conn, action in overdue(((c, c.phase, c.since) for c in watched), now, timeouts):
            conn.verdict = action
            conn.scope.cancel()


def listening_sockets(
    listener: anyio.abc.Listener[anyio.abc.SocketStream],
) -> list[socket.socket]:
    """The raw sockets under an anyio socket listener (or each one of a ``MultiListener``)."""
    listeners = listener.listeners if isinstance(listener, MultiListener) else [listener]
    try:
        return [one.extra(anyio.abc.SocketAttribute.raw_socket) for one in listeners]
    except anyio.TypedAttributeLookupError:
        raise TypeError("serve() needs a socket listener (anyio.create_tcp_listener).") from None


async def _accept_loop(
    sock: socket.socket,
    tg: anyio.abc.TaskGroup,
    settings: _Settings,
) -> None:
    """Accept connections on ``sock`` (non-blocking) and serve each in its own task."""
    logger = settings.logger
    while True:
        try:
            client = accept_one(sock)
        except OSError as exc:
            if logger is not None:
                logger.warning("http_accept_failed", error=str(exc))
            await anyio.sleep(ACCEPT_BACKOFF)
            continue
        if client is None:
            await anyio.wait_readable(sock)
            continue
        tg.start_soon(_serve_connection, RawSocket(client), settings)


def accept_one(sock: socket.socket) -> socket.socket | None:
    """One connection accepted on the non-blocking listening ``sock`` (non-blocking, with
    ``TCP_NODELAY``), or ``None`` when none is waiting. Any ``OSError`` (an aborted handshake,
    out of file descriptors) is raised: log it and stop accepting for ``ACCEPT_BACKOFF``
    seconds, so a full descriptor table does not spin the loop."""
    try:
        client, _address = sock.accept()
    except (BlockingIOError, InterruptedError):
        return None
    client.setblocking(False)
    if client.family in (socket.AF_INET, socket.AF_INET6):
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return client


async def start_server(
    host: str,
    port: int,
    handler: Handler,
    *,
    max_body: int = MAX_BODY,
    max_head: int = MAX_HEAD,
    logger: Logger | None = None,
    timeouts: Timeouts = DEFAULT_TIMEOUTS,
    task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on ``host:port`` (0 picks a free port), report the bound port, serve forever.

    Use ``port = await task_group.start(start_server, host, 0, handler)``.
    """
    listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
    async with listener:
        task_status.started(listener.extra(anyio.abc.SocketAttribute.local_port))
        await serve(
            listener,
            handler,
            max_body=max_body,
            max_head=max_head,
            logger=logger,
            timeouts=timeouts,
        )


async def _serve_connection(stream: RawSocket, settings: _Settings) -> None:
    conn = _Watched(time.monotonic())
    settings.watched.add(conn)
    try:
        with conn.scope:
            await _serve_requests(stream, settings, conn)
        if conn.verdict is Verdict.TIMED_OUT:
            read = settings.timeouts.read
            with anyio.move_on_after(read):
                await _send_error(
                    stream, 408, f"The request did not arrive within {read:g} seconds."
                )
    except _PEER_GONE:
        pass  # the client went away; nothing to answer
    except Exception as exc:  # pragma: no cover - a bug here must not stop the server
        if settings.logger is not None:
            settings.logger.error("http_connection_failed", error=f"{type(exc).__name__}: {exc}")
    finally:
        settings.watched.discard(conn)
        stream.close()


async def _serve_requests(stream: RawSocket, settings: _Settings, conn: _Watched) -> None:
    """Answer the requests of one connection until it ends (or :func:`_sweep` stops it)."""
    parser = RequestParser(max_head=settings.max_head, max_body=settings.max_body)
    receive = stream.recv
    send = stream.sendall
    handler = settings.handler
    while True:
        try:
            request = parser.next_request()
            continued = False
            while request is None:
                if parser.at_eof:
                    return  # the client closed cleanly between requests
                phase = parser.phase
                if phase is not conn.phase:
                    conn.phase = phase
                    conn.since = time.monotonic()
                if parser.expects_continue and not continued:
                    continued = True
                    await send(_CONTINUE)
                data = await receive(_RECEIVE_SIZE)
                if conn.verdict is not Verdict.KEEP:
                    return  # overdue while these bytes arrived
                parser.receive_data(data)
                request = parser.next_request()
        except RemoteProtocolError as exc:
            conn.phase = Phase.CLOSING
            conn.since = time.monotonic()
            await _send_error(stream, exc.error_status_hint, f"Invalid HTTP request: {exc}")
            return
        conn.phase = Phase.BUSY
        try:
            response = await handler(request)
        except Exception as exc:
            if settings.logger is not None:
                settings.logger.error(
                    "http_handler_failed",
                    method=request.method,
                    target=request.target,
                    error=f"{type(exc).__name__}: {exc}",
                )
            response = _INTERNAL_ERROR
        data, keep_alive = encode_response(request, response)
        await send(data)
        if not keep_alive:
            return


def status_line(status: int, reason: bytes) -> bytes:
    """``HTTP/1.1 {status} {reason}\r\n``, cached per (status, reason) pair."""
    key = (status, reason)
    line = _STATUS_LINES.get(key)
    if line is None:
        if not reason:
            try:
                reason = HTTPStatus(status).phrase.encode("ascii")
            except ValueError:
                reason = b""
        line = b"HTTP/1.1 %d %b\r\n" % (status, reason)
        if len(_STATUS_LINES) < 1024:
            _STATUS_LINES[key] = line
    return line


def encode_response(request: Request, response: Response) -> tuple[bytes, bool]:
    """Bytes for ``response`` (a 500 instead if it is not valid HTTP) and keep-alive."""
    status = response.status
    body = response.body
    keep_alive = request.keep_alive
    parts = [b""]
    names = []
    values = []
    for name, value in response.headers:
        lower = name.lower()
        if lower == b"content-length" or lower == b"transfer-encoding":
            continue
        if lower == b"connection":
            if b"close" in [token.strip() for token in value.lower().split(b",")]:
                keep_alive = False
            if not request.keep_alive:
                continue  # replaced by "Connection: close" below
        names.append(name)
        values.append(value)
        parts += (name, b": ", value, b"\r\n")
    if (
        not 200 <= status <= 999
        or b"".join(names).translate(None, TCHAR)
        or not all(names)
        or b"".join(values).translate(None, _VALUE_BYTES)
        or response.reason.translate(None, _VALUE_BYTES)
    ):
        return encode_response(request, _INVALID_RESPONSE)
    if status in _NO_BODY_STATUSES:
        body = b""
    else:
        parts.append(b"Content-Length: %d\r\n" % len(body))
    if not request.keep_alive:
        parts.append(b"Connection: close\r\n")
    parts[0] = status_line(status, response.reason)
    parts.append(b"\r\n")
    if body and request.method != "HEAD":
        parts.append(body)
    return b"".join(parts), keep_alive


def error_answer(status: int, message: str) -> bytes:
    """The bytes of the answer to a rejected request: :func:`error_body` as JSON, with
    ``Connection: close`` (a lingering close follows, see :func:`drain`)."""
    body = _json_encode(error_body(status, message))
    head = (
        status_line(status, b"")
        + b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body)
        + b"Connection: close\r\n\r\n"
    )
    return head + body


def drain(sock: socket.socket, drained: int) -> int | None:
    """One step of a lingering close, on a non-blocking ``sock`` whose writing side is shut
    down: read and drop what the client still sends. Returns the bytes dropped so far, or
    ``None`` once the socket is to be closed (end of stream, an error, or ``LINGER_BYTES``
    dropped). The caller gives up after ``LINGER_SECONDS`` either way.

    Closing with unread input would reset the connection and could destroy the answer before
    the client reads it: so stop writing, drain for a moment, then close.
    """
    while drained < LINGER_BYTES:
        try:
            data = sock.recv(_RECEIVE_SIZE)
        except (BlockingIOError, InterruptedError):
            return drained
        except OSError:
            return None
        if not data:
            return None
        drained += len(data)
    return None


async def _send_error(stream: RawSocket, status: int, message: str) -> None:
    """Answer a rejected request, then close gently so the client can read the answer."""
    await stream.sendall(error_answer(status, message))
    stream.shutdown_write()
    with anyio.move_on_after(LINGER_SECONDS):
        drained = drain(stream.sock, 0)
        while drained is not None:
            await anyio.wait_readable(stream.sock)
            drained = drain(stream.sock, drained)
