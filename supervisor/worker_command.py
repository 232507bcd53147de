"""``supervisor worker``: one pod that works on the jobs of its API from a shared queue.

Theory of operation
-------------------
Many workers (one per machine, or per Kubernetes pod) and any number of ``serve --queue``
instances share one Redis queue. ``serve`` enqueues a job and marks it ``running``; each
worker, while idle, looks for the oldest running job of its API (reading the running jobs
only: :meth:`~supervisor.queues.base.JobQueue.running_jobs`) that has fewer live pods than
its ``workers`` and joins it (:meth:`~supervisor.queues.base.JobQueue.try_join`, atomic:
never more than ``workers`` pods at once; a pod that joins late helps). Between looks it
waits on the queue's watch (:meth:`~supervisor.queues.base.JobQueue.watch_jobs`, opened
before the first look so nothing in between is missed): it looks again as soon as a job of
its API starts running or a pod leaves one, and every ``--poll`` seconds (2) anyway, for
the places freed by pods that went silent. A pod whose containers could not start waits
the poll out before it tries again (its own leaving must not wake it into a loop).
Then it does what a pod of ``run`` does (:class:`~supervisor.execution.JobExecution` with
:class:`~supervisor.execution.Sharing`): writes ``job.json``, starts the API's containers,
gates on readiness, dispatches ``--concurrency`` batches at a time from the shared feed,
sends heartbeats (the job's ``worker_counts``), follows a stop, timeout or failure recorded
elsewhere within a heartbeat, and stops its containers when the job ends; then it waits for
the next job. A batch held by a worker that died goes to another after ``--lease``.
With ``--operator-endpoint`` (the job API of ``serve``), its containers get the chaining
environment that ``serve`` gives its own (``CORTEX_OPERATOR_ENDPOINT``, ``cli.yaml``, the
token), so a job's container may submit other jobs.

The first SIGTERM/SIGINT/SIGHUP: take no new batch, let those in flight finish within
``--grace``, stop the containers, leave the job (its other pods go on; what this one held is
given back) and exit 128+N. A second one kills the containers at once. An idle worker
exits at once, whatever it was waiting for (the watch, or Redis coming back).
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.abc

from supervisor.admin import Admin, serve_admin
from supervisor.client import chaining_env, write_cli_config
from supervisor.config import BatchAPI
from supervisor.execution import JobExecution, Placement, Sharing
from supervisor.host import STOP_SIGNALS
from supervisor.layout import Layout
from supervisor.leftovers import end_leftovers
from supervisor.lifecycle import Cause
from supervisor.logs import Logger
from supervisor.metrics import Metrics
from supervisor.queues import open_queue
from supervisor.queues.base import JobQueue, JobRecord
from supervisor.status import spec_of

__all__ = ["POLL", "Worker", "WorkerOptions", "new_pod_id", "run_worker"]

POLL = 2.0  # seconds between looks for a job to join while idle, when nothing wakes it
LEASE = 30.0  # seconds: a batch's lease, and the heartbeat's

T = TypeVar("T")


def new_pod_id() -> str:
    """This pod's name among a job's pods: host, pid and a random part."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"


@dataclass(slots=True)
class WorkerOptions:
    layout: Layout
    queue_url: str
    grace: float = 30.0
    concurrency: int = 1
    batch_timeout: float | None = None
    lease: float = LEASE
    port_offset: int = 0  # the containers listen on pod.port + port_offset
    admin: tuple[str, int] | None = None  # --admin HOST:PORT
    poll: float = POLL
    cwd: Path | None = None
    operator_endpoint: str | None = None  # the job API the containers submit jobs to
    token: str | None = None  # its bearer token, for the containers


class Worker:
    """The loop of one worker pod on ``queue`` (see the module docstring)."""

    def __init__(
        self,
        api: BatchAPI,
        queue: JobQueue,
        opts: WorkerOptions,
        log: Logger,
        metrics: Metrics | None,
    ) -> None:
        self.api = api
        self.queue = queue
        self.opts = opts
        self.pod_id = new_pod_id()
        self.log = log.bind(api_name=api.name, pod_id=self.pod_id)
        self.metrics = metrics
        self.execution: JobExecution | None = None
        self.stopping = False
        self.exit_code = 0
        self._wakeup = anyio.Event()
        self._env: dict[str, str] | None = None
        if opts.operator_endpoint is not None:  # chaining, as under `serve`
            config_dir = opts.layout.cli_config_dir
            self._env = chaining_env(opts.operator_endpoint, config_dir, opts.token)

    # -- signals and the admin endpoints ----------------------------------------------------

    def on_signal(self, sig: signal.Signals) -> None:
        """The first stop signal: finish what is in flight and leave; later ones: kill now."""
        execution = self.execution
        if self.stopping:
            self.log.warning("signal", signal=sig.name, action="stop now")
            if execution is not None:
                execution.kill_now()
            return
        self.stopping = True
        self.exit_code = 128 + sig
        self._wakeup.set()
        if execution is not None:
            execution.on_signal(sig)
        else:
            self.log.warning("signal", signal=sig.name, action="exit (no job)")

    def ready(self) -> bool:
        """Healthy: idle (waiting for a job), or every container of the job's pod ready."""
        return self.execution is None or self.execution.ready()

    def status(self) -> dict[str, Any]:
        execution = self.execution
        return {
            "pod_id": self.pod_id,
            "api_name": self.api.name,
            "queue": self.queue.url,
            "state": "stopping" if self.stopping else "working" if execution else "waiting",
            "job": None if execution is None else execution.describe(),
        }

    def refresh_metrics(self) -> None:
        if self.execution is not None:
            self.execution.refresh_metrics()

    # -- the loop ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Join jobs and work on them, one at a time, until a stop signal."""
        watch = await self._until_stopped(lambda: self.queue.watch_jobs(self.api.name))
        while watch is not None and not self.stopping:
            record = await self._find_job()
            if record is None:
                await self._until_stopped(lambda: watch.wait(self._poll()))
                continue
            await self._work(record)

    def _poll(self) -> float:
        return min(self.opts.poll, self.opts.lease)

    async def _until_stopped(self, call: Callable[[], Awaitable[T]]) -> T | None:
        """``call()``'s result, or ``None`` if a stop signal comes first (``call`` is then
        cancelled): an idle worker waits for nothing once told to stop."""
        result: list[T] = []
        async with anyio.create_task_group() as tg:

            async def stop() -> None:
                await self._wakeup.wait()
                tg.cancel_scope.cancel()

            tg.start_soon(stop)
            result.append(await call())
            tg.cancel_scope.cancel()
        return result[0] if result else None

    async def _find_job(self) -> JobRecord | None:
        """The oldest running job of the API that admits this pod (now joined), or None."""
        running = await self._until_stopped(lambda: self.queue.running_jobs(self.api.name))
        for record in reversed(running or []):
            if record.total_batches is None:
                continue
            # A stop cuts this too (Redis away: it retries); a join it cut short, if Redis
            # made it, lapses with its heartbeat's lease.
            join = partial(
                self.queue.try_join,
                record.job_id,
                self.pod_id,
                spec_of(record).workers,
                self.opts.lease,
            )
            joined = await self._until_stopped(join)
            if joined:
                return record
            if self.stopping:
                break
        return None

    async def _work(self, record: JobRecord) -> None:
        opts, job_id = self.opts, record.job_id
        spec = spec_of(record)
        if self.stopping:
            with anyio.move_on_after(opts.grace + 5):  # Redis away: do not wait for ever
                await self.queue.leave(job_id, self.pod_id)
            return
        layout = opts.layout
        execution = JobExecution(
            self.api,
            spec,
            self.queue,
            Placement(
                layout=layout,
                ledger_dir=layout.state_dir,
                first_pod=opts.port_offset,
                pods=1,
                extra_env=self._env,
            ),
            concurrency=opts.concurrency,
            batch_timeout=opts.batch_timeout,
            grace=opts.grace,
            cwd=opts.cwd,
            log=self.log,
            metrics=self.metrics,
            sharing=Sharing(self.pod_id, opts.lease),
        )
        self.execution = execution
        self.log.info("job_joined", job_id=job_id, workers=spec.workers)
        try:
            result = await execution.run()
        finally:
            self.execution = None
            if execution.outcome.resumable:  # a signal, or the pod could not start
                with anyio.CancelScope(shield=True), anyio.move_on_after(opts.grace + 5):
                    await self.queue.leave(job_id, self.pod_id)
        self.log.info("job_left", job_id=job_id, status=result.status.job_status.status)
        if result.outcome.cause is Cause.START_FAILED:
            # Not the job's fault (a port taken, a command missing): wait, then try again.
            self.log.error("job_not_started", job_id=job_id, reason=result.outcome.reason)
            with anyio.move_on_after(self._poll()):
                await self._wakeup.wait()


async def run_worker(
    api: BatchAPI,
    opts: WorkerOptions,
    log: Logger,
    *,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> int:
    """Work on the API's jobs until a stop signal (exit 128+N)."""
    await end_leftovers(opts.layout.state_dir, log)  # what a killed worker left running
    if opts.operator_endpoint is not None:
        write_cli_config(opts.layout.cli_config_dir, opts.operator_endpoint)
    metrics = None if opts.admin is None else Metrics()  # counting costs every batch something
    async with open_queue(opts.queue_url, log=log, lease=opts.lease) as queue:
        worker = Worker(api, queue, opts, log, metrics)
        async with anyio.create_task_group() as tg:
            if opts.admin is not None and metrics is not None:
                admin = Admin(
                    ready=worker.ready,
                    status=worker.status,
                    metrics=metrics,
                    refresh=worker.refresh_metrics,
                )
                await tg.start(partial(serve_admin, *opts.admin, admin, logger=log))
            tg.start_soon(_watch_signals, worker)
            worker.log.info(
                "worker_started",
                queue=queue.url,
                lease=opts.lease,
                operator_endpoint=opts.operator_endpoint,
            )
            task_status.started()
            await worker.run()
            tg.cancel_scope.cancel()
    return worker.exit_code


async def _watch_signals(worker: Worker) -> None:
    with anyio.open_signal_receiver(*STOP_SIGNALS) as signals:
        async for signum in signals:
            worker.on_signal(signal.Signals(signum))
