"""A job's documents: its stored spec, ``job.json``, and the status Cortex's clients read.

:func:`build_status` composes the status (docs/job-api.md: ``job_status``, ``endpoint``,
``api_spec``, ``metrics``) from the spec, the job's state, its counters and its pods' counts;
``run``, ``serve`` and ``worker`` all answer with it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import msgspec

from supervisor.config import BatchAPI
from supervisor.jobs import JobMetrics, JobSpec, JobStatus, JobStatusResponse, WorkerCounts
from supervisor.queues.base import JobRecord, Progress

__all__ = ["build_status", "spec_of", "write_spec"]


def spec_of(record: JobRecord) -> JobSpec:
    """The spec of a stored job, with its batch count and start time as stored."""
    spec = msgspec.json.decode(record.spec_json, type=JobSpec)
    spec.total_batch_count = record.total_batches
    spec.start_time = record.start_time
    return spec


def write_spec(path: Path, spec: JobSpec) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(msgspec.json.encode(spec))
    os.replace(tmp, path)


def build_status(
    api: BatchAPI,
    spec: JobSpec,
    status: str,
    progress: Progress,
    counts: WorkerCounts,
    end_time: str | None,
    endpoint: str | None = None,
) -> JobStatusResponse:
    """The job's status; ``endpoint`` is the API's URL where a job API serves it (else the
    API file's ``networking.endpoint``, else ``/<api_name>``)."""
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
        endpoint=endpoint
        or (api.networking.endpoint if api.networking is not None else None)
        or f"/{api.name}",
        api_spec=msgspec.to_builtins(api),
        metrics=JobMetrics(
            succeeded=progress.succeeded,
            failed=progress.failed_attempts,
            average_time_per_batch=progress.average_time_per_batch,
        ),
    )
