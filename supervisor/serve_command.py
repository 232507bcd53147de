"""``supervisor serve``: the job API for every API of the given files, with local pods per job
(the embedded queue) or none (``--queue redis://...``: ``supervisor worker`` pods do the work,
and any number of ``serve`` instances answer for every job).

Start-up: the root is claimed (cli), what a killed supervisor left running is ended, the queue
is opened, unfinished jobs are resumed, and the listener logs each API's endpoint the way
``cortex get`` prints it. The first SIGTERM/SIGINT stops taking submissions and ends every
job as a signal ends ``run`` (in-flight batches get ``--grace``, the jobs stay resumable);
a second one kills every container at once. This process is the subreaper of all the jobs'
containers, and kills whatever is left of them when it ends.
"""

from __future__ import annotations

import signal
from contextlib import AsyncExitStack
from pathlib import Path

import anyio
import anyio.abc

from supervisor.admin import Admin
from supervisor.api import JobAPI
from supervisor.config import BatchAPI
from supervisor.host import STOP_SIGNALS
from supervisor.http._timeouts import Timeouts
from supervisor.http.server import serve
from supervisor.layout import Layout
from supervisor.leftovers import end_leftovers
from supervisor.linux import become_subreaper
from supervisor.logs import Logger
from supervisor.metrics import Metrics
from supervisor.queues import is_redis_url, open_queue
from supervisor.queues.base import QueueConnectError, QueueError
from supervisor.reaper import kill_descendants, reap_orphans
from supervisor.rootlock import RootError
from supervisor.service import JobService, ServiceSettings

__all__ = ["MAX_SUBMISSION", "endpoint_for", "run_serve"]

MAX_SUBMISSION = 10 * 1024 * 1024  # bytes: a submission's body, as Cortex's API gateway


def endpoint_for(host: str, port: int) -> str:
    """The base URL clients on this machine (containers included) use."""
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


async def run_serve(
    apis: list[BatchAPI],
    *,
    host: str,
    port: int,
    layout: Layout,
    data_dirs: list[Path],
    token: str | None,
    grace: float,
    concurrency: int,
    batch_timeout: float | None,
    max_batch_bytes: int,
    max_body: int,
    timeouts: Timeouts,
    log: Logger,
    cwd: Path | None = None,
    queue_url: str | None = None,
    task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> int:
    """Serve until a signal (exit 128+N)."""
    await end_leftovers(layout.state_dir, log)
    stack = AsyncExitStack()
    try:
        queue = await stack.enter_async_context(
            open_queue(
                queue_url or layout.queue_path,
                log=log,
                dead_letter_root=layout.state_dir / "dead-letters",
            )
        )
    except QueueConnectError:
        raise
    except QueueError as e:
        raise RootError(str(e)) from None
    listener = await anyio.create_tcp_listener(local_host=host, local_port=port, reuse_port=False)
    bound = listener.extra(anyio.abc.SocketAttribute.local_port)
    endpoint = endpoint_for(host, bound)
    metrics = Metrics()
    settings = ServiceSettings(
        layout=layout,
        endpoint=endpoint,
        data_dirs=data_dirs,
        max_batch_bytes=max_batch_bytes,
        concurrency=concurrency,
        batch_timeout=batch_timeout,
        grace=grace,
        cwd=cwd,
        token=token,
        local_pods=queue_url is None or not is_redis_url(queue_url),
    )
    service = JobService(apis, queue, settings, log, metrics)
    admin = Admin(
        ready=service.ready,
        status=service.admin_status,
        metrics=metrics,
        refresh=service.refresh_metrics,
    )
    handler = JobAPI(service, admin, token=token, log=log)
    code = 0
    subreaper = become_subreaper()
    try:
        async with stack, anyio.create_task_group() as tg:
            if subreaper:
                tg.start_soon(reap_orphans, None)
            await tg.start(service.run)
            serving = anyio.CancelScope()

            async def serve_http() -> None:
                with serving:
                    await serve(
                        listener, handler.handle, max_body=max_body, logger=log, timeouts=timeouts
                    )

            tg.start_soon(serve_http)
            log.info("listening", host=host, port=bound, token=token is not None, queue=queue.url)
            for api in apis:
                log.info("api_endpoint", api_name=api.name, endpoint=f"{endpoint}/{api.name}")
            task_status.started(bound)
            with anyio.open_signal_receiver(*STOP_SIGNALS) as signals:
                async for signum in signals:
                    sig = signal.Signals(signum)
                    if code == 0:
                        code = 128 + sig
                        log.warning(
                            "signal",
                            signal=sig.name,
                            action="stop taking submissions, stop every job (resumable)",
                            waiting_for=f"in-flight batches and containers, up to {grace:g}s",
                            again="a second signal stops at once",
                        )
                        serving.cancel()
                        service.shutdown(sig)
                        tg.start_soon(_stop_when_idle, service, tg.cancel_scope)
                    else:
                        log.warning("signal", signal=sig.name, action="stop now")
                        service.kill_now()
    finally:
        if subreaper:
            stray = kill_descendants()
            if stray:
                log.warning("killed_strays", pids=stray)
    return code


async def _stop_when_idle(service: JobService, scope: anyio.CancelScope) -> None:
    await service.wait_idle()
    scope.cancel()
