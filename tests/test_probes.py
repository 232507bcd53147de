"""Probes: pure threshold counting, one-shot checks against real peers, loops and the gate."""

from __future__ import annotations

import os
import re
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import anyio.abc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from supervisor.clock import ManualClock
from supervisor.config import ExecAction, HTTPGetAction, Probe, TCPSocketAction
from supervisor.probes import (
    ProbeLoop,
    ProbeResult,
    ProbeState,
    ReadinessGate,
    aims_at,
    check,
    default_readiness_probe,
)

Handler = Callable[[anyio.abc.SocketStream, bytes], Awaitable[None]]

# --------------------------------------------------------------------------------------------
# ProbeState (pure)


def _probe(success: int = 1, failure: int = 3) -> Probe:
    return Probe(
        tcp_socket=TCPSocketAction(port=1), success_threshold=success, failure_threshold=failure
    )


@pytest.mark.parametrize(
    ("initially_ok", "success", "failure", "results", "expected"),
    [
        # readiness: starts not ok, one success is enough by default
        (False, 1, 3, "S", "1"),
        (False, 1, 3, "FFFFS", "00001"),
        # success_threshold counts *consecutive* successes
        (False, 2, 3, "SFSS", "0001"),
        (False, 3, 1, "SSFSSS", "000001"),
        # liveness: starts ok, needs failure_threshold consecutive failures
        (True, 1, 3, "FFSFFF", "111110"),
        (True, 1, 1, "F", "0"),
        (True, 1, 2, "FSFSFF", "111110"),
        # flapping around the thresholds
        (False, 1, 3, "SFSFFFS", "1111101"),
        (False, 2, 2, "SSFFSSFSFF", "0110011110"),
        # results that agree with the current state change nothing
        (True, 1, 3, "SSSS", "1111"),
        (False, 1, 3, "FFFF", "0000"),
    ],
)
def test_probe_state_table(
    initially_ok: bool, success: int, failure: int, results: str, expected: str
) -> None:
    state = ProbeState(_probe(success, failure), initially_ok=initially_ok)
    assert state.ok is initially_ok
    before = initially_ok
    for r, e in zip(results, expected, strict=True):
        changed = state.record(r == "S")
        assert state.ok is (e == "1"), (results, expected, state)
        assert changed is (state.ok != before)
        before = state.ok


def _kubelet_model(initially_ok: bool, success: int, failure: int, results: list[bool]) -> bool:
    """The kubelet prober worker's rule: keep the state until a run reaches its threshold."""
    ok, last, run = initially_ok, None, 0
    for r in results:
        run = run + 1 if r == last else 1
        last = r
        if (r and run >= success) or (not r and run >= failure):
            ok = r
    return ok


@given(
    initially_ok=st.booleans(),
    success=st.integers(1, 4),
    failure=st.integers(1, 4),
    results=st.lists(st.booleans(), max_size=30),
)
def test_probe_state_matches_kubelet(
    initially_ok: bool, success: int, failure: int, results: list[bool]
) -> None:
    state = ProbeState(_probe(success, failure), initially_ok=initially_ok)
    for i, r in enumerate(results):
        state.record(r)
        assert state.ok == _kubelet_model(initially_ok, success, failure, results[: i + 1])


def test_default_readiness_probe_and_aims_at() -> None:
    p = default_readiness_probe(8080)
    assert p.tcp_socket == TCPSocketAction(port=8080)
    assert p.period_seconds == 1
    assert (p.timeout_seconds, p.success_threshold, p.failure_threshold) == (1, 1, 3)
    assert aims_at(p, 8080)
    assert not aims_at(p, 8081)
    assert aims_at(Probe(http_get=HTTPGetAction(port=9000, path="/h")), 9000)
    assert not aims_at(Probe(exec=ExecAction(command=["true"])), 8080)


# --------------------------------------------------------------------------------------------
# Real peers


async def _read_head(stream: anyio.abc.SocketStream) -> bytes:
    buf = b""
    while b"\r\n\r\n" not in buf and len(buf) < 65536:
        try:
            buf += await stream.receive()
        except anyio.EndOfStream:
            break
    return buf


@asynccontextmanager
async def serve(handler: Handler) -> AsyncIterator[int]:
    """A TCP server on 127.0.0.1:<free port> running ``handler(stream, request_head)``."""

    async def on_connection(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            try:
                await handler(stream, await _read_head(stream))
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                pass

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, on_connection)
        yield port
        tg.cancel_scope.cancel()


def respond(status: int, body: bytes = b"", extra: str = "") -> Handler:
    async def handler(stream: anyio.abc.SocketStream, head: bytes) -> None:
        await stream.send(
            f"HTTP/1.1 {status} Whatever\r\nContent-Length: {len(body)}\r\n{extra}"
            "Connection: close\r\n\r\n".encode()
            + body
        )

    return handler


def closed_port() -> int:
    """A port nobody listens on: bind one, read it back, close it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def http_probe(port: int, path: str = "/healthz", timeout: int = 1) -> Probe:
    return Probe(http_get=HTTPGetAction(port=port, path=path), timeout_seconds=timeout)


def tcp_probe(port: int) -> Probe:
    return Probe(tcp_socket=TCPSocketAction(port=port))


def exec_probe(code: str, timeout: int = 5) -> Probe:
    return Probe(exec=ExecAction(command=[sys.executable, "-c", code]), timeout_seconds=timeout)


@pytest.mark.anyio
async def test_tcp_connects() -> None:
    async def accept_and_close(stream: anyio.abc.SocketStream, head: bytes) -> None:
        pass

    async with serve(accept_and_close) as port:
        with anyio.fail_after(5):
            result = await check(tcp_probe(port))
            shifted = await check(tcp_probe(port - 3), port_shift=3)
    assert result.success, result
    assert shifted.success, shifted


@pytest.mark.anyio
async def test_tcp_connection_refused() -> None:
    with anyio.fail_after(5):
        result = await check(tcp_probe(closed_port()))
    assert result == ProbeResult(False, "connection refused")


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("status", "success"),
    [(200, True), (204, True), (302, True), (399, True), (404, False), (503, False)],
)
async def test_http_status(status: int, success: bool) -> None:
    async with serve(respond(status, b"not here" if status >= 400 else b"ok")) as port:
        with anyio.fail_after(5):
            result = await check(http_probe(port))
    assert result.success is success
    assert result.detail.startswith(f"HTTP {status}")
    if not success:
        assert result.detail == f"HTTP {status}: not here"


@pytest.mark.anyio
async def test_http_request_shape_and_port_shift() -> None:
    heads: list[bytes] = []

    async def record(stream: anyio.abc.SocketStream, head: bytes) -> None:
        heads.append(head)
        await respond(200)(stream, head)

    async with serve(record) as port:
        with anyio.fail_after(5):
            result = await check(http_probe(port - 2, path="ready?x=1"), port_shift=2)
    assert result == ProbeResult(True, "HTTP 200")
    request_line, *header_lines = heads[0].decode().strip().split("\r\n")
    assert request_line == "GET /ready?x=1 HTTP/1.1"
    headers = {k.lower(): v.strip() for k, v in (h.split(":", 1) for h in header_lines)}
    assert headers["host"] == f"127.0.0.1:{port}"
    assert re.fullmatch(r"kube-probe/1\.\d+", headers["user-agent"])  # as the kubelet sends it
    assert headers["connection"] == "close"


@pytest.mark.anyio
async def test_http_skips_informational_and_bounds_the_body() -> None:
    async def continue_then_big(stream: anyio.abc.SocketStream, head: bytes) -> None:
        await stream.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        await respond(500, b"x" * 1_000_000)(stream, head)

    async with serve(continue_then_big) as port:
        with anyio.fail_after(5):
            result = await check(http_probe(port))
    assert result == ProbeResult(False, "HTTP 500: " + "x" * 200)


@pytest.mark.anyio
async def test_http_never_answers_times_out() -> None:
    async def hang(stream: anyio.abc.SocketStream, head: bytes) -> None:
        await anyio.sleep_forever()

    async with serve(hang) as port:
        with anyio.fail_after(5):
            result = await check(http_probe(port, timeout=1))
    assert result == ProbeResult(False, "timed out after 1s")


@pytest.mark.anyio
async def test_http_connection_refused() -> None:
    with anyio.fail_after(5):
        result = await check(http_probe(closed_port()))
    assert result == ProbeResult(False, "connection refused")


@pytest.mark.anyio
async def test_http_closed_without_response() -> None:
    async def hang_up(stream: anyio.abc.SocketStream, head: bytes) -> None:
        pass

    async with serve(hang_up) as port:
        with anyio.fail_after(5):
            result = await check(http_probe(port))
    assert result == ProbeResult(False, "connection closed without a response")


@pytest.mark.anyio
async def test_http_garbage_is_a_failure() -> None:
    async def garbage(stream: anyio.abc.SocketStream, head: bytes) -> None:
        await stream.send(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")

    async with serve(garbage) as port:
        with anyio.fail_after(5):
            result = await check(http_probe(port))
    assert not result.success
    assert result.detail.startswith("invalid HTTP response"), result


# --------------------------------------------------------------------------------------------
# exec


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie waiting for its reaper counts as dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


@pytest.mark.anyio
async def test_exec_exit_codes(tmp_path: Path) -> None:
    with anyio.fail_after(10):
        ok = await check(exec_probe("pass"))
        bad = await check(exec_probe("import sys; print('boom', file=sys.stderr); sys.exit(1)"))
        noisy = await check(exec_probe("import sys; sys.stdout.write('x' * 1_000_000)"))
        signalled = await check(exec_probe("import os, signal; os.kill(os.getpid(), 15)"))
        missing = await check(Probe(exec=ExecAction(command=[str(tmp_path / "nope")])))
    assert ok == ProbeResult(True, "exit code 0")
    assert bad == ProbeResult(False, "exit code 1: boom")
    assert noisy == ProbeResult(True, "exit code 0")
    assert signalled == ProbeResult(False, "killed by SIGTERM")
    assert not missing.success
    assert "no such file or directory" in missing.detail, missing


@pytest.mark.anyio
async def test_exec_env_and_cwd(tmp_path: Path) -> None:
    code = (
        "import os, sys\n"
        "sys.exit(0 if os.environ.get('PROBE_X') == 'yes' and os.getcwd() == sys.argv[1] else 1)"
    )
    probe = Probe(exec=ExecAction(command=[sys.executable, "-c", code, str(tmp_path)]))
    with anyio.fail_after(10):
        good = await check(probe, env={"PROBE_X": "yes"}, cwd=tmp_path)
        bad = await check(probe, env={"PROBE_X": "no"}, cwd=tmp_path)
    assert good.success, good
    assert not bad.success


async def _read_pid(fd: int) -> int:
    """Wait for a pid line on a FIFO (opened non-blocking for reading)."""
    data = b""
    while b"\n" not in data:
        await anyio.wait_readable(fd)
        data += os.read(fd, 4096)
    return int(data.split()[0])


async def _wait_eof(fd: int) -> None:
    """Return once every writer of the FIFO has closed it (they exited)."""
    while True:
        await anyio.wait_readable(fd)
        if not os.read(fd, 4096):
            return


# The probe command: a shell that opens the FIFO as fd 3 (inherited by its children), starts a
# grandchild that sleeps, reports the grandchild's pid on the FIFO and its own in a file, then
# does TAIL. The FIFO reaches EOF only when both have died.
_SPAWN_GRANDCHILD = 'exec 3>"$1"; sleep 60 & echo $! >&3; echo $$ > "$2"; TAIL'


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("tail", "seconds", "expected"),
    [
        ("sleep 60", 1, ProbeResult(False, "timed out after 1s")),
        ("exit 0", 10, ProbeResult(True, "exit code 0")),
    ],
    ids=["timeout", "exit"],
)
async def test_exec_leaves_no_process_behind(
    tmp_path: Path, tail: str, seconds: int, expected: ProbeResult
) -> None:
    """The command and whatever it started die with the probe (timed out or finished)."""
    fifo, pid_file = tmp_path / "fifo", tmp_path / "pid"
    os.mkfifo(fifo)
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    script = _SPAWN_GRANDCHILD.replace("TAIL", tail)
    probe = Probe(
        exec=ExecAction(command=["/bin/sh", "-c", script, "sh", str(fifo), str(pid_file)]),
        timeout_seconds=seconds,
    )
    grandchild: list[int] = []

    async def watch() -> None:
        grandchild.append(await _read_pid(fd))
        await _wait_eof(fd)

    try:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(watch)
                result = await check(probe)
    finally:
        os.close(fd)
    assert result == expected
    assert not _alive(int(pid_file.read_text()))  # reaped by check()
    # The grandchild held the FIFO open until it died: EOF (reached above) proves it is gone.
    assert grandchild


@pytest.mark.anyio
async def test_exec_cancelled_kills_the_command(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    code = "import os, sys, time; open(sys.argv[1], 'w').write(f'{os.getpid()}\\n'); time.sleep(60)"
    probe = Probe(
        exec=ExecAction(command=[sys.executable, "-c", code, str(fifo)]), timeout_seconds=30
    )
    try:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(check, probe)
                pid = await _read_pid(fd)
                tg.cancel_scope.cancel()
    finally:
        os.close(fd)
    assert not _alive(pid)  # check() reaped it before returning


# --------------------------------------------------------------------------------------------
# ProbeLoop


def _script(statuses: list[int], served: list[int], enough: anyio.Event) -> Handler:
    """Answer with statuses[i] for request i (the last one repeats); set ``enough`` at the end."""

    async def handler(stream: anyio.abc.SocketStream, head: bytes) -> None:
        status = statuses[min(len(served), len(statuses) - 1)]
        served.append(status)
        await respond(status)(stream, head)
        if len(served) >= len(statuses) + 1:
            enough.set()

    return handler


@pytest.mark.anyio
async def test_readiness_loop_flips_once() -> None:
    served: list[int] = []
    enough = anyio.Event()
    changes: list[tuple[bool, ProbeResult]] = []
    became_ok = anyio.Event()

    def on_change(ok: bool, result: ProbeResult) -> None:
        changes.append((ok, result))
        became_ok.set()

    async with serve(_script([503, 200], served, enough)) as port:
        probe = Probe(http_get=HTTPGetAction(port=port), period_seconds=1)
        loop = ProbeLoop(probe, container="api", kind="readiness", on_change=on_change)
        assert not loop.ok
        assert loop.last is None
        async with anyio.create_task_group() as tg:
            tg.start_soon(loop.run)
            with anyio.fail_after(10):
                await loop.wait_ok()
                await became_ok.wait()
                await enough.wait()  # one more success after the flip
            tg.cancel_scope.cancel()
    assert changes == [(True, ProbeResult(True, "HTTP 200"))]
    assert loop.ok
    assert loop.last == ProbeResult(True, "HTTP 200")
    assert served[:3] == [503, 200, 200]


@pytest.mark.anyio
async def test_liveness_loop_fails_after_threshold() -> None:
    served: list[int] = []
    enough = anyio.Event()
    changes: list[tuple[bool, ProbeResult]] = []

    async with serve(_script([200, 500, 500], served, enough)) as port:
        probe = Probe(http_get=HTTPGetAction(port=port), period_seconds=1, failure_threshold=2)
        loop = ProbeLoop(
            probe,
            container="api",
            kind="liveness",
            on_change=lambda ok, result: changes.append((ok, result)),
        )
        assert loop.ok
        async with anyio.create_task_group() as tg:
            tg.start_soon(loop.run)
            with anyio.fail_after(10):
                await loop.wait_not_ok()
                await enough.wait()
            tg.cancel_scope.cancel()
    assert changes == [(False, ProbeResult(False, "HTTP 500"))]
    assert not loop.ok


@pytest.mark.anyio
async def test_loop_record_wakes_waiters() -> None:
    """The event path of wait_ok / wait_not_ok, without sockets."""
    loop = ProbeLoop(_probe(success=2), container="c", kind="readiness")
    woke = anyio.Event()

    async def waiter() -> None:
        await loop.wait_ok()
        woke.set()

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            await anyio.wait_all_tasks_blocked()
            assert not loop.record(ProbeResult(True, "x"))
            await anyio.wait_all_tasks_blocked()
            assert not woke.is_set()
            assert loop.record(ProbeResult(True, "x"))
            await woke.wait()
        await loop.wait_ok()  # already ok: returns at once


# --------------------------------------------------------------------------------------------
# ReadinessGate


@pytest.mark.anyio
async def test_readiness_gate_transitions() -> None:
    gate = ReadinessGate()
    assert not gate.ready  # no keys: not ready
    assert gate.states() == {}
    gate.set("a", True)
    assert gate.ready
    gate.set("b", False)
    assert not gate.ready
    assert gate.states() == {"a": True, "b": False}

    with anyio.fail_after(5):
        await gate.wait_not_ready()  # already not ready: returns at once
        ready, not_ready = anyio.Event(), anyio.Event()

        async def wait_ready() -> None:
            await gate.wait_ready()
            ready.set()
            await gate.wait_not_ready()
            not_ready.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(wait_ready)
            await anyio.wait_all_tasks_blocked()
            gate.set("a", True)  # no transition: b is still not ok
            await anyio.wait_all_tasks_blocked()
            assert not ready.is_set()
            gate.set("b", True)
            await ready.wait()
            assert gate.ready
            await anyio.wait_all_tasks_blocked()
            assert not not_ready.is_set()
            gate.remove("a")
            gate.remove("b")  # no keys left: not ready
            await not_ready.wait()
        gate.remove("missing")  # removing an unknown key is harmless
        assert not gate.ready
        gate.set("c", True)
        await gate.wait_ready()


@pytest.mark.anyio
async def test_loop_history_on_a_manual_clock() -> None:
    """initial_delay, period and both thresholds, replayed without sockets or wall time:
    each check runs at its virtual time and the flips land on the right checks."""
    clock = ManualClock()
    script = [False, True, True, False, False, False, True, True]
    ran: list[float] = []
    flips: list[tuple[float, bool]] = []

    async def checker() -> ProbeResult:
        ran.append(clock.now())
        ok = script[len(ran) - 1]
        return ProbeResult(ok, "ok" if ok else "no")

    probe = Probe(
        exec=ExecAction(command=["true"]),
        initial_delay_seconds=5,
        period_seconds=10,
        success_threshold=2,
        failure_threshold=3,
    )
    loop = ProbeLoop(
        probe,
        container="c",
        kind="readiness",
        clock=clock,
        checker=checker,
        on_change=lambda ok, _: flips.append((clock.now(), ok)),
    )
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(loop.run)
            await clock.advance(4.9)
            assert ran == []  # still in the initial delay
            await clock.advance(70.1)
            tg.cancel_scope.cancel()
    assert ran == [5, 15, 25, 35, 45, 55, 65, 75]
    assert flips == [(25, True), (55, False), (75, True)]
