"""Which container owns the pod's port, read from Linux ``/proc`` (docs/container-contract.md).

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
from collections.abc import Iterable, Iterator, Mapping

import msgspec

from supervisor.errors import PortOwnerError
from supervisor.proctable import PROC, ProcStat, all_pids, describe_pid, process_tree, scan_stats

__all__ = [
    "PortOwner",
    "find_port_owner",
    "listening_inodes",
    "listening_ports",
    "pids_with_socket",
]

_TCP_LISTEN = "0A"


class PortOwner(msgspec.Struct, frozen=True):
    """The container whose process listens on the port, that process and its command line."""

    container: str
    pid: int
    cmdline: str


# --------------------------------------------------------------------------------------------
# Sockets


def _listeners() -> Iterator[tuple[int, int]]:
    """(port, inode) of every TCP socket (v4 and v6, any local address) in LISTEN state."""
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
                yield int(hex_port, 16), int(fields[9])
            except ValueError:
                continue


def listening_inodes(port: int) -> set[int]:
    """Inodes of TCP sockets (v4 and v6, any local address) listening on ``port``."""
    return {inode for p, inode in _listeners() if p == port and inode}


def listening_ports() -> set[int]:
    """Every TCP port something listens on (one read of the tables, for many ports)."""
    return {p for p, _ in _listeners()}


def pids_with_socket(inodes: Iterable[int]) -> set[int]:
    """Processes with an open file descriptor on one of the socket ``inodes``."""
    targets = {f"socket:[{inode}]" for inode in inodes}
    found: set[int] = set()
    if not targets:
        return found
    for pid in all_pids():
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
