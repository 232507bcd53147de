"""A real ``redis-server`` for the tests: a free port, a temp dir, AOF on, killed at the end."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
START_TIMEOUT = 10.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """One ``redis-server`` process; :meth:`start` again after :meth:`kill` restarts it on
    the same port and directory (its AOF brings the data back)."""

    def __init__(self, directory: Path, *extra: str) -> None:
        if not Path(REDIS_SERVER).exists():
            pytest.skip("redis-server is not installed (apt-get install redis-server)")
        self.dir = directory
        self.port = _free_port()
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0, password: str | None = None, host: str = "127.0.0.1") -> str:
        """``host``: one of the addresses it listens on (``--bind`` in the extra arguments)."""
        auth = f":{password}@" if password is not None else ""
        return f"redis://{auth}{host}:{self.port}/{db}"

    def start(self) -> None:
        args = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1"]
        args += ["--save", "", "--appendonly", "yes", "--dir", str(self.dir), *self.extra]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert self.proc.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT
        # redis-server logs to stdout: read until it says it accepts connections.
        for line in self.proc.stdout:
            if b"Ready to accept connections" in line:
                break
            if time.monotonic() > deadline:
                break
        else:
            raise RuntimeError(f"redis-server exited with {self.proc.wait()}")
        if time.monotonic() > deadline:
            self.kill()
            raise RuntimeError("redis-server did not start in time")
        # Drain the rest of its log in the background so it never blocks on a full pipe.
        self._drain = threading.Thread(target=self.proc.stdout.read, daemon=True)
        self._drain.start()

    @contextmanager
    def running(self) -> Iterator[RedisServer]:
        """Started for the block, killed after it (also when the block fails)."""
        self.start()
        try:
            yield self
        finally:
            self.kill()

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(START_TIMEOUT)
            if self.proc.stdout is not None:
                self._drain.join(START_TIMEOUT)
                self.proc.stdout.close()
            self.proc = None

    def flush(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall(b"FLUSHALL\r\n")
            assert s.recv(16).startswith(b"+OK")
