"""Which container owns the pod's port, read from Linux ``/proc``.

Theory of operation
-------------------
1. ``/proc/net/tcp`` and ``/proc/net/tcp6`` list the sockets of our network namespace; those in
   state ``0A`` (LISTEN) on the port give a set of socket inodes (several with SO_REUSEPORT).
2. Every ``/proc/<pid>/fd/*`` symlink reading ``socket:[<inode>]`` names a process holding one
   of them (a pre-forking server's master and workers share one inode).
3. Each holder is matched to a container: it is the container's root process or one of its
   descendants (``ppid`` links from ``/proc/<pid>/stat``), or it is in the root's session (each
   container is started as a session leader, so a daemonised descendant that was reparented
   away still counts).

Exactly one container may hold the port. A holder that belongs to no container -- another
program, or the supervisor itself -- or holders from two containers raise
:class:`~supervisor.errors.PortOwnerError`. The scan reads all of ``/proc``; it runs once per
readiness change, not per batch. What users see of it: docs/container-contract.md, "Readiness,
liveness and the port owner".
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import NamedTuple

import msgspec

from supervisor.errors import PortOwnerError

__all__ = [
    "PortOwner",
    "ProcStat",
    "describe_pid",
    "find_port_owner",
    "listening_inodes",
    "pids_with_socket",
    "process_tree",
    "read_stat",
    "scan_stats",
]

PROC = Path("/proc")
_TCP_LISTEN = "0A"
_MAX_CMDLINE = 200


class PortOwner(msgspec.Struct, frozen=True):
    """The container whose process listens on the port, that process and its command line."""

    container: str
    pid: int
    cmdline: str


# --------------------------------------------------------------------------------------------
# The process table


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
    for pid in _pids():
        stat = read_stat(pid)
        if stat is not None:
            out[pid] = stat
    return out


def _pids() -> list[int]:
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


# --------------------------------------------------------------------------------------------
# Sockets


def listening_inodes(port: int) -> set[int]:
    """Inodes of TCP sockets (v4 and v6, any local address) listening on ``port``."""
    inodes: set[int] = set()
    for table in ("tcp", "tcp6"):
        try:
            text = (PROC / "net" / table).read_text()
        except OSError:
            continue  # no IPv6, or no /proc
        for line in text.splitlines()[1:]:
            fields = line.split()
            # sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode ...
            if len(fields) < 10 or fields[3] != _TCP_LISTEN:
                continue
            _, _, hex_port = fields[1].rpartition(":")
            try:
                if int(hex_port, 16) != port:
                    continue
                inode = int(fields[9])
            except ValueError:
                continue
            if inode:
                inodes.add(inode)
    return inodes


def pids_with_socket(inodes: Iterable[int]) -> set[int]:
    """Processes with an open file descriptor on one of the socket ``inodes``."""
    targets = {f"socket:[{inode}]" for inode in inodes}
    found: set[int] = set()
    if not targets:
        return found
    for pid in _pids():
        try:
            with os.scandir(PROC / str(pid) / "fd") as fds:
                for fd in fds:
                    try:
                        if os.readlink(fd.path) in targets:
                            found.add(pid)
                            break
                    except OSError:
                        continue  # fd closed meanwhile
        except OSError:
            continue  # gone, or not ours to look at
    return found


# --------------------------------------------------------------------------------------------
# The owner


def find_port_owner(port: int, roots: Mapping[str, int]) -> PortOwner | None:
    """Which container listens on ``port``; None if nothing listens yet.

    ``roots`` maps container name -> pid of its main process (a session leader). Raises
    :class:`PortOwnerError` if the listener is not one of these containers, or is two of them.
    """
    inodes = listening_inodes(port)
    if not inodes:
        return None
    holders = pids_with_socket(inodes)
    if not holders:
        # The socket may have been closed between the two reads: look once more.
        inodes = listening_inodes(port)
        if not inodes:
            return None
        holders = pids_with_socket(inodes)
        if not holders:
            raise PortOwnerError(
                f"port {port} is listened on by a process this supervisor cannot see "
                "(another user's, or another PID namespace's), which is not a container of this pod"
            )

    stats = scan_stats()
    trees = {name: process_tree(root, stats) for name, root in roots.items()}
    claims: dict[str, list[int]] = {}
    strangers: list[int] = []
    for pid in sorted(holders):
        st = stats.get(pid)
        names = [
            name
            for name, root in roots.items()
            if pid in trees[name] or (st is not None and st.session == root)
        ]
        if not names:
            strangers.append(pid)
        for name in names:
            claims.setdefault(name, []).append(pid)

    if strangers:
        pid = strangers[0]
        if pid == os.getpid():
            raise PortOwnerError(
                f"port {port} is held by this supervisor itself (pid {pid}), "
                "not by a container of this pod"
            )
        raise PortOwnerError(
            f"port {port} is held by pid {pid} (`{describe_pid(pid)}`), "
            "which is not a container of this pod"
        )
    if len(claims) > 1:
        parts = [
            f"`{name}` (pid {pids[0]}, `{describe_pid(pids[0])}`)" for name, pids in claims.items()
        ]
        raise PortOwnerError(
            f"port {port} is claimed by {len(claims)} containers, "
            + " and ".join(parts)
            + "; exactly one container may listen on it"
        )
    ((name, pids),) = claims.items()
    pid = min(pids, key=lambda p: (_depth(p, roots[name], stats), p))
    return PortOwner(container=name, pid=pid, cmdline=describe_pid(pid))


def _depth(pid: int, root: int, stats: Mapping[int, ProcStat]) -> int:
    """Generations from ``root`` down to ``pid`` (large if ``pid`` is only in its session)."""
    depth = 0
    seen: set[int] = set()
    while pid != root:
        st = stats.get(pid)
        if st is None or pid in seen:
            return 1 << 30
        seen.add(pid)
        pid = st.ppid
        depth += 1
    return depth
