"""Processes a previous supervisor on this root left behind, and how they are ended.

Theory of operation
-------------------
A supervisor that is SIGKILLed (the OOM killer, ``kill -9``) cleans nothing up. Its
containers' main processes die with it (``PR_SET_PDEATHSIG`` in :mod:`supervisor.linux`),
but what they started does not: the workers of ``uvicorn --workers 2`` are re-parented and
keep listening on pod.port, and the next run on the root would find a stranger on its port.
This module makes sure nothing a container started survives into the next run.

*Recording.* Each container is the leader of its own session (``start_new_session``), so its
session id is the leader's pid. When a container starts, :class:`Ledger` writes one small file
under ``state_dir/processes/`` naming that session, the leader's start time (field 22 of
``/proc/<pid>/stat``), the boot id, the pid namespace, and the *owner*: this supervisor's pid
and start time. The file is removed when the container has ended and nothing is left in its
session, so the directory holds about one file per running container. No ``fsync``: the
files only have to outlive the supervisor process, not the machine (after a reboot they are
void anyway, and the page cache survives a SIGKILL).

Every container also gets ``SUPERVISOR_OWNER=<root id>:<pid namespace>:<owner pid>:<owner
start>`` in its environment (the root id is a random token kept in ``state_dir/root-id``).
Descendants inherit it, including daemons that called ``setsid`` and so left the session:
this is how Jenkins' ProcessTreeKiller finds strays.

*Deciding.* :func:`plan_sweep` is pure: given the records, a snapshot of ``/proc`` and the
marker of each process, it returns the processes to kill. A record counts only if it is from
this boot and pid namespace, and its owner is dead (no process with the owner's pid *and*
start time: a live owner is a supervisor still running on this root, whose containers are
not leftovers). Then, for the session ``sid`` it names:

* the leader is alive with the recorded start time -> every live member is ours;
* the leader is gone but members remain -> they are ours: Linux does not hand out a pid
  while it is still some session's id, so the session cannot be anybody else's;
* the leader's pid is alive with another start time -> the pid was reused (so the old
  session had emptied first): nothing to do.

A process carrying a marker of this root and pid namespace whose owner is dead is ours too.
This process and its ancestors are never killed.

*Ending.* :func:`end_leftovers` runs before any container starts. It kills with SIGKILL at
once: these processes already lost their container's main process, and the rule for a
container whose main process has ended is that the rest of it is SIGKILLed (as Kubernetes
does; see :mod:`supervisor.process`). Each kill goes through a pidfd opened after the start
time was checked again, so a pid reused since the snapshot is never hit. It then waits, up to
a bound, for them to be gone, logs ``leftover_killed`` and deletes the records it settled.
"""

from __future__ import annotations

import contextlib
import enum
import os
import secrets
import select
import signal
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import anyio
import msgspec

from supervisor.logs import Logger
from supervisor.proctable import PROC, ProcStat, describe_pid, read_stat, scan_stats

__all__ = [
    "OWNER_ENV",
    "Ledger",
    "Owner",
    "Record",
    "Sweep",
    "Verdict",
    "end_leftovers",
    "judge",
    "plan_sweep",
    "read_records",
]

OWNER_ENV = "SUPERVISOR_OWNER"
"""The environment variable that marks every process a container starts."""

RECORDS_DIR = "processes"
ROOT_ID_FILE = "root-id"
KILL_WAIT = 5.0
"""How long :func:`end_leftovers` waits for the killed processes to be gone."""

DISCARD_WAIT = 1.0
"""How long a container's cleanup waits for its SIGKILLed process group to be gone."""

_GONE_STATES = ("Z", "X")


class Record(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One container of some supervisor: its session and who started it."""

    boot_id: str
    pid_ns: str
    sid: int
    start: int
    owner_pid: int
    owner_start: int


class Owner(NamedTuple):
    """What marks a supervisor's containers: the root, the pid namespace, the supervisor."""

    root_id: str
    pid_ns: str
    pid: int
    start: int

    def encode(self) -> str:
        return f"{self.root_id}:{self.pid_ns}:{self.pid}:{self.start}"

    @classmethod
    def decode(cls, text: str) -> Owner | None:
        parts = text.split(":")
        if len(parts) < 4:
            return None
        try:
            pid, start = int(parts[-2]), int(parts[-1])
        except ValueError:
            return None
        # The pid namespace reads "pid:[4026531836]": it may hold colons of its own.
        return cls(parts[0], ":".join(parts[1:-2]), pid, start)


# --------------------------------------------------------------------------------------------
# Deciding (pure)


class Verdict(enum.Enum):
    """What a record says about its session now."""

    OTHER_BOOT = "other_boot"  # from before a reboot, or another pid namespace: void
    OWNER_ALIVE = "owner_alive"  # its supervisor still runs: not ours to touch, keep it
    PID_REUSED = "pid_reused"  # the leader's pid belongs to a newer process: void
    GONE = "gone"  # nothing left in the session
    LEFTOVER = "leftover"  # live processes remain in the session: kill them


class Sweep(NamedTuple):
    """The plan: pid -> (start time, why) to kill, and the records that are settled."""

    kill: dict[int, tuple[int, str]]
    settled: list[Record]


def _alive(stats: Mapping[int, ProcStat], pid: int, start: int) -> bool:
    st = stats.get(pid)
    return st is not None and st.starttime == start and st.state not in _GONE_STATES


def judge(
    record: Record, stats: Mapping[int, ProcStat], *, boot_id: str | None, pid_ns: str | None
) -> tuple[Verdict, list[int]]:
    """The verdict on one record and, for LEFTOVER, the live members of its session."""
    if boot_id is None or record.boot_id != boot_id or pid_ns is None or record.pid_ns != pid_ns:
        return Verdict.OTHER_BOOT, []
    if _alive(stats, record.owner_pid, record.owner_start):
        return Verdict.OWNER_ALIVE, []
    leader = stats.get(record.sid)
    if leader is not None and leader.starttime != record.start:
        return Verdict.PID_REUSED, []
    members = sorted(
        st.pid for st in stats.values() if st.session == record.sid and st.state not in _GONE_STATES
    )
    return (Verdict.LEFTOVER, members) if members else (Verdict.GONE, [])


def ancestors(pid: int, stats: Mapping[int, ProcStat]) -> set[int]:
    """``pid`` and every process above it (by ``ppid``)."""
    chain: set[int] = set()
    while pid > 0 and pid not in chain:
        chain.add(pid)
        st = stats.get(pid)
        if st is None:
            break
        pid = st.ppid
    return chain


def plan_sweep(
    records: Iterable[Record],
    stats: Mapping[int, ProcStat],
    markers: Mapping[int, str],
    *,
    root_id: str,
    boot_id: str | None,
    pid_ns: str | None,
    me: int,
) -> Sweep:
    """Which processes are leftovers of a dead supervisor on this root (see the module doc).

    ``markers`` maps pid -> the value of its ``SUPERVISOR_OWNER`` (only for those that have
    one). Records whose owner is alive are neither acted on nor settled.
    """
    protected = ancestors(me, stats)
    kill: dict[int, tuple[int, str]] = {}
    settled: list[Record] = []
    for record in records:
        verdict, members = judge(record, stats, boot_id=boot_id, pid_ns=pid_ns)
        if verdict is Verdict.OWNER_ALIVE:
            continue
        settled.append(record)
        for pid in members:
            if pid not in protected:
                kill[pid] = (stats[pid].starttime, f"session {record.sid}")
    for pid, text in sorted(markers.items()):
        owner = Owner.decode(text)
        st = stats.get(pid)
        if (
            owner is None
            or st is None
            or st.state in _GONE_STATES
            or pid in protected
            or pid in kill
            or owner.root_id != root_id
            or pid_ns is None
            or owner.pid_ns != pid_ns
            or _alive(stats, owner.pid, owner.start)
        ):
            continue
        kill[pid] = (st.starttime, f"marked {OWNER_ENV}")
    return Sweep(kill, settled)


# --------------------------------------------------------------------------------------------
# Facts about this machine and process


def boot_id() -> str | None:
    """This boot's id (``/proc/sys/kernel/random/boot_id``), None where there is none."""
    try:
        return (PROC / "sys" / "kernel" / "random" / "boot_id").read_text().strip() or None
    except OSError:
        return None


def pid_namespace() -> str | None:
    """Our pid namespace (``pid:[inode]``), None where it cannot be read."""
    try:
        return os.readlink(PROC / "self" / "ns" / "pid")
    except OSError:
        return None


def root_id(state_dir: Path) -> str:
    """The random id of this root, created on first use."""
    path = state_dir / ROOT_ID_FILE
    with contextlib.suppress(FileNotFoundError):
        text = path.read_text().strip()
        if text:
            return text
    state_dir.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(8)
    tmp = path.with_name(f"{ROOT_ID_FILE}.{os.getpid()}.tmp")
    tmp.write_text(token + "\n")
    try:
        os.link(tmp, path)  # the first writer wins; a racing second one reads its token
    except FileExistsError:
        token = path.read_text().strip()
    except OSError:  # no hard links on this file system: the last writer wins instead
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return token


def read_marker(pid: int) -> str | None:
    """The ``SUPERVISOR_OWNER`` a process was started with, if any (and if we may look)."""
    try:
        raw = (PROC / str(pid) / "environ").read_bytes()
    except OSError:
        return None
    key = OWNER_ENV.encode() + b"="
    for entry in raw.split(b"\0"):
        if entry.startswith(key):
            return entry[len(key) :].decode("ascii", "replace")
    return None


# --------------------------------------------------------------------------------------------
# Processes by pidfd


def _pidfd(pid: int, start: int) -> int | None:
    """A pidfd on ``pid`` if it is still the process that started at ``start``; None if it
    is not (gone, or its pid reused); -1 where pidfds are unsupported.

    The start time is read *after* opening: if it still matches, the fd refers to that very
    process, so signalling through it can never hit a newer process with the same pid.
    """
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return None
    except (OSError, AttributeError):
        fd = -1  # old kernel: check, then act by pid (a window of microseconds)
    st = read_stat(pid)
    if st is None or st.starttime != start or st.state in _GONE_STATES:
        if fd >= 0:
            os.close(fd)
        return None
    return fd


def _kill(pid: int, start: int) -> int | None:
    """SIGKILL ``pid`` if it is still the process that started at ``start``.

    Returns a pidfd to wait on (-1 where pidfds are unsupported), or None if it is gone.
    """
    fd = _pidfd(pid, start)
    if fd is None:
        return None
    try:
        if fd >= 0:
            signal.pidfd_send_signal(fd, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        if fd >= 0:
            os.close(fd)
        return None
    return fd


def _wait_gone(fds: Sequence[int], timeout: float) -> None:
    """Block until every pidfd is readable (its process has exited) or ``timeout`` passes."""
    poller = select.poll()
    for fd in fds:
        if fd >= 0:
            poller.register(fd, select.POLLIN)
    left = {fd for fd in fds if fd >= 0}
    deadline = time.monotonic() + timeout
    while left:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        for fd, _ in poller.poll(remaining * 1000):
            poller.unregister(fd)
            left.discard(fd)


# --------------------------------------------------------------------------------------------
# Recording


class Ledger:
    """Records the containers of this supervisor under ``state_dir`` (see the module doc)."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir / RECORDS_DIR
        self.dir.mkdir(parents=True, exist_ok=True)
        me = os.getpid()
        st = read_stat(me)
        self._boot_id = boot_id() or ""
        self._pid_ns = pid_namespace() or ""
        self._owner = Owner(root_id(state_dir), self._pid_ns, me, st.starttime if st else 0)
        self._paths: dict[int, Path] = {}

    def env(self) -> dict[str, str]:
        """The marker every container gets in its environment."""
        return {OWNER_ENV: self._owner.encode()}

    def add(self, pid: int) -> None:
        """Record the container whose main process (a session leader) is ``pid``."""
        st = read_stat(pid)
        if st is None:
            return  # already gone (and reaped): nothing to find later by its session
        record = Record(
            boot_id=self._boot_id,
            pid_ns=self._pid_ns,
            sid=pid,
            start=st.starttime,
            owner_pid=self._owner.pid,
            owner_start=self._owner.start,
        )
        path = self.dir / f"{pid}.{st.starttime}.json"
        tmp = path.with_name(path.name + ".tmp")
        try:
            tmp.write_bytes(msgspec.json.encode(record))
            os.replace(tmp, path)
        except OSError:
            return  # a full disk must not stop the container; the marker still finds strays
        self._paths[pid] = path

    def discard(self, pid: int) -> None:
        """Forget the container led by ``pid`` once nothing live is left in its session.

        Call it after the container's cleanup, which SIGKILLed its process group: members of
        the group still dying are waited for (briefly). A member that left the group was not
        killed; then the record stays, and whoever sweeps next ends it.
        """
        path = self._paths.get(pid)
        if path is None:
            return
        for attempt in range(2):
            members = [
                st
                for st in scan_stats().values()
                if st.session == pid and st.state not in _GONE_STATES
            ]
            if not members:
                break
            if attempt or any(st.pgrp != pid for st in members):
                return
            fds = [fd for st in members if (fd := _pidfd(st.pid, st.starttime)) is not None]
            try:
                _wait_gone(fds, DISCARD_WAIT)
            finally:
                for fd in fds:
                    if fd >= 0:
                        os.close(fd)
        del self._paths[pid]
        with contextlib.suppress(OSError):
            path.unlink()


def read_records(directory: Path) -> list[tuple[Path, Record | None]]:
    """Every record file in ``directory`` (None for one that cannot be read or parsed)."""
    out: list[tuple[Path, Record | None]] = []
    try:
        paths = sorted(directory.glob("*.json"))
    except OSError:
        return out
    for path in paths:
        try:
            out.append((path, msgspec.json.decode(path.read_bytes(), type=Record)))
        except (OSError, msgspec.DecodeError):
            out.append((path, None))
    return out


# --------------------------------------------------------------------------------------------
# Ending


class _Snapshot(NamedTuple):
    records: list[tuple[Path, Record | None]]
    stats: dict[int, ProcStat]
    markers: dict[int, str]


def _snapshot(records_dir: Path) -> _Snapshot:
    records = read_records(records_dir)
    stats = scan_stats()
    markers: dict[int, str] = {}
    for pid in stats:
        marker = read_marker(pid)
        if marker is not None:
            markers[pid] = marker
    return _Snapshot(records, stats, markers)


class _Ended(NamedTuple):
    pids: list[int]
    cmdlines: list[str]
    reasons: list[str]
    survivors: list[int]


def _end(sweep: Sweep, timeout: float) -> _Ended:
    """Kill the plan's processes and wait (up to ``timeout``) for them to be gone."""
    pids: list[int] = []
    cmdlines: list[str] = []
    reasons: list[str] = []
    fds: list[int] = []
    try:
        for pid, (start, why) in sorted(sweep.kill.items()):
            cmdline = describe_pid(pid)
            fd = _kill(pid, start)
            if fd is None:
                continue
            pids.append(pid)
            cmdlines.append(cmdline)
            reasons.append(why)
            fds.append(fd)
        _wait_gone(fds, timeout)
    finally:
        for fd in fds:
            if fd >= 0:
                os.close(fd)
    survivors = [
        pid for pid in pids if (st := read_stat(pid)) is not None and st.state not in _GONE_STATES
    ]
    return _Ended(pids, cmdlines, reasons, survivors)


async def end_leftovers(state_dir: Path, log: Logger, *, wait: float = KILL_WAIT) -> list[int]:
    """Kill what a dead supervisor on this root left running; returns the pids killed.

    Call it before any container starts (and after taking the root's lock, if any).
    """

    def sweep() -> _Ended:
        snap = _snapshot(state_dir / RECORDS_DIR)
        plan = plan_sweep(
            [r for _, r in snap.records if r is not None],
            snap.stats,
            snap.markers,
            root_id=root_id(state_dir),
            boot_id=boot_id(),
            pid_ns=pid_namespace(),
            me=os.getpid(),
        )
        ended = _end(plan, wait)
        settled = set(plan.settled)
        for path, record in snap.records:
            if record is None or record in settled:
                with contextlib.suppress(OSError):
                    path.unlink()
        return ended

    ended = await anyio.to_thread.run_sync(sweep)
    if ended.pids:
        log.warning(
            "leftover_killed",
            pids=ended.pids,
            cmdlines=ended.cmdlines,
            reasons=ended.reasons,
            why="left running by a supervisor on this root that did not exit cleanly",
        )
    if ended.survivors:
        log.error("leftover_survived", pids=ended.survivors, waited=wait)
    return ended.pids
