"""The proxy's header rules: what goes upstream, what comes back to the client.

A forwarded request keeps its target, its end-to-end headers (same names, values and order)
and its body; a ``Host`` naming the target is added when the client sent none, and
``Content-Length`` goes last, recomputed (a chunked body arrives whole). An answer keeps its
status, reason, end-to-end headers and body, re-framed with ``Content-Length``. Hop-by-hop
headers (``Connection`` and the names it lists, ``Keep-Alive``, ``Proxy-*``, ``TE``,
``Trailer``, ``Transfer-Encoding``, ``Upgrade``) and ``Expect`` (the body was already read) are
not forwarded either way.

Both rewriters reuse their last result when the input repeats (a client sends the same head
again and again, a worker answers the same way), so the common case builds nothing.
"""

from __future__ import annotations

from supervisor.http.response import Response as Upstream
from supervisor.http.server import Request, Response, error_response, status_line

__all__ = ["HOP_BY_HOP", "TIMED_OUT", "TOO_LARGE", "Answers", "unreachable", "upstream_head"]

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"expect",
    }
)


def connection_tokens(headers: list[tuple[bytes, bytes]]) -> set[bytes]:
    """The lowercased header names listed in ``Connection`` headers."""
    named: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            named.update(token.strip().lower() for token in value.split(b","))
    return named


def upstream_head(request: Request, authority: bytes) -> bytes:
    """The upstream head without its framing: ``Content-Length`` and the blank line follow.

    The request parser already validated names and values, so nothing is checked again.
    """
    lines = [b"POST %b HTTP/1.1\r\n" % request.target.encode("ascii")]
    has_host = False
    connection = False
    for name, value in request.headers:
        lower = name.lower()
        if lower in HOP_BY_HOP:
            connection = connection or lower == b"connection"
            continue
        if lower[:6] == b"proxy-" or lower == b"content-length":
            continue
        if lower == b"host":
            has_host = True
        lines.append(b"%b: %b\r\n" % (name, value))
    if connection:  # rare: drop the names listed in Connection too
        named = connection_tokens(request.headers)
        lines[1:] = [line for line in lines[1:] if line.partition(b":")[0].lower() not in named]
    if not has_host:
        lines.insert(1, b"Host: %b\r\n" % authority)
    return b"".join(lines)


class Answers:
    """Re-frames upstream responses for the client (``Content-Length``, hop-by-hop dropped).

    The head before the framing is a function of the status, reason and headers, and a worker
    answers with the same ones again and again: the last one built is reused when they match.
    """

    __slots__ = ("_headers", "_prefix", "_reason", "_status")

    def __init__(self) -> None:
        self._status = 0
        self._reason = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._prefix = b""

    def encode(self, upstream: Upstream, keep_alive: bool) -> bytes:
        status = upstream.status
        headers = upstream.headers  # lowercased names, validated by the parser
        if status != self._status or upstream.reason != self._reason or headers != self._headers:
            self._prefix = _client_head(status, upstream.reason, headers)
            self._status = status
            self._reason = upstream.reason
            self._headers = headers
        body = upstream.body_head
        if status == 204 or status == 304:
            framing = b"" if keep_alive else b"Connection: close\r\n"
            return b"%b%b\r\n" % (self._prefix, framing)
        if keep_alive:
            return b"%bContent-Length: %d\r\n\r\n%b" % (self._prefix, len(body), body)
        return b"%bContent-Length: %d\r\nConnection: close\r\n\r\n%b" % (
            self._prefix,
            len(body),
            body,
        )


def _client_head(status: int, reason: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    """The status line and end-to-end headers of an answer, without its framing."""
    named: set[bytes] | frozenset[bytes] = frozenset()
    for name, _ in headers:
        if name == b"connection":
            named = connection_tokens(headers)
            break
    parts = [status_line(status, reason)]
    for name, value in headers:
        if (
            name in HOP_BY_HOP
            or name == b"content-length"
            or name[:6] == b"proxy-"
            or name in named
        ):
            continue
        parts.append(b"%b: %b\r\n" % (name, value))
    return b"".join(parts)


def unreachable(reason: str) -> Response:
    """The 502 a client gets when the target refused, broke or garbled the exchange."""
    return error_response(502, f"The API could not be reached: {reason}")


TIMED_OUT = error_response(504, "The API did not answer in time.")
TOO_LARGE = error_response(502, "The API's response body is too large.")
