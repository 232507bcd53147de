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

import anyio
import msgspec

from supervisor import __version__
from supervisor.allocator import tune_allocator
from supervisor.client_commands import COMMANDS as CLIENT_COMMANDS
from supervisor.client_commands import add_parsers as add_client_parsers
from supervisor.client_commands import run_command as run_client_command
from supervisor.config import BatchAPI, load_api
from supervisor.errors import BadInput, JobError, PodError
from supervisor.http._timeouts import DEFAULT_TIMEOUTS, Timeouts
from supervisor.jobs import load_submission
from supervisor.layout import Layout
from supervisor.logs import Logger
from supervisor.rootlock import claim_root

__all__ = ["main"]

T = TypeVar("T")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse's own errors: exit 2, one line + usage
        self.print_usage(sys.stderr)
        sys.stderr.write(f"supervisor: error: {message}\n")
        raise SystemExit(EXIT_BAD_INPUT)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    try:
        number = int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}") from None
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range in {text!r}")
    return (host.strip("[]") or "127.0.0.1"), number


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
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
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("api", metavar="API", help="the BatchAPI file (Cortex YAML or JSON)")
        p.add_argument(
            "--backend",
            dest="sub_backend",
            choices=("asyncio", "trio"),
            help="event loop (also accepted before the command)",
        )
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
        type=_positive_int,
        metavar="N",
        help="local pods (default: the job's `workers`)",
    )
    run.add_argument(
        "--concurrency",
        type=_positive_int,
        default=1,
        metavar="K",
        help="batches in flight per pod (default 1)",
    )
    run.add_argument(
        "--root",
        metavar="DIR",
        help="where cortex/ and mnt/ live (default ./.supervisor unless PID 1 of a pod)",
    )
    run.add_argument(
        "--fresh", action="store_true", help="start a new job instead of resuming an unfinished one"
    )
    run.add_argument(
        "--batch-timeout", type=_positive_float, metavar="S", help="fail an attempt after S seconds"
    )
    run.add_argument(
        "--grace",
        type=_non_negative_float,
        default=30.0,
        metavar="S",
        help="grace period on stop (default 30)",
    )
    run.add_argument(
        "--admin",
        type=_host_port,
        metavar="HOST:PORT",
        help="serve /healthz, /status and /metrics there while the job runs",
    )
    run.add_argument(
        "--max-batch-bytes",
        type=_positive_int,
        default=256 * 1024,
        metavar="N",
        help="largest batch body (default 262144)",
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
    validate.add_argument(
        "--max-batch-bytes",
        type=_positive_int,
        default=256 * 1024,
        metavar="N",
        help="largest batch body (default 262144), as for `run`",
    )

    validate.add_argument(
        "--s3-endpoint",
        metavar="URL",
        help="the S3-compatible store that s3:// paths are read from "
        "(sets AWS_ENDPOINT_URL, for the workers too)",
    )

    proxy = sub.add_parser("proxy", help="run the pod and forward POST / from outside to it")
    common(proxy)
    proxy.add_argument(
        "--listen",
        type=_host_port,
        default=("127.0.0.1", 8888),
        metavar="HOST:PORT",
        help="default 127.0.0.1:8888",
    )
    proxy.add_argument(
        "--root",
        metavar="DIR",
        help="where cortex/ and mnt/ live (default ./.supervisor unless PID 1 of a pod)",
    )
    proxy.add_argument(
        "--grace",
        type=_non_negative_float,
        default=30.0,
        metavar="S",
        help="on SIGTERM/SIGINT, seconds the containers get to exit before SIGKILL (default 30)",
    )
    proxy.add_argument(
        "--read-timeout",
        type=_positive_float,
        default=DEFAULT_TIMEOUTS.read,
        metavar="S",
        help="a client's request head, or its body, must arrive within S seconds, else 408 "
        "(default 30)",
    )
    proxy.add_argument(
        "--idle-timeout",
        type=_positive_float,
        default=DEFAULT_TIMEOUTS.idle,
        metavar="S",
        help="close a client's keep-alive connection idle for S seconds (default 75)",
    )
    serve = sub.add_parser(
        "serve", help="the job API (submit, status, stop) for the APIs of the given files"
    )
    serve.add_argument(
        "apis", nargs="+", metavar="API", help="BatchAPI files (each may list several)"
    )
    serve.add_argument(
        "--backend", dest="sub_backend", choices=("asyncio", "trio"), help="event loop"
    )
    serve.add_argument(
        "--listen",
        type=_host_port,
        default=("127.0.0.1", 8888),
        metavar="HOST:PORT",
        help="default 127.0.0.1:8888; any other address than loopback needs a token",
    )
    serve.add_argument(
        "--root",
        metavar="DIR",
        help="where the queue and the jobs' files live (default ./.supervisor unless in a pod)",
    )
    serve.add_argument(
        "--data-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="a folder submissions may read local files from (repeatable; default: none)",
    )
    serve.add_argument(
        "--token-file",
        metavar="FILE",
        help="bearer token clients must send (default: $SUPERVISOR_TOKEN; needed off loopback)",
    )
    serve.add_argument(
        "--concurrency",
        type=_positive_int,
        default=1,
        metavar="K",
        help="batches in flight per pod",
    )
    serve.add_argument(
        "--batch-timeout", type=_positive_float, metavar="S", help="fail an attempt after S seconds"
    )
    serve.add_argument(
        "--grace",
        type=_non_negative_float,
        default=30.0,
        metavar="S",
        help="grace period on stop (default 30)",
    )
    serve.add_argument(
        "--max-batch-bytes",
        type=_positive_int,
        default=256 * 1024,
        metavar="N",
        help="largest batch body (default 262144)",
    )
    serve.add_argument(
        "--s3-endpoint",
        metavar="URL",
        help="the S3-compatible store that s3:// paths are read from "
        "(sets AWS_ENDPOINT_URL, for the workers too)",
    )
    serve.add_argument(
        "--max-submission-bytes",
        type=_positive_int,
        default=10 * 1024 * 1024,
        metavar="N",
        help="largest submission body over HTTP (default 10 MiB)",
    )
    serve.add_argument(
        "--read-timeout",
        type=_positive_float,
        default=30.0,
        metavar="S",
        help="a request head or body slower than this gets 408 (default 30)",
    )
    serve.add_argument(
        "--idle-timeout",
        type=_positive_float,
        default=75.0,
        metavar="S",
        help="idle keep-alive connections are closed after this (default 75)",
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
        if args.command in ("run", "proxy", "serve"):
            tune_allocator()
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
    print(msg)
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
    try:
        sys.stdout.write(msgspec.json.encode(result.status).decode() + "\n")
        sys.stdout.flush()
    except OSError:  # stdout is gone (a closed pipe or terminal): the exit code still tells
        pass
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
    if args.token_file:
        try:
            text = Path(args.token_file).read_text().strip()
        except OSError as e:
            raise BadInput(
                f"{args.token_file}: cannot read the token file ({e.strerror or e})"
            ) from None
        if not text:
            raise BadInput(f"{args.token_file}: the token file is empty")
        return text
    return os.environ.get("SUPERVISOR_TOKEN") or None


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
        timeouts=Timeouts(read=args.read_timeout, idle=args.idle_timeout),
        log=log,
        cwd=Path.cwd(),
    )
    with claim_root(layout):
        return _run_async(args.backend, serve)
