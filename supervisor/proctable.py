"""The Linux process table, read from ``/proc``: who is whose parent, in which session.

Theory of operation
-------------------
Every process is one ``/proc/<pid>/stat`` line; :class:`ProcStat` keeps the fields we use
(state, parent, process group, session, start time). :func:`scan_stats` reads them all into a
snapshot, and the rest works on snapshots: :func:`process_tree` follows ``ppid`` links down
from a root. A process may vanish at any moment, so every read tolerates it (``None``, or the
process is missing from the snapshot). A pid names a process only together with its start
time (field 22, in clock ticks since boot): a pid can be reused, a (pid, start time) pair
cannot. :func:`describe_pid` gives a command line for messages.

The port owner (:mod:`supervisor.ports`), the zombie reaper (:mod:`supervisor.reaper`) and
the leftover sweep (:mod:`supervisor.leftovers`) all read the table through here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

__all__ = [
    "PROC",
    "ProcStat",
    "all_pids",
    "describe_pid",
    "process_tree",
    "read_stat",
    "scan_stats",
]

PROC = Path("/proc")
_MAX_CMDLINE = 200


class ProcStat(NamedTuple):
    """The fields of ``/proc/<pid>/stat`` we use."""

    pid: int
    state: str
    ppid: int
    pgrp: int
    session: int
    starttime: int


def read_stat(pid: int) -> ProcStat | None:
    """Parse ``/proc/<pid>/stat``; None if the process is gone or unreadable."""
    try:
        raw = (PROC / str(pid) / "stat").read_bytes()
    except OSError:
        return None
    return _parse_stat(pid, raw)


def _parse_stat(pid: int, raw: bytes) -> ProcStat | None:
    # "pid (comm) state ppid pgrp session tty tpgid flags minflt ... starttime ..."
    # comm may hold spaces and parentheses: split after the last ")".
    _, sep, rest = raw.rpartition(b")")
    fields = rest.split()
    if not sep or len(fields) < 20:
        return None
    try:
        return ProcStat(
            pid=pid,
            state=fields[0].decode("ascii", "replace"),
            ppid=int(fields[1]),
            pgrp=int(fields[2]),
            session=int(fields[3]),
            starttime=int(fields[19]),
        )
    except ValueError:
        return None


def scan_stats() -> dict[int, ProcStat]:
    """Every process we can see, by pid (processes vanishing mid-scan are skipped)."""
    out: dict[int, ProcStat] = {}
    for pid in all_pids():
        stat = read_stat(pid)
        if stat is not None:
            out[pid] = stat
    return out


def all_pids() -> list[int]:
    try:
        names = os.listdir(PROC)
    except OSError:
        return []
    return [int(n) for n in names if n.isdigit()]


def process_tree(root: int, stats: Mapping[int, ProcStat] | None = None) -> set[int]:
    """``root`` and all its live descendants (by ``ppid``); empty if ``root`` is gone."""
    if stats is None:
        stats = scan_stats()
    if root not in stats:
        return set()
    children: dict[int, list[int]] = {}
    for st in stats.values():
        children.setdefault(st.ppid, []).append(st.pid)
    tree = {root}
    todo = [root]
    while todo:
        for kid in children.get(todo.pop(), ()):
            if kid not in tree:
                tree.add(kid)
                todo.append(kid)
    return tree


def describe_pid(pid: int) -> str:
    """The command line of ``pid`` (``[comm]`` for kernel threads and zombies, ``?`` if gone)."""
    try:
        raw = (PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        raw = b""
    text = " ".join(p.decode("utf-8", "replace") for p in raw.split(b"\0") if p)
    if not text:
        try:
            text = "[" + (PROC / str(pid) / "comm").read_text().strip() + "]"
        except OSError:
            return "?"
    if len(text) > _MAX_CMDLINE:
        text = text[: _MAX_CMDLINE - 1] + "…"
    return text
