"""A small, fast, sans-IO HTTP/1.1 response parser for the dispatch hot path.

Theory of operation
-------------------
:class:`ResponseParser` owns one receive buffer per connection. Bytes go in with
:meth:`~ResponseParser.receive_data` (``b""`` means the peer closed its side); complete
responses come out of :meth:`~ResponseParser.next_response`, which returns ``None`` while more
bytes are needed. It never does I/O, so the same object serves asyncio and trio and is tested
by feeding it bytes (``tests/test_http_response.py`` checks it against h11 byte for byte).

The head is found with two ``bytearray.find`` calls (``\\n\\r\\n`` and ``\\n\\n``, as h11 accepts
both), validated with one ``bytes.translate`` over the whole block and split into lines with
``bytes`` methods: there is no per-byte Python loop and no regular expression. The body is
framed the way h11 frames it (RFC 9112 §6.3):

* 1xx: no body; skipped (101 is refused: we never ask to switch protocols);
* 204, 304 and answers to ``HEAD``: no body, whatever the headers say;
* ``Transfer-Encoding: chunked``: chunks (extensions ignored, trailers validated and dropped);
* ``Content-Length: N``: exactly N bytes;
* neither: the body runs until the server closes the connection.

Only the first ``keep_body`` bytes of a body are kept (``Response.body_head``); the rest is
counted (``Response.body_length``) and dropped, so a huge error page costs no memory. The head
(and the trailers) may not exceed ``max_head`` bytes. Anything malformed raises
:class:`~supervisor.http.errors.RemoteProtocolError` and leaves the parser unusable: the
connection must be closed.

``Response.keep_alive`` is true when the connection may carry another request: HTTP/1.1
without ``Connection: close``, or HTTP/1.0 with an explicit ``Connection: keep-alive``, and
only when the body had a length (a close-delimited body ends the connection).
"""

from __future__ import annotations

import msgspec

from supervisor.http._framing import (
    TCHAR,
    ChunkedReader,
    find_blank_line,
    merge_content_length,
    split_head,
)
from supervisor.http.errors import LocalProtocolError, RemoteProtocolError

__all__ = ["KEEP_BODY", "MAX_HEAD", "Response", "ResponseParser"]

MAX_HEAD = 64 * 1024
"""Largest response head (status line and header fields) accepted, in bytes."""

KEEP_BODY = 1024
"""Default number of body bytes kept for error reports; the rest is counted and dropped."""


# Parser states.
_HEAD = 0
_NO_BODY = 1
_LENGTH = 2
_CHUNKED = 3
_UNTIL_EOF = 4
_CLOSED = 5
_ERROR = 6


class Response(msgspec.Struct, gc=False):
    """One parsed HTTP response.

    ``headers`` holds ``(lowercased name, value)`` pairs in the order received (a repeated
    ``Content-Length`` appears once); ``body_head`` the first ``keep_body`` bytes of the body
    and ``body_length`` the size of the whole body.
    """

    status: int
    headers: list[tuple[bytes, bytes]]
    body_head: bytes
    keep_alive: bool
    reason: bytes = b""
    http_version: bytes = b"1.1"
    body_length: int = 0

    @property
    def body_truncated(self) -> bool:
        """Whether part of the body was dropped (``body_length > len(body_head)``)."""
        return self.body_length > len(self.body_head)

    def header(self, name: bytes) -> bytes | None:
        """The first value of header ``name`` (lowercase), or ``None``."""
        for key, value in self.headers:
            if key == name:
                return value
        return None


class _Fields(msgspec.Struct, gc=False):
    """Header fields plus what they say about framing and keep-alive."""

    headers: list[tuple[bytes, bytes]]
    content_length: bytes | None = None
    chunked: bool = False
    close: bool = False
    keep_alive: bool = False


def _bad(message: str) -> RemoteProtocolError:
    return RemoteProtocolError(message)


def _parse_fields(lines: list[bytes]) -> _Fields:
    """Parse and validate ``name: value`` lines (h11's rules, without regular expressions).

    ``lines`` must come from :func:`split_head` (no control bytes, folded lines joined).
    """
    fields = _Fields([])
    headers = fields.headers
    names: list[bytes] = []
    seen_te = False
    for line in lines:
        name, colon, value = line.partition(b":")
        if not colon or not name:
            raise _bad(f"Response has an illegal header line: {line[:100]!r}.")
        names.append(name)
        value = value.strip(b" \t")
        name = name.lower()
        if name == b"content-length":
            kept = merge_content_length(
                fields.content_length, value, who="Response", bad=_bad_with_hint
            )
            if kept is None:
                continue  # an identical repetition: keep one, as h11 does
            fields.content_length = value = kept
        elif name == b"transfer-encoding":
            if seen_te:
                raise _bad("Response has more than one Transfer-Encoding header.")
            seen_te = True
            value = value.lower()
            if value != b"chunked":
                raise _bad(f"Response uses an unsupported Transfer-Encoding: {value[:50]!r}.")
            fields.chunked = True
        elif name == b"connection":
            for token in value.lower().split(b","):
                token = token.strip()
                if token == b"close":
                    fields.close = True
                elif token == b"keep-alive":
                    fields.keep_alive = True
        headers.append((name, value))
    if b"".join(names).translate(None, TCHAR):
        bad = next(name for name in names if name.translate(None, TCHAR))
        raise _bad(f"Response has an illegal header name: {bad[:100]!r}.")
    return fields


_Fast = tuple[bytes, int, int, tuple[tuple[bytes, bytes], ...], bool, bytes, bytes]
_FieldsSnapshot = tuple[tuple[tuple[bytes, bytes], ...], bytes | None, bool, bool, bool]


def _snapshot(fields: _Fields) -> _FieldsSnapshot:
    return (
        tuple(fields.headers),
        fields.content_length,
        fields.chunked,
        fields.close,
        fields.keep_alive,
    )


def _bad_with_hint(message: str, _status: int) -> RemoteProtocolError:
    return _bad(message)  # a response's faults carry no status hint for us to answer with


def _check_trailers(text: bytes) -> None:
    _parse_fields(split_head(text))  # raises on malformed trailers; the fields are dropped


class ResponseParser:
    """Turns the bytes of one connection into :class:`Response` objects (sans-IO).

    ``keep_body`` bounds the body bytes kept per response (``None``: keep everything);
    ``max_head`` bounds the head and the trailer block.
    """

    __slots__ = (
        "_body",
        "_body_length",
        "_buf",
        "_chunked",
        "_eof",
        "_fast",
        "_fields",
        "_keep_body",
        "_last",
        "_max_head",
        "_reason",
        "_remaining",
        "_scan",
        "_state",
        "_status",
        "_version",
    )

    def __init__(self, *, keep_body: int | None = KEEP_BODY, max_head: int = MAX_HEAD) -> None:
        self._buf = bytearray()
        self._eof = False
        self._state = _HEAD
        self._scan = 0
        self._keep_body = keep_body if keep_body is not None else 1 << 62
        self._max_head = max_head
        # The last final response's head text and its parse, reused when the next is the same.
        self._last: tuple[bytes, int, bytes, _FieldsSnapshot] | None = None
        # The last Content-Length response's whole head and what it said, for _fast_response.
        self._fast: _Fast | None = None
        self._status = 0
        self._reason = b""
        self._version = b"1.1"
        self._fields = _Fields([])
        self._body = bytearray()
        self._body_length = 0
        self._remaining = 0
        self._chunked = ChunkedReader(
            who="Response",
            bad=_bad_with_hint,
            check_trailers=_check_trailers,
            eof_message="Server disconnected before the end of the chunked body.",
            max_head=max_head,
        )

    # -- input ---------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Add bytes read from the connection; ``b""`` means the peer closed it."""
        if not data:
            self._eof = True
        elif self._eof:
            raise LocalProtocolError("Data was fed to the parser after the end of the stream.")
        else:
            self._buf += data

    @property
    def unprocessed(self) -> int:
        """How many received bytes are not part of a response returned so far."""
        return len(self._buf)

    @property
    def idle(self) -> bool:
        """Whether the parser waits for a new response with nothing buffered (and no EOF)."""
        return self._state == _HEAD and not self._buf and not self._eof

    @property
    def must_close(self) -> bool:
        """True once a response said the connection cannot be reused (or parsing failed)."""
        return self._state >= _CLOSED

    @property
    def body_received(self) -> int:
        """Body bytes of the response being read received so far (0 between responses)."""
        return self._body_length

    def partial_response(self) -> Response | None:
        """The response being read, with the body so far and ``keep_alive`` false, once its
        head is parsed (``None`` before that, and between responses)."""
        if self._state in (_HEAD, _CLOSED, _ERROR):
            return None
        return Response(
            status=self._status,
            headers=list(self._fields.headers),
            body_head=bytes(self._body),
            keep_alive=False,
            reason=self._reason,
            http_version=self._version,
            body_length=self._body_length,
        )

    # -- output --------------------------------------------------------------------------

    def next_response(self, *, head_request: bool = False) -> Response | None:
        """The next complete response, or ``None`` if more bytes are needed.

        ``head_request`` says the response answers a ``HEAD`` request (so it has no body).
        Raises :class:`RemoteProtocolError` on malformed input or when the peer closed the
        connection before the response was complete.
        """
        fast = self._fast
        if fast is not None and self._state == _HEAD and not head_request:
            response = self._fast_response(fast)
            if response is not None:
                return response
        try:
            state = self._state
            if state == _HEAD:
                if not self._read_head(head_request):
                    return None
                state = self._state
            if state == _LENGTH:
                if not self._read_length():
                    return None
            elif state == _NO_BODY:
                pass
            elif state == _UNTIL_EOF:
                self._take(len(self._buf))
                if not self._eof:
                    return None
            elif state < _UNTIL_EOF:
                if not self._read_chunked():
                    return None
            elif state == _CLOSED:
                raise LocalProtocolError(
                    "The previous response closed the connection; no further response can follow."
                )
            else:
                raise RemoteProtocolError("The connection already failed to parse; close it.")
            return self._finish()
        except RemoteProtocolError:
            self._state = _ERROR
            raise

    # -- internals -----------------------------------------------------------------------

    def _fast_response(self, fast: _Fast) -> Response | None:
        """The whole next response when its head is byte for byte the last Content-Length
        one's and its body is all here: what the general path would return, with less work."""
        head, length, status, headers, keep_alive, reason, version = fast
        buf = self._buf
        start = len(head)
        end = start + length
        if len(buf) < end or not buf.startswith(head):
            return None
        body = bytes(buf[start : start + min(self._keep_body, length)])
        del buf[:end]
        self._scan = 0
        if not keep_alive:
            self._state = _CLOSED
        return Response(
            status=status,
            headers=list(headers),
            body_head=body,
            keep_alive=keep_alive,
            reason=reason,
            http_version=version,
            body_length=length,
        )

    def _read_head(self, head_request: bool) -> bool:
        buf = self._buf
        while True:
            text_end, head_end = find_blank_line(buf, self._scan)
            if head_end < 0 or text_end > self._max_head:
                if len(buf) > self._max_head:
                    raise _bad(f"Response head is larger than {self._max_head} bytes.")
                if self._eof:
                    if buf:
                        raise _bad("Server disconnected before the response head was complete.")
                    raise _bad("Server disconnected without sending a response.")
                self._scan = max(0, len(buf) - 2)
                return False
            whole = bytes(buf[:head_end])
            text = whole[:text_end]
            del buf[:head_end]
            self._scan = 0
            last = self._last
            if last is not None and last[0] == text:
                # The same head as the previous response (a worker's answers differ in their
                # Date at most once a second): same bytes, same parse.
                _, status, line, (headers, length, chunked, close, keep) = last
                fields = _Fields(list(headers), length, chunked, close, keep)
                break
            lines = split_head(text)
            line = lines[0]
            if (
                line[:7] != b"HTTP/1."
                or len(line) < 12
                or not line[7:8].isdigit()
                or line[8] != 0x20
                or not line[9:12].isdigit()
                or (len(line) > 12 and line[12] != 0x20)
            ):
                raise _bad(f"Response has an illegal status line: {line[:100]!r}.")
            status = int(line[9:12])
            fields = _parse_fields(lines[1:])
            if status >= 200:
                self._last = (text, status, line, _snapshot(fields))
                break
            if status == 101:
                raise _bad("Server switched protocols (101) although no upgrade was requested.")
            if status < 100:
                raise _bad(f"Response has an invalid status code: {status}.")
            # 1xx informational: no body, the final response follows.
        self._status = status
        self._reason = line[13:]
        self._version = version = line[5:8]
        self._fields = fields
        keep_alive = not fields.close and (version >= b"1.1" or fields.keep_alive)
        if head_request or status == 204 or status == 304:
            self._state = _NO_BODY
        elif fields.chunked:
            self._chunked.reset()
            self._state = _CHUNKED
        elif fields.content_length is not None:
            self._remaining = int(fields.content_length)
            self._state = _LENGTH
        else:
            self._state = _UNTIL_EOF
            keep_alive = False
        fields.keep_alive = keep_alive
        if self._state == _LENGTH:
            self._fast = (
                whole,
                self._remaining,
                status,
                tuple(fields.headers),
                keep_alive,
                self._reason,
                version,
            )
        else:
            self._fast = None
        return True

    def _take(self, count: int) -> None:
        """Consume ``count`` body bytes from the buffer, keeping up to ``keep_body``."""
        buf = self._buf
        room = self._keep_body - len(self._body)
        if room > 0:
            self._body += buf[: min(room, count)]
        del buf[:count]
        self._body_length += count

    def _read_length(self) -> bool:
        remaining = self._remaining
        if remaining:
            take = min(remaining, len(self._buf))
            if take:
                self._take(take)
                self._remaining = remaining = remaining - take
            if remaining:
                if self._eof:
                    raise _bad(
                        "Server disconnected before sending the whole body "
                        f"({self._body_length} of {self._body_length + remaining} bytes)."
                    )
                return False
        return True

    def _read_chunked(self) -> bool:
        return self._chunked.read(self._buf, self._take, self._eof)

    def _finish(self) -> Response:
        fields = self._fields
        response = Response(
            status=self._status,
            headers=fields.headers,
            body_head=bytes(self._body),
            keep_alive=fields.keep_alive,
            reason=self._reason,
            http_version=self._version,
            body_length=self._body_length,
        )
        self._body.clear()
        self._body_length = 0
        self._fields = _Fields([])
        self._state = _HEAD if fields.keep_alive else _CLOSED
        return response
