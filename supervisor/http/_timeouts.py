"""When a server connection has waited too long: the rule both servers follow.

Theory of operation
-------------------
Each client connection is in one :class:`Phase` at a time, stamped with the clock when it
entered it: waiting for the next request (``IDLE``, also a fresh connection), part of a head
read (``HEAD``), the head read and the body not (``BODY``), the request being answered
(``BUSY``), or an error answer going out before the close (``CLOSING``). The I/O loops
(:class:`~supervisor.http.relay.Relay`, :func:`~supervisor.http.server.serve_sockets`) only
record phase changes, with a clock they already read; every :attr:`Timeouts.sweep` seconds
they ask :func:`overdue` which connections waited too long, and carry out the
:class:`Verdict`:

* ``HEAD`` or ``BODY`` for ``read`` seconds: answer ``408`` with ``Connection: close``, then
  close (``TIMED_OUT``). The time counts from the first byte of the head, and from the end
  of the head for the body: a client trickling bytes does not hold the connection longer.
* ``IDLE`` for ``idle`` seconds: close without a word (``CLOSE``), as a keep-alive server does.
* ``CLOSING`` for ``read`` seconds (a client that does not take its error answer): ``CLOSE``.
* ``BUSY`` is never overdue here: the upstream timeout bounds a forwarded request.

So no syscall is spent per request on timers: a phase change is an attribute store, and the
check runs at most every ``sweep`` seconds, only while connections are open.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import TypeVar

import msgspec

__all__ = ["DEFAULT_TIMEOUTS", "Phase", "Timeouts", "Verdict", "overdue", "verdict"]

K = TypeVar("K")


class Phase(enum.Enum):
    """What a client connection is waiting for (see the module docstring)."""

    IDLE = "idle"
    HEAD = "head"
    BODY = "body"
    BUSY = "busy"
    CLOSING = "closing"


class Verdict(enum.Enum):
    """What to do with a connection now."""

    KEEP = "keep"
    TIMED_OUT = "timed out"  # answer 408 with Connection: close, then close
    CLOSE = "close"  # close without an answer


class Timeouts(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How long a client connection may wait, in seconds.

    ``read`` bounds the arrival of a request's head, and of its body (30 s: generous for a
    batch on any network, short enough that a stalled client frees its socket soon);
    ``idle`` bounds a keep-alive connection between requests (75 s, as nginx: longer than
    the usual client-side idle limits, so the client closes first and never races a close).
    """

    read: float = 30.0
    idle: float = 75.0

    def __post_init__(self) -> None:
        for name in ("read", "idle"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"Expected `{name}` > 0 seconds, got {value!r}.")

    @property
    def sweep(self) -> float:
        """How often to look for overdue connections: every second, or more often when a
        timeout is shorter (a timeout is then late by at most a quarter of itself)."""
        return min(1.0, self.read / 4, self.idle / 4)


DEFAULT_TIMEOUTS = Timeouts()


def verdict(phase: Phase, since: float, now: float, timeouts: Timeouts) -> Verdict:
    """What to do with a connection that entered ``phase`` at ``since``, at time ``now``."""
    if phase is Phase.BUSY:
        return Verdict.KEEP
    if phase is Phase.IDLE:
        return Verdict.CLOSE if now - since >= timeouts.idle else Verdict.KEEP
    if now - since < timeouts.read:
        return Verdict.KEEP
    return Verdict.CLOSE if phase is Phase.CLOSING else Verdict.TIMED_OUT


def overdue(
    connections: Iterable[tuple[K, Phase, float]], now: float, timeouts: Timeouts
) -> list[tuple[K, Verdict]]:
    """The connections (``(key, phase, since)``) to act on at ``now``, with what to do."""
    found: list[tuple[K, Verdict]] = []
    for key, phase, since in connections:
        action = verdict(phase, since, now, timeouts)
        if action is not Verdict.KEEP:
            found.append((key, action))
    return found
