"""``s3://`` entries of ``s3_paths``: listing and streaming objects of S3 and S3-compatible stores.

Theory of operation
-------------------
The client is obstore (the ``s3`` extra), used through its synchronous calls: the splitter runs
in worker threads, so asyncio and trio alike are served without an event loop of obstore's own.

An entry ``s3://bucket/key`` is a *prefix*, as in Cortex: it selects every object whose key
starts with ``key`` (``s3://b/images/img`` selects ``images/img_1.png`` and
``images/img_2/x.png``; ``s3://b/`` the whole bucket). obstore lists by whole path segments,
so the listing asks for the folder around ``key`` starting just before it, keeps the keys that
start with ``key`` and stops at the first one past them (S3 lists in key order). Keys ending
with ``/`` (the folder markers consoles create) are not objects to process. Each object is
*shown* as ``s3://bucket/key``.

An object is read by one GET from an offset, streamed in 1 MiB chunks (memory stays flat
whatever its size) and pinned to the ETag seen when it was opened. When the stream breaks
(a dropped connection, a timeout) the next GET starts at the first byte not yet handed out,
so no byte is read twice or skipped; a break that follows no progress counts against a small
budget (:data:`RESUMES`), one that follows progress starts the budget over.

Credentials and endpoints are found the way AWS tools find them: ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION`` / ``AWS_DEFAULT_REGION``,
``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3`` (``--s3-endpoint`` sets the latter's twin), web
identity (``AWS_WEB_IDENTITY_TOKEN_FILE``: EKS pod roles), ECS container credentials and the
EC2 instance role (read by obstore), and, when no key is in the environment, the static keys,
region and ``endpoint_url`` of the profile ``AWS_PROFILE`` (``default``) in
``~/.aws/credentials`` and ``~/.aws/config`` (:func:`profile_settings`).

Failures become one sentence naming the ``s3://`` path (:func:`classify`, :func:`describe`); the
store's own message is never repeated, so no header, signature or key can reach a log line.
"""

from __future__ import annotations

import configparser
import enum
import io
import os
import re
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Final
from urllib.parse import urlsplit

from supervisor.errors import JobError, printable

if TYPE_CHECKING:
    from obstore import BytesStream
    from obstore.store import ClientConfig, RetryConfig, S3Config, S3Store

__all__ = [
    "RESUMES",
    "Failure",
    "classify",
    "describe",
    "is_s3",
    "list_objects",
    "open_object",
    "profile_settings",
    "split_url",
]

EXTRA_HINT: Final = "pip install 'cortex-batch-supervisor[s3]'"
CHUNK: Final = 1 << 20  # bytes per streamed chunk
RESUMES: Final = 5  # GETs in a row that may break before any byte arrives
_CLIENT: Final[ClientConfig] = {
    "connect_timeout": "5s",
    "read_timeout": "60s",  # a stalled stream breaks, then resumes
    "timeout": "10min",  # a longer read resumes where it stopped
}
_RETRY: Final[RetryConfig] = {
    "max_retries": 3,
    "backoff": {
        "init_backoff": timedelta(milliseconds=100),
        "max_backoff": timedelta(seconds=2),
        "base": 2,
    },
    "retry_timeout": timedelta(seconds=30),
}
_CODE = re.compile(r"<Code>([A-Za-z0-9.]+)</Code>")
_STATUS = re.compile(r"status code: (\d{3})")


def is_s3(entry: str) -> bool:
    return entry[:5].lower() == "s3://"


def split_url(entry: str, where: str) -> tuple[str, str]:
    """The bucket and key (prefix) of ``s3://bucket/key``."""
    bucket, _, key = entry[5:].partition("/")
    if not bucket:
        raise JobError(
            f"`{printable(entry)}` names no bucket (expected s3://bucket/key) - at `{where}`"
        )
    return bucket, key


# ---- credentials, endpoint, store -------------------------------------------------------------


def profile_settings(
    env: Mapping[str, str], credentials_text: str | None, config_text: str | None
) -> dict[str, str]:
    """S3Store settings from an AWS profile, for what the environment does not set itself.

    ``credentials_text`` / ``config_text``: the shared files' contents (None when absent). An
    ``AWS_PROFILE`` that neither file holds is an error; the ``default`` profile may be missing.
    """
    name = env.get("AWS_PROFILE") or env.get("AWS_DEFAULT_PROFILE") or ""
    creds = _section(credentials_text, name or "default")
    conf = _section(config_text, f"profile {name}" if name and name != "default" else "default")
    if creds is None and conf is None:
        if name:
            raise JobError(
                f"the AWS profile `{printable(name)}` (AWS_PROFILE) is in neither the shared "
                "credentials file nor the config file"
            )
        return {}
    merged = {**(conf or {}), **(creds or {})}
    out: dict[str, str] = {}
    if not env.get("AWS_ACCESS_KEY_ID") and merged.get("aws_access_key_id"):
        out["access_key_id"] = merged["aws_access_key_id"]
        out["secret_access_key"] = merged.get("aws_secret_access_key", "")
        if merged.get("aws_session_token"):
            out["session_token"] = merged["aws_session_token"]
    if not (env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")) and merged.get("region"):
        out["region"] = merged["region"]
    if not _env_endpoint(env) and merged.get("endpoint_url"):
        out["endpoint"] = merged["endpoint_url"]
    return out


def _section(text: str | None, name: str) -> dict[str, str] | None:
    if text is None:
        return None
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(text)
    except configparser.Error:
        raise JobError("the AWS shared credentials or config file is malformed") from None
    if not parser.has_section(name):
        return None
    return {k: v.strip() for k, v in parser.items(name)}


def _env_endpoint(env: Mapping[str, str]) -> str:
    return env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or ""


def _read(path: str) -> str | None:
    try:
        return Path(path).expanduser().read_text()
    except (OSError, UnicodeDecodeError):
        return None


def _settings(env: Mapping[str, str]) -> dict[str, str]:
    """Where the store is and which keys it takes, beyond what obstore reads from ``env``."""
    creds = _read(env.get("AWS_SHARED_CREDENTIALS_FILE") or "~/.aws/credentials")
    conf = _read(env.get("AWS_CONFIG_FILE") or "~/.aws/config")
    out = profile_settings(env, creds, conf)
    if endpoint := _env_endpoint(env):
        out["endpoint"] = endpoint
    return out


def _shown_endpoint(endpoint: str) -> str:
    """The endpoint without any user:password part."""
    parts = urlsplit(endpoint)
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return f"{parts.scheme}://{host}" if parts.scheme else endpoint


def _store(bucket: str, where: str) -> tuple[S3Store, str]:
    """An S3Store for ``bucket``, and the endpoint to name in errors."""
    try:
        from obstore.store import S3Store
    except ImportError:
        raise JobError(
            f"reading S3 needs the `s3` extra, which is not installed ({EXTRA_HINT}) - at `{where}`"
        ) from None
    settings = _settings(os.environ)
    endpoint = settings.get("endpoint", "")
    client: ClientConfig = {**_CLIENT, "allow_http": endpoint.lower().startswith("http://")}
    config: S3Config = {}
    for key in ("access_key_id", "secret_access_key", "session_token", "region", "endpoint"):
        if key in settings:
            config[key] = settings[key]
    try:
        store = S3Store(bucket, config=config, client_options=client, retry_config=_RETRY)
    except Exception as e:  # a malformed setting: never repeat values, they may be keys
        raise JobError(
            f"the S3 settings for `s3://{printable(bucket)}` are not usable "
            f"({type(e).__name__}; check the AWS_* variables and the endpoint) - at `{where}`"
        ) from None
    return store, _shown_endpoint(endpoint) if endpoint else "the AWS S3 endpoint"


# ---- errors -----------------------------------------------------------------------------------


class Failure(enum.Enum):
    NO_BUCKET = "no such bucket"
    NO_KEY = "no such key"
    DENIED = "access denied"
    BAD_CREDENTIALS = "bad credentials"
    NO_CREDENTIALS = "no credentials"
    WRONG_REGION = "wrong region"
    UNREACHABLE = "endpoint unreachable"
    CHANGED = "object changed"
    OTHER = "other"


_BY_CODE: Final = {
    "NoSuchBucket": Failure.NO_BUCKET,
    "NoSuchKey": Failure.NO_KEY,
    "AccessDenied": Failure.DENIED,
    "AllAccessDisabled": Failure.DENIED,
    "InvalidAccessKeyId": Failure.BAD_CREDENTIALS,
    "SignatureDoesNotMatch": Failure.BAD_CREDENTIALS,
    "ExpiredToken": Failure.BAD_CREDENTIALS,
    "InvalidToken": Failure.BAD_CREDENTIALS,
    "TokenRefreshRequired": Failure.BAD_CREDENTIALS,
    "PermanentRedirect": Failure.WRONG_REGION,
    "AuthorizationHeaderMalformed": Failure.WRONG_REGION,
    "PreconditionFailed": Failure.CHANGED,
}
_BY_STATUS: Final = {403: Failure.DENIED, 401: Failure.BAD_CREDENTIALS, 412: Failure.CHANGED}
_UNREACHABLE: Final = (
    "error sending request",
    "tcp connect error",
    "dns error",
    "connection refused",
    "connection reset",
    "timed out",
    "operation timed out",
)


def classify(exc_type: str, message: str) -> tuple[Failure, str]:
    """What went wrong, from an obstore exception's class name and text, and a short detail
    (the S3 error code or HTTP status) that is safe to show."""
    code = _CODE.search(message)
    if code is not None and code.group(1) in _BY_CODE:
        return _BY_CODE[code.group(1)], code.group(1)
    status_m = _STATUS.search(message)
    status = int(status_m.group(1)) if status_m else 0
    lower = message.lower()
    if exc_type == "PreconditionError":
        return Failure.CHANGED, "ETag changed"
    if exc_type == "PermissionDeniedError":
        return Failure.DENIED, code.group(1) if code else "403"
    if exc_type == "UnauthenticatedError":
        return Failure.BAD_CREDENTIALS, code.group(1) if code else "401"
    if exc_type == "FileNotFoundError" or status == 404:
        return Failure.NO_KEY, code.group(1) if code else "404"
    if status in _BY_STATUS:
        return _BY_STATUS[status], code.group(1) if code else str(status)
    if "credential" in lower and not status:
        return Failure.NO_CREDENTIALS, "no credentials found"
    if not status and any(s in lower for s in _UNREACHABLE):
        return Failure.UNREACHABLE, "timed out" if "timed out" in lower else "connection failed"
    detail = code.group(1) if code else (f"HTTP {status}" if status else exc_type)
    return Failure.OTHER, detail


def describe(failure: Failure, detail: str, path: str, endpoint: str) -> str:
    """One sentence for ``failure`` on the ``s3://`` ``path`` (no field suffix)."""
    shown = f"`{printable(path)}`"
    bucket = path[5:].partition("/")[0]
    match failure:
        case Failure.NO_BUCKET:
            return f"the bucket `{printable(bucket)}` of {shown} does not exist"
        case Failure.NO_KEY:
            return f"{shown} does not exist (no object has this key)"
        case Failure.DENIED:
            return f"access to {shown} is denied ({detail}): the credentials lack permission"
        case Failure.BAD_CREDENTIALS:
            return (
                f"the S3 credentials were refused for {shown} ({detail}): check "
                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN or AWS_PROFILE"
            )
        case Failure.NO_CREDENTIALS:
            return (
                f"no S3 credentials were found for {shown}: set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or give the pod a role"
            )
        case Failure.WRONG_REGION:
            return f"the bucket of {shown} is in another region ({detail}): set AWS_REGION"
        case Failure.UNREACHABLE:
            return f"cannot reach the S3 endpoint {endpoint} for {shown} ({detail})"
        case Failure.CHANGED:
            return f"{shown} was replaced while it was being read; submit the job again"
        case Failure.OTHER:
            return f"cannot read {shown} from {endpoint} ({detail})"


def _error(e: Exception, path: str, endpoint: str, where: str) -> JobError:
    failure, detail = classify(type(e).__name__, str(e))
    at = f" - at `{where}`" if where else ""
    return JobError(describe(failure, detail, path, endpoint) + at)


# ---- listing ----------------------------------------------------------------------------------


def list_objects(entry: str, where: str) -> list[str]:
    """The ``s3://`` paths of the objects the prefix ``entry`` selects, in key order.

    Raises :class:`JobError` naming ``entry`` and ``where`` when the listing fails or selects
    nothing.
    """
    bucket, key = split_url(entry, where)
    store, endpoint = _store(bucket, where)  # first: says which extra is missing
    import obstore

    shown = f"s3://{bucket}/{key}"
    if not key or key.endswith("/"):
        folder, offset = key.rstrip("/") or None, None
    else:
        folder = key.rpartition("/")[0] or None
        offset = key[:-1] or None  # start-after: the first listed key may be `key` itself
    found: list[str] = []
    try:
        for chunk in obstore.list(store, folder, offset=offset, chunk_size=1000):
            keys = [meta["path"] for meta in chunk]
            found.extend(f"s3://{bucket}/{k}" for k in keys if k.startswith(key) and k[-1:] != "/")
            if keys and keys[-1] > key and not keys[-1].startswith(key):
                break  # listed in key order: nothing further starts with `key`
    except Exception as e:
        raise _error(e, shown, endpoint, where) from None
    if not found:
        raise JobError(
            f"`{printable(shown)}` selects no object (no key is or starts with it) - at `{where}`"
        )
    return found


# ---- reading ----------------------------------------------------------------------------------


class _ObjectReader(io.RawIOBase):
    """The bytes of one object, streamed, resumed from the next byte when a GET breaks."""

    def __init__(self, store: S3Store, key: str, path: str, endpoint: str) -> None:
        import obstore

        self._obstore = obstore
        self._store, self._key, self._path, self._endpoint = store, key, path, endpoint
        try:
            meta = obstore.head(store, key)
        except Exception as e:
            raise _error(e, path, endpoint, "") from None
        self._size: int = meta["size"]
        self._etag: str | None = meta["e_tag"]
        self._pos = 0  # bytes handed out
        self._stream: BytesStream | None = None
        self._buf = memoryview(b"")
        self.breaks = 0  # GETs that broke, in all (for tests)

    def readable(self) -> bool:
        return True

    def readinto(self, b: memoryview) -> int:  # type: ignore[override]
        while not self._buf:
            if self._pos >= self._size:
                return 0
            self._buf = memoryview(self._next_chunk())
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        self._pos += n
        return n

    def _next_chunk(self) -> bytes:
        failures = 0
        while True:
            try:
                if self._stream is None:
                    result = self._obstore.get(
                        self._store,
                        self._key,
                        options={"range": {"offset": self._pos}, "if_match": self._etag},
                    )
                    self._stream = result.stream(min_chunk_size=CHUNK)
                chunk = next(self._stream)
                if not chunk:
                    raise EOFError("empty chunk")
                return chunk
            except (StopIteration, EOFError):  # ended early: the connection was cut
                error: Exception = EOFError(f"stream ended at byte {self._pos} of {self._size}")
            except Exception as e:
                error = e
            self._stream = None
            self.breaks += 1
            failures += 1
            failure, _ = classify(type(error).__name__, str(error))
            if failure is not Failure.OTHER and failure is not Failure.UNREACHABLE:
                raise _error(error, self._path, self._endpoint, "") from None
            if failures > RESUMES:
                raise JobError(
                    f"cannot read `{printable(self._path)}`: the connection to "
                    f"{self._endpoint} broke {failures} times in a row at byte {self._pos}"
                )

    def close(self) -> None:
        self._stream = None
        super().close()


def open_object(path: str) -> io.BufferedIOBase:
    """A buffered reader of the object ``s3://bucket/key`` (raises :class:`JobError`)."""
    bucket, key = split_url(path, "s3_paths")
    store, endpoint = _store(bucket, "s3_paths")
    return io.BufferedReader(_ObjectReader(store, key, path, endpoint), CHUNK)
