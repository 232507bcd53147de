"""Child processes of the benchmark: pinned, in their own process group, always stopped.

:class:`Procs` is a context manager that owns every process the bench starts. Each child gets
its own session (so a signal reaches it and whatever it forks), optionally pinned to one CPU
with ``taskset``. :meth:`Procs.stop` sends SIGTERM to the group, waits, then SIGKILLs the group
and any descendant that moved to a group of its own (the supervisor puts its containers in
theirs); leaving the ``with`` block stops whatever is still running.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parent.parent
TASKSET = shutil.which("taskset")
PINNING = TASKSET is not None and (os.cpu_count() or 1) >= 2
WORKER_CPU = 0
LOAD_CPU = 1


def pinned(argv: Sequence[str], cpu: int | None) -> list[str]:
    """``argv`` run on ``cpu`` only (``taskset`` execs, so the pid stays the program's)."""
    if cpu is None or not PINNING:
        return list(argv)
    return [str(TASKSET), "-c", str(cpu), *argv]


def bench_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("PYTHONDEVMODE", None)
    env.update(extra or {})
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float, proc: subprocess.Popen[Any] | None = None) -> float:
    """Poll until 127.0.0.1:port accepts; returns the time.time() it did. Raises on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return time.time()
        except OSError:
            pass
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(
                f"the process exited ({proc.returncode}) before port {port} answered"
            )
        if time.monotonic() > deadline:
            raise TimeoutError(f"port {port} did not answer within {timeout:g} s")
        time.sleep(0.002)


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (Linux /proc), children first."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    out: list[int] = []
    todo = [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        out.extend(kids)
        todo.extend(kids)
    return out


def vm_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _kill(pids: Sequence[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _killpg(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class Procs:
    """Starts children and guarantees they are gone when the ``with`` block ends."""

    def __init__(self) -> None:
        self._live: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Procs:
        return self

    def __exit__(self, *exc: object) -> None:
        while self._live:
            self.stop(self._live[-1])

    def start(
        self,
        argv: Sequence[str],
        *,
        cpu: int | None = None,
        env: Mapping[str, str] | None = None,
        stdout: int | IO[Any] | None = subprocess.DEVNULL,
        stderr: int | IO[Any] | None = subprocess.DEVNULL,
        cwd: Path = REPO,
    ) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            pinned(argv, cpu),
            env=bench_env(env),
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            cwd=cwd,
            start_new_session=True,
        )
        self._live.append(proc)
        return proc

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float,
        cpu: int | None = None,
        env: Mapping[str, str] | None = None,
        stdout: int | IO[Any] | None = subprocess.PIPE,
        stderr: int | IO[Any] | None = subprocess.PIPE,
    ) -> tuple[int, bytes, bytes]:
        """Run to the end (bounded by ``timeout``); returns (exit code, stdout, stderr)."""
        proc = self.start(argv, cpu=cpu, env=env, stdout=stdout, stderr=stderr)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop(proc, grace=2.0)
            raise TimeoutError(
                f"{Path(argv[0]).name} ... did not finish within {timeout:g} s"
            ) from None
        finally:
            self.stop(proc)
        return proc.returncode, out or b"", err or b""

    def stop(self, proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
        """SIGTERM the group, wait ``grace``, SIGKILL the group and any stray descendant."""
        if proc not in self._live:
            return
        kids = descendants(proc.pid) if proc.poll() is None else []
        if proc.poll() is None:
            _killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        _killpg(proc.pid, signal.SIGKILL)
        _kill(kids, signal.SIGKILL)
        try:
            proc.wait(5.0)
        except subprocess.TimeoutExpired:
            pass
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
        self._live.remove(proc)
