"""One supervisor per root: claim the root's folders and hold its lock while working.

Two supervisors on one root would resume each other's live job and overwrite each other's
state, so :func:`claim_root` takes an exclusive ``flock`` on ``ROOT/cortex/supervisor/lock``
(the kernel drops it when the process dies, even by SIGKILL; the descriptor is close-on-exec,
so containers never hold it) and writes our pid into the file for the error a second
supervisor prints. Folders it cannot create or write are one sentence naming the path.

Bad input must leave nothing behind: :meth:`Claim.undo` removes the folders this claim
created, for a job file found bad only while enqueueing (an item over the batch limit), before
any container ran.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from supervisor.errors import BadInput
from supervisor.layout import Layout

__all__ = ["Claim", "RootError", "claim_root", "root_in_use"]


class RootError(BadInput):
    """The root cannot be used: unwritable, not a folder, or in use by another supervisor."""


def _cannot(path: Path, e: OSError) -> RootError:
    return RootError(f"cannot use {path} as the supervisor's root: {e.strerror or e}")


@dataclass(frozen=True, slots=True)
class Claim:
    created: list[Path]  # the folders this claim created

    def undo(self) -> None:
        """Remove the folders this claim created (deepest first), and what is in them."""
        _remove(self.created)


@contextlib.contextmanager
def claim_root(layout: Layout) -> Iterator[Claim]:
    """Create the root's folders, lock the root for this process, and yield."""
    wanted = [layout.root, layout.cortex_dir, layout.spec_path.parent, layout.mnt_dir]
    wanted.append(layout.state_dir)
    created = [d for d in wanted if not d.exists()]
    try:
        layout.prepare()
        fd = os.open(layout.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        _remove(created)
        raise _cannot(layout.root, e) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise RootError(
                f"root {layout.root} is in use by pid {holder} (one supervisor per root: "
                "wait for it to finish, stop it, or use another --root)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield Claim(created)
    finally:
        os.close(fd)  # the lock goes with the descriptor


def _remove(created: list[Path]) -> None:
    """Remove folders this claim created (deepest first; the root itself last)."""
    for d in sorted(created, key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            if d.exists():
                shutil.rmtree(d)


def root_in_use(layout: Layout) -> bool | None:
    """Does a supervisor hold the root's lock now? Asked without touching the lock (trying
    it would make a supervisor starting at that moment fail): the kernel's list of locks,
    ``/proc/locks``, is searched for the lock file. ``None`` when it cannot tell."""
    try:
        st = layout.lock_path.stat()
    except FileNotFoundError:
        return False
    except OSError:
        return None
    wanted = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    try:
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) < 6 or fields[1] != "FLOCK" or fields[3] != "WRITE":
            continue
        major, _, rest = fields[5].partition(":")
        minor, _, inode = rest.partition(":")
        with contextlib.suppress(ValueError):
            if (int(major, 16), int(minor, 16), int(inode)) == wanted:
                return True
    return False
