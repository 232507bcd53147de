from __future__ import annotations

from pathlib import Path

import pytest

from supervisor.layout import Layout, default_root


def test_default_root_outside_a_pod_is_local(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SUPERVISOR_ROOT", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert default_root() == Path(".supervisor")  # never the host's /mnt by surprise


def test_in_a_kubernetes_pod_the_cortex_paths_are_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SUPERVISOR_ROOT", raising=False)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    layout = Layout.at(None)
    assert layout.spec_path == Path("/cortex/spec/job.json")
    assert layout.mnt_dir == Path("/mnt")


def test_env_and_flag_relocate_everything(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SUPERVISOR_ROOT", str(tmp_path / "env"))
    assert Layout.at(None).mnt_dir == tmp_path / "env" / "mnt"
    layout = Layout.at(tmp_path / "flag")
    assert layout.spec_path == tmp_path / "flag" / "cortex" / "spec" / "job.json"
    layout.prepare()
    assert layout.mnt_dir.is_dir() and layout.spec_path.parent.is_dir()
