"""The relay's upstream side: a pool of connections to the worker, one sans-IO
:class:`~supervisor.http.connection.ClientConnection` per socket.

See :mod:`supervisor.http.relay` for the loop both sides run in. Requests come in through
:meth:`UpstreamSide.forward`; answers, re-framed for the client, go out through
:attr:`UpstreamSide.answer` (the client side's).

Repeated answers: a batch worker answers the same bytes again and again. When one read, the
first of an exchange, completes an answer that leaves the connection reusable, the relay keeps
those bytes, their response and the bytes it built for a keep-alive client; the same bytes read
first in a later exchange for a keep-alive client are relayed with what was built, without a
parse, and :meth:`~supervisor.http.connection.ClientConnection.receive_repeat` still decides
whether the connection is reused. Anything else (another answer, a ``Date`` that ticked, an
answer in pieces, a client asking to close) takes the parse.
"""

from __future__ import annotations

import errno
import select
import socket
import time
from collections import deque
from collections.abc import Callable

from supervisor.http._forward import TIMED_OUT, TOO_LARGE, Answers, unreachable
from supervisor.http._relay_client import HUP, IN, MASK, OUT, READABLE, RECV, Client, End
from supervisor.http.connection import ClientConnection, State
from supervisor.http.errors import RemoteProtocolError
from supervisor.http.proxy import ProxyApp
from supervisor.http.response import Response as Parsed
from supervisor.http.server import Response

__all__ = ["Answer", "Upstream", "UpstreamSide"]

_AWAITING = State.AWAITING_RESPONSE
_CLOSED = State.CLOSED

Answer = Callable[[Client, Response | bytes], None]
"""Gives a client the answer to its forwarded request (an answer given here, or bytes)."""


class Upstream:
    """One upstream connection: its socket and the :class:`ClientConnection` it drives."""

    __slots__ = ("client", "conn", "connecting", "out", "port", "request", "sock")

    def __init__(self, sock: socket.socket, port: int, keep_body: int) -> None:
        self.sock = sock
        self.port = port
        self.conn = ClientConnection(keep_body=keep_body)
        self.client: Client | None = None
        self.request = (b"", b"")  # head and body of the request in flight (for a retry)
        self.out: list[bytes | memoryview] = []  # the unsent rest of it
        self.connecting = True


def _not_wired(client: Client, answer: Response | bytes) -> None:
    raise RuntimeError("The relay's upstream side was not given its client side.")


class UpstreamSide:
    """The upstream connections of one relay (see the module docstring).

    ``objects``, ``deadlines`` and ``epoll`` are the relay's, shared with the client side.
    """

    def __init__(
        self,
        app: ProxyApp,
        epoll: select.epoll,
        objects: dict[int, object],
        deadlines: dict[object, float],
        family: socket.AddressFamily,
    ) -> None:
        self.app = app
        self.epoll = epoll
        self.objects = objects
        self.deadlines = deadlines
        self.family = family
        self.idle: list[Upstream] = []
        self.open = 0  # upstream connections, idle or busy
        self.waiting: deque[tuple[Client, bytes, bytes]] = deque()  # for a connection
        self.answers = Answers()
        # The last answer read whole in the first read of an exchange, leaving its connection
        # reusable: those bytes, their response, and what they became for a keep-alive client.
        self.repeat_in: bytes | None = None
        self.repeat_response: Parsed | None = None
        self.repeat_out = b""
        self.answer: Answer = _not_wired

    def forward(self, client: Client, port: int, head: bytes, body: bytes) -> None:
        """Send a request for ``client`` to ``port``: on an idle connection, or when one is
        free (see :meth:`start_waiting`)."""
        idle = self.idle
        if idle and not self.waiting and idle[-1].port == port:  # the hot path
            self.start(idle.pop(), client, head, body)
            return
        self.waiting.append((client, head, body))
        self.start_waiting()

    def start_waiting(self) -> None:
        """Give waiting clients an idle connection, or a new one while under the limit."""
        waiting = self.waiting
        idle = self.idle
        app = self.app
        while waiting and (idle or self.open < app.pool_size):
            client, head, body = waiting.popleft()
            if client.end is End.CLOSED:
                continue
            port = app.target_port()
            conn = None
            while idle:
                candidate = idle.pop()
                if candidate.port == port:
                    conn = candidate
                    break
                self.close(candidate)
            if port is None:
                self.answer(client, unreachable("The target port is not known yet."))
                continue
            if conn is None:
                conn = self.connect(client, port)
                if conn is None:
                    continue
            self.start(conn, client, head, body)

    def start(self, conn: Upstream, client: Client, head: bytes, body: bytes) -> None:
        """Send ``head`` and ``body`` for ``client`` on ``conn`` (idle, or connecting)."""
        conn.client = client
        conn.request = (head, body)
        conn.out = conn.conn.start(head, body)  # type: ignore[assignment]  # a fresh list
        timeout = self.app.upstream_timeout
        if timeout is not None:
            self.deadlines[conn] = time.monotonic() + timeout
        if not conn.connecting:
            self.write(conn)

    def connect(self, client: Client, port: int) -> Upstream | None:
        sock = socket.socket(self.family, socket.SOCK_STREAM)
        sock.setblocking(False)
        code = sock.connect_ex((self.app.target_host, port))
        if code not in (0, errno.EINPROGRESS, errno.EAGAIN):
            sock.close()
            reason = errno.errorcode.get(code, str(code))
            self.answer(
                client,
                unreachable(f"Could not connect to {self.app.target_host}:{port}: {reason}."),
            )
            return None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = Upstream(sock, port, self.app.max_response_body)
        self.objects[sock.fileno()] = conn
        self.epoll.register(sock.fileno(), MASK)
        self.open += 1
        return conn

    def event(self, conn: Upstream, events: int) -> None:
        if events == READABLE and conn.client is not None and not conn.out and not conn.connecting:
            self.read(conn, 0)  # the hot path: an answer arrived
            return
        if conn.connecting:
            if not events & OUT:
                return
            code = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                reason = errno.errorcode.get(code, str(code))
                self.fail(
                    conn, f"Could not connect to {self.app.target_host}:{conn.port}: {reason}."
                )
                return
            conn.connecting = False
            if conn.out:
                self.write(conn)
        elif events & OUT and conn.out:
            self.write(conn)
        if events & IN and conn.conn.state is not _CLOSED:
            if conn.client is None:  # idle: the worker closed it (or sent stray bytes)
                self.idle.remove(conn)
                self.close(conn)
            else:
                self.read(conn, events & HUP)

    def write(self, conn: Upstream) -> None:
        out = conn.out
        try:
            if len(out) == 1:  # the usual case: one buffer, written whole
                first = out[0]
                sent = conn.sock.send(first)
                if sent == len(first):
                    out.clear()
                    conn.conn.request_sent()
                    return
            else:
                sent = conn.sock.sendmsg(out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            client = conn.client
            if conn.conn.send_failed() and client is not None:
                # The worker closed the reused connection before the request arrived: once
                # more, on a fresh connection (nothing of it was acted upon).
                conn.client = None
                self.close(conn)
                self.waiting.appendleft((client, *conn.request))
                self.start_waiting()
                return
            self.fail(conn, "The connection broke while sending the request.")
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

    def read(self, conn: Upstream, ended: int) -> None:
        """Read what the wake-up announced, to the end of the stream when it reports the
        worker's side closed (no further edge will come); else a short read ends it."""
        protocol = conn.conn
        if ended:
            protocol.peer_closing()
        fresh = protocol.state is _AWAITING  # the next read is the first of the answer
        while True:
            try:
                data = conn.sock.recv(RECV)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.fail(conn, "The connection broke while reading the response.")
                return
            client = conn.client
            assert client is not None
            if fresh and data == self.repeat_in and client.keep_alive:
                assert self.repeat_response is not None
                protocol.receive_repeat(self.repeat_response)  # the worker's usual answer
                self.done(conn, client, self.repeat_out)
                return
            try:
                response = protocol.receive(data)
            except RemoteProtocolError as exc:
                self.fail(conn, str(exc))
                return
            if response is not None:
                if response.body_truncated:
                    self.done(conn, client, TOO_LARGE)
                    return
                answer = self.answers.encode(response, client.keep_alive)
                if fresh and client.keep_alive and protocol.reusable:
                    self.repeat_in = data
                    self.repeat_response = response
                    self.repeat_out = answer
                self.done(conn, client, answer)
                return
            if not data or (len(data) < RECV and not ended):
                return
            fresh = False

    def done(self, conn: Upstream, client: Client, answer: Response | bytes) -> None:
        """The exchange on ``conn`` ended: keep the connection when it may be reused (the
        :class:`ClientConnection` decided), then answer the client."""
        conn.client = None
        if self.deadlines:
            self.deadlines.pop(conn, None)
        if conn.conn.state is State.IDLE:
            self.idle.append(conn)
        else:
            self.close(conn)
        if self.waiting:
            self.start_waiting()
        self.answer(client, answer)

    def time_out(self, conn: Upstream) -> None:
        """``conn``'s deadline passed: its client (if any) gets 504."""
        if conn.client is not None:
            self.fail(conn, "", TIMED_OUT)

    def fail(self, conn: Upstream, reason: str, answer: Response | None = None) -> None:
        """Close ``conn``; its client gets 502 (or ``answer``)."""
        client = conn.client
        conn.client = None
        self.close(conn)
        self.start_waiting()
        if client is not None:
            self.answer(client, answer or unreachable(reason))

    def close(self, conn: Upstream) -> None:
        if self.objects.pop(conn.sock.fileno(), None) is not None:
            self.open -= 1
            self.deadlines.pop(conn, None)
            conn.conn.close()
            conn.sock.close()
