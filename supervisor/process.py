"""Containers as child processes: spawning, output relay, stopping, how they ended.

Theory of operation
-------------------
:func:`open_child` is the only way a container runs (docs/container-contract.md, "How the
command runs"). It spawns the command with ``start_new_session=True``, so every container is
the leader of its own session and process group: a signal sent to the group
(``os.killpg(pid, ...)``) reaches the whole container, the way a signal to a Kubernetes
container reaches its processes. On Linux the command runs behind a trampoline that ties its
life to ours (:func:`supervisor.linux.die_with_parent`). Its stdout and stderr are pipes of
ours (non-blocking read ends): relay tasks, owned by the context manager, read them when they
turn readable, cut them into lines (:class:`LineSplitter`: a partial last line is flushed at
EOF, an endless line is cut into 64 KiB pieces) and hand each line to ``on_line``; the last
8 KiB of stderr are kept for error reports. :meth:`Child.stderr_tail` first reads whatever the
pipe holds, synchronously: a worker that logs why a batch failed and then answers has its
line in the tail, with no wait for the relay task to be scheduled.

Leaving the context, for whatever reason (normal exit, an exception, cancellation), runs a
shielded cleanup: :meth:`Child.terminate` (SIGTERM to the group, ``grace`` seconds, SIGKILL to
the group), a bounded wait for the relays to drain the pipes, then closing the pipes. When the
container's main process has ended, whatever is left in its process group is SIGKILLed at
once, as Kubernetes does when a container's main process exits. Processes that left the group
(``setsid`` daemons) are the reaper's business (:mod:`supervisor.reaper`).

A SIGKILL counts as the OOM killer's (:attr:`Exit.oom_killed`) when the cgroup's OOM-kill
counter rose between spawn and exit (:func:`supervisor.linux.oom_evidence`). A SIGKILL we
sent ourselves never counts.

The pids this module spawned are kept in a registry (:func:`is_direct_child`) so the orphan
reaper never steals the exit status of a process anyio is waiting for.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import anyio.abc
import msgspec

from supervisor.errors import StartError
from supervisor.leftovers import Ledger
from supervisor.linux import die_with_parent, memory_events_path, oom_evidence, oom_kill_count

__all__ = [
    "Child",
    "Exit",
    "LineSplitter",
    "is_direct_child",
    "open_child",
]

MAX_LINE = 64 * 1024
"""Longest line relayed in one piece; longer ones are cut."""

STDERR_TAIL = 8 * 1024
"""Bytes of stderr kept per child for error reports."""

_READ_SIZE = 65536

DRAIN_TIMEOUT = 2.0
"""After the child is gone, how long the relays may take to empty the pipes (a daemon that
left the process group may hold them open forever)."""


# --------------------------------------------------------------------------------------------
# How a child ended


class Exit(msgspec.Struct, frozen=True):
    """How a child process ended: an exit code, or a signal (maybe from the OOM killer)."""

    returncode: int | None
    signal: int | None = None
    oom_killed: bool = False

    @classmethod
    def from_returncode(cls, returncode: int, *, oom_killed: bool = False) -> Exit:
        """From a Popen-style return code (negative = killed by that signal)."""
        if returncode < 0:
            sig = -returncode
            return cls(None, sig, oom_killed=oom_killed and sig == signal.SIGKILL)
        return cls(returncode, None)

    @property
    def exit_status(self) -> int:
        """The status a shell would report: the code, or 128 + the signal number."""
        if self.returncode is not None:
            return self.returncode
        return 128 + (self.signal or 0)

    def describe(self) -> str:
        """``exited with code 3``, ``killed by SIGTERM``, ``killed by SIGKILL (OOM killer)``."""
        if self.signal is not None:
            try:
                name = signal.Signals(self.signal).name
            except ValueError:
                name = f"signal {self.signal}"
            return f"killed by {name} (OOM killer)" if self.oom_killed else f"killed by {name}"
        if self.returncode is not None:
            return f"exited with code {self.returncode}"
        return "is still running"


# --------------------------------------------------------------------------------------------
# Output relay


class LineSplitter:
    """Bytes in, text lines out (sans-IO). Lines lose their ``\\n`` (and a ``\\r`` before it);
    a line longer than ``max_line`` bytes comes out in pieces cut on UTF-8 boundaries."""

    __slots__ = ("_buf", "_max")

    def __init__(self, max_line: int = MAX_LINE) -> None:
        if max_line < 4:
            raise ValueError("max_line must be at least 4 bytes")
        self._buf = bytearray()
        self._max = max_line

    def feed(self, data: bytes) -> list[str]:
        buf = self._buf
        buf += data
        lines: list[str] = []
        start = 0
        while True:
            nl = buf.find(b"\n", start, start + self._max + 1)
            if nl >= 0:
                lines.append(_decode(buf[start:nl]))
                start = nl + 1
            elif len(buf) - start > self._max:
                cut = start + self._max
                floor = cut - 3
                while cut > floor and buf[cut] & 0xC0 == 0x80:  # inside a UTF-8 sequence
                    cut -= 1
                lines.append(_decode(buf[start:cut]))
                start = cut
            else:
                break
        del buf[:start]
        return lines

    def flush(self) -> list[str]:
        """The partial last line, if any (call at EOF)."""
        if not self._buf:
            return []
        line = _decode(self._buf)
        self._buf.clear()
        return [line]


def _decode(raw: bytes | bytearray) -> str:
    if raw.endswith(b"\r"):
        raw = raw[:-1]
    return raw.decode("utf-8", errors="replace")


# --------------------------------------------------------------------------------------------
# The registry of our direct children (for the reaper)


class _Registry:
    def __init__(self) -> None:
        self.pids: set[int] = set()
        self.spawning = 0


_registry = _Registry()


def is_direct_child(pid: int) -> bool:
    """True if ``pid`` was spawned by :func:`open_child` and anyio has not reaped it yet, or
    while a spawn is in flight (its pid is not known yet, so every pid counts as ours)."""
    return _registry.spawning > 0 or pid in _registry.pids


# --------------------------------------------------------------------------------------------
# The child


OnLine = Callable[[str, str], None]


class _Output:
    """Our read end of a container's stdout or stderr pipe (non-blocking).

    The relay task reads it whenever it turns readable; :meth:`drain` also runs synchronously
    when someone needs everything the container wrote so far (the stderr tail of a failed
    batch: the worker wrote its reason before it answered, so it is in the pipe now). Either
    way each chunk is cut into lines for ``on_line`` and, for stderr, kept in the tail.
    """

    def __init__(self, name: str, on_line: OnLine | None, tail: bytearray | None) -> None:
        self.name = name
        self.fd, self.write_fd = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(self.fd, False)  # ours only: the child's end stays blocking
        self._on_line = on_line
        self._tail = tail
        self._splitter = LineSplitter()
        self.done = False  # end of file seen (or the pipe closed)

    def drain(self) -> None:
        """Read what the pipe holds now, without waiting."""
        while not self.done:
            try:
                data = os.read(self.fd, _READ_SIZE)
            except BlockingIOError:
                return
            except OSError:  # closed under us
                data = b""
            if not data:
                self.done = True
                self._emit(self._splitter.flush())
                return
            tail = self._tail
            if tail is not None:
                tail += data
                if len(tail) > STDERR_TAIL:
                    del tail[:-STDERR_TAIL]
            self._emit(self._splitter.feed(data))

    def _emit(self, lines: list[str]) -> None:
        if self._on_line is not None:
            for line in lines:
                self._on_line(self.name, line)

    async def relay(self) -> None:
        """Relay until end of file (every writer, grandchildren included, closed it)."""
        while not self.done:
            await anyio.wait_readable(self.fd)
            self.drain()

    def close(self) -> None:
        self.done = True
        for fd in (self.fd, self.write_fd):
            if fd >= 0:
                os.close(fd)
        self.fd = self.write_fd = -1

    def close_write_end(self) -> None:
        """After the spawn: only the child holds the write end, so its exit is our EOF."""
        if self.write_fd >= 0:
            os.close(self.write_fd)
            self.write_fd = -1


class Child:
    """A running container process; made by :func:`open_child`."""

    def __init__(
        self,
        name: str,
        process: anyio.abc.Process,
        *,
        outputs: tuple[_Output, _Output],
        oom_path: Path | None = None,
        oom_before: int | None = None,
    ) -> None:
        self.name = name
        self.pid = process.pid
        self._process = process
        self._oom_path = oom_path
        self._oom_before = oom_before
        self._killed_by_us = False
        self._exit: Exit | None = None
        self._stdout, self._stderr = outputs
        self._tail = outputs[1]._tail if outputs[1]._tail is not None else bytearray()
        self._drained = anyio.Event()

    def __repr__(self) -> str:
        return f"<Child {self.name!r} pid={self.pid} returncode={self.returncode}>"

    @property
    def returncode(self) -> int | None:
        """Popen-style: None while running, negative for a signal."""
        return self._process.returncode

    @property
    def exit(self) -> Exit | None:
        """How the child ended, once :meth:`wait` has seen it end."""
        return self._exit

    async def wait(self) -> Exit:
        """Wait for the main process to end (any number of tasks may wait)."""
        returncode = await self._process.wait()
        return self._finish(returncode)

    async def terminate(self, grace: float) -> Exit:
        """SIGTERM the process group, wait up to ``grace`` seconds, then SIGKILL it. Idempotent."""
        if self._process.returncode is None:
            self.send_signal_group(signal.SIGTERM)
            with anyio.move_on_after(grace):
                await self._process.wait()
            if self._process.returncode is None:
                self._kill()
        return await self.wait()

    def send_signal_group(self, sig: int) -> None:
        """Send ``sig`` to every process in the child's process group (gone: ignored)."""
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass  # nobody left (PermissionError: a group of zombies, on some systems)

    def stderr_tail(self, limit: int = 4096) -> str:
        """The last ``limit`` bytes of stderr, decoded, including what the pipe holds now."""
        self._stderr.drain()
        data = bytes(self._tail[-limit:]) if limit > 0 else b""
        skip = 0
        while skip < min(3, len(data)) and data[skip] & 0xC0 == 0x80:
            skip += 1  # do not start in the middle of a UTF-8 sequence
        return data[skip:].decode("utf-8", errors="replace")

    # -- internals ---------------------------------------------------------------------------

    def kill(self) -> None:
        """SIGKILL the process group now (whoever is waiting in :meth:`terminate` returns)."""
        self._kill()

    def _kill(self) -> None:
        self._killed_by_us = True
        self.send_signal_group(signal.SIGKILL)
        try:
            # The leader, even if it somehow left its group. os.kill, not Process.kill():
            # Popen.send_signal() polls first, and that waitpid() would reap a leader the
            # killpg above just killed, stealing its status from the event loop's watcher
            # (asyncio then reports returncode 255).
            if self._process.returncode is None:
                os.kill(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def _finish(self, returncode: int) -> Exit:
        if self._exit is None:
            oom = False
            if returncode == -signal.SIGKILL and not self._killed_by_us:
                oom = oom_evidence(self._oom_before, oom_kill_count(self._oom_path))
            self._exit = Exit.from_returncode(returncode, oom_killed=oom)
            _registry.pids.discard(self.pid)
            # The main process is gone: whatever is left of its group goes with it (as when a
            # Kubernetes container's main process exits). Done once, right after reaping, while
            # the group id cannot have been reused.
            self.send_signal_group(signal.SIGKILL)
        return self._exit

    async def _relay_outputs(self) -> None:
        """Relay stdout and stderr until both reach end of file (or we are cancelled: what
        is left is read at :meth:`_close`), then say so."""
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._stdout.relay)
                tg.start_soon(self._stderr.relay)
        finally:
            self._drained.set()

    async def _close(self) -> None:
        """Last resort and pipe cleanup: kill if still running, close pipes, reap."""
        if self._process.returncode is None:
            self._kill()
        for output in (self._stdout, self._stderr):
            if not output.done:
                output.drain()  # what is left, if the relays were cut short
            output.close()
        await self._process.aclose()
        returncode = self._process.returncode
        if returncode is not None:
            self._finish(returncode)


def _spawn_error(name: str, argv: Sequence[str], cwd: Path | None, exc: OSError) -> StartError:
    command = argv[0]
    if isinstance(exc, FileNotFoundError):
        if cwd is not None and exc.filename is not None and str(exc.filename) == str(cwd):
            return StartError(f"container `{name}`: working directory `{cwd}` does not exist")
        return StartError(f"container `{name}`: command `{command}` not found")
    if isinstance(exc, PermissionError):
        return StartError(
            f"container `{name}`: command `{command}` is not executable (permission denied)"
        )
    reason = exc.strerror or str(exc)
    return StartError(f"container `{name}`: cannot start command `{command}`: {reason}")


@asynccontextmanager
async def open_child(
    name: str,
    argv: Sequence[str],
    env: Mapping[str, str],
    *,
    cwd: Path | None = None,
    on_line: OnLine | None = None,
    grace: float = 10.0,
    ledger: Ledger | None = None,
) -> AsyncIterator[Child]:
    """Run ``argv`` (no shell) as container ``name`` for the duration of the ``async with``.

    Raises :class:`StartError` if it cannot be started. On leaving, a child still running is
    terminated (SIGTERM, ``grace``, SIGKILL); nothing it started in its process group survives.
    With a ``ledger`` the container is marked and recorded, so that what it leaves behind if
    this process dies uncleanly can be found by the next run (:mod:`supervisor.leftovers`).
    """
    if not argv:
        raise StartError(f"container `{name}`: the command is empty")
    oom_path = memory_events_path()
    oom_before = oom_kill_count(oom_path)
    outputs = (_Output("stdout", on_line, None), _Output("stderr", on_line, bytearray()))
    _registry.spawning += 1
    try:
        command = die_with_parent(argv, env, cwd)
        with anyio.CancelScope(shield=True):  # a half-spawned child could not be cleaned up
            process = await anyio.open_process(
                command,
                stdin=subprocess.DEVNULL,
                stdout=outputs[0].write_fd,
                stderr=outputs[1].write_fd,
                cwd=cwd,
                env={**env, **ledger.env()} if ledger is not None else dict(env),
                start_new_session=True,
            )
            if ledger is not None:
                ledger.add(process.pid)
    except OSError as exc:
        for output in outputs:
            output.close()
        raise _spawn_error(name, argv, cwd, exc) from None
    else:
        _registry.pids.add(process.pid)
    finally:
        _registry.spawning -= 1
    for output in outputs:
        output.close_write_end()

    child = Child(name, process, outputs=outputs, oom_path=oom_path, oom_before=oom_before)
    body_error: BaseException | None = None
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(child._relay_outputs)
            try:
                yield child
            except BaseException as exc:
                # Re-raised below, outside the task group, so callers see it as it was and
                # not wrapped in an exception group.
                body_error = exc
            finally:
                with anyio.CancelScope(shield=True):
                    await child.terminate(grace)
                    with anyio.move_on_after(DRAIN_TIMEOUT):
                        await child._drained.wait()
                tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await child._close()
            if ledger is not None:
                await anyio.to_thread.run_sync(ledger.discard, child.pid)
    if body_error is not None:
        try:
            raise body_error
        finally:
            body_error = None
