"""The proxy's fast header rewriters put on the wire what the plain rule says.

The relay builds the upstream head and the client's answer with the rewriters of
``supervisor.http._forward``, which reuse their last result. The reference here is the rule
written plainly: drop the hop-by-hop headers (``end_to_end``), add ``Host`` first when missing
and ``Content-Length`` last, and encode the answer with the server's ``encode_response``.
Hypothesis feeds both any request our parser accepts (the strategies of the parsers'
differential tests against h11) and any response it reads; the bytes must be equal.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from supervisor.http._forward import HOP_BY_HOP, Answers, upstream_head
from supervisor.http.request import RequestParser
from supervisor.http.response import ResponseParser
from supervisor.http.server import Request, Response, encode_response
from tests.test_http_request import SETTINGS, Case, requests
from tests.test_http_response import Case as ResponseCase
from tests.test_http_response import responses

PORT = 8080
AUTHORITY = b"127.0.0.1:%d" % PORT
CONTENT_LENGTH = (b"content-length",)


def end_to_end(
    headers: list[tuple[bytes, bytes]], *, drop: tuple[bytes, ...] = ()
) -> list[tuple[bytes, bytes]]:
    """``headers`` without hop-by-hop ones (including those named in ``Connection``)."""
    named = set()
    for name, value in headers:
        if name.lower() == b"connection":
            named.update(token.strip().lower() for token in value.split(b","))
    return [
        (name, value)
        for name, value in headers
        if (lower := name.lower()) not in HOP_BY_HOP
        and lower not in named
        and not lower.startswith(b"proxy-")
        and lower not in drop
    ]


def reference_upstream(request: Request) -> bytes:
    """The reference: what goes upstream for ``request`` (head and body)."""
    headers = end_to_end(request.headers, drop=CONTENT_LENGTH)
    lines = [b"POST " + request.target.encode("ascii") + b" HTTP/1.1\r\n"]
    if not any(name.lower() == b"host" for name, _ in headers):
        lines.append(b"Host: " + AUTHORITY + b"\r\n")
    lines += [name + b": " + value + b"\r\n" for name, value in headers]
    lines.append(b"Content-Length: %d\r\n\r\n" % len(request.body))
    return b"".join(lines) + request.body


def relay_upstream(request: Request) -> bytes:
    head = upstream_head(request, AUTHORITY)
    return b"%bContent-Length: %d\r\n\r\n%b" % (head, len(request.body), request.body)


@SETTINGS
@given(case=requests())
def test_the_relay_forwards_a_request_as_the_rule_says(case: Case) -> None:
    parser = RequestParser()
    parser.receive_data(case.wire)
    request = parser.next_request()
    assert request is not None
    assert relay_upstream(request) == reference_upstream(request)


@SETTINGS
@given(
    case=responses().filter(lambda case: not case.head_request),
    keep_alive=st.booleans(),
    again=st.booleans(),
)
def test_the_relay_answers_as_the_rule_says(
    case: ResponseCase, keep_alive: bool, again: bool
) -> None:
    parser = ResponseParser(keep_body=None)
    parser.receive_data(case.wire)
    parser.receive_data(b"")
    upstream = parser.next_response()
    assert upstream is not None
    client = Request("POST", "/", [], keep_alive=keep_alive)
    reference = Response(
        upstream.status,
        end_to_end(upstream.headers, drop=CONTENT_LENGTH),
        upstream.body_head,
        upstream.reason,
    )
    answers = Answers()
    if again:  # the remembered head must give the same bytes as a fresh one
        answers.encode(upstream, keep_alive)
    assert answers.encode(upstream, keep_alive) == encode_response(client, reference)[0]


@pytest.mark.parametrize(
    "headers",
    [
        [(b"Connection", b"x-hop, close"), (b"X-Hop", b"1"), (b"X-Keep", b"2")],
        [(b"Keep-Alive", b"timeout=5"), (b"Proxy-Authorization", b"z"), (b"TE", b"trailers")],
        [(b"Upgrade", b"h2c"), (b"Trailer", b"X"), (b"Expect", b"100-continue")],
    ],
)
def test_hop_by_hop_headers_are_dropped(headers: list[tuple[bytes, bytes]]) -> None:
    request = Request("POST", "/", [(b"Host", b"h"), *headers], b"[]")
    forwarded = relay_upstream(request)
    assert forwarded == reference_upstream(request)
    names = [line.split(b":")[0].lower() for line in forwarded.split(b"\r\n")[1:] if b":" in line]
    kept = [b"x-keep"] if (b"X-Keep", b"2") in headers else []
    assert names == [b"host", *kept, b"content-length"]


@pytest.mark.parametrize("keep_alive", [True, False])
def test_hop_by_hop_headers_of_an_answer_are_dropped(keep_alive: bool) -> None:
    parser = ResponseParser(keep_body=None)
    parser.receive_data(
        b"HTTP/1.1 200 OK\r\nConnection: x-hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\n"
        b"Proxy-Authenticate: z\r\nTrailer: X\r\nUpgrade: h2c\r\nX-Keep: 2\r\n"
        b"Content-Length: 2\r\n\r\nok"
    )
    upstream = parser.next_response()
    assert upstream is not None
    reference = Response(
        upstream.status, end_to_end(upstream.headers, drop=CONTENT_LENGTH), b"ok", upstream.reason
    )
    answer = Answers().encode(upstream, keep_alive)
    client = Request("POST", "/", [], keep_alive=keep_alive)
    assert answer == encode_response(client, reference)[0]
    names = [line.split(b":")[0].lower() for line in answer.split(b"\r\n")[1:] if b":" in line]
    framing = [b"content-length"] if keep_alive else [b"content-length", b"connection"]
    assert names == [b"x-keep", *framing]
