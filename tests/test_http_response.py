"""Differential tests: ``ResponseParser`` must read responses exactly as h11 reads them.

Hypothesis builds responses (statuses, header sets, Content-Length / chunked / close-delimited
bodies with random chunking, 1xx preludes, folded lines, LF-only heads); each is fed whole, one
byte at a time and in random splits, with and without trailing junk, to our parser and to an
h11 client connection. Garbage and mutated input may only ever raise ``RemoteProtocolError``.
"""

from __future__ import annotations

from dataclasses import dataclass

import h11
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from supervisor.http.errors import LocalProtocolError, RemoteProtocolError
from supervisor.http.response import Response, ResponseParser
from tests.helpers import mutate

SETTINGS = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])

TCHAR = "!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
VCHAR = bytes(range(0x21, 0x7F)) + bytes(range(0x80, 0x100))
FRAMING_NAMES = {b"content-length", b"transfer-encoding", b"connection"}


@dataclass
class Case:
    wire: bytes  # the bytes of the final response (after any 1xx preludes)
    status: int
    reason: bytes
    version: bytes
    headers: list[tuple[bytes, bytes]]  # as h11 reports them: lowercased names
    body: bytes
    framing: str  # "length", "chunked", "close" or "none"
    head_request: bool


def _flip_case(draw: st.DrawFn, name: bytes) -> bytes:
    mask = draw(st.lists(st.booleans(), min_size=len(name), max_size=len(name)))
    return bytes(
        (c ^ 0x20) if flip and chr(c).isalpha() else c for c, flip in zip(name, mask, strict=True)
    )


header_names = (
    st.text(TCHAR, min_size=1, max_size=16)
    .map(str.encode)
    .filter(lambda n: n.lower() not in FRAMING_NAMES)
)
value_words = st.binary(min_size=1, max_size=12).map(
    lambda b: bytes(VCHAR[c % len(VCHAR)] for c in b)
)
header_values = st.lists(value_words, max_size=4).flatmap(
    lambda words: st.lists(
        st.sampled_from([b" ", b"\t", b"  "]), min_size=len(words), max_size=len(words)
    ).map(lambda seps: b"".join(s + w for s, w in zip(seps, words, strict=True)).lstrip(b" \t"))
)
ows = st.sampled_from([b"", b" ", b"\t", b"  "])


@st.composite
def responses(draw: st.DrawFn) -> Case:
    version = draw(st.sampled_from([b"1.1", b"1.1", b"1.0"]))
    status = draw(st.one_of(st.sampled_from([200, 204, 304, 404, 500, 503]), st.integers(200, 599)))
    reason = draw(
        st.one_of(
            st.just(b"OK"),
            st.binary(max_size=20).map(
                lambda b: bytes((VCHAR + b" \t")[c % (len(VCHAR) + 2)] for c in b)
            ),
        )
    )
    omit_reason = not reason and draw(st.booleans())
    head_request = draw(st.integers(0, 9)) == 0
    framing = draw(st.sampled_from(["length", "length", "chunked", "chunked", "close"]))
    body = draw(st.binary(max_size=2000)) if draw(st.booleans()) else b""
    no_body = head_request or status in (204, 304)
    lf = b"\n" if draw(st.integers(0, 7)) == 0 else b"\r\n"

    fields: list[tuple[bytes, bytes, bytes]] = []  # (wire name, wire value, h11 value)
    for name, value in draw(st.lists(st.tuples(header_names, header_values), max_size=8)):
        fields.append((name, draw(ows) + value + draw(ows), value))
    connection = draw(st.sampled_from([None, b"close", b"keep-alive", b"Keep-Alive, x-foo"]))
    if connection is not None:
        name = _flip_case(draw, b"connection")
        fields.insert(draw(st.integers(0, len(fields))), (name, b" " + connection, connection))
    if framing == "length":
        length = str(len(body)).encode()
        name = _flip_case(draw, b"content-length")
        fields.insert(draw(st.integers(0, len(fields))), (name, b" " + length, length))
        if draw(st.integers(0, 5)) == 0:  # an identical repetition, which h11 folds into one
            fields.append((name, b" " + length, length))
    elif framing == "chunked":
        name = _flip_case(draw, b"transfer-encoding")
        te = draw(st.sampled_from([b"chunked", b"Chunked", b"CHUNKED"]))
        fields.insert(draw(st.integers(0, len(fields))), (name, b" " + te, te.lower()))

    head = b"HTTP/" + version + b" " + str(status).encode()
    if not omit_reason:
        head += b" " + reason
    lines = [head]
    for index, (wire_name, wire_value, value) in enumerate(fields):
        line = wire_name + b":" + wire_value
        if draw(st.integers(0, 15)) == 0 and b" " in value:
            # obsolete line folding: "a  b" -> "a\r\n  b" reads back as "a b"
            first, _, rest = value.partition(b" ")
            line = wire_name + b": " + first + lf + b" " + rest
            fields[index] = (wire_name, wire_value, first + b" " + rest.lstrip(b" \t"))
        lines.append(line)
    wire = lf.join(lines) + lf + lf

    if no_body:
        sent_body = b""
    elif framing == "chunked":
        sent_body = draw(chunked(body))
    else:
        sent_body = body
    if framing == "close" or no_body:
        expected_framing = "none" if no_body else "close"
    else:
        expected_framing = framing
    h11_headers = [(name.lower(), value) for name, _, value in fields]
    if framing == "length" and len(fields) != len({(n.lower(), v) for n, _, v in fields}):
        h11_headers = _dedup_content_length(h11_headers)
    return Case(
        wire=wire + sent_body,
        status=status,
        reason=b"" if omit_reason else reason,
        version=version,
        headers=h11_headers,
        body=b"" if no_body else body,
        framing=expected_framing,
        head_request=head_request,
    )


def _dedup_content_length(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    out, seen = [], False
    for name, value in headers:
        if name == b"content-length":
            if seen:
                continue
            seen = True
        out.append((name, value))
    return out


@st.composite
def chunked(draw: st.DrawFn, body: bytes) -> bytes:
    out = []
    pos = 0
    while pos < len(body):
        size = draw(st.integers(1, max(1, len(body) - pos)))
        chunk = body[pos : pos + size]
        pos += size
        size_hex = f"{size:x}"
        size_hex = draw(st.sampled_from([size_hex, size_hex.upper(), "00" + size_hex]))
        ext = draw(st.sampled_from([b"", b";a=b", b'; name="q v"', b" "]))
        out.append(size_hex.encode() + ext + b"\r\n" + chunk + b"\r\n")
    out.append(draw(st.sampled_from([b"0\r\n", b"000\r\n", b"0;ext=1\r\n"])))
    trailers = draw(st.lists(st.tuples(header_names, value_words), max_size=3))
    out.extend(name + b": " + value + b"\r\n" for name, value in trailers)
    out.append(b"\r\n")
    return b"".join(out)


informational = st.lists(
    st.sampled_from(
        [
            b"HTTP/1.1 100 Continue\r\n\r\n",
            b"HTTP/1.1 102 Processing\r\nX-A: 1\r\n\r\n",
            b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n",
        ]
    ),
    max_size=2,
).map(b"".join)


# -- feeding -------------------------------------------------------------------------------


def split_points(data: bytes, mode: str, cuts: list[int]) -> list[bytes]:
    if mode == "whole":
        return [data]
    if mode == "bytes":
        return [data[i : i + 1] for i in range(len(data))]
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for point in [*points, len(data)]:
        pieces.append(data[last:point])
        last = point
    return [p for p in pieces if p]


def ours(
    pieces: list[bytes], eof: bool, *, head_request: bool, keep_body: int | None = None
) -> Response:
    parser = ResponseParser(keep_body=keep_body)
    response = None
    for piece in pieces:
        assert parser.next_response(head_request=head_request) is None
        parser.receive_data(piece)
        response = parser.next_response(head_request=head_request)
        if response is not None:
            break
    if response is None and eof:
        parser.receive_data(b"")
        response = parser.next_response(head_request=head_request)
    assert response is not None
    return response


def theirs(data: bytes, eof: bool, *, head_request: bool) -> tuple[h11.Response, bytes, bool]:
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=64 * 1024)
    method = b"HEAD" if head_request else b"GET"
    conn.send(h11.Request(method=method, target="/", headers=[("Host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(data)
    if eof:
        conn.receive_data(b"")
    response: h11.Response | None = None
    body = b""
    while True:
        event = conn.next_event()
        if isinstance(event, h11.Response):
            response = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            break
        elif isinstance(event, h11.InformationalResponse):
            continue
        else:  # pragma: no cover - a broken test case
            raise AssertionError(f"unexpected h11 event {event!r}")
    assert response is not None
    return response, body, conn.their_state is h11.DONE


def check(case: Case, prelude: bytes, mode: str, cuts: list[int], junk: bytes) -> None:
    data = prelude + case.wire
    eof = case.framing == "close"
    if not eof:
        data += junk
    reference, reference_body, reference_keep_alive = theirs(
        data, eof, head_request=case.head_request
    )
    got = ours(split_points(data, mode, cuts), eof, head_request=case.head_request)
    assert got.status == reference.status_code == case.status
    assert got.reason == reference.reason == case.reason
    assert got.http_version == reference.http_version == case.version
    assert got.headers == list(reference.headers) == case.headers
    assert got.body_head == reference_body == case.body
    assert got.body_length == len(case.body)
    connection = [v for n, v in case.headers if n == b"connection"]
    tokens = {t.strip().lower() for v in connection for t in v.split(b",")}
    if case.framing == "close":
        assert not got.keep_alive  # h11 reports DONE until it has seen the close itself
    elif case.version == b"1.0" and b"keep-alive" in tokens and b"close" not in tokens:
        # We honour an explicit HTTP/1.0 keep-alive; h11 never keeps 1.0 connections.
        assert got.keep_alive
    else:
        assert got.keep_alive is reference_keep_alive


@SETTINGS
@given(
    case=responses(),
    prelude=informational,
    mode=st.sampled_from(["whole", "bytes", "random"]),
    cuts=st.lists(st.integers(0, 10_000), max_size=12),
    junk=st.sampled_from([b"", b"HTTP/1.1 200 OK\r\n", b"\x00garbage", b"\r\n\r\n"]),
)
def test_agrees_with_h11(
    case: Case, prelude: bytes, mode: str, cuts: list[int], junk: bytes
) -> None:
    check(case, prelude, mode, cuts, junk)


@SETTINGS
@given(case=responses(), keep=st.integers(0, 64), cuts=st.lists(st.integers(0, 10_000)))
def test_keep_body_bounds_what_is_kept(case: Case, keep: int, cuts: list[int]) -> None:
    pieces = split_points(case.wire, "random", cuts)
    got = ours(pieces, True, head_request=case.head_request, keep_body=keep)
    assert got.body_head == case.body[:keep]
    assert got.body_length == len(case.body)
    assert got.body_truncated is (len(case.body) > keep)


@SETTINGS
@given(case=responses(), cuts=st.lists(st.integers(0, 10_000), max_size=12))
def test_a_repeated_head_parses_the_same_again(case: Case, cuts: list[int]) -> None:
    """The parser reuses the parse of a head identical to the previous one: same result."""
    if case.framing == "close" or case.version == b"1.0":
        return  # no second response on this connection
    parser = ResponseParser()
    got: list[Response] = []
    for piece in split_points(case.wire * 3, "random", cuts):
        parser.receive_data(piece)
        while (response := parser.next_response(head_request=case.head_request)) is not None:
            got.append(response)
            if not response.keep_alive:
                break
        if got and not got[-1].keep_alive:
            break
    first = ours([case.wire], False, head_request=case.head_request)
    assert got and all(r == first for r in got)
    assert len(got) == (3 if first.keep_alive else 1)


def test_a_head_that_differs_only_in_length_is_parsed_again() -> None:
    parser = ResponseParser()
    parser.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na")
    parser.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nbc")
    parser.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nd")
    bodies = [r.body_head for r in iter(parser.next_response, None)]
    assert bodies == [b"a", b"bc", b"d"]


def test_pipelined_responses_come_out_in_order() -> None:
    parser = ResponseParser()
    parser.receive_data(
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na"
        b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nb\r\n0\r\n\r\n"
        b"HTTP/1.1 204 No Content\r\n\r\n"
        b"HTTP/1.1 500 Oops\r\nConnection: close\r\nContent-Length: 1\r\n\r\nc"
    )
    got = []
    while (response := parser.next_response()) is not None:
        got.append((response.status, response.body_head, response.keep_alive))
        if not response.keep_alive:
            break
    assert got == [(200, b"a", True), (201, b"b", True), (204, b"", True), (500, b"c", False)]
    assert parser.must_close
    with pytest.raises(LocalProtocolError):
        parser.next_response()


def test_close_delimited_body_ends_at_eof() -> None:
    parser = ResponseParser(keep_body=None)
    parser.receive_data(b"HTTP/1.0 200 OK\r\nX: y\r\n\r\npart one, ")
    assert parser.next_response() is None
    parser.receive_data(b"part two")
    assert parser.next_response() is None
    parser.receive_data(b"")
    response = parser.next_response()
    assert response is not None
    assert response.body_head == b"part one, part two"
    assert not response.keep_alive
    assert response.header(b"x") == b"y"


@pytest.mark.parametrize("size_line", [b"6 ;a=b", b"6\t; name=v", b"6 \t;", b"6 "])
def test_white_space_before_a_chunk_extension_is_legal(size_line: bytes) -> None:
    # RFC 9112 7.1.1: chunk-ext = *( BWS ";" ... ). h11 refuses these; we read them.
    parser = ResponseParser(keep_body=None)
    parser.receive_data(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        + size_line
        + b"\r\nabcdef\r\n0 ;x\r\n\r\n"
    )
    response = parser.next_response()
    assert response is not None
    assert response.body_head == b"abcdef"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "without sending a response"),
        (b"HTTP/1.1 200 OK\r\nContent-", "head was complete"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", "3 of 10 bytes"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab", "chunked body"),
    ],
)
def test_early_eof_is_a_remote_protocol_error(data: bytes, message: str) -> None:
    parser = ResponseParser()
    if data:
        parser.receive_data(data)
        assert parser.next_response() is None
    parser.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match=message):
        parser.next_response()


@pytest.mark.parametrize(
    "data",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 0x10\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nabc",
        b"HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nNoColon\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n folded-first: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: a\x00b\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: a\rb\r\n\r\n",
        b"HTTP/1.1 20 OK\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/1.1 099 Low\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n",
        b"HTTP/2.0 200 OK\r\n\r\n",
        b"http/1.1 200 OK\r\n\r\n",
        b"\r\nHTTP/1.1 200 OK\r\n\r\n",
        b"SSH-2.0-OpenSSH_9.2\r\n\r\n",
    ],
)
def test_malformed_responses_are_rejected(data: bytes) -> None:
    parser = ResponseParser()
    parser.receive_data(data)
    with pytest.raises(RemoteProtocolError):
        parser.next_response()
    with pytest.raises(RemoteProtocolError):  # the parser stays failed
        parser.next_response()


def test_oversized_head_is_rejected_without_a_terminator() -> None:
    parser = ResponseParser(max_head=1024)
    parser.receive_data(b"HTTP/1.1 200 OK\r\n")
    for _ in range(40):
        parser.receive_data(b"X-Filler: " + b"a" * 40 + b"\r\n")
        try:
            assert parser.next_response() is None
        except RemoteProtocolError as exc:
            assert "larger than 1024" in str(exc)
            break
    else:  # pragma: no cover
        raise AssertionError("a 2 KiB head was accepted with max_head=1024")


def test_huge_body_is_counted_not_kept() -> None:
    parser = ResponseParser(keep_body=10)
    parser.receive_data(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 1000000\r\n\r\n")
    for _ in range(100):
        assert parser.next_response() is None
        parser.receive_data(b"x" * 10_000)
    response = parser.next_response()
    assert response is not None
    assert response.body_head == b"x" * 10
    assert response.body_length == 1_000_000
    assert parser.unprocessed == 0


def _only_remote_errors(pieces: list[bytes], eof: bool) -> None:
    parser = ResponseParser(max_head=4096)
    try:
        for piece in [*pieces, b""] if eof else pieces:
            parser.receive_data(piece)
            while (response := parser.next_response()) is not None:
                if not response.keep_alive:
                    return
    except RemoteProtocolError:
        pass


@SETTINGS
@given(data=st.binary(max_size=300), cuts=st.lists(st.integers(0, 400)), eof=st.booleans())
@example(data=b"HTTP/1.1 200 OK\r\n\r\n", cuts=[], eof=True)
def test_garbage_raises_only_remote_protocol_error(data: bytes, cuts: list[int], eof: bool) -> None:
    _only_remote_errors(split_points(data, "random", cuts), eof)


@SETTINGS
@given(
    case=responses(),
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255), st.integers(0, 2))),
    cuts=st.lists(st.integers(0, 10_000)),
)
def test_mutated_responses_raise_only_remote_protocol_error(
    case: Case, edits: list[tuple[int, int, int]], cuts: list[int]
) -> None:
    _only_remote_errors(split_points(mutate(case.wire, edits), "random", cuts), True)


def test_idle_means_nothing_buffered_between_responses() -> None:
    parser = ResponseParser()
    assert parser.idle
    parser.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\no")
    assert parser.next_response() is None and not parser.idle
    parser.receive_data(b"k")
    assert parser.next_response() is not None and parser.idle
    parser.receive_data(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert parser.next_response() is None and parser.idle  # the final answer is still due
    parser.receive_data(b"")
    assert not parser.idle
