"""Differential tests: ``RequestParser`` must read requests exactly as an h11 server reads them.

Hypothesis builds requests (methods, targets, HTTP/1.0 and 1.1, header sets with odd spacing
and case, Content-Length / chunked / no body, trailers, folded lines, LF-only heads,
``Connection: close``); pipelines of them are fed whole, one byte at a time and in random
splits to our parser, and each request alone to a fresh h11 server connection: method,
target, version, headers (raw names, h11's values), body and keep-alive must agree. Mutated
requests must be accepted or refused exactly as h11 does, and garbage may only ever raise
``RemoteProtocolError``.
"""

from __future__ import annotations

from dataclasses import dataclass

import h11
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from supervisor.http.errors import RemoteProtocolError
from supervisor.http.request import Request, RequestParser
from tests.helpers import mutate

SETTINGS = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])

TCHAR = "!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
VCHAR = bytes(range(0x21, 0x7F)) + bytes(range(0x80, 0x100))
SPECIAL = {b"content-length", b"transfer-encoding", b"connection", b"host", b"expect"}


@dataclass
class Case:
    wire: bytes
    # The head around its Content-Length digits (one plain value), to build the same head
    # with other lengths; None for other framings.
    around_length: tuple[bytes, bytes] | None = None

    def again(self, body: bytes) -> bytes:
        """This request's head with ``body`` and its length instead."""
        assert self.around_length is not None
        before, after = self.around_length
        return before + b"%d" % len(body) + after + body


header_names = (
    st.text(TCHAR, min_size=1, max_size=16)
    .map(str.encode)
    .filter(lambda n: n.lower() not in SPECIAL)
)
value_words = st.binary(min_size=1, max_size=12).map(
    lambda b: bytes(VCHAR[c % len(VCHAR)] for c in b)
)
header_values = st.lists(value_words, max_size=4).map(lambda words: b" ".join(words))
ows = st.sampled_from([b"", b" ", b"\t", b"  "])


@st.composite
def requests(draw: st.DrawFn) -> Case:
    method = draw(
        st.sampled_from([b"POST", b"GET", b"PUT"])
        | st.text(TCHAR, min_size=1, max_size=8).map(str.encode)
    )
    target = draw(
        st.sampled_from([b"/", b"/on-job-complete", b"*"])
        | st.binary(min_size=1, max_size=30).map(lambda b: bytes(0x21 + c % 94 for c in b))
    )
    version = draw(st.sampled_from([b"1.1", b"1.1", b"1.0"]))
    eol = draw(st.sampled_from([b"\r\n", b"\r\n", b"\n"]))
    fields: list[bytes] = []
    for name, value in draw(st.lists(st.tuples(header_names, header_values), max_size=6)):
        fields.append(name + b":" + draw(ows) + value + draw(ows))
    if version == b"1.1" or draw(st.booleans()):
        fields.insert(draw(st.integers(0, len(fields))), b"Host:" + draw(ows) + b"example")
    if draw(st.booleans()):
        fields.append(
            draw(
                st.sampled_from(
                    [b"Connection: close", b"connection:keep-alive", b"Connection: Upgrade, CLOSE"]
                )
            )
        )
    if draw(st.booleans()):
        fields.append(b"Expect: 100-continue")
    body = draw(st.binary(max_size=200))
    framing = draw(st.sampled_from(["length", "chunked", "none"]))
    tail = b""
    if framing == "none":
        body = b""
    elif framing == "length":
        fields.append(
            draw(
                st.sampled_from(
                    [b"Content-Length: %d", b"content-length:%d ", b"Content-Length: %d, %d"]
                )
            ).replace(b"%d", b"%d" % len(body))
        )
    else:
        fields.append(
            draw(st.sampled_from([b"Transfer-Encoding: chunked", b"transfer-encoding: Chunked"]))
        )
        cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=4)))
        pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
        for piece in pieces:
            if piece:
                ext = draw(st.sampled_from([b"", b";x=1", b" "]))
                tail += b"%x" % len(piece) + ext + b"\r\n" + piece + b"\r\n"
        tail += b"0\r\n"
        if draw(st.booleans()):
            tail += b"X-Trailer: t" + eol
        tail += eol
    if fields and draw(st.booleans()):
        i = draw(st.integers(0, len(fields) - 1))
        if not fields[i].lower().startswith((b"content-length", b"transfer-encoding")):
            fields[i] += eol + draw(st.sampled_from([b" ", b"\t"])) + b"folded"
    head = method + b" " + target + b" HTTP/" + version + eol
    head += b"".join(field + eol for field in fields) + eol
    around = None
    if framing == "length" and b", " not in fields[-1]:
        start = head.rindex(b"%d" % len(body), 0, head.rindex(fields[-1]) + len(fields[-1]))
        around = (head[:start], head[start + len(b"%d" % len(body)) :])
    return Case(head + (tail if framing == "chunked" else body), around)


def h11_read(wire: bytes) -> tuple[Request, bool] | None:
    """What an h11 server reads from ``wire`` (then EOF); ``None`` if it refuses it."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(wire)
    conn.receive_data(b"")
    head: h11.Request | None = None
    body = b""
    try:
        while True:
            event = conn.next_event()
            if isinstance(event, h11.Request):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                request = Request(
                    method=head.method.decode(),
                    target=head.target.decode(),
                    headers=head.headers.raw_items(),
                    body=body,
                    http_version=head.http_version.decode(),
                    keep_alive=conn.their_state is h11.DONE,
                )
                return request, conn.they_are_waiting_for_100_continue
            else:
                return None
    except h11.RemoteProtocolError:
        return None


def ours(pieces: list[bytes], *, max_body: int = 1 << 20) -> list[Request]:
    parser = RequestParser(max_body=max_body)
    out: list[Request] = []
    for piece in [*pieces, b""]:
        parser.receive_data(piece)
        while (request := parser.next_request()) is not None:
            out.append(request)
    return out


def split(data: bytes, mode: str, cuts: list[int]) -> list[bytes]:
    if mode == "whole":
        return [data]
    if mode == "bytes":
        return [data[i : i + 1] for i in range(len(data))]
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True) if b > a]


@SETTINGS
@given(
    cases=st.lists(requests(), min_size=1, max_size=3),
    mode=st.sampled_from(["whole", "bytes", "random"]),
    cuts=st.lists(st.integers(0, 10_000), max_size=8),
)
def test_valid_requests_read_like_h11(cases: list[Case], mode: str, cuts: list[int]) -> None:
    expected: list[Request] = []
    for case in cases:
        reference = h11_read(case.wire)
        assert reference is not None, case.wire
        expected.append(reference[0])
        if not reference[0].keep_alive:
            break  # nothing after a non-keep-alive request is read
    wire = b"".join(case.wire for case in cases)
    assert ours(split(wire, mode, cuts)) == expected


@SETTINGS
@given(
    case=requests(),
    edits=st.lists(
        st.tuples(st.integers(0, 10_000), st.integers(0, 255), st.integers(0, 2)),
        min_size=1,
        max_size=3,
    ),
)
def test_mutated_requests_accepted_or_refused_like_h11(
    case: Case, edits: list[tuple[int, int, int]]
) -> None:
    data = mutate(case.wire, edits)
    reference = h11_read(data)
    parser = RequestParser()
    parser.receive_data(data)
    parser.receive_data(b"")
    try:
        got = parser.next_request()  # only the first request: h11_read stops there too
    except RemoteProtocolError:
        got = None
    assert got == (reference[0] if reference is not None else None)


@SETTINGS
@given(
    case=requests().filter(lambda case: case.around_length is not None),
    bodies=st.lists(st.binary(max_size=150), min_size=1, max_size=4),
    mode=st.sampled_from(["whole", "bytes", "random"]),
    cuts=st.lists(st.integers(0, 10_000), max_size=8),
)
def test_heads_repeated_with_other_lengths_read_like_h11(
    case: Case, bodies: list[bytes], mode: str, cuts: list[int]
) -> None:
    """The remembered-head path: the same head with other Content-Length digits."""
    wires = [case.wire, *(case.again(body) for body in bodies)]
    expected: list[Request] = []
    for wire in wires:
        reference = h11_read(wire)
        assert reference is not None, wire
        expected.append(reference[0])
        if not reference[0].keep_alive:
            break
    parser = RequestParser()
    got: list[Request] = []
    reused: list[bool] = []
    for piece in [*split(b"".join(wires), mode, cuts), b""]:
        parser.receive_data(piece)
        while (request := parser.next_request()) is not None:
            got.append(request)
            reused.append(parser.reused_head)
    assert got == expected
    assert reused == [False] + [True] * (len(got) - 1)  # so the path under test was taken


@SETTINGS
@given(
    case=requests().filter(lambda case: case.around_length is not None),
    body=st.binary(max_size=50),
    edits=st.lists(
        st.tuples(st.integers(0, 10_000), st.integers(0, 255), st.integers(0, 2)),
        min_size=1,
        max_size=2,
    ),
)
def test_a_changed_repeat_is_read_like_h11(
    case: Case, body: bytes, edits: list[tuple[int, int, int]]
) -> None:
    """A head that is almost the remembered one is parsed in full, as h11 reads it."""
    first = h11_read(case.wire)
    assert first is not None
    if not first[0].keep_alive:
        return
    data = mutate(case.again(body), edits)
    reference = h11_read(data)
    parser = RequestParser()
    parser.receive_data(case.wire + data)
    parser.receive_data(b"")
    assert parser.next_request() == first[0]
    try:
        got = parser.next_request()
    except RemoteProtocolError:
        got = None
    assert got == (reference[0] if reference is not None else None)


@pytest.mark.parametrize(
    "digits", [b"", b"-1", b"+2", b"1_0", b"0x1", b"2 2", b"2,2", b"1" * 21, b"00002", b"\xd9\xa3"]
)
def test_a_repeat_with_odd_length_digits_is_read_like_h11(digits: bytes) -> None:
    head = b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: %b\r\nX: y\r\n\r\n"
    second = head % digits + b"hi"
    reference = h11_read(second)
    parser = RequestParser()
    parser.receive_data(head % b"2" + b"hi" + second)
    parser.receive_data(b"")
    assert parser.next_request() is not None
    try:
        got = parser.next_request()
    except RemoteProtocolError:
        got = None
    assert got == (reference[0] if reference is not None else None)


def test_a_remembered_head_still_bounds_the_body() -> None:
    parser = RequestParser(max_body=10)
    head = b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n"
    parser.receive_data(head % 2 + b"hi" + head % 11)
    assert parser.next_request() is not None
    with pytest.raises(RemoteProtocolError) as big:
        parser.next_request()
    assert parser.reused_head and big.value.error_status_hint == 413


def test_a_remembered_head_still_bounds_the_head() -> None:
    """A repeat whose longer digits push the head over ``max_head`` is refused like any head."""
    head = b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n"
    bound = len(head % 1) - 2  # the text up to its last line break, as h11 measures it
    parser = RequestParser(max_head=bound, max_body=100)
    parser.receive_data(head % 1 + b"x" + head % 2 + b"xy" + head % 10 + b"x" * 10)
    assert parser.next_request() is not None
    second = parser.next_request()
    assert second is not None and parser.reused_head and second.body == b"xy"
    with pytest.raises(RemoteProtocolError) as big:
        parser.next_request()
    assert big.value.error_status_hint == 431


@SETTINGS
@given(data=st.binary(max_size=300), cuts=st.lists(st.integers(0, 400)))
def test_garbage_raises_only_remote_protocol_error(data: bytes, cuts: list[int]) -> None:
    try:
        ours(split(data, "random", cuts))
    except RemoteProtocolError:
        pass


def test_bounds_and_status_hints() -> None:
    with pytest.raises(RemoteProtocolError) as big_head:
        ours([b"GET / HTTP/1.1\r\nHost: h\r\nX: " + b"a" * 5000], max_body=10)
    with pytest.raises(RemoteProtocolError) as big_body:
        ours([b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 11\r\n\r\n"], max_body=10)
    chunked = b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
    with pytest.raises(RemoteProtocolError) as big_chunks:
        ours([chunked + b"6\r\nabcdef\r\n6\r\nabcdef\r\n0\r\n\r\n"], max_body=10)
    with pytest.raises(RemoteProtocolError) as gzip:
        ours([b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip\r\n\r\n"])
    parser = RequestParser(max_head=1024)
    parser.receive_data(b"GET / HTTP/1.1\r\nHost: h\r\nX: " + b"a" * 2000)
    with pytest.raises(RemoteProtocolError) as incomplete:
        parser.next_request()
    assert big_head.value.error_status_hint == 400  # complete head under the default bound
    assert incomplete.value.error_status_hint == 431
    assert big_body.value.error_status_hint == 413
    assert big_chunks.value.error_status_hint == 413
    assert gzip.value.error_status_hint == 501


def test_expect_continue_and_eof() -> None:
    parser = RequestParser()
    parser.receive_data(
        b"POST / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n"
    )
    assert parser.next_request() is None
    assert parser.expects_continue
    parser.receive_data(b"h")
    assert parser.next_request() is None and not parser.expects_continue
    parser.receive_data(b"i")
    request = parser.next_request()
    assert request is not None and request.body == b"hi" and request.keep_alive
    parser.receive_data(b"GET / HTTP/1.1\r\n")
    parser.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="disconnected"):
        parser.next_request()
    clean = RequestParser()
    clean.receive_data(b"")
    assert clean.next_request() is None and clean.at_eof
