"""A small HTTP/1.1 server: h11 for the protocol, anyio for the sockets.

Theory of operation
-------------------
:func:`serve` accepts connections from a listener and runs one task per connection. Each task
is h11's I/O loop (h11 ``examples/trio-server.py``): read until h11 has a whole request
(head and body, at most ``max_body`` bytes), call the handler, write the response, then
``start_next_cycle()`` when both sides are ``DONE`` -- otherwise close. Pipelined requests
wait in h11's buffer and are answered in order.

Nothing a client sends can crash the server: malformed bytes get 400 (431 when h11 has
buffered ``max_head`` bytes of a still incomplete head -- h11's bound, checked per read of
at most 64 KiB), a body over ``max_body`` gets 413 (from ``Content-Length`` before reading the
body, or as soon as a chunked body passes the limit), then the connection is closed after
a short lingering drain so the client can read the answer. A handler that raises gets a 500
and the connection keeps serving; cancellation is never swallowed.

Handlers receive a :class:`Request` (whole body in memory) and return a :class:`Response`;
``Content-Length`` is always computed here, never taken from the handler.

Performance note: h11 costs tens of microseconds per request, several times more than the
raw parsing in ``response.py``. This server is used for the job API, admin endpoints and the
proxy front; a faster request path (a sans-IO request parser in the style of
``response.py``, keeping this loop's shape) can replace :func:`_receive_request` and
:func:`_encode_response` later without changing the handler interface.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import anyio
import anyio.abc
import h11
import msgspec

from supervisor.logs import Logger

__all__ = ["Handler", "Request", "Response", "json_response", "serve", "start_server"]

MAX_BODY = 10 * 1024 * 1024
MAX_HEAD = 64 * 1024
_RECEIVE_SIZE = 65536
_LINGER_SECONDS = 1.0
_LINGER_BYTES = 16 * 1024 * 1024
_PEER_GONE = (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream, OSError)
_NO_BODY_STATUSES = frozenset({204, 304})
_json_encode = msgspec.json.Encoder().encode


class Request(msgspec.Struct, gc=False):
    """One HTTP request, read whole.

    ``headers`` keeps the names as the client spelled them, in order; look values up with
    :meth:`header` (case-insensitive).
    """

    method: str
    target: str
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    http_version: str = "1.1"

    @property
    def path(self) -> str:
        """The target without its query string."""
        return self.target.partition("?")[0]

    @property
    def query(self) -> str:
        """The query string (after ``?``), or ``""``."""
        return self.target.partition("?")[2]

    def header(self, name: str | bytes) -> bytes | None:
        """The first value of header ``name`` (any case), or ``None``."""
        key = (name.encode("ascii") if isinstance(name, str) else name).lower()
        for raw, value in self.headers:
            if raw.lower() == key:
                return value
        return None


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


class _Reject(Exception):
    """The request cannot be served: answer ``status`` and close the connection."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


async def serve(
    listener: anyio.abc.Listener[anyio.abc.SocketStream],
    handler: Handler,
    *,
    max_body: int = MAX_BODY,
    max_head: int = MAX_HEAD,
    logger: Logger | None = None,
) -> None:
    """Serve HTTP/1.1 on every connection ``listener`` accepts, until cancelled."""

    async def on_connection(stream: anyio.abc.SocketStream) -> None:
        await _serve_connection(stream, handler, max_body, max_head, logger)

    await listener.serve(on_connection)


async def start_server(
    host: str,
    port: int,
    handler: Handler,
    *,
    max_body: int = MAX_BODY,
    max_head: int = MAX_HEAD,
    logger: Logger | None = None,
    task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on ``host:port`` (0 picks a free port), report the bound port, serve forever.

    Use ``port = await task_group.start(start_server, host, 0, handler)``.
    """
    listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
    async with listener:
        task_status.started(listener.extra(anyio.abc.SocketAttribute.local_port))
        await serve(listener, handler, max_body=max_body, max_head=max_head, logger=logger)


async def _serve_connection(
    stream: anyio.abc.SocketStream,
    handler: Handler,
    max_body: int,
    max_head: int,
    logger: Logger | None,
) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=max_head)
    try:
        while True:
            try:
                request = await _receive_request(stream, conn, max_body)
            except _Reject as reject:
                await _send_error(stream, conn, reject.status, reject.message)
                return
            if request is None:
                return
            try:
                response = await handler(request)
            except Exception as exc:
                if logger is not None:
                    logger.error(
                        "http_handler_failed",
                        method=request.method,
                        target=request.target,
                        error=f"{type(exc).__name__}: {exc}",
                    )
                response = json_response(500, {"error": "Internal server error."})
            await stream.send(_encode_response(conn, request.method, response))
            if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                conn.start_next_cycle()
            else:
                return
    except _PEER_GONE:
        pass  # the client went away; nothing to answer
    except Exception as exc:  # pragma: no cover - a bug here must not stop the server
        if logger is not None:
            logger.error("http_connection_failed", error=f"{type(exc).__name__}: {exc}")
    finally:
        await anyio.aclose_forcefully(stream)


async def _receive_request(
    stream: anyio.abc.SocketStream, conn: h11.Connection, max_body: int
) -> Request | None:
    """Read one whole request; ``None`` if the client closed cleanly between requests."""
    start: h11.Request | None = None
    body = bytearray()
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise _Reject(exc.error_status_hint, f"Invalid HTTP request: {exc}.") from exc
        if event is h11.NEED_DATA:
            if conn.they_are_waiting_for_100_continue:
                await stream.send(
                    conn.send(h11.InformationalResponse(status_code=100, headers=[])) or b""
                )
            try:
                data = await stream.receive(_RECEIVE_SIZE)
            except anyio.EndOfStream:
                data = b""
            conn.receive_data(data)
        elif isinstance(event, h11.Request):
            start = event
            length = _content_length(event)
            if length is not None and length > max_body:
                raise _Reject(413, f"Request body is larger than {max_body} bytes.")
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > max_body:
                raise _Reject(413, f"Request body is larger than {max_body} bytes.")
        elif isinstance(event, h11.EndOfMessage):
            assert start is not None
            return Request(
                method=start.method.decode("ascii"),
                target=start.target.decode("ascii"),
                headers=start.headers.raw_items(),
                body=bytes(body),
                http_version=start.http_version.decode("ascii"),
            )
        else:  # ConnectionClosed (or PAUSED, which a correct cycle never reaches)
            return None


def _content_length(event: h11.Request) -> int | None:
    for name, value in event.headers:
        if name == b"content-length":
            return int(value)
    return None


def _encode_response(conn: h11.Connection, method: str, response: Response) -> bytes:
    """Bytes for ``response`` (a 500 instead if it is not valid HTTP)."""
    status = response.status
    body = response.body
    headers = [
        (name, value)
        for name, value in response.headers
        if name.lower() not in (b"content-length", b"transfer-encoding")
    ]
    if status in _NO_BODY_STATUSES:
        body = b""
    else:
        headers.append((b"Content-Length", b"%d" % len(body)))
    if method == "HEAD":
        body = b""
    try:
        if not 200 <= status <= 999:
            raise h11.LocalProtocolError(f"status {status} cannot end an exchange")
        head = h11.Response(status_code=status, headers=headers, reason=response.reason)
    except h11.LocalProtocolError:
        body = b'{"error":"The handler returned an invalid response."}'
        head = h11.Response(
            status_code=500,
            headers=[
                (b"Content-Type", b"application/json"),
                (b"Content-Length", b"%d" % len(body)),
            ],
        )
    data = conn.send(head) or b""
    if body:
        data += conn.send(h11.Data(data=body)) or b""
    return data + (conn.send(h11.EndOfMessage()) or b"")


async def _send_error(
    stream: anyio.abc.SocketStream, conn: h11.Connection, status: int, message: str
) -> None:
    """Answer a rejected request, then close gently so the client can read the answer."""
    if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return
    body = _json_encode({"error": message})
    head = h11.Response(
        status_code=status,
        headers=[
            (b"Content-Type", b"application/json"),
            (b"Content-Length", b"%d" % len(body)),
            (b"Connection", b"close"),
        ],
    )
    try:
        data = (conn.send(head) or b"") + (conn.send(h11.Data(data=body)) or b"")
        data += conn.send(h11.EndOfMessage()) or b""
    except h11.LocalProtocolError:  # pragma: no cover - h11 refused: just close
        return
    await stream.send(data)
    # Closing with unread input would reset the connection and could destroy the answer
    # before the client reads it: stop writing, drain for a moment, then close.
    await stream.send_eof()
    with anyio.move_on_after(_LINGER_SECONDS):
        drained = 0
        try:
            while drained < _LINGER_BYTES:
                drained += len(await stream.receive(_RECEIVE_SIZE))
        except _PEER_GONE:
            pass
