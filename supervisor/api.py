"""The job API's routes over HTTP, as a server handler (docs/job-api.md).

Cortex's routes, so a Cortex user's scripts work unchanged, at ``/<api_name>`` and again at
``/batch/<api_name>`` (the operator's paths)::

    POST   /<api_name>[?dryRun=true]              submit (or list what would be processed)
    GET    /<api_name>?jobID=<id>                 a job's status
    GET    /<api_name>                            the API and its jobs, newest first
    DELETE /<api_name>?jobID=<id>                 stop a job
    GET    /<api_name>/dead-letters?jobID=<id>    a job's dead letters
    POST   /<api_name>/dead-letters?jobID=<id>    re-submit them as a new job

plus the admin routes (``/healthz``, ``/status``, ``/metrics``). Routing is a pure function
of the method and target (:func:`route`), tested with a table; :class:`JobAPI` carries it
out. Errors are JSON ``{"kind", "message"}`` with one sentence: 400 bad input (nothing
stored), 401 a missing or wrong bearer token (when the server has one; ``/healthz`` and
``/metrics`` stay open for probes and scrapers), 404 an unknown API, job or route, 405 a
method the route does not take, 507 a queue with no room for the job (Redis at its memory
limit; nothing of the job is kept).
"""

from __future__ import annotations

import enum
import hmac
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote

import msgspec

from supervisor.admin import Admin
from supervisor.errors import BadInput
from supervisor.http.server import Request, Response, error_response, json_response
from supervisor.logs import Logger
from supervisor.queues.base import QueueFullError
from supervisor.service import JobService, NotFound

__all__ = ["Action", "JobAPI", "Route", "route"]

_OPEN_PATHS = frozenset({"/healthz", "/metrics"})


class Action(enum.Enum):
    SUBMIT = "submit"
    DRY_RUN = "dry_run"
    STATUS = "status"
    LIST = "list"
    STOP = "stop"
    DEAD_LETTERS = "dead_letters"
    RETRY_DEAD_LETTERS = "retry_dead_letters"


@dataclass(frozen=True, slots=True)
class Route:
    action: Action | None  # None: the path exists but not with this method (405)
    api_name: str
    job_id: str | None = None
    allow: str = ""


def route(method: str, target: str) -> Route | None:
    """Which operation ``method target`` asks for; ``None`` when no route has that path."""
    path, _, query = target.partition("?")
    parts = [unquote(p) for p in path.split("/") if p]
    if parts[:1] == ["batch"]:
        parts = parts[1:]
    if not parts or len(parts) > 2 or (len(parts) == 2 and parts[1] != "dead-letters"):
        return None
    params = parse_qs(query, keep_blank_values=True)
    job_id = (params.get("jobID") or [""])[0] or None
    api_name = parts[0]
    if len(parts) == 2:
        if method == "GET":
            return Route(Action.DEAD_LETTERS, api_name, job_id)
        if method == "POST":
            return Route(Action.RETRY_DEAD_LETTERS, api_name, job_id)
        return Route(None, api_name, allow="GET, POST")
    if method == "POST":
        dry = (params.get("dryRun") or ["false"])[0].lower() in ("true", "1", "yes")
        return Route(Action.DRY_RUN if dry else Action.SUBMIT, api_name)
    if method == "GET":
        return Route(Action.STATUS if job_id else Action.LIST, api_name, job_id)
    if method == "DELETE":
        return Route(Action.STOP, api_name, job_id)
    return Route(None, api_name, allow="GET, POST, DELETE")


def _error(
    status: int, kind: str, message: str, headers: list[tuple[bytes, bytes]] | None = None
) -> Response:
    return error_response(status, message, kind=kind, headers=headers or [])


_UNAUTHORIZED = _error(
    401,
    "unauthorized",
    "this server needs `Authorization: Bearer <token>` with its token",
    [(b"WWW-Authenticate", b'Bearer realm="supervisor"')],
)


class JobAPI:
    """The server handler: admin routes, then the job API's routes."""

    def __init__(
        self, service: JobService, admin: Admin, *, token: str | None, log: Logger
    ) -> None:
        self.service = service
        self.admin = admin
        self._token = None if token is None else f"Bearer {token}".encode()
        self.log = log

    def _authorized(self, request: Request) -> bool:
        if self._token is None or request.path in _OPEN_PATHS:
            return True
        given = request.header(b"authorization") or b""
        return hmac.compare_digest(given, self._token)

    async def handle(self, request: Request) -> Response:
        if not self._authorized(request):
            return _UNAUTHORIZED
        answer = await self.admin.route(request)
        if answer is not None:
            return answer
        r = route(request.method, request.target)
        if r is None:
            return _error(404, "not_found", f"no route for {request.path}")
        if r.action is None:
            return _error(
                405,
                "method_not_allowed",
                f"{request.method} is not allowed on {request.path}",
                [(b"Allow", r.allow.encode())],
            )
        try:
            return await self._do(r, request)
        except NotFound as e:
            return _error(404, "not_found", str(e))
        except BadInput as e:
            return _error(400, "bad_request", str(e))
        except QueueFullError as e:  # Redis at its memory limit: nothing of the job is kept
            return _error(507, "insufficient_storage", str(e))

    async def _do(self, r: Route, request: Request) -> Response:
        service = self.service
        if r.action in (Action.STATUS, Action.STOP, Action.DEAD_LETTERS, Action.RETRY_DEAD_LETTERS):
            if r.job_id is None:
                service.api(r.api_name)  # an unknown API is a 404 before a missing parameter
                raise BadInput("the query parameter `jobID` is required")
        if r.action is Action.SUBMIT:
            spec = await service.submit(r.api_name, request.body)
            return json_response(200, spec)
        if r.action is Action.DRY_RUN:
            text = await service.dry_run(r.api_name, request.body)
            return Response(200, [(b"Content-Type", b"text/plain; charset=utf-8")], text.encode())
        if r.action is Action.LIST:
            api = service.api(r.api_name)
            statuses = await service.list_jobs(r.api_name)
            return json_response(
                200,
                {
                    "spec": msgspec.to_builtins(api),
                    "endpoint": service.endpoint_of(api),
                    "batch_job_statuses": statuses,
                },
            )
        assert r.job_id is not None
        if r.action is Action.STATUS:
            return json_response(200, await service.status(r.api_name, r.job_id))
        if r.action is Action.STOP:
            await service.stop(r.api_name, r.job_id)
            return json_response(200, {"message": f"stopped job {r.job_id}"})
        if r.action is Action.DEAD_LETTERS:
            letters = await service.dead_letters(r.api_name, r.job_id)
            return json_response(200, {"job_id": r.job_id, "dead_letters": letters})
        assert r.action is Action.RETRY_DEAD_LETTERS
        spec = await service.retry_dead_letters(r.api_name, r.job_id)
        return json_response(200, spec)
