"""What the supervisor asks of the Linux kernel about processes; elsewhere each does nothing.

Theory of operation
-------------------
*OOM evidence.* Whether a container's SIGKILL came from the OOM killer is read from the
cgroup's ``oom_kill`` counter (v2 ``memory.events``, v1 ``memory.oom_control``; see
:func:`memory_events_path`), sampled when the container is spawned and again when it has
ended: the kill was the OOM killer's when the counter rose in between
(:func:`oom_evidence`). Children inherit our cgroup, so its counter covers them. The caller
makes sure a SIGKILL it sent itself never counts. Where no counter can be read there is no
evidence, and a SIGKILL is only a SIGKILL.

*Dying with the supervisor.* A container's main process must not outlive a supervisor that
dies without cleaning up (SIGKILL, the OOM killer) and keep holding ``pod.port``
(docs/container-contract.md, "How the command runs"). ``prctl(PR_SET_PDEATHSIG, SIGKILL)``
arranges that, but it must run in the child between fork and exec, and anyio has no preexec
hook. :func:`die_with_parent` therefore wraps the command in a tiny Python trampoline that
calls ``prctl``, checks that its parent is still us (we may have died before ``prctl`` took
effect), and execs the real command. Because the exec now happens in the trampoline, the
command is first checked here for what exec would report (not found, not executable, no such
working directory), so that a bad command still fails the spawn with ``OSError``.

*Child subreaper.* When a container's process double-forks and its parent exits, the
grandchild is reparented to the nearest *subreaper*: us, after :func:`become_subreaper`
(``PR_SET_CHILD_SUBREAPER``), or to us anyway when we are PID 1, as ``tini`` is. Collecting
such orphans once they exit is :mod:`supervisor.reaper`'s business.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = [
    "become_subreaper",
    "die_with_parent",
    "is_subreaper",
    "memory_events_path",
    "oom_evidence",
    "oom_kill_count",
]


# --------------------------------------------------------------------------------------------
# OOM evidence (cgroup counters)


_CGROUP_ROOT = Path("/sys/fs/cgroup")
_PROC_SELF_CGROUP = Path("/proc/self/cgroup")


def memory_events_path(
    proc_cgroup: Path = _PROC_SELF_CGROUP, cgroup_root: Path = _CGROUP_ROOT
) -> Path | None:
    """The file holding this process's cgroup ``oom_kill`` counter, or None if there is none.

    cgroup v2: ``<root>/<path>/memory.events``; v1: ``<root>/memory/<path>/memory.oom_control``.
    Inside a container the cgroup is usually mounted at the root itself, so the root's file is
    tried as well. Children inherit our cgroup, so its counter covers them.
    """
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    candidates: list[Path] = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        rel = path.strip().lstrip("/")
        if hierarchy == "0" and controllers == "":
            for root in (cgroup_root, cgroup_root / "unified"):
                if rel:
                    candidates.append(root / rel / "memory.events")
                candidates.append(root / "memory.events")
        elif "memory" in controllers.split(","):
            if rel:
                candidates.append(cgroup_root / "memory" / rel / "memory.oom_control")
            candidates.append(cgroup_root / "memory" / "memory.oom_control")
    candidates.append(cgroup_root / "memory.events")
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    return None


def oom_kill_count(path: Path | None) -> int | None:
    """The ``oom_kill N`` counter in a cgroup ``memory.events``/``memory.oom_control`` file."""
    if path is None:
        return None
    try:
        text = path.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill":
            try:
                return int(value.strip())
            except ValueError:
                return None
    return None


def oom_evidence(before: int | None, after: int | None) -> bool:
    """True when the OOM-kill counter rose; False when it did not or could not be read."""
    return before is not None and after is not None and after > before


# --------------------------------------------------------------------------------------------
# prctl: the child subreaper

PR_SET_CHILD_SUBREAPER = 36
PR_GET_CHILD_SUBREAPER = 37


def _prctl(option: int, arg2: int | ctypes.c_int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return False
    arg: object = ctypes.byref(arg2) if isinstance(arg2, ctypes.c_int) else ctypes.c_ulong(arg2)
    zero = ctypes.c_ulong(0)
    return bool(prctl(ctypes.c_int(option), arg, zero, zero, zero) == 0)


def become_subreaper(enable: bool = True) -> bool:
    """Make orphaned descendants reparent to this process (Linux ``PR_SET_CHILD_SUBREAPER``).

    Returns False where unsupported or refused. ``enable=False`` turns it off again.
    """
    return _prctl(PR_SET_CHILD_SUBREAPER, 1 if enable else 0)


def is_subreaper() -> bool:
    """Whether this process is currently a child subreaper (always True-ish as PID 1)."""
    value = ctypes.c_int(0)
    return _prctl(PR_GET_CHILD_SUBREAPER, value) and value.value != 0


# --------------------------------------------------------------------------------------------
# prctl: the PDEATHSIG trampoline

# Runs in the child: PR_SET_PDEATHSIG (1) with SIGKILL (9), then exec. Exit 137 (as if
# SIGKILLed) when the supervisor died before prctl took effect, 127 when exec fails.
_PDEATHSIG_SHIM = (
    "import ctypes,os,sys\n"
    "ctypes.CDLL(None).prctl(1,9)\n"  # PR_SET_PDEATHSIG, SIGKILL
    "if os.getppid()!=int(sys.argv[1]):os._exit(137)\n"  # we died before prctl took effect
    "try:os.execvp(sys.argv[2],sys.argv[2:])\n"
    "except OSError as e:sys.stderr.write(f'cannot start {sys.argv[2]!r}: {e.strerror}\\n');os._exit(127)\n"
)
_USE_SHIM = sys.platform.startswith("linux") and bool(sys.executable)


def _check_command(command: str, env: Mapping[str, str], cwd: Path | None) -> None:
    """Raise what exec would (FileNotFoundError/PermissionError), before the trampoline runs."""
    if cwd is not None and not Path(cwd).is_dir():
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(cwd))
    if "/" in command:
        path = Path(command) if os.path.isabs(command) else (cwd or Path.cwd()) / command
        if not path.exists():
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), command)
        if path.is_dir() or not os.access(path, os.X_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), command)
    elif shutil.which(command, path=env.get("PATH", os.defpath)) is None:
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), command)


def die_with_parent(argv: Sequence[str], env: Mapping[str, str], cwd: Path | None) -> list[str]:
    """The command line that runs ``argv`` so that it gets SIGKILL when this process dies.

    On Linux that is ``argv`` behind the ``PR_SET_PDEATHSIG`` trampoline, after checking
    ``argv[0]`` (found in ``env``'s ``PATH``, executable) and ``cwd`` the way exec would:
    raises :class:`FileNotFoundError` or :class:`PermissionError` as exec would. Elsewhere,
    ``argv`` as it is.
    """
    command = list(argv)
    if not _USE_SHIM:
        return command
    _check_command(command[0], env, cwd)
    return [sys.executable, "-I", "-S", "-c", _PDEATHSIG_SHIM, str(os.getpid()), *command]
