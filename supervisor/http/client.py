"""HTTP/1.1 client calls over anyio: a one-shot request and the exchange loop it shares.

Theory of operation
-------------------
The protocol is :class:`~supervisor.http.connection.ClientConnection` (sans-IO: request bytes
out, responses in, the reuse and retry decisions); here it is driven over a non-blocking
socket (:mod:`._rawsock`) by one short loop, :func:`exchange`: write the request, read until a
response is complete. Every anyio client uses it:

* :func:`request` is a one-shot exchange with ``Connection: close`` and a deadline, for rare
  calls such as ``/on-job-complete``; the HTTP probe drives :func:`exchange` the same way.

The dispatch engine (:mod:`supervisor.dispatch.epoll`) drives the same ``ClientConnection``
from its own epoll loop (keep-alive, reuse and retry) and builds its heads with
:func:`post_head_prefix`. A cancelled exchange leaves its connection in an unknown state, so
its socket is closed, never reused.
"""

from __future__ import annotations

from collections.abc import Sequence

import anyio
import anyio.abc
import msgspec

from supervisor.http._framing import TCHAR
from supervisor.http._rawsock import RawSocket, connect
from supervisor.http.connection import ClientConnection, State
from supervisor.http.errors import (
    ConnectError,
    ConnectTimeout,
    LocalProtocolError,
    ReadError,
    ReadTimeout,
    RemoteProtocolError,
    WriteError,
    WriteTimeout,
)
from supervisor.http.response import Response

__all__ = [
    "Response",
    "WriteFailed",
    "exchange",
    "open_connection",
    "post_head_prefix",
    "request",
    "request_head",
]

_IO_ERRORS = (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)
_RECEIVE_SIZE = 65536
_FRAMING = (b"content-length", b"transfer-encoding")


def _authority(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _check_header(name: bytes, value: bytes) -> None:
    """Refuse header names that are not tokens and values that could inject lines."""
    if not name or name.translate(None, TCHAR):
        raise LocalProtocolError(f"Illegal header name {name[:100]!r}.")
    if b"\r" in value or b"\n" in value or b"\x00" in value:
        raise LocalProtocolError(f"Illegal header value {value[:100]!r} for {name!r}.")


def _encode_headers(headers: Sequence[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    out = []
    for name, value in headers:
        raw = (name.encode("ascii"), value.strip().encode("latin-1"))
        _check_header(*raw)
        out.append(raw)
    return out


class WriteFailed(WriteError):
    """A :class:`WriteError` that says whether the request may go again on a fresh connection
    (``ClientConnection.send_failed``)."""

    def __init__(self, message: str, retry: bool) -> None:
        super().__init__(message)
        self.retry = retry


async def open_connection(host: str, port: int) -> RawSocket:
    """A TCP connection to ``host:port``; :class:`ConnectError` if it cannot be made."""
    try:
        return await connect(host, port)
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise ConnectError(f"Could not connect to {_authority(host, port)}: {reason}.") from exc


async def exchange(
    sock: RawSocket,
    conn: ClientConnection,
    out: list[bytes],
    *,
    max_body: int | None = None,
) -> Response:
    """Write ``out`` (from ``conn.start()``) and read until ``conn`` has the response.

    Raises :class:`WriteFailed` (its ``retry`` says whether the request may go again on a
    fresh connection), :class:`ReadError`, or :class:`RemoteProtocolError` (malformed, cut
    short, or a body over ``max_body`` bytes); ``conn`` is ``CLOSED`` then. When cancelled,
    ``conn`` keeps the state it was in (``SENDING``: the request was not written whole) and
    the caller must close the connection.
    """
    try:
        for data in out:
            await sock.sendall(data)
    except _IO_ERRORS as exc:
        retry = conn.send_failed()
        raise WriteFailed("The connection broke while sending the request.", retry) from exc
    conn.request_sent()
    while True:
        try:
            data = await sock.recv(_RECEIVE_SIZE)
        except _IO_ERRORS as exc:
            conn.receive_failed()
            raise ReadError("The connection broke while reading the response.") from exc
        response = conn.receive(data)
        if response is not None:
            return response
        if max_body is not None and conn.body_received > max_body:
            conn.receive_failed()
            raise RemoteProtocolError(f"Response body is larger than {max_body} bytes.")


def _check_path(path: str) -> None:
    if not path.startswith("/") or any(c <= " " or c > "~" for c in path):
        raise LocalProtocolError(f"Illegal request path {path!r}.")


def request_head(
    method: str,
    host: str,
    port: int,
    path: str = "/",
    headers: Sequence[tuple[str, str]] = (),
) -> bytes:
    """``{method} {path} HTTP/1.1``, ``Host`` (unless given), then ``headers`` in order: a
    request head without the blank line; callers add framing (``Content-Length``) if any."""
    _check_path(path)
    if not method or method.encode("ascii").translate(None, TCHAR):
        raise LocalProtocolError(f"Illegal request method {method[:50]!r}.")
    encoded = _encode_headers(headers)
    lines = [f"{method} {path} HTTP/1.1\r\n".encode("ascii")]
    if not any(name.lower() == b"host" for name, _ in encoded):
        lines.append(f"Host: {_authority(host, port)}\r\n".encode("ascii"))
    for name, value in encoded:
        if name.lower() in _FRAMING:
            raise LocalProtocolError(f"{name.decode()} is set by the client, not by the caller.")
        lines.append(name + b": " + value + b"\r\n")
    return b"".join(lines)


def post_head_prefix(
    host: str, port: int, path: str = "/", headers: Sequence[tuple[str, str]] = ()
) -> bytes:
    """``POST {path} HTTP/1.1``, ``Host`` (unless given), then ``headers`` in order: a request
    head without its framing (``Content-Length``) and the blank line, built once per client
    (``ClientConnection.start_post`` completes it)."""
    return request_head("POST", host, port, path, headers)


async def request(
    host: str,
    port: int,
    method: str,
    target: str,
    *,
    headers: Sequence[tuple[str, str]] = (),
    body: bytes = b"",
    timeout: float = 10.0,  # noqa: ASYNC109 - a one-shot call with its own deadline (documented)
    max_body: int = 64 * 1024 * 1024,
) -> Response:
    """One request over a fresh connection with ``Connection: close``; whole body kept.

    The whole exchange must finish within ``timeout`` seconds (``ConnectTimeout``,
    ``WriteTimeout`` or ``ReadTimeout`` otherwise); a body over ``max_body`` bytes raises
    ``RemoteProtocolError``.
    """
    authority = _authority(host, port)
    names = {name.lower() for name, _ in headers}
    if names & {"content-length", "transfer-encoding", "connection"}:
        raise LocalProtocolError(
            "Content-Length, Transfer-Encoding and Connection are set by request()."
        )
    head = request_head(method, host, port, target, headers)
    if body or method not in ("GET", "HEAD"):
        head += b"Content-Length: %d\r\n" % len(body)
    head += b"Connection: close\r\n\r\n"
    conn = ClientConnection(keep_body=None)
    out = conn.start(head, body, head_request=method == "HEAD")
    sock: RawSocket | None = None
    try:
        with anyio.fail_after(timeout):
            sock = await open_connection(host, port)
            response = await exchange(sock, conn, out, max_body=max_body)
    except TimeoutError as exc:
        if sock is None:
            raise ConnectTimeout(f"Could not connect to {authority} within {timeout:g} s.") from exc
        if conn.state is State.SENDING:
            raise WriteTimeout(
                f"Could not send the request to {authority} within {timeout:g} s."
            ) from exc
        raise ReadTimeout(f"No complete response from {authority} within {timeout:g} s.") from exc
    finally:
        if sock is not None:
            sock.close()
    if response.body_length > max_body:
        raise RemoteProtocolError(f"Response body is larger than {max_body} bytes.")
    return msgspec.structs.replace(response, keep_alive=False)
