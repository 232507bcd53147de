"""Shared helpers for tests that drive the real `supervisor` command."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import yaml

TESTS = Path(__file__).parent
REPO = TESTS.parent
RECORDER = TESTS / "workers" / "recorder.py"


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_ports(n: int = 1) -> int:
    """A base port such that base..base+n-1 are free right now, BELOW the kernel's range for
    outgoing connections: a port in that range can be taken by any connection's local end
    (a client of Redis, of a container) between now and the moment a container binds it.
    The kernel still picks (bind port 0, then shifted below the range), so two tests rarely
    guess the same block; the block is checked after it. A pod's port is written into its
    API file before anything listens, hence a number and not a bound socket."""
    low, _high = _ephemeral_range()
    span = low - 1024 - n  # the ports 1024..low-1 that can hold the block
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            picked: int = s.getsockname()[1]
        base = 1024 + picked % span if span > 0 else picked
        if base + n - 1 <= 65535 and all(port_is_free(base + i) for i in range(n)):
            return base
    raise RuntimeError("no free port block found")


def recorder_container(name: str = "api", **env: str) -> dict[str, Any]:
    return {
        "name": name,
        "command": [sys.executable, "-u", str(RECORDER)],
        "env": env,
    }


def write_api(
    path: Path,
    containers: list[dict[str, Any]],
    *,
    port: int,
    name: str = "test-api",
) -> Path:
    api = [{"name": name, "kind": "BatchAPI", "pod": {"port": port, "containers": containers}}]
    path.write_text(yaml.safe_dump(api))
    return path


def write_job(path: Path, job: dict[str, Any] | bytes) -> Path:
    path.write_bytes(job if isinstance(job, bytes) else json.dumps(job).encode())
    return path


def supervisor_cmd(*args: str, backend: str = "asyncio") -> list[str]:
    return [sys.executable, "-m", "supervisor", "--backend", backend, *args]


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_supervisor(
    *args: str, backend: str = "asyncio", timeout: float = 60, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        supervisor_cmd(*args, backend=backend),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=child_env(),
        cwd=cwd,
        stdin=subprocess.DEVNULL,
    )


def log_events(log: Path, name: str) -> list[dict[str, Any]]:
    """The JSON log lines of event ``name`` in ``log``, complete lines only (a last line
    without its newline is still being written)."""
    out = []
    for line in log.read_text().split("\n")[:-1]:
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("event") == name:
                out.append(record)
    return out


def read_records(record_dir: Path) -> list[dict[str, Any]]:
    """Every complete record the recording workers wrote (a line still being written, with
    no newline yet, is left for the next read)."""
    out: list[dict[str, Any]] = []
    for f in sorted(record_dir.glob("requests-*.ndjson")):
        complete = f.read_text().rpartition("\n")[0]
        out.extend(json.loads(line) for line in complete.splitlines() if line)
    out.sort(key=lambda r: r["t"])  # in the order the workers answered, across pods
    return out


def header(entry: dict[str, Any], name: str) -> str | None:
    for k, v in entry["headers"]:
        if k.lower() == name.lower():
            return str(v)
    return None


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def mutate(wire: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    """``wire`` with each ``(position, byte, kind)`` edit applied: kind 0 inserts ``byte``,
    1 replaces the byte there, 2 deletes it (positions wrap around the current length)."""
    data = bytearray(wire)
    for position, byte, kind in edits:
        index = position % (len(data) + 1)
        if kind == 0:
            data.insert(index, byte)
        elif kind == 1 and index < len(data):
            data[index] = byte
        elif index < len(data):
            del data[index]
    return bytes(data)


async def serve_raw(
    listener: anyio.abc.SocketListener, handle: Callable[[socket.socket], Awaitable[None]]
) -> None:
    """Accept on ``listener``'s own socket and run ``handle`` on each (non-blocking) connection.

    For test servers that must do several things on a socket with no checkpoint in between.
    """
    lsock = listener.extra(anyio.abc.SocketAttribute.raw_socket)
    async with anyio.create_task_group() as tg:
        while True:
            await anyio.wait_readable(lsock)
            try:
                sock, _ = lsock.accept()
            except BlockingIOError:
                continue
            sock.setblocking(False)
            tg.start_soon(handle, sock)


async def read_raw_request(sock: socket.socket) -> tuple[bytes, dict[bytes, bytes], bytes] | None:
    """One whole request from a non-blocking socket: its head (without the blank line), its
    fields (lowercased names) and its ``Content-Length`` body; ``None`` if the peer closed."""
    buf = b""
    while True:
        await anyio.wait_readable(sock)
        data = sock.recv(65536)
        if not data:
            return None
        buf += data
        head, blank, body = buf.partition(b"\r\n\r\n")
        if not blank:
            continue
        fields: dict[bytes, bytes] = {}
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            fields[name.strip().lower()] = value.strip()
        if len(body) >= int(fields.get(b"content-length", b"0")):
            return head, fields, body


# -- driving `supervisor run` ------------------------------------------------------------

HEALTHZ_PROBE = {"http_get": {"port": 0, "path": "/healthz"}, "period_seconds": 1}


def probe_on(port: int) -> dict[str, Any]:
    return {**HEALTHZ_PROBE, "http_get": {"port": port, "path": "/healthz"}}


def recorder_api(tmp_path: Path, **env: str) -> tuple[Path, Path, int]:
    """An API of one recording worker gated by /healthz: (api file, record dir, pod.port)."""
    port = free_ports()
    rec = tmp_path / "rec"
    rec.mkdir()
    container = {
        **recorder_container(RECORD_DIR=str(rec), **env),
        "readiness_probe": probe_on(port),
    }
    return write_api(tmp_path / "api.yaml", [container], port=port), rec, port


def batches_of(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r["path"] == "/"]


def raw_job(items: list[bytes], batch_size: int, extra: bytes = b"") -> bytes:
    return (
        b'{"workers": 1, '
        + extra
        + b'"item_list": {"batch_size": %d, "items": [' % batch_size
        + b", ".join(items)
        + b']}, "config": {"k": "v"}}'
    )


def start_supervisor(args: list[str], backend: str = "asyncio") -> subprocess.Popen[str]:
    return subprocess.Popen(
        supervisor_cmd(*args, backend=backend),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(),
        start_new_session=True,
        stdin=subprocess.DEVNULL,
    )


def wait_for_batches(rec: Path, n: int, proc: subprocess.Popen[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while len(batches_of(read_records(rec))) < n:
        if proc.poll() is not None:
            raise AssertionError(f"supervisor exited early: {proc.communicate()[1]}")
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for batches")
        time.sleep(0.05)


class FakePod:
    """The part of a Pod that dispatch uses; the tests flip it."""

    def __init__(self, port: int, *, serving: bool = True) -> None:
        self.port = port
        self.generation = 0
        self._serving = serving
        self._changed = anyio.Event()

    @property
    def serving(self) -> bool:
        return self._serving

    def set_serving(self, value: bool) -> None:
        self._serving = value
        self._changed.set()
        self._changed = anyio.Event()

    async def wait_serving(self, value: bool = True) -> None:
        while self._serving != value:
            await self._changed.wait()

    def owner_stderr_tail(self, limit: int = 2048) -> str:
        return "worker said: boom\n"


def server_sockets(port: int, pid: int | str = "self") -> int:
    """How many connections process ``pid`` holds open on its side of local port ``port``
    (accepted sockets, the listener aside), from ``/proc``: no private attribute needed."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if int(local.rsplit(":", 1)[1], 16) == port and state != "0A" and inode in inodes:
                    count += 1
    return count
