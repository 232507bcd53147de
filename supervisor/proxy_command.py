"""``supervisor proxy``: the pod, with an HTTP front that forwards batches sent from outside.

The pod is the same as under ``run`` (containers, probes, port owner); the front answers 503
with ``Retry-After`` until the pod is serving and forwards ``POST /`` and
``POST /on-job-complete`` to the port owner once it is. SIGTERM/SIGINT stop the listener,
then the containers (grace, SIGKILL; a second signal kills them at once); the exit code is
128+signal. The pods are hosted as under ``run`` (:class:`~supervisor.host.PodHost`).
"""

from __future__ import annotations

import functools
import signal
from pathlib import Path

import anyio

from supervisor.config import BatchAPI
from supervisor.errors import PodError, first_leaf
from supervisor.host import PodHost
from supervisor.http._timeouts import DEFAULT_TIMEOUTS, Timeouts
from supervisor.http.proxy import ProxyApp
from supervisor.http.relay import serve_relay
from supervisor.layout import Layout
from supervisor.leftovers import end_leftovers
from supervisor.logs import Logger

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
    timeouts: Timeouts = DEFAULT_TIMEOUTS,
) -> int:
    """Serve until a signal arrives (exit 128+N) or the pod fails (exit 1); ``timeouts``
    bound the clients' requests and idle keep-alive connections."""
    await end_leftovers(layout.state_dir, log)  # the root is claimed (cli): after the lock
    for path in api.ignored_fields():
        log.info("ignored_field", field=path, reason="no local effect")
    pods = PodHost(api, layout, job_id=None, workers=1, grace=grace, cwd=cwd or Path.cwd(), log=log)
    (pod,) = pods.pods
    app = ProxyApp(
        target_host="127.0.0.1",
        target_port=pod.port,
        is_ready=lambda: pod.serving,
        status=pod.status,
    )
    code = 0
    try:
        async with pods.running(), anyio.create_task_group() as services:
            listener = await anyio.create_tcp_listener(
                local_host=host, local_port=port, reuse_port=False
            )
            bound = listener.extra(anyio.abc.SocketAttribute.local_port)
            log.info("listening", host=host, port=bound, target_port=pod.port)
            serving = anyio.CancelScope()

            def on_stop(sig: signal.Signals) -> None:
                nonlocal code
                log.warning(
                    "signal",
                    signal=sig.name,
                    action="stop listening, then stop the containers",
                    waiting_for=f"the containers to exit, up to {grace:g}s",
                    again="a second signal stops at once",
                )
                code = 128 + sig
                serving.cancel()

            services.start_soon(pods.watch_signals, on_stop)
            with serving:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(
                        functools.partial(serve_relay, listener, app, logger=log, timeouts=timeouts)
                    )
                    await tg.start(pod.run)
            services.cancel_scope.cancel()
    except* PodError as group:
        err = first_leaf(group, PodError)
        log.error("pod_failed", error=str(err))
        code = 1
    return code
