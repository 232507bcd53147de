"""Non-blocking sockets driven directly: the I/O under the HTTP hot paths.

Theory of operation
-------------------
anyio's socket streams cost a loop round trip per ``send`` (a checkpoint) and a few layers
per ``receive``. On the hot paths we instead own a plain non-blocking ``socket.socket`` and
call ``send``/``recv`` on it directly; only when the kernel says ``EAGAIN`` do we park the task
with :func:`anyio.wait_writable` / :func:`anyio.wait_readable`, which work on asyncio (also
uvloop) and trio alike. A small request and its answer thus cost one ``send`` syscall and one
wait for readability, with no extra trip through the event loop.

Cancellation: a wait may be cancelled; bytes already handed to the kernel stay sent, so the
caller must treat a cancelled exchange as leaving the connection in an unknown state and
close it (the clients and the server do). :meth:`RawSocket.close` calls
:func:`anyio.notify_closing` first, as trio requires.

:func:`connect` opens a TCP connection without an anyio stream (whose transport would own the
file descriptor on asyncio); errors are plain ``OSError`` for the caller to translate.
"""

from __future__ import annotations

import ipaddress
import os
import socket

import anyio

__all__ = ["RawSocket", "connect"]


class RawSocket:
    """A connected non-blocking socket with awaitable ``recv``/``sendall``."""

    __slots__ = ("sock",)

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock

    async def recv(self, size: int) -> bytes:
        """At least one byte, or ``b""`` at end of stream; ``OSError`` if the socket broke."""
        sock = self.sock
        while True:
            try:
                return sock.recv(size)
            except (BlockingIOError, InterruptedError):
                await anyio.wait_readable(sock)

    async def sendall(self, data: bytes) -> None:
        """Write all of ``data``, waiting for room when the kernel buffer is full."""
        sock = self.sock
        try:
            sent = sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        if sent == len(data):
            return
        view = memoryview(data)[sent:]
        while view:
            try:
                sent = sock.send(view)
            except (BlockingIOError, InterruptedError):
                await anyio.wait_writable(sock)
                continue
            view = view[sent:]

    def shutdown_write(self) -> None:
        """Send FIN (no more data from us); errors are ignored."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        """Close the socket now (waking any task waiting on it)."""
        sock = self.sock
        if sock.fileno() >= 0:
            anyio.notify_closing(sock)
            sock.close()


async def connect(host: str, port: int) -> RawSocket:
    """A TCP connection to ``host:port`` (``TCP_NODELAY`` set); ``OSError`` if refused."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        targets = [(info[0], info[4][:2]) for info in infos]
    else:
        targets = [(family, (host, port))]
    error: OSError = OSError(f"no address for {host}")
    for family, address in targets:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                sock.connect(address)
            except BlockingIOError:
                await anyio.wait_writable(sock)
                code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code:
                    raise OSError(code, os.strerror(code)) from None
            return RawSocket(sock)
        except OSError as exc:
            RawSocket(sock).close()
            error = exc
        except BaseException:
            RawSocket(sock).close()
            raise
    raise error
