"""The proxy's forwarding core: one loop relays every client and upstream connection over a
single edge-triggered epoll set (Linux).

Theory of operation
-------------------
:func:`serve_relay` runs :class:`Relay` for a :class:`~supervisor.http.proxy.ProxyApp` on the
listening sockets of an anyio listener. The relay registers every client and upstream socket
once, edge triggered, and blocks in ``epoll_wait``. Each wake-up handles every ready socket:
``recv``, the sans-IO parser, ``send``. The upstream events of a wake-up are handled before
the client events, so a request never goes out on an idle connection that the same wake-up
reported closed.

Why a thread of its own (the loop runs in one, started with :func:`anyio.to_thread.run_sync`
and stopped through a pipe in the epoll set when the serving task is cancelled): driven from
the event loop instead (``anyio.wait_readable`` on the epoll fd, then ``poll(0)``), every
round pays a loop wake-up and, on uvloop, a register/unregister of that fd; the thread pays
one ``epoll_wait``. Measured with this relay, ``python -m bench --only proxy --quick
--no-install`` (worker (a), c=4; nginx absent), five alternating runs each: the thread
20.5k req/s, 0.29x direct (medians; 16-24k), the event-loop drive 11.0k req/s, 0.13x direct
(8.5-17k). The thread pays for itself about twice over, so it stays.

Only the forwarding decision runs in the relay's thread (:meth:`ProxyApp.forward_port`, which
reads ``is_ready`` and ``target_port``), and so do the local answers that need nothing else
(``/healthz``, 503s, 404s, 405s): a client hammering a pod that is not ready costs no more
than a forwarded request. ``/status`` (:meth:`ProxyApp.needs_event_loop`) and logging go to
the event loop's thread with :func:`anyio.from_thread.run_sync`, since that thread owns the
pod's state.

Client side: read, parse a whole request with :class:`~supervisor.http.request.RequestParser`
(names and values are validated there, so the upstream head is built without re-checking),
route it, and either answer at once or hand it to an upstream connection. One request per
client is in flight; pipelined requests wait in the parser's buffer and the client is not read
while an answer is still unsent (bounded memory). Reads stop after a short ``recv`` (the
kernel buffer was empty; the next byte brings an event), except once the client closed its
side (``EPOLLRDHUP``): its FIN may have come with the last bytes and brings no further edge,
so the client is read to its end, answered what it is owed and closed. Parse errors get
400/413/431/501 and a lingering close, encoded and drained by the server's own helpers
(:func:`~supervisor.http.server.error_answer`, :func:`~supervisor.http.server.drain`); a
failing ``accept`` backs off as in the server (:func:`~supervisor.http.server.accept_one`).

Client timeouts follow :mod:`~supervisor.http._timeouts`: a head or body that does not arrive
within ``read`` seconds gets 408 and a close, a keep-alive connection idle for ``idle`` seconds
is closed. Each client's phase is stamped with the clock read once per wake-up, and overdue
clients are looked for at most every ``Timeouts.sweep`` seconds: no syscall per request.

Upstream side: each upstream socket drives one sans-IO
:class:`~supervisor.http.connection.ClientConnection`, which decides when an answer ends (every
framing: ``Content-Length``, chunked, close-delimited, HTTP/1.0, ``Connection: close``),
whether the connection may carry another request, and whether a failed request may be sent
again (only when a reused connection broke while the request was being written). A read
whose wake-up reports the worker's side closed (``EPOLLRDHUP``) reads on to the end of the
stream and tells the connection (``peer_closing``), as the dispatch engine does: that ends a
close-delimited answer and keeps a connection the worker closed from being reused. An idle
connection that turns readable (closed by the worker, or stray bytes) is dropped when its
event comes: the epoll set is the relay's idle check. Answers are re-framed with
``Content-Length`` (:class:`~supervisor.http._forward.Answers`).
"""

from __future__ import annotations

import enum
import errno
import functools
import ipaddress
import os
import select
import socket
import time
from collections import deque
from collections.abc import Sequence

import anyio
import anyio.abc

from supervisor.http._forward import TIMED_OUT, TOO_LARGE, Answers, unreachable, upstream_head
from supervisor.http._timeouts import DEFAULT_TIMEOUTS, Phase, Timeouts, Verdict, overdue
from supervisor.http.connection import ClientConnection, State
from supervisor.http.errors import RemoteProtocolError
from supervisor.http.proxy import ProxyApp
from supervisor.http.request import MAX_BODY, MAX_HEAD, RequestParser
from supervisor.http.server import (
    ACCEPT_BACKOFF,
    LINGER_SECONDS,
    Request,
    Response,
    accept_one,
    drain,
    encode_response,
    error_answer,
    error_response,
    listening_sockets,
)
from supervisor.logs import Logger

__all__ = ["Relay", "serve_relay", "start_relay"]

_RECV = 65536
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_ACCEPT_BATCH = 64
_IN = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
_OUT = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR
_MASK = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET
_LISTEN = select.EPOLLIN
_READABLE = select.EPOLLIN | select.EPOLLOUT  # as reported for a socket with news to read
_HUP = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR  # the peer closed (or broke)
_CLOSED = State.CLOSED
_ANSWER_ONLY = Request("POST", "/", [])  # encodes internal answers (keep-alive, not HEAD)
_ANSWER_CLOSE = Request("POST", "/", [], keep_alive=False)


async def serve_relay(
    listener: anyio.abc.Listener[anyio.abc.SocketStream],
    app: ProxyApp,
    *,
    max_body: int = MAX_BODY,
    max_head: int = MAX_HEAD,
    logger: Logger | None = None,
    timeouts: Timeouts = DEFAULT_TIMEOUTS,
) -> None:
    """Serve ``app`` on every connection ``listener`` accepts, until cancelled."""
    sockets = listening_sockets(listener)
    await Relay(app, sockets, max_body, max_head, logger, timeouts).run()


async def start_relay(
    host: str,
    port: int,
    app: ProxyApp,
    *,
    max_body: int = MAX_BODY,
    max_head: int = MAX_HEAD,
    logger: Logger | None = None,
    timeouts: Timeouts = DEFAULT_TIMEOUTS,
    task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on ``host:port`` (0 picks a free port), report the bound port, relay forever."""
    listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
    async with listener:
        task_status.started(listener.extra(anyio.abc.SocketAttribute.local_port))
        await serve_relay(
            listener, app, max_body=max_body, max_head=max_head, logger=logger, timeouts=timeouts
        )


class _End(enum.Enum):
    """How far a client connection is from its close."""

    OPEN = "open"  # serving requests
    AFTER_ANSWER = "after answer"  # close once the unsent answer is sent
    LINGER_AFTER = "linger after"  # ... then shut down writing and drain for a moment
    LINGERING = "lingering"  # draining, then close
    CLOSED = "closed"


class _Client:
    """One accepted connection."""

    __slots__ = (
        "busy",
        "continued",
        "drained",
        "end",
        "hup",
        "keep_alive",
        "out",
        "parser",
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
        self.end = _End.OPEN
        self.busy = False  # a forwarded request is in flight (or waits for a connection)
        self.readable = True
        # The peer closed its side (or the socket broke): read to the end, even after a
        # short read, since no further edge will come.
        self.hup = False
        self.phase = Phase.IDLE  # what the connection waits for, since when (see _timeouts)
        self.since = now
        self.drained = 0  # bytes dropped while lingering
        self.continued = False
        self.keep_alive = True
        # The upstream head built for this client's last head (see _dispatch), and its port.
        self.upstream_head = b""
        self.upstream_port = 0


class _Upstream:
    """One upstream connection: its socket and the :class:`ClientConnection` it drives."""

    __slots__ = ("client", "conn", "connecting", "out", "port", "request", "sock")

    def __init__(self, sock: socket.socket, port: int, keep_body: int) -> None:
        self.sock = sock
        self.port = port
        self.conn = ClientConnection(keep_body=keep_body)
        self.client: _Client | None = None
        self.request = (b"", b"")  # head and body of the request in flight (for a retry)
        self.out: list[bytes | memoryview] = []  # the unsent rest of it
        self.connecting = True


class Relay:
    """The forwarding core (see the module docstring)."""

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
        self._objects: dict[int, _Client | _Upstream] = {}
        self._idle: list[_Upstream] = []
        self._open = 0  # upstream connections, idle or busy
        self._waiting: deque[tuple[_Client, bytes, bytes]] = deque()  # for a connection
        self._answers = Answers()
        self._deadlines: dict[object, float] = {}  # _Upstream: 504; _Client: linger; fd: accept
        self._max_body = max_body
        self._max_head = max_head
        self._logger = logger
        version = ipaddress.ip_address(app.target_host).version  # an IP literal
        self._family = socket.AF_INET6 if version == 6 else socket.AF_INET
        self._authority = (f"[{app.target_host}]" if version == 6 else app.target_host).encode(
            "ascii"
        )

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

    def _timeout(self) -> float:
        """How long the next wait may last (-1: until an event)."""
        deadlines = self._deadlines
        if deadlines:
            nearest = min(deadlines.values())
            if self._clients:
                nearest = min(nearest, self._next_sweep)
            return max(nearest - time.monotonic(), 0.0)
        if self._clients:
            return max(self._next_sweep - self._now, 0.0)
        return -1.0

    def _loop(self, wake: int) -> None:
        epoll = self._epoll
        try:
            for lfd in self._listeners:
                epoll.register(lfd, _LISTEN)
            epoll.register(wake, select.EPOLLIN)
            while self._turn(epoll.poll(self._timeout()), wake):
                pass
        finally:
            self._close_all()

    def _close_all(self) -> None:
        for obj in list(self._objects.values()):
            obj.sock.close()
        self._objects.clear()
        self._epoll.close()

    def _turn(self, ready: list[tuple[int, int]], wake: int) -> bool:
        """Handle the events of one wake-up; ``False`` when told to stop."""
        objects = self._objects
        self._now = now = time.monotonic()
        if self._deadlines:
            self._expire(now)
        later: list[tuple[_Client, int]] = []
        for efd, events in ready:
            obj = objects.get(efd)
            if type(obj) is _Client:
                later.append((obj, events))  # after the upstream events
            elif type(obj) is _Upstream:
                try:
                    self._conn_event(obj, events)
                except Exception as exc:  # pragma: no cover - a bug must not stop the proxy
                    self._log("http_connection_failed", f"{type(exc).__name__}: {exc}")
                    self._fail(obj, "internal error.")
            elif efd == wake:
                return False
            else:
                listener = self._listeners.get(efd)
                if listener is not None:
                    self._accept(listener)
        for client, events in later:
            try:
                self._client_event(client, events)
            except Exception as exc:  # pragma: no cover - a bug must not stop the proxy
                self._log("http_connection_failed", f"{type(exc).__name__}: {exc}")
                self._close_client(client)
        # After the events: a client whose bytes just came is no longer idle.
        if self._clients and now >= self._next_sweep:
            self._sweep(now)
        return True

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
            if isinstance(key, _Upstream):
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
            if client.end is _End.CLOSED:
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
                sock = accept_one(listener)
            except OSError as exc:
                self._log("http_accept_failed", str(exc), level="warning")
                self._epoll.modify(listener.fileno(), 0)
                self._deadlines[listener.fileno()] = time.monotonic() + ACCEPT_BACKOFF
                return
            if sock is None:
                return
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
        while True:
            end = client.end
            if end is not _End.OPEN:
                if end is _End.LINGERING:
                    self._drain(client)
                return
            if client.busy or client.out:
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
                answer = error_response(500, "Internal server error.")
            if answer is None:  # became ready meanwhile
                port = app.target_port()
                if port is None:
                    answer = unreachable("The target port is not known yet.")
            if answer is not None:
                data, keep_alive = encode_response(request, answer)
                if not keep_alive:
                    client.end = _End.AFTER_ANSWER
                self._send(client, data)
                return
        assert port is not None
        client.busy = True
        prefix = client.upstream_head
        if not prefix or client.upstream_port != port:
            prefix = upstream_head(request, b"%b:%d" % (self._authority, port))
            client.upstream_head = prefix
            client.upstream_port = port
        body = request.body
        head = b"%bContent-Length: %d\r\n\r\n" % (prefix, len(body))
        idle = self._idle
        if idle and not self._waiting and idle[-1].port == port:  # the hot path
            self._start(idle.pop(), client, head, body)
            return
        self._waiting.append((client, head, body))
        self._start_waiting()

    def _answer(self, client: _Client, answer: Response | bytes) -> None:
        """Send the answer to the forwarded request, then go on with the client."""
        client.busy = False
        if client.end is _End.CLOSED:
            return
        if isinstance(answer, Response):
            answer = encode_response(_ANSWER_ONLY if client.keep_alive else _ANSWER_CLOSE, answer)[
                0
            ]
        if not client.keep_alive:
            client.end = _End.AFTER_ANSWER
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
        elif client.end is not _End.OPEN:
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
        if not client.out and client.end is not _End.OPEN:
            self._finish(client)

    def _finish(self, client: _Client) -> None:
        """The last answer was sent: close, gently when the client may still be sending."""
        if client.end is not _End.LINGER_AFTER:
            self._close_client(client)
            return
        try:
            client.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        client.end = _End.LINGERING
        client.readable = True
        self._deadlines[client] = time.monotonic() + LINGER_SECONDS
        self._drain(client)

    def _drain(self, client: _Client) -> None:
        drained = drain(client.sock, client.drained)
        if drained is None:
            self._close_client(client)
        else:
            client.drained = drained

    def _reject(self, client: _Client, status: int, message: str) -> None:
        client.end = _End.LINGER_AFTER
        client.phase = Phase.CLOSING
        client.since = self._now
        self._send(client, error_answer(status, message))

    def _close_client(self, client: _Client) -> None:
        if client.end is not _End.CLOSED:
            client.end = _End.CLOSED
            self._clients -= 1
            self._deadlines.pop(client, None)
            self._objects.pop(client.sock.fileno(), None)
            client.sock.close()

    # -- upstream side -------------------------------------------------------------------

    def _start_waiting(self) -> None:
        """Give waiting clients an idle connection, or a new one while under the limit."""
        waiting = self._waiting
        idle = self._idle
        app = self._app
        while waiting and (idle or self._open < app.pool_size):
            client, head, body = waiting.popleft()
            if client.end is _End.CLOSED:
                continue
            port = app.target_port()
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
            self._start(conn, client, head, body)

    def _start(self, conn: _Upstream, client: _Client, head: bytes, body: bytes) -> None:
        """Send ``head`` and ``body`` for ``client`` on ``conn`` (idle, or connecting)."""
        conn.client = client
        conn.request = (head, body)
        conn.out = list(conn.conn.start(head, body))
        timeout = self._app.upstream_timeout
        if timeout is not None:
            self._deadlines[conn] = time.monotonic() + timeout
        if not conn.connecting:
            self._write(conn)

    def _connect(self, client: _Client, port: int) -> _Upstream | None:
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
        conn = _Upstream(sock, port, self._app.max_response_body)
        self._objects[sock.fileno()] = conn
        self._epoll.register(sock.fileno(), _MASK)
        self._open += 1
        return conn

    def _conn_event(self, conn: _Upstream, events: int) -> None:
        if events == _READABLE and conn.client is not None and not conn.out and not conn.connecting:
            self._read(conn, 0)  # the hot path: an answer arrived
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
        if events & _IN and conn.conn.state is not _CLOSED:
            if conn.client is None:  # idle: the worker closed it (or sent stray bytes)
                self._idle.remove(conn)
                self._close_conn(conn)
            else:
                self._read(conn, events & _HUP)

    def _write(self, conn: _Upstream) -> None:
        out = conn.out
        try:
            sent = conn.sock.send(out[0]) if len(out) == 1 else conn.sock.sendmsg(out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            client = conn.client
            if conn.conn.send_failed() and client is not None:
                # The worker closed the reused connection before the request arrived: once
                # more, on a fresh connection (nothing of it was acted upon).
                conn.client = None
                self._close_conn(conn)
                self._waiting.appendleft((client, *conn.request))
                self._start_waiting()
                return
            self._fail(conn, "The connection broke while sending the request.")
            return
        while sent:
            first = out[0]
            if sent < len(first):
                out[0] = memoryview(first)[sent:]
                return
            sent -= len(first)
            del out[0]
        if not out:
            conn.conn.request_sent()

    def _read(self, conn: _Upstream, ended: int) -> None:
        """Read what the wake-up announced, to the end of the stream when it reports the
        worker's side closed (no further edge will come); else a short read ends it."""
        protocol = conn.conn
        if ended:
            protocol.peer_closing()
        while True:
            try:
                data = conn.sock.recv(_RECV)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._fail(conn, "The connection broke while reading the response.")
                return
            try:
                response = protocol.receive(data)
            except RemoteProtocolError as exc:
                self._fail(conn, str(exc))
                return
            if response is not None:
                client = conn.client
                assert client is not None
                conn.client = None
                if self._deadlines:
                    self._deadlines.pop(conn, None)
                if protocol.reusable:
                    self._idle.append(conn)
                else:
                    self._close_conn(conn)
                if self._waiting:
                    self._start_waiting()
                if response.body_truncated:
                    self._answer(client, TOO_LARGE)
                else:
                    self._answer(client, self._answers.encode(response, client.keep_alive))
                return
            if not data or (len(data) < _RECV and not ended):
                return

    def _fail(self, conn: _Upstream, reason: str, answer: Response | None = None) -> None:
        """Close ``conn``; its client gets 502 (or ``answer``)."""
        client = conn.client
        conn.client = None
        self._close_conn(conn)
        self._start_waiting()
        if client is not None:
            self._answer(client, answer or unreachable(reason))

    def _close_conn(self, conn: _Upstream) -> None:
        if self._objects.pop(conn.sock.fileno(), None) is not None:
            self._open -= 1
            self._deadlines.pop(conn, None)
            conn.conn.close()
            conn.sock.close()
