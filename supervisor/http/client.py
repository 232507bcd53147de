"""HTTP/1.1 clients: the batch hot path, a keep-alive pool, and a one-shot h11 request.

Theory of operation
-------------------
* :class:`BatchClient` posts batches over one keep-alive connection. The request head is built
  once; a post only formats ``Content-Length``, writes head and body in one ``send`` (two for
  big bodies) and feeds what it reads to the sans-IO :class:`~.response.ResponseParser`. There
  is no per-request h11 state machine, which is what makes it several times faster than a
  textbook h11 client.
* :class:`ConnectionPool` keeps up to N such connections to one target for the proxy; any
  method, target and headers. A connection goes back to the pool only after a clean exchange
  (a complete response that allows keep-alive and no stray bytes after it).
* :func:`request` is a plain one-shot h11 exchange with ``Connection: close``, for rare calls
  such as ``/on-job-complete``.

Reuse and retry rule
--------------------
Servers close idle keep-alive connections whenever they like, so a reused connection may be
dead. Before reusing one we *probe* it: ``poll()`` with a zero timeout on its socket shows
whether the server closed it (or sent unsolicited bytes) while it was idle -- both backends
only read a socket while a receive is pending, so the kernel still holds that news; if so
it is dropped and a fresh connection is opened -- nothing was sent, so nothing is
retried. After that, a request is retried on a fresh connection **once, and only when the
reused connection failed while we were writing the request** (no byte of a response was
read): an HTTP/1.1 server does not act on a request it has not received whole. A failure
after the request was written (reset or close while waiting for the response) is never
retried, because a ``POST`` may already have been processed; it raises ``ReadError`` or
``RemoteProtocolError`` and the caller (dispatch) counts a failed attempt. Fresh connections
are never retried.

The clients have no timeouts of their own (except :func:`request`): wrap calls in
``anyio.fail_after``. A cancelled exchange leaves its connection in an unknown state, so the
connection is closed, never reused.
"""

from __future__ import annotations

import select
from collections.abc import Callable, Sequence

import anyio
import anyio.abc
import h11

from supervisor.http._framing import TCHAR
from supervisor.http._rawsock import RawSocket, connect
from supervisor.http.errors import (
    ConnectError,
    ConnectTimeout,
    HTTPError,
    LocalProtocolError,
    ReadError,
    ReadTimeout,
    RemoteProtocolError,
    WriteError,
    WriteTimeout,
)
from supervisor.http.response import KEEP_BODY, Response, ResponseParser

__all__ = ["BatchClient", "ConnectionPool", "Response", "post_head_prefix", "request"]

_IO_ERRORS = (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)
_RECEIVE_SIZE = 65536
_ONE_SEND = 64 * 1024  # head and body are joined into one send up to this body size
_FRAMING = (b"content-length", b"transfer-encoding")


def _authority(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _check_header(name: bytes, value: bytes) -> None:
    """Refuse header names that are not tokens and values that could inject lines."""
    if not name or name.translate(None, TCHAR):
        raise LocalProtocolError(f"Illegal header name {name[:100]!r}.")
    if b"\r" in value or b"\n" in value or b"\x00" in value:
        raise LocalProtocolError(f"Illegal header value {value[:100]!r} for {name!r}.")


def _encode_headers(headers: Sequence[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    out = []
    for name, value in headers:
        raw = (name.encode("ascii"), value.strip().encode("latin-1"))
        _check_header(*raw)
        out.append(raw)
    return out


async def _connect(host: str, port: int) -> RawSocket:
    try:
        return await connect(host, port)
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise ConnectError(f"Could not connect to {_authority(host, port)}: {reason}.") from exc


class _Connection:
    """One TCP connection and its parser: write a request, read one response."""

    __slots__ = ("_parser", "_poll", "_sock", "port", "reused")

    def __init__(self, sock: RawSocket, port: int, keep_body: int | None) -> None:
        self._sock = sock
        self._parser = ResponseParser(keep_body=keep_body)
        self.port = port
        self.reused = False  # becomes True once the connection carried a response
        self._poll: select.poll | None = None
        if hasattr(select, "poll"):
            self._poll = select.poll()
            self._poll.register(sock.sock.fileno(), select.POLLIN)

    @classmethod
    async def open(cls, host: str, port: int, keep_body: int | None) -> _Connection:
        return cls(await _connect(host, port), port, keep_body)

    def is_reusable(self) -> bool:
        """Whether the idle connection is still open and silent (see the module docstring)."""
        if self._parser.must_close or self._parser.unprocessed:
            return False
        if self._poll is None:  # pragma: no cover - no poll() on this platform: trust it
            return True
        # Readable (EOF or unsolicited bytes), hung up or invalid: do not reuse.
        return not self._poll.poll(0)

    async def exchange(
        self, request: bytes, body: bytes, *, head_request: bool = False
    ) -> Response:
        """Write one request and read its response; the caller closes us on any error."""
        sock = self._sock
        try:
            if len(body) <= _ONE_SEND:
                await sock.sendall(request + body if body else request)
            else:
                await sock.sendall(request)
                await sock.sendall(body)
        except _IO_ERRORS as exc:
            raise WriteError("The connection broke while sending the request.") from exc
        parser = self._parser
        while True:
            try:
                data = await sock.recv(_RECEIVE_SIZE)
            except _IO_ERRORS as exc:
                raise ReadError("The connection broke while reading the response.") from exc
            parser.receive_data(data)
            response = parser.next_response(head_request=head_request)
            if response is not None:
                self.reused = True
                return response

    def is_clean(self, response: Response) -> bool:
        """Whether the connection may carry another request after ``response``."""
        return response.keep_alive and not self._parser.unprocessed

    def close(self) -> None:
        self._poll = None
        self._sock.close()


async def _discard(conn: _Connection) -> None:
    conn.close()


def post_head_prefix(
    host: str, port: int, path: str = "/", headers: Sequence[tuple[str, str]] = ()
) -> bytes:
    """``POST {path} HTTP/1.1``, ``Host`` (unless given), then ``headers`` in order: a request
    head without its framing (``Content-Length``) and the blank line, built once per client."""
    if not path.startswith("/") or any(c <= " " or c > "~" for c in path):
        raise LocalProtocolError(f"Illegal request path {path!r}.")
    encoded = _encode_headers(headers)
    lines = [f"POST {path} HTTP/1.1\r\n".encode("ascii")]
    if not any(name.lower() == b"host" for name, _ in encoded):
        lines.append(f"Host: {_authority(host, port)}\r\n".encode("ascii"))
    for name, value in encoded:
        if name.lower() in _FRAMING:
            raise LocalProtocolError(f"{name.decode()} is set by the client, not by the caller.")
        lines.append(name + b": " + value + b"\r\n")
    return b"".join(lines)


class BatchClient(anyio.abc.AsyncResource):
    """Posts batches to ``host:port`` over one keep-alive connection (the dispatch hot path).

    The head ``POST {path} HTTP/1.1``, ``Host``, then ``headers`` in the given order is built
    once; each :meth:`post` adds ``extra_headers`` (pre-encoded ``Name: value\\r\\n`` lines) and
    ``Content-Length``. Only the first ``keep_body`` bytes of each response body are kept.
    One post at a time; use several clients (or a :class:`ConnectionPool`) for concurrency.
    """

    __slots__ = ("_busy", "_closed", "_conn", "_host", "_keep_body", "_port", "_prefix")

    def __init__(
        self,
        host: str,
        port: int,
        *,
        path: str = "/",
        headers: Sequence[tuple[str, str]] = (),
        keep_body: int | None = KEEP_BODY,
    ) -> None:
        self._prefix = post_head_prefix(host, port, path, headers)
        self._host = host
        self._port = port
        self._keep_body = keep_body
        self._conn: _Connection | None = None
        self._busy = False
        self._closed = False

    @property
    def request_head_prefix(self) -> bytes:
        """The pre-built part of the request head (everything before ``Content-Length``)."""
        return self._prefix

    async def post(self, body: bytes, extra_headers: bytes = b"") -> Response:
        """POST ``body``; return the response. Raises an :class:`HTTPError` subclass."""
        if self._busy:
            raise LocalProtocolError("BatchClient.post() was called while another post is running.")
        if self._closed:
            raise LocalProtocolError("BatchClient.post() was called after aclose().")
        if extra_headers and (not extra_headers.endswith(b"\r\n") or b"\r\n\r\n" in extra_headers):
            raise LocalProtocolError("extra_headers must be complete 'Name: value\\r\\n' lines.")
        request = b"%b%bContent-Length: %d\r\n\r\n" % (self._prefix, extra_headers, len(body))
        self._busy = True
        try:
            conn = self._conn
            if conn is not None and not conn.is_reusable():
                self._conn = None
                await _discard(conn)
                conn = None
            if conn is None:
                conn = self._conn = await _Connection.open(self._host, self._port, self._keep_body)
            try:
                response = await conn.exchange(request, body)
            except WriteError:
                if not conn.reused:
                    raise
                # The server closed the reused connection before the request arrived.
                self._conn = None
                await _discard(conn)
                conn = self._conn = await _Connection.open(self._host, self._port, self._keep_body)
                response = await conn.exchange(request, body)
            if not conn.is_clean(response):
                self._conn = None
                await _discard(conn)
            return response
        except BaseException:
            conn, self._conn = self._conn, None
            if conn is not None:
                await _discard(conn)
            raise
        finally:
            self._busy = False

    async def aclose(self) -> None:
        """Close the connection; later posts raise ``LocalProtocolError``."""
        self._closed = True
        conn, self._conn = self._conn, None
        if conn is not None:
            await _discard(conn)


class ConnectionPool(anyio.abc.AsyncResource):
    """Up to ``max_connections`` keep-alive connections to one target (used by the proxy).

    ``port`` may be a callable read before each request (the port owner may change); idle
    connections to another port are dropped. ``keep_body=None`` keeps whole response bodies.
    """

    def __init__(
        self,
        host: str,
        port: int | Callable[[], int | None],
        *,
        max_connections: int = 64,
        keep_body: int | None = None,
    ) -> None:
        self._host = host
        self._port: Callable[[], int | None] = port if callable(port) else (lambda: port)
        self._keep_body = keep_body
        self._idle: list[_Connection] = []
        self._limiter = anyio.Semaphore(max_connections)
        self._closed = False

    @property
    def idle_connections(self) -> int:
        """How many connections wait in the pool for reuse."""
        return len(self._idle)

    async def request(
        self,
        method: bytes,
        target: bytes,
        headers: Sequence[tuple[bytes, bytes]] = (),
        body: bytes = b"",
    ) -> Response:
        """Send one request and return its response.

        ``headers`` are written in order, as given; ``Host`` is added first if missing and
        ``Content-Length`` last if missing (a given one must equal ``len(body)``);
        ``Transfer-Encoding`` is refused (bodies are always sent whole).
        """
        async with self._limiter:
            if self._closed:
                raise LocalProtocolError("ConnectionPool.request() was called after aclose().")
            port = self._port()
            if port is None:
                raise ConnectError("The target port is not known yet.")
            request = self._encode(method, target, headers, body, port)
            conn = await self._checkout(port)
            head_request = method == b"HEAD"
            try:
                try:
                    response = await conn.exchange(request, body, head_request=head_request)
                except WriteError:
                    if not conn.reused:
                        raise
                    await _discard(conn)
                    conn = await _Connection.open(self._host, port, self._keep_body)
                    response = await conn.exchange(request, body, head_request=head_request)
            except BaseException:
                await _discard(conn)
                raise
            if conn.is_clean(response) and not self._closed:
                self._idle.append(conn)
            else:
                await _discard(conn)
            return response

    def _encode(
        self,
        method: bytes,
        target: bytes,
        headers: Sequence[tuple[bytes, bytes]],
        body: bytes,
        port: int,
    ) -> bytes:
        if not method or method.translate(None, TCHAR):
            raise LocalProtocolError(f"Illegal request method {method[:50]!r}.")
        if not target or any(c <= 0x20 or c >= 0x7F for c in target):
            raise LocalProtocolError(f"Illegal request target {target[:100]!r}.")
        lines = [method + b" " + target + b" HTTP/1.1\r\n"]
        has_host = has_length = False
        for name, value in headers:
            _check_header(name, value)
            lower = name.lower()
            if lower == b"host":
                has_host = True
            elif lower == b"content-length":
                if not value.strip().isdigit() or int(value) != len(body):
                    raise LocalProtocolError(
                        f"Content-Length {value!r} does not match the body ({len(body)} bytes)."
                    )
                has_length = True
            elif lower == b"transfer-encoding":
                raise LocalProtocolError("Transfer-Encoding is not supported; send whole bodies.")
            lines.append(name + b": " + value + b"\r\n")
        if not has_host:
            lines.insert(1, f"Host: {_authority(self._host, port)}\r\n".encode("ascii"))
        if not has_length and (body or method not in (b"GET", b"HEAD")):
            lines.append(b"Content-Length: %d\r\n" % len(body))
        lines.append(b"\r\n")
        return b"".join(lines)

    async def _checkout(self, port: int) -> _Connection:
        idle = self._idle
        while idle:
            conn = idle.pop()
            if conn.port == port and conn.is_reusable():
                return conn
            await _discard(conn)
        return await _Connection.open(self._host, port, self._keep_body)

    async def aclose(self) -> None:
        """Close idle connections; connections in use are closed when their request ends."""
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            await _discard(conn)


async def request(
    host: str,
    port: int,
    method: str,
    target: str,
    *,
    headers: Sequence[tuple[str, str]] = (),
    body: bytes = b"",
    timeout: float = 10.0,  # noqa: ASYNC109 - a one-shot call with its own deadline (documented)
    max_body: int = 64 * 1024 * 1024,
) -> Response:
    """One request over a fresh connection with h11, ``Connection: close``; whole body kept.

    The whole exchange must finish within ``timeout`` seconds (``ConnectTimeout``,
    ``WriteTimeout`` or ``ReadTimeout`` otherwise); a body over ``max_body`` bytes raises
    ``RemoteProtocolError``.
    """
    authority = _authority(host, port)
    names = {name.lower() for name, _ in headers}
    if names & {"content-length", "transfer-encoding", "connection"}:
        raise LocalProtocolError(
            "Content-Length, Transfer-Encoding and Connection are set by request()."
        )
    all_headers = [] if "host" in names else [("Host", authority)]
    all_headers += [*headers, ("Content-Length", str(len(body))), ("Connection", "close")]
    conn = h11.Connection(h11.CLIENT)
    try:
        data = conn.send(h11.Request(method=method, target=target, headers=all_headers))
        if body:
            data += conn.send(h11.Data(data=body))
        data += conn.send(h11.EndOfMessage())
    except h11.LocalProtocolError as exc:
        raise LocalProtocolError(f"Cannot send this request: {exc}.") from exc

    phase = "connect"
    try:
        with anyio.fail_after(timeout):
            try:
                stream = await anyio.connect_tcp(host, port)
            except OSError as exc:
                reason = exc.strerror or str(exc) or type(exc).__name__
                raise ConnectError(f"Could not connect to {authority}: {reason}.") from exc
            try:
                phase = "write"
                try:
                    await stream.send(data)
                except _IO_ERRORS as exc:
                    raise WriteError("The connection broke while sending the request.") from exc
                phase = "read"
                return await _read_h11_response(stream, conn, max_body)
            finally:
                await anyio.aclose_forcefully(stream)
    except TimeoutError as exc:
        if isinstance(exc, HTTPError):  # pragma: no cover - ours are never raised inside
            raise
        if phase == "connect":
            raise ConnectTimeout(f"Could not connect to {authority} within {timeout:g} s.") from exc
        if phase == "write":
            raise WriteTimeout(
                f"Could not send the request to {authority} within {timeout:g} s."
            ) from exc
        raise ReadTimeout(f"No complete response from {authority} within {timeout:g} s.") from exc


async def _read_h11_response(
    stream: anyio.abc.SocketStream, conn: h11.Connection, max_body: int
) -> Response:
    head: h11.Response | None = None
    body = bytearray()
    received = 0
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                try:
                    data = await stream.receive(_RECEIVE_SIZE)
                except anyio.EndOfStream:
                    data = b""
                except _IO_ERRORS as exc:
                    raise ReadError("The connection broke while reading the response.") from exc
                if not data and not received:
                    raise RemoteProtocolError("Server disconnected without sending a response.")
                received += len(data)
                conn.receive_data(data)
            elif isinstance(event, h11.Response):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > max_body:
                    raise RemoteProtocolError(f"Response body is larger than {max_body} bytes.")
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                return Response(
                    status=head.status_code,
                    headers=list(head.headers),
                    body_head=bytes(body),
                    keep_alive=False,
                    reason=head.reason,
                    http_version=head.http_version,
                    body_length=len(body),
                )
            elif not isinstance(event, h11.InformationalResponse):
                raise RemoteProtocolError("Server disconnected before the response was complete.")
    except h11.RemoteProtocolError as exc:
        raise RemoteProtocolError(f"Server sent an invalid response: {exc}.") from exc
