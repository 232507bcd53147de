"""``supervisor submit / get / list / stop``: the job API from the command line (docs/commands.md).

They speak to ``supervisor serve`` through :class:`supervisor.client.Client`, except
``list --root DIR``, which reads a root's queue file with no server, read-only (a ``run`` may
be working on that root meanwhile).

Output: the job id (``submit``), the status JSON (``get``, ``submit --wait``), a table or
JSON (``list``) on stdout; progress and errors on stderr. Exit codes: 0 done (with
``--wait``/``--watch``: the job ``succeeded``), 1 the job ended in another state, the server
failed or could not be reached, 2 bad input (a refused request: 400, 401, 404, ...).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Final, TextIO

import msgspec

from supervisor import jobs
from supervisor.cli_options import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_OK,
    positive_float,
    write_stdout,
)
from supervisor.client import Client, ClientError, read_token_file
from supervisor.errors import BadInput
from supervisor.files import JOB_FILE_LIMIT, TooLarge, read_limited
from supervisor.jobs import JobSpec, JobStatus, JobStatusResponse, WorkerCounts
from supervisor.layout import Layout
from supervisor.lifecycle import exit_code_for
from supervisor.logs import Logger
from supervisor.progress import ProgressReporter
from supervisor.queues.base import JobRecord, Progress, QueueError
from supervisor.rootlock import root_in_use

__all__ = ["COMMANDS", "add_parsers", "progress_of_status", "run_command", "status_of_record"]

COMMANDS: Final = frozenset({"submit", "get", "list", "stop"})


def add_parsers(sub: Any) -> None:
    """Add the client commands to the ``supervisor`` parser's subparsers."""

    def server(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--url",
            metavar="URL",
            help="the job API (default: $CORTEX_CLI_CONFIG_DIR/cli.yaml, $SUPERVISOR_URL, "
            "else http://127.0.0.1:8888)",
        )
        p.add_argument(
            "--token-file",
            metavar="FILE",
            help="a file holding the bearer token (default: $SUPERVISOR_TOKEN)",
        )

    def watching(p: argparse.ArgumentParser, flag: str, what: str) -> None:
        p.add_argument(flag, dest="watch", action="store_true", help=what)
        p.add_argument(
            "--poll",
            type=positive_float,
            default=1.0,
            metavar="S",
            help=f"with {flag}: seconds between status requests (default 1)",
        )

    submit = sub.add_parser("submit", help="submit a job to `supervisor serve`; prints its job_id")
    submit.add_argument("api_name", metavar="API_NAME", help="the API's name")
    submit.add_argument("job", metavar="JOB", nargs="?", help="the job file (JSON; - for stdin)")
    submit.add_argument(
        "--retry-dead-letters",
        metavar="JOB_ID",
        help="instead of JOB: submit this job's dead letters as a new job",
    )
    submit.add_argument(
        "--dry-run", action="store_true", help="print what the job would process, store nothing"
    )
    watching(submit, "--wait", "show progress until the job ends, then print its status")
    server(submit)

    get = sub.add_parser("get", help="print a job's status")
    get.add_argument("api_name", metavar="API_NAME", help="the API's name")
    get.add_argument("job_id", metavar="JOB_ID", help="the job's id, as submit printed it")
    watching(get, "--watch", "show progress until the job ends, then print its status")
    server(get)

    lst = sub.add_parser("list", help="list an API's jobs (or a root's, with --root)")
    lst.add_argument("api_name", metavar="API_NAME", nargs="?", help="the API's name")
    lst.add_argument(
        "--root", metavar="DIR", help="read this root's queue file instead of asking a server"
    )
    lst.add_argument("--json", action="store_true", help="print a JSON array of job statuses")
    server(lst)

    stop = sub.add_parser("stop", help="stop a job")
    stop.add_argument("api_name", metavar="API_NAME", help="the API's name")
    stop.add_argument("job_id", metavar="JOB_ID", help="the job to stop")
    server(stop)


def run_command(args: argparse.Namespace) -> int:
    """Carry out a client command; errors become one sentence on stderr and an exit code."""
    try:
        if args.command == "list" and args.root is not None:
            return _list_root(args)
        with _client(args) as client:
            if args.command == "submit":
                return _submit(args, client)
            if args.command == "get":
                return _get(args, client)
            if args.command == "list":
                return _list(args, client)
            if args.command == "stop":
                write_stdout(client.stop(args.api_name, args.job_id) + "\n")
                return EXIT_OK
    except ClientError as e:
        return _report(e)
    raise AssertionError(args.command)


def _report(e: ClientError) -> int:
    if e.bad_input:
        sys.stderr.write(f"supervisor: {e.message} (HTTP {e.status})\n")
        return EXIT_BAD_INPUT
    if e.status is not None:
        sys.stderr.write(f"supervisor: the server failed (HTTP {e.status}): {e.message}\n")
        return EXIT_FAILED
    if e.kind == "config":
        sys.stderr.write(f"supervisor: {e.message}\n")
        return EXIT_BAD_INPUT
    sys.stderr.write(f"supervisor: {e.message}\n")
    return EXIT_FAILED


def _client(args: argparse.Namespace) -> Client:
    token = None if args.token_file is None else read_token_file(args.token_file)
    return Client(args.url, token)


def _write_json(obj: object) -> None:
    write_stdout(msgspec.json.encode(obj).decode() + "\n")


# -- submit / get ----------------------------------------------------------------------------


def _submit(args: argparse.Namespace, client: Client) -> int:
    if (args.job is None) == (args.retry_dead_letters is None):
        raise BadInput("submit takes a JOB file or --retry-dead-letters JOB_ID (one of them)")
    if args.retry_dead_letters is not None:
        if args.dry_run:
            raise BadInput("--dry-run does not go with --retry-dead-letters")
        spec = client.retry_dead_letters(args.api_name, args.retry_dead_letters)
    else:
        body = _read_job(args.job)
        if args.dry_run:
            text = client.dry_run(args.api_name, body)
            sys.stdout.write(text if text.endswith("\n") else text + "\n")
            return EXIT_OK
        spec = client.submit(args.api_name, body)
    write_stdout(spec.job_id + "\n")
    if not args.watch:
        return EXIT_OK
    return _watch(client, args.api_name, spec.job_id, args.poll)


def _read_job(job: str) -> bytes:
    try:
        return read_limited(job, JOB_FILE_LIMIT)
    except OSError as e:
        raise BadInput(f"{job}: cannot read the job file ({e.strerror or e})") from None
    except TooLarge as e:
        raise BadInput(f"{job}: cannot read the job file ({e})") from None


def _get(args: argparse.Namespace, client: Client) -> int:
    if args.watch:
        return _watch(client, args.api_name, args.job_id, args.poll)
    _write_json(client.get(args.api_name, args.job_id))
    return EXIT_OK


def progress_of_status(status: JobStatusResponse) -> Progress:
    """The progress bar's counters from a polled status.

    The status has no count of dead batches: they are the failed attempts when each batch is
    tried once, nothing while a job with retries runs, and what did not succeed once it ended.
    """
    js = status.job_status
    total = js.total_batch_count
    succeeded = status.metrics.succeeded
    if js.status in jobs.END_STATES:
        dead = max((total or 0) - succeeded - js.batches_in_queue, 0)
    elif jobs.max_attempts(js) == 1:
        dead = status.metrics.failed
    else:
        dead = 0
    unresolved = 0 if total is None else max(total - succeeded - dead, 0)
    return Progress(
        total=total,
        succeeded=succeeded,
        dead=dead,
        failed_attempts=status.metrics.failed,
        in_flight=max(unresolved - js.batches_in_queue, 0),
        in_queue=js.batches_in_queue,
        average_time_per_batch=status.metrics.average_time_per_batch,
    )


def _watch(client: Client, api_name: str, job_id: str, poll: float) -> int:
    """Progress on stderr until the job ends (as ``run`` shows it), then its status on stdout;
    exit 0 iff it succeeded."""
    latest: list[JobStatusResponse] = []
    tty = _isatty(sys.stderr)
    reporter = ProgressReporter(
        lambda: progress_of_status(latest[-1]),
        stream=sys.stderr,
        tty=tty,
        log=Logger(sys.stderr, job_id=job_id),
        interval=poll,
    )

    def on_status(status: JobStatusResponse) -> None:
        latest.append(status)
        del latest[:-1]
        if status.job_status.status not in jobs.END_STATES:
            reporter.report()

    final = client.wait(api_name, job_id, poll=poll, on_status=on_status)
    reporter.final()
    _write_json(final)
    return exit_code_for(final.job_status.status)


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


# -- list ------------------------------------------------------------------------------------


def _list(args: argparse.Namespace, client: Client) -> int:
    if args.api_name is None:
        raise BadInput("list needs API_NAME (or --root DIR to read a root's queue file)")
    statuses = client.list(args.api_name)
    if args.json:
        _write_json(statuses)
        return EXIT_OK
    # A listing has no counters: each job's status has them (one keep-alive connection).
    rows = []
    for s in statuses:
        status = client.get(args.api_name, s.job_id)
        rows.append((status.job_status, status.job_status.status, progress_of_status(status)))
    _print_table(rows)
    return EXIT_OK


def status_of_record(record: JobRecord) -> JobStatus:
    """A job's status from its queue record (no pods known: ``worker_counts`` as stored)."""
    spec = msgspec.json.decode(record.spec_json, type=JobSpec)
    fields: dict[str, Any] = msgspec.structs.asdict(spec)
    fields["total_batch_count"] = record.total_batches
    fields["start_time"] = record.start_time
    total = record.total_batches or 0
    counts = record.worker_counts
    return JobStatus(
        **fields,
        status=record.status,
        batches_in_queue=max(total - record.succeeded - record.dead, 0),
        worker_counts=None if counts is None else msgspec.json.decode(counts, type=WorkerCounts),
        end_time=record.end_time,
    )


def _list_root(args: argparse.Namespace) -> int:
    from supervisor.queues.base import progress_of
    from supervisor.queues.embedded_readonly import read_jobs

    layout = Layout.at(args.root)
    if args.url is not None or args.token_file is not None:
        raise BadInput("--root reads a queue file, not a server: drop --url and --token-file")
    if not layout.queue_path.exists():
        raise BadInput(f"{layout.root} has no queue file ({layout.queue_path}): no job ran there")
    in_use = root_in_use(layout)
    try:
        records = read_jobs(layout.queue_path, args.api_name)
    except QueueError as e:
        raise BadInput(str(e)) from None
    statuses = [status_of_record(r) for r in records]
    if args.json:
        _write_json(statuses)
        return EXIT_OK
    rows = []
    unfinished = False
    for s, r in zip(statuses, records, strict=True):
        label = s.status
        if in_use is False and s.status not in jobs.END_STATES:
            label, unfinished = s.status + "*", True
        rows.append((s, label, progress_of(r, 0)))
    _print_table(rows)
    if unfinished:
        write_stdout(
            "* unfinished: no supervisor is working on this root; the same `supervisor run` "
            "command resumes a job of `run`, and `serve` resumes its jobs when it starts\n"
        )
    return EXIT_OK


_COLUMNS: Final = ("JOB_ID", "STATUS", "SUCCEEDED/TOTAL", "FAILED", "CREATED")


def _print_table(rows: list[tuple[JobStatus, str, Progress]]) -> None:
    """One line per job: its status (as labelled), batches succeeded of all, batches failed
    for good, when it was created."""
    table = [_COLUMNS]
    for s, label, p in rows:
        total = "?" if p.total is None else str(p.total)
        table.append((s.job_id, label, f"{p.succeeded}/{total}", str(p.dead), s.created_time))
    widths = [max(len(r[i]) for r in table) for i in range(len(_COLUMNS))]
    lines = ("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in table)
    write_stdout("".join(f"{line}\n" for line in lines))
