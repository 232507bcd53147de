"""Where things live on disk (SPEC §2 Roots).

Inside a container the Cortex paths are used as they are (``/cortex/spec/job.json``,
``/mnt``). Anywhere else the default root is ``./.supervisor`` so that nothing is written to a
host's ``/mnt`` by surprise; ``--root DIR`` or ``SUPERVISOR_ROOT`` relocates everything.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Layout", "default_root", "in_container"]

ROOT_ENV = "SUPERVISOR_ROOT"


def in_container() -> bool:
    """Best-effort: are we a container's process (Docker, Kubernetes, Podman)?"""
    if os.environ.get("KUBERNETES_SERVICE_HOST") or Path("/.dockerenv").exists():
        return True
    return Path("/run/.containerenv").exists()


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
    def queue_path(self) -> Path:
        return self.state_dir / "queue.sqlite3"

    def prepare(self) -> None:
        for d in (self.spec_path.parent, self.mnt_dir, self.state_dir):
            d.mkdir(parents=True, exist_ok=True)
