"""``supervisor run``: one job on this machine, end to end, with the embedded queue.

Theory of operation
-------------------
1. *Admit.* Find an unfinished job for the same API and submission under the root (resume),
   or create one: split the submission into batches and enqueue them all before any
   container starts, so bad input (exit 2) starts nothing and leaves nothing behind.
2. *Run.* Write ``job.json``, start N local pods, and let ``--concurrency`` slots per pod
   pull batches from the durable feed. Around them: signals (stop taking batches, grace,
   stop containers), the job timeout, progress, and the zombie reaper.
3. *Finish.* When the feed has no more work, ``POST /on-job-complete`` once, stop the pods,
   record the end state and return the status (SPEC §5) with the process exit code.

Signals leave the job resumable: running the same command again continues it.
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
from supervisor.errors import PodError, first_leaf
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
from supervisor.logs import Logger
from supervisor.pod import CORTEX_VERSION, Pod
from supervisor.progress import ProgressReporter
from supervisor.queues.base import Feed, Progress
from supervisor.queues.embedded import EmbeddedQueue
from supervisor.reaper import become_subreaper, kill_descendants, reap_orphans
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


@dataclass(slots=True)
class _Outcome:
    status: str | None = None
    reason: str | None = None
    signal: int | None = None

    def set(self, status: str, reason: str, sig: int | None = None) -> None:
        if self.status is None:  # the first cause wins
            self.status, self.reason, self.signal = status, reason, sig


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
    """Run (or resume) the job; raises JobError for bad input before anything starts."""
    layout = opts.layout
    layout.prepare()
    await end_leftovers(layout.state_dir, log)
    for path in api.ignored_fields():
        log.info("ignored_field", field=path, reason="no local effect")
    digest = submission_digest(api, raw_job, opts.max_batch_bytes)
    async with await EmbeddedQueue.open(
        layout.queue_path, dead_letter_root=layout.state_dir / "dead-letters"
    ) as queue:
        record = None if opts.fresh else await queue.find_resumable(api.name, digest)
        if opts.fresh:
            for old in await queue.list_jobs(api.name):
                if old.status not in jobs.END_STATES:
                    await queue.set_status(old.job_id, jobs.STOPPED, end_time=jobs.rfc3339())
                    log.info("job_abandoned", job_id=old.job_id, reason="--fresh")
        workers = opts.workers or sub.workers
        if record is None or record.status == jobs.ENQUEUING:
            # Paths, globs and item sizes are checked here, before anything is stored.
            batches = iter_batches(sub, max_batch_bytes=opts.max_batch_bytes)
        if record is None:
            spec = JobSpec(
                job_id=jobs.new_job_id(),
                api_name=api.name,
                workers=workers,
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
            total = await _enqueue(queue, spec.job_id, batches, log)
        else:
            spec = msgspec.json.decode(record.spec_json, type=JobSpec)
            log = log.bind(api_name=api.name, job_id=spec.job_id)
            if record.status == jobs.ENQUEUING:
                log.info("job_resumed", phase="enqueuing")
                total = await _enqueue(queue, spec.job_id, batches, log)
            else:
                total = record.total_batches or 0
                log.info(
                    "job_resumed",
                    succeeded=record.succeeded,
                    failed=record.dead,
                    total=total,
                )
        spec.workers = workers
        spec.total_batch_count = total
        if spec.start_time is None:
            spec.start_time = jobs.rfc3339()
        _write_spec(layout.spec_path, spec)
        await queue.set_status(spec.job_id, jobs.RUNNING, start_time=spec.start_time)
        log.info("job_started", total_batches=total, workers=workers, concurrency=opts.concurrency)

        outcome, progress, pods = await _run_pods(api, spec, sub, queue, opts, log)

        end_time = jobs.rfc3339()
        if outcome.status is None:
            outcome.status = jobs.COMPLETED_WITH_FAILURES if progress.dead else jobs.SUCCEEDED
        if outcome.signal is None:  # a signal leaves the job resumable
            await queue.set_status(spec.job_id, outcome.status, end_time=end_time)
        log.info(
            "job_finished",
            status=outcome.status,
            reason=outcome.reason,
            succeeded=progress.succeeded,
            failed=progress.dead,
            failed_attempts=progress.failed_attempts,
        )
        status = build_status(api, spec, outcome.status, progress, pods, end_time)
        if outcome.signal is not None:
            code = 128 + outcome.signal
        else:
            code = 0 if outcome.status == jobs.SUCCEEDED else 1
        return RunResult(status=status, exit_code=code)


async def _enqueue(queue: EmbeddedQueue, job_id: str, batches: Iterator[bytes], log: Logger) -> int:
    log.info("job_enqueuing")
    total = await queue.enqueue(job_id, batches)
    log.info("job_enqueued", total_batches=total)
    return total


def _pod_env(api: BatchAPI, spec: JobSpec, layout: Layout) -> dict[str, str]:
    return {
        "CORTEX_VERSION": CORTEX_VERSION,
        "CORTEX_API_NAME": api.name,
        "CORTEX_JOB_ID": spec.job_id,
        "CORTEX_SPEC_PATH": str(layout.spec_path),
        "CORTEX_MNT_DIR": str(layout.mnt_dir),
    }


async def _run_pods(
    api: BatchAPI,
    spec: JobSpec,
    sub: JobSubmission,
    queue: EmbeddedQueue,
    opts: RunOptions,
    log: Logger,
) -> tuple[_Outcome, Progress, list[Pod]]:
    outcome = _Outcome()
    env = _pod_env(api, spec, opts.layout)
    ledger = Ledger(opts.layout.state_dir)
    pods = [
        Pod(api, index=i, env=env, log=log, grace=opts.grace, cwd=opts.cwd, ledger=ledger)
        for i in range(spec.workers)
    ]
    tty = opts.progress_tty if opts.progress_tty is not None else _isatty(opts.progress_stream)
    subreaper = become_subreaper()

    def is_known(pid: int) -> bool:
        return any(c.pid == pid for p in pods for c in p.children.values())

    async with queue.open_feed(spec.job_id, max_attempts=sub.max_attempts) as feed:
        reporter = ProgressReporter(feed.progress, stream=opts.progress_stream, tty=tty, log=log)
        dispatch_scope = anyio.CancelScope()
        try:
            async with anyio.create_task_group() as services:
                if opts.handle_signals:
                    services.start_soon(
                        _watch_signals, feed, outcome, dispatch_scope, opts.grace, log
                    )
                if spec.timeout is not None:
                    deadline = _parse_time(spec.created_time) + spec.timeout
                    services.start_soon(_watch_timeout, feed, outcome, deadline, log)
                services.start_soon(reporter.run)
                if subreaper:
                    services.start_soon(reap_orphans, is_known)
                await _pods_and_dispatch(pods, feed, spec, opts, outcome, dispatch_scope, log)
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


async def _pods_and_dispatch(
    pods: list[Pod],
    feed: Feed,
    spec: JobSpec,
    opts: RunOptions,
    outcome: _Outcome,
    dispatch_scope: anyio.CancelScope,
    log: Logger,
) -> None:
    try:
        async with anyio.create_task_group() as pod_group:
            for pod in pods:
                await pod_group.start(pod.run)
            with dispatch_scope:
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
            if outcome.status is None:
                # Every ack durable first: a crash after /on-job-complete must not resend.
                await feed.flush()
                p = feed.progress()
                target = await _first_serving(pods)
                await send_job_complete(
                    target.port, job_id=spec.job_id, succeeded=p.succeeded, failed=p.dead, log=log
                )
            pod_group.cancel_scope.cancel()
    except* PodError as group:
        err = first_leaf(group, PodError)
        outcome.set(err.status, str(err))
        feed.close()
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


async def _watch_signals(
    feed: Feed, outcome: _Outcome, dispatch_scope: anyio.CancelScope, grace: float, log: Logger
) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            name = signal.Signals(signum).name
            if outcome.signal is None:
                outcome.set(jobs.STOPPED, f"received {name}", signum)
                log.warning("signal", signal=name, action="stop taking batches", grace=grace)
                feed.close()
                dispatch_scope.deadline = anyio.current_time() + grace
            else:
                log.warning("signal", signal=name, action="stop now")
                dispatch_scope.cancel()


async def _watch_timeout(feed: Feed, outcome: _Outcome, deadline: float, log: Logger) -> None:
    await anyio.sleep(max(deadline - time.time(), 0))
    outcome.set(jobs.TIMED_OUT, "the job's timeout expired")
    log.warning("job_timed_out")
    feed.close()


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
    pods: list[Pod],
    end_time: str | None,
) -> JobStatusResponse:
    counts = WorkerCounts()
    for pod in pods:
        state = pod.state
        if state == "killed_oom":
            counts.killed_oom += 1
        elif state == "failed":
            counts.failed += 1
        elif status == jobs.SUCCEEDED or status == jobs.COMPLETED_WITH_FAILURES:
            counts.succeeded += 1
        elif status == jobs.STOPPED:
            counts.killed += 1
        else:
            counts.unknown += 1
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
