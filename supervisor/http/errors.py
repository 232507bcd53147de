"""The HTTP layer's exceptions, classified by what failed and by who is at fault.

Modelled on httpcore's ``_exceptions.py`` (timeout / network / protocol families) and h11's
``_util.py`` (local vs remote protocol errors, with a status hint for servers)::

    HTTPError
    ├── TimeoutException      (also a builtin TimeoutError)
    │   ├── ConnectTimeout
    │   ├── ReadTimeout
    │   └── WriteTimeout
    ├── NetworkError
    │   ├── ConnectError      the TCP connection could not be opened
    │   ├── ReadError         the connection broke while reading
    │   └── WriteError        the connection broke while writing
    └── ProtocolError
        ├── RemoteProtocolError   the peer sent something that is not valid HTTP/1.1
        └── LocalProtocolError    we were asked to send something that is not valid HTTP/1.1

Backend exceptions (``OSError``, anyio's ``BrokenResourceError``, h11's errors) are converted
at the edge and chained with ``raise ... from``, so callers only ever catch these.
"""

from __future__ import annotations

import builtins

from supervisor.errors import SupervisorError

__all__ = [
    "ConnectError",
    "ConnectTimeout",
    "HTTPError",
    "LocalProtocolError",
    "NetworkError",
    "ProtocolError",
    "ReadError",
    "ReadTimeout",
    "RemoteProtocolError",
    "TimeoutException",
    "WriteError",
    "WriteTimeout",
]


class HTTPError(SupervisorError):
    """Base class for every error of the HTTP layer; the message is one plain sentence."""


class TimeoutException(HTTPError, builtins.TimeoutError):
    """An HTTP operation did not finish in time (only raised where a timeout was given)."""


class ConnectTimeout(TimeoutException):
    """Opening the connection took too long."""


class ReadTimeout(TimeoutException):
    """The peer took too long to send its message."""


class WriteTimeout(TimeoutException):
    """Sending our message took too long."""


class NetworkError(HTTPError):
    """The connection failed below HTTP (refused, reset, closed)."""


class ConnectError(NetworkError):
    """The TCP connection could not be opened."""


class ReadError(NetworkError):
    """The connection broke while we were reading from it."""


class WriteError(NetworkError):
    """The connection broke while we were writing to it."""


class ProtocolError(HTTPError):
    """An HTTP/1.1 rule was broken. ``error_status_hint`` is the status a server would answer."""

    def __init__(self, message: str, error_status_hint: int = 400) -> None:
        super().__init__(message)
        self.error_status_hint = error_status_hint


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes that are not valid HTTP/1.1 (or closed the connection too early)."""


class LocalProtocolError(ProtocolError):
    """We were asked to send something invalid, or to use a connection the wrong way."""
