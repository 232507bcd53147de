"""`supervisor run` against the faults users meet: pods that never get ready, signals at odd
moments, a second run on the same root, a re-run after the end, pods that cannot start,
unusable roots, bad input that must leave nothing behind. Real processes, real sockets."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import (
    batches_of,
    child_env,
    free_ports,
    pid_alive,
    probe_on,
    raw_job,
    read_records,
    recorder_api,
    recorder_container,
    run_supervisor,
    start_supervisor,
    supervisor_cmd,
    wait_for_batches,
    write_api,
    write_job,
)

ITEMS = [json.dumps({"i": i}).encode() for i in range(20)]


def jobs_in(root: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(root / "cortex" / "supervisor" / "queue.sqlite3") as conn:
        return list(conn.execute("select job_id, status from jobs order by job_id"))


def start_logged(args: list[str], log: Path, backend: str = "asyncio") -> subprocess.Popen[str]:
    """Start the command with stderr in a file that the test can read while it runs."""
    with log.open("w") as err:
        return subprocess.Popen(
            supervisor_cmd(*args, backend=backend),
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=child_env(),
            start_new_session=True,
            stdin=subprocess.DEVNULL,
        )


def wait_for_log(log: Path, event: str, proc: subprocess.Popen[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while f'"event":"{event}"' not in log.read_text():
        if proc.poll() is not None:
            raise AssertionError(f"exited early: {log.read_text()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {event} within {timeout}s: {log.read_text()}")
        time.sleep(0.05)


def finish(proc: subprocess.Popen[str], timeout: float = 60) -> str:
    """Wait (bounded) for the command; whatever happens, nothing it started survives."""
    try:
        out, _ = proc.communicate(timeout=timeout)
        return out
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


# -- the job timeout when no pod ever serves ---------------------------------------------


def never_ready_api(tmp_path: Path, how: str, rec: Path) -> Path:
    port = free_ports()
    if how == "never binds":
        container: dict[str, Any] = {
            "name": "api",
            "command": [sys.executable, "-c", "import time; time.sleep(3600)"],
        }
    elif how == "healthz 503":
        container = {
            **recorder_container(RECORD_DIR=str(rec), NOT_READY_SECONDS="3600"),
            "readiness_probe": probe_on(port),
        }
    else:  # the HTTP probe takes longer than its timeout_seconds
        container = {
            **recorder_container(RECORD_DIR=str(rec), HEALTHZ_DELAY="3"),
            "readiness_probe": {**probe_on(port), "timeout_seconds": 1},
        }
    return write_api(tmp_path / "api.yaml", [container], port=port)


@pytest.mark.parametrize("how", ["never binds", "healthz 503", "probe too slow"])
def test_timeout_ends_a_job_no_pod_serves(tmp_path: Path, how: str, backend: str) -> None:
    rec = tmp_path / "rec"
    rec.mkdir()
    api = never_ready_api(tmp_path, how, rec)
    job = write_job(tmp_path / "job.json", raw_job(ITEMS, 1, b'"timeout": 3, '))
    root = tmp_path / "root"
    # The default grace is 30 s: nothing is in flight, so it must not be waited for.
    r = run_supervisor("run", str(api), "--job", str(job), "--root", str(root), backend=backend)
    assert r.returncode == 1, r.stderr
    status = json.loads(r.stdout)
    assert status["job_status"]["status"] == "timed_out"
    assert status["metrics"]["succeeded"] == 0
    assert not read_records(rec)  # no batch, no /on-job-complete
    assert jobs_in(root)[0][1] == "timed_out"
    assert '"waiting"' in r.stderr  # the progress lines said why nothing happened
    if how == "healthz 503":
        assert "HTTP 503" in r.stderr
    elif how == "never binds":
        assert "refused" in r.stderr


# -- signals -------------------------------------------------------------------------------


def test_signal_before_ready_stops_at_once(tmp_path: Path, backend: str) -> None:
    rec = tmp_path / "rec"
    rec.mkdir()
    api = never_ready_api(tmp_path, "healthz 503", rec)
    job = write_job(tmp_path / "job.json", raw_job(ITEMS, 1))
    root = tmp_path / "root"
    log = tmp_path / "err.log"
    args = ["run", str(api), "--job", str(job), "--root", str(root), "--grace", "600"]
    proc = start_logged(args, log, backend)
    wait_for_log(log, "container_started", proc)
    proc.send_signal(signal.SIGINT)
    out = finish(proc, timeout=60)  # far below the 600 s grace
    assert proc.returncode == 128 + signal.SIGINT, log.read_text()
    assert json.loads(out)["job_status"]["status"] == "stopped"
    assert "the containers to exit" in log.read_text()
    assert jobs_in(root)[0][1] == "running"  # a signal leaves the job resumable


def test_second_signal_stops_now(tmp_path: Path, backend: str) -> None:
    """A container that ignores SIGTERM would hold the stop for the whole grace period; a
    second Ctrl-C kills it at once."""
    port = free_ports()
    pidfile = tmp_path / "pid"
    code = (
        "import os, signal, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        f"open({str(pidfile)!r}, 'w').write(str(os.getpid()))\n"
        "time.sleep(3600)\n"
    )
    api = write_api(
        tmp_path / "api.yaml",
        [{"name": "stubborn", "command": [sys.executable, "-c", code]}],
        port=port,
    )
    job = write_job(tmp_path / "job.json", raw_job(ITEMS, 1))
    log = tmp_path / "err.log"
    args = ["run", str(api), "--job", str(job), "--root", str(tmp_path / "root")]
    proc = start_logged([*args, "--grace", "600"], log, backend)
    wait_for_log(log, "container_started", proc)
    deadline = time.monotonic() + 30
    while not pidfile.exists() or not pidfile.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    wait_for_log(log, "signal", proc)
    assert proc.poll() is None  # waiting for the stubborn container
    proc.send_signal(signal.SIGINT)
    finish(proc, timeout=60)
    assert proc.returncode == 128 + signal.SIGINT, log.read_text()
    assert "stop now" in log.read_text()
    assert not pid_alive(int(pidfile.read_text()))


# -- one supervisor per root ---------------------------------------------------------------


def test_second_run_on_the_same_root_exits_2(tmp_path: Path) -> None:
    api, rec, _port = recorder_api(tmp_path, SLEEP_PER_BATCH="0.05")
    job = write_job(tmp_path / "job.json", raw_job(ITEMS, 1))
    root = tmp_path / "root"
    args = ["run", str(api), "--job", str(job), "--root", str(root)]
    first = start_supervisor(args)
    try:
        wait_for_batches(rec, 2, first)
        second = run_supervisor(*args)
        assert second.returncode == 2, second.stderr
        assert second.stdout == ""
        assert f"root {root} is in use by pid {first.pid}" in second.stderr
        assert "Traceback" not in second.stderr
        out = finish(first)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.communicate()
    assert first.returncode == 0
    status = json.loads(out)["job_status"]
    assert status["status"] == "succeeded"
    ok = [json.loads(b["body"])[0]["i"] for b in batches_of(read_records(rec))]
    assert sorted(ok) == list(range(20))  # each once: the second run sent nothing


# -- the same command after the job ended ----------------------------------------------------


def test_rerun_after_the_end_reports_and_sends_nothing(tmp_path: Path, backend: str) -> None:
    api, rec, _port = recorder_api(tmp_path, FAIL_ITEMS=json.dumps([{"i": 3}]))
    job = write_job(tmp_path / "job.json", raw_job(ITEMS, 1))
    root = tmp_path / "root"
    args = ["run", str(api), "--job", str(job), "--root", str(root)]
    first = run_supervisor(*args, backend=backend)
    assert first.returncode == 1, first.stderr  # one batch fails: completed_with_failures
    before = len(read_records(rec))
    (letter,) = (root / "cortex" / "supervisor" / "dead-letters").glob("*/batch-3.json")
    # the worker logged its reason just before answering 500: the tail holds it, no sleep
    assert "failing batch with 500" in json.loads(letter.read_text())["attempts"][0]["stderr_tail"]
    again = run_supervisor(*args, backend=backend)
    assert again.returncode == 1, again.stderr
    assert len(read_records(rec)) == before  # nothing sent: no batch, no /on-job-complete
    a, b = json.loads(first.stdout), json.loads(again.stdout)
    assert a == b  # the same final status, worker_counts included
    assert b["job_status"]["status"] == "completed_with_failures"
    assert b["job_status"]["worker_counts"] == {"succeeded": 1}
    assert "job_already_ended" in again.stderr
    assert "container_started" not in again.stderr

    fresh = run_supervisor(*args, "--fresh", backend=backend)
    assert fresh.returncode == 1
    assert json.loads(fresh.stdout)["job_status"]["job_id"] != a["job_status"]["job_id"]
    assert len(batches_of(read_records(rec))) == 2 * len(ITEMS)


# -- what worker_counts says about a pod that failed ---------------------------------------


@pytest.mark.parametrize("when", ["mid-job", "at start-up"])
def test_a_crashed_pod_counts_as_failed(tmp_path: Path, when: str) -> None:
    if when == "mid-job":
        api, _rec, _port = recorder_api(tmp_path, CRASH_AFTER="3")
    else:
        api = write_api(
            tmp_path / "api.yaml",
            [{"name": "api", "command": [sys.executable, "-c", "raise SystemExit(3)"]}],
            port=free_ports(),
        )
    job = write_job(tmp_path / "job.json", raw_job(ITEMS, 1))
    r = run_supervisor("run", str(api), "--job", str(job), "--root", str(tmp_path / "root"))
    assert r.returncode == 1, r.stderr
    status = json.loads(r.stdout)["job_status"]
    assert status["status"] == "worker_error"
    assert status["worker_counts"] == {"failed": 1}


# -- pods that cannot start: not the job's end ---------------------------------------------


def test_a_command_not_found_leaves_the_job_resumable(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    rec = tmp_path / "rec"
    rec.mkdir()
    port = free_ports()
    api = write_api(
        tmp_path / "api.yaml",
        [
            {
                "name": "api",
                "command": ["my-worker"],
                "env": {"RECORD_DIR": str(rec)},
                "readiness_probe": probe_on(port),
            }
        ],
        port=port,
    )
    job = write_job(tmp_path / "job.json", raw_job(ITEMS, 1))
    root = tmp_path / "root"
    args = ["run", str(api), "--job", str(job), "--root", str(root)]
    env = child_env()
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            supervisor_cmd(*args), capture_output=True, text=True, env=env, timeout=60
        )

    r = run()
    assert r.returncode == 1, r.stderr
    assert r.stdout == ""  # the job has no final status
    assert "command `my-worker` not found" in r.stderr
    assert "run the same command again" in r.stderr
    ((job_id, state),) = jobs_in(root)
    assert state == "running"  # not an end state

    tool = bin_dir / "my-worker"  # the missing tool is installed: the same job goes on
    tool.write_text(
        f"#!/bin/sh\nexec {sys.executable} -u {Path(__file__).parent}/workers/recorder.py\n"
    )
    tool.chmod(0o755)
    r = run()
    assert r.returncode == 0, r.stderr
    status = json.loads(r.stdout)["job_status"]
    assert (status["job_id"], status["status"]) == (job_id, "succeeded")


def test_a_port_held_by_a_stranger_is_named_before_anything_starts(tmp_path: Path) -> None:
    api, rec, port = recorder_api(tmp_path)
    job = write_job(tmp_path / "job.json", raw_job(ITEMS, 1))
    root = tmp_path / "root"
    args = ["run", str(api), "--job", str(job), "--root", str(root)]
    with socket.socket() as stranger:
        stranger.bind(("127.0.0.1", port))
        stranger.listen()
        r = run_supervisor(*args)
    assert r.returncode == 1, r.stderr
    assert f"port {port} is held by pid {os.getpid()}" in r.stderr
    assert "container_started" not in r.stderr
    assert not read_records(rec)
    r = run_supervisor(*args)  # the stranger is gone
    assert r.returncode == 0, r.stderr


# -- roots that cannot be used -------------------------------------------------------------


def test_a_root_that_is_a_file_is_one_sentence(tmp_path: Path) -> None:
    api, _rec, _port = recorder_api(tmp_path)
    job = write_job(tmp_path / "job.json", raw_job(ITEMS, 1))
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    for root in (not_a_dir, not_a_dir / "below"):
        r = run_supervisor("run", str(api), "--job", str(job), "--root", str(root))
        assert r.returncode == 2, r.stderr
        assert "Traceback" not in r.stderr
        assert r.stderr.startswith("supervisor: cannot use"), r.stderr
        assert str(root) in r.stderr and "Not a directory" in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1


def test_a_read_only_root_is_one_sentence(tmp_path: Path) -> None:
    api, _rec, _port = recorder_api(tmp_path)
    job = write_job(tmp_path / "job.json", raw_job(ITEMS, 1))
    root = tmp_path / "ro"
    root.mkdir()
    if os.geteuid() == 0:  # root ignores permissions: make it a read-only mount
        made = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(root)],
            capture_output=True,
            check=False,
        )
        if made.returncode != 0:
            pytest.skip(f"cannot mount a read-only tmpfs here: {made.stderr.decode().strip()}")
    else:
        root.chmod(0o500)
    try:
        r = run_supervisor("run", str(api), "--job", str(job), "--root", str(root))
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(root)], check=False)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert f"cannot use {root} as the supervisor's root" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


# -- bad input leaves nothing behind -------------------------------------------------------


def test_bad_input_creates_nothing(tmp_path: Path) -> None:
    api, _rec, _port = recorder_api(tmp_path)
    root = tmp_path / "root"
    missing = write_job(
        tmp_path / "missing.json",
        {"workers": 1, "delimited_files": {"s3_paths": [str(tmp_path / "nope")], "batch_size": 1}},
    )
    r = run_supervisor("run", str(api), "--job", str(missing), "--root", str(root))
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith(f"supervisor: {missing}: "), r.stderr
    assert not root.exists()

    # An item over the batch limit is only found while enqueueing: still nothing behind.
    big = [b'"' + b"x" * 2000 + b'"']
    too_big = write_job(tmp_path / "big.json", raw_job([*ITEMS, *big], 1))
    r = run_supervisor(
        "run", str(api), "--job", str(too_big), "--root", str(root), "--max-batch-bytes", "1000"
    )
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith(f"supervisor: {too_big}: "), r.stderr
    assert not root.exists()


# -- what a container sees -----------------------------------------------------------------


@pytest.mark.parametrize("level", [None, "debug"])
def test_container_environment(tmp_path: Path, level: str | None) -> None:
    env_file = tmp_path / "env.json"
    api, _rec, port = recorder_api(tmp_path, ENV_FILE=str(env_file))
    job = write_job(tmp_path / "job.json", raw_job(ITEMS, 5))
    root = tmp_path / "root"
    env = child_env()
    env.pop("CORTEX_LOG_LEVEL", None)
    if level is not None:
        env["CORTEX_LOG_LEVEL"] = level
    r = subprocess.run(
        supervisor_cmd("run", str(api), "--job", str(job), "--root", str(root)),
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    job_id = json.loads(r.stdout)["job_status"]["job_id"]
    seen = json.loads(env_file.read_text())
    assert seen["CORTEX_LOG_LEVEL"] == (level or "info")
    assert seen["CORTEX_PORT"] == str(port)
    assert seen["CORTEX_JOB_ID"] == job_id
    assert seen["CORTEX_API_NAME"] == "test-api"
    assert seen["CORTEX_VERSION"]
    assert seen["CORTEX_SPEC_PATH"] == str(root / "cortex" / "spec" / "job.json")
    assert seen["CORTEX_MNT_DIR"] == str(root / "mnt")


def test_admin_endpoints_while_running(tmp_path: Path) -> None:
    """`run --admin HOST:PORT`: /healthz, /status and /metrics while the job runs."""
    import requests
    from prometheus_client.parser import text_string_to_metric_families

    api, rec, port = recorder_api(tmp_path, SLEEP_PER_BATCH="0.05")
    job = write_job(tmp_path / "job.json", raw_job(ITEMS, 1))
    log = tmp_path / "err.log"
    args = ["run", str(api), "--job", str(job), "--root", str(tmp_path / "root")]
    proc = start_logged([*args, "--admin", "127.0.0.1:0"], log)
    try:
        wait_for_log(log, "admin_listening", proc)
        admin_port = next(
            json.loads(line)["port"]
            for line in log.read_text().split("\n")[:-1]  # complete lines only
            if '"admin_listening"' in line
        )
        wait_for_batches(rec, 3, proc)
        base = f"http://127.0.0.1:{admin_port}"
        assert requests.get(f"{base}/healthz", timeout=10).status_code == 200
        status = requests.get(f"{base}/status", timeout=10).json()
        assert status["pods"][0]["port"] == port
        assert status["pods"][0]["state"] == "ready"
        assert status["progress"]["total"] == len(ITEMS)
        families = {
            m.name: m
            for m in text_string_to_metric_families(
                requests.get(f"{base}/metrics", timeout=10).text
            )
        }
        done = [
            s.value for s in families["cortex_batch_succeeded"].samples if s.name.endswith("_total")
        ]
        assert done and done[0] >= 1
        assert any(s.value == 1 for s in families["supervisor_container_ready"].samples)
        out = finish(proc)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 0
    assert json.loads(out)["job_status"]["status"] == "succeeded"
