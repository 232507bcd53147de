"""The relay's client side: accept, read and parse requests, route them, send the answers.

See :mod:`supervisor.http.relay` for the loop both sides run in. A routed request leaves this
side through :attr:`ClientSide.forward` (the upstream side's) and its answer comes back
through :meth:`ClientSide.answer`.
"""

from __future__ import annotations

import enum
import functools
import select
import socket
import time
from collections.abc import Callable

import anyio

from supervisor.http._forward import unreachable, upstream_head
from supervisor.http._timeouts import Phase, Timeouts, Verdict, overdue
from supervisor.http.errors import RemoteProtocolError
from supervisor.http.proxy import ProxyApp
from supervisor.http.request import RequestParser
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
)
from supervisor.logs import Logger

__all__ = [
    "HUP",
    "IN",
    "LISTEN",
    "MASK",
    "OUT",
    "READABLE",
    "RECV",
    "Client",
    "ClientSide",
    "End",
    "Forward",
    "log",
]

RECV = 65536
IN = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
OUT = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR
MASK = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET
LISTEN = select.EPOLLIN
READABLE = select.EPOLLIN | select.EPOLLOUT  # as reported for a socket with news to read
HUP = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR  # the peer closed (or broke)
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_ACCEPT_BATCH = 64
_ANSWER_ONLY = Request("POST", "/", [])  # encodes internal answers (keep-alive, not HEAD)
_ANSWER_CLOSE = Request("POST", "/", [], keep_alive=False)


def log(logger: Logger | None, event: str, error: str, *, level: str = "error") -> None:
    """Log from the relay's thread: the logger belongs to the event loop's."""
    if logger is not None:
        write = logger.error if level == "error" else logger.warning
        anyio.from_thread.run_sync(functools.partial(write, event, error=error))


class End(enum.Enum):
    """How far a client connection is from its close."""

    OPEN = "open"  # serving requests
    AFTER_ANSWER = "after answer"  # close once the unsent answer is sent
    LINGER_AFTER = "linger after"  # ... then shut down writing and drain for a moment
    LINGERING = "lingering"  # draining, then close
    CLOSED = "closed"


class Client:
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
        self.end = End.OPEN
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
        # The upstream head built for this client's last head (see dispatch), and its port.
        self.upstream_head = b""
        self.upstream_port = 0


Forward = Callable[[Client, int, bytes, bytes], None]
"""Hands a request (its client, the port, the whole upstream head and the body) upstream."""


def _not_wired(client: Client, port: int, head: bytes, body: bytes) -> None:
    raise RuntimeError("The relay's client side was not given its upstream side.")


class ClientSide:
    """The client connections of one relay (see the module docstring).

    ``objects`` (fd -> connection), ``deadlines`` and ``epoll`` are the relay's, shared with
    the upstream side; :attr:`now` is the clock at the loop's last wake-up, set by the loop.
    """

    def __init__(
        self,
        app: ProxyApp,
        epoll: select.epoll,
        objects: dict[int, object],
        deadlines: dict[object, float],
        *,
        max_body: int,
        max_head: int,
        logger: Logger | None,
        timeouts: Timeouts,
        authority: bytes,
    ) -> None:
        self.app = app
        self.epoll = epoll
        self.objects = objects
        self.deadlines = deadlines
        self.max_body = max_body
        self.max_head = max_head
        self.logger = logger
        self.timeouts = timeouts
        self.authority = authority
        self.count = 0  # open client connections
        self.now = time.monotonic()
        self.next_sweep = self.now
        self.forward: Forward = _not_wired

    # -- accepting and timers ------------------------------------------------------------

    def accept(self, listener: socket.socket) -> None:
        for _ in range(_ACCEPT_BATCH):
            try:
                sock = accept_one(listener)
            except OSError as exc:
                log(self.logger, "http_accept_failed", str(exc), level="warning")
                self.epoll.modify(listener.fileno(), 0)
                self.deadlines[listener.fileno()] = time.monotonic() + ACCEPT_BACKOFF
                return
            if sock is None:
                return
            parser = RequestParser(max_head=self.max_head, max_body=self.max_body)
            client = Client(sock, parser, self.now)
            self.objects[sock.fileno()] = client
            self.count += 1
            self.epoll.register(sock.fileno(), MASK)

    def sweep(self, now: float) -> None:
        """Answer 408 to, or close, the client connections that waited too long."""
        timeouts = self.timeouts
        self.next_sweep = now + timeouts.sweep
        clients = [
            (obj, obj.phase, obj.since) for obj in self.objects.values() if type(obj) is Client
        ]
        for client, action in overdue(clients, now, timeouts):
            if client.end is End.CLOSED:
                continue
            if action is Verdict.TIMED_OUT:
                self.reject(
                    client, 408, f"The request did not arrive within {timeouts.read:g} seconds."
                )
            else:
                self.close(client)

    # -- requests ------------------------------------------------------------------------

    def event(self, client: Client, events: int) -> None:
        if events & OUT and client.out:
            self.flush(client)
        if events & IN:
            client.readable = True
            if events & HUP:
                client.hup = True
        self.pump(client)

    def pump(self, client: Client) -> None:
        """Answer or forward what the client sent, reading while it may send more."""
        parser = client.parser
        while True:
            end = client.end
            if end is not End.OPEN:
                if end is End.LINGERING:
                    self.drain(client)
                return
            if client.busy or client.out:
                return
            try:
                request = parser.next_request()
            except RemoteProtocolError as exc:
                self.reject(client, exc.error_status_hint, f"Invalid HTTP request: {exc}")
                return
            if request is not None:
                self.dispatch(client, request)
                continue
            if parser.at_eof:
                self.close(client)
                return
            if parser.expects_continue and not client.continued:
                client.continued = True
                self.send(client, _CONTINUE)
                continue
            if not client.readable:
                self.waiting_for(client)
                return
            try:
                data = client.sock.recv(RECV)
            except (BlockingIOError, InterruptedError):
                client.readable = False
                self.waiting_for(client)
                return
            except OSError:
                self.close(client)
                return
            if len(data) < RECV and not client.hup:
                client.readable = False
            parser.receive_data(data)

    def waiting_for(self, client: Client) -> None:
        """The client is left waiting for bytes: stamp the phase it is in, when it changed."""
        phase = client.parser.phase
        if phase is not client.phase:
            client.phase = phase
            client.since = self.now

    def dispatch(self, client: Client, request: Request) -> None:
        if not client.parser.reused_head:
            # Only a head equal to the last one (Content-Length aside) may reuse its build.
            client.upstream_head = b""
        client.continued = False
        client.keep_alive = request.keep_alive
        client.phase = Phase.BUSY
        app = self.app
        port = app.forward_port(request)
        if port is None:  # answered here (the pod's status by the event loop's thread)
            try:
                if app.needs_event_loop(request):
                    answer = anyio.from_thread.run_sync(app.route, request)
                else:
                    answer = app.route(request)
            except Exception as exc:
                log(self.logger, "http_handler_failed", f"{type(exc).__name__}: {exc}")
                answer = error_response(500, "Internal server error.")
            if answer is None:  # became ready meanwhile
                port = app.target_port()
                if port is None:
                    answer = unreachable("The target port is not known yet.")
            if answer is not None:
                data, keep_alive = encode_response(request, answer)
                if not keep_alive:
                    client.end = End.AFTER_ANSWER
                self.send(client, data)
                return
        assert port is not None
        client.busy = True
        prefix = client.upstream_head
        if not prefix or client.upstream_port != port:
            prefix = upstream_head(request, b"%b:%d" % (self.authority, port))
            client.upstream_head = prefix
            client.upstream_port = port
        body = request.body
        self.forward(client, port, b"%bContent-Length: %d\r\n\r\n" % (prefix, len(body)), body)

    # -- answers -------------------------------------------------------------------------

    def answer(self, client: Client, answer: Response | bytes) -> None:
        """Send the answer to the forwarded request, then go on with the client."""
        client.busy = False
        if client.end is End.CLOSED:
            return
        if isinstance(answer, Response):
            answer = encode_response(_ANSWER_ONLY if client.keep_alive else _ANSWER_CLOSE, answer)[
                0
            ]
        if not client.keep_alive:
            client.end = End.AFTER_ANSWER
        self.send(client, answer)
        self.pump(client)

    def send(self, client: Client, data: bytes) -> None:
        if client.out:
            client.out += data
            return
        try:
            sent = client.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.close(client)
            return
        if sent < len(data):
            client.out = data[sent:]
        elif client.end is not End.OPEN:
            self.finish(client)

    def flush(self, client: Client) -> None:
        data = client.out
        try:
            sent = client.sock.send(data)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close(client)
            return
        client.out = data[sent:]
        if not client.out and client.end is not End.OPEN:
            self.finish(client)

    def finish(self, client: Client) -> None:
        """The last answer was sent: close, gently when the client may still be sending."""
        if client.end is not End.LINGER_AFTER:
            self.close(client)
            return
        try:
            client.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        client.end = End.LINGERING
        client.readable = True
        self.deadlines[client] = time.monotonic() + LINGER_SECONDS
        self.drain(client)

    def drain(self, client: Client) -> None:
        drained = drain(client.sock, client.drained)
        if drained is None:
            self.close(client)
        else:
            client.drained = drained

    def reject(self, client: Client, status: int, message: str) -> None:
        client.end = End.LINGER_AFTER
        client.phase = Phase.CLOSING
        client.since = self.now
        self.send(client, error_answer(status, message))

    def close(self, client: Client) -> None:
        if client.end is not End.CLOSED:
            client.end = End.CLOSED
            self.count -= 1
            self.deadlines.pop(client, None)
            self.objects.pop(client.sock.fileno(), None)
            client.sock.close()
