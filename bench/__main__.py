"""``python -m bench [--quick] [--only SCENARIO] [--plot out.png] [--json out.json]``.

Installs what is missing (wrk, the ``bench`` extra), runs the scenarios on loopback with
everything it starts stopped on the way out (also on Ctrl-C / SIGTERM), and prints one table.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

from bench import tools
from bench.procs import Procs
from bench.scenarios import (
    SCENARIOS,
    Context,
    dispatch,
    footprint,
    proxy,
    redis_queue,
    serve,
    split,
)
from bench.table import Row, format_table

RUNNERS = {
    "dispatch": dispatch.run,
    "proxy": proxy.run,
    "split": split.run,
    "footprint": footprint.run,
    "serve": serve.run,
    "redis": redis_queue.run,
}


def _scenarios(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    for name in names:
        if name not in SCENARIOS:
            raise argparse.ArgumentTypeError(
                f"unknown scenario {name!r} (choose from {', '.join(SCENARIOS)})"
            )
    return names


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__.splitlines()[0] if __doc__ else None
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a ~1 minute run: fewer cases, 1 repeat, smaller inputs",
    )
    p.add_argument(
        "--only",
        type=_scenarios,
        metavar="SCENARIO[,...]",
        help=f"run only these ({', '.join(SCENARIOS)})",
    )
    p.add_argument(
        "--plot",
        type=Path,
        metavar="OUT.png",
        help="draw dispatch throughput vs batch size and concurrency",
    )
    p.add_argument("--json", type=Path, metavar="OUT.json", help="write every sample as JSON")
    p.add_argument(
        "--repeats", type=int, metavar="N", help="repeats per figure (default: 1 quick, 3 full)"
    )
    p.add_argument(
        "--workers",
        default="abcd",
        metavar="LETTERS",
        help="dispatch workers to run, e.g. ac (default abcd)",
    )
    p.add_argument(
        "--seconds", type=float, metavar="S", help="duration of each wrk/peer measurement"
    )
    p.add_argument(
        "--max-items",
        type=int,
        default=200_000,
        metavar="N",
        help="items of a dispatch job at most (default 200,000)",
    )
    p.add_argument(
        "--split-items",
        type=int,
        metavar="N",
        help="items of the split inputs (default 1,000,000; quick 200,000)",
    )
    p.add_argument(
        "--backend",
        choices=("asyncio", "trio"),
        default="asyncio",
        help="the supervisor's event loop (asyncio uses uvloop when installed)",
    )
    p.add_argument(
        "--no-install", action="store_true", help="never install anything; report what is missing"
    )
    return p.parse_args(argv)


def _stop_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    os.environ["SUPERVISOR_BACKEND"] = args.backend  # read by `python -m supervisor`
    chosen = args.only or list(SCENARIOS)
    needs = set().union(*(tools.NEEDS[s] for s in chosen)) | (
        {"matplotlib"} if args.plot else set()
    )
    missing = tools.ensure(needs, install=not args.no_install)
    for why in missing.values():
        sys.stderr.write(f"[bench] {why}: the figures that need it will read n/a\n")
    repeats = args.repeats or (1 if args.quick else 3)
    rows: list[Row] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp, Procs() as procs:
        ctx = Context(
            procs=procs,
            tmp=Path(tmp),
            quick=args.quick,
            repeats=repeats,
            seconds=args.seconds or (2.0 if args.quick else 3.0),
            target=1.5 if args.quick else 5.0,
            workers=[w for w in "abcd" if w in args.workers],
            split_items=args.split_items or (200_000 if args.quick else 1_000_000),
            max_items=args.max_items,
            missing=missing,
        )
        for name in chosen:
            try:
                rows += RUNNERS[name](ctx)
            except Exception:
                sys.stderr.write(f"[bench] the {name} scenario failed:\n{traceback.format_exc()}")
    header = [
        f"python -m bench{' --quick' if args.quick else ''}  "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {time.monotonic() - started:.0f} s, "
        f"{repeats} repeat(s)"
        + (
            f", wrk/peers {ctx.seconds:g} s each"
            if {"dispatch", "proxy", "serve"} & set(chosen)
            else ""
        ),
        *tools.machine(),
        f"supervisor: --backend {args.backend}"
        + (" (uvloop when installed)" if args.backend == "asyncio" else ""),
        "cells: median [min-max] over repeats; -> ratio ours/baseline of the medians; "
        "every baseline measured in this run",
    ]
    table = format_table(rows, header)
    print(table)
    if args.json:
        args.json.write_text(
            json.dumps({"header": header, "rows": [r.to_json() for r in rows]}, indent=1)
        )
    if args.plot:
        try:
            from bench.plot import plot

            plot(rows, args.plot)
        except Exception as e:
            sys.stderr.write(f"[bench] no plot: {e}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
