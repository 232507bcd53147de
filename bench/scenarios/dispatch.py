"""Dispatch: ``supervisor run`` batches/s against each worker, beside wrk and the naive peers.

For each case (worker, batch size B, concurrency c) and each repeat: the worker is started
alone (CPU 0) and wrk (CPU 1, c connections) posts the job's first batch bodies at it; against
worker (a) the textbook h11 client and the aiohttp loop do the same. Then ``supervisor run``
(CPU 1) runs an item_list job of those items with ``--concurrency c`` against a fresh copy of the
same worker. The job holds up to 200k items, fewer when wrk's rate says the run would take
longer than ``ctx.target`` seconds (the table shows the batch count).
The 256 KiB case posts bodies of 100 items of 2,600 bytes and is reported in MB/s; its job is
capped at 2,000 batches (~520 MB through the embedded queue), 400 in a quick run.
"""

from __future__ import annotations

import json
import shutil
import sys
from itertools import product
from pathlib import Path

from bench import data
from bench.procs import LOAD_CPU, free_port
from bench.product import WORKERS, RunResult, run_job, start_worker, write_api
from bench.scenarios import Context
from bench.table import Row, Series
from bench.wrk import run_wrk

BIG_ITEM = 2600  # 100 of them make a body just under the 256 KiB batch limit


def cases(ctx: Context) -> list[tuple[str, int, int, int]]:
    """(worker, batch size, concurrency, item size)."""
    if ctx.quick:
        picked = [("a", 10, 4), ("b", 10, 4), ("c", 10, 4), ("d", 10, 16)]
        out = [(w, b, c, 80) for w, b, c in picked if w in ctx.workers]
    else:
        out = [(w, b, c, 80) for w, b, c in product(ctx.workers, (1, 10, 100), (1, 4, 16))]
    if "a" in ctx.workers:
        out.append(("a", 100, 4, BIG_ITEM))
    return out


def _peer(ctx: Context, peer: str, port: int, c: int, bodies: Path) -> tuple[float, float]:
    """(requests/s, body bytes/s) of a naive peer."""
    argv = [sys.executable, "-m", "bench.peers", peer, "--port", str(port), "--concurrency", str(c)]
    argv += ["--seconds", str(ctx.seconds), "--bodies", str(bodies)]
    code, out, err = ctx.procs.run(argv, cpu=LOAD_CPU, timeout=ctx.seconds + 30)
    if code != 0:
        raise RuntimeError(f"{peer} exited {code}: {err.decode(errors='replace').strip()[-150:]}")
    r = json.loads(out)
    if r["errors"] or not r["requests"]:
        raise RuntimeError(f"{peer}: {r['errors']} non-200 answers in {r['requests']} requests")
    return r["requests"] / r["seconds"], r["bytes"] / r["seconds"]


def run(ctx: Context) -> list[Row]:
    rows: list[Row] = []
    pool: dict[int, list[bytes]] = {}
    for worker, b, c, size in cases(ctx):
        big = size != 80
        if size not in pool:
            pool[size] = data.items(6400 if big else ctx.max_items, size)
        items = pool[size]
        if big:  # the same 6,400 items over and over: 2,000 batches (~520 MB), 400 when quick
            items = [items[i % len(items)] for i in range((400 if ctx.quick else 2000) * b)]
        unit = "MB/s" if big else "batches/s"
        label = f"{WORKERS[worker][1]} B={b} c={c}" + (" 256KiB bodies" if big else "")
        row = Row("dispatch", label, unit, Series("supervisor run"), [Series("wrk")])
        row.params = {"worker": worker, "batch_size": b, "concurrency": c, "item_bytes": size}
        peers = [Series("h11"), Series("aiohttp")] if worker == "a" else []
        row.baselines += peers
        case_dir = ctx.fresh_dir("dispatch")
        bodies = data.write_bodies(case_dir / "bodies.txt", items, b, limit=64 if big else 1000)
        body_len = bodies.stat().st_size / sum(1 for _ in bodies.open("rb"))
        scale = body_len / 1e6 if big else 1.0
        n_batches = 0
        size_rate = 1.0
        for rep in range(ctx.repeats):
            ctx.say(f"dispatch {label} repeat {rep + 1}/{ctx.repeats}")
            wrk_rate = _baselines(ctx, row, worker, c, bodies, case_dir, scale, peers)
            if not n_batches:
                # no wrk: size the job from a cautious guess
                size_rate = wrk_rate or (90.0 * c if worker == "d" else 1000.0)
                n_batches = max(50, min(len(items) // b, int(size_rate * ctx.target)))
                data.write_item_list_job(case_dir / "job.json", items[: n_batches * b], b)
                row.params["batches"] = n_batches
                row.case += f" ({n_batches} batches)"
            try:
                result = _supervisor(
                    ctx, worker, c, case_dir, timeout=60 + 20 * n_batches / size_rate
                )
                row.ours.add(result.rate * scale)
            except Exception as e:
                row.ours.fail(e)
                ctx.say(f"  supervisor run: {e}")
        rows.append(row)
        shutil.rmtree(case_dir, ignore_errors=True)
    return rows


def _baselines(
    ctx: Context,
    row: Row,
    worker: str,
    c: int,
    bodies: Path,
    case_dir: Path,
    scale: float,
    peers: list[Series],
) -> float | None:
    """Measures wrk (and the peers) against a fresh worker; returns wrk's request rate."""
    wrk = row.baselines[0]
    rate = None
    port = free_port()
    try:
        proc = start_worker(ctx.procs, worker, port)
    except Exception as e:
        for series in row.baselines:
            series.fail(f"worker {worker}: {e}")
        return None
    try:
        try:
            result = run_wrk(
                ctx.procs, port, bodies, connections=c, seconds=ctx.seconds, workdir=case_dir
            )
            rate = result.rps
            wrk.add(rate * scale)
        except Exception as e:
            wrk.fail(e)
        for series in peers:
            try:
                rps, bps = _peer(ctx, series.label, port, c, bodies)
                series.add(bps / 1e6 if scale != 1.0 else rps)
            except Exception as e:
                series.fail(e)
    finally:
        ctx.procs.stop(proc)
    return rate


def _supervisor(ctx: Context, worker: str, c: int, case_dir: Path, *, timeout: float) -> RunResult:
    root = ctx.fresh_dir("root")
    stamps = root / "stamps.txt"
    try:
        api = write_api(root / "api.yaml", worker, free_port(), stamps)
        return run_job(
            ctx.procs,
            api,
            case_dir / "job.json",
            root,
            stamps,
            concurrency=c,
            timeout=min(timeout, 900),
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
