"""The job API client and the client commands: where the server is, errors, and
`supervisor list --root` against roots made by real `supervisor run`s."""

from __future__ import annotations

import json
import os
import signal
import socket
from pathlib import Path

import msgspec
import pytest

from supervisor.client import DEFAULT_URL, Client, ClientError, resolve_token, resolve_url
from supervisor.client_commands import progress_of_status
from supervisor.jobs import JobMetrics, JobStatus, JobStatusResponse
from tests.helpers import (
    raw_job,
    read_records,
    recorder_api,
    run_supervisor,
    start_supervisor,
    wait_for_batches,
    write_job,
)

# -- where the server is ---------------------------------------------------------------------

CLI_YAML = """\
environments:
  - name: other
    operator_endpoint: http://127.0.0.1:1111
  - name: supervisor
    operator_endpoint: http://127.0.0.1:2222
default_environment: supervisor
"""

NO_DEFAULT = """\
environments:
  - name: first
    operator_endpoint: http://127.0.0.1:3333
  - name: second
    operator_endpoint: http://127.0.0.1:4444
"""


def config_dir(tmp_path: Path, text: str) -> str:
    d = tmp_path / "client"
    d.mkdir()
    (d / "cli.yaml").write_text(text)
    return str(d)


@pytest.mark.parametrize(
    ("url", "env", "expected"),
    [
        ("http://h:1", {"SUPERVISOR_URL": "http://h:2"}, "http://h:1"),
        (None, {"CONFIG": CLI_YAML, "SUPERVISOR_URL": "http://h:2"}, "http://127.0.0.1:2222"),
        (None, {"CONFIG": NO_DEFAULT}, "http://127.0.0.1:3333"),
        (None, {"SUPERVISOR_URL": "http://h:2"}, "http://h:2"),
        (None, {"SUPERVISOR_URL": ""}, DEFAULT_URL),
        (None, {}, DEFAULT_URL),
    ],
)
def test_resolve_url(tmp_path: Path, url: str | None, env: dict[str, str], expected: str) -> None:
    environ = dict(env)
    if "CONFIG" in environ:
        environ["CORTEX_CLI_CONFIG_DIR"] = config_dir(tmp_path, environ.pop("CONFIG"))
    assert resolve_url(url, environ) == expected


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (None, "cannot read"),
        ("environments: [", "is not a Cortex cli.yaml"),
        ("environments: 3", "is not a Cortex cli.yaml"),
        ("environments: []", "names no operator_endpoint"),
    ],
)
def test_bad_cli_yaml_is_one_sentence(tmp_path: Path, text: str | None, needle: str) -> None:
    d = tmp_path / "client"
    d.mkdir()
    if text is not None:
        (d / "cli.yaml").write_text(text)
    with pytest.raises(ClientError) as info:
        resolve_url(None, {"CORTEX_CLI_CONFIG_DIR": str(d)})
    assert needle in info.value.message
    assert str(d / "cli.yaml") in info.value.message
    assert info.value.kind == "config" and info.value.status is None


def test_resolve_token() -> None:
    assert resolve_token("t", {"SUPERVISOR_TOKEN": "env"}) == "t"
    assert resolve_token(None, {"SUPERVISOR_TOKEN": "env"}) == "env"
    assert resolve_token(None, {"SUPERVISOR_TOKEN": ""}) is None
    assert resolve_token(None, {}) is None


def test_client_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORTEX_CLI_CONFIG_DIR", config_dir(tmp_path, CLI_YAML))
    assert Client().url == "http://127.0.0.1:2222"
    monkeypatch.delenv("CORTEX_CLI_CONFIG_DIR")
    monkeypatch.setenv("SUPERVISOR_URL", "http://127.0.0.1:5555/")
    assert Client().url == "http://127.0.0.1:5555"


@pytest.mark.parametrize("url", ["ftp://h", "127.0.0.1:8888", "http://h:notaport"])
def test_bad_url(url: str) -> None:
    with pytest.raises(ClientError) as info:
        Client(url)
    assert info.value.kind == "config"
    assert repr(url) in info.value.message


def closed_port() -> int:
    """A port nothing listens on (bound, never listening: connecting is refused)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port: int = s.getsockname()[1]
    s.close()
    return port


def test_unreachable_server_names_the_url() -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    with Client(url, timeout=5) as client, pytest.raises(ClientError) as info:
        client.list("api")
    assert info.value.kind == "unreachable" and info.value.status is None
    assert url in info.value.message


def test_cli_unreachable_exits_1_bad_arguments_exit_2() -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    r = run_supervisor("get", "api", "abc", "--url", url)
    assert r.returncode == 1
    assert r.stdout == ""
    assert r.stderr.count("\n") == 1 and f"cannot reach the job API at {url}" in r.stderr
    r = run_supervisor("submit", "api", "--url", url)  # neither JOB nor --retry-dead-letters
    assert r.returncode == 2 and "one of them" in r.stderr
    r = run_supervisor("list", "--url", url)  # no API_NAME and no --root
    assert r.returncode == 2 and "API_NAME" in r.stderr
    r = run_supervisor("get", "api", "abc", "--url", url, "--token-file", "/nonexistent")
    assert r.returncode == 2 and "/nonexistent" in r.stderr


# -- progress from a polled status -----------------------------------------------------------


def status(
    state: str, *, total: int | None, ok: int, failed: int, queued: int, dlq: int | None
) -> JobStatusResponse:
    spec = {
        "job_id": "j",
        "api_name": "a",
        "workers": 1,
        "api_id": "x",
        "sqs_url": "u",
        "created_time": "t",
        "total_batch_count": total,
        "status": state,
        "batches_in_queue": queued,
    }
    if dlq is not None:
        spec["sqs_dead_letter_queue"] = {"arn": "a", "max_receive_count": dlq}
    js = msgspec.convert(spec, JobStatus)
    return JobStatusResponse(js, "/a", {}, JobMetrics(succeeded=ok, failed=failed))


@pytest.mark.parametrize(
    ("st", "dead", "in_flight"),
    [
        (status("running", total=10, ok=4, failed=2, queued=3, dlq=None), 2, 1),
        (status("running", total=10, ok=4, failed=2, queued=3, dlq=3), 0, 3),
        (status("completed_with_failures", total=10, ok=7, failed=9, queued=0, dlq=3), 3, 0),
        (status("stopped", total=10, ok=7, failed=0, queued=2, dlq=None), 1, 0),
        (status("enqueuing", total=None, ok=0, failed=0, queued=0, dlq=None), 0, 0),
    ],
)
def test_progress_of_status(st: JobStatusResponse, dead: int, in_flight: int) -> None:
    p = progress_of_status(st)
    assert (p.dead, p.in_flight) == (dead, in_flight)
    assert p.succeeded == st.metrics.succeeded and p.total == st.job_status.total_batch_count


# -- list --root -----------------------------------------------------------------------------


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``directory``: its size and modification time; of SQLite's shared
    memory index (``-shm``, which every reader of a WAL writes to) only the size."""
    return {
        str(p.relative_to(directory)): (
            p.stat().st_size,
            0 if p.name.endswith("-shm") else p.stat().st_mtime_ns,
        )
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def list_root(root: Path, *extra: str) -> tuple[int, str, str]:
    r = run_supervisor("list", *extra, "--root", str(root))
    return r.returncode, r.stdout, r.stderr


def table(out: str) -> dict[str, list[str]]:
    lines = [line for line in out.splitlines() if line and not line.startswith("*")]
    assert lines[0].split() == ["JOB_ID", "STATUS", "SUCCEEDED/TOTAL", "FAILED", "CREATED"]
    return {line.split()[0]: line.split()[1:] for line in lines[1:]}


def test_list_root_finished_running_and_unfinished(tmp_path: Path) -> None:
    api, rec, _port = recorder_api(tmp_path, SLEEP_PER_BATCH="0.02", FAIL_ITEMS='[{"i": 1}]')
    root = tmp_path / "root"
    small = write_job(tmp_path / "small.json", raw_job([b'{"i": 1}', b'{"i": 2}'], 1))
    r = run_supervisor("run", str(api), "--job", str(small), "--root", str(root))
    assert r.returncode == 1, r.stderr
    first = json.loads(r.stdout)["job_status"]["job_id"]

    # A cleanly closed queue file (no -wal): listing it creates and changes nothing.
    before = snapshot(root)
    code, out, err = list_root(root)
    assert code == 0, err
    assert table(out) == {first: ["completed_with_failures", "1/2", "1", table(out)[first][3]]}
    assert snapshot(root) == before

    items = [json.dumps({"i": i}).encode() for i in range(100, 400)]
    big = write_job(tmp_path / "big.json", raw_job(items, 1))
    proc = start_supervisor(["run", str(api), "--job", str(big), "--root", str(root)])
    try:
        wait_for_batches(rec, 20, proc)
        code, out, err = list_root(root, "test-api")  # while `run` works on the root
        assert code == 0, err
        rows = table(out)
        assert len(rows) == 2 and rows[first][0] == "completed_with_failures"
        (second,) = set(rows) - {first}
        assert rows[second][0] == "running"  # not flagged: a supervisor is on it
        assert "unfinished" not in out
        assert list(rows) == [second, first]  # newest first
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole pod, mid-job
        proc.communicate(timeout=30)
    for pid in {b["pid"] for b in read_records(rec)}:  # the container: in its own group
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    before = snapshot(root)
    code, out, err = list_root(root)
    assert code == 0, err
    rows = table(out)
    assert rows[second][0] == "running*"
    done, total = rows[second][1].split("/")
    assert total == "300" and 0 < int(done) < 300
    assert "* unfinished" in out and "supervisor run" in out
    assert snapshot(root) == before  # the killed run's WAL is read, not checkpointed

    code, out, err = list_root(root, "--json")
    assert code == 0, err
    statuses = json.loads(out)
    assert [s["job_id"] for s in statuses] == [second, first]
    assert statuses[0]["status"] == "running" and statuses[0]["total_batch_count"] == 300
    assert statuses[1]["worker_counts"]  # the final counts, as stored at its end

    code, out, err = list_root(root, "other-api")
    assert code == 0 and table(out) == {}

    # `run` resumes it, and the listing follows.
    r = run_supervisor("run", str(api), "--job", str(big), "--root", str(root), timeout=120)
    assert r.returncode == 0, r.stderr
    assert table(list_root(root)[1])[second][:3] == ["succeeded", "300/300", "0"]


def test_list_root_without_a_queue_file(tmp_path: Path) -> None:
    code, out, err = list_root(tmp_path)
    assert code == 2 and out == ""
    assert "no queue file" in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []  # nothing created
    r = run_supervisor("list", "--root", str(tmp_path), "--url", "http://x")
    assert r.returncode == 2 and "--root reads a queue file" in r.stderr
