"""``supervisor proxy``: the pod, with an HTTP front that forwards batches sent from outside.

The pod is the same as under ``run`` (containers, probes, port owner); the front answers 503
with ``Retry-After`` until the pod is serving and forwards ``POST /`` and
``POST /on-job-complete`` to the port owner once it is. SIGTERM/SIGINT stop the listener,
then the containers (grace, SIGKILL); the exit code is 128+signal.
"""

from __future__ import annotations

import signal
from pathlib import Path

import anyio

from supervisor.config import BatchAPI
from supervisor.errors import PodError, first_leaf
from supervisor.http.proxy import ProxyApp
from supervisor.http.server import serve
from supervisor.layout import Layout
from supervisor.leftovers import Ledger, end_leftovers
from supervisor.linux import become_subreaper
from supervisor.logs import Logger
from supervisor.pod import Pod, pod_env
from supervisor.reaper import kill_descendants, reap_orphans

__all__ = ["run_proxy"]


async def run_proxy(
    api: BatchAPI,
    *,
    host: str,
    port: int,
    layout: Layout,
    grace: float,
    log: Logger,
    cwd: Path | None = None,
) -> int:
    """Serve until a signal arrives (exit 128+N) or the pod fails (exit 1)."""
    layout.prepare()
    await end_leftovers(layout.state_dir, log)
    for path in api.ignored_fields():
        log.info("ignored_field", field=path, reason="no local effect")
    env = pod_env(api, layout, job_id=None)
    ledger = Ledger(layout.state_dir)
    pod = Pod(api, index=0, env=env, log=log, grace=grace, cwd=cwd or Path.cwd(), ledger=ledger)
    app = ProxyApp(
        target_host="127.0.0.1",
        target_port=pod.port,
        is_ready=lambda: pod.serving,
        status=pod.status,
    )
    subreaper = become_subreaper()
    code = 0
    try:
        async with anyio.create_task_group() as tg:
            listener = await anyio.create_tcp_listener(
                local_host=host, local_port=port, reuse_port=False
            )
            bound = listener.extra(anyio.abc.SocketAttribute.local_port)
            log.info("listening", host=host, port=bound, target_port=pod.port)

            async def watch_signals() -> None:
                nonlocal code
                with anyio.open_signal_receiver(
                    signal.SIGTERM, signal.SIGINT, signal.SIGHUP
                ) as signals:
                    async for signum in signals:
                        log.warning("signal", signal=signal.Signals(signum).name, action="stop")
                        code = 128 + signum
                        tg.cancel_scope.cancel()
                        return

            tg.start_soon(watch_signals)
            if subreaper:
                tg.start_soon(reap_orphans, None)
            tg.start_soon(serve, listener, app.handle)
            await tg.start(pod.run)
    except* PodError as group:
        err = first_leaf(group, PodError)
        log.error("pod_failed", error=str(err))
        code = 1
    finally:
        await app.aclose()
        if subreaper:
            kill_descendants()
    return code
