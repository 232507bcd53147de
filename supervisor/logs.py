"""Structured logs: one JSON object per line (docs/operations.md).

``Logger`` is deliberately tiny: a stream, a set of base fields (``api_name``, ``job_id``, ...)
and ``info``/``warning``/``error``. Writes are synchronous and unbuffered so a crash loses
nothing; the volume is low except for relayed child output, which is one write per line.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import IO, Any

import msgspec

__all__ = ["Logger"]

_encoder = msgspec.json.Encoder()


class Logger:
    """Writes ``{"ts", "level", "event", **base, **fields}`` lines to ``stream``."""

    __slots__ = ("_base", "_lock", "_prefix", "_stream")

    def __init__(self, stream: IO[str] | None = None, **base: Any) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self._base = base
        self._lock = threading.Lock()
        # On a terminal a progress bar may own the current line: clear it before each record.
        try:
            self._prefix = "\r\x1b[K" if self._stream.isatty() else ""
        except (AttributeError, ValueError):
            self._prefix = ""

    def bind(self, **fields: Any) -> Logger:
        """A logger writing to the same stream with more base fields."""
        child = Logger(self._stream, **{**self._base, **fields})
        child._lock = self._lock
        return child

    def log(self, level: str, event: str, **fields: Any) -> None:
        record = {"ts": round(time.time(), 6), "level": level, "event": event}
        record.update(self._base)
        record.update(fields)
        line = self._prefix + _encoder.encode(record).decode() + "\n"
        with self._lock:
            try:
                self._stream.write(line)
                self._stream.flush()
            except (OSError, ValueError):
                pass  # a closed or broken log stream must never take the pod down

    def debug(self, event: str, **fields: Any) -> None:
        self.log("debug", event, **fields)

    def info(self, event: str, **fields: Any) -> None:
        self.log("info", event, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        self.log("warning", event, **fields)

    def error(self, event: str, **fields: Any) -> None:
        self.log("error", event, **fields)
