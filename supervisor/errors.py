"""Exception families, classified by who is at fault.

* :class:`BadInput` -- the user's config, job or request is wrong. The CLI turns it into
  exit code 2 and one sentence on stderr; the HTTP API turns it into a 400.
* :class:`PodError` -- the pod cannot do its work (a container died, the port is owned by a
  stranger, ...). It carries the Cortex status code the job should end with.
  :class:`StartError`, one of them, says the pod could not start at all: the job has not
  failed and stays resumable.
"""

from __future__ import annotations

from typing import Any, NoReturn, TypeVar

__all__ = [
    "BadInput",
    "ConfigError",
    "JobError",
    "PodError",
    "PortOwnerError",
    "StartError",
    "SupervisorError",
    "first_leaf",
    "printable",
    "raise_single",
]

E = TypeVar("E", bound=BaseException)


class SupervisorError(Exception):
    """Base class for every error the supervisor raises on purpose."""


class BadInput(SupervisorError):
    """Input supplied by the user is invalid; the message is one sentence naming the field."""


class ConfigError(BadInput):
    """The BatchAPI configuration file is invalid."""


class JobError(BadInput):
    """The job submission is invalid."""


class PodError(SupervisorError):
    """The pod cannot process batches. ``status`` is the Cortex job status it implies."""

    def __init__(self, message: str, status: str = "worker_error") -> None:
        super().__init__(message)
        self.status = status


class PortOwnerError(PodError):
    """pod.port is held by a process that is not ours, or claimed by two containers."""


class StartError(PodError):
    """A pod could not start (a command not found, pod.port held by a stranger). Not the
    job's fault: the job is left as it was, to be resumed once the cause is fixed."""


def first_leaf(group: BaseExceptionGroup[BaseException], kind: type[E]) -> E:
    """The first exception of type ``kind`` in a (nested) exception group from task groups."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            try:
                return first_leaf(exc, kind)
            except LookupError:
                continue
        if isinstance(exc, kind):
            return exc
    raise LookupError(kind.__name__)


def raise_single(group: BaseExceptionGroup[Any]) -> NoReturn:
    """Raise a group of one exception (from a task group) as that exception, with its own
    context; a group of several as itself."""
    if len(group.exceptions) != 1:
        raise group
    exc = group.exceptions[0]
    context = exc.__context__
    try:
        raise exc
    finally:
        exc.__context__ = context
        del exc, group


def printable(text: str) -> str:
    """``text`` for an error message: control characters and undecodable bytes (the surrogates
    of :func:`os.fsdecode`) escaped, ``\\x00``-style, so the message stays one readable line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)
