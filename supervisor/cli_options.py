"""The command line's shared pieces: argument types and the options several commands take.

Each option is defined once here (name, type, default, help), so ``run``, ``proxy``,
``serve`` and the client commands spell and check it alike.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from supervisor.http._timeouts import DEFAULT_TIMEOUTS
from supervisor.split import DEFAULT_MAX_BATCH_BYTES

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_FAILED",
    "EXIT_OK",
    "Parser",
    "add_backend",
    "add_batch_options",
    "add_client_timeouts",
    "add_grace",
    "add_listen",
    "add_queue",
    "add_root",
    "add_token_file",
    "host_port",
    "non_negative_float",
    "non_negative_int",
    "positive_float",
    "positive_int",
    "write_stdout",
]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse's own errors: exit 2, one line + usage
        self.print_usage(sys.stderr)
        sys.stderr.write(f"supervisor: error: {message}\n")
        raise SystemExit(EXIT_BAD_INPUT)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
    return value


def _seconds(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None


def positive_float(text: str) -> float:
    value = _seconds(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = _seconds(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def host_port(text: str) -> tuple[str, int]:
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


def add_backend(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backend",
        dest="sub_backend",
        choices=("asyncio", "trio"),
        help="event loop (also accepted before the command)",
    )


def add_root(p: argparse.ArgumentParser, what: str = "cortex/ and mnt/") -> None:
    p.add_argument(
        "--root",
        metavar="DIR",
        help=f"where {what} live (default ./.supervisor unless PID 1 of a pod)",
    )


def add_grace(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--grace",
        type=non_negative_float,
        default=30.0,
        metavar="S",
        help="on stop (a signal, a timeout): seconds in-flight batches and then the containers "
        "get before SIGKILL (default 30)",
    )


def add_queue(p: argparse.ArgumentParser, *, required: bool = False, note: str = "") -> None:
    p.add_argument(
        "--queue",
        required=required,
        metavar="URL",
        help="the job queue: redis://[:PASSWORD@]HOST:PORT/DB or rediss://... shared by many "
        f"machines{note}",
    )


def add_token_file(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--token-file", metavar="FILE", help=help)


def add_listen(p: argparse.ArgumentParser, note: str = "") -> None:
    p.add_argument(
        "--listen",
        type=host_port,
        default=("127.0.0.1", 8888),
        metavar="HOST:PORT",
        help=f"default 127.0.0.1:8888{note}",
    )


def add_batch_options(
    p: argparse.ArgumentParser, *, dispatch: bool = True, split: bool = True
) -> None:
    """``--max-batch-bytes`` (with ``split``), and with ``dispatch`` ``--concurrency`` and
    ``--batch-timeout``."""
    if dispatch:
        p.add_argument(
            "--concurrency",
            type=positive_int,
            default=1,
            metavar="K",
            help="batches in flight per pod (default 1)",
        )
        p.add_argument(
            "--batch-timeout",
            type=positive_float,
            metavar="S",
            help="fail an attempt after S seconds",
        )
    if not split:
        return
    p.add_argument(
        "--max-batch-bytes",
        type=positive_int,
        default=DEFAULT_MAX_BATCH_BYTES,
        metavar="N",
        help=f"largest batch body (default {DEFAULT_MAX_BATCH_BYTES})",
    )


def add_client_timeouts(p: argparse.ArgumentParser) -> None:
    """How long an HTTP client of ours may take: the server's read and idle timeouts."""
    p.add_argument(
        "--read-timeout",
        type=positive_float,
        default=DEFAULT_TIMEOUTS.read,
        metavar="S",
        help="a client's request head, or its body, must arrive within S seconds, else 408 "
        f"(default {DEFAULT_TIMEOUTS.read:g})",
    )
    p.add_argument(
        "--idle-timeout",
        type=positive_float,
        default=DEFAULT_TIMEOUTS.idle,
        metavar="S",
        help="close a client's keep-alive connection idle for S seconds "
        f"(default {DEFAULT_TIMEOUTS.idle:g})",
    )


def write_stdout(text: str) -> None:
    """Write to stdout; a reader that went away (``| head``, a closed terminal) is not an
    error: the exit code still tells, and no traceback follows at exit."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except OSError:
        try:  # later writes and the interpreter's last flush go nowhere, quietly
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        except (OSError, ValueError):
            pass
