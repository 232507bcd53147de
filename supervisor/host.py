"""Hosting local pods: what every command that runs pods on this machine does around them.

``run`` and ``proxy`` (and the job API's server next) differ in what feeds their pods; the
rest is this one :class:`PodHost`:

* the pods themselves, each with the containers' ``CORTEX_*`` environment
  (:func:`~supervisor.pod.pod_env`) and the ledger that lets the next run end what a killed
  supervisor left behind (:mod:`supervisor.leftovers`);
* the subreaper (orphans of the containers re-parent to us, and are reaped), and at the end
  every stray descendant killed, so nothing outlives the command;
* signals: the first SIGTERM/SIGINT/SIGHUP asks the command to stop (``on_stop``: stop
  taking work, let what is in flight finish within the grace period, stop the containers);
  any further one stops *now*: every container's process group is SIGKILLed at once.
"""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import anyio.abc

from supervisor.config import BatchAPI
from supervisor.layout import Layout
from supervisor.leftovers import Ledger
from supervisor.linux import become_subreaper
from supervisor.logs import Logger
from supervisor.pod import Pod, pod_env
from supervisor.reaper import kill_descendants, reap_orphans

__all__ = ["STOP_SIGNALS", "PodHost"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class PodHost:
    """``workers`` local pods of ``api`` (pod i on pod.port + i) for job ``job_id`` (None:
    no job known, as under ``proxy``)."""

    def __init__(
        self,
        api: BatchAPI,
        layout: Layout,
        *,
        job_id: str | None,
        workers: int,
        grace: float,
        cwd: Path | None,
        log: Logger,
        ledger_dir: Path | None = None,
        first_index: int = 0,
        extra_env: Mapping[str, str] | None = None,
        owns_process_tree: bool = True,
    ) -> None:
        """``layout`` holds the job's files (``job.json``, ``mnt``); the ledger of container
        processes goes to ``ledger_dir`` (default: the layout's state folder); pod i listens
        on pod.port + ``first_index`` + i, so several jobs' pods never collide."""
        env = {**pod_env(api, layout, job_id=job_id), **(extra_env or {})}
        ledger = Ledger(layout.state_dir if ledger_dir is None else ledger_dir)
        self.pods = [
            Pod(api, index=first_index + i, env=env, log=log, grace=grace, cwd=cwd, ledger=ledger)
            for i in range(workers)
        ]
        self.grace = grace
        self.log = log
        # False when several hosts share this process (the job API's server): then the
        # server is the subreaper and kills strays once, at its end, not each job's host.
        self.owns_process_tree = owns_process_tree

    def is_known(self, pid: int) -> bool:
        """Is ``pid`` a container's main process (whose exit status anyio waits for)?"""
        return any(c.pid == pid for p in self.pods for c in p.children.values())

    def kill_now(self) -> None:
        for pod in self.pods:
            pod.kill_now()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Be the subreaper and reap orphans while inside; kill stray descendants on leaving."""
        if not self.owns_process_tree:
            yield
            return
        subreaper = become_subreaper()
        try:
            async with anyio.create_task_group() as tg:
                if subreaper:
                    tg.start_soon(reap_orphans, self.is_known)
                yield
                tg.cancel_scope.cancel()
        finally:
            if subreaper:
                stray = kill_descendants()
                if stray:
                    self.log.warning("killed_strays", pids=stray)

    async def watch_signals(
        self,
        on_stop: Callable[[signal.Signals], None],
        on_again: Callable[[], None] | None = None,
    ) -> None:
        """Call ``on_stop`` on the first stop signal; on any later one, kill every container
        now (and call ``on_again``). Runs until cancelled."""
        stopping = False
        with anyio.open_signal_receiver(*STOP_SIGNALS) as signals:
            async for signum in signals:
                sig = signal.Signals(signum)
                if not stopping:
                    stopping = True
                    on_stop(sig)
                    continue
                self.log.warning("signal", signal=sig.name, action="stop now")
                self.kill_now()
                if on_again is not None:
                    on_again()
