"""The front of ``supervisor proxy``: forward batches to the port owner once it is ready.

Serve it with :func:`supervisor.http.relay.serve_relay` (``start_relay`` for a port of its own).

* ``POST /`` and ``POST /on-job-complete`` go to ``target_host:target_port()`` over keep-alive
  connections (at most ``pool_size``). The request body and the end-to-end headers pass
  unchanged (same names, values and order); the status, reason, end-to-end headers and body
  of the answer come back unchanged. Hop-by-hop headers (``Connection`` and the names it
  lists, ``Keep-Alive``, ``Proxy-*``, ``TE``, ``Trailer``, ``Transfer-Encoding``,
  ``Upgrade``) and ``Expect`` (the body was already read) are not forwarded; framing is
  recomputed on each side.
* Until ``is_ready()`` is true (or while the port is unknown) those requests get ``503`` with
  ``Retry-After`` and nothing reaches the target (the readiness gate of docs/container-contract.md).
* The target refusing or breaking the connection, or answering garbage: ``502``; no answer
  within ``upstream_timeout`` (if set): ``504``.
* ``GET /healthz`` is answered here (200 ``{"ready": true}`` / 503 ``{"ready": false}``),
  ``GET /status`` returns ``status()`` as JSON when given; other paths 404, other methods 405.

The forwarding itself is :mod:`~supervisor.http.relay`'s (``serve_relay(listener, app)``);
the header rules are :mod:`~supervisor.http._forward`'s. This module only decides, per
request, whether it is forwarded and where, or what is answered here.
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec

from supervisor.http.server import Request, Response, error_response, json_response

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
                return error_response(
                    503,
                    "The API is not ready yet; retry later.",
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
        return error_response(404, f"No route for {path}.")


def _method_not_allowed(allow: bytes) -> Response:
    return error_response(405, "Method not allowed.", headers=[(b"Allow", allow)])
