"""ClientConnection as a table of events, no sockets: each row is a history of what the driver
saw, with the states it must pass through and what it decides (reuse, retry)."""

from __future__ import annotations

import socket

import pytest

from supervisor.http.connection import JOIN_BODY, ClientConnection, State, idle_socket_alive
from supervisor.http.errors import LocalProtocolError, RemoteProtocolError

IDLE, SENDING, AWAITING, RECEIVING, CLOSED = (
    State.IDLE,
    State.SENDING,
    State.AWAITING_RESPONSE,
    State.RECEIVING_RESPONSE,
    State.CLOSED,
)
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
HEAD = b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\n"

# Events: ("start",), ("sent",), ("recv", bytes), ("closing",), ("send_failed", retry expected),
# ("receive_failed",), ("repeat",): the read equals the OK of an earlier exchange.  Each row: events, the state after each, and `reusable` at the end.
Row = tuple[list[tuple[object, ...]], list[State], bool]

TABLE: dict[str, Row] = {
    "keep-alive answer": (
        [("start",), ("sent",), ("recv", OK)],
        [SENDING, AWAITING, IDLE],
        True,
    ),
    "answer in pieces": (
        [("start",), ("sent",), ("recv", OK[:5]), ("recv", OK[5:])],
        [SENDING, AWAITING, RECEIVING, IDLE],
        True,
    ),
    "interim then final": (
        [("start",), ("sent",), ("recv", b"HTTP/1.1 100 Continue\r\n\r\n"), ("recv", OK)],
        [SENDING, AWAITING, RECEIVING, IDLE],
        True,
    ),
    "Connection: close": (
        [("start",), ("sent",), ("recv", b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")],
        [SENDING, AWAITING, RECEIVING],
        False,
    ),
    "close-delimited body ends at EOF": (
        [("start",), ("sent",), ("recv", b"HTTP/1.0 200 OK\r\n\r\nhi"), ("recv", b"")],
        [SENDING, AWAITING, RECEIVING, CLOSED],
        False,
    ),
    "stray bytes after the answer": (
        [("start",), ("sent",), ("recv", OK + b"HTTP/1.1 200")],
        [SENDING, AWAITING, CLOSED],
        False,
    ),
    "server closed its side with the answer": (
        [("start",), ("sent",), ("closing",), ("recv", OK)],
        [SENDING, AWAITING, AWAITING, CLOSED],
        False,
    ),
    "answer before the whole request was written": (
        [("start",), ("recv", OK), ("sent",)],
        [SENDING, CLOSED, CLOSED],
        False,
    ),
    "fresh connection fails while writing: no retry": (
        [("start",), ("send_failed", False)],
        [SENDING, CLOSED],
        False,
    ),
    "reused connection fails while writing: retry once": (
        [("start",), ("sent",), ("recv", OK), ("start",), ("send_failed", True)],
        [SENDING, AWAITING, IDLE, SENDING, CLOSED],
        False,
    ),
    "reused connection fails after writing: never retried": (
        [("start",), ("sent",), ("recv", OK), ("start",), ("sent",), ("receive_failed",)],
        [SENDING, AWAITING, IDLE, SENDING, AWAITING, CLOSED],
        False,
    ),
    "a repeated answer ends the exchange as its parse did": (
        [("start",), ("sent",), ("recv", OK), ("start",), ("sent",), ("repeat",)],
        [SENDING, AWAITING, IDLE, SENDING, AWAITING, IDLE],
        True,
    ),
    "a repeated answer after the server closed its side: not reused": (
        [("start",), ("sent",), ("recv", OK), ("start",), ("sent",), ("closing",), ("repeat",)],
        [SENDING, AWAITING, IDLE, SENDING, AWAITING, AWAITING, CLOSED],
        False,
    ),
}

REPEATED = ClientConnection()
REPEATED.start(HEAD, b"[]")
REPEATED.request_sent()
OK_RESPONSE = REPEATED.receive(OK)


def run(conn: ClientConnection, events: list[tuple[object, ...]]) -> list[State]:
    states = []
    for event in events:
        kind = event[0]
        if kind == "start":
            assert conn.start(HEAD, b"[]") == [HEAD + b"[]"]
        elif kind == "sent":
            if conn.state is not CLOSED:
                conn.request_sent()
        elif kind == "recv":
            data = event[1]
            assert isinstance(data, bytes)
            conn.receive(data)
        elif kind == "closing":
            conn.peer_closing()
        elif kind == "send_failed":
            assert conn.send_failed() is event[1]
        elif kind == "receive_failed":
            conn.receive_failed()
        elif kind == "repeat":
            assert OK_RESPONSE is not None
            assert conn.receive_repeat(OK_RESPONSE) is OK_RESPONSE
        states.append(conn.state)
    return states


@pytest.mark.parametrize("name", list(TABLE))
def test_table(name: str) -> None:
    events, expected, reusable = TABLE[name]
    conn = ClientConnection()
    assert run(conn, events) == expected
    assert conn.reusable is reusable


def test_may_retry_only_a_reused_connection_while_writing() -> None:
    conn = ClientConnection()
    conn.start(HEAD, b"[]")
    assert not conn.may_retry(True)  # fresh
    conn.request_sent()
    conn.receive(OK)
    conn.start(HEAD, b"[]")
    assert conn.may_retry(True)
    assert not conn.may_retry(False)
    conn.request_sent()
    assert not conn.may_retry(True)  # written: the server may have acted on it


def test_needs_check_after_a_wait() -> None:
    conn = ClientConnection()
    assert not conn.needs_check(5)  # fresh: nothing to check
    conn.start(HEAD, b"[]")
    conn.request_sent()
    conn.receive(OK)
    conn.idle_since = 5
    assert not conn.needs_check(5)  # became idle in this very wake-up
    assert conn.needs_check(6)
    conn.idle_since = -1
    assert conn.needs_check(5)


def test_malformed_answer_closes() -> None:
    conn = ClientConnection()
    conn.start(HEAD, b"[]")
    conn.request_sent()
    with pytest.raises(RemoteProtocolError, match="status line"):
        conn.receive(b"SSH-2.0-OpenSSH\r\n\r\n")
    assert conn.state is CLOSED
    with pytest.raises(LocalProtocolError):
        conn.start(HEAD, b"[]")


def test_eof_without_answer() -> None:
    conn = ClientConnection()
    conn.start(HEAD, b"[]")
    conn.request_sent()
    with pytest.raises(RemoteProtocolError, match="without sending a response"):
        conn.receive(b"")
    assert conn.state is CLOSED


def test_misuse() -> None:
    conn = ClientConnection()
    with pytest.raises(LocalProtocolError):
        conn.receive(OK)  # nothing was asked
    with pytest.raises(LocalProtocolError):
        conn.request_sent()
    conn.start(HEAD, b"[]")
    with pytest.raises(LocalProtocolError):
        conn.start(HEAD, b"[]")  # one request at a time
    assert OK_RESPONSE is not None
    with pytest.raises(LocalProtocolError):
        conn.receive_repeat(OK_RESPONSE)  # not all of the request was written
    conn.request_sent()
    conn.receive(OK[:5])
    with pytest.raises(LocalProtocolError):
        conn.receive_repeat(OK_RESPONSE)  # part of another answer came first
    head = ClientConnection()
    head.start(b"HEAD / HTTP/1.1\r\n\r\n", head_request=True)
    head.request_sent()
    with pytest.raises(LocalProtocolError):
        head.receive_repeat(OK_RESPONSE)  # the same bytes frame a HEAD answer otherwise


def test_big_bodies_go_apart_and_head_requests_have_no_body() -> None:
    body = b"x" * (JOIN_BODY + 1)
    conn = ClientConnection()
    assert conn.start_post(b"POST / HTTP/1.1\r\n", body) == [
        b"POST / HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body),
        body,
    ]
    conn = ClientConnection()
    conn.start(b"HEAD / HTTP/1.1\r\n\r\n", head_request=True)
    conn.request_sent()
    response = conn.receive(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n")
    assert response is not None and response.body_length == 0
    assert conn.reusable


def test_partial_response_for_status_only_callers() -> None:
    conn = ClientConnection(keep_body=4)
    conn.start(b"GET / HTTP/1.1\r\n\r\n")
    conn.request_sent()
    assert conn.receive(b"HTTP/1.1 503 No\r\nContent-Length: 100\r\n\r\nbusy!") is None
    partial = conn.partial_response()
    assert partial is not None
    assert (partial.status, partial.body_head, conn.body_received) == (503, b"busy", 5)


def test_idle_socket_alive() -> None:
    a, b = socket.socketpair()
    with a, b:
        a.setblocking(False)
        assert idle_socket_alive(a)
        b.sendall(b"x")  # bytes nobody asked for
        assert not idle_socket_alive(a)
        a.recv(1)
        b.close()  # the peer closed it
        assert not idle_socket_alive(a)
