"""Driving the product: the worker programs, and ``supervisor run`` / ``proxy`` / ``serve``.

The supervisor runs on the load CPU; its container is the worker program wrapped in
``taskset -c 0`` (pinning is inherited, so without the wrapper the worker would share the
supervisor's CPU). Dispatch is timed from the supervisor's ``pod_ready`` log line to the
worker's ``job_complete`` stamp (``$BENCH_STAMPS``, written when ``/on-job-complete``
arrives), so neither the worker's start, the enqueueing nor the shutdown counts; without the
stamp, the ``job_finished`` log line ends the interval.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bench.procs import LOAD_CPU, WORKER_CPU, Procs, pinned, wait_port

WORKER_DIR = Path(__file__).resolve().parent / "workers"
WORKERS: dict[str, tuple[str, str]] = {
    "a": ("fast.py", "(a) asyncio+httptools+uvloop"),
    "b": ("asgi_raw.py", "(b) uvicorn+raw ASGI"),
    "c": ("fastapi_app.py", "(c) uvicorn+FastAPI"),
    "d": ("sleepy.py", "(d) sleeps 10 ms/batch"),
}


def worker_argv(key: str, port: int | str) -> list[str]:
    return [sys.executable, str(WORKER_DIR / WORKERS[key][0]), str(port)]


def start_worker(
    procs: Procs, key: str, port: int, timeout: float = 30.0
) -> subprocess.Popen[bytes]:
    """The worker alone, pinned to the worker CPU, once its port answers."""
    proc = procs.start(worker_argv(key, port), cpu=WORKER_CPU)
    wait_port(port, timeout, proc)
    return proc


def write_api(
    path: Path,
    worker: str,
    port: int,
    stamps: Path | None = None,
    *,
    probe: bool = True,
    gate: bool = False,
) -> Path:
    """A BatchAPI running ``worker`` on ``$(CORTEX_PORT)``, with a 1 s TCP readiness probe;
    ``gate``: the worker holds its batches until ``POST /bench-gate`` (``$BENCH_GATE``)."""
    container: dict[str, Any] = {
        "name": "worker",
        "command": pinned(worker_argv(worker, "$(CORTEX_PORT)"), WORKER_CPU),
    }
    if probe:
        container["readiness_probe"] = {"tcp_socket": {"port": port}, "period_seconds": 1}
    env = {"BENCH_STAMPS": str(stamps)} if stamps is not None else {}
    if gate:
        env["BENCH_GATE"] = "1"
    if env:
        container["env"] = env
    api = [{"name": "bench", "kind": "BatchAPI", "pod": {"port": port, "containers": [container]}}]
    path.write_text(yaml.safe_dump(api))
    return path


def read_stamps(path: Path) -> dict[str, float]:
    out: dict[str, float] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            what, _, ts = line.partition(" ")
            out.setdefault(what, float(ts))
    return out


def _log_lines(err: bytes) -> list[dict[str, Any]]:
    lines = []
    for raw in err.splitlines():
        try:
            record = json.loads(raw)
        except ValueError:
            continue
        if isinstance(record, dict):
            lines.append(record)
    return lines


def why(err: bytes) -> str:
    """One line saying why a run failed: the last error log line or plain stderr line."""
    text = err.decode(errors="replace").strip().splitlines()
    for raw in reversed(text):
        line = raw.strip().lstrip("|").strip()
        if not line.strip("+-"):
            continue  # exception-group decoration
        try:
            record = json.loads(line)
        except ValueError:
            return line[:160]
        if isinstance(record, dict) and record.get("level") == "error":
            return f"{record.get('event')}: {record.get('error', '')}"[:160]
    return "no output"


@dataclass(frozen=True)
class RunResult:
    batches: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.batches / self.seconds


def supervisor_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "supervisor", *args]


def run_job(
    procs: Procs,
    api: Path,
    job: Path,
    root: Path,
    stamps: Path,
    *,
    concurrency: int,
    timeout: float,
) -> RunResult:
    """``supervisor run`` to the end; batches/s from pod_ready to the worker's job_complete."""
    argv = supervisor_argv(
        "run",
        str(api),
        "--job",
        str(job),
        "--root",
        str(root),
        "--concurrency",
        str(concurrency),
        "--fresh",
    )
    stamps.unlink(missing_ok=True)
    code, out, err = procs.run(argv, cpu=LOAD_CPU, timeout=timeout)
    if code != 0:
        raise RuntimeError(f"supervisor run exited {code}: {why(err)}")
    status = json.loads(out)
    succeeded = int(status["metrics"]["succeeded"])
    events = _log_lines(err)
    ready = next((e["ts"] for e in events if e.get("event") == "pod_ready"), None)
    end = read_stamps(stamps).get("job_complete")
    if end is None:
        end = next((e["ts"] for e in events if e.get("event") == "job_finished"), None)
    if ready is None or end is None or end <= ready:
        raise RuntimeError("no pod_ready / job_finished log lines to time the dispatch with")
    return RunResult(batches=succeeded, seconds=float(end) - float(ready))


def wait_healthz(
    port: int, timeout: float, proc: subprocess.Popen[bytes], what: str = "supervisor proxy"
) -> float:
    """Poll ``GET /healthz`` until 200; returns the time.time() it did."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1.0)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                return time.time()
        except OSError:
            pass
        finally:
            conn.close()
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited {proc.returncode} before it was ready")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} was not ready within {timeout:g} s")
        time.sleep(0.02)


@contextmanager
def proxy(
    procs: Procs, api: Path, root: Path, port: int, *, timeout: float = 30.0
) -> Iterator[subprocess.Popen[bytes]]:
    """``supervisor proxy`` listening on ``port``, once ``/healthz`` says ready."""
    with _server(procs, "proxy", api, root, port, LOAD_CPU, timeout) as proc:
        yield proc


@contextmanager
def serve(
    procs: Procs, api: Path, root: Path, port: int, *, cpu: int, timeout: float = 30.0
) -> Iterator[subprocess.Popen[bytes]]:
    """``supervisor serve`` (the job API) on ``port``, pinned to ``cpu``, once ``/healthz``
    says ready. Its log is ``root/serve.log``."""
    with _server(procs, "serve", api, root, port, cpu, timeout) as proc:
        yield proc


@contextmanager
def _server(
    procs: Procs, command: str, api: Path, root: Path, port: int, cpu: int, timeout: float
) -> Iterator[subprocess.Popen[bytes]]:
    log = root / f"{command}.log"
    root.mkdir(parents=True, exist_ok=True)
    argv = supervisor_argv(command, str(api), "--listen", f"127.0.0.1:{port}", "--root", str(root))
    with log.open("wb") as f:
        proc = procs.start(argv, cpu=cpu, stdout=f, stderr=f)
    try:
        try:
            wait_healthz(port, timeout, proc, f"supervisor {command}")
        except (RuntimeError, TimeoutError) as e:
            procs.stop(proc)
            raise RuntimeError(f"{e}: {why(log.read_bytes())}") from None
        yield proc
    finally:
        procs.stop(proc)
