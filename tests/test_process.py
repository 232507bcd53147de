"""supervisor.process and supervisor.reaper against real child processes."""

from __future__ import annotations

import os
import signal
import socket
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from supervisor.env import build_env
from supervisor.errors import PodError
from supervisor.linux import is_subreaper
from supervisor.process import MAX_LINE, Exit, LineSplitter, is_direct_child, open_child
from supervisor.proctable import read_stat
from supervisor.reaper import kill_descendants, reap_orphans

pytestmark = pytest.mark.timeout(60)


def py(code: str) -> list[str]:
    return [sys.executable, "-u", "-c", textwrap.dedent(code)]


ENV = dict(os.environ)


class Lines:
    """An ``on_line`` callback that records lines and lets a test wait for one."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []
        self._event: anyio.Event | None = None

    def __call__(self, stream: str, line: str) -> None:
        self.items.append((stream, line))
        if self._event is not None:
            self._event.set()

    def of(self, stream: str) -> list[str]:
        return [line for s, line in self.items if s == stream]

    async def wait_for(self, pred: Callable[[str, str], bool]) -> str:
        with anyio.fail_after(10):
            while True:
                for s, line in self.items:
                    if pred(s, line):
                        return line
                self._event = anyio.Event()
                await self._event.wait()

    async def first(self, stream: str = "stdout") -> str:
        return await self.wait_for(lambda s, _: s == stream)


def alive(pid: int) -> bool:
    stat = read_stat(pid)
    return stat is not None and stat.state not in ("Z", "X")


async def poll(cond: Callable[[], bool]) -> None:
    """Wait (bounded) for a condition on /proc, which offers nothing to await."""
    with anyio.fail_after(10):
        while not cond():  # noqa: ASYNC110 -- no event exists for a process becoming a zombie
            await anyio.sleep(0.01)


async def wait_dead(pid: int) -> None:
    """Wait until ``pid`` is gone or a zombie (its parent may not be us)."""
    await poll(lambda: not alive(pid))


def kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# -- line splitting, exits ------------------------------------------------------------------


def _feed_all(splitter: LineSplitter, chunks: list[bytes]) -> list[str]:
    out: list[str] = []
    for chunk in chunks:
        out += splitter.feed(chunk)
    return out + splitter.flush()


def test_line_splitter_whole_and_bytewise() -> None:
    data = "one\r\ntwo\n\nthrée\npartial".encode()
    expected = ["one", "two", "", "thrée", "partial"]
    assert _feed_all(LineSplitter(), [data]) == expected
    assert _feed_all(LineSplitter(), [data[i : i + 1] for i in range(len(data))]) == expected
    assert LineSplitter().flush() == []


def test_line_splitter_cuts_long_lines_on_utf8_boundaries() -> None:
    splitter = LineSplitter(max_line=8)
    text = "ééééééé"  # 14 bytes, no newline yet
    pieces = splitter.feed(text.encode())
    assert pieces == ["éééé"]  # 8 bytes max, never half a character
    pieces = splitter.feed(b"abcdefghij\n")
    assert pieces == ["éééab", "cdefghij"]
    assert splitter.feed(b"12345678\n") == ["12345678"]  # exactly max_line: one line
    assert splitter.flush() == []
    assert LineSplitter(max_line=8).feed("aééééé".encode()) == ["aééé"]  # 7 bytes, not 8


def test_exit_describe() -> None:
    assert Exit.from_returncode(3).describe() == "exited with code 3"
    assert Exit.from_returncode(0) == Exit(returncode=0, signal=None, oom_killed=False)
    term = Exit.from_returncode(-signal.SIGTERM)
    assert (term.returncode, term.signal, term.describe()) == (None, 15, "killed by SIGTERM")
    assert term.exit_status == 143
    oom = Exit.from_returncode(-signal.SIGKILL, oom_killed=True)
    assert oom.describe() == "killed by SIGKILL (OOM killer)"
    assert Exit.from_returncode(-signal.SIGTERM, oom_killed=True).oom_killed is False
    assert Exit(None, 200).describe() == "killed by signal 200"


# -- children ---------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_output_is_relayed_line_by_line() -> None:
    lines = Lines()
    code = """
        import sys
        print("out 1"); print("out 2")
        sys.stderr.write("err 1\\nerr 2\\n"); sys.stderr.flush()
        sys.stdout.write("no newline at the end")
        sys.exit(3)
    """
    async with open_child("api", py(code), ENV, on_line=lines) as child:
        assert is_direct_child(child.pid)
        assert child.name == "api"
        exit_ = await child.wait()
    assert not is_direct_child(child.pid)
    assert exit_ == Exit(returncode=3, signal=None, oom_killed=False)
    assert exit_.describe() == "exited with code 3"
    assert child.returncode == 3
    assert lines.of("stdout") == ["out 1", "out 2", "no newline at the end"]
    assert lines.of("stderr") == ["err 1", "err 2"]
    assert child.stderr_tail() == "err 1\nerr 2\n"


@pytest.mark.anyio
async def test_env_and_cwd_reach_the_child(tmp_path: Path) -> None:
    lines = Lines()
    code = "import os; print(os.environ['GREETING'], os.getcwd())"
    env = build_env({"GREETING": "hello $(WHO)"}, {"WHO": "pod"})
    async with open_child("api", py(code), env, cwd=tmp_path, on_line=lines) as child:
        await child.wait()
    assert lines.of("stdout") == [f"hello pod {tmp_path}"]


@pytest.mark.anyio
async def test_stderr_tail_keeps_the_end() -> None:
    code = """
        import sys
        for i in range(2000):
            sys.stderr.write(f"noise line {i:05d}\\n")
        sys.stderr.write("Traceback: the real error\\n")
    """
    async with open_child("api", py(code), ENV) as child:
        await child.wait()
    # the relays drain the pipes before the context ends
    tail = child.stderr_tail(100)
    assert tail.endswith("Traceback: the real error\n")
    assert len(tail.encode()) <= 100
    assert len(child.stderr_tail(100_000).encode()) <= 8 * 1024
    assert child.stderr_tail(0) == ""


@pytest.mark.anyio
async def test_very_long_line_is_cut_into_chunks() -> None:
    lines = Lines()
    size = 3 * MAX_LINE + 17
    code = f"import sys; sys.stdout.write('x' * {size} + '\\nshort\\n')"
    async with open_child("api", py(code), ENV, on_line=lines) as child:
        await child.wait()
    out = lines.of("stdout")
    assert out[-1] == "short"
    assert all(len(piece) <= MAX_LINE for piece in out)
    assert "".join(out[:-1]) == "x" * size


@pytest.mark.anyio
async def test_terminate_politely() -> None:
    lines = Lines()
    code = "import time; print('ready'); time.sleep(60)"
    async with open_child("api", py(code), ENV, on_line=lines) as child:
        await lines.first()
        exit_ = await child.terminate(10)
        assert exit_.signal == signal.SIGTERM
        assert exit_.describe() == "killed by SIGTERM"


@pytest.mark.anyio
async def test_terminate_kills_a_child_that_ignores_sigterm() -> None:
    lines = Lines()
    code = """
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("ready")
        time.sleep(60)
    """
    async with open_child("api", py(code), ENV, on_line=lines) as child:
        await lines.first()
        exit_ = await child.terminate(0.5)
        assert exit_ == Exit(returncode=None, signal=signal.SIGKILL, oom_killed=False)
        assert await child.terminate(0.5) is exit_  # idempotent
        assert await child.wait() is exit_


@pytest.mark.anyio
@pytest.mark.usefixtures("subreaper")
async def test_grandchildren_in_the_group_are_killed() -> None:
    lines = Lines()
    code = f"""
        import signal, subprocess, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # leave it to SIGKILL
        kid = subprocess.Popen([{sys.executable!r}, "-c", "import time; time.sleep(60)"])
        print(kid.pid)
        time.sleep(60)
    """
    grandchild = 0
    try:
        async with open_child("api", py(code), ENV, on_line=lines, grace=0.3) as child:
            grandchild = int(await lines.first())
            assert alive(grandchild)
            exit_ = await child.terminate(0.3)
            assert exit_.signal == signal.SIGKILL
        await wait_dead(grandchild)
    finally:
        if grandchild:
            kill_quietly(grandchild)


@pytest.mark.anyio
async def test_leaving_the_context_kills_the_child() -> None:
    lines = Lines()
    code = "import time; print('ready'); time.sleep(60)"
    with pytest.raises(KeyError):  # not wrapped in an exception group
        async with open_child("api", py(code), ENV, on_line=lines, grace=5) as child:
            await lines.first()
            raise KeyError("boom")
    assert child.exit is not None
    assert child.exit.signal == signal.SIGTERM
    assert not alive(child.pid)


@pytest.mark.anyio
async def test_cancellation_kills_the_child() -> None:
    lines = Lines()
    code = "import time; print('ready'); time.sleep(60)"
    with anyio.CancelScope() as scope:
        async with open_child("api", py(code), ENV, on_line=lines, grace=5) as child:
            await lines.first()
            scope.cancel()
            await anyio.sleep_forever()
    assert scope.cancelled_caught
    assert child.exit is not None
    assert not alive(child.pid)


@pytest.mark.anyio
async def test_send_signal_group() -> None:
    lines = Lines()
    code = """
        import signal, sys, time
        signal.signal(signal.SIGUSR1, lambda *_: sys.exit(7))
        print("ready")
        time.sleep(60)
    """
    async with open_child("api", py(code), ENV, on_line=lines) as child:
        await lines.first()
        child.send_signal_group(signal.SIGUSR1)
        assert (await child.wait()).returncode == 7
        child.send_signal_group(signal.SIGUSR1)  # nobody left: ignored


@pytest.mark.anyio
async def test_missing_executable() -> None:
    with pytest.raises(
        PodError, match=r"^container `api`: command `no-such-command-x1` not found$"
    ):
        async with open_child("api", ["no-such-command-x1", "--flag"], ENV):
            pytest.fail("started a missing command")
    assert not is_direct_child(-1)


@pytest.mark.anyio
async def test_not_executable_and_missing_cwd(tmp_path: Path) -> None:
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    with pytest.raises(PodError, match="is not executable"):
        async with open_child("api", [str(script)], ENV):
            pytest.fail("started")
    with pytest.raises(PodError, match=r"working directory `.*nowhere` does not exist"):
        async with open_child("api", py("pass"), ENV, cwd=tmp_path / "nowhere"):
            pytest.fail("started")
    with pytest.raises(PodError, match="the command is empty"):
        async with open_child("api", [], ENV):
            pytest.fail("started")


# -- reaper -----------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.usefixtures("subreaper")
async def test_reap_orphans_collects_a_double_forked_daemon() -> None:
    assert is_subreaper()
    lines = Lines()
    code = """
        import os
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:          # the daemon: own session, exits once its parent is gone
            os.setsid()
            os.close(w)
            os.read(r, 1)
            os._exit(0)
        print(pid)
    """
    orphan = 0
    try:
        async with open_child("api", py(code), ENV, on_line=lines) as child:
            orphan = int(await lines.first())
            await child.wait()
            # The orphan was reparented to us, exited, and nobody else will collect it.
            await poll(lambda: (stat := read_stat(orphan)) is not None and stat.state == "Z")
            stat = read_stat(orphan)
            assert stat is not None
            assert stat.ppid == os.getpid()

            async with anyio.create_task_group() as tg:
                tg.start_soon(reap_orphans, lambda pid: pid == child.pid, 0.02)
                await poll(lambda: read_stat(orphan) is None)
                tg.cancel_scope.cancel()
        orphan = 0
    finally:
        if orphan:
            kill_quietly(orphan)


@pytest.mark.anyio
async def test_reap_orphans_leaves_known_children_alone() -> None:
    code = "import sys; sys.exit(5)"
    async with anyio.create_task_group() as tg:
        tg.start_soon(reap_orphans, None, 0.01)
        for _ in range(3):
            async with open_child("api", py(code), ENV) as child:
                assert (await child.wait()).returncode == 5
        tg.cancel_scope.cancel()


@pytest.mark.anyio
@pytest.mark.usefixtures("subreaper")
async def test_kill_descendants() -> None:
    lines = Lines()
    code = f"""
        import subprocess, sys, time
        kid = subprocess.Popen([{sys.executable!r}, "-c", "import time; time.sleep(60)"],
                               start_new_session=True)   # escapes the process group
        print(kid.pid)
        time.sleep(60)
    """
    grandchild = 0
    try:
        async with open_child("api", py(code), ENV, on_line=lines) as child:
            grandchild = int(await lines.first())
            killed = kill_descendants(signal.SIGKILL)
            assert child.pid in killed
            assert grandchild in killed
            assert (await child.wait()).signal == signal.SIGKILL
        await wait_dead(grandchild)
    finally:
        if grandchild:
            kill_quietly(grandchild)


@pytest.mark.anyio
async def test_stderr_tail_reads_the_pipe_now() -> None:
    """What the child wrote before it told us (on another channel) is in the tail at once,
    without waiting for the relay task to run."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        port = listener.getsockname()[1]
        code = (
            "import socket, sys, time\n"
            "sys.stderr.write('the reason\\n'); sys.stderr.flush()\n"
            f"socket.create_connection(('127.0.0.1', {port})); time.sleep(60)\n"
        )
        with anyio.fail_after(20):
            async with open_child("c", [sys.executable, "-c", code], dict(os.environ)) as child:
                await anyio.wait_readable(listener)
                conn, _ = listener.accept()
                conn.close()
                assert child.stderr_tail() == "the reason\n"  # no await in between
