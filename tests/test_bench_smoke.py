"""Smoke test of the benchmark: ``python -m bench`` runs the split scenario and prints a table.

Same command-line path as a real run, on a tiny input, one repeat, nothing installed. It checks
the shape of the output only: the benchmark prints figures, it never asserts timings. (The
split scenario needs no wrk, so this test never skips for want of it.)
"""

from __future__ import annotations

import re
import subprocess
import sys

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
