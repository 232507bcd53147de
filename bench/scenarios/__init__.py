"""The scenarios (docs/benchmarks.md): each is ``run(ctx) -> list[Row]``, never raising for a failed figure.

A figure that cannot be measured (a tool missing, a supervisor command failing) becomes
``n/a (error: ...)`` in its cell; the other figures of the run are still measured.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.procs import Procs


@dataclass
class Context:
    procs: Procs
    tmp: Path
    quick: bool
    repeats: int
    seconds: float  # how long each wrk / peer measurement runs
    target: float  # how long a `supervisor run` should dispatch for, sized from wrk's rate
    workers: list[str]
    split_items: int
    max_items: int = 200_000
    missing: dict[str, str] = field(default_factory=dict)  # tool -> why it is unavailable
    started: float = field(default_factory=time.monotonic)
    _dirs: int = 0

    def say(self, text: str) -> None:
        sys.stderr.write(f"[bench {time.monotonic() - self.started:6.1f}s] {text}\n")
        sys.stderr.flush()

    def fresh_dir(self, name: str) -> Path:
        self._dirs += 1
        path = self.tmp / f"{name}-{self._dirs}"
        path.mkdir(parents=True)
        return path


SCENARIOS = ("dispatch", "proxy", "split", "footprint", "serve", "redis")
