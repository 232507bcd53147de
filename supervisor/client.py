"""A Python client for the job API of ``supervisor serve`` (docs/commands.md, "Python client").

::

    from supervisor.client import Client

    client = Client("http://127.0.0.1:8888")
    spec = client.submit("wordcount", {"workers": 1, "item_list": {"items": [1, 2], "batch_size": 1}})
    status = client.wait("wordcount", spec.job_id)
    print(status.job_status.status)

Blocking, over the standard library's :mod:`http.client`, one keep-alive connection per
client (not thread-safe: one client per thread). Answers are decoded into the project's
msgspec Structs (:mod:`supervisor.jobs`, :mod:`supervisor.queues.base`); every failure is a
:class:`ClientError`.

Where the server is, when no URL is given (the first that applies):

1. ``$CORTEX_CLI_CONFIG_DIR/cli.yaml`` (what a container started by ``serve`` gets, in
   Cortex's format): the ``default_environment``'s ``operator_endpoint``, else the first
   environment's. This is how one API's container submits jobs to another (chaining).
2. ``$SUPERVISOR_URL``.
3. ``http://127.0.0.1:8888``.

The token, when none is given, is ``$SUPERVISOR_TOKEN`` (sent as ``Authorization: Bearer``).
"""

from __future__ import annotations

import builtins
import http.client
import os
import secrets
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final, TypeVar
from urllib.parse import quote, urlencode, urlsplit

import msgspec
import yaml

from supervisor.errors import BadInput, SupervisorError
from supervisor.jobs import END_STATES, JobSpec, JobStatus, JobStatusResponse, JobSubmission
from supervisor.queues.base import DeadLetter

__all__ = [
    "DEFAULT_URL",
    "Client",
    "ClientError",
    "chaining_env",
    "resolve_token",
    "resolve_url",
    "write_cli_config",
]

DEFAULT_URL: Final = "http://127.0.0.1:8888"
CONFIG_DIR_ENV: Final = "CORTEX_CLI_CONFIG_DIR"
URL_ENV: Final = "SUPERVISOR_URL"
TOKEN_ENV: Final = "SUPERVISOR_TOKEN"

T = TypeVar("T")


class ClientError(SupervisorError):
    """A request to the job API failed.

    ``status`` is the HTTP status (``None`` when no answer came: the server could not be
    reached, or the configuration is wrong); ``kind`` the server's short error kind (or
    ``"unreachable"``, ``"config"``, ``"timeout"``, ``"bad_response"``); ``message`` one
    sentence.
    """

    def __init__(self, message: str, *, status: int | None = None, kind: str = "error") -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.kind = kind

    @property
    def bad_input(self) -> bool:
        """The request was refused as the caller's fault (4xx)."""
        return self.status is not None and 400 <= self.status < 500


# -- where the server is --------------------------------------------------------------------


class _Environment(msgspec.Struct):
    name: str = ""
    operator_endpoint: str | None = None


class _CliConfig(msgspec.Struct):
    environments: list[_Environment] = []
    default_environment: str | None = None


def _endpoint_from_cli_yaml(directory: str) -> str:
    path = Path(directory) / "cli.yaml"
    try:
        data = yaml.safe_load(path.read_text())
        config = msgspec.convert(data or {}, _CliConfig)
    except OSError as e:
        raise ClientError(
            f"cannot read {path} (named by ${CONFIG_DIR_ENV}): {e.strerror or e}", kind="config"
        ) from None
    except (yaml.YAMLError, msgspec.ValidationError) as e:
        raise ClientError(f"{path} is not a Cortex cli.yaml: {e}", kind="config") from None
    chosen = [e for e in config.environments if e.name == config.default_environment]
    for env in chosen or config.environments[:1]:
        if env.operator_endpoint:
            return env.operator_endpoint
    raise ClientError(f"{path} names no operator_endpoint", kind="config")


def write_cli_config(directory: Path, endpoint: str) -> None:
    """``directory/cli.yaml`` in Cortex's format, naming ``endpoint`` (what
    :func:`resolve_url` reads inside a container)."""
    directory.mkdir(parents=True, exist_ok=True)
    text = (
        "environments:\n"
        "  - name: supervisor\n"
        f"    operator_endpoint: {endpoint}\n"
        "default_environment: supervisor\n"
    )
    tmp = directory / f".cli.yaml.{secrets.token_hex(4)}"
    tmp.write_text(text)
    os.replace(tmp, directory / "cli.yaml")


def chaining_env(endpoint: str, config_dir: Path, token: str | None) -> dict[str, str]:
    """What a container gets to submit jobs to the job API at ``endpoint`` (chaining): the
    URL, the folder of its ``cli.yaml`` (:func:`write_cli_config`) and the bearer token."""
    env = {"CORTEX_OPERATOR_ENDPOINT": endpoint, CONFIG_DIR_ENV: str(config_dir)}
    if token is not None:
        env[TOKEN_ENV] = token
    return env


def resolve_url(url: str | None = None, environ: Mapping[str, str] | None = None) -> str:
    """The job API's base URL: ``url``, else from the environment (see the module docstring)."""
    env = os.environ if environ is None else environ
    if url:
        return url
    if env.get(CONFIG_DIR_ENV):
        return _endpoint_from_cli_yaml(env[CONFIG_DIR_ENV])
    return env.get(URL_ENV) or DEFAULT_URL


def read_token_file(path: str | os.PathLike[str]) -> str:
    """The bearer token kept in ``path`` (surrounding white space dropped); BadInput if the
    file cannot be read or is empty. Used by the server and the client commands alike."""
    try:
        token = Path(path).read_text().strip()
    except OSError as e:
        raise BadInput(f"{path}: cannot read the token file ({e.strerror or e})") from None
    if not token:
        raise BadInput(f"{path}: the token file is empty")
    return token


def resolve_token(token: str | None = None, environ: Mapping[str, str] | None = None) -> str | None:
    """The bearer token: ``token``, else ``$SUPERVISOR_TOKEN``, else none."""
    env = os.environ if environ is None else environ
    return token if token is not None else (env.get(TOKEN_ENV) or None)


# -- the client ------------------------------------------------------------------------------


class _ErrorBody(msgspec.Struct):
    message: str = ""
    kind: str = "error"


class _JobList(msgspec.Struct):
    batch_job_statuses: list[JobStatus] = []


class _Message(msgspec.Struct):
    message: str


class _DeadLetters(msgspec.Struct):
    dead_letters: list[DeadLetter] = []


_encoder: Final = msgspec.json.Encoder()


class Client:
    """A client of one job API server (see the module docstring).

    Close it with :meth:`close`, or use it as a context manager.
    """

    def __init__(
        self, url: str | None = None, token: str | None = None, *, timeout: float = 30.0
    ) -> None:
        self.url = resolve_url(url).rstrip("/")
        self._token = resolve_token(token)
        self._timeout = timeout
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ClientError(
                f"expected an http:// or https:// URL for the job API, got {self.url!r}",
                kind="config",
            )
        try:
            self._port = parts.port
        except ValueError:
            raise ClientError(f"bad port in the URL {self.url!r}", kind="config") from None
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._prefix = parts.path.rstrip("/")
        self._conn: http.client.HTTPConnection | None = None

    def __repr__(self) -> str:
        return f"Client({self.url!r})"

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection (the next request opens a new one)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    # -- the job API ---------------------------------------------------------------------

    def submit(self, api_name: str, job: Mapping[str, Any] | bytes | JobSubmission) -> JobSpec:
        """Submit a job; returns its spec (``job_id``, ...)."""
        data = self._request("POST", _path(api_name), body=_job_body(job))
        return _decode(data, JobSpec, self.url)

    def dry_run(self, api_name: str, job: Mapping[str, Any] | bytes | JobSubmission) -> str:
        """What the job would process (one line per file, or a summary of the items) and a
        last line ``validations passed``; nothing is stored."""
        data = self._request("POST", _path(api_name), {"dryRun": "true"}, body=_job_body(job))
        return data.decode("utf-8", errors="replace")

    def get(self, api_name: str, job_id: str) -> JobStatusResponse:
        """The job's status."""
        data = self._request("GET", _path(api_name), {"jobID": job_id})
        return _decode(data, JobStatusResponse, self.url)

    def list(self, api_name: str) -> list[JobStatus]:
        """The API's jobs, newest first."""
        data = self._request("GET", _path(api_name))
        return _decode(data, _JobList, self.url).batch_job_statuses

    def stop(self, api_name: str, job_id: str) -> str:
        """Stop the job; returns the server's message (``stopped job <id>``)."""
        data = self._request("DELETE", _path(api_name), {"jobID": job_id})
        return _decode(data, _Message, self.url).message

    def wait(
        self,
        api_name: str,
        job_id: str,
        *,
        poll: float = 1.0,
        timeout: float | None = None,
        on_status: Callable[[JobStatusResponse], object] | None = None,
    ) -> JobStatusResponse:
        """Poll the job's status every ``poll`` seconds until it is in an end state and return
        that status. ``on_status`` sees every status polled (the last one included). After
        ``timeout`` seconds raises :class:`ClientError` (``kind="timeout"``); the job goes on."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = self.get(api_name, job_id)
            if on_status is not None:
                on_status(status)
            if status.job_status.status in END_STATES:
                return status
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ClientError(
                        f"job {job_id} did not end within {timeout:g}s "
                        f"(it is {status.job_status.status})",
                        kind="timeout",
                    )
                time.sleep(min(poll, left))
            else:
                time.sleep(poll)

    def dead_letters(self, api_name: str, job_id: str) -> builtins.list[DeadLetter]:
        """The job's dead letters (batches that failed every attempt), by batch number."""
        data = self._request("GET", _path(api_name, "dead-letters"), {"jobID": job_id})
        return _decode(data, _DeadLetters, self.url).dead_letters

    def retry_dead_letters(self, api_name: str, job_id: str) -> JobSpec:
        """Submit the job's dead letters as a new job (same workers, config, timeout and
        dead-letter setting); returns the new job's spec."""
        data = self._request("POST", _path(api_name, "dead-letters"), {"jobID": job_id})
        return _decode(data, JobSpec, self.url)

    # -- HTTP ----------------------------------------------------------------------------

    def _connect(self) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        return cls(self._host, self._port, timeout=self._timeout)

    def _request(
        self,
        method: str,
        path: str,
        query: Mapping[str, str] | None = None,
        *,
        body: bytes | None = None,
    ) -> bytes:
        target = self._prefix + path + (f"?{urlencode(query)}" if query else "")
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        for attempt in (1, 2):
            reused = self._conn is not None
            conn = self._conn if self._conn is not None else self._connect()
            self._conn = conn
            try:
                conn.request(method, target, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as e:
                self.close()
                if reused and attempt == 1:
                    continue  # the server had closed the idle keep-alive connection: once more
                raise self._unreachable(e) from e
            except (OSError, http.client.HTTPException) as e:
                self.close()
                raise self._unreachable(e) from e
            if response.will_close:
                self.close()
            if response.status >= 400:
                raise _error(response.status, data, method, self.url + target)
            return data
        raise AssertionError("not reached")

    def _unreachable(self, e: BaseException) -> ClientError:
        reason = (e.strerror if isinstance(e, OSError) else None) or str(e) or type(e).__name__
        return ClientError(
            f"cannot reach the job API at {self.url} ({reason}); is `supervisor serve` running?",
            kind="unreachable",
        )


def _path(api_name: str, *rest: str) -> str:
    return "/batch/" + "/".join(quote(p, safe="") for p in (api_name, *rest))


def _job_body(job: Mapping[str, Any] | bytes | JobSubmission) -> bytes:
    if isinstance(job, bytes | bytearray | memoryview):
        return bytes(job)
    return _encoder.encode(job)


def _decode(data: bytes, tp: type[T], url: str) -> T:
    try:
        return msgspec.json.decode(data, type=tp)
    except msgspec.DecodeError as e:  # ValidationError included
        raise ClientError(
            f"the server at {url} answered something that is not the job API's ({e})",
            kind="bad_response",
        ) from None


def _error(status: int, data: bytes, method: str, url: str) -> ClientError:
    try:
        err = msgspec.json.decode(data, type=_ErrorBody)
        message, kind = err.message, err.kind
    except msgspec.DecodeError:
        message, kind = data.decode("utf-8", errors="replace").strip()[:300], "error"
    if not message:
        message = f"{method} {url} answered {status}"
    return ClientError(message, status=status, kind=kind)
