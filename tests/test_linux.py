"""supervisor.linux: cgroup OOM evidence, the PDEATHSIG trampoline, the child subreaper."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from supervisor.linux import (
    become_subreaper,
    die_with_parent,
    is_subreaper,
    memory_events_path,
    oom_evidence,
    oom_kill_count,
)

pytestmark = pytest.mark.timeout(60)

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")


# -- OOM evidence -----------------------------------------------------------------------------


def test_oom_kill_counter(tmp_path: Path) -> None:
    events = tmp_path / "memory.events"
    assert oom_kill_count(events) is None  # missing file
    events.write_text("low 0\nhigh 0\nmax 4\noom 2\noom_kill 2\noom_group_kill 0\n")
    before = oom_kill_count(events)
    assert before == 2
    events.write_text("low 0\nhigh 0\nmax 4\noom 3\noom_kill 3\noom_group_kill 0\n")
    assert oom_evidence(before, oom_kill_count(events)) is True
    assert oom_evidence(3, oom_kill_count(events)) is False
    assert oom_evidence(None, 3) is False
    events.write_text("oom_kill x\n")
    assert oom_kill_count(events) is None
    assert oom_kill_count(None) is None


def test_memory_events_path(tmp_path: Path) -> None:
    proc = tmp_path / "cgroup"
    root = tmp_path / "sys"
    # cgroup v2, with the cgroup's own directory visible
    proc.write_text("0::/kubepods/pod1/c1\n")
    own = root / "kubepods" / "pod1" / "c1" / "memory.events"
    own.parent.mkdir(parents=True)
    own.write_text("oom_kill 0\n")
    assert memory_events_path(proc, root) == own
    # cgroup v2 in a cgroup namespace: the container's cgroup is the mount root
    proc.write_text("0::/\n")
    (root / "memory.events").write_text("oom_kill 1\n")
    assert memory_events_path(proc, root) == root / "memory.events"
    # cgroup v1
    proc.write_text("5:cpu:/\n4:memory:/docker/abc\n0::/\n")
    (root / "memory.events").unlink()
    v1 = root / "memory" / "memory.oom_control"
    v1.parent.mkdir()
    v1.write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 7\n")
    assert memory_events_path(proc, root) == v1
    assert oom_kill_count(v1) == 7
    # nothing
    v1.unlink()
    assert memory_events_path(proc, root) is None
    assert memory_events_path(tmp_path / "missing", tmp_path / "nowhere") is None


# -- the PDEATHSIG trampoline -----------------------------------------------------------------


@linux_only
def test_die_with_parent_runs_the_command_unchanged(tmp_path: Path) -> None:
    argv = [sys.executable, "-c", "import sys; print(sys.argv[1:])", "a b", "$(X)"]
    wrapped = die_with_parent(argv, os.environ, tmp_path)
    assert wrapped[-len(argv) :] == argv and wrapped[0] == sys.executable
    done = subprocess.run(wrapped, cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert (done.returncode, done.stdout) == (0, "['a b', '$(X)']\n")


@linux_only
def test_die_with_parent_reports_what_exec_would(tmp_path: Path) -> None:
    env = {"PATH": str(tmp_path)}
    with pytest.raises(FileNotFoundError):
        die_with_parent(["no-such-command-here"], env, None)
    with pytest.raises(FileNotFoundError):
        die_with_parent(["./missing"], env, tmp_path)
    with pytest.raises(FileNotFoundError) as missing_cwd:
        die_with_parent([sys.executable], env, tmp_path / "nowhere")
    assert missing_cwd.value.filename == str(tmp_path / "nowhere")
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\n")
    with pytest.raises(PermissionError):
        die_with_parent(["./script.sh"], env, tmp_path)
    with pytest.raises(PermissionError):
        die_with_parent([str(tmp_path)], env, None)  # a directory
    script.chmod(0o755)
    assert die_with_parent(["script.sh"], env, None)[-1] == "script.sh"  # found in env's PATH


# -- the child subreaper ----------------------------------------------------------------------


@linux_only
def test_become_subreaper_and_back() -> None:
    if not become_subreaper():
        pytest.skip("this system has no PR_SET_CHILD_SUBREAPER")
    try:
        assert is_subreaper()
    finally:
        assert become_subreaper(False)
    assert not is_subreaper() or os.getpid() == 1
