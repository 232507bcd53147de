"""The front of ``supervisor proxy``: forward batches to the port owner once it is ready.

``ProxyApp.handle`` is a :data:`~supervisor.http.server.Handler`; run it with
``start_server(host, port, app.handle)`` and ``await app.aclose()`` at the end.

* ``POST /`` and ``POST /on-job-complete`` go to ``target_host:target_port()`` over a
  keep-alive :class:`~supervisor.http.client.ConnectionPool`. The request body and the
  end-to-end headers pass unchanged (same names, values and order); the status, reason,
  end-to-end headers and body of the answer come back unchanged. Hop-by-hop headers
  (``Connection`` and the names it lists, ``Keep-Alive``, ``Proxy-*``, ``TE``, ``Trailer``,
  ``Transfer-Encoding``, ``Upgrade``) and ``Expect`` (the body was already read) are not
  forwarded; framing is recomputed on each side.
* Until ``is_ready()`` is true (or while the port is unknown) those requests get ``503`` with
  ``Retry-After`` and nothing reaches the target (SPEC §3 gating).
* The target refusing or breaking the connection, or answering garbage: ``502``; no answer
  within ``upstream_timeout`` (if set): ``504``.
* ``GET /healthz`` is answered here (200 ``{"ready": true}`` / 503 ``{"ready": false}``),
  ``GET /status`` returns ``status()`` as JSON when given; other paths 404, other methods 405.
"""

from __future__ import annotations

from collections.abc import Callable

import anyio
import msgspec

from supervisor.http.client import ConnectionPool
from supervisor.http.errors import HTTPError, LocalProtocolError
from supervisor.http.server import Request, Response, json_response

__all__ = ["ProxyApp"]

_FORWARDED_PATHS = frozenset({"/", "/on-job-complete"})
_HOP_BY_HOP = frozenset(
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
_json_encode = msgspec.json.Encoder().encode


def _end_to_end(
    headers: list[tuple[bytes, bytes]], *, drop: tuple[bytes, ...] = ()
) -> list[tuple[bytes, bytes]]:
    """``headers`` without hop-by-hop ones (including those named in ``Connection``)."""
    named: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            named.update(token.strip().lower() for token in value.split(b","))
    return [
        (name, value)
        for name, value in headers
        if (lower := name.lower()) not in _HOP_BY_HOP
        and lower not in named
        and not lower.startswith(b"proxy-")
        and lower not in drop
    ]


class ProxyApp:
    """Forwards batch traffic to the port owner; answers health and status itself."""

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
        self._port: Callable[[], int | None] = (
            target_port if callable(target_port) else (lambda: target_port)
        )
        self._is_ready = is_ready
        self._status = status
        self._retry_after = b"%d" % retry_after
        self._timeout = upstream_timeout
        self._pool = ConnectionPool(
            target_host, self._port, max_connections=pool_size, keep_body=max_response_body
        )

    async def handle(self, request: Request) -> Response:
        """Route one request (see the module docstring)."""
        path = request.path
        method = request.method
        if path in _FORWARDED_PATHS:
            if method != "POST":
                return _method_not_allowed(b"POST")
            if not self._is_ready() or self._port() is None:
                return json_response(
                    503,
                    {"error": "The API is not ready yet; retry later."},
                    headers=[(b"Retry-After", self._retry_after)],
                )
            return await self._forward(request)
        if path == "/healthz":
            if method not in ("GET", "HEAD"):
                return _method_not_allowed(b"GET, HEAD")
            ready = self._is_ready()
            return json_response(200 if ready else 503, {"ready": ready})
        if path == "/status" and self._status is not None:
            if method not in ("GET", "HEAD"):
                return _method_not_allowed(b"GET, HEAD")
            return Response(
                200, [(b"Content-Type", b"application/json")], _json_encode(self._status())
            )
        return json_response(404, {"error": f"No route for {path}."})

    async def _forward(self, request: Request) -> Response:
        headers = _end_to_end(request.headers)
        target = request.target.encode("ascii")
        try:
            with anyio.fail_after(self._timeout):
                upstream = await self._pool.request(b"POST", target, headers, request.body)
        except TimeoutError:
            return json_response(504, {"error": "The API did not answer in time."})
        except LocalProtocolError:
            raise
        except HTTPError as exc:
            return json_response(502, {"error": f"The API could not be reached: {exc}"})
        if upstream.body_truncated:
            return json_response(502, {"error": "The API's response body is too large."})
        return Response(
            upstream.status,
            _end_to_end(upstream.headers, drop=(b"content-length",)),
            upstream.body_head,
            upstream.reason,
        )

    async def aclose(self) -> None:
        """Close the idle upstream connections."""
        await self._pool.aclose()


def _method_not_allowed(allow: bytes) -> Response:
    return json_response(405, {"error": "Method not allowed."}, headers=[(b"Allow", allow)])
