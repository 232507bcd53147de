"""Footprint: what the supervisor costs when idle, and how long it adds before the first batch.

- Idle RSS: ``supervisor proxy`` with one container (worker (a)), ready and idle for 0.5 s;
  VmRSS of the supervisor process alone, beside worker (a)'s and a bare interpreter's, each
  started alone and idle for 0.5 s.
- Start to first batch: ``supervisor run`` of a one-item job, from spawning the command to
  the worker's ``first_batch`` stamp, beside worker (a) started alone until its port accepts.
  The API has no readiness probe: the supervisor adds its own TCP probe on pod.port.
"""

from __future__ import annotations

import shutil
import sys
import time

from bench import data
from bench.procs import LOAD_CPU, WORKER_CPU, free_port, vm_rss_kib, wait_port
from bench.product import proxy, read_stamps, supervisor_argv, worker_argv, write_api
from bench.scenarios import Context
from bench.table import Row, Series


def run(ctx: Context) -> list[Row]:
    rss = Row(
        "footprint",
        "idle supervisor proxy, 1 container",
        "RSS MB",
        Series("supervisor"),
        [Series("worker (a)"), Series("bare python")],
        lower_is_better=True,
    )
    first = Row(
        "footprint",
        "start -> first batch (run, 1 item)",
        "s",
        Series("supervisor run"),
        [Series("worker (a) alone")],
        lower_is_better=True,
    )
    extra = Row(
        "footprint",
        "added beyond the worker's own start",
        "s",
        Series("supervisor run"),
        [],
        lower_is_better=True,
    )
    for rep in range(ctx.repeats):
        ctx.say(f"footprint repeat {rep + 1}/{ctx.repeats}")
        _idle_rss(ctx, rss)
        alone = _worker_start(ctx, first)
        taken = _first_batch(ctx, first)
        if alone is not None and taken is not None:
            extra.ours.add(taken - alone)
    if not extra.ours.values:
        extra.ours.fail(first.ours.error or first.baselines[0].error or "not measured")
    return [rss, first, extra]


def _idle_mb(ctx: Context, argv: list[str], port: int | None) -> float:
    """VmRSS of a program 0.5 s after its port answers (or after it started)."""
    proc = ctx.procs.start(argv, cpu=WORKER_CPU)
    try:
        if port is not None:
            wait_port(port, 30.0, proc)
        time.sleep(0.5)
        return vm_rss_kib(proc.pid) * 1024 / 1e6
    finally:
        ctx.procs.stop(proc)


def _idle_rss(ctx: Context, row: Row) -> None:
    port = free_port()
    baselines = [
        (worker_argv("a", port), port),
        ([sys.executable, "-c", "import time; time.sleep(60)"], None),
    ]
    for series, (argv, wait) in zip(row.baselines, baselines, strict=True):
        try:
            series.add(_idle_mb(ctx, argv, wait))
        except Exception as e:
            series.fail(e)
    root = ctx.fresh_dir("footprint")
    try:
        api = write_api(root / "api.yaml", "a", free_port())
        with proxy(ctx.procs, api, root, free_port()) as sup:
            time.sleep(0.5)
            row.ours.add(vm_rss_kib(sup.pid) * 1024 / 1e6)
    except Exception as e:
        row.ours.fail(e)
        ctx.say(f"  supervisor proxy: {e}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _worker_start(ctx: Context, row: Row) -> float | None:
    port = free_port()
    t0 = time.time()
    proc = ctx.procs.start(worker_argv("a", port), cpu=WORKER_CPU)
    try:
        taken = wait_port(port, 30.0, proc) - t0
    except Exception as e:
        row.baselines[0].fail(e)
        return None
    finally:
        ctx.procs.stop(proc)
    row.baselines[0].add(taken)
    return taken


def _first_batch(ctx: Context, row: Row) -> float | None:
    root = ctx.fresh_dir("footprint-run")
    stamps = root / "stamps.txt"
    try:
        api = write_api(root / "api.yaml", "a", free_port(), stamps, probe=False)
        job = data.write_item_list_job(root / "job.json", data.items(1), 1)
        argv = supervisor_argv("run", str(api), "--job", str(job), "--root", str(root), "--fresh")
        t0 = time.time()
        code, _, err = ctx.procs.run(argv, cpu=LOAD_CPU, timeout=60)
        got = read_stamps(stamps).get("first_batch")
        if got is None:
            tail = err.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"no batch reached the worker (exit {code}): {tail[0][:150]}")
        row.ours.add(got - t0)
        return got - t0
    except Exception as e:
        row.ours.fail(e)
        return None
    finally:
        shutil.rmtree(root, ignore_errors=True)
