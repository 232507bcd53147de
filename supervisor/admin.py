"""The admin endpoints every long-running command serves: health, status and metrics.

:class:`Admin` answers ``GET /healthz``, ``GET /status`` and ``GET /metrics`` from three
things its owner hands it: a readiness function, a status function and (optionally) a
:class:`~supervisor.metrics.Metrics`. :meth:`Admin.route` answers those paths and returns
``None`` for every other one, so a command with a listener of its own (``serve``'s job API,
``proxy``'s front) tries it first and routes the rest itself. :func:`serve_admin` gives a
command without such a listener (``run --admin HOST:PORT``) one that serves only these
routes.

* ``/healthz``: 200 ``{"ready": true}`` when ``ready()`` says so, else 503
  ``{"ready": false}`` (a load balancer or a Kubernetes probe reads the status alone).
* ``/status``: 200 and the JSON of ``status()`` (which must return JSON-able data).
* ``/metrics``: 200 and the Prometheus text format; 404 when metrics are off.

``HEAD`` is answered as ``GET`` (without the body); any other method gets 405 with an
``Allow`` header.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import anyio
import anyio.abc

from supervisor.http.server import Request, Response, error_body, json_response, start_server
from supervisor.logs import Logger
from supervisor.metrics import CONTENT_TYPE, Metrics

__all__ = ["ADMIN_PATHS", "Admin", "serve_admin"]

ADMIN_PATHS = frozenset({"/healthz", "/status", "/metrics"})
"""The paths :meth:`Admin.route` answers."""

_METHODS = frozenset({"GET", "HEAD"})
_NOT_ALLOWED = json_response(
    405, error_body(405, "Method not allowed: use GET."), headers=[(b"Allow", b"GET, HEAD")]
)
_READY = json_response(200, {"ready": True})
_NOT_READY = json_response(503, {"ready": False})
_NO_METRICS = json_response(404, error_body(404, "Metrics are not enabled on this listener."))
_NOT_FOUND = json_response(
    404, error_body(404, "Not found: this listener serves " + ", ".join(sorted(ADMIN_PATHS)) + ".")
)
_METRICS_HEADERS = [(b"Content-Type", CONTENT_TYPE.encode("ascii"))]


class Admin:
    """The admin routes of one command, over what the command knows of itself."""

    def __init__(
        self,
        ready: Callable[[], bool],
        status: Callable[[], Mapping[str, Any]],
        metrics: Metrics | None = None,
        refresh: Callable[[], Awaitable[None] | None] | None = None,
    ) -> None:
        """``refresh`` runs (and is awaited, if async) before each scrape: the command sets
        its gauges from live state."""
        self._ready = ready
        self._status = status
        self._metrics = metrics
        self._refresh = refresh

    async def route(self, request: Request) -> Response | None:
        """The answer to an admin request, or ``None`` when the path is not an admin one."""
        path = request.path
        if path not in ADMIN_PATHS:
            return None
        if request.method not in _METHODS:
            return _NOT_ALLOWED
        if path == "/healthz":
            return _READY if self._ready() else _NOT_READY
        if path == "/status":
            return json_response(200, dict(self._status()))
        if self._metrics is None:
            return _NO_METRICS
        if self._refresh is not None:
            pending = self._refresh()
            if pending is not None:
                await pending
        return Response(200, _METRICS_HEADERS, self._metrics.render())

    async def handle(self, request: Request) -> Response:
        """A server handler answering the admin routes, and 404 for anything else."""
        response = await self.route(request)
        return _NOT_FOUND if response is None else response


async def serve_admin(
    host: str,
    port: int,
    admin: Admin,
    *,
    logger: Logger | None = None,
    task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve only the admin routes on ``host:port`` (0 picks a free port) until cancelled.

    Use ``port = await task_group.start(serve_admin, host, port, admin)``; the bound port is
    also logged (``admin_listening``).
    """
    async with anyio.create_task_group() as tg:
        bound: int = await tg.start(
            functools.partial(start_server, host, port, admin.handle, logger=logger)
        )
        if logger is not None:
            logger.info("admin_listening", host=host, port=bound)
        task_status.started(bound)
