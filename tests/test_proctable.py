"""supervisor.proctable: the process table, read from /proc."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from supervisor.proctable import describe_pid, process_tree, read_stat, scan_stats

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs Linux /proc"),
]


def test_the_table_of_this_process() -> None:
    me = os.getpid()
    stats = scan_stats()
    assert stats[me].ppid == os.getppid()
    assert stats[me].session == os.getsid(0)
    assert me in process_tree(me)
    assert process_tree(2**22 + 12345) == set()
    # argv as typed (`python3 -m pytest` in a venv), not sys.executable's full path
    assert describe_pid(me).split(" ")[:3] == sys.orig_argv[:3]
    assert describe_pid(2**22 + 12345) == "?"
    assert read_stat(2**22 + 12345) is None


def test_a_name_with_parentheses_and_spaces() -> None:
    """comm may hold ``) (``: the fields are read after the last ``)``."""
    code = "open('/proc/self/comm', 'w').write('x) S 1 (y'); print(flush=True); input()"
    with subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as child:
        try:
            assert child.stdout is not None
            child.stdout.readline()  # the name is set
            stat = read_stat(child.pid)
            assert stat is not None
            # read after the first ")", the name would give ppid 1
            assert (stat.ppid, stat.session) == (os.getpid(), os.getsid(0))
            assert stat.state in ("R", "S")
            assert describe_pid(child.pid).startswith(sys.executable)
        finally:
            child.kill()
            child.wait(timeout=10)
