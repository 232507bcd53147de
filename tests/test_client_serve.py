"""The client and the client commands against a real `supervisor serve` subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.client import Client, ClientError
from supervisor.jobs import JobStatusResponse
from tests.helpers import recorder_api, run_supervisor, start_supervisor

ITEMS = [{"i": i} for i in range(6)]
JOB = {
    "workers": 1,
    "item_list": {"items": ITEMS, "batch_size": 1},
    "sqs_dead_letter_queue": {"arn": "local", "max_receive_count": 2},
}


class Server:
    def __init__(self, proc: subprocess.Popen[str], url: str) -> None:
        self.proc = proc
        self.url = url


def start_serve(tmp_path: Path, *extra: str, **env: str) -> Iterator[Server]:
    api, _rec, _port = recorder_api(tmp_path, FAIL_ITEMS='[{"i": 3}]', **env)
    proc = start_supervisor(
        ["serve", str(api), "--listen", "127.0.0.1:0", "--root", str(tmp_path / "root"), *extra]
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 30
        port = None
        while port is None:  # serve logs `listening` with the port it bound
            line = proc.stdout.readline()
            assert line, f"serve exited: {proc.communicate(timeout=30)[1]}"
            event = json.loads(line)
            if event.get("event") == "listening":
                port = event["port"]
            assert time.monotonic() < deadline
        yield Server(proc, f"http://127.0.0.1:{port}")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate(timeout=30)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    yield from start_serve(tmp_path)


def test_submit_get_list_wait_dead_letters_retry(server: Server) -> None:
    with Client(server.url) as client:
        assert client.dry_run("test-api", JOB).splitlines()[-1] == "validations passed"
        spec = client.submit("test-api", JOB)
        assert spec.api_name == "test-api" and spec.workers == 1
        seen: list[JobStatusResponse] = []
        final = client.wait("test-api", spec.job_id, poll=0.1, timeout=60, on_status=seen.append)
        assert seen[-1] is final
        assert final.job_status.status == "completed_with_failures"
        assert (final.metrics.succeeded, final.metrics.failed) == (5, 2)
        assert client.get("test-api", spec.job_id).job_status.end_time is not None
        assert [s.job_id for s in client.list("test-api")] == [spec.job_id]

        (letter,) = client.dead_letters("test-api", spec.job_id)
        assert json.loads(bytes(letter.body)) == [{"i": 3}]
        assert [a.status for a in letter.attempts] == [500, 500]

        retry = client.retry_dead_letters("test-api", spec.job_id)
        assert retry.job_id != spec.job_id and retry.total_batch_count == 1
        assert client.wait("test-api", retry.job_id, poll=0.1, timeout=60).metrics.failed == 2
        assert [s.job_id for s in client.list("test-api")] == [retry.job_id, spec.job_id]

        with pytest.raises(ClientError) as info:
            client.stop("test-api", spec.job_id)  # already ended
        assert info.value.status == 400 and info.value.bad_input
        with pytest.raises(ClientError) as info:
            client.get("no-such-api", spec.job_id)
        assert info.value.status == 404 and "no-such-api" in info.value.message
        with pytest.raises(ClientError) as info:
            client.submit("test-api", b'{"workers": 0}')
        assert info.value.status == 400 and "workers" in info.value.message


def test_stop_a_running_job(tmp_path: Path) -> None:
    for server in start_serve(tmp_path, SLEEP_PER_BATCH="0.2"):
        with Client(server.url) as client:
            many = {"workers": 1, "item_list": {"items": list(range(500)), "batch_size": 1}}
            spec = client.submit("test-api", many)
            assert client.stop("test-api", spec.job_id) == f"stopped job {spec.job_id}"
            final = client.wait("test-api", spec.job_id, poll=0.1, timeout=60)
            assert final.job_status.status == "stopped"


def test_token(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("s3cret\n")
    for server in start_serve(tmp_path, "--token-file", str(tmp_path / "token")):
        for token in ("wrong", None):  # None: SUPERVISOR_TOKEN is not set here
            with Client(server.url, token=token) as client, pytest.raises(ClientError) as info:
                client.list("test-api")
            assert info.value.status == 401
        with Client(server.url, token="s3cret") as client:
            assert client.list("test-api") == []

        r = run_supervisor("list", "test-api", "--url", server.url)
        assert r.returncode == 2 and "HTTP 401" in r.stderr and r.stderr.count("\n") == 1
        r = run_supervisor(
            "list", "test-api", "--url", server.url, "--token-file", str(tmp_path / "token")
        )
        assert r.returncode == 0, r.stderr


def test_client_from_cli_yaml(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = tmp_path / "cli"
    d.mkdir()
    (d / "cli.yaml").write_text(
        "environments:\n  - name: supervisor\n"
        f"    operator_endpoint: {server.url}\ndefault_environment: supervisor\n"
    )
    monkeypatch.setenv("CORTEX_CLI_CONFIG_DIR", str(d))
    with Client() as client:
        assert client.url == server.url
        assert client.list("test-api") == []


def test_cli_commands(server: Server, tmp_path: Path) -> None:
    job = tmp_path / "job.json"
    job.write_text(json.dumps(JOB))
    url = ["--url", server.url]

    r = run_supervisor("submit", "test-api", str(job), *url, "--dry-run")
    assert r.returncode == 0 and r.stdout.endswith("validations passed\n"), r.stderr

    r = run_supervisor("submit", "test-api", str(job), *url, "--wait", "--poll", "0.2")
    assert r.returncode == 1, r.stderr  # completed_with_failures
    job_id, status_line = r.stdout.splitlines()
    status = json.loads(status_line)
    assert status["job_status"]["job_id"] == job_id
    assert status["job_status"]["status"] == "completed_with_failures"
    progress = [json.loads(line) for line in r.stderr.splitlines()]
    assert progress[-1]["event"] == "progress" and progress[-1]["succeeded"] == 5
    assert progress[-1]["failed"] == 1

    r = run_supervisor("get", "test-api", job_id, *url)
    assert r.returncode == 0 and json.loads(r.stdout)["job_status"]["job_id"] == job_id

    r = run_supervisor("get", "test-api", job_id, *url, "--watch")
    assert r.returncode == 1 and json.loads(r.stdout)["job_status"]["status"] != "running"

    r = run_supervisor("submit", "test-api", "--retry-dead-letters", job_id, *url)
    assert r.returncode == 0, r.stderr
    retry_id = r.stdout.strip()
    assert retry_id and retry_id != job_id

    r = run_supervisor("get", "test-api", retry_id, *url, "--watch", "--poll", "0.2")
    assert r.returncode == 1 and json.loads(r.stdout)["job_status"]["total_batch_count"] == 1

    r = run_supervisor("list", "test-api", *url)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["JOB_ID", "STATUS", "SUCCEEDED/TOTAL", "FAILED", "CREATED"]
    assert [line.split()[:4] for line in lines[1:]] == [
        [retry_id, "completed_with_failures", "0/1", "1"],
        [job_id, "completed_with_failures", "5/6", "1"],
    ]
    r = run_supervisor("list", "test-api", *url, "--json")
    assert [s["job_id"] for s in json.loads(r.stdout)] == [retry_id, job_id]

    r = run_supervisor("stop", "test-api", job_id, *url)
    assert r.returncode == 2 and "already ended" in r.stderr and r.stderr.count("\n") == 1
    r = run_supervisor("get", "test-api", "nope", *url)
    assert r.returncode == 2 and "HTTP 404" in r.stderr
    bad = tmp_path / "bad.json"
    bad.write_text('{"workers": 1}')
    r = run_supervisor("submit", "test-api", str(bad), *url)
    assert r.returncode == 2 and "HTTP 400" in r.stderr and r.stdout == ""
