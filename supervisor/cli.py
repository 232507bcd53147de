"""The ``supervisor`` command (docs/commands.md): parse arguments, load files, run on the chosen backend.

Exit codes: 0 success (``run``: the job ``succeeded``), 1 the job ended in another state or
the pod failed, 2 bad input (one sentence on stderr, no traceback, nothing started),
128+N when stopped by signal N.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import anyio
import msgspec

from supervisor import __version__
from supervisor.allocator import tune_allocator
from supervisor.cli_options import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_OK,
    Parser,
    add_backend,
    add_batch_options,
    add_client_timeouts,
    add_grace,
    add_listen,
    add_queue,
    add_root,
    add_token_file,
    host_port,
    non_negative_int,
    positive_float,
    positive_int,
    write_stdout,
)
from supervisor.client_commands import COMMANDS as CLIENT_COMMANDS
from supervisor.client_commands import add_parsers as add_client_parsers
from supervisor.client_commands import run_command as run_client_command
from supervisor.config import BatchAPI, load_api
from supervisor.errors import BadInput, JobError, PodError
from supervisor.http._timeouts import Timeouts
from supervisor.jobs import load_submission
from supervisor.layout import Layout
from supervisor.logs import Logger
from supervisor.rootlock import claim_root

__all__ = ["main"]

T = TypeVar("T")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="supervisor",
        description="Run Cortex Batch API pods: containers as child processes, batches as POST /.",
    )
    parser.add_argument("--version", action="version", version=f"supervisor {__version__}")
    parser.add_argument(
        "--backend",
        choices=("asyncio", "trio"),
        default=os.environ.get("SUPERVISOR_BACKEND", "asyncio"),
        help="event loop (asyncio uses uvloop when installed); default asyncio",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("api", metavar="API", help="the BatchAPI file (Cortex YAML or JSON)")
        add_backend(p)
        p.add_argument(
            "--api", dest="api_name", metavar="NAME", help="which API, when the file lists several"
        )

    run = sub.add_parser("run", help="run one job on this machine with the embedded queue")
    common(run)
    run.add_argument(
        "--job", required=True, metavar="JOB", help="the job submission (JSON; - for stdin)"
    )
    run.add_argument(
        "--workers",
        type=positive_int,
        metavar="N",
        help="local pods (default: the job's `workers`)",
    )
    add_root(run)
    run.add_argument(
        "--fresh", action="store_true", help="start a new job instead of resuming an unfinished one"
    )
    add_batch_options(run)
    add_grace(run)
    run.add_argument(
        "--admin",
        type=host_port,
        metavar="HOST:PORT",
        help="serve /healthz, /status and /metrics there while the job runs",
    )

    run.add_argument(
        "--s3-endpoint",
        metavar="URL",
        help="the S3-compatible store that s3:// paths are read from "
        "(sets AWS_ENDPOINT_URL, for the workers too)",
    )

    validate = sub.add_parser("validate", help="check the API file (and a job), start nothing")
    common(validate)
    validate.add_argument(
        "--job", metavar="JOB", help="also check this job submission, splitting it fully"
    )
    add_batch_options(validate, dispatch=False)

    validate.add_argument(
        "--s3-endpoint",
        metavar="URL",
        help="the S3-compatible store that s3:// paths are read from "
        "(sets AWS_ENDPOINT_URL, for the workers too)",
    )

    proxy = sub.add_parser("proxy", help="run the pod and forward POST / from outside to it")
    common(proxy)
    add_listen(proxy)
    add_root(proxy)
    add_grace(proxy)
    add_client_timeouts(proxy)

    serve = sub.add_parser(
        "serve", help="the job API (submit, status, stop) for the APIs of the given files"
    )
    serve.add_argument(
        "apis", nargs="+", metavar="API", help="BatchAPI files (each may list several)"
    )
    add_backend(serve)
    add_listen(serve, "; any other address than loopback needs a token")
    add_root(serve, "the queue and the jobs' files")
    add_queue(serve, note="; default: the embedded queue under --root, with local pods per job")
    serve.add_argument(
        "--data-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="a folder submissions may read local files from (repeatable; default: none)",
    )
    add_token_file(
        serve, "bearer token clients must send (default: $SUPERVISOR_TOKEN; needed off loopback)"
    )
    add_batch_options(serve)
    add_grace(serve)
    serve.add_argument(
        "--s3-endpoint",
        metavar="URL",
        help="the S3-compatible store that s3:// paths are read from "
        "(sets AWS_ENDPOINT_URL, for the workers too)",
    )
    serve.add_argument(
        "--max-submission-bytes",
        type=positive_int,
        default=10 * 1024 * 1024,
        metavar="N",
        help="largest submission body over HTTP (default 10 MiB)",
    )
    add_client_timeouts(serve)

    worker = sub.add_parser(
        "worker", help="one pod that works on its API's jobs from a shared (Redis) queue"
    )
    common(worker)
    add_queue(worker, required=True)
    add_root(worker)
    add_batch_options(worker, split=False)
    add_grace(worker)
    worker.add_argument(
        "--lease",
        type=positive_float,
        default=30.0,
        metavar="S",
        help="a batch held by a pod silent this long goes to another pod, and the pod counts "
        "as unknown in the job's worker_counts (default 30)",
    )
    worker.add_argument(
        "--poll",
        type=positive_float,
        default=2.0,
        metavar="S",
        help="while idle, look for a job at least every S seconds (a job starting or a pod "
        "leaving one wakes the worker at once; this catches pods that went silent) "
        "(default 2)",
    )
    worker.add_argument(
        "--admin",
        type=host_port,
        metavar="HOST:PORT",
        help="serve /healthz, /status and /metrics there",
    )
    worker.add_argument(
        "--port-offset",
        type=non_negative_int,
        default=0,
        metavar="K",
        help="the containers listen on pod.port + K (several workers on one machine)",
    )
    worker.add_argument(
        "--operator-endpoint",
        default=os.environ.get("SUPERVISOR_OPERATOR_ENDPOINT") or None,
        metavar="URL",
        help="the job API (`serve`) the containers may submit jobs to, as they reach it: "
        "they get CORTEX_OPERATOR_ENDPOINT and a cli.yaml naming it "
        "(default: $SUPERVISOR_OPERATOR_ENDPOINT; none)",
    )
    add_token_file(
        worker,
        "the job API's bearer token, given to the containers with --operator-endpoint "
        "(default: $SUPERVISOR_TOKEN)",
    )

    add_client_parsers(sub)  # submit, get, list, stop
    return parser


def _run_async(backend: str, fn: Callable[[], Awaitable[T]]) -> T:
    options: dict[str, Any] = {}
    if backend == "asyncio":
        try:
            import uvloop  # noqa: F401
        except ImportError:
            pass
        else:
            options["use_uvloop"] = True
    return anyio.run(fn, backend=backend, backend_options=options)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "sub_backend", None):
        args.backend = args.sub_backend
    if getattr(args, "s3_endpoint", None):
        os.environ["AWS_ENDPOINT_URL"] = args.s3_endpoint
    try:
        if args.command == "validate":
            return _validate(args)
        if args.command in CLIENT_COMMANDS:
            return run_client_command(args)
        if args.command in ("run", "proxy", "serve", "worker"):
            tune_allocator()
        if args.command == "worker":
            return _worker(args)
        if args.command == "serve":
            return _serve(args)
        if args.command == "run":
            return _run(args)
        if args.command == "proxy":
            return _proxy(args)
    except BadInput as e:
        sys.stderr.write(f"supervisor: {e}\n")
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    raise AssertionError(args.command)


def _validate(args: argparse.Namespace) -> int:
    from supervisor.split import validate_submission

    api = load_api(args.api, args.api_name)
    msg = f"{args.api}: BatchAPI `{api.name}` is valid ({len(api.pod.containers)} container(s), port {api.pod.port})"
    if args.job:
        sub, _ = load_submission(args.job)
        with _naming(args.job):
            count = validate_submission(
                sub, max_batch_bytes=args.max_batch_bytes, allowed_roots=None
            )
        msg += f"; {args.job}: job is valid ({count} batch(es))"
    write_stdout(msg + "\n")
    return EXIT_OK


def _run(args: argparse.Namespace) -> int:
    from supervisor.runner import RunOptions, run_job

    api = load_api(args.api, args.api_name)
    sub, raw = load_submission(args.job)
    opts = RunOptions(
        layout=Layout.at(args.root),
        workers=args.workers,
        concurrency=args.concurrency,
        fresh=args.fresh,
        batch_timeout=args.batch_timeout,
        grace=args.grace,
        max_batch_bytes=args.max_batch_bytes,
        cwd=Path.cwd(),
        admin=args.admin,
    )
    log = Logger(sys.stderr)
    try:
        with _naming(args.job):
            result = _run_async(args.backend, partial(run_job, api, sub, raw, opts, log))
    except PodError as e:  # the pods could not start (a port taken, a missing command)
        sys.stderr.write(f"supervisor: {e}\n")
        return EXIT_FAILED
    write_stdout(msgspec.json.encode(result.status).decode() + "\n")
    return result.exit_code


def _proxy(args: argparse.Namespace) -> int:
    from supervisor.proxy_command import run_proxy

    api: BatchAPI = load_api(args.api, args.api_name)
    host, port = args.listen
    log = Logger(sys.stdout, api_name=api.name)
    layout = Layout.at(args.root)
    timeouts = Timeouts(read=args.read_timeout, idle=args.idle_timeout)
    serve = partial(
        run_proxy,
        api,
        host=host,
        port=port,
        layout=layout,
        grace=args.grace,
        log=log,
        timeouts=timeouts,
    )
    try:
        with claim_root(layout):
            return _run_async(args.backend, serve)
    except PodError as e:
        sys.stderr.write(f"supervisor: {e}\n")
        return EXIT_FAILED


@contextmanager
def _naming(job_file: str) -> Iterator[None]:
    """Bad input found in the job's data (a path, an item) names the job file first."""
    try:
        yield
    except JobError as e:
        text = str(e)
        if text.startswith(f"{job_file}:"):
            raise
        raise JobError(f"{job_file}: {text}") from None


_LOOPBACK = ("127.0.0.1", "::1", "localhost")


def _token(args: argparse.Namespace) -> str | None:
    from supervisor.client import read_token_file, resolve_token

    return read_token_file(args.token_file) if args.token_file else resolve_token()


def _serve(args: argparse.Namespace) -> int:
    from supervisor.config import load_apis
    from supervisor.serve_command import run_serve

    apis: list[BatchAPI] = []
    for path in args.apis:
        apis.extend(load_apis(path))
    names = [a.name for a in apis]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise BadInput(f"BatchAPI `{twice[0]}` is defined more than once in the given files")
    host, port = args.listen
    token = _token(args)
    if token is None and host not in _LOOPBACK:
        raise BadInput(
            f"refusing to listen on {host} without a token: anyone who can reach it could run "
            "jobs; give --token-file FILE or set SUPERVISOR_TOKEN (or listen on 127.0.0.1)"
        )
    data_dirs = []
    for d in args.data_dir:
        folder = Path(d).resolve()
        if not folder.is_dir():
            raise BadInput(f"--data-dir {d}: not a folder")
        data_dirs.append(folder)
    layout = Layout.at(args.root)
    log = Logger(sys.stdout)
    for api in apis:
        for path in api.ignored_fields():
            log.info("ignored_field", api_name=api.name, field=path, reason="no local effect")
    serve = partial(
        run_serve,
        apis,
        host=host,
        port=port,
        layout=layout,
        data_dirs=data_dirs,
        token=token,
        grace=args.grace,
        concurrency=args.concurrency,
        batch_timeout=args.batch_timeout,
        max_batch_bytes=args.max_batch_bytes,
        max_body=args.max_submission_bytes,
        queue_url=args.queue,
        timeouts=Timeouts(read=args.read_timeout, idle=args.idle_timeout),
        log=log,
        cwd=Path.cwd(),
    )
    with claim_root(layout):
        return _run_async(args.backend, serve)


def _worker(args: argparse.Namespace) -> int:
    from supervisor.queues import is_redis_url
    from supervisor.worker_command import WorkerOptions, run_worker

    api: BatchAPI = load_api(args.api, args.api_name)
    if not is_redis_url(args.queue):
        raise BadInput(
            f"--queue {args.queue}: a worker needs a queue shared between machines, "
            "redis://HOST:PORT/DB or rediss://... (one machine: `supervisor run` or `serve`)"
        )
    layout = Layout.at(args.root)
    log = Logger(sys.stdout)
    for path in api.ignored_fields():
        log.info("ignored_field", api_name=api.name, field=path, reason="no local effect")
    opts = WorkerOptions(
        layout=layout,
        queue_url=args.queue,
        grace=args.grace,
        concurrency=args.concurrency,
        batch_timeout=args.batch_timeout,
        lease=args.lease,
        port_offset=args.port_offset,
        admin=args.admin,
        poll=args.poll,
        cwd=Path.cwd(),
        operator_endpoint=_operator_endpoint(args.operator_endpoint),
        token=_token(args),
    )
    with claim_root(layout):
        return _run_async(args.backend, partial(run_worker, api, opts, log))


def _operator_endpoint(url: str | None) -> str | None:
    """``--operator-endpoint``: an http(s) URL, without a trailing slash."""
    if url is None:
        return None
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise BadInput(f"--operator-endpoint {url}: expected http://HOST:PORT or https://...")
    return url.rstrip("/")
