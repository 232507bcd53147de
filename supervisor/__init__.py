"""supervisor: a runtime for batch-processing pods, compatible with Cortex's Batch API."""

from __future__ import annotations

from supervisor.config import BatchAPI, load_api, load_apis
from supervisor.errors import BadInput, ConfigError, JobError, PodError, SupervisorError
from supervisor.jobs import JobSpec, JobStatusResponse, JobSubmission

__all__ = [
    "BadInput",
    "BatchAPI",
    "ConfigError",
    "JobError",
    "JobSpec",
    "JobStatusResponse",
    "JobSubmission",
    "PodError",
    "SupervisorError",
    "load_api",
    "load_apis",
]

__version__ = "0.1.0"
