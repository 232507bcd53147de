"""Where things live on disk (docs/operations.md).

As a pod's entry point the Cortex paths are used as they are (``/cortex/spec/job.json``,
``/mnt``). Anywhere else -- a laptop, a CI job, a shell inside a dev container -- the default
root is ``./.supervisor`` so that nothing is written to ``/mnt`` by surprise; ``--root DIR``
or ``SUPERVISOR_ROOT`` relocates everything (``SUPERVISOR_ROOT=/`` in an image whose entry
point is wrapped by an init such as tini).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Layout", "default_root", "in_container"]

ROOT_ENV = "SUPERVISOR_ROOT"


def in_container() -> bool:
    """Are we a pod's entry point? PID 1 of a container, or any process of a Kubernetes pod.

    Merely running inside some container (``/.dockerenv``) is not enough: a shell in a dev
    container is a laptop for our purposes.
    """
    return os.getpid() == 1 or bool(os.environ.get("KUBERNETES_SERVICE_HOST"))


def default_root() -> Path:
    env = os.environ.get(ROOT_ENV)
    if env:
        return Path(env)
    return Path("/") if in_container() else Path(".supervisor")


@dataclass(frozen=True, slots=True)
class Layout:
    root: Path

    @classmethod
    def at(cls, root: str | os.PathLike[str] | None) -> Layout:
        return cls(Path(root).absolute() if root is not None else default_root().absolute())

    @property
    def cortex_dir(self) -> Path:
        return self.root / "cortex"

    @property
    def spec_path(self) -> Path:
        return self.cortex_dir / "spec" / "job.json"

    @property
    def cli_config_dir(self) -> Path:
        return self.cortex_dir / "client"

    @property
    def mnt_dir(self) -> Path:
        return self.root / "mnt"

    @property
    def state_dir(self) -> Path:
        """Supervisor-private state; under the Cortex tree so a container root stays tidy."""
        return self.cortex_dir / "supervisor"

    @property
    def lock_path(self) -> Path:
        """Held (flock) by the one supervisor working on this root."""
        return self.state_dir / "lock"

    @property
    def queue_path(self) -> Path:
        return self.state_dir / "queue.sqlite3"

    def prepare(self) -> None:
        for d in (self.spec_path.parent, self.mnt_dir, self.state_dir):
            d.mkdir(parents=True, exist_ok=True)
