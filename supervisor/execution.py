"""One admitted job carried out on local pods, to its end: shared by ``run`` and ``serve``.

Theory of operation
-------------------
:class:`JobExecution` writes ``job.json``, marks the job ``running``, starts its pods
(:class:`~supervisor.host.PodHost`) and lets ``concurrency`` slots per pod pull batches from
the durable feed. Beside them: the job timeout, progress (and, while no pod serves, why), and,
for ``run``, signals. Anything that ends the job early -- a signal, the timeout, a stop from
the job API, a pod that failed or could not start -- goes through :meth:`JobExecution.end`:
the feed is closed (no new batch; a slot holding one for a pod that is not ready hands it
back), batches in flight get the grace period, then the pods are stopped. The
:class:`~supervisor.lifecycle.Outcome` decides the rest: a job whose batches all settled gets
its one ``POST /on-job-complete``; the end state is recorded with its ``worker_counts``
(unless the job is to be resumed), and the final status comes back with the exit code.

``status()`` is the live status (docs/operations.md) while the job runs, for the job API.

Shared jobs (``supervisor worker``, :class:`Sharing`): this process runs one of the job's
pods, others run elsewhere on the same queue. Then the pod sends a heartbeat with its state
every third of its lease and reads the job's status: a job stopped, timed out or failed
elsewhere ends here too (``Cause.ENDED_ELSEWHERE``, not recorded again). Its own container
crash records ``worker_error`` for every pod. Whichever way, ``/on-job-complete`` goes
through the queue's completion claim: only the pod that wins it sends the call and records
``succeeded`` / ``completed_with_failures`` (with one pod per job, as under ``run`` and
``serve``, it always wins); the others just stop.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import anyio
import msgspec

from supervisor import jobs
from supervisor.config import BatchAPI
from supervisor.dispatch import dispatch_pod, send_job_complete
from supervisor.errors import PodError, StartError, first_leaf
from supervisor.host import PodHost
from supervisor.jobs import (
    JobSpec,
    JobStatusResponse,
    WorkerCounts,
)
from supervisor.layout import Layout
from supervisor.lifecycle import Cause, Outcome, PodState, heartbeat_counts, worker_counts
from supervisor.logs import Logger
from supervisor.pod import Pod
from supervisor.progress import ProgressReporter
from supervisor.queues.base import Feed, JobQueue, Progress, progress_of
from supervisor.status import build_status, write_spec

if TYPE_CHECKING:  # prometheus_client is imported only where metrics are served
    from supervisor.metrics import Metrics

__all__ = [
    "ExecutionResult",
    "JobExecution",
    "Placement",
    "Sharing",
]


FLUSH_TIMEOUT = 10.0  # seconds a pod's last acks may take to commit once its dispatch ended


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a job's pods live: its files (``job.json``, ``mnt``), the ledger of container
    processes, and the first pod's index (pod i listens on pod.port + first_pod + i)."""

    layout: Layout
    ledger_dir: Path
    first_pod: int = 0
    extra_env: Mapping[str, str] | None = None  # e.g. the job API's endpoint, for chaining
    owns_process_tree: bool = True  # False under the job API's server (see PodHost)
    endpoint: str | None = None  # the API's URL under the job API's server, for the status
    pods: int | None = None  # how many of the job's pods run here (default: all, `workers`)


@dataclass(frozen=True, slots=True)
class Sharing:
    """This process runs one pod of a job that pods elsewhere share (``supervisor worker``):
    its id among them, and the lease its heartbeats promise."""

    pod_id: str
    lease: float


@dataclass(frozen=True, slots=True)
class ExecutionResult:
    status: JobStatusResponse
    outcome: Outcome
    exit_code: int


def parse_time(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


class JobExecution:
    """Carry out ``spec`` (already enqueued in ``queue``) on ``spec.workers`` local pods."""

    def __init__(
        self,
        api: BatchAPI,
        spec: JobSpec,
        queue: JobQueue,
        placement: Placement,
        *,
        concurrency: int = 1,
        batch_timeout: float | None = None,
        grace: float = 30.0,
        cwd: Path | None = None,
        log: Logger,
        progress_stream: IO[str] | None = None,
        progress_tty: bool = False,
        handle_signals: bool = False,
        metrics: Metrics | None = None,
        sharing: Sharing | None = None,
    ) -> None:
        self.api = api
        self.sharing = sharing
        self.metrics = metrics
        self.spec = spec
        self.queue = queue
        self.placement = placement
        self.concurrency = concurrency
        self.batch_timeout = batch_timeout
        self.grace = grace
        self.log = log.bind(api_name=api.name, job_id=spec.job_id)
        self.outcome = Outcome()
        self.ended = anyio.Event()  # a cause arrived: no /on-job-complete, stop
        self.host = PodHost(
            api,
            placement.layout,
            job_id=spec.job_id,
            workers=spec.workers if placement.pods is None else placement.pods,
            grace=grace,
            cwd=cwd,
            log=self.log,
            ledger_dir=placement.ledger_dir,
            first_index=placement.first_pod,
            extra_env=placement.extra_env,
            owns_process_tree=placement.owns_process_tree,
        )
        self._progress_stream = progress_stream
        self._progress_tty = progress_tty
        self._handle_signals = handle_signals
        self._feed: Feed | None = None
        self._dispatch_scope = anyio.CancelScope()
        self._won_completion = False  # this pod sent the job's /on-job-complete
        self._recorded = False  # this run recorded the job's end state
        self._end_time: str | None = None  # as recorded

    @property
    def pods(self) -> list[Pod]:
        return self.host.pods

    # -- ending early ------------------------------------------------------------------------

    def end(
        self, cause: Cause, reason: str, *, status: str | None = None, sig: int | None = None
    ) -> bool:
        """Stop taking batches; in-flight ones get the grace period. False if already ending."""
        if not self.outcome.record(cause, reason, status=status, signal=sig):
            return False
        if self._feed is not None:
            self._feed.close()  # slots hand back what they hold; dispatch ends when idle
        self._dispatch_scope.deadline = anyio.current_time() + self.grace
        self.ended.set()
        return True

    def on_signal(self, sig: signal.Signals) -> None:
        """The first stop signal: end the run, and say what is being waited for."""
        self.end(Cause.SIGNAL, f"received {sig.name}", sig=sig)
        in_flight = self._feed.progress().in_flight if self._feed is not None else 0
        self.log.warning(
            "signal",
            signal=sig.name,
            action="stop taking batches, then stop the containers",
            waiting_for=f"{in_flight} batch(es) in flight, up to {self.grace:g}s"
            if in_flight
            else f"the containers to exit, up to {self.grace:g}s",
            again="a second signal stops at once",
        )

    def kill_now(self) -> None:
        """Cut the grace period short: end dispatch and SIGKILL every container now."""
        self._dispatch_scope.cancel()
        self.host.kill_now()

    # -- what the job API shows --------------------------------------------------------------

    def progress(self) -> Progress | None:
        return None if self._feed is None else self._feed.progress()

    def status(self, progress: Progress) -> JobStatusResponse:
        """The live status while the job runs."""
        counts = worker_counts([p.state for p in self.pods], None)
        return build_status(
            self.api, self.spec, jobs.RUNNING, progress, counts, None, self.placement.endpoint
        )

    def describe(self) -> dict[str, Any]:
        """What ``/status`` shows of this job: progress, why it waits, its pods."""
        progress = self.progress()
        return {
            "job_id": self.spec.job_id,
            "api_name": self.api.name,
            "progress": None if progress is None else msgspec.to_builtins(progress),
            "waiting": self.waiting(),
            "pods": [pod.status() for pod in self.pods],
        }

    def ready(self) -> bool:
        return all(p.state is PodState.READY for p in self.pods)

    def refresh_metrics(self) -> None:
        """Set the gauges (in flight, the job's figures, containers' readiness and restarts)
        before a scrape (the job's figures as its pods here see them)."""
        metrics, name = self.metrics, self.api.name
        if metrics is None:
            return
        progress = self.progress()
        metrics.in_flight(name, self.spec.job_id, 0 if progress is None else progress.in_flight)
        if progress is not None:
            counts = worker_counts([p.state for p in self.pods], None)
            metrics.job_figures(name, self.spec.job_id, progress, counts)
        for pod in self.pods:
            for container, ok in pod.gate.states().items():
                metrics.container_ready(name, pod.index, container, ok)
            for container, n in pod.restarts.items():
                metrics.container_restarts(name, pod.index, container, n)

    def waiting(self) -> str | None:
        """Why nothing is being sent, while no pod serves."""
        if any(p.serving for p in self.pods):
            return None
        reasons = [r for p in self.pods for r in p.waiting_for()]
        return "; ".join(dict.fromkeys(reasons)) or None

    # -- running -----------------------------------------------------------------------------

    async def run(self) -> ExecutionResult:
        spec, queue, log = self.spec, self.queue, self.log
        if spec.start_time is None:
            spec.start_time = jobs.rfc3339()
        if not await queue.set_status(spec.job_id, jobs.RUNNING, start_time=spec.start_time):
            return await self._ended_before_start()
        if self.sharing is not None:  # the job started when its first pod did
            record = await queue.get_job(spec.job_id)
            if record is not None and record.start_time is not None:
                spec.start_time = record.start_time
        write_spec(self.placement.layout.spec_path, spec)
        log.info(
            "job_started",
            total_batches=spec.total_batch_count,
            workers=spec.workers,
            concurrency=self.concurrency,
            first_port=self.pods[0].port,
        )
        progress = await self._run_pods()
        outcome = self.outcome
        end_time = self._end_time or jobs.rfc3339()
        final = outcome.final_status(progress.dead)
        if self.sharing is not None and not outcome.resumable:
            await self._heartbeat(self.sharing, final=True)
        counts = await self._counts(final)
        if self.metrics is not None:  # the last figures, kept until the series expire
            self.metrics.job_figures(self.api.name, spec.job_id, progress, counts)
        records = outcome.cause is not None or self._won_completion
        if final is not None and outcome.records_status and records and not self._recorded:
            await self._record(final, end_time, counts)
        if outcome.cause is Cause.START_FAILED:
            log.error("job_not_started", reason=outcome.reason, resumable=True)
        else:
            log.info(
                "job_finished",
                status=final,
                reason=outcome.reason,
                succeeded=progress.succeeded,
                failed=progress.dead,
                failed_attempts=progress.failed_attempts,
            )
        status = build_status(
            self.api,
            spec,
            final or jobs.RUNNING,
            progress,
            counts,
            end_time if final else None,
            self.placement.endpoint,
        )
        return ExecutionResult(status, outcome, outcome.exit_code(progress.dead))

    async def _counts(self, final: str | None) -> WorkerCounts:
        """The job's ``worker_counts``: its pods here, or every pod's heartbeat if shared."""
        if self.sharing is None:
            return worker_counts([pod.state for pod in self.pods], final)
        beats = await self.queue.pods(self.spec.job_id)
        return heartbeat_counts(beats, self.spec.workers, final)

    async def _record(self, final: str, end_time: str, counts: WorkerCounts) -> None:
        """Record the job's end state, unless another pod (or the job API) recorded one
        first: an end state is final in the queue."""
        counted = msgspec.json.encode(counts)
        if await self.queue.set_status(
            self.spec.job_id, final, end_time=end_time, worker_counts=counted
        ):
            self._recorded = True
            self._end_time = end_time

    async def _ended_before_start(self) -> ExecutionResult:
        """The job ended (stopped, or completed by its other pods) before this pod could
        mark it running: nothing is started, nothing recorded; its stored status is it."""
        record = await self.queue.get_job(self.spec.job_id)
        status = jobs.STOPPED if record is None else record.status  # None: deleted meanwhile
        self.end(Cause.ENDED_ELSEWHERE, f"the job ended elsewhere ({status})", status=status)
        self.log.warning("job_ended_elsewhere", status=status, started=False)
        if self.sharing is not None:
            await self._heartbeat(self.sharing, final=True)
        progress = Progress(
            total=None,
            succeeded=0,
            dead=0,
            failed_attempts=0,
            in_flight=0,
            in_queue=0,
            average_time_per_batch=None,
        )
        counts, end_time = WorkerCounts(), None
        if record is not None:
            progress, end_time = progress_of(record), record.end_time
            if record.worker_counts is not None:
                counts = msgspec.json.decode(record.worker_counts, type=WorkerCounts)
        result = build_status(
            self.api, self.spec, status, progress, counts, end_time, self.placement.endpoint
        )
        return ExecutionResult(result, self.outcome, self.outcome.exit_code(progress.dead))

    async def _heartbeat(self, sharing: Sharing, *, final: bool = False) -> None:
        """Tell the other pods this pod's state (``final``: the job is over for it)."""
        state = self.pods[0].state
        if final and state not in (PodState.FAILED, PodState.KILLED_OOM):
            state = PodState.STOPPED
        await self.queue.heartbeat(self.spec.job_id, sharing.pod_id, state.value, sharing.lease)

    async def _share(self, sharing: Sharing) -> None:
        """Every third of the lease: a heartbeat, and a look at the job's status (a job
        stopped, timed out or failed elsewhere ends here too)."""
        job_id = self.spec.job_id
        while True:
            await self._heartbeat(sharing)
            record = await self.queue.get_job(job_id)
            status = jobs.STOPPED if record is None else record.status
            if status in jobs.END_STATES and not self._recorded:
                reason = f"the job ended elsewhere ({status})"
                if self.end(Cause.ENDED_ELSEWHERE, reason, status=status):
                    self.log.warning("job_ended_elsewhere", status=status, grace=self.grace)
            await anyio.sleep(sharing.lease / 3)

    async def _run_pods(self) -> Progress:
        spec, log = self.spec, self.log
        # A shared job's pods hold only what they are about to send: batches read ahead by
        # one pod would wait there while the others are idle.
        buffer = 1024 if self.sharing is None else 2 * self.concurrency
        async with (
            self.host.running(),
            self.queue.open_feed(
                spec.job_id,
                max_attempts=jobs.max_attempts(spec),
                count_lost=jobs.counts_lost_deliveries(spec),
                buffer=buffer,
            ) as opened,
        ):
            feed: Feed = opened
            if self.metrics is not None:
                self.metrics.job_started(self.api.name, spec.job_id)
                from supervisor.metrics import ObservedFeed  # only where metrics are served

                feed = ObservedFeed(opened, self.metrics, self.api.name, spec.job_id)
            self._feed = feed
            if self.outcome.cause is not None:  # ended before the feed was open
                feed.close()
            reporter = None
            if self._progress_stream is not None:
                reporter = ProgressReporter(
                    feed.progress,
                    stream=self._progress_stream,
                    tty=self._progress_tty,
                    log=log,
                    waiting=self.waiting,
                )
            try:
                async with anyio.create_task_group() as services:
                    if self._handle_signals:
                        services.start_soon(self.host.watch_signals, self.on_signal, self.kill_now)
                    if spec.timeout is not None:
                        deadline = parse_time(spec.created_time) + spec.timeout
                        services.start_soon(self._watch_timeout, deadline)
                    if reporter is not None:
                        services.start_soon(reporter.run)
                    services.start_soon(self._report_not_serving)
                    if self.sharing is not None:
                        services.start_soon(self._share, self.sharing)
                    await self._pods_and_dispatch(feed)
                    services.cancel_scope.cancel()
            finally:
                with anyio.CancelScope(shield=True):
                    # Bounded: with its queue away (Redis down) a stopping pod must still
                    # stop; what is not committed here the feed tries again as it closes.
                    with anyio.move_on_after(FLUSH_TIMEOUT):
                        await feed.flush()
                    if reporter is not None:
                        reporter.final()
            progress = feed.progress()
            self._feed = None
            if self.metrics is not None:
                self.metrics.job_ended(self.api.name, spec.job_id)
            return progress

    async def _watch_timeout(self, deadline: float) -> None:
        await anyio.sleep(max(deadline - time.time(), 0))
        if self.end(Cause.TIMEOUT, "the job's timeout expired"):
            self.log.warning("job_timed_out", grace=self.grace)

    async def _report_not_serving(self, every: float = 5.0) -> None:
        """While no pod serves, say why every few seconds (a pod that never gets ready)."""
        while True:
            await anyio.sleep(every)
            if self.ended.is_set() or any(p.serving for p in self.pods):
                continue
            for pod in self.pods:
                reasons = pod.waiting_for()
                if reasons:
                    self.log.warning("pod_not_ready", pod=pod.index, waiting_for=reasons)

    async def _pods_and_dispatch(self, feed: Feed) -> None:
        pods, spec, log = self.pods, self.spec, self.log
        try:
            async with anyio.create_task_group() as pod_group:
                for pod in pods:
                    await pod_group.start(pod.run)
                with self._dispatch_scope:
                    async with anyio.create_task_group() as slots:
                        for pod in pods:
                            slots.start_soon(
                                partial(
                                    dispatch_pod,
                                    feed,
                                    pod,
                                    job_id=spec.job_id,
                                    concurrency=self.concurrency,
                                    batch_timeout=self.batch_timeout,
                                    log=log.bind(pod=pod.index),
                                )
                            )
                if self.outcome.sends_job_complete:
                    await self._complete(feed)
                pod_group.cancel_scope.cancel()
        except* StartError as group:
            start_error = first_leaf(group, StartError)
            self.end(Cause.START_FAILED, str(start_error))
            log.error("pod_not_started", error=str(start_error))
        except* PodError as group:
            err = first_leaf(group, PodError)
            self.end(Cause.POD_FAILED, str(err), status=err.status)
            log.error("pod_failed", error=str(err), status=err.status)

    async def _complete(self, feed: Feed) -> None:
        """Claim the job's one ``/on-job-complete``; the winner sends it and records the end
        state before the claim is marked done (a pod killed in between leaves the claim to
        expire, and another pod to send it)."""
        # Every ack durable first: a crash after /on-job-complete must not resend.
        await feed.flush()
        async with self.queue.completion(self.spec.job_id) as mine:
            if not mine:
                self.log.info("job_complete_elsewhere")
                return
            self._won_completion = True
            p = feed.progress()
            await self._job_complete(p)
            final = self.outcome.final_status(p.dead)
            if final is not None and self.outcome.cause is None:
                if self.sharing is not None:
                    await self._heartbeat(self.sharing, final=True)
                await self._record(final, jobs.rfc3339(), await self._counts(final))

    async def _job_complete(self, p: Progress) -> None:
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as race:  # a pod, or a stop/timeout

                async def stop_waiting() -> None:
                    await self.ended.wait()
                    scope.cancel()

                race.start_soon(stop_waiting)
                target = await _first_serving(self.pods)
                race.cancel_scope.cancel()
            await send_job_complete(
                target.port,
                job_id=self.spec.job_id,
                succeeded=p.succeeded,
                failed=p.dead,
                log=self.log,
            )


async def _first_serving(pods: list[Pod]) -> Pod:
    for pod in pods:
        if pod.serving:
            return pod
    result: list[Pod] = []
    async with anyio.create_task_group() as tg:

        async def wait(p: Pod) -> None:
            await p.wait_serving()
            result.append(p)
            tg.cancel_scope.cancel()

        for pod in pods:
            tg.start_soon(wait, pod)
    return result[0]
