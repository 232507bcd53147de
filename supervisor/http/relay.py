"""The proxy's forwarding core: one loop, in a thread of its own, relays every client and
upstream connection over a single edge-triggered epoll set; plus the header rewriting both
paths share.

See :mod:`supervisor.http.proxy` for what is forwarded and why this shape is fast.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import os
import select
import socket
import time
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING

import anyio
import msgspec

from supervisor.http._timeouts import Phase, Timeouts, Verdict, overdue
from supervisor.http.errors import RemoteProtocolError
from supervisor.http.request import RequestParser
from supervisor.http.response import Response as Upstream
from supervisor.http.response import ResponseParser
from supervisor.http.server import (
    Request,
    Response,
    encode_response,
    json_response,
    status_line,
)
from supervisor.logs import Logger

if TYPE_CHECKING:
    from supervisor.http.proxy import ProxyApp

__all__ = ["TIMED_OUT", "TOO_LARGE", "Relay", "end_to_end", "unreachable"]

_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"expect",
    }
)
_json_encode = msgspec.json.Encoder().encode


def _connection_tokens(headers: list[tuple[bytes, bytes]]) -> set[bytes]:
    """The lowercased header names listed in ``Connection`` headers."""
    named: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            named.update(token.strip().lower() for token in value.split(b","))
    return named


def end_to_end(
    headers: list[tuple[bytes, bytes]], *, drop: tuple[bytes, ...] = ()
) -> list[tuple[bytes, bytes]]:
    """``headers`` without hop-by-hop ones (including those named in ``Connection``)."""
    named = _connection_tokens(headers)
    return [
        (name, value)
        for name, value in headers
        if (lower := name.lower()) not in _HOP_BY_HOP
        and lower not in named
        and not lower.startswith(b"proxy-")
        and lower not in drop
    ]


def _upstream_head(request: Request, authority: bytes) -> bytes:
    """The upstream head without its framing: ``Content-Length`` and the blank line follow.

    The parser already validated names and values, so nothing is checked again. The length
    goes last, recomputed (a chunked body arrives whole).
    """
    lines = [b"POST %b HTTP/1.1\r\n" % request.target.encode("ascii")]
    has_host = False
    connection = False
    for name, value in request.headers:
        lower = name.lower()
        if lower in _HOP_BY_HOP:
            connection = connection or lower == b"connection"
            continue
        if lower[:6] == b"proxy-" or lower == b"content-length":
            continue
        if lower == b"host":
            has_host = True
        lines.append(b"%b: %b\r\n" % (name, value))
    if connection:  # rare: drop the names listed in Connection too
        named = _connection_tokens(request.headers)
        lines[1:] = [line for line in lines[1:] if line.partition(b":")[0].lower() not in named]
    if not has_host:
        lines.insert(1, b"Host: %b\r\n" % authority)
    return b"".join(lines)


class _Answers:
    """Re-frames upstream responses for the client (``Content-Length``, hop-by-hop dropped).

    The head before the framing is a function of the status, reason and headers, and a worker
    answers with the same ones again and again: the last one built is reused when they match.
    """

    __slots__ = ("_headers", "_prefix", "_reason", "_status")

    def __init__(self) -> None:
        self._status = 0
        self._reason = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._prefix = b""

    def encode(self, upstream: Upstream, keep_alive: bool) -> bytes:
        status = upstream.status
        headers = upstream.headers  # lowercased names, validated by the parser
        if status != self._status or upstream.reason != self._reason or headers != self._headers:
            self._prefix = _client_head(status, upstream.reason, headers)
            self._status = status
            self._reason = upstream.reason
            self._headers = headers
        body = upstream.body_head
        if status == 204 or status == 304:
            framing = b"" if keep_alive else b"Connection: close\r\n"
            return b"%b%b\r\n" % (self._prefix, framing)
        if keep_alive:
            return b"%bContent-Length: %d\r\n\r\n%b" % (self._prefix, len(body), body)
        return b"%bContent-Length: %d\r\nConnection: close\r\n\r\n%b" % (
            self._prefix,
            len(body),
            body,
        )


def _client_head(status: int, reason: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    """The status line and end-to-end headers of an answer, without its framing."""
    named: set[bytes] | frozenset[bytes] = frozenset()
    for name, _ in headers:
        if name == b"connection":
            named = _connection_tokens(headers)
            break
    parts = [status_line(status, reason)]
    for name, value in headers:
        if (
            name in _HOP_BY_HOP
            or name == b"content-length"
            or name[:6] == b"proxy-"
            or name in named
        ):
            continue
        parts.append(b"%b: %b\r\n" % (name, value))
    return b"".join(parts)


def unreachable(reason: str) -> Response:
    return json_response(502, {"error": f"The API could not be reached: {reason}"})


TIMED_OUT = json_response(504, {"error": "The API did not answer in time."})
TOO_LARGE = json_response(502, {"error": "The API's response body is too large."})


# -- the forwarding core (epoll) ---------------------------------------------------------------

_RECV = 65536
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_LINGER_SECONDS = 1.0
_LINGER_BYTES = 16 * 1024 * 1024
_ACCEPT_BACKOFF = 0.1
_ACCEPT_BATCH = 64
if hasattr(select, "epoll"):
    _IN = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
    _OUT = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR
    _MASK = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET
    _LISTEN = select.EPOLLIN
    _READABLE = select.EPOLLIN | select.EPOLLOUT  # as reported for a socket with news to read
    _HUP = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR  # the peer closed (or broke)
_ANSWER_ONLY = Request("POST", "/", [])  # encodes internal answers (keep-alive, not HEAD)


class _Client:
    """One accepted connection."""

    __slots__ = (
        "busy",
        "closed",
        "closing",
        "continued",
        "drained",
        "hup",
        "keep_alive",
        "linger",
        "lingering",
        "out",
        "parser",
        "pending",
        "phase",
        "readable",
        "since",
        "sock",
        "upstream_head",
        "upstream_port",
    )

    def __init__(self, sock: socket.socket, parser: RequestParser, now: float) -> None:
        self.sock = sock
        self.parser = parser
        self.out = b""  # bytes accepted but not yet sent
        self.busy = False  # a forwarded request is in flight (or waits for a connection)
        self.readable = True
        # The peer closed its side (or the socket broke): read to the end, even after a
        # short read, since no further edge will come.
        self.hup = False
        self.phase = Phase.IDLE  # what the connection waits for, since when (see _timeouts)
        self.since = now
        self.closed = False
        self.closing = False  # close once ``out`` is sent
        self.linger = False  # ... gently: shut down writing, then drain for a moment
        self.lingering = False
        self.drained = 0
        self.continued = False
        self.keep_alive = True
        self.pending = b""  # the upstream request while waiting for a pool slot
        # The upstream head built for this client's last head (see _dispatch), and its port.
        self.upstream_head = b""
        self.upstream_port = 0


class _Conn:
    """One upstream connection."""

    __slots__ = ("client", "closed", "connecting", "out", "parser", "port", "reused", "sock")

    def __init__(self, sock: socket.socket, port: int, keep_body: int) -> None:
        self.sock = sock
        self.port = port
        self.parser = ResponseParser(keep_body=keep_body)
        self.client: _Client | None = None
        self.out: memoryview | bytes = b""  # the unsent rest of the request
        self.connecting = True
        self.reused = False
        self.closed = False


class Relay:
    """The single-task forwarding core (see the module docstring)."""

    def __init__(
        self,
        app: ProxyApp,
        sockets: Sequence[socket.socket],
        max_body: int,
        max_head: int,
        logger: Logger | None,
        timeouts: Timeouts,
    ) -> None:
        self._app = app
        self._timeouts = timeouts
        self._clients = 0  # open client connections
        self._now = time.monotonic()  # the clock at the loop's last wake-up
        self._next_sweep = self._now
        self._epoll = select.epoll()
        self._listeners = {sock.fileno(): sock for sock in sockets}
        self._objects: dict[int, _Client | _Conn] = {}
        self._idle: list[_Conn] = []
        self._open = 0  # upstream connections, idle or busy
        self._waiting: deque[_Client] = deque()
        self._answers = _Answers()
        # The last upstream answer that arrived whole, alone, on an idle connection, and the
        # bytes it became for a keep-alive client: the same bytes again become the same answer.
        self._repeat_in: bytes | None = None
        self._repeat_out = b""
        self._deadlines: dict[object, float] = {}  # _Conn: 504; _Client: linger; fd: accept
        self._max_body = max_body
        self._max_head = max_head
        self._logger = logger
        self._family = (
            socket.AF_INET6
            if ipaddress.ip_address(app.target_host).version == 6
            else socket.AF_INET
        )
        self._authority = (
            f"[{app.target_host}]" if self._family == socket.AF_INET6 else app.target_host
        ).encode("ascii")

    async def run(self) -> None:
        """Relay until cancelled: the loop runs in a thread of its own (see the module doc)."""
        wake_r, wake_w = os.pipe()
        try:
            async with anyio.create_task_group() as tg:

                async def stop_when_cancelled() -> None:
                    try:
                        await anyio.sleep_forever()
                    finally:
                        os.write(wake_w, b"x")  # the thread returns at its next wait

                tg.start_soon(stop_when_cancelled)
                await anyio.to_thread.run_sync(self._loop, wake_r, limiter=anyio.CapacityLimiter(1))
                tg.cancel_scope.cancel()
        finally:
            os.close(wake_r)
            os.close(wake_w)

    def _loop(self, wake: int) -> None:
        epoll = self._epoll
        objects = self._objects
        deadlines = self._deadlines
        client_event = self._client_event
        conn_event = self._conn_event
        try:
            for lfd in self._listeners:
                epoll.register(lfd, _LISTEN)
            epoll.register(wake, select.EPOLLIN)
            while True:
                timeout = -1.0
                if deadlines:
                    nearest = min(deadlines.values())
                    if self._clients:
                        nearest = min(nearest, self._next_sweep)
                    timeout = max(nearest - time.monotonic(), 0.0)
                elif self._clients:
                    timeout = max(self._next_sweep - self._now, 0.0)
                ready = epoll.poll(timeout)
                self._now = now = time.monotonic()
                if deadlines:
                    self._expire(now)
                for efd, events in ready:
                    obj = objects.get(efd)
                    try:
                        if type(obj) is _Client:
                            client_event(obj, events)
                        elif type(obj) is _Conn:
                            conn_event(obj, events)
                        elif efd == wake:
                            return
                        else:
                            listener = self._listeners.get(efd)
                            if listener is not None:
                                self._accept(listener)
                    except Exception as exc:  # pragma: no cover - a bug must not stop the proxy
                        self._log("http_connection_failed", f"{type(exc).__name__}: {exc}")
                        if isinstance(obj, _Client):
                            self._close_client(obj)
                        elif isinstance(obj, _Conn):
                            self._fail(obj, "internal error.")
                # After the events: a client whose bytes just came is no longer idle.
                if self._clients and now >= self._next_sweep:
                    self._sweep(now)
        finally:
            for obj in list(objects.values()):
                obj.sock.close()
            objects.clear()
            epoll.close()

    def _log(self, event: str, error: str, *, level: str = "error") -> None:
        """Log from the relay's thread: the logger belongs to the event loop's."""
        if self._logger is not None:
            write = self._logger.error if level == "error" else self._logger.warning
            anyio.from_thread.run_sync(functools.partial(write, event, error=error))

    # -- timers and accepting ------------------------------------------------------------

    def _expire(self, now: float) -> None:
        for key, deadline in list(self._deadlines.items()):
            if deadline > now:
                continue
            del self._deadlines[key]
            if isinstance(key, _Conn):
                if key.client is not None:
                    self._fail(key, "", TIMED_OUT)
            elif isinstance(key, _Client):
                self._close_client(key)
            elif isinstance(key, int):
                self._epoll.modify(key, _LISTEN)

    def _sweep(self, now: float) -> None:
        """Answer 408 to, or close, the client connections that waited too long."""
        timeouts = self._timeouts
        self._next_sweep = now + timeouts.sweep
        clients = [
            (obj, obj.phase, obj.since) for obj in self._objects.values() if type(obj) is _Client
        ]
        for client, action in overdue(clients, now, timeouts):
            if client.closed:
                continue
            if action is Verdict.TIMED_OUT:
                self._reject(
                    client, 408, f"The request did not arrive within {timeouts.read:g} seconds."
                )
            else:
                self._close_client(client)

    def _accept(self, listener: socket.socket) -> None:
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, _address = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # aborted handshakes, or out of file descriptors: back off
                self._log("http_accept_failed", str(exc), level="warning")
                self._epoll.modify(listener.fileno(), 0)
                self._deadlines[listener.fileno()] = time.monotonic() + _ACCEPT_BACKOFF
                return
            sock.setblocking(False)
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            parser = RequestParser(max_head=self._max_head, max_body=self._max_body)
            client = _Client(sock, parser, self._now)
            self._objects[sock.fileno()] = client
            self._clients += 1
            self._epoll.register(sock.fileno(), _MASK)

    # -- client side ---------------------------------------------------------------------

    def _client_event(self, client: _Client, events: int) -> None:
        if events & _OUT and client.out:
            self._flush_client(client)
        if events & _IN:
            client.readable = True
            if events & _HUP:
                client.hup = True
        self._pump(client)

    def _pump(self, client: _Client) -> None:
        """Answer or forward what the client sent, reading while it may send more."""
        parser = client.parser
        while not client.closed:
            if client.lingering:
                self._drain(client)
                return
            if client.busy or client.out or client.closing:
                return
            try:
                request = parser.next_request()
            except RemoteProtocolError as exc:
                self._reject(client, exc.error_status_hint, f"Invalid HTTP request: {exc}")
                return
            if request is not None:
                self._dispatch(client, request)
                continue
            if parser.at_eof:
                self._close_client(client)
                return
            if parser.expects_continue and not client.continued:
                client.continued = True
                self._send(client, _CONTINUE)
                continue
            if not client.readable:
                self._waiting_for(client)
                return
            try:
                data = client.sock.recv(_RECV)
            except (BlockingIOError, InterruptedError):
                client.readable = False
                self._waiting_for(client)
                return
            except OSError:
                self._close_client(client)
                return
            if len(data) < _RECV and not client.hup:
                client.readable = False
            parser.receive_data(data)

    def _waiting_for(self, client: _Client) -> None:
        """The client is left waiting for bytes: stamp the phase it is in, when it changed."""
        phase = client.parser.phase
        if phase is not client.phase:
            client.phase = phase
            client.since = self._now

    def _dispatch(self, client: _Client, request: Request) -> None:
        if not client.parser.reused_head:
            # Only a head equal to the last one (Content-Length aside) may reuse its build.
            client.upstream_head = b""
        client.continued = False
        client.keep_alive = request.keep_alive
        client.phase = Phase.BUSY
        app = self._app
        port = app.forward_port(request)
        if port is None:  # answered here (the pod's status by the event loop's thread)
            try:
                if app.needs_event_loop(request):
                    answer = anyio.from_thread.run_sync(app.route, request)
                else:
                    answer = app.route(request)
            except Exception as exc:
                self._log("http_handler_failed", f"{type(exc).__name__}: {exc}")
                answer = json_response(500, {"error": "Internal server error."})
            if answer is None:  # became ready meanwhile
                port = app.target_port()
                if port is None:
                    answer = unreachable("The target port is not known yet.")
            if answer is not None:
                data, keep_alive = encode_response(request, answer)
                if not keep_alive:
                    client.closing = True
                self._send(client, data)
                return
        assert port is not None
        client.busy = True
        head = client.upstream_head
        if not head or client.upstream_port != port:
            head = _upstream_head(request, b"%b:%d" % (self._authority, port))
            client.upstream_head = head
            client.upstream_port = port
        body = request.body
        data = b"%bContent-Length: %d\r\n\r\n%b" % (head, len(body), body)
        idle = self._idle
        if idle and not self._waiting and idle[-1].port == port:  # the hot path
            conn = idle.pop()
            conn.client = client
            conn.out = data
            if app.upstream_timeout is not None:
                self._deadlines[conn] = time.monotonic() + app.upstream_timeout
            self._write(conn)
            return
        client.pending = data
        self._waiting.append(client)
        self._start_waiting()

    def _answer(self, client: _Client, answer: Response | bytes) -> None:
        """Send the answer to the forwarded request, then go on with the client."""
        client.busy = False
        if client.closed:
            return
        if isinstance(answer, Response):
            request = (
                _ANSWER_ONLY if client.keep_alive else Request("POST", "/", [], keep_alive=False)
            )
            answer = encode_response(request, answer)[0]
        if not client.keep_alive:
            client.closing = True
        self._send(client, answer)
        self._pump(client)

    def _send(self, client: _Client, data: bytes) -> None:
        if client.out:
            client.out += data
            return
        try:
            sent = client.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._close_client(client)
            return
        if sent < len(data):
            client.out = data[sent:]
        elif client.closing:
            self._finish(client)

    def _flush_client(self, client: _Client) -> None:
        data = client.out
        try:
            sent = client.sock.send(data)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close_client(client)
            return
        client.out = data[sent:]
        if not client.out and client.closing:
            self._finish(client)

    def _finish(self, client: _Client) -> None:
        """The last answer was sent: close, gently when the client may still be sending."""
        if not client.linger:
            self._close_client(client)
            return
        try:
            client.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        client.lingering = True
        client.readable = True
        self._deadlines[client] = time.monotonic() + _LINGER_SECONDS
        self._drain(client)

    def _drain(self, client: _Client) -> None:
        while client.drained < _LINGER_BYTES:
            try:
                data = client.sock.recv(_RECV)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                break
            if not data:
                break
            client.drained += len(data)
        self._close_client(client)

    def _reject(self, client: _Client, status: int, message: str) -> None:
        body = _json_encode({"error": message})
        head = (
            status_line(status, b"")
            + b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body)
            + b"Connection: close\r\n\r\n"
        )
        client.closing = client.linger = True
        client.phase = Phase.CLOSING
        client.since = self._now
        self._send(client, head + body)

    def _close_client(self, client: _Client) -> None:
        if not client.closed:
            client.closed = True
            self._clients -= 1
            self._deadlines.pop(client, None)
            self._objects.pop(client.sock.fileno(), None)
            client.sock.close()

    # -- upstream side -------------------------------------------------------------------

    def _start_waiting(self) -> None:
        """Give waiting clients an idle connection, or a new one while under the limit."""
        waiting = self._waiting
        idle = self._idle
        pool_size = self._app.pool_size
        while waiting and (idle or self._open < pool_size):
            client = waiting.popleft()
            if client.closed:
                continue
            data, client.pending = client.pending, b""
            port = self._app.target_port()
            conn = None
            while idle:
                candidate = idle.pop()
                if candidate.port == port:
                    conn = candidate
                    break
                self._close_conn(candidate)
            if port is None:
                self._answer(client, unreachable("The target port is not known yet."))
                continue
            if conn is None:
                conn = self._connect(client, port)
                if conn is None:
                    continue
            conn.client = client
            conn.out = data
            if self._app.upstream_timeout is not None:
                self._deadlines[conn] = time.monotonic() + self._app.upstream_timeout
            if not conn.connecting:
                self._write(conn)

    def _connect(self, client: _Client, port: int) -> _Conn | None:
        sock = socket.socket(self._family, socket.SOCK_STREAM)
        sock.setblocking(False)
        code = sock.connect_ex((self._app.target_host, port))
        if code not in (0, errno.EINPROGRESS, errno.EAGAIN):
            sock.close()
            reason = errno.errorcode.get(code, str(code))
            self._answer(
                client,
                unreachable(f"Could not connect to {self._app.target_host}:{port}: {reason}."),
            )
            return None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = _Conn(sock, port, self._app.max_response_body)
        self._objects[sock.fileno()] = conn
        self._epoll.register(sock.fileno(), _MASK)
        self._open += 1
        return conn

    def _conn_event(self, conn: _Conn, events: int) -> None:
        if events == _READABLE and conn.client is not None and not conn.out and not conn.connecting:
            self._read(conn)
            return
        if conn.connecting:
            if not events & _OUT:
                return
            code = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                reason = errno.errorcode.get(code, str(code))
                self._fail(
                    conn, f"Could not connect to {self._app.target_host}:{conn.port}: {reason}."
                )
                return
            conn.connecting = False
            if conn.out:
                self._write(conn)
        elif events & _OUT and conn.out:
            self._write(conn)
        if events & _IN and not conn.closed:
            if conn.client is None:  # idle: the server closed it (or sent stray bytes)
                self._idle.remove(conn)
                self._close_conn(conn)
            else:
                self._read(conn)

    def _write(self, conn: _Conn) -> None:
        data = conn.out
        try:
            sent = conn.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            client = conn.client
            if conn.reused and client is not None:
                # The server closed the reused connection before the request arrived: retry
                # once on a fresh connection (nothing of it was acted upon).
                whole = data.obj if isinstance(data, memoryview) else data
                conn.client = None
                self._close_conn(conn)
                self._deadlines.pop(conn, None)
                client.pending = bytes(whole)
                self._waiting.appendleft(client)
                self._start_waiting()
                return
            self._fail(conn, "The connection broke while sending the request.")
            return
        if sent < len(data):
            conn.out = memoryview(data)[sent:] if isinstance(data, bytes) else data[sent:]
        else:
            conn.out = b""

    def _read(self, conn: _Conn) -> None:
        parser = conn.parser
        client = conn.client
        assert client is not None
        while True:
            try:
                data = conn.sock.recv(_RECV)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._fail(conn, "The connection broke while reading the response.")
                return
            fresh = parser.idle
            if fresh and data == self._repeat_in and client.keep_alive:
                self._relay(conn, True, self._repeat_out)  # a worker's usual answer, again
                return
            parser.receive_data(data)
            try:
                response = parser.next_response()
            except RemoteProtocolError as exc:
                self._fail(conn, str(exc))
                return
            if response is not None:
                if response.body_truncated:
                    self._relay(conn, response.keep_alive, TOO_LARGE)
                    return
                answer = self._answers.encode(response, client.keep_alive)
                if fresh and response.keep_alive and client.keep_alive and not parser.unprocessed:
                    self._repeat_in = data
                    self._repeat_out = answer
                self._relay(conn, response.keep_alive, answer)
                return
            if len(data) < _RECV:
                return

    def _relay(self, conn: _Conn, keep_alive: bool, answer: Response | bytes) -> None:
        """Give ``answer`` to the client; keep ``conn`` for another request when it can."""
        client = conn.client
        assert client is not None
        conn.client = None
        if self._deadlines:
            self._deadlines.pop(conn, None)
        if keep_alive and not conn.parser.unprocessed and not conn.out:
            conn.reused = True
            self._idle.append(conn)
            if self._waiting:
                self._start_waiting()
        else:
            self._close_conn(conn)
            self._start_waiting()
        self._answer(client, answer)

    def _fail(self, conn: _Conn, reason: str, answer: Response | None = None) -> None:
        """Close ``conn``; its client gets 502 (or ``answer``)."""
        client = conn.client
        conn.client = None
        self._deadlines.pop(conn, None)
        self._close_conn(conn)
        self._start_waiting()
        if client is not None:
            self._answer(client, answer or unreachable(reason))

    def _close_conn(self, conn: _Conn) -> None:
        if not conn.closed:
            conn.closed = True
            self._open -= 1
            self._objects.pop(conn.sock.fileno(), None)
            conn.sock.close()
