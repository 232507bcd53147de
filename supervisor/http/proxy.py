"""The front of ``supervisor proxy``: forward batches to the port owner once it is ready.

Run it with ``start_server(host, port, app.handle)`` (or ``serve(listener, app.handle)``) and
``await app.aclose()`` at the end.

* ``POST /`` and ``POST /on-job-complete`` go to ``target_host:target_port()`` over keep-alive
  connections (at most ``pool_size``). The request body and the end-to-end headers pass
  unchanged (same names, values and order); the status, reason, end-to-end headers and body
  of the answer come back unchanged. Hop-by-hop headers (``Connection`` and the names it
  lists, ``Keep-Alive``, ``Proxy-*``, ``TE``, ``Trailer``, ``Transfer-Encoding``,
  ``Upgrade``) and ``Expect`` (the body was already read) are not forwarded; framing is
  recomputed on each side.
* Until ``is_ready()`` is true (or while the port is unknown) those requests get ``503`` with
  ``Retry-After`` and nothing reaches the target (SPEC §3 gating).
* The target refusing or breaking the connection, or answering garbage: ``502``; no answer
  within ``upstream_timeout`` (if set): ``504``.
* ``GET /healthz`` is answered here (200 ``{"ready": true}`` / 503 ``{"ready": false}``),
  ``GET /status`` returns ``status()`` as JSON when given; other paths 404, other methods 405.

Theory of operation: the forwarding core
----------------------------------------
``app.handle`` is a server :data:`~supervisor.http.server.Handler` that also has a
``serve_sockets`` method, which :func:`~supervisor.http.server.serve` prefers. Where
``select.epoll`` exists and the target host is an IP literal, that method runs
:class:`Relay`: **one loop in a thread of its own** that registers every client and upstream
socket once, edge triggered, in its own epoll set and blocks in ``epoll_wait`` (the thread is
started with :func:`anyio.to_thread.run_sync` and stopped through a pipe in the same set when
the serving task is cancelled, on asyncio, uvloop and trio alike). Each wake-up handles every
ready socket: ``recv``, the sans-IO request or response parser, ``send``. Measured in issue 3:
a task per connection pays the event loop's register/unregister for every wait -- two per
forwarded request -- which halves throughput; one task waiting on the epoll set through the
event loop still pays a loop wake-up and a register/unregister per round (~25% of the
proxy's time at c=4); the thread pays one ``epoll_wait``. Only the forwarding decision runs in
that thread (:meth:`ProxyApp.forward_port`, which reads ``is_ready`` and ``target_port``),
and so do the local answers that need nothing else (``/healthz``, 503s, 404s, 405s): a client
hammering a pod that is not ready yet costs the relay no more than a forwarded request (503s
at c=16: 31k/s and 18 us of CPU each; 13.6k/s and 57 us through the event loop). ``/status``
(:meth:`ProxyApp.needs_event_loop`) and logging go to the event loop's thread with
:func:`anyio.from_thread.run_sync`, since that thread owns the pod's state.

Per client connection: read, parse a whole request with
:class:`~supervisor.http.request.RequestParser` (its names and values are validated there,
so the upstream head is built without re-checking), route it synchronously (:meth:`ProxyApp.
route`), and either answer at once or write the head and body to an idle upstream connection
(or a new one, non-blocking ``connect``). The response is read with the fast
:class:`~supervisor.http.response.ResponseParser` and re-framed with ``Content-Length``; a
worker answers the same bytes again and again (the batch contract ignores the body), so a
read that arrives whole on an idle connection and equals the last such read is given the
bytes built for it, unparsed (keep-alive clients only: the framing depends on the client).
One request per client is in flight; pipelined requests wait in the parser's buffer and the
client is not read while an answer is still unsent (bounded memory). Edge-triggered reads
stop after a short ``recv`` (the kernel buffer was empty; the next byte brings an event),
except once the client closed its side (``EPOLLRDHUP``): its FIN may have come with the last
bytes and brings no further edge, so the client is read to its end, answered what it is owed
(a whole request still gets its answer, a cut one 400) and closed.

Client timeouts follow :mod:`~supervisor.http._timeouts` on both paths (the server's
``timeouts`` setting, passed to ``serve_sockets``): a head or body that does not arrive within
``read`` seconds gets 408 and a close, a keep-alive connection idle for ``idle`` seconds is
closed. The relay stamps each client's phase with the clock it reads once per wake-up and
looks for overdue clients at most every ``Timeouts.sweep`` seconds (its ``epoll_wait`` never
sleeps past the next look while clients are connected): no syscall per request.

Upstream reuse follows :mod:`~supervisor.http.client`'s rule: an idle connection that turns
readable (closed by the server, or unsolicited bytes) is dropped at once; a request is retried
on a fresh connection only when a reused one failed while the request was being written.
Parse errors get 400/413/431/501 with ``Connection: close`` and a lingering close, as in the
server. Elsewhere (no epoll, a host name) ``serve_sockets`` falls back to the generic server
with :class:`~supervisor.http.client.ConnectionPool`; both paths share the routing and the
header rules and are tested alike.
"""

from __future__ import annotations

import ipaddress
import select
import socket
from collections.abc import Callable, Sequence

import anyio
import msgspec

from supervisor.http._timeouts import DEFAULT_TIMEOUTS, Timeouts
from supervisor.http.client import ConnectionPool
from supervisor.http.errors import HTTPError, LocalProtocolError
from supervisor.http.relay import (
    TIMED_OUT,
    TOO_LARGE,
    Relay,
    end_to_end,
    unreachable,
)
from supervisor.http.request import MAX_BODY, MAX_HEAD
from supervisor.http.server import (
    Request,
    Response,
    json_response,
    serve_sockets,
)
from supervisor.logs import Logger

__all__ = ["ProxyApp"]

_FORWARDED_PATHS = frozenset({"/", "/on-job-complete"})


class ProxyApp:
    """Forwards batch traffic to the port owner; answers health and status itself.

    ``is_ready`` and ``target_port`` are also called from the forwarding core's thread, for
    every forwarded request and every local answer but ``/status``: they must be cheap reads
    of plain attributes (as ``Pod.serving`` and ``Pod.port`` are). ``status`` runs on the
    event loop's thread only.
    """

    def __init__(
        self,
        *,
        target_host: str,
        target_port: Callable[[], int | None] | int,
        is_ready: Callable[[], bool],
        status: Callable[[], object] | None = None,
        pool_size: int = 64,
        retry_after: int = 1,
        upstream_timeout: float | None = None,
        max_response_body: int = 64 * 1024 * 1024,
    ) -> None:
        self.target_host = target_host
        self.target_port: Callable[[], int | None] = (
            target_port if callable(target_port) else (lambda: target_port)
        )
        """The port to forward to, or ``None`` while it is not known."""
        self._is_ready = is_ready
        self._status = status
        self._retry_after = b"%d" % retry_after
        self.upstream_timeout = upstream_timeout
        self.pool_size = pool_size
        self.max_response_body = max_response_body
        self._pool = ConnectionPool(
            target_host, self.target_port, max_connections=pool_size, keep_body=max_response_body
        )
        self.handle = _ProxyHandler(self)
        """The server handler (use with ``serve``/``start_server``)."""

    def forward_port(self, request: Request) -> int | None:
        """The port to forward ``request`` to right now, or ``None``: :meth:`route` answers.

        The forwarding core calls this from its own thread, so it only calls ``is_ready``
        and ``target_port``, which must be cheap reads.
        """
        if request.method == "POST" and request.path in _FORWARDED_PATHS and self._is_ready():
            return self.target_port()
        return None

    def needs_event_loop(self, request: Request) -> bool:
        """Whether :meth:`route` must run on the event loop's thread for ``request``: it
        calls ``status`` (anything else it reads is ``is_ready`` and ``target_port``)."""
        return self._status is not None and request.path == "/status"

    def route(self, request: Request) -> Response | None:
        """The answer given here, or ``None`` when the request is to be forwarded."""
        path = request.path
        method = request.method
        if path in _FORWARDED_PATHS:
            if method != "POST":
                return _method_not_allowed(b"POST")
            if not self._is_ready() or self.target_port() is None:
                return json_response(
                    503,
                    {"error": "The API is not ready yet; retry later."},
                    headers=[(b"Retry-After", self._retry_after)],
                )
            return None
        if path == "/healthz":
            if method not in ("GET", "HEAD"):
                return _method_not_allowed(b"GET, HEAD")
            ready = self._is_ready()
            return json_response(200 if ready else 503, {"ready": ready})
        if path == "/status" and self._status is not None:
            if method not in ("GET", "HEAD"):
                return _method_not_allowed(b"GET, HEAD")
            return Response(
                200, [(b"Content-Type", b"application/json")], msgspec.json.encode(self._status())
            )
        return json_response(404, {"error": f"No route for {path}."})

    async def _handle(self, request: Request) -> Response:
        """The generic path: route, or forward through the :class:`ConnectionPool`."""
        answer = self.route(request)
        if answer is not None:
            return answer
        headers = end_to_end(request.headers, drop=(b"content-length",))  # goes last
        target = request.target.encode("ascii")
        try:
            if self.upstream_timeout is None:
                upstream = await self._pool.request(b"POST", target, headers, request.body)
            else:
                with anyio.fail_after(self.upstream_timeout):
                    upstream = await self._pool.request(b"POST", target, headers, request.body)
        except TimeoutError:
            return TIMED_OUT
        except LocalProtocolError:
            raise
        except HTTPError as exc:
            return unreachable(str(exc))
        if upstream.body_truncated:
            return TOO_LARGE
        return Response(
            upstream.status,
            end_to_end(upstream.headers, drop=(b"content-length",)),
            upstream.body_head,
            upstream.reason,
        )

    async def aclose(self) -> None:
        """Close the idle upstream connections of the generic path."""
        await self._pool.aclose()


class _ProxyHandler:
    """``ProxyApp.handle``: a server handler that prefers to drive the sockets itself."""

    __slots__ = ("_app",)

    def __init__(self, app: ProxyApp) -> None:
        self._app = app

    async def __call__(self, request: Request) -> Response:
        return await self._app._handle(request)

    async def serve_sockets(
        self,
        sockets: Sequence[socket.socket],
        *,
        max_body: int = MAX_BODY,
        max_head: int = MAX_HEAD,
        logger: Logger | None = None,
        timeouts: Timeouts = DEFAULT_TIMEOUTS,
    ) -> None:
        """Serve the listening ``sockets``: the forwarding core, or the generic server."""
        app = self._app
        try:
            ipaddress.ip_address(app.target_host)
        except ValueError:
            literal = False
        else:
            literal = True
        if not literal or not hasattr(select, "epoll"):
            await serve_sockets(
                sockets,
                app._handle,
                max_body=max_body,
                max_head=max_head,
                logger=logger,
                timeouts=timeouts,
            )
            return
        relay = Relay(app, sockets, max_body, max_head, logger, timeouts)
        await relay.run()


def _method_not_allowed(allow: bytes) -> Response:
    return json_response(405, {"error": "Method not allowed."}, headers=[(b"Allow", allow)])
