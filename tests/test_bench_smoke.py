"""Smoke tests of the benchmark: ``python -m bench`` runs the split and redis scenarios and
prints a table.

Same command-line path as a real run, on a tiny input, one repeat, nothing installed. It checks
the shape of the output only: the benchmark prints figures, it never asserts timings. (The
split scenario needs no wrk, so this test never skips for want of it.)
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys

import pytest

from tests.helpers import REPO, child_env


def test_bench_split_prints_a_table() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--only",
            "split",
            "--split-items",
            "2000",
            "--repeats",
            "1",
            "--no-install",
        ],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "== split ==" in out
    assert "pinning:" in out and "machine:" in out
    for fmt in ("item_list 2,000 items", "ndjson 2,000 items"):
        rows = [line for line in out.splitlines() if line.startswith(fmt) and "S3" not in line]
        assert len(rows) == 2, out  # MB/s and peak RSS
        speed = next(line for line in rows if "MB/s" in line)
        assert re.search(r"supervisor: [0-9.]+[kM]?\s", speed), speed
        assert re.search(r"stdlib json: [0-9.]+[kM]? -> [0-9.]+x", speed), speed
    # The S3 row needs SeaweedFS; tests/test_objectstore.py covers S3 for real.
    assert not [line for line in out.splitlines() if "n/a" in line and "S3" not in line], out


def test_bench_redis_prints_a_table() -> None:
    """The redis scenario end to end on small jobs: its own redis-server, four
    ``supervisor worker`` pods, ``supervisor run`` beside them; figures, no timings checked."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    if importlib.util.find_spec("httptools") is None:
        pytest.skip("worker (a) needs httptools (pip install -e '.[bench]')")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--only",
            "redis",
            "--workers",
            "a",
            "--max-items",
            "20000",  # 2,000 batches a job
            "--repeats",
            "1",
            "--no-install",
        ],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "== redis ==" in out
    for pods in ("1 pod", "2 pods", "4 pods"):
        rows = [line for line in out.splitlines() if f"c=16 {pods} " in line]
        assert len(rows) == 3, out  # batches/s, CPU per batch, Redis per batch
        rate = next(line for line in rows if "batches/s" in line)
        assert re.search(r"embedded \(run\): [0-9.]+[kM]? -> [0-9.]+x", rate), rate
        cost = next(line for line in rows if "per batch" in line and "round trips" in line)
        assert re.search(r"round trips: [0-9.]+\s", cost), cost
    assert "n/a" not in out, out
    assert "(2000 batches)" in out, out
