"""The proxy's forwarding core: one loop relays every client and upstream connection over a
single edge-triggered epoll set (Linux).

Theory of operation
-------------------
:func:`serve_relay` runs :class:`Relay` for a :class:`~supervisor.http.proxy.ProxyApp` on the
listening sockets of an anyio listener. The relay registers every client and upstream socket
once, edge triggered, and blocks in ``epoll_wait``. Each wake-up handles every ready socket:
``recv``, the sans-IO parser, ``send``. The upstream events of a wake-up are handled before
the client events, so a request never goes out on an idle connection that the same wake-up
reported closed.

Why a thread of its own (the loop runs in one, started with :func:`anyio.to_thread.run_sync`
and stopped through a pipe in the epoll set when the serving task is cancelled): driven from
the event loop instead (``anyio.wait_readable`` on the epoll fd, then ``poll(0)``), every
round pays a loop wake-up and, on uvloop, a register/unregister of that fd; the thread pays
one ``epoll_wait``. Measured with this relay, ``python -m bench --only proxy --quick
--no-install`` (worker (a), c=4; nginx absent), five alternating runs each: the thread
20.5k req/s, 0.29x direct (medians; 16-24k), the event-loop drive 11.0k req/s, 0.13x direct
(8.5-17k). The thread pays for itself about twice over, so it stays.

Only the forwarding decision runs in the relay's thread (:meth:`ProxyApp.forward_port`, which
reads ``is_ready`` and ``target_port``), and so do the local answers that need nothing else
(``/healthz``, 503s, 404s, 405s): a client hammering a pod that is not ready costs no more
than a forwarded request. ``/status`` (:meth:`ProxyApp.needs_event_loop`) and logging go to
the event loop's thread with :func:`anyio.from_thread.run_sync`, since that thread owns the
pod's state.

Client side: read, parse a whole request with :class:`~supervisor.http.request.RequestParser`
(names and values are validated there, so the upstream head is built without re-checking),
route it, and either answer at once or hand it to an upstream connection. One request per
client is in flight; pipelined requests wait in the parser's buffer and the client is not read
while an answer is still unsent (bounded memory). Reads stop after a short ``recv`` (the
kernel buffer was empty; the next byte brings an event), except once the client closed its
side (``EPOLLRDHUP``): its FIN may have come with the last bytes and brings no further edge,
so the client is read to its end, answered what it is owed and closed. Parse errors get
400/413/431/501 and a lingering close, encoded and drained by the server's own helpers
(:func:`~supervisor.http.server.error_answer`, :func:`~supervisor.http.server.drain`); a
failing ``accept`` backs off as in the server (:func:`~supervisor.http.server.accept_one`).

Client timeouts follow :mod:`~supervisor.http._timeouts`: a head or body that does not arrive
within ``read`` seconds gets 408 and a close, a keep-alive connection idle for ``idle`` seconds
is closed. Each client's phase is stamped with the clock read once per wake-up, and overdue
clients are looked for at most every ``Timeouts.sweep`` seconds: no syscall per request.

Upstream side: each upstream socket drives one sans-IO
:class:`~supervisor.http.connection.ClientConnection`, which decides when an answer ends (every
framing: ``Content-Length``, chunked, close-delimited, HTTP/1.0, ``Connection: close``),
whether the connection may carry another request, and whether a failed request may be sent
again (only when a reused connection broke while the request was being written). A read
whose wake-up reports the worker's side closed (``EPOLLRDHUP``) reads on to the end of the
stream and tells the connection (``peer_closing``), as the dispatch engine does: that ends a
close-delimited answer and keeps a connection the worker closed from being reused. An idle
connection that turns readable (closed by the worker, or stray bytes) is dropped when its
event comes: the epoll set is the relay's idle check. Answers are re-framed with
``Content-Length`` (:class:`~supervisor.http._forward.Answers`); an answer that repeats the
last one byte for byte is relayed with the bytes built for it, without a parse
(:mod:`~supervisor.http._relay_upstream`).

Modules: this one is the loop (the thread, the epoll set, timers);
:mod:`~supervisor.http._relay_client` is the client side, :mod:`~supervisor.http._relay_upstream`
the upstream side. The two sides share the loop's fd table, deadlines and epoll set, and are
wired to each other by one callable each way (``forward``, ``answer``).
"""

from __future__ import annotations

import ipaddress
import os
import select
import socket
import time
from collections.abc import Sequence

import anyio
import anyio.abc

from supervisor.http._relay_client import LISTEN, Client, ClientSide, log
from supervisor.http._relay_upstream import Upstream, UpstreamSide
from supervisor.http._timeouts import DEFAULT_TIMEOUTS, Timeouts
from supervisor.http.proxy import ProxyApp
from supervisor.http.request import MAX_BODY, MAX_HEAD
from supervisor.http.server import listening_sockets
from supervisor.logs import Logger

__all__ = ["Relay", "serve_relay", "start_relay"]


async def serve_relay(
    listener: anyio.abc.Listener[anyio.abc.SocketStream],
    app: ProxyApp,
    *,
    max_body: int = MAX_BODY,
    max_head: int = MAX_HEAD,
    logger: Logger | None = None,
    timeouts: Timeouts = DEFAULT_TIMEOUTS,
) -> None:
    """Serve ``app`` on every connection ``listener`` accepts, until cancelled."""
    sockets = listening_sockets(listener)
    await Relay(app, sockets, max_body, max_head, logger, timeouts).run()


async def start_relay(
    host: str,
    port: int,
    app: ProxyApp,
    *,
    max_body: int = MAX_BODY,
    max_head: int = MAX_HEAD,
    logger: Logger | None = None,
    timeouts: Timeouts = DEFAULT_TIMEOUTS,
    task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on ``host:port`` (0 picks a free port), report the bound port, relay forever."""
    listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
    async with listener:
        task_status.started(listener.extra(anyio.abc.SocketAttribute.local_port))
        await serve_relay(
            listener, app, max_body=max_body, max_head=max_head, logger=logger, timeouts=timeouts
        )


class Relay:
    """The forwarding core (see the module docstring)."""

    def __init__(
        self,
        app: ProxyApp,
        sockets: Sequence[socket.socket],
        max_body: int,
        max_head: int,
        logger: Logger | None,
        timeouts: Timeouts,
    ) -> None:
        self._logger = logger
        self._epoll = epoll = select.epoll()
        self._listeners = {sock.fileno(): sock for sock in sockets}
        self._objects: dict[int, object] = {}  # fd -> Client or Upstream
        self._deadlines: dict[object, float] = {}  # Upstream: 504; Client: linger; fd: accept
        version = ipaddress.ip_address(app.target_host).version  # an IP literal
        authority = (f"[{app.target_host}]" if version == 6 else app.target_host).encode("ascii")
        self._clients = clients = ClientSide(
            app,
            epoll,
            self._objects,
            self._deadlines,
            max_body=max_body,
            max_head=max_head,
            logger=logger,
            timeouts=timeouts,
            authority=authority,
        )
        family = socket.AF_INET6 if version == 6 else socket.AF_INET
        self._upstreams = upstreams = UpstreamSide(
            app, epoll, self._objects, self._deadlines, family
        )
        clients.forward = upstreams.forward
        upstreams.answer = clients.answer

    async def run(self) -> None:
        """Relay until cancelled: the loop runs in a thread of its own (see the module doc)."""
        wake_r, wake_w = os.pipe()
        try:
            async with anyio.create_task_group() as tg:

                async def stop_when_cancelled() -> None:
                    try:
                        await anyio.sleep_forever()
                    finally:
                        os.write(wake_w, b"x")  # the thread returns at its next wait

                tg.start_soon(stop_when_cancelled)
                await anyio.to_thread.run_sync(self._loop, wake_r, limiter=anyio.CapacityLimiter(1))
                tg.cancel_scope.cancel()
        finally:
            os.close(wake_r)
            os.close(wake_w)

    def _timeout(self) -> float:
        """How long the next wait may last (-1: until an event)."""
        clients = self._clients
        deadlines = self._deadlines
        if deadlines:
            nearest = min(deadlines.values())
            if clients.count:
                nearest = min(nearest, clients.next_sweep)
            return max(nearest - time.monotonic(), 0.0)
        if clients.count:
            return max(clients.next_sweep - clients.now, 0.0)
        return -1.0

    def _loop(self, wake: int) -> None:
        epoll = self._epoll
        try:
            for lfd in self._listeners:
                epoll.register(lfd, LISTEN)
            epoll.register(wake, select.EPOLLIN)
            while self._turn(epoll.poll(self._timeout()), wake):
                pass
        finally:
            self._close_all()

    def _close_all(self) -> None:
        for obj in list(self._objects.values()):
            if isinstance(obj, (Client, Upstream)):
                obj.sock.close()
        self._objects.clear()
        self._epoll.close()

    def _turn(self, ready: list[tuple[int, int]], wake: int) -> bool:
        """Handle the events of one wake-up; ``False`` when told to stop."""
        objects = self._objects
        clients = self._clients
        clients.now = now = time.monotonic()
        if self._deadlines:
            self._expire(now)
        later: list[tuple[Client, int]] = []
        for efd, events in ready:
            obj = objects.get(efd)
            if type(obj) is Upstream:
                try:
                    self._upstreams.event(obj, events)
                except Exception as exc:  # pragma: no cover - a bug must not stop the proxy
                    log(self._logger, "http_connection_failed", f"{type(exc).__name__}: {exc}")
                    self._upstreams.fail(obj, "internal error.")
            elif type(obj) is Client:
                later.append((obj, events))  # after the upstream events
            elif efd == wake:
                return False
            else:
                listener = self._listeners.get(efd)
                if listener is not None:
                    clients.accept(listener)
        for client, events in later:
            try:
                clients.event(client, events)
            except Exception as exc:  # pragma: no cover - a bug must not stop the proxy
                log(self._logger, "http_connection_failed", f"{type(exc).__name__}: {exc}")
                clients.close(client)
        # After the events: a client whose bytes just came is no longer idle.
        if clients.count and now >= clients.next_sweep:
            clients.sweep(now)
        return True

    def _expire(self, now: float) -> None:
        for key, deadline in list(self._deadlines.items()):
            if deadline > now:
                continue
            del self._deadlines[key]
            if isinstance(key, Upstream):
                self._upstreams.time_out(key)
            elif isinstance(key, Client):
                self._clients.close(key)
            elif isinstance(key, int):
                self._epoll.modify(key, LISTEN)
