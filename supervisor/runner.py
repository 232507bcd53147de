"""``supervisor run``: one job on this machine, end to end, with the embedded queue.

Theory of operation
-------------------
0. *Claim the root* (:mod:`supervisor.rootlock`): one supervisor per root, or exit 2.
1. *Admit* (:func:`supervisor.lifecycle.admit`). The newest job of the same command (API,
   job file and batch limit) decides: none (or ``--fresh``) -> split the submission and
   enqueue every batch before any container starts, so bad input (exit 2) starts nothing and
   leaves nothing behind; unfinished -> resume it; ended -> print its final status and exit
   with its code, sending nothing. A port already held by a stranger stops here (exit 1).
2. *Run.* Write ``job.json``, start N local pods, and let ``--concurrency`` slots per pod
   pull batches from the durable feed. Around them: signals and the job timeout (stop taking
   batches; in-flight ones get ``--grace``; then the containers are stopped), progress (and
   why no pod is ready, when none is), and the zombie reaper.
3. *Finish.* The :class:`~supervisor.lifecycle.Outcome` decides: a job whose batches all
   settled gets its one ``POST /on-job-complete``; the end state is recorded, with the
   ``worker_counts``, and the status (docs/operations.md) is returned with the exit code.

A signal, or pods that could not start, leave the job resumable: running the same command
again continues it.
"""

from __future__ import annotations

import hashlib
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import IO, Any

import anyio
import msgspec

from supervisor import jobs
from supervisor.config import BatchAPI
from supervisor.dispatch import dispatch_pod, send_job_complete
from supervisor.errors import BadInput, PodError, StartError, first_leaf
from supervisor.jobs import (
    JobMetrics,
    JobSpec,
    JobStatus,
    JobStatusResponse,
    JobSubmission,
    WorkerCounts,
)
from supervisor.layout import Layout
from supervisor.leftovers import Ledger, end_leftovers
from supervisor.lifecycle import (
    Admission,
    Cause,
    Outcome,
    PodState,
    admit,
    exit_code_for,
    worker_counts,
)
from supervisor.linux import become_subreaper
from supervisor.logs import Logger
from supervisor.pod import Pod, check_port_free, pod_env
from supervisor.progress import ProgressReporter
from supervisor.queues.base import Feed, JobRecord, Progress, QueueError
from supervisor.queues.embedded import EmbeddedQueue
from supervisor.reaper import kill_descendants, reap_orphans
from supervisor.rootlock import RootError, claim_root
from supervisor.split import DEFAULT_MAX_BATCH_BYTES, iter_batches

__all__ = ["RunOptions", "RunResult", "run_job"]


@dataclass(slots=True)
class RunOptions:
    layout: Layout
    workers: int | None = None
    concurrency: int = 1
    fresh: bool = False
    batch_timeout: float | None = None
    grace: float = 30.0
    max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES
    cwd: Path | None = None
    progress_stream: IO[str] = field(default_factory=lambda: sys.stderr)
    progress_tty: bool | None = None
    handle_signals: bool = True


@dataclass(slots=True)
class RunResult:
    status: JobStatusResponse
    exit_code: int


def submission_digest(api: BatchAPI, raw_job: bytes, max_batch_bytes: int) -> str:
    """What makes "the same command": the API, the job file's bytes and the batch limit."""
    h = hashlib.sha256()
    h.update(msgspec.json.encode(api))
    h.update(b"\0")
    h.update(raw_job)
    h.update(str(max_batch_bytes).encode())
    return h.hexdigest()


def api_id(api: BatchAPI) -> str:
    return hashlib.sha256(msgspec.json.encode(api)).hexdigest()[:16]


def _parse_time(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _write_spec(path: Path, spec: JobSpec) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(msgspec.json.encode(spec))
    os.replace(tmp, path)


async def run_job(
    api: BatchAPI, sub: JobSubmission, raw_job: bytes, opts: RunOptions, log: Logger
) -> RunResult:
    """Run (or resume) the job, or report the one this command already ran to its end.

    Raises :class:`~supervisor.errors.BadInput` for bad input (nothing started, nothing left
    behind) and :class:`~supervisor.errors.StartError` when the pods could not start (the job
    stays resumable).
    """
    layout = opts.layout
    for path in api.ignored_fields():
        log.info("ignored_field", field=path, reason="no local effect")
    digest = submission_digest(api, raw_job, opts.max_batch_bytes)
    workers = opts.workers or sub.workers
    batches: Iterator[bytes] | None = None
    if opts.fresh or not layout.queue_path.exists():
        # A new job for sure: paths and globs are checked before anything is created.
        batches = iter_batches(sub, max_batch_bytes=opts.max_batch_bytes)
    with claim_root(layout) as claim:
        await end_leftovers(layout.state_dir, log)  # what a killed supervisor left running
        async with await _open_queue(layout) as queue:
            latest = await queue.find_latest(api.name, digest)
            admission = admit(latest, fresh=opts.fresh)
            if admission is Admission.ENDED:
                assert latest is not None
                return await _report_ended(api, latest, queue, log)
            for i in range(workers):
                check_port_free(api.pod.port + i)
            if opts.fresh:
                await _abandon_unfinished(queue, api.name, log)
            try:
                spec = await _admit(api, sub, opts, queue, latest, admission, batches, digest, log)
            except BadInput:
                if admission is Admission.NEW and not await queue.list_jobs():
                    await queue.aclose()
                    claim.undo()  # bad input leaves nothing behind
                raise
            return await _run_admitted(api, sub, spec, queue, opts, log)


async def _open_queue(layout: Layout) -> EmbeddedQueue:
    try:
        return await EmbeddedQueue.open(
            layout.queue_path, dead_letter_root=layout.state_dir / "dead-letters"
        )
    except QueueError as e:  # unwritable, or written by another version: say so, exit 2
        raise RootError(str(e)) from None


async def _abandon_unfinished(queue: EmbeddedQueue, api_name: str, log: Logger) -> None:
    for old in await queue.list_jobs(api_name):
        if old.status not in jobs.END_STATES:
            await queue.set_status(old.job_id, jobs.STOPPED, end_time=jobs.rfc3339())
            log.info("job_abandoned", job_id=old.job_id, reason="--fresh")


async def _admit(
    api: BatchAPI,
    sub: JobSubmission,
    opts: RunOptions,
    queue: EmbeddedQueue,
    latest: JobRecord | None,
    admission: Admission,
    batches: Iterator[bytes] | None,
    digest: str,
    log: Logger,
) -> JobSpec:
    """Create the job (NEW), finish enqueueing it (ENQUEUE), or pick it up (RESUME)."""
    layout = opts.layout
    if admission is not Admission.RESUME and batches is None:
        batches = iter_batches(sub, max_batch_bytes=opts.max_batch_bytes)
    if admission is Admission.NEW:
        assert batches is not None
        spec = JobSpec(
            job_id=jobs.new_job_id(),
            api_name=api.name,
            workers=opts.workers or sub.workers,
            config=sub.config,
            api_id=api_id(api),
            sqs_url=f"sqlite://{layout.queue_path}",
            timeout=sub.timeout,
            sqs_dead_letter_queue=sub.sqs_dead_letter_queue,
            created_time=jobs.rfc3339(),
        )
        await queue.create_job(
            spec.job_id, api.name, digest, msgspec.json.encode(spec), spec.created_time
        )
        log = log.bind(api_name=api.name, job_id=spec.job_id)
        spec.total_batch_count = await _enqueue(queue, spec.job_id, batches, log)
        return spec
    assert latest is not None
    spec = msgspec.json.decode(latest.spec_json, type=JobSpec)
    log = log.bind(api_name=api.name, job_id=spec.job_id)
    if admission is Admission.ENQUEUE:
        assert batches is not None
        log.info("job_resumed", phase="enqueuing")
        spec.total_batch_count = await _enqueue(queue, spec.job_id, batches, log)
    else:
        spec.total_batch_count = latest.total_batches or 0
        spec.start_time = latest.start_time
        log.info(
            "job_resumed",
            succeeded=latest.succeeded,
            failed=latest.dead,
            total=spec.total_batch_count,
        )
    return spec


async def _run_admitted(
    api: BatchAPI,
    sub: JobSubmission,
    spec: JobSpec,
    queue: EmbeddedQueue,
    opts: RunOptions,
    log: Logger,
) -> RunResult:
    log = log.bind(api_name=api.name, job_id=spec.job_id)
    spec.workers = opts.workers or sub.workers
    if spec.start_time is None:
        spec.start_time = jobs.rfc3339()
    _write_spec(opts.layout.spec_path, spec)
    await queue.set_status(spec.job_id, jobs.RUNNING, start_time=spec.start_time)
    total = spec.total_batch_count
    log.info("job_started", total_batches=total, workers=spec.workers, concurrency=opts.concurrency)

    outcome, progress, pods = await _run_pods(api, spec, sub, queue, opts, log)

    end_time = jobs.rfc3339()
    final = outcome.final_status(progress.dead)
    counts = worker_counts([pod.state for pod in pods], final)
    if final is not None and not outcome.resumable:
        await queue.set_status(
            spec.job_id, final, end_time=end_time, worker_counts=msgspec.json.encode(counts)
        )
    if outcome.cause is Cause.START_FAILED:
        log.error("job_not_started", reason=outcome.reason, resumable=True)
        raise StartError(f"{outcome.reason} (the job is kept: run the same command again)")
    log.info(
        "job_finished",
        status=final,
        reason=outcome.reason,
        succeeded=progress.succeeded,
        failed=progress.dead,
        failed_attempts=progress.failed_attempts,
    )
    status = build_status(api, spec, final or jobs.RUNNING, progress, counts, end_time)
    return RunResult(status=status, exit_code=outcome.exit_code(progress.dead))


async def _report_ended(
    api: BatchAPI, record: JobRecord, queue: EmbeddedQueue, log: Logger
) -> RunResult:
    """The same command after its job ended: print that job's final status, send nothing."""
    spec = msgspec.json.decode(record.spec_json, type=JobSpec)
    spec.total_batch_count = record.total_batches
    spec.start_time = record.start_time
    progress = await queue.progress(record.job_id)
    if record.worker_counts is not None:
        counts = msgspec.json.decode(record.worker_counts, type=WorkerCounts)
    else:
        counts = worker_counts([PodState.STOPPED] * spec.workers, record.status)
    log.info(
        "job_already_ended",
        api_name=api.name,
        job_id=record.job_id,
        status=record.status,
        end_time=record.end_time,
        hint="nothing was sent; --fresh starts a new job",
    )
    status = build_status(api, spec, record.status, progress, counts, record.end_time)
    return RunResult(status=status, exit_code=exit_code_for(record.status))


async def _enqueue(queue: EmbeddedQueue, job_id: str, batches: Iterator[bytes], log: Logger) -> int:
    log.info("job_enqueuing")
    total = await queue.enqueue(job_id, batches)
    log.info("job_enqueued", total_batches=total)
    return total


async def _run_pods(
    api: BatchAPI,
    spec: JobSpec,
    sub: JobSubmission,
    queue: EmbeddedQueue,
    opts: RunOptions,
    log: Logger,
) -> tuple[Outcome, Progress, list[Pod]]:
    outcome = Outcome()
    env = pod_env(api, opts.layout, job_id=spec.job_id)
    ledger = Ledger(opts.layout.state_dir)
    pods = [
        Pod(api, index=i, env=env, log=log, grace=opts.grace, cwd=opts.cwd, ledger=ledger)
        for i in range(spec.workers)
    ]
    tty = opts.progress_tty if opts.progress_tty is not None else _isatty(opts.progress_stream)
    subreaper = become_subreaper()

    def is_known(pid: int) -> bool:
        return any(c.pid == pid for p in pods for c in p.children.values())

    def waiting() -> str | None:
        if any(p.serving for p in pods):
            return None
        reasons = [r for p in pods for r in p.waiting_for()]
        return "; ".join(dict.fromkeys(reasons)) or None

    async with queue.open_feed(spec.job_id, max_attempts=sub.max_attempts) as feed:
        reporter = ProgressReporter(
            feed.progress, stream=opts.progress_stream, tty=tty, log=log, waiting=waiting
        )
        run = _Run(feed, pods, outcome, anyio.CancelScope(), opts.grace, log)
        try:
            async with anyio.create_task_group() as services:
                if opts.handle_signals:
                    services.start_soon(run.watch_signals)
                if spec.timeout is not None:
                    deadline = _parse_time(spec.created_time) + spec.timeout
                    services.start_soon(run.watch_timeout, deadline)
                services.start_soon(reporter.run)
                services.start_soon(run.report_not_serving)
                if subreaper:
                    services.start_soon(reap_orphans, is_known)
                await _pods_and_dispatch(pods, feed, spec, opts, run)
                services.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await feed.flush()
                reporter.final()
        progress = feed.progress()
    if subreaper:
        stray = kill_descendants()
        if stray:
            log.warning("killed_strays", pids=stray)
    return outcome, progress, pods


class _Run:
    """What watches a run from the side and ends it early: signals, the job timeout."""

    def __init__(
        self,
        feed: Feed,
        pods: list[Pod],
        outcome: Outcome,
        dispatch_scope: anyio.CancelScope,
        grace: float,
        log: Logger,
    ) -> None:
        self.feed = feed
        self.pods = pods
        self.outcome = outcome
        self.dispatch_scope = dispatch_scope
        self.ended = anyio.Event()  # a cause arrived: no /on-job-complete, stop
        self.grace = grace
        self.log = log

    def end(
        self, cause: Cause, reason: str, *, status: str | None = None, sig: int | None = None
    ) -> bool:
        """Stop taking batches; in-flight ones get the grace period. False if already ending."""
        if not self.outcome.record(cause, reason, status=status, signal=sig):
            return False
        self.feed.close()  # dispatch hands back what it holds and ends once nothing is in flight
        self.dispatch_scope.deadline = anyio.current_time() + self.grace
        self.ended.set()
        return True

    async def watch_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                name = signal.Signals(signum).name
                if self.end(Cause.SIGNAL, f"received {name}", sig=signum):
                    in_flight = self.feed.progress().in_flight
                    self.log.warning(
                        "signal",
                        signal=name,
                        action="stop taking batches, then stop the containers",
                        waiting_for=f"{in_flight} batch(es) in flight, up to {self.grace:g}s"
                        if in_flight
                        else f"the containers to exit, up to {self.grace:g}s",
                        again="a second signal stops at once",
                    )
                else:
                    self.log.warning("signal", signal=name, action="stop now")
                    self.dispatch_scope.cancel()
                    for pod in self.pods:
                        pod.kill_now()

    async def watch_timeout(self, deadline: float) -> None:
        await anyio.sleep(max(deadline - time.time(), 0))
        if self.end(Cause.TIMEOUT, "the job's timeout expired"):
            self.log.warning("job_timed_out", grace=self.grace)

    async def report_not_serving(self, every: float = 5.0) -> None:
        """While no pod serves, say why every few seconds (a pod that never gets ready)."""
        while True:
            await anyio.sleep(every)
            if self.ended.is_set() or any(p.serving for p in self.pods):
                continue
            for pod in self.pods:
                reasons = pod.waiting_for()
                if reasons:
                    self.log.warning("pod_not_ready", pod=pod.index, waiting_for=reasons)


async def _pods_and_dispatch(
    pods: list[Pod], feed: Feed, spec: JobSpec, opts: RunOptions, run: _Run
) -> None:
    log = run.log
    try:
        async with anyio.create_task_group() as pod_group:
            for pod in pods:
                await pod_group.start(pod.run)
            with run.dispatch_scope:
                async with anyio.create_task_group() as slots:
                    for pod in pods:
                        slots.start_soon(
                            partial(
                                dispatch_pod,
                                feed,
                                pod,
                                job_id=spec.job_id,
                                concurrency=opts.concurrency,
                                batch_timeout=opts.batch_timeout,
                                log=log.bind(pod=pod.index),
                            )
                        )
            if run.outcome.sends_job_complete:
                # Every ack durable first: a crash after /on-job-complete must not resend.
                await feed.flush()
                p = feed.progress()
                with anyio.CancelScope() as scope:
                    async with anyio.create_task_group() as race:  # a pod, or a stop/timeout

                        async def stop_waiting() -> None:
                            await run.ended.wait()
                            scope.cancel()

                        race.start_soon(stop_waiting)
                        target = await _first_serving(pods)
                        race.cancel_scope.cancel()
                    await send_job_complete(
                        target.port,
                        job_id=spec.job_id,
                        succeeded=p.succeeded,
                        failed=p.dead,
                        log=log,
                    )
            pod_group.cancel_scope.cancel()
    except* StartError as group:
        start_error = first_leaf(group, StartError)
        run.end(Cause.START_FAILED, str(start_error))
        log.error("pod_not_started", error=str(start_error))
    except* PodError as group:
        err = first_leaf(group, PodError)
        run.end(Cause.POD_FAILED, str(err), status=err.status)
        log.error("pod_failed", error=str(err), status=err.status)


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


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def build_status(
    api: BatchAPI,
    spec: JobSpec,
    status: str,
    progress: Progress,
    counts: WorkerCounts,
    end_time: str | None,
) -> JobStatusResponse:
    fields: dict[str, Any] = msgspec.structs.asdict(spec)
    job_status = JobStatus(
        **fields,
        status=status,
        batches_in_queue=progress.in_queue,
        worker_counts=counts,
        end_time=end_time,
    )
    return JobStatusResponse(
        job_status=job_status,
        endpoint=api.networking.endpoint
        if api.networking is not None and api.networking.endpoint
        else f"/{api.name}",
        api_spec=msgspec.to_builtins(api),
        metrics=JobMetrics(
            succeeded=progress.succeeded,
            failed=progress.failed_attempts,
            average_time_per_batch=progress.average_time_per_batch,
        ),
    )
