"""The one ``POST /on-job-complete`` of a job (SPEC §2)."""

from __future__ import annotations

from collections.abc import Sequence

from supervisor.http.client import request
from supervisor.http.errors import HTTPError
from supervisor.logs import Logger

__all__ = ["send_job_complete"]

_ON_COMPLETE_TIMEOUT = 60.0  # seconds for the worker to handle /on-job-complete


async def send_job_complete(
    port: int,
    *,
    job_id: str,
    succeeded: int,
    failed: int,
    log: Logger,
) -> bool:
    """The one ``POST /on-job-complete`` of a job; 404 counts as handled. True if handled."""
    headers: Sequence[tuple[str, str]] = (
        ("Content-Type", "application/json"),
        ("X-Cortex-Job-ID", job_id),
        ("X-Cortex-Batches-Succeeded", str(succeeded)),
        ("X-Cortex-Batches-Failed", str(failed)),
    )
    try:
        r = await request(
            "127.0.0.1",
            port,
            "POST",
            "/on-job-complete",
            headers=headers,
            body=b'{"message":"job_complete"}',
            timeout=_ON_COMPLETE_TIMEOUT,
        )
    except (HTTPError, TimeoutError, OSError) as e:
        log.warning("on_job_complete_failed", port=port, error=str(e))
        return False
    handled = 200 <= r.status < 300 or r.status == 404
    level = log.info if handled else log.warning
    level("on_job_complete", port=port, status=r.status)
    return handled
