"""Readiness and liveness probes with Kubernetes semantics (SPEC §3).

Theory of operation, in three layers:

* :class:`ProbeState` is the pure part: it counts consecutive results and flips ``ok`` after
  ``success_threshold`` successes in a row or ``failure_threshold`` failures in a row, exactly
  as the kubelet's prober worker does. Readiness starts not ok, liveness starts ok.
* :func:`check` runs one probe once and turns every expected failure (refused, reset, bad
  status, non-zero exit, timeout) into a :class:`ProbeResult`; it never raises for those. A
  probe that does not finish within ``timeout_seconds`` is a failure. ``exec`` probes run in a
  new session; on timeout, and after a normal exit too, their whole process group is killed
  and the child reaped, so a probe never leaves a process behind.
* :class:`ProbeLoop` repeats :func:`check` every ``period_seconds`` (start to start) after
  ``initial_delay_seconds`` and reports transitions. :class:`ReadinessGate` folds the loops of
  a pod into one awaitable "every container ready" condition.

Probes aimed at pod.port are shifted for pod i of N (it listens on pod.port + i); callers pass
that shift as ``port_shift`` and only for such probes (see :func:`aims_at`).
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Literal

import anyio
import anyio.abc
import anyio.lowlevel
import msgspec

from supervisor.clock import REAL, Clock
from supervisor.config import Probe, TCPSocketAction
from supervisor.http._rawsock import RawSocket
from supervisor.http.client import exchange, open_connection, request_head
from supervisor.http.connection import ClientConnection
from supervisor.http.errors import HTTPError, LocalProtocolError, RemoteProtocolError

__all__ = [
    "ProbeLoop",
    "ProbeResult",
    "ProbeState",
    "ReadinessGate",
    "aims_at",
    "check",
    "default_readiness_probe",
]

#: How much of a failing probe's output (HTTP body, exec stdout+stderr) goes into ``detail``.
DETAIL_BYTES = 200
#: How much of an HTTP response body is read (and discarded) before the connection is closed.
MAX_BODY_BYTES = 10 * 1024
#: What the kubelet sends: ``kube-probe/<major>.<minor>`` of its Kubernetes version (some apps
#: tell probes from users by it).
_USER_AGENT = "kube-probe/1.29"


class ProbeResult(msgspec.Struct, frozen=True):
    """The outcome of one probe run; ``detail`` says what happened ("HTTP 503", ...)."""

    success: bool
    detail: str


# --------------------------------------------------------------------------------------------
# Pure state


class ProbeState:
    """Consecutive-result counting with Kubernetes thresholds; no I/O."""

    def __init__(self, probe: Probe, *, initially_ok: bool) -> None:
        self._success_threshold = probe.success_threshold
        self._failure_threshold = probe.failure_threshold
        self._ok = initially_ok
        self._successes = 0
        self._failures = 0

    @property
    def ok(self) -> bool:
        return self._ok

    @property
    def consecutive_successes(self) -> int:
        return self._successes

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def record(self, success: bool) -> bool:
        """Count one result; return True when it changed ``ok``."""
        if success:
            self._successes += 1
            self._failures = 0
            if not self._ok and self._successes >= self._success_threshold:
                self._ok = True
                return True
        else:
            self._failures += 1
            self._successes = 0
            if self._ok and self._failures >= self._failure_threshold:
                self._ok = False
                return True
        return False

    def __repr__(self) -> str:
        return f"ProbeState(ok={self._ok}, successes={self._successes}, failures={self._failures})"


def default_readiness_probe(port: int) -> Probe:
    """The TCP probe on pod.port that Cortex adds when no readiness probe targets it.

    Its period is 1 s rather than Kubernetes' 10 s, so that a pod becomes ready promptly.
    """
    return Probe(tcp_socket=TCPSocketAction(port=port), period_seconds=1)


def aims_at(probe: Probe, port: int) -> bool:
    """Whether ``probe`` is a network probe aimed at ``port``."""
    return probe.port == port


# --------------------------------------------------------------------------------------------
# One probe run


async def check(
    probe: Probe,
    *,
    host: str = "127.0.0.1",
    port_shift: int = 0,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> ProbeResult:
    """Run ``probe`` once. Expected failures and timeouts are results, never exceptions."""
    timeout = probe.timeout_seconds
    if probe.tcp_socket is not None:
        return await _check_tcp(host, probe.tcp_socket.port + port_shift, timeout)
    if probe.http_get is not None:
        return await _check_http(
            host, probe.http_get.port + port_shift, probe.http_get.path, timeout
        )
    assert probe.exec is not None  # config.Probe guarantees exactly one kind
    return await _check_exec(probe.exec.command, timeout, env=env, cwd=cwd)


def _timed_out(seconds: float) -> ProbeResult:
    return ProbeResult(False, f"timed out after {seconds:g}s")


def _describe_oserror(exc: BaseException) -> str:
    """A short lower-case reason ("connection refused") from anyio's wrapped OSErrors."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno:
            return os.strerror(cur.errno).lower()
        if isinstance(cur, BaseExceptionGroup) and cur.exceptions:
            cur = cur.exceptions[0]
        else:
            cur = cur.__cause__ or cur.__context__
    return str(exc) or type(exc).__name__


async def _check_tcp(host: str, port: int, seconds: float) -> ProbeResult:
    with anyio.move_on_after(seconds) as scope:
        try:
            stream = await anyio.connect_tcp(host, port)
        except OSError as exc:
            return ProbeResult(False, _describe_oserror(exc))
        await anyio.aclose_forcefully(stream)
        return ProbeResult(True, f"connected to {host}:{port}")
    assert scope.cancelled_caught
    return _timed_out(seconds)


def _snippet(data: bytes | bytearray) -> str:
    return bytes(data[:DETAIL_BYTES]).decode("utf-8", "replace").strip()


async def _check_http(host: str, port: int, path: str, seconds: float) -> ProbeResult:
    """GET ``path``: the status decides as soon as the response head is in; the body is read
    (at most :data:`MAX_BODY_BYTES`, within the deadline) only to close the connection
    politely and to quote the start of an error page."""
    target = path if path.startswith("/") else "/" + path
    headers = [("User-Agent", _USER_AGENT), ("Accept", "*/*"), ("Connection", "close")]
    try:
        head = request_head("GET", host, port, target, headers) + b"\r\n"
    except LocalProtocolError as exc:
        return ProbeResult(False, f"cannot send the request for {target!r}: {exc}")
    conn = ClientConnection(keep_body=DETAIL_BYTES)
    out = conn.start(head)
    sock: RawSocket | None = None
    response = None
    try:
        with anyio.move_on_after(seconds):
            sock = await open_connection(host, port)
            response = await exchange(sock, conn, out, max_body=MAX_BODY_BYTES)
    except HTTPError as exc:
        # Past the head, a broken or oversized body does not change the answer.
        response = conn.partial_response()
        if response is None:
            return _http_failure(exc)
    finally:
        if sock is not None:
            sock.close()
    if response is None:
        response = conn.partial_response()
        if response is None:
            return _timed_out(seconds)
    status = response.status
    success = 200 <= status < 400
    detail = f"HTTP {status}"
    if not success and (text := _snippet(response.body_head)):
        detail = f"{detail}: {text}"
    return ProbeResult(success, detail)


def _http_failure(exc: HTTPError) -> ProbeResult:
    """The result of an HTTP probe that got no response head."""
    if isinstance(exc, RemoteProtocolError):
        if "disconnected" in str(exc):
            return ProbeResult(False, "connection closed without a response")
        return ProbeResult(False, f"invalid HTTP response: {exc}")
    return ProbeResult(False, _describe_oserror(exc))


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


async def _drain_output(stream: anyio.abc.ByteReceiveStream, keep: bytearray) -> None:
    async for chunk in stream:
        if len(keep) < DETAIL_BYTES:
            keep += chunk[: DETAIL_BYTES - len(keep)]


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


async def _check_exec(
    command: Sequence[str],
    seconds: float,
    *,
    env: Mapping[str, str] | None,
    cwd: Path | None,
) -> ProbeResult:
    try:
        process = await anyio.open_process(
            list(command),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
    except OSError as exc:
        return ProbeResult(False, f"cannot run {command[0]!r}: {_describe_oserror(exc)}")
    output = bytearray()
    exited = False
    try:
        with anyio.move_on_after(seconds):
            async with anyio.create_task_group() as tg:
                assert process.stdout is not None
                tg.start_soon(_drain_output, process.stdout, output)
                await process.wait()
                exited = True
                # Anything the command left running in its session dies with it; this also
                # lets the output pipe reach EOF so the drain above finishes.
                _kill_group(process.pid)
    finally:
        with anyio.CancelScope(shield=True):
            if process.returncode is None:  # timed out or cancelled: not reaped yet
                _kill_group(process.pid)
                await process.wait()
            await process.aclose()
    if not exited:
        return _timed_out(seconds)
    code = process.returncode
    assert code is not None
    detail = _describe_exit(code)
    if code != 0 and (text := _snippet(output)):
        detail = f"{detail}: {text}"
    return ProbeResult(code == 0, detail)


# --------------------------------------------------------------------------------------------
# Periodic probing


class ProbeLoop:
    """One container's readiness or liveness probe, run periodically until cancelled."""

    def __init__(
        self,
        probe: Probe,
        *,
        container: str,
        kind: Literal["readiness", "liveness"],
        port_shift: int = 0,
        host: str = "127.0.0.1",
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        on_change: Callable[[bool, ProbeResult], None] | None = None,
        clock: Clock = REAL,
        checker: Callable[[], Awaitable[ProbeResult]] | None = None,
    ) -> None:
        """``clock`` and ``checker`` (one probe run; default :func:`check` of ``probe``) are
        for tests that replay a history without sockets or wall time."""
        self.probe = probe
        self._clock = clock
        self._checker = checker
        self.container = container
        self.kind: Literal["readiness", "liveness"] = kind
        self._port_shift = port_shift
        self._host = host
        self._env = env
        self._cwd = cwd
        self._on_change = on_change
        self._state = ProbeState(probe, initially_ok=(kind == "liveness"))
        self._changed: anyio.Event | None = None  # created lazily: needs a running loop
        self.last: ProbeResult | None = None

    @property
    def ok(self) -> bool:
        return self._state.ok

    @property
    def state(self) -> ProbeState:
        return self._state

    async def wait_ok(self) -> None:
        """Return as soon as the probe is ok (immediately if it already is)."""
        await anyio.lowlevel.checkpoint()
        while not self._state.ok:
            await self._wait_changed()

    async def wait_not_ok(self) -> None:
        """Return as soon as the probe is not ok (immediately if it already is not)."""
        await anyio.lowlevel.checkpoint()
        while self._state.ok:
            await self._wait_changed()

    async def _wait_changed(self) -> None:
        if self._changed is None:
            self._changed = anyio.Event()
        await self._changed.wait()

    def record(self, result: ProbeResult) -> bool:
        """Feed one result (what :meth:`run` does after each check); True if ``ok`` changed."""
        self.last = result
        changed = self._state.record(result.success)
        if changed:
            if self._changed is not None:
                self._changed.set()
                self._changed = None
            if self._on_change is not None:
                self._on_change(self._state.ok, result)
        return changed

    async def run(self) -> None:
        """Probe forever: after ``initial_delay_seconds``, every ``period_seconds``."""
        clock = self._clock
        await clock.sleep_until(clock.now() + self.probe.initial_delay_seconds)
        while True:
            started = clock.now()
            if self._checker is not None:
                result = await self._checker()
            else:
                result = await check(
                    self.probe,
                    host=self._host,
                    port_shift=self._port_shift,
                    env=self._env,
                    cwd=self._cwd,
                )
            self.record(result)
            await clock.sleep_until(started + self.probe.period_seconds)

    def __repr__(self) -> str:
        return f"ProbeLoop({self.container!r}, {self.kind}, ok={self.ok}, last={self.last!r})"


class ReadinessGate:
    """The pod's "every container ready" condition: >= 1 key and every key ok."""

    def __init__(self) -> None:
        self._states: dict[str, bool] = {}
        self._changed: anyio.Event | None = None  # created lazily, replaced on transitions

    @property
    def ready(self) -> bool:
        return bool(self._states) and all(self._states.values())

    def states(self) -> dict[str, bool]:
        return dict(self._states)

    def set(self, key: str, ok: bool) -> None:
        before = self.ready
        self._states[key] = ok
        self._notify(before)

    def remove(self, key: str) -> None:
        before = self.ready
        self._states.pop(key, None)
        self._notify(before)

    def _notify(self, before: bool) -> None:
        if self.ready != before and self._changed is not None:
            self._changed.set()
            self._changed = None

    async def _wait_changed(self) -> None:
        if self._changed is None:
            self._changed = anyio.Event()
        await self._changed.wait()

    async def wait_ready(self) -> None:
        await anyio.lowlevel.checkpoint()
        while not self.ready:
            await self._wait_changed()

    async def wait_not_ready(self) -> None:
        await anyio.lowlevel.checkpoint()
        while self.ready:
            await self._wait_changed()

    def __repr__(self) -> str:
        return f"ReadinessGate(ready={self.ready}, states={self._states!r})"
