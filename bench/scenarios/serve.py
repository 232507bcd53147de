"""Serve: the job API of ``supervisor serve`` under wrk, its memory, and a big dry run.

Each repeat starts worker (a) alone, then ``supervisor serve`` (one BatchAPI running worker
(a), on a fresh root), both pinned to the worker CPU, with wrk and the bench's own client on
the load CPU, so the server under test and its baseline server sit on the same CPU:

- status: wrk ``GET /bench?jobID=<id>`` of a job that ended (a one-item job submitted and
  waited for), beside wrk ``GET /healthz`` on worker (a) (the trivial server) and on serve
  itself (its HTTP server with no job API behind it), at c = 1/4/16 (quick: 4);
- submissions: wrk ``POST /bench?dryRun=true`` of a 10-item item_list job (checked, split,
  answered, nothing stored, no pod started), beside wrk posting the same body to worker (a);
- real submissions: a few one-item jobs posted one after the other (each is split, stored in
  the queue and started on a pod of its own before it is answered), time to the answer,
  beside the dry run of the same body;
- RSS (VmRSS of the serve process alone, its pods not counted) 0.5 s after /healthz first
  answers, and after every request above, beside worker (a) at the same points;
- a 100,000-item (~8 MB) submission: time to the answer of ``POST ?dryRun=true`` beside
  ``supervisor validate API --job FILE`` on the same file (a process of its own: the
  interpreter's start and the imports count) and beside the same bytes posted to worker (a)
  (what moving 8 MB over loopback costs).
"""

from __future__ import annotations

import http.client
import json
import shutil
import time
from pathlib import Path

from bench import data
from bench.procs import WORKER_CPU, free_port, vm_rss_kib
from bench.product import serve, start_worker, supervisor_argv, write_api
from bench.scenarios import Context
from bench.table import Row, Series
from bench.wrk import run_wrk

SERVE = "supervisor serve"
API = "bench"
BIG_ITEMS = 100_000


def run(ctx: Context) -> list[Row]:
    levels = [4] if ctx.quick else [1, 4, 16]
    submits = 3 if ctx.quick else 5
    work = ctx.fresh_dir("serve")
    small = data.write_item_list_job(work / "small.json", data.items(10), 10)
    one = data.write_item_list_job(work / "one.json", data.items(1), 1)
    big = data.write_item_list_job(work / "big.json", data.items(BIG_ITEMS), 100)
    mb = big.stat().st_size / 1e6
    status = {
        c: Row(
            "serve",
            f"status GET ?jobID= c={c}",
            "req/s",
            Series(SERVE),
            [Series("worker (a) GET /healthz"), Series("serve GET /healthz")],
        )
        for c in levels
    }
    dry = {
        c: Row(
            "serve",
            f"dry-run POST (10 items) c={c}",
            "req/s",
            Series(SERVE),
            [Series("worker (a) POST")],
        )
        for c in levels
    }
    real = Row(
        "serve",
        f"submission (1 item) answered, x{submits}",
        "ms",
        Series(SERVE),
        [Series("dry run, same body")],
        lower_is_better=True,
    )
    rss_start = Row(
        "serve",
        "RSS after start-up",
        "MB",
        Series(SERVE),
        [Series("worker (a)")],
        lower_is_better=True,
    )
    rss_after = Row(
        "serve",
        "RSS after the requests",
        "MB",
        Series(SERVE),
        [Series("worker (a)")],
        lower_is_better=True,
    )
    big_row = Row(
        "serve",
        f"dry run {BIG_ITEMS:,} items ({mb:.0f} MB)",
        "ms",
        Series(f"{SERVE} HTTP"),
        [Series("supervisor validate"), Series("POST to worker (a)")],
        lower_is_better=True,
    )
    rows = [*status.values(), *dry.values(), real, rss_start, rss_after, big_row]
    if "wrk" in ctx.missing:
        for c in levels:
            for row in (status[c], dry[c]):
                for s in (row.ours, *row.baselines):
                    s.fail(ctx.missing["wrk"])
    bodies = work / "bodies"
    bodies.mkdir()
    no_body = bodies / "none.txt"
    no_body.write_text("\n")
    small_body = bodies / "small.txt"
    small_body.write_bytes(small.read_bytes().strip() + b"\n")
    counts: list[int] = []
    for rep in range(ctx.repeats):
        ctx.say(f"serve repeat {rep + 1}/{ctx.repeats}: worker (a) alone")
        _baseline(ctx, work, levels, status, dry, rss_start, rss_after, big_row, no_body, big)
        ctx.say(f"serve repeat {rep + 1}/{ctx.repeats}: supervisor serve")
        n = _serve(
            ctx, work, levels, submits, status, dry, real, rss_start, rss_after, big_row, one, big
        )
        if n is not None:
            counts.append(n)
        ctx.say(f"serve repeat {rep + 1}/{ctx.repeats}: supervisor validate")
        _validate(ctx, work, big, big_row)
    if counts:
        rss_after.case = f"RSS after ~{min(counts):,} requests"
    shutil.rmtree(work, ignore_errors=True)
    return rows


def _wrk(
    ctx: Context,
    series: Series,
    port: int,
    bodies: Path,
    c: int,
    work: Path,
    method: str,
    path: str,
) -> int:
    """One wrk measurement into ``series``; returns the requests it made (0 on failure)."""
    if "wrk" in ctx.missing:
        return 0
    try:
        r = run_wrk(
            ctx.procs,
            port,
            bodies,
            connections=c,
            seconds=ctx.seconds,
            workdir=work,
            method=method,
            path=path,
        )
    except Exception as e:
        series.fail(e)
        ctx.say(f"  {series.label} c={c}: {e}")
        return 0
    series.add(r.rps)
    return r.requests


def _request(
    port: int, method: str, target: str, body: bytes | None = None, timeout: float = 120.0
) -> tuple[float, int, bytes]:
    """One request on a fresh connection: (seconds to the full answer, status, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        t0 = time.perf_counter()
        conn.request(method, target, body=body, headers=headers)
        resp = conn.getresponse()
        answer = resp.read()
        return time.perf_counter() - t0, resp.status, answer
    finally:
        conn.close()


def _mb(pid: int) -> float:
    return vm_rss_kib(pid) * 1024 / 1e6


def _baseline(
    ctx: Context,
    work: Path,
    levels: list[int],
    status: dict[int, Row],
    dry: dict[int, Row],
    rss_start: Row,
    rss_after: Row,
    big_row: Row,
    no_body: Path,
    big: Path,
) -> None:
    port = free_port()
    try:
        worker = start_worker(ctx.procs, "a", port)
    except Exception as e:
        for row in (*status.values(), *dry.values(), rss_start, rss_after):
            row.baselines[0].fail(e)
        big_row.baselines[1].fail(e)
        return
    try:
        time.sleep(0.5)
        rss_start.baselines[0].add(_mb(worker.pid))
        for c in levels:
            _wrk(ctx, status[c].baselines[0], port, no_body, c, work, "GET", "/healthz")
        for c in levels:
            small_body = no_body.parent / "small.txt"
            _wrk(ctx, dry[c].baselines[0], port, small_body, c, work, "POST", "/")
        rss_after.baselines[0].add(_mb(worker.pid))
        try:
            took, code, _ = _request(port, "POST", "/", big.read_bytes())
            if code != 200:
                raise RuntimeError(f"worker (a) answered {code}")
            big_row.baselines[1].add(took * 1e3)
        except Exception as e:
            big_row.baselines[1].fail(e)
    finally:
        ctx.procs.stop(worker)


def _wait_ended(port: int, job_id: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        _, code, answer = _request(port, "GET", f"/{API}?jobID={job_id}", timeout=10.0)
        if code != 200:
            raise RuntimeError(f"status of {job_id}: {code} {answer[:150]!r}")
        state = str(json.loads(answer)["job_status"]["status"])
        if state not in ("pending", "enqueuing", "running"):
            return state
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {state} after {timeout:g} s")
        time.sleep(0.05)


def _serve(
    ctx: Context,
    work: Path,
    levels: list[int],
    submits: int,
    status: dict[int, Row],
    dry: dict[int, Row],
    real: Row,
    rss_start: Row,
    rss_after: Row,
    big_row: Row,
    one: Path,
    big: Path,
) -> int | None:
    """Everything measured against one ``supervisor serve``; returns the requests it served."""
    root = ctx.fresh_dir("serve-root")
    listen = free_port()
    api = write_api(root / "api.yaml", "a", free_port(), probe=False)
    small_body = work / "bodies" / "small.txt"
    no_body = work / "bodies" / "none.txt"
    served = 0
    try:
        with serve(ctx.procs, api, root, listen, cpu=WORKER_CPU) as sup:
            time.sleep(0.5)
            rss_start.ours.add(_mb(sup.pid))
            body = one.read_bytes()
            ids: list[str] = []
            try:
                for _ in range(submits):
                    took, code, answer = _request(listen, "POST", f"/{API}?dryRun=true", body)
                    if code != 200:
                        raise RuntimeError(f"dry run answered {code}: {answer[:150]!r}")
                    real.baselines[0].add(took * 1e3)
                for _ in range(submits):  # each job ends before the next: no pod starting
                    took, code, answer = _request(listen, "POST", f"/{API}", body)
                    if code != 200:
                        raise RuntimeError(f"submission answered {code}: {answer[:150]!r}")
                    real.ours.add(took * 1e3)
                    ids.append(str(json.loads(answer)["job_id"]))
                    state = _wait_ended(listen, ids[-1], 60.0)
                    if state != "succeeded":
                        raise RuntimeError(f"job {ids[-1]} ended {state}: {root / 'serve.log'}")
                served += 2 * submits
            except Exception as e:
                ctx.say(f"  submissions: {e}")
                real.ours.fail(e)
                for row in status.values():
                    row.ours.fail(e)
            if ids and real.ours.error is None:
                target = f"/{API}?jobID={ids[0]}"
                for c in levels:
                    served += _wrk(ctx, status[c].ours, listen, no_body, c, work, "GET", target)
                    served += _wrk(
                        ctx, status[c].baselines[1], listen, no_body, c, work, "GET", "/healthz"
                    )
            for c in levels:
                path = f"/{API}?dryRun=true"
                served += _wrk(ctx, dry[c].ours, listen, small_body, c, work, "POST", path)
            rss_after.ours.add(_mb(sup.pid))
            try:
                took, code, answer = _request(
                    listen, "POST", f"/{API}?dryRun=true", big.read_bytes()
                )
                if code != 200 or f"{BIG_ITEMS} item(s)".encode() not in answer:
                    raise RuntimeError(f"the big dry run answered {code}: {answer[:150]!r}")
                big_row.ours.add(took * 1e3)
            except Exception as e:
                big_row.ours.fail(e)
                ctx.say(f"  big dry run: {e}")
        return served
    except Exception as e:
        ctx.say(f"  supervisor serve: {e}")
        for row in (*status.values(), *dry.values(), real, rss_start, rss_after, big_row):
            row.ours.fail(e)
        return None
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _validate(ctx: Context, work: Path, big: Path, row: Row) -> None:
    api = write_api(work / "validate-api.yaml", "a", free_port(), probe=False)
    argv = supervisor_argv("validate", str(api), "--job", str(big))
    try:
        t0 = time.perf_counter()
        code, _, err = ctx.procs.run(argv, cpu=WORKER_CPU, timeout=120)
        took = time.perf_counter() - t0
        if code != 0:
            tail = err.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"supervisor validate exited {code}: {tail[0][:150]}")
        row.baselines[0].add(took * 1e3)
    except Exception as e:
        row.baselines[0].fail(e)
