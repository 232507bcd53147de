"""Orphans and zombies: what a supervisor that may be PID 1 owes its process tree.

Theory of operation
-------------------
When a container's process double-forks and its parent exits, the grandchild is reparented to
the nearest *subreaper* -- us, after :func:`supervisor.linux.become_subreaper` (or to us anyway
when we are PID 1, as ``tini`` is). When such an orphan exits, nobody but us can collect its
exit status, and until somebody does it stays a zombie holding a pid.

:func:`reap_orphans` therefore scans ``/proc`` for zombies whose parent is this process and
collects them with ``waitpid(pid, WNOHANG)``. It must never collect a child that anyio is
waiting for (its ``Process.wait()`` would then report a made-up status), so a zombie is left
alone when

* ``is_known(pid)`` says it is a container's main process, or
  :func:`supervisor.process.is_direct_child` says it is (or a spawn is in flight), or
* it has not yet been a zombie for a whole scan period: anyio's child watchers collect their
  own children as soon as they exit, so a zombie that survives a full period is nobody's
  business but ours. This also covers children spawned elsewhere (exec probes).

SIGCHLD is not used: backends handle it differently, other code may own the handler, and a
zombie costs only a pid slot for a second or two.

:func:`kill_descendants` is the last-resort sweep at shutdown: every live process below us in
the ``ppid`` tree gets a signal, so that what the containers started outside their process
groups is stopped too (docs/operations.md, "Stopping: signals").
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

import anyio

from supervisor.process import is_direct_child
from supervisor.proctable import ProcStat, process_tree, scan_stats

__all__ = ["kill_descendants", "reap_orphans", "reap_zombies"]


def _our_zombies(stats: dict[int, ProcStat]) -> set[tuple[int, int]]:
    me = os.getpid()
    return {(st.pid, st.starttime) for st in stats.values() if st.ppid == me and st.state == "Z"}


def _any_zombie_child() -> bool:
    """Whether some child of ours has exited and is not reaped yet (nothing is reaped here)."""
    try:
        info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return False  # no children at all
    return info is not None


def reap_zombies(
    is_known: Callable[[int], bool] | None,
    previous: set[tuple[int, int]],
) -> tuple[list[int], set[tuple[int, int]]]:
    """One scan: reap our unknown zombies already seen in ``previous``.

    Returns the pids reaped and the zombies seen now (pass them as ``previous`` next time).
    Zombies are identified by (pid, start time) so a recycled pid is not mistaken for an old one.
    """
    if not _any_zombie_child():
        return [], set()  # the common case, without reading every /proc/<pid>/stat
    seen = _our_zombies(scan_stats())
    reaped: list[int] = []
    for pid, start in sorted(seen & previous):
        if is_direct_child(pid) or (is_known is not None and is_known(pid)):
            continue
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            continue  # someone else reaped it meanwhile
        if done == pid:
            reaped.append(pid)
            seen.discard((pid, start))
    return reaped, seen


async def reap_orphans(
    is_known: Callable[[int], bool] | None = None, interval: float = 1.0
) -> None:
    """Reap zombie orphans every ``interval`` seconds, forever (cancel to stop)."""
    previous: set[tuple[int, int]] = set()
    while True:
        _, previous = reap_zombies(is_known, previous)
        await anyio.sleep(interval)


def kill_descendants(sig: int = signal.SIGKILL) -> list[int]:
    """Send ``sig`` to every live process below this one (by ``ppid``); returns their pids.

    The tree is walked again after each round (up to a few times) to catch processes forked
    while the previous round was being signalled.
    """
    me = os.getpid()
    signalled: list[int] = []
    done: set[int] = set()
    for _ in range(5):
        stats = scan_stats()
        targets = sorted(
            pid
            for pid in process_tree(me, stats)
            if pid != me and pid not in done and stats[pid].state not in ("Z", "X")
        )
        if not targets:
            break
        for pid in targets:
            done.add(pid)
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                continue
            signalled.append(pid)
    return signalled
