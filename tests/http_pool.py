"""A keep-alive driver of :class:`ClientConnection` over anyio, for the tests only.

The product's keep-alive client is the dispatch engine's epoll loop; these tests check the
same :class:`ClientConnection` decisions (reuse, retry after a broken reused connection,
framing) over real sockets with a few lines of anyio around :func:`exchange`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import anyio
import anyio.abc

from supervisor.http._framing import TCHAR
from supervisor.http._rawsock import RawSocket
from supervisor.http.client import WriteFailed, _authority, _check_header, exchange, open_connection
from supervisor.http.connection import ClientConnection, idle_socket_alive
from supervisor.http.errors import ConnectError, LocalProtocolError
from supervisor.http.response import Response

__all__ = ["ConnectionPool"]


class _Connection:
    """One pooled TCP connection: its socket, its protocol state and the port it goes to."""

    __slots__ = ("conn", "port", "sock")

    def __init__(self, sock: RawSocket, port: int, keep_body: int | None) -> None:
        self.sock = sock
        self.conn = ClientConnection(keep_body=keep_body)
        self.port = port

    @classmethod
    async def open(cls, host: str, port: int, keep_body: int | None) -> _Connection:
        return cls(await open_connection(host, port), port, keep_body)

    def is_reusable(self) -> bool:
        """Whether the idle connection is still usable and its socket open and silent."""
        return self.conn.reusable and idle_socket_alive(self.sock.sock)

    def close(self) -> None:
        self.conn.close()
        self.sock.close()


class ConnectionPool(anyio.abc.AsyncResource):
    """Up to ``max_connections`` keep-alive connections to one target.

    ``port`` may be a callable read before each request (the port owner may change); idle
    connections to another port are dropped. ``keep_body=None`` keeps whole response bodies.
    """

    def __init__(
        self,
        host: str,
        port: int | Callable[[], int | None],
        *,
        max_connections: int = 64,
        keep_body: int | None = None,
    ) -> None:
        self._host = host
        self._port: Callable[[], int | None] = port if callable(port) else (lambda: port)
        self._keep_body = keep_body
        self._idle: list[_Connection] = []
        self._limiter = anyio.Semaphore(max_connections)
        self._closed = False

    @property
    def idle_connections(self) -> int:
        """How many connections wait in the pool for reuse."""
        return len(self._idle)

    async def request(
        self,
        method: bytes,
        target: bytes,
        headers: Sequence[tuple[bytes, bytes]] = (),
        body: bytes = b"",
    ) -> Response:
        """Send one request and return its response.

        ``headers`` are written in order, as given; ``Host`` is added first if missing and
        ``Content-Length`` last if missing (a given one must equal ``len(body)``);
        ``Transfer-Encoding`` is refused (bodies are always sent whole).
        """
        async with self._limiter:
            if self._closed:
                raise LocalProtocolError("ConnectionPool.request() was called after aclose().")
            port = self._port()
            if port is None:
                raise ConnectError("The target port is not known yet.")
            head = self._encode(method, target, headers, body, port)
            pooled = await self._checkout(port)
            head_request = method == b"HEAD"
            try:
                try:
                    out = pooled.conn.start(head, body, head_request=head_request)
                    response = await exchange(pooled.sock, pooled.conn, out)
                except WriteFailed as exc:
                    if not exc.retry:
                        raise
                    # The server closed the reused connection before the request arrived.
                    pooled.close()
                    pooled = await _Connection.open(self._host, port, self._keep_body)
                    out = pooled.conn.start(head, body, head_request=head_request)
                    response = await exchange(pooled.sock, pooled.conn, out)
            except BaseException:
                pooled.close()
                raise
            if pooled.conn.reusable and not self._closed:
                self._idle.append(pooled)
            else:
                pooled.close()
            return response

    def _encode(
        self,
        method: bytes,
        target: bytes,
        headers: Sequence[tuple[bytes, bytes]],
        body: bytes,
        port: int,
    ) -> bytes:
        if not method or method.translate(None, TCHAR):
            raise LocalProtocolError(f"Illegal request method {method[:50]!r}.")
        if not target or any(c <= 0x20 or c >= 0x7F for c in target):
            raise LocalProtocolError(f"Illegal request target {target[:100]!r}.")
        lines = [method + b" " + target + b" HTTP/1.1\r\n"]
        has_host = has_length = False
        for name, value in headers:
            _check_header(name, value)
            lower = name.lower()
            if lower == b"host":
                has_host = True
            elif lower == b"content-length":
                if not value.strip().isdigit() or int(value) != len(body):
                    raise LocalProtocolError(
                        f"Content-Length {value!r} does not match the body ({len(body)} bytes)."
                    )
                has_length = True
            elif lower == b"transfer-encoding":
                raise LocalProtocolError("Transfer-Encoding is not supported; send whole bodies.")
            lines.append(name + b": " + value + b"\r\n")
        if not has_host:
            lines.insert(1, f"Host: {_authority(self._host, port)}\r\n".encode("ascii"))
        if not has_length and (body or method not in (b"GET", b"HEAD")):
            lines.append(b"Content-Length: %d\r\n" % len(body))
        lines.append(b"\r\n")
        return b"".join(lines)

    async def _checkout(self, port: int) -> _Connection:
        idle = self._idle
        while idle:
            pooled = idle.pop()
            if pooled.port == port and pooled.is_reusable():
                return pooled
            pooled.close()
        return await _Connection.open(self._host, port, self._keep_body)

    async def aclose(self) -> None:
        """Close idle connections; connections in use are closed when their request ends."""
        self._closed = True
        idle, self._idle = self._idle, []
        for pooled in idle:
            pooled.close()
