"""The connection side of the Redis queue: opening a client (:func:`connect`, every way it can
fail said in one sentence as a :class:`QueueConnectError`), coredis's log records forwarded
into the supervisor's JSON lines (:func:`forward_redis_logs`), and the small helpers the queue
needs around coredis's errors. The queue itself is in ``redis.py``.
"""

from __future__ import annotations

import logging
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import coredis
import coredis.exceptions

from supervisor.errors import raise_single
from supervisor.logs import Logger
from supervisor.queues.base import QueueConnectError
from supervisor.queues.redis_feed import TRANSIENT

__all__ = ["CONNECT_TIMEOUT", "connect", "forward_redis_logs", "is_oom", "redacted"]

CONNECT_TIMEOUT = 5.0


def redacted(url: str) -> str:
    """``url`` with its password, if any, replaced by ``***``."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f":***@{host}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def is_oom(e: coredis.exceptions.ResponseError) -> bool:
    """Redis refused a write at its ``maxmemory`` (policy ``noeviction``)."""
    return "OOM command not allowed" in str(e)


class _Forward(logging.Handler):
    def __init__(self, log: Logger) -> None:
        super().__init__(logging.DEBUG)
        self._log = log

    def emit(self, record: logging.LogRecord) -> None:
        level = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warning"}.get(
            record.levelno, "error"
        )
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not break the pod
            message = str(record.msg)
        self._log.log(level, "redis_client", logger=record.name, message=message)


@asynccontextmanager
async def forward_redis_logs(log: Logger, level: int = logging.WARNING) -> AsyncIterator[None]:
    """Forward coredis's stdlib ``logging`` records (at ``level`` and above) into ``log``'s
    JSON lines for the block."""
    logger = logging.getLogger("coredis")
    handler = _Forward(log)
    handler.setLevel(level)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


@asynccontextmanager
async def connect(url: str, log: Logger) -> AsyncIterator[coredis.Redis[bytes]]:
    """A client of the Redis at ``url`` for the block, checked to answer (a
    :class:`QueueConnectError` says why not, in one sentence); coredis's own log records go
    to ``log`` meanwhile."""
    where = redacted(url)
    try:
        client: coredis.Redis[bytes] = coredis.Redis.from_url(
            url, connect_timeout=CONNECT_TIMEOUT, decode_responses=False
        )
    except (ValueError, coredis.exceptions.RedisError) as e:
        raise QueueConnectError(f"the queue URL {where} is not usable: {e}") from None
    async with forward_redis_logs(log):
        try:
            async with client:
                try:
                    with anyio.fail_after(CONNECT_TIMEOUT * 2):
                        await client.ping()
                except coredis.exceptions.AuthenticationError as e:
                    if urllib.parse.urlsplit(url).password is None:
                        raise QueueConnectError(
                            f"Redis at {where} needs a password: put it in the queue URL"
                            " (redis://:PASSWORD@host:port/db)"
                        ) from None
                    raise QueueConnectError(f"Redis at {where} refused the password: {e}") from None
                except (*TRANSIENT, coredis.exceptions.RedisError) as e:
                    raise QueueConnectError(
                        f"cannot reach Redis at {where}: {e or type(e).__name__}"
                    ) from None
                yield client
        except BaseExceptionGroup as group:
            raise_single(group)
