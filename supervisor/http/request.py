"""A small, fast, sans-IO HTTP/1.1 request parser for the server's hot path.

Theory of operation
-------------------
:class:`RequestParser` is the server-side twin of :class:`~.response.ResponseParser`: one
receive buffer per connection, bytes in with :meth:`~RequestParser.receive_data` (``b""``
means the client closed its side), whole :class:`Request` objects (head and body) out of
:meth:`~RequestParser.next_request`, ``None`` while more bytes are needed. It never does I/O;
``tests/test_http_request.py`` checks it against h11 (whole, byte by byte, random splits,
pipelined) so it accepts what h11 accepts and reports what h11 reports.

The head is found with ``bytearray.find`` (``\\n\\r\\n`` or ``\\n\\n``, as h11), checked with one
``bytes.translate`` and split with ``bytes`` methods (shared with ``response.py``). The rules
are h11's: ``METHOD SP target SP HTTP/d.d``; header names are tokens, values are stripped of
spaces and tabs; ``Host`` is required once in HTTP/1.1 and never repeated; repeated or
comma-listed ``Content-Length`` values must agree (one is kept); ``Transfer-Encoding`` may
only be ``chunked`` (501 otherwise) and wins over ``Content-Length``; a request with neither
has no body. ``Request.headers`` keeps the names as spelled by the client, in order, with the
values h11 would report.

Bounds: a head (or trailer block) over ``max_head`` bytes is refused with hint 431, a body
over ``max_body`` bytes with hint 413 -- from ``Content-Length`` as soon as the head is read,
or as soon as a chunked body passes the bound. Every refusal is a
:class:`~supervisor.http.errors.RemoteProtocolError` whose ``error_status_hint`` is the status
to answer (400 by default); the parser is unusable afterwards and the connection must close.

A client sends the same head again and again with only ``Content-Length`` changing (a batch
poster's heads differ in nothing else), so after a full parse the parser remembers the head
split around that value: when the buffer starts with the same bytes apart from those digits,
its parse is the remembered one with the new length (the digits are the only input that
changed, and they are checked as a full parse would check them). That match is tried before
anything else, so a repeated head costs two ``bytearray`` searches and no split or decode.
:attr:`reused_head` says so, which lets the proxy reuse what it built from the previous head.

``Request.keep_alive`` is h11's rule: HTTP/1.1 or later without ``Connection: close``. After a
request that is not keep-alive the parser returns nothing more. :attr:`expects_continue` is
true while a client that sent ``Expect: 100-continue`` waits for the body to be asked for.
"""

from __future__ import annotations

import msgspec

from supervisor.http._framing import (
    MAX_LENGTH_DIGITS,
    TCHAR,
    ChunkedReader,
    merge_content_length,
    split_head,
)
from supervisor.http._framing import find_blank_line as _find_blank_line
from supervisor.http._timeouts import Phase
from supervisor.http.errors import LocalProtocolError, RemoteProtocolError

__all__ = ["MAX_BODY", "MAX_HEAD", "Request", "RequestParser"]

MAX_HEAD = 64 * 1024
"""Default bound on a request head (request line and header fields), in bytes."""

MAX_BODY = 10 * 1024 * 1024
"""Default bound on a request body, in bytes."""

_VCHAR = bytes(range(0x21, 0x7F))

# Parser states.
_HEAD = 0
_LENGTH = 1
_CHUNKED = 2
_CLOSED = 6
_ERROR = 7


class Request(msgspec.Struct, gc=False):
    """One HTTP request, read whole.

    ``headers`` keeps the names as the client spelled them, in order; look values up with
    :meth:`header` (case-insensitive). ``keep_alive`` says whether the client allows another
    request on the connection (HTTP/1.1 without ``Connection: close``).
    """

    method: str
    target: str
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    http_version: str = "1.1"
    keep_alive: bool = True

    @property
    def path(self) -> str:
        """The target without its query string."""
        return self.target.partition("?")[0]

    @property
    def query(self) -> str:
        """The query string (after ``?``), or ``""``."""
        return self.target.partition("?")[2]

    def header(self, name: str | bytes) -> bytes | None:
        """The first value of header ``name`` (any case), or ``None``."""
        key = (name.encode("ascii") if isinstance(name, str) else name).lower()
        for raw, value in self.headers:
            if raw.lower() == key:
                return value
        return None


def _check_trailers(text: bytes) -> None:
    _parse_fields(split_head(b"\n" + text, "Request")[1:], None)


def _bad(message: str, status: int = 400) -> RemoteProtocolError:
    return RemoteProtocolError(message, status)


class _Head(msgspec.Struct, gc=False):
    """A parsed request head and what it says about framing."""

    method: str
    target: str
    version: str
    headers: list[tuple[bytes, bytes]]
    content_length: int = 0
    chunked: bool = False
    keep_alive: bool = True
    expect_continue: bool = False


def _parse_request_line(line: bytes) -> tuple[str, str, str]:
    method, _, rest = line.partition(b" ")
    target, _, version = rest.partition(b" ")
    if (
        not method
        or method.translate(None, TCHAR)
        or not target
        or target.translate(None, _VCHAR)
        or len(version) != 8
        or version[:5] != b"HTTP/"
        or version[6] != 0x2E
        or not version[5:6].isdigit()
        or not version[7:8].isdigit()
    ):
        raise _bad(f"Illegal request line: {line[:100]!r}.")
    return method.decode("ascii"), target.decode("ascii"), version[5:].decode("ascii")


def _parse_fields(lines: list[bytes], head: _Head | None) -> list[tuple[bytes, bytes]]:
    """Validate ``name: value`` lines (from ``split_head``); fill ``head``'s framing fields.

    ``head`` is ``None`` for trailers, which are validated the same way and then dropped.
    """
    headers: list[tuple[bytes, bytes]] = []
    names: list[bytes] = []
    content_length: bytes | None = None
    hosts = 0
    seen_te = False
    for line in lines:
        raw_name, colon, value = line.partition(b":")
        if not colon or not raw_name:
            raise _bad(f"Request has an illegal header line: {line[:100]!r}.")
        names.append(raw_name)
        value = value.strip(b" \t")
        name = raw_name.lower()
        if name == b"content-length":
            kept = merge_content_length(content_length, value, who="Request", bad=_bad)
            if kept is None:
                continue  # an identical repetition: keep one, as h11 does
            content_length = value = kept
        elif name == b"transfer-encoding":
            if seen_te:
                raise _bad("Request has more than one Transfer-Encoding header.", 501)
            seen_te = True
            value = value.lower()
            if value != b"chunked":
                raise _bad(f"Request uses an unsupported Transfer-Encoding: {value[:50]!r}.", 501)
        elif head is not None:
            if name == b"host":
                hosts += 1
            elif name == b"connection":
                if b"close" in [token.strip() for token in value.lower().split(b",")]:
                    head.keep_alive = False
            elif name == b"expect":
                if b"100-continue" in [token.strip() for token in value.lower().split(b",")]:
                    head.expect_continue = True
        headers.append((raw_name, value))
    if b"".join(names).translate(None, TCHAR):
        bad = next(name for name in names if name.translate(None, TCHAR))
        raise _bad(f"Request has an illegal header name: {bad[:100]!r}.")
    if head is not None:
        if hosts > 1:
            raise _bad("Request has more than one Host header.")
        if hosts == 0 and head.version == "1.1":
            raise _bad("HTTP/1.1 request has no Host header.")
        if head.version < "1.1":
            head.keep_alive = False
            head.expect_continue = False
        head.chunked = seen_te
        if content_length is not None:
            head.content_length = int(content_length)
    return headers


class _Last(msgspec.Struct, gc=False):
    """A head remembered around its ``Content-Length`` digits (see :meth:`RequestParser._match`).

    ``prefix`` runs up to the digits, ``tail`` from after them to the end of the blank line
    (``blank`` bytes long); ``head`` is the parse and ``index`` the place of the field in it.
    """

    prefix: bytes
    tail: bytes
    blank: int
    head: _Head
    index: int


def _remember(whole: bytes, text_end: int, head: _Head) -> _Last | None:
    """``whole`` (a head up to its blank line) split around its one ``Content-Length`` value,
    when that value is plain digits."""
    if head.chunked:
        return None
    lowered = whole.lower()
    start = lowered.find(b"\ncontent-length:")
    if start < 0 or lowered.find(b"\ncontent-length:", start + 1) >= 0:
        return None
    first = start + 16
    while whole[first : first + 1] in (b" ", b"\t"):
        first += 1
    end = first
    while whole[end : end + 1].isdigit():
        end += 1
    after = end
    while whole[after : after + 1] in (b" ", b"\t"):
        after += 1
    if end == first or whole[after : after + 1] not in (b"\r", b"\n"):
        return None
    for index, (name, value) in enumerate(head.headers):
        if name.lower() == b"content-length":
            if value != whole[first:end]:
                return None
            return _Last(whole[:first], whole[end:], len(whole) - text_end, head, index)
    return None


class RequestParser:
    """Turns the bytes of one server connection into :class:`Request` objects (sans-IO)."""

    __slots__ = (
        "_body",
        "_buf",
        "_chunked",
        "_eof",
        "_head",
        "_last",
        "_max_body",
        "_max_head",
        "_remaining",
        "_scan",
        "_state",
        "reused_head",
    )

    def __init__(self, *, max_head: int = MAX_HEAD, max_body: int = MAX_BODY) -> None:
        self._buf = bytearray()
        self._last: _Last | None = None
        self.reused_head = False
        """Whether the last head read equalled the one before, ``Content-Length`` aside."""
        self._eof = False
        self._state = _HEAD
        self._scan = 0
        self._max_head = max_head
        self._max_body = max_body
        self._head: _Head | None = None
        self._body = bytearray()
        self._remaining = 0
        self._chunked = ChunkedReader(
            who="Request",
            bad=_bad,
            check_trailers=_check_trailers,
            eof_message="Client disconnected before the end of the chunked body.",
            max_head=max_head,
            max_body=max_body,
            trailer_status=431,
        )

    def receive_data(self, data: bytes) -> None:
        """Add bytes read from the connection; ``b""`` means the client closed it."""
        if not data:
            self._eof = True
        elif self._eof:
            raise LocalProtocolError("Data was fed to the parser after the end of the stream.")
        else:
            self._buf += data

    @property
    def expects_continue(self) -> bool:
        """Whether the client waits for ``100 Continue`` before sending the body it announced."""
        head = self._head
        return (
            head is not None
            and head.expect_continue
            and self._state != _HEAD
            and self._state < _CLOSED
            and not self._buf
            and not self._body
        )

    @property
    def phase(self) -> Phase:
        """What the connection waits for: ``IDLE`` (nothing of the next request yet), ``HEAD``
        (part of a head), ``BODY`` (the rest of a body), or ``CLOSING`` (nothing more will
        be read: after a request that was not keep-alive, or an error)."""
        state = self._state
        if state == _HEAD:
            return Phase.HEAD if self._buf else Phase.IDLE
        return Phase.BODY if state < _CLOSED else Phase.CLOSING

    @property
    def at_eof(self) -> bool:
        """Whether the client closed its side (``receive_data(b"")`` was called)."""
        return self._eof

    def next_request(self) -> Request | None:
        """The next complete request, or ``None`` if more bytes are needed (or none can follow).

        Raises :class:`RemoteProtocolError` (with ``error_status_hint``) on malformed input, on
        a head or body over the bounds, or when the client closed the connection mid-request.
        """
        try:
            state = self._state
            if state == _HEAD:
                if not self._buf and not self._eof:
                    return None  # the common idle case, without scanning
                if not self._read_head():
                    return None
                state = self._state
            if state == _LENGTH:
                remaining = self._remaining
                buf = self._buf
                if len(buf) < remaining:
                    if self._eof:
                        raise _bad(
                            "Client disconnected before sending the whole body "
                            f"({len(buf)} of {remaining} bytes)."
                        )
                    return None
                body = bytes(buf[:remaining])
                del buf[:remaining]
            elif state < _CLOSED:
                if not self._read_chunked():
                    return None
                body = bytes(self._body)
                self._body.clear()
            elif state == _CLOSED:
                return None
            else:
                raise _bad("The connection already failed to parse; close it.")
            return self._finish(body)
        except RemoteProtocolError:
            self._state = _ERROR
            raise

    def _read_head(self) -> bool:
        buf = self._buf
        last = self._last
        head = self._match(buf, last) if last is not None else None
        self.reused_head = head is not None
        if head is None:
            if buf and buf[0] < 0x21:
                raise _bad("Illegal request line: it starts with a control byte or whitespace.")
            text_end, head_end = _find_blank_line(buf, self._scan)
            if head_end < 0 or text_end > self._max_head:
                if len(buf) > self._max_head:
                    raise _bad(f"Request head is larger than {self._max_head} bytes.", 431)
                if self._eof and buf:
                    raise _bad("Client disconnected before the request head was complete.")
                self._scan = max(0, len(buf) - 2)
                return False
            whole = bytes(buf[:head_end])
            del buf[:head_end]
            self._scan = 0
            lines = split_head(whole[:text_end], "Request")
            method, target, version = _parse_request_line(lines[0])
            head = _Head(method, target, version, [])
            head.headers = _parse_fields(lines[1:], head)
            self._last = _remember(whole, text_end, head)
        if head.chunked:
            self._chunked.reset()
            self._state = _CHUNKED
        else:
            if head.content_length > self._max_body:
                raise _bad(f"Request body is larger than {self._max_body} bytes.", 413)
            self._remaining = head.content_length
            self._state = _LENGTH
        self._head = head
        return True

    def _match(self, buf: bytearray, last: _Last) -> _Head | None:
        """The parse of the head at the start of ``buf`` (which is then consumed) when it is
        the remembered one with other ``Content-Length`` digits; else ``None``.

        The bytes around the digits are the remembered ones, so a full parse would find the
        same blank line (digits hold no line break) and read the same fields; the digits are
        checked as a full parse checks them, and the head bound as a full parse applies it.
        """
        prefix = last.prefix
        if not buf.startswith(prefix):
            return None
        tail = last.tail
        start = len(prefix)
        end = buf.find(tail, start + 1, start + MAX_LENGTH_DIGITS + len(tail))
        if end < 0:
            return None
        digits = bytes(buf[start:end])
        head_end = end + len(tail)
        if not digits.isdigit() or head_end - last.blank > self._max_head:
            return None
        del buf[:head_end]
        self._scan = 0
        head = last.head
        headers = head.headers.copy()
        headers[last.index] = (headers[last.index][0], digits)
        return _Head(
            head.method,
            head.target,
            head.version,
            headers,
            int(digits),
            False,
            head.keep_alive,
            head.expect_continue,
        )

    def _read_chunked(self) -> bool:
        return self._chunked.read(self._buf, self._take_body, self._eof)

    def _take_body(self, n: int) -> None:
        buf = self._buf
        self._body += buf[:n]
        del buf[:n]

    def _finish(self, body: bytes) -> Request:
        head = self._head
        assert head is not None
        self._head = None
        self._state = _HEAD if head.keep_alive else _CLOSED
        return Request(head.method, head.target, head.headers, body, head.version, head.keep_alive)
