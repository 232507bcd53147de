"""One HTTP/1.1 client connection as a sans-IO state machine: every client drives this.

Theory of operation
-------------------
A :class:`ClientConnection` never touches a socket. Its driver (the epoll dispatch engine, the
anyio loop :func:`supervisor.http.client.exchange`, the proxy's pool) does the I/O and tells it
what happened; it answers with the bytes to write and with complete responses, and it alone
decides whether the connection may carry another request and whether a failed request may be
sent again. Its states (``State``), in the manner of h11's ``_state.py``::

    IDLE --start()--> SENDING --request_sent()--> AWAITING_RESPONSE
    SENDING / AWAITING_RESPONSE --receive(part of a response)--> RECEIVING_RESPONSE
    SENDING / AWAITING_RESPONSE / RECEIVING_RESPONSE --receive(the rest)--> IDLE or CLOSED
    AWAITING_RESPONSE --receive_repeat(a response known whole)--> IDLE or CLOSED
    any --send_failed() / receive_failed() / close() / a malformed response--> CLOSED

A response ends the exchange in ``IDLE`` (the connection is :attr:`reusable`) only when both
sides are done and nothing speaks against keep-alive: the response allows it, the whole request
was written before the response came, no byte follows the response, and the server did not
close its side (:meth:`peer_closing`). Otherwise it ends in ``CLOSED``: close the socket.

A driver that sees the same server answer byte for byte again and again (a batch worker does)
may skip the parse: when one read, the first of an exchange (state ``AWAITING_RESPONSE``),
completed a response and left the connection ``IDLE``, those bytes were exactly one keep-alive
response; the same bytes read first in a later exchange are that response again, and
:meth:`receive_repeat` ends the exchange with it, by the same rule.

Reuse and retry rule
--------------------
Servers close idle keep-alive connections whenever they like, so a reused connection may be
dead. Before reusing one that sat idle across a wait, the driver looks at its socket
(:meth:`needs_check`, :func:`idle_socket_alive`): a server that closed it (or sent bytes
nobody asked for) while it was idle is news the kernel still holds; such a connection is
dropped and a fresh one opened -- nothing was sent, so nothing is retried. After that, a
request is retried on a fresh connection **once, and only when a reused connection failed
while the request was being written and no byte of a response was read**
(:meth:`send_failed` returns whether): an HTTP/1.1 server does not act on a request it has not
received whole. A failure after the request was written is never retried, because a ``POST``
may already have been processed. Fresh connections are never retried.
"""

from __future__ import annotations

import enum
import socket

from supervisor.http.errors import LocalProtocolError, RemoteProtocolError
from supervisor.http.response import KEEP_BODY, MAX_HEAD, Response, ResponseParser

__all__ = ["JOIN_BODY", "ClientConnection", "State", "idle_socket_alive"]

JOIN_BODY = 16 * 1024
"""Bodies up to this size are joined to their head in one buffer; bigger ones go apart."""


class State(enum.Enum):
    """Where a :class:`ClientConnection` is in its request/response cycle."""

    IDLE = "IDLE"  # may carry a request (fresh, or reused after a clean exchange)
    SENDING = "SENDING"  # a request was handed out; not all of it is written yet
    AWAITING_RESPONSE = "AWAITING_RESPONSE"  # the request is written; no response byte yet
    RECEIVING_RESPONSE = "RECEIVING_RESPONSE"  # part of the response arrived
    CLOSED = "CLOSED"  # must not carry another request: close the socket

    def __repr__(self) -> str:
        return self.value


IDLE = State.IDLE
SENDING = State.SENDING
AWAITING_RESPONSE = State.AWAITING_RESPONSE
RECEIVING_RESPONSE = State.RECEIVING_RESPONSE
CLOSED = State.CLOSED


class ClientConnection:
    """The protocol side of one TCP connection to a server (see the module docstring).

    ``keep_body`` bounds the body bytes kept per response (``None``: all of them).
    """

    __slots__ = ("_head_request", "_must_close", "_parser", "idle_since", "reused", "state")

    def __init__(self, *, keep_body: int | None = KEEP_BODY, max_head: int = MAX_HEAD) -> None:
        self._parser = ResponseParser(keep_body=keep_body, max_head=max_head)
        self.state = IDLE
        self.reused = False  # True once the connection carried a whole exchange
        #: The driver's count of its waits when the connection became idle (-1: unknown);
        #: see :meth:`needs_check`.
        self.idle_since = -1
        self._must_close = False  # this exchange may end, but the connection will not be reused
        self._head_request = False

    def __repr__(self) -> str:
        return f"<ClientConnection {self.state!r} reused={self.reused}>"

    # -- sending --------------------------------------------------------------------------

    def start(self, head: bytes, body: bytes = b"", *, head_request: bool = False) -> list[bytes]:
        """Begin a request whose complete head (ending in the blank line) is ``head``; returns
        what to write, in order: one buffer for a small request, head and body apart for a
        big one (write them with ``sendmsg``, or one after the other)."""
        if self.state is not IDLE:
            raise LocalProtocolError(f"A request cannot start on a connection in {self.state!r}.")
        self.state = SENDING
        self._head_request = head_request
        if not body:
            return [head]
        return [head + body] if len(body) <= JOIN_BODY else [head, body]

    def start_post(self, prefix: bytes, body: bytes) -> list[bytes]:
        """:meth:`start` for a head built once (``post_head_prefix``) plus ``Content-Length``."""
        return self.start(b"%bContent-Length: %d\r\n\r\n" % (prefix, len(body)), body)

    def request_sent(self) -> None:
        """The driver wrote the whole request."""
        if self.state is SENDING:
            self.state = AWAITING_RESPONSE
        elif self.state is not RECEIVING_RESPONSE:  # an early response may already be arriving
            raise LocalProtocolError(f"No request is being sent (the state is {self.state!r}).")

    def may_retry(self, failed_while_writing: bool) -> bool:
        """Whether a request that failed may go again on a fresh connection: only when this
        connection was reused and broke while the request was being written, before any byte
        of a response arrived."""
        return failed_while_writing and self.reused and self.state is SENDING

    def send_failed(self) -> bool:
        """Writing the request failed; the connection is closed. Returns :meth:`may_retry`."""
        retry = self.may_retry(True)
        self.state = CLOSED
        return retry

    # -- receiving ------------------------------------------------------------------------

    def peer_closing(self) -> None:
        """The server closed its side: whatever the response says, do not reuse."""
        self._must_close = True

    def receive(self, data: bytes) -> Response | None:
        """Add bytes read from the socket (``b""``: end of stream); returns the response once
        it is complete, else ``None``. Raises :class:`RemoteProtocolError` (the connection is
        then ``CLOSED``) on a malformed response or an end of stream before its end."""
        state = self.state
        if state is SENDING:
            self._must_close = True  # an answer before the whole request: never reuse
        elif state is IDLE or state is CLOSED:
            raise LocalProtocolError(f"No response is expected in {state!r}.")
        parser = self._parser
        parser.receive_data(data)
        try:
            response = parser.next_response(head_request=self._head_request)
        except RemoteProtocolError:
            self.state = CLOSED
            raise
        if response is None:
            if data:
                self.state = RECEIVING_RESPONSE
            return None
        if (
            response.keep_alive
            and not self._must_close
            and state is not SENDING
            and not parser.unprocessed
        ):
            self.state = IDLE
            self.reused = True
        else:
            self.state = CLOSED
        return response

    def receive_repeat(self, response: Response) -> Response:
        """The first read of this exchange equals, byte for byte, a read that was the first of
        an earlier exchange (same ``keep_body``, not HEAD) and completed ``response`` leaving
        that connection ``IDLE``: end the exchange with ``response`` again, without a parse,
        as :meth:`receive` would (the connection stays reusable unless the server closed its
        side meanwhile)."""
        if self.state is not AWAITING_RESPONSE or self._head_request:
            raise LocalProtocolError(f"No repeated response is expected in {self.state!r}.")
        if response.keep_alive and not self._must_close:
            self.state = IDLE
            self.reused = True
        else:
            self.state = CLOSED
        return response

    def receive_failed(self) -> None:
        """Reading broke (reset, timeout, cancellation): the connection is closed."""
        self.state = CLOSED

    def close(self) -> None:
        """The driver closes the connection (idle check failed, shutdown)."""
        self.state = CLOSED

    # -- questions ------------------------------------------------------------------------

    @property
    def reusable(self) -> bool:
        """Whether the connection may carry another request (both sides done, keep-alive,
        no stray bytes, the server did not close)."""
        return self.state is IDLE

    def needs_check(self, now: int) -> bool:
        """Whether the socket must be looked at (:func:`idle_socket_alive`) before this idle
        connection carries a request: it carried one before and sat idle across a wait of the
        driver (``now`` is the driver's count of waits; :attr:`idle_since` is that count when
        the connection became idle, -1 when unknown)."""
        return self.reused and self.idle_since != now

    def partial_response(self) -> Response | None:
        """The response whose head arrived, with the body so far (``keep_alive`` false), or
        ``None`` before a head; for callers that decide on the status alone (probes)."""
        return self._parser.partial_response()

    @property
    def body_received(self) -> int:
        """Body bytes of the current response received so far."""
        return self._parser.body_received


def idle_socket_alive(sock: socket.socket) -> bool:
    """Whether an idle keep-alive connection's non-blocking socket is still open and silent
    (the server neither closed it nor sent bytes nobody asked for)."""
    try:
        sock.recv(1, socket.MSG_PEEK)
    except (BlockingIOError, InterruptedError):
        return True
    except OSError:
        return False
    return False  # end of stream, or bytes nobody asked for
