"""The allocator tuning takes effect on glibc and steps aside for the user's own setting."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from tests.helpers import child_env

PROBE = "from supervisor.allocator import tune_allocator; print(tune_allocator())"


def probe(threshold: str | None) -> str:
    env = {k: v for k, v in child_env().items() if k != "MALLOC_MMAP_THRESHOLD_"}
    if threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = threshold
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_takes_effect_on_glibc() -> None:
    assert probe(None) == "True"


def test_the_users_setting_wins() -> None:
    assert probe("131072") == "False"
