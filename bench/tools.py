"""What the bench needs, installed when missing; and a description of the machine.

wrk comes from Debian's packages (``apt-get install -y wrk``, as root), the Python pieces from
the ``bench`` extra (``pip install -e '.[bench]'``). Nothing is installed when it is there
already, or with ``--no-install``; what stays missing is reported, and the figures that need it
read ``n/a (error: ...)``.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Iterable

from bench.nginx import nginx_path
from bench.procs import PINNING, REPO

NEEDS: dict[str, set[str]] = {
    "dispatch": {"wrk", "uvloop", "httptools", "uvicorn", "fastapi", "aiohttp", "h11"},
    "proxy": {"wrk", "nginx", "uvloop", "httptools"},
    "split": set(),
    "footprint": {"uvloop", "httptools"},
    "serve": {"wrk", "uvloop", "httptools"},
    "redis": {"redis-server", "uvloop", "httptools"},
}
PYTHON = {"uvloop", "httptools", "uvicorn", "fastapi", "aiohttp", "h11", "matplotlib"}


def _missing(names: Iterable[str]) -> set[str]:
    out = set()
    for name in names:
        if name == "wrk":
            found = shutil.which("wrk") is not None
        elif name == "nginx":
            found = nginx_path() is not None
        elif name == "redis-server":
            found = shutil.which("redis-server") is not None
        else:
            found = importlib.util.find_spec(name) is not None
        if not found:
            out.add(name)
    return out


def _say(text: str) -> None:
    sys.stderr.write(f"[bench] {text}\n")


def _try(argv: list[str], timeout: float) -> bool:
    _say("installing: " + " ".join(argv))
    try:
        done = subprocess.run(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=timeout, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        _say(f"  failed: {e}")
        return False
    if done.returncode != 0:
        _say("  failed: " + done.stderr.decode(errors="replace").strip()[-200:])
    return done.returncode == 0


def ensure(names: set[str], *, install: bool) -> dict[str, str]:
    """Installs what is missing (if allowed); returns {name: why it is unavailable}."""
    missing = _missing(names)
    if install and missing & PYTHON:
        _try([sys.executable, "-m", "pip", "install", "-q", "-e", f"{REPO}[bench]"], 900)
        importlib.invalidate_caches()
    if install and "wrk" in missing and shutil.which("apt-get") and os.geteuid() == 0:
        env_ok = _try(["apt-get", "install", "-y", "-q", "wrk"], 600)
        if not env_ok and _try(["apt-get", "update", "-q"], 600):
            _try(["apt-get", "install", "-y", "-q", "wrk"], 600)
    hints = {
        "wrk": "wrk is not installed (apt-get install -y wrk)",
        "nginx": "nginx is not installed (apt-get install -y nginx-light)",
        "redis-server": "redis-server is not installed (apt-get install -y redis-server)",
    }
    return {
        name: hints.get(name, f"{name} is not installed (pip install -e '.[bench]')")
        for name in _missing(names)
    }


def machine() -> list[str]:
    model = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import uvloop  # noqa: F401

        loop = "uvloop installed"
    except ImportError:
        loop = "no uvloop"
    pin = (
        "workers pinned to CPU 0, load (wrk, peers, supervisor, nginx) to CPU 1 (taskset)"
        if PINNING
        else "NOT pinned (no taskset or < 2 CPUs): figures are noisier"
    )
    return [
        f"machine: {os.cpu_count()} CPU(s), {model}, Linux {platform.release()}, "
        f"Python {platform.python_version()} ({loop})",
        f"pinning: {pin}",
    ]
