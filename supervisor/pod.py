"""One pod: its containers as child processes, their probes, and the port owner (docs/container-contract.md).

Theory of operation
-------------------
``Pod.run`` is a task group with one supervising task per container and, when no readiness
probe aims at pod.port, a pod-level TCP probe on it (Cortex adds one). Each supervising task
spawns its container, runs its readiness and liveness probes, and waits for the first of:

* the container exits on its own -> :class:`~supervisor.errors.PodError` (``worker_error``,
  or ``worker_oom`` with OOM evidence), which ends the pod and so the job;
* its liveness probe fails -> the container is stopped (SIGTERM, grace, SIGKILL) and
  respawned after a backoff; ``generation`` goes up so dispatch retries the batches that were
  in flight instead of counting them as failures.

A watcher turns "every readiness gate passes" plus "the port owner is one of our containers"
into ``serving``; dispatch waits on ``wait_serving()`` before each batch, which is how losing
readiness pauses dispatch without dropping anything. Stopping the pod is cancelling ``run``:
each container is then stopped with its grace period, concurrently.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import anyio
import anyio.abc

from supervisor.clock import REAL, Clock
from supervisor.config import BatchAPI, Container, Probe
from supervisor.env import build_env, expand_argv
from supervisor.errors import PodError, PortOwnerError, StartError
from supervisor.layout import Layout
from supervisor.leftovers import Ledger
from supervisor.lifecycle import PodState, next_pod_state
from supervisor.logs import Logger
from supervisor.ports import PortOwner, find_port_owner
from supervisor.probes import (
    ProbeLoop,
    ProbeResult,
    ReadinessGate,
    aims_at,
    check,
    default_readiness_probe,
)
from supervisor.process import Child, open_child

__all__ = ["CORTEX_VERSION", "Pod", "check_port_free", "pod_env"]

CORTEX_VERSION = "0.42.0"
POD_PORT_GATE = "pod.port"
_BACKOFF_START = 1.0
_BACKOFF_MAX = 60.0
_OWNER_RECHECK = 5.0  # seconds between port-owner checks while serving
_FIRST_BIND_POLL = 0.05  # seconds between tries of the default TCP probe before it first passes
_OWNER_POLL = 0.2  # seconds between looks for a listener when the probes pass before it binds


def pod_env(api: BatchAPI, layout: Layout, *, job_id: str | None) -> dict[str, str]:
    """The ``CORTEX_*`` variables every container of the pod gets (docs/container-contract.md).

    ``CORTEX_SPEC_PATH`` is always set; under ``proxy`` (no job known: ``job_id`` None) the
    file exists only if something put it there, and ``CORTEX_JOB_ID`` is not set.
    """
    env = {
        "CORTEX_VERSION": CORTEX_VERSION,
        "CORTEX_API_NAME": api.name,
        "CORTEX_LOG_LEVEL": os.environ.get("CORTEX_LOG_LEVEL") or "info",
        "CORTEX_SPEC_PATH": str(layout.spec_path),
        "CORTEX_MNT_DIR": str(layout.mnt_dir),
    }
    if job_id is not None:
        env["CORTEX_JOB_ID"] = job_id
    return env


class Pod:
    """Pod ``index`` of a local set: listens on ``api.pod.port + index`` (docs/commands.md)."""

    def __init__(
        self,
        api: BatchAPI,
        *,
        index: int = 0,
        env: Mapping[str, str],
        log: Logger,
        grace: float = 30.0,
        cwd: Path | None = None,
        ledger: Ledger | None = None,
        clock: Clock = REAL,
    ) -> None:
        self.api = api
        self.index = index
        self.port = api.pod.port + index
        self.grace = grace
        self.cwd = cwd
        self.ledger = ledger
        self.clock = clock  # probes' periods and restart backoff (a ManualClock in tests)
        self.log = log.bind(pod=index)
        self.gate = ReadinessGate()
        self.children: dict[str, Child] = {}
        self.restarts: dict[str, int] = {c.name: 0 for c in api.pod.containers}
        self.owner: PortOwner | None = None
        self.generation = 0
        self.state = PodState.CREATING
        self.ever_served = False  # a port conflict before this is a failure to start
        self._readiness: dict[str, ProbeLoop] = {}  # gate key -> its loop, for `waiting_for`
        self._extra_env = {"CORTEX_PORT": str(self.port), **env}
        self._serving = False
        self._serving_changed = anyio.Event()
        self._stopping = False

    # -- what dispatch and status look at -------------------------------------------------

    @property
    def serving(self) -> bool:
        return self._serving

    async def wait_serving(self, value: bool = True) -> None:
        """Wait until ``serving`` is ``value``."""
        while self._serving != value:
            await self._serving_changed.wait()

    async def wait_changed(self) -> None:
        """Wait for the next change of ``serving`` or of a container (start, restart)."""
        await self._serving_changed.wait()

    def _changed(self) -> None:
        self._serving_changed.set()
        self._serving_changed = anyio.Event()

    def owner_stderr_tail(self, limit: int = 2048) -> str:
        if self.owner is None:
            return ""
        child = self.children.get(self.owner.container)
        return child.stderr_tail(limit) if child is not None else ""

    def waiting_for(self) -> list[str]:
        """Why the pod is not serving: one phrase per gate that is not passing (none once the
        pod has stopped or failed)."""
        reasons: list[str] = []
        if self.state in (PodState.STOPPED, PodState.FAILED, PodState.KILLED_OOM):
            return reasons
        for key, ok in self.gate.states().items():
            if ok:
                continue
            loop = self._readiness.get(key)
            last = loop.last if loop is not None else None
            what = "readiness" if key == POD_PORT_GATE else f"`{key}` readiness"
            detail = last.detail if last is not None else "no probe result yet"
            reasons.append(f"{what}: {detail}")
        if not reasons and not self._serving and self.gate.ready:
            reasons.append(f"nobody listens on port {self.port} yet")
        return reasons

    async def _sleep(self, seconds: float) -> None:
        await self.clock.sleep_until(self.clock.now() + seconds)

    def _set_state(self, new: PodState) -> None:
        self.state = next_pod_state(self.state, new)

    def kill_now(self) -> None:
        """SIGKILL every container's process group now (a second Ctrl-C)."""
        for child in self.children.values():
            child.kill()

    def status(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "port": self.port,
            "state": self.state.value,
            "serving": self._serving,
            "readiness": self.gate.states(),
            "containers": {
                name: {"pid": c.pid, "restarts": self.restarts[name]}
                for name, c in self.children.items()
            },
            "port_owner": None
            if self.owner is None
            else {"container": self.owner.container, "pid": self.owner.pid},
        }

    # -- lifecycle -----------------------------------------------------------------------

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Run the pod until cancelled; raises PodError when a container fails for good."""
        containers = self.api.pod.containers
        needs_default = not any(
            c.readiness_probe is not None and aims_at(c.readiness_probe, self.api.pod.port)
            for c in containers
        )
        try:
            async with anyio.create_task_group() as tg:
                for c in containers:
                    self.gate.set(c.name, False)
                    await tg.start(self._supervise, c)
                if needs_default:
                    self.gate.set(POD_PORT_GATE, False)
                    tg.start_soon(self._default_probe)
                tg.start_soon(self._watch_readiness)
                task_status.started()
        finally:
            self._stopping = True
            self._set_serving(False)
            self._set_state(PodState.STOPPED)

    def _set_serving(self, value: bool) -> None:
        if value != self._serving:
            self._serving = value
            self._changed()

    async def _default_probe(self) -> None:
        probe = default_readiness_probe(self.api.pod.port)

        def changed(ok: bool, result: ProbeResult) -> None:
            self.gate.set(POD_PORT_GATE, ok)
            self.log.info(
                "probe",
                container=None,
                probe="readiness",
                port=self.port,
                ok=ok,
                detail=result.detail,
            )

        loop = ProbeLoop(
            probe,
            container=POD_PORT_GATE,
            kind="readiness",
            port_shift=self.index,
            on_change=changed,
            clock=self.clock,
        )
        self._readiness[POD_PORT_GATE] = loop
        # This probe is ours, not the user's: rather than wait a whole period after a refused
        # first try, look every 50 ms until the port first answers, then probe as configured.
        while True:  # nothing to wait on but the port itself: a bounded-cost poll
            result = await check(probe, port_shift=self.index)
            if result.success:
                break
            loop.last = result
            await self._sleep(_FIRST_BIND_POLL)
        loop.record(result)
        await loop.run()

    async def _check_owner(self) -> PortOwner | None:
        """Who holds pod.port now; raises PortOwnerError for a stranger or two containers."""
        roots = {name: c.pid for name, c in self.children.items() if c.returncode is None}
        try:
            owner = await anyio.to_thread.run_sync(_find_owner, self.port, roots)
        except PortOwnerError as e:
            if not self.ever_served:  # the pod never ran: not the job's failure
                self._set_state(PodState.FAILED)
                raise StartError(str(e)) from None
            raise
        if owner is not None and self.owner != owner:
            self.owner = owner
            self.log.info(
                "port_owner",
                port=self.port,
                container=owner.container,
                pid=owner.pid,
                cmdline=owner.cmdline,
            )
        return owner

    async def _watch_readiness(self) -> None:
        while True:
            await self.gate.wait_ready()
            if await self._check_owner() is None:
                # Probes pass but nobody listens yet (an exec-only gate): look again shortly
                # (another process binding a port sends us no event: a bounded poll of /proc).
                await self._sleep(_OWNER_POLL)
                continue
            self._set_state(PodState.READY)
            self.ever_served = True
            self._set_serving(True)
            self.log.info("pod_ready", port=self.port)
            while self.gate.ready:
                # Keep checking while serving: a second container may bind the port later,
                # or the owner may hand it to a stranger.
                with anyio.move_on_after(_OWNER_RECHECK):
                    await self.gate.wait_not_ready()
                if self.gate.ready:
                    await self._check_owner()
            self._set_serving(False)
            if not self._stopping:
                self._set_state(PodState.NOT_READY)
                self.log.warning("pod_not_ready", port=self.port, readiness=self.gate.states())

    async def _supervise(
        self, c: Container, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        backoff = _BACKOFF_START
        log = self.log.bind(container=c.name)
        started: anyio.abc.TaskStatus[None] | None = task_status
        while True:
            env = build_env(c.env, self._extra_env)
            # Kubernetes expands $(VAR) in command/args from the container's env only.
            argv = expand_argv([*c.command, *c.args], build_env(c.env, self._extra_env, base={}))
            try:
                await self._run_container(c, argv, env, log, started)
            except StartError:  # it cannot be spawned (a command not found, ...)
                self._set_state(PodState.FAILED)
                raise
            started = None
            self.restarts[c.name] += 1
            self._changed()
            await self._sleep(backoff)
            backoff = min(backoff * 2, _BACKOFF_MAX)

    async def _run_container(
        self,
        c: Container,
        argv: list[str],
        env: dict[str, str],
        log: Logger,
        task_status: anyio.abc.TaskStatus[None] | None,
    ) -> None:
        """One run of container ``c``: returns after a liveness restart, raises when it exits
        on its own (``task_status`` is told once it has started, the first time)."""
        async with open_child(
            c.name,
            argv,
            env,
            cwd=self.cwd,
            on_line=_relay(log),
            grace=self.grace,
            ledger=self.ledger,
        ) as child:
            self.children[c.name] = child
            self._changed()
            log.info("container_started", pid=child.pid, argv=argv, restarts=self.restarts[c.name])
            if task_status is not None:
                task_status.started()
            outcome = await self._watch_container(c, child, log)
            self.gate.set(c.name, False)
            if outcome == "liveness":
                self.generation += 1
                log.warning("container_restart", reason="liveness probe failed", grace=self.grace)
                exit_ = await child.terminate(self.grace)
                log.info("container_stopped", exit=exit_.describe())
                return
            exit_ = await child.wait()
            self.generation += 1
            oom = exit_.oom_killed
            self._set_state(PodState.KILLED_OOM if oom else PodState.FAILED)
            log.error("container_exited", exit=exit_.describe(), oom=oom)
            raise PodError(
                f"container `{c.name}` of pod {self.index} {exit_.describe()}",
                status="worker_oom" if oom else "worker_error",
            )

    async def _watch_container(self, c: Container, child: Child, log: Logger) -> str:
        """Wait for the container to exit ("exit") or fail its liveness probe ("liveness")."""
        outcome = "exit"
        dead = anyio.Event()
        env = build_env(c.env, self._extra_env)

        def loop(probe: Probe, kind: Literal["readiness", "liveness"]) -> ProbeLoop:
            def changed(ok: bool, result: ProbeResult) -> None:
                log.info("probe", probe=kind, ok=ok, detail=result.detail)
                if kind == "readiness":
                    self.gate.set(c.name, ok)
                elif not ok:
                    dead.set()

            aimed = aims_at(probe, self.api.pod.port)  # shifted with the pod's port
            made = ProbeLoop(
                probe,
                container=c.name,
                kind=kind,
                port_shift=self.index if aimed else 0,
                env=env,
                cwd=self.cwd,
                on_change=changed,
                clock=self.clock,
            )
            if kind == "readiness":
                self._readiness[c.name] = made
            return made

        async with anyio.create_task_group() as tg:

            async def watch_exit() -> None:
                await child.wait()
                tg.cancel_scope.cancel()

            async def watch_liveness() -> None:
                nonlocal outcome
                await dead.wait()
                outcome = "liveness"
                tg.cancel_scope.cancel()

            tg.start_soon(watch_exit)
            if c.readiness_probe is not None:
                tg.start_soon(loop(c.readiness_probe, "readiness").run)
            else:
                self.gate.set(c.name, True)
            if c.liveness_probe is not None:
                tg.start_soon(loop(c.liveness_probe, "liveness").run)
                tg.start_soon(watch_liveness)
        return outcome


def check_port_free(port: int) -> None:
    """Before any container starts: raise :class:`StartError` naming whoever holds ``port``."""
    try:
        find_port_owner(port, {})
    except PortOwnerError as e:
        raise StartError(
            f"{e}; it was taken before any container started: stop that program, or change pod.port"
        ) from None
    except OSError:
        pass  # /proc unreadable: the pod's own checks will say so


def _find_owner(port: int, roots: dict[str, int]) -> PortOwner | None:
    try:
        return find_port_owner(port, roots)
    except PortOwnerError:
        raise
    except OSError as e:  # /proc unreadable: say so rather than guess
        raise PortOwnerError(f"cannot tell who owns port {port}: {e}") from None


def _relay(log: Logger) -> Callable[[str, str], None]:
    def on_line(stream: str, line: str) -> None:
        log.info("output", stream=stream, line=line)

    return on_line


def backoff_schedule(n: int) -> list[float]:
    """The restart delays used, for docs and tests."""
    return [min(_BACKOFF_START * math.pow(2, i), _BACKOFF_MAX) for i in range(n)]
