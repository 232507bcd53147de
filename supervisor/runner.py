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
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import IO, TYPE_CHECKING

import anyio
import msgspec

from supervisor import jobs
from supervisor.config import BatchAPI, api_id
from supervisor.errors import BadInput, StartError
from supervisor.execution import ExecutionResult, JobExecution, Placement
from supervisor.jobs import (
    JobSpec,
    JobStatusResponse,
    JobSubmission,
    WorkerCounts,
)
from supervisor.layout import Layout
from supervisor.leftovers import end_leftovers
from supervisor.lifecycle import (
    Admission,
    Cause,
    PodState,
    admit,
    exit_code_for,
    worker_counts,
)
from supervisor.logs import Logger
from supervisor.pod import check_port_free
from supervisor.queues.base import JobRecord, QueueError
from supervisor.queues.embedded import EmbeddedQueue
from supervisor.rootlock import RootError, claim_root
from supervisor.split import DEFAULT_MAX_BATCH_BYTES, iter_batches
from supervisor.status import build_status

if TYPE_CHECKING:
    from supervisor.metrics import Metrics

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
    admin: tuple[str, int] | None = None  # --admin HOST:PORT


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
    spec.workers = opts.workers or sub.workers
    tty = opts.progress_tty if opts.progress_tty is not None else _isatty(opts.progress_stream)
    execution = JobExecution(
        api,
        spec,
        queue,
        Placement(layout=opts.layout, ledger_dir=opts.layout.state_dir),
        concurrency=opts.concurrency,
        batch_timeout=opts.batch_timeout,
        grace=opts.grace,
        cwd=opts.cwd,
        log=log,
        progress_stream=opts.progress_stream,
        progress_tty=tty,
        handle_signals=opts.handle_signals,
        metrics=_metrics() if opts.admin is not None else None,
    )
    if opts.admin is None:
        result = await execution.run()
    else:
        result = await _run_with_admin(execution, opts.admin, log)
    if result.outcome.cause is Cause.START_FAILED:
        raise StartError(f"{result.outcome.reason} (the job is kept: run the same command again)")
    return RunResult(status=result.status, exit_code=result.exit_code)


def _metrics() -> Metrics:
    from supervisor.metrics import Metrics  # prometheus_client: only for --admin

    return Metrics()


async def _run_with_admin(
    execution: JobExecution, listen: tuple[str, int], log: Logger
) -> ExecutionResult:
    """``run --admin HOST:PORT``: /healthz, /status and /metrics while the job runs."""
    from supervisor.admin import Admin, serve_admin

    admin = Admin(
        ready=execution.ready,
        status=execution.describe,
        metrics=execution.metrics,
        refresh=execution.refresh_metrics,
    )
    async with anyio.create_task_group() as tg:
        await tg.start(partial(serve_admin, *listen, admin, logger=log))
        result = await execution.run()
        tg.cancel_scope.cancel()
    return result


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


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
