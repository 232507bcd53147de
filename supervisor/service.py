"""The job service behind ``supervisor serve``: submissions, jobs on local pods, status.

Theory of operation
-------------------
:class:`JobService` owns the server's queue and the jobs it runs. A submission is decoded
and checked (:func:`~supervisor.jobs.decode_submission`; paths confined to the data folders),
split and enqueued *before* it is answered, so a bad one -- even an item over the batch limit
found halfway -- stores nothing and gets one sentence; a good one is answered with its job
spec and starts at once, on local pods of its own (:class:`~supervisor.execution.
JobExecution`). Each job gets a block of ports no other running job uses (pod i of the job
listens on pod.port + offset + i), its own folder for ``job.json`` and ``mnt``
(``ROOT/jobs/<job_id>/``), and the job API's address for chaining.

Status comes from the running execution (live counters and pod states) or, for a job not
running here, from the queue (the final ``worker_counts`` are stored with the end state).

With a shared queue (``serve --queue redis://...``, ``local_pods`` False) the service starts
no pods: a submission is enqueued and marked ``running``, and ``supervisor worker`` pods join
it. Status, list, stop and dead letters then come from the queue alone, so any ``serve``
instance answers for any job: a running job's ``worker_counts`` from its pods' heartbeats,
a stop recorded in the queue for the pods to see within a heartbeat. Nothing is resumed at
start-up (the workers carry on by themselves).
Stopping a running job ends it ``stopped``; the server stopping (SIGTERM) ends every job the
way a signal ends ``run``: in-flight batches get the grace period and the jobs stay
resumable. At start-up every unfinished job is resumed, succeeded batches not sent again; a
job cut while it was being enqueued (its submission was never answered) is marked
``enqueue_failed``.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import msgspec

from supervisor import jobs
from supervisor.client import chaining_env, write_cli_config
from supervisor.config import BatchAPI, api_id
from supervisor.errors import BadInput, JobError
from supervisor.execution import JobExecution, Placement
from supervisor.jobs import JobSpec, JobStatus, JobStatusResponse, WorkerCounts
from supervisor.layout import Layout
from supervisor.lifecycle import Cause, PodState, heartbeat_counts, worker_counts
from supervisor.logs import Logger
from supervisor.metrics import Metrics
from supervisor.ports import listening_ports
from supervisor.queues.base import DeadLetter, JobQueue, JobRecord, QueueError, progress_of
from supervisor.sources import list_files
from supervisor.split import DEFAULT_MAX_BATCH_BYTES, iter_batches, validate_submission
from supervisor.status import build_status, spec_of

__all__ = ["SHARED_METRICS_TTL", "JobService", "NotFound", "ServiceSettings"]

SHARED_METRICS_TTL = 2.0  # seconds: /metrics reads a shared queue at most this often
SHARED_METRICS_READ = 1.0  # seconds that read may take before /metrics answers without it


class NotFound(LookupError):
    """An unknown API or job (HTTP 404)."""


@dataclass(slots=True)
class ServiceSettings:
    layout: Layout  # the server's root: queue, jobs/<job_id>/, cli.yaml
    endpoint: str  # the job API's base URL, as containers reach it
    data_dirs: list[Path] = field(default_factory=list)  # what submissions may read
    max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES
    concurrency: int = 1
    batch_timeout: float | None = None
    grace: float = 30.0
    cwd: Path | None = None
    token: str | None = None  # the API's bearer token: containers get it, to chain
    local_pods: bool = True  # False: `supervisor worker` pods do the work (a shared queue)


class JobService:
    """Jobs of ``apis`` in ``queue``, on local pods or on workers (see the module doc)."""

    def __init__(
        self,
        apis: list[BatchAPI],
        queue: JobQueue,
        settings: ServiceSettings,
        log: Logger,
        metrics: Metrics | None = None,
    ) -> None:
        self.apis = {api.name: api for api in apis}
        self.queue = queue
        self.settings = settings
        self.log = log
        self.metrics = metrics
        self.running: dict[str, JobExecution] = {}
        self._ports: dict[str, set[int]] = {}  # job_id -> ports its pods use
        self._tg: anyio.abc.TaskGroup | None = None
        self._stopping = False
        self._idle: anyio.Event | None = None
        self._shared_jobs: set[tuple[str, str]] = set()  # exported running, by /metrics
        self._shared_due = 0.0  # time.monotonic() of the next read for /metrics
        self._env = chaining_env(settings.endpoint, settings.layout.cli_config_dir, settings.token)

    # -- lifecycle -----------------------------------------------------------------------------

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Resume unfinished jobs, then run jobs as they are submitted, until cancelled or
        :meth:`shutdown` (which waits for the jobs' pods to stop)."""
        write_cli_config(self.settings.layout.cli_config_dir, self.settings.endpoint)
        async with anyio.create_task_group() as tg:
            self._tg = tg
            await self._resume_all()
            task_status.started()
            await anyio.sleep_forever()

    def shutdown(self, sig: signal.Signals) -> None:
        """Stop every job as a signal stops ``run``: resumable at the next start."""
        self._stopping = True
        for execution in list(self.running.values()):
            execution.on_signal(sig)

    def kill_now(self) -> None:
        for execution in list(self.running.values()):
            execution.kill_now()

    @property
    def idle(self) -> bool:
        return not self.running

    async def wait_idle(self) -> None:
        """Return once no job runs (after :meth:`shutdown`, when their pods have stopped)."""
        while self.running:
            self._idle = anyio.Event()
            await self._idle.wait()

    async def _resume_all(self) -> None:
        """Jobs whose submitter died while enqueuing them end ``enqueue_failed``; with local
        pods, unfinished jobs start again (on workers, the workers carry on by themselves)."""
        for record in reversed(await self.queue.list_jobs()):  # oldest first
            api = self.apis.get(record.api_name)
            if api is None or record.status in jobs.END_STATES:
                continue
            if (await self._abandoned(record)).status == jobs.ENQUEUE_FAILED:
                continue
            if not self.settings.local_pods or record.status == jobs.ENQUEUING:
                continue
            spec = spec_of(record)
            self.log.info("job_resumed", api_name=api.name, job_id=spec.job_id)
            await self._start(api, spec)

    async def _start(self, api: BatchAPI, spec: JobSpec) -> None:
        if not self.settings.local_pods:  # the workers see it running and join it
            await self.queue.set_status(spec.job_id, jobs.RUNNING)
            return
        assert self._tg is not None
        listening = await anyio.to_thread.run_sync(listening_ports)  # /proc, off the loop
        first = self._allocate(api, spec.workers, spec.job_id, listening)
        root = self.settings.layout
        execution = JobExecution(
            api,
            spec,
            self.queue,
            Placement(
                layout=Layout(root.root / "jobs" / spec.job_id),
                ledger_dir=root.state_dir,
                first_pod=first,
                extra_env=self._env,
                owns_process_tree=False,
                endpoint=self.endpoint_of(api),
            ),
            concurrency=self.settings.concurrency,
            batch_timeout=self.settings.batch_timeout,
            grace=self.settings.grace,
            cwd=self.settings.cwd,
            log=self.log,
            metrics=self.metrics,
        )
        self.running[spec.job_id] = execution
        self._tg.start_soon(self._execute, execution)

    async def _execute(self, execution: JobExecution) -> None:
        job_id = execution.spec.job_id
        try:
            result = await execution.run()
            if result.outcome.cause is Cause.START_FAILED:
                # Not the job's fault (a port taken, a command missing): it stays running in
                # the queue and is resumed when the server restarts.
                self.log.error("job_not_started", job_id=job_id, reason=result.outcome.reason)
        finally:
            self.running.pop(job_id, None)
            self._ports.pop(job_id, None)
            if not self.running and self._idle is not None:
                self._idle.set()

    def _allocate(self, api: BatchAPI, workers: int, job_id: str, listening: set[int]) -> int:
        """The smallest offset whose ports no running job uses and nothing listens on."""
        taken = set().union(*self._ports.values(), listening)
        offset = 0
        while True:
            ports = {api.pod.port + offset + i for i in range(workers)}
            if max(ports) > 65535:
                raise JobError(f"no free block of {workers} port(s) above {api.pod.port}")
            if not ports & taken:
                self._ports[job_id] = ports
                return offset
            offset += 1

    # -- the API's operations ------------------------------------------------------------------

    def endpoint_of(self, api: BatchAPI) -> str:
        """The API's URL, as ``cortex get`` shows it: where its jobs are submitted."""
        return f"{self.settings.endpoint}/{api.name}"

    def api(self, api_name: str) -> BatchAPI:
        api = self.apis.get(api_name)
        if api is None:
            known = ", ".join(sorted(self.apis)) or "none"
            raise NotFound(f"there is no BatchAPI named `{api_name}` here (served: {known})")
        return api

    async def submit(self, api_name: str, body: bytes) -> JobSpec:
        """Check, split and enqueue a submission, then start it; BadInput stores nothing."""
        api = self.api(api_name)
        if self._stopping:
            raise BadInput("the server is shutting down; submit again once it is back")
        sub = jobs.decode_submission(body, where="job")
        batches = await anyio.to_thread.run_sync(
            partial(
                iter_batches,
                sub,
                max_batch_bytes=self.settings.max_batch_bytes,
                allowed_roots=self.settings.data_dirs,
            )
        )
        spec = self._new_spec(api, sub.workers, sub.config, sub.timeout, sub.sqs_dead_letter_queue)
        return await self._enqueue_and_start(api, spec, batches)

    async def dry_run(self, api_name: str, body: bytes) -> str:
        """What a submission would process (Cortex's text answer), storing nothing."""
        self.api(api_name)
        sub = jobs.decode_submission(body, where="job")
        roots = self.settings.data_dirs
        source = sub.delimited_files or sub.file_path_lister
        if source is not None:
            files = await anyio.to_thread.run_sync(
                partial(
                    list_files,
                    source.s3_paths,
                    source.includes,
                    source.excludes,
                    allowed_roots=roots,
                    where="delimited_files"
                    if sub.delimited_files is not None
                    else "file_path_lister",
                )
            )
            if sub.delimited_files is not None:  # the lines must be JSON too
                await anyio.to_thread.run_sync(
                    partial(
                        validate_submission,
                        sub,
                        max_batch_bytes=self.settings.max_batch_bytes,
                        allowed_roots=roots,
                    )
                )
            lines = [*files]
        else:
            count = await anyio.to_thread.run_sync(
                partial(
                    validate_submission,
                    sub,
                    max_batch_bytes=self.settings.max_batch_bytes,
                    allowed_roots=roots,
                )
            )
            assert sub.item_list is not None
            items = len(msgspec.json.decode(sub.item_list.items, type=list[msgspec.Raw]))
            lines = [f"{items} item(s) in {count} batch(es)"]
        return "".join(f"{line}\n" for line in lines) + "validations passed"

    async def retry_dead_letters(self, api_name: str, job_id: str) -> JobSpec:
        """A new job whose batches are exactly ``job_id``'s dead letters."""
        api = self.api(api_name)
        record = await self._record(api_name, job_id)
        letters = await self.dead_letters(api_name, job_id)
        if not letters:
            raise BadInput(f"job {job_id} has no dead letters to retry")
        old = spec_of(record)
        spec = self._new_spec(api, old.workers, old.config, old.timeout, old.sqs_dead_letter_queue)
        bodies: Iterator[bytes] = (bytes(letter.body) for letter in letters)
        self.log.info("dead_letters_retried", job_id=job_id, new_job_id=spec.job_id)
        return await self._enqueue_and_start(api, spec, bodies)

    def _new_spec(
        self,
        api: BatchAPI,
        workers: int,
        config: dict[str, Any] | None,
        timeout: int | None,
        dlq: jobs.DeadLetterQueue | None,
    ) -> JobSpec:
        return JobSpec(
            job_id=jobs.new_job_id(),
            api_name=api.name,
            workers=workers,
            config=config,
            api_id=api_id(api),
            sqs_url=self.queue.url,
            timeout=timeout,
            sqs_dead_letter_queue=dlq,
            created_time=jobs.rfc3339(),
        )

    async def _enqueue_and_start(
        self, api: BatchAPI, spec: JobSpec, batches: Iterator[bytes]
    ) -> JobSpec:
        # The digest is the job id: every submission over HTTP is a job of its own.
        await self.queue.create_job(
            spec.job_id, api.name, spec.job_id, msgspec.json.encode(spec), spec.created_time
        )
        spec.total_batch_count = await self.queue.enqueue(spec.job_id, batches)
        self.log.info(
            "job_submitted",
            api_name=api.name,
            job_id=spec.job_id,
            total_batches=spec.total_batch_count,
            workers=spec.workers,
        )
        await self._start(api, spec)
        return spec

    async def status(self, api_name: str, job_id: str) -> JobStatusResponse:
        api = self.api(api_name)
        execution = self.running.get(job_id)
        if execution is not None and execution.api.name == api_name:
            progress = execution.progress()
            if progress is not None:
                return execution.status(progress)
        return await self._stored_status(api, await self._record(api_name, job_id))

    async def list_jobs(self, api_name: str) -> list[JobStatus]:
        """Every job of the API, newest first."""
        api = self.api(api_name)
        out = []
        for listed in await self.queue.list_jobs(api_name):
            record = await self._abandoned(listed)
            execution = self.running.get(record.job_id)
            progress = execution.progress() if execution is not None else None
            if execution is not None and progress is not None:
                out.append(execution.status(progress).job_status)
            else:
                out.append((await self._stored_status(api, record)).job_status)
        return out

    async def stop(self, api_name: str, job_id: str) -> None:
        record = await self._record(api_name, job_id)
        execution = self.running.get(job_id)
        if execution is not None:
            execution.end(Cause.STOPPED, "stopped through the job API")
            self.log.info("job_stop_requested", api_name=api_name, job_id=job_id)
            return
        if record.status in jobs.END_STATES or not await self.queue.set_status(
            job_id, jobs.STOPPED, end_time=jobs.rfc3339()
        ):  # the second: it ended (its pods completed it) since it was read
            ended = await self._record(api_name, job_id)
            raise BadInput(f"job {job_id} has already ended ({ended.status})")

    async def dead_letters(self, api_name: str, job_id: str) -> list[DeadLetter]:
        await self._record(api_name, job_id)
        return await self.queue.dead_letters(job_id)

    async def _record(self, api_name: str, job_id: str) -> JobRecord:
        self.api(api_name)
        record = await self.queue.get_job(job_id)
        if record is None or record.api_name != api_name:
            raise NotFound(f"there is no job {job_id} of BatchAPI `{api_name}`")
        return await self._abandoned(record)

    async def _abandoned(self, record: JobRecord) -> JobRecord:
        """``record``, ended ``enqueue_failed`` if it is still being enqueued by nobody: its
        submitter died on the way (its client never got an answer, so never knew the job)."""

        def unfinished(r: JobRecord) -> bool:
            return r.status == jobs.ENQUEUING or (
                r.total_batches is None and r.status not in jobs.END_STATES
            )

        if not unfinished(record) or await self.queue.enqueue_in_progress(record.job_id):
            return record
        # Read again: the submitter may have finished between the first read and the check.
        again = await self.queue.get_job(record.job_id)
        if again is None or not unfinished(again):
            return record if again is None else again
        end_time = jobs.rfc3339()
        await self.queue.set_status(record.job_id, jobs.ENQUEUE_FAILED, end_time=end_time)
        self.log.warning("job_enqueue_failed", job_id=record.job_id, reason="its submitter died")
        return msgspec.structs.replace(record, status=jobs.ENQUEUE_FAILED, end_time=end_time)

    async def _stored_status(self, api: BatchAPI, record: JobRecord) -> JobStatusResponse:
        """The status of a job not running here: the record says it all (no feed is open,
        so nothing is in flight); no second read of the queue."""
        spec = spec_of(record)
        running = record.status not in jobs.END_STATES and record.total_batches is not None
        counts = await self._counts(record, spec)
        if running and not self.settings.local_pods:  # on workers: ask the queue and them
            progress = await self.queue.progress(record.job_id)
            return build_status(
                api, spec, record.status, progress, counts, None, self.endpoint_of(api)
            )
        return build_status(
            api,
            spec,
            record.status,
            progress_of(record),
            counts,
            record.end_time,
            self.endpoint_of(api),
        )

    async def _counts(self, record: JobRecord, spec: JobSpec) -> WorkerCounts:
        """The ``worker_counts`` of a job not running here: from its pods' heartbeats while
        it runs on workers, else as stored with its end state."""
        running = record.status not in jobs.END_STATES and record.total_batches is not None
        if running and not self.settings.local_pods:
            return heartbeat_counts(await self.queue.pods(record.job_id), spec.workers, None)
        if record.worker_counts is not None:
            return msgspec.json.decode(record.worker_counts, type=WorkerCounts)
        if record.status in jobs.END_STATES:
            return worker_counts([PodState.STOPPED] * spec.workers, record.status)
        return WorkerCounts(pending=spec.workers)

    # -- what /status and /metrics show ---------------------------------------------------------

    def admin_status(self) -> dict[str, Any]:
        return {
            "apis": sorted(self.apis),
            "endpoint": self.settings.endpoint,
            "queue": self.queue.url,
            "jobs": [execution.describe() for execution in self.running.values()],
        }

    def ready(self) -> bool:
        """Healthy: serving, and every running job's pods ready."""
        return all(execution.ready() for execution in self.running.values())

    async def refresh_metrics(self) -> None:
        """Before a scrape: the running jobs' gauges; with a shared queue, each job's figures
        from the queue (see :meth:`_refresh_shared`)."""
        for execution in self.running.values():
            execution.refresh_metrics()
        if not self.settings.local_pods:
            await self._refresh_shared()

    async def _refresh_shared(self) -> None:
        """Each job of the shared queue that runs, or ran when last seen, exported with the
        figures its pods keep there (summed over every pod): its batch counters, batches in
        all and failed for good, its pods by state from their heartbeats. One read of the
        jobs and one of each running job's heartbeats, at most every ``SHARED_METRICS_TTL``
        seconds; an ended job's series go after the usual retention."""
        metrics = self.metrics
        now = time.monotonic()
        if metrics is None or now < self._shared_due:
            return
        self._shared_due = now + SHARED_METRICS_TTL
        # Bounded: the queue retries while Redis is away, and /metrics must answer all the
        # same (a liveness probe asks it), with the figures it had.
        running: set[tuple[str, str]] | None = None
        with anyio.move_on_after(SHARED_METRICS_READ) as scope:
            running = await self._read_shared(metrics)
        if scope.cancelled_caught:
            self.log.warning("metrics_not_refreshed", error="the queue did not answer in time")
            return
        if running is None:
            return
        for key in self._shared_jobs - running:  # ended (or deleted) since the last look
            metrics.job_ended(*key)
        self._shared_jobs = running

    async def _read_shared(self, metrics: Metrics) -> set[tuple[str, str]] | None:
        """Export the shared queue's jobs; the running ones, or None if the queue failed."""
        running: set[tuple[str, str]] = set()
        try:
            records = await self.queue.list_jobs()
            for record in records:
                key = (record.api_name, record.job_id)
                if record.api_name not in self.apis:
                    continue
                live = record.status not in jobs.END_STATES and record.total_batches is not None
                if not live and key not in self._shared_jobs:
                    continue  # ended before this server saw it run
                counts = await self._counts(record, spec_of(record))
                metrics.job_counted(*key, record.succeeded, record.failed_attempts)
                metrics.job_figures(*key, progress_of(record), counts)
                if live:
                    running.add(key)
        except QueueError as e:  # /metrics still answers (a liveness probe asks it)
            self.log.warning("metrics_not_refreshed", error=str(e))
            return None
        return running
