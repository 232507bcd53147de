"""`supervisor serve` end to end: a Cortex user's script (requests) against real containers."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import (
    RECORDER,
    batches_of,
    child_env,
    free_ports,
    log_events,
    probe_on,
    read_records,
    recorder_container,
    supervisor_cmd,
)

TIMEOUT = 10  # seconds, for every HTTP call of these tests


class Serve:
    """A running `supervisor serve` (stdout JSON logs in a file)."""

    def __init__(self, proc: subprocess.Popen[str], log: Path, root: Path, token: str | None):
        self.proc, self.log, self.root, self.token = proc, log, root, token
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def events(self, name: str) -> list[dict[str, Any]]:
        return log_events(self.log, name)

    def wait_listening(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not self.events("listening"):
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited: {self.log.read_text()}")
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.05)
        self.port = self.events("listening")[0]["port"]

    def submit(self, api: str, job: dict[str, Any], **params: str) -> requests.Response:
        return requests.post(
            f"{self.url}/{api}", json=job, params=params, headers=self.headers(), timeout=TIMEOUT
        )

    def get(self, api: str, job_id: str) -> dict[str, Any]:
        r = requests.get(
            f"{self.url}/{api}", params={"jobID": job_id}, headers=self.headers(), timeout=TIMEOUT
        )
        assert r.status_code == 200, r.text
        return dict(r.json())

    def wait_end(self, api: str, job_id: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            status = self.get(api, job_id)
            if status["job_status"]["status"] not in ("running", "enqueuing", "pending"):
                return status
            assert time.monotonic() < deadline, status
            time.sleep(0.1)

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode


def start_serve(
    tmp_path: Path,
    apis: list[Path],
    *extra: str,
    root: Path | None = None,
    token: str | None = None,
    env: dict[str, str] | None = None,
) -> Serve:
    root = root or tmp_path / "root"
    log = tmp_path / f"serve-{time.monotonic_ns()}.log"
    args = [*map(str, apis), "--listen", "127.0.0.1:0", "--root", str(root), "--grace", "5"]
    with log.open("w") as out:
        proc = subprocess.Popen(
            supervisor_cmd("serve", *args, *extra),
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            env={**child_env(), **(env or {})},
            start_new_session=True,
            stdin=subprocess.DEVNULL,
        )
    s = Serve(proc, log, root, token)
    try:
        s.wait_listening()
    except BaseException:
        s.stop(signal.SIGKILL)
        raise
    return s


@pytest.fixture
def cleanup() -> Iterator[list[Serve]]:
    servers: list[Serve] = []
    yield servers
    for s in servers:
        s.stop()


def api_file(
    path: Path, name: str, rec: Path, *, workers_ports: int = 1, **env: str
) -> tuple[Path, int]:
    port = free_ports(8)
    container = {
        **recorder_container(RECORD_DIR=str(rec), **env),
        "readiness_probe": probe_on(port),
    }
    api = [{"name": name, "kind": "BatchAPI", "pod": {"port": port, "containers": [container]}}]
    path.write_text(yaml.safe_dump(api))
    return path, port


def items_job(n: int, batch_size: int = 1, **extra: Any) -> dict[str, Any]:
    return {
        "workers": 1,
        "item_list": {"items": [{"i": i} for i in range(n)], "batch_size": batch_size},
        **extra,
    }


@pytest.fixture
def one_api(tmp_path: Path, cleanup: list[Serve]) -> tuple[Serve, Path]:
    rec = tmp_path / "rec"
    rec.mkdir()
    api, _ = api_file(tmp_path / "api.yaml", "sum", rec)
    s = start_serve(tmp_path, [api])
    cleanup.append(s)
    return s, rec


def test_a_cortex_script_submits_polls_and_lists(one_api: tuple[Serve, Path]) -> None:
    s, rec = one_api
    r = s.submit("sum", items_job(12, 3, config={"k": "v"}))
    assert r.status_code == 200, r.text
    spec = r.json()
    assert spec["api_name"] == "sum" and spec["kind"] == "BatchAPI"
    assert spec["total_batch_count"] == 4 and spec["config"] == {"k": "v"}
    for key in ("job_id", "workers", "api_id", "sqs_url", "timeout", "created_time"):
        assert key in spec
    status = s.wait_end("sum", spec["job_id"])
    js = status["job_status"]
    assert js["status"] == "succeeded"
    assert js["worker_counts"] == {"succeeded": 1}
    assert status["metrics"]["succeeded"] == 4 and status["metrics"]["failed"] == 0
    assert set(status) == {"job_status", "endpoint", "api_spec", "metrics"}
    assert status["endpoint"] == f"{s.url}/sum"  # the API's URL, as Cortex gives it
    for key in ("batches_in_queue", "total_batch_count", "start_time", "end_time"):
        assert key in js
    records = read_records(rec)
    assert len(batches_of(records)) == 4
    assert records[-1]["path"] == "/on-job-complete"
    assert records[0]["spec_job_id"] == spec["job_id"]  # its own job.json

    second = s.submit("sum", items_job(2)).json()["job_id"]
    s.wait_end("sum", second)
    listed = requests.get(f"{s.url}/sum", timeout=TIMEOUT).json()
    assert [j["job_id"] for j in listed["batch_job_statuses"]] == [second, spec["job_id"]]
    same = requests.get(f"{s.url}/batch/sum", params={"jobID": second}, timeout=TIMEOUT)
    assert same.json()["job_status"]["job_id"] == second  # the operator's paths too


def test_stop_mid_job_sends_nothing_more(tmp_path: Path, cleanup: list[Serve]) -> None:
    rec = tmp_path / "rec"
    rec.mkdir()
    api, _ = api_file(tmp_path / "api.yaml", "slow", rec, SLEEP_PER_BATCH="0.1")
    s = start_serve(tmp_path, [api])
    cleanup.append(s)
    job_id = s.submit("slow", items_job(200)).json()["job_id"]
    deadline = time.monotonic() + 30
    while len(batches_of(read_records(rec))) < 3:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    r = requests.delete(f"{s.url}/slow", params={"jobID": job_id}, timeout=TIMEOUT)
    assert r.status_code == 200 and r.json() == {"message": f"stopped job {job_id}"}
    status = s.wait_end("slow", job_id)
    assert status["job_status"]["status"] == "stopped"
    sent = len(batches_of(read_records(rec)))
    assert sent < 200
    assert not [r for r in read_records(rec) if r["path"] == "/on-job-complete"]
    again = requests.delete(f"{s.url}/slow", params={"jobID": job_id}, timeout=TIMEOUT)
    assert again.status_code == 400 and "already ended" in again.json()["message"]
    assert len(batches_of(read_records(rec))) == sent


def test_timeout_and_dry_run(tmp_path: Path, cleanup: list[Serve]) -> None:
    rec = tmp_path / "rec"
    rec.mkdir()
    api, _ = api_file(tmp_path / "api.yaml", "t", rec, NOT_READY_SECONDS="3600")
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    for name in ("img_1.png", "img_2.jpg", "img_3.jpg", "img_4.gif"):
        (data / "images" / name).write_text("x")
    s = start_serve(tmp_path, [api], "--data-dir", str(data))
    cleanup.append(s)
    job_id = s.submit("t", items_job(5, timeout=2)).json()["job_id"]
    assert s.wait_end("t", job_id)["job_status"]["status"] == "timed_out"
    assert not read_records(rec)

    lister = {
        "workers": 1,
        "file_path_lister": {
            "s3_paths": [str(data / "images" / "img")],
            "includes": ["**.jpg", "**.png"],
            "excludes": ["**_3.jpg"],
            "batch_size": 2,
        },
    }
    r = s.submit("t", lister, dryRun="true")
    assert r.status_code == 200, r.text
    assert r.text.splitlines() == [
        str(data / "images" / "img_1.png"),
        str(data / "images" / "img_2.jpg"),
        "validations passed",
    ]
    outside = {"workers": 1, "delimited_files": {"s3_paths": ["/etc/passwd"], "batch_size": 1}}
    r = s.submit("t", outside, dryRun="true")
    assert r.status_code == 400
    assert "`delimited_files.s3_paths[0]`" in r.json()["message"]  # the same path as a submit
    r = s.submit("t", items_job(10, 4), dryRun="true")
    assert r.text.splitlines() == ["10 item(s) in 3 batch(es)", "validations passed"]
    secret = tmp_path / "secret.ndjson"
    secret.write_text("1\n")
    (data / "link.ndjson").symlink_to(secret)
    for path in (str(secret), str(data / ".." / "secret.ndjson"), str(data / "link.ndjson")):
        job = {"workers": 1, "delimited_files": {"s3_paths": [path], "batch_size": 1}}
        r = s.submit("t", job)
        assert r.status_code == 400, (path, r.text)
        assert "outside the allowed data folders" in r.json()["message"], path
    listed = requests.get(f"{s.url}/t", timeout=TIMEOUT).json()["batch_job_statuses"]
    assert [j["job_id"] for j in listed] == [job_id]  # dry runs and refusals store nothing


BAD = [
    (b"{", "not valid JSON"),
    (b"[]", "Expected `object`"),
    (json.dumps({"item_list": {"items": [1], "batch_size": 1}}).encode(), "workers"),
    (json.dumps({"workers": 0, "item_list": {"items": [1], "batch_size": 1}}).encode(), "workers"),
    (
        json.dumps({"workers": 1, "item_list": {"items": [1], "batch_size": 0}}).encode(),
        "batch_size",
    ),
    (json.dumps({"workers": 1, "item_list": {"items": [], "batch_size": 1}}).encode(), "items"),
    (
        json.dumps(
            {"workers": 1, "item_list": {"items": [1], "batch_size": 1}, "nope": 1}
        ).encode(),
        "nope",
    ),
    (json.dumps({"workers": 1}).encode(), "exactly one of"),
    (
        json.dumps(
            {
                "workers": 1,
                "item_list": {"items": [1], "batch_size": 1},
                "sqs_dead_letter_queue": {"arn": "", "max_receive_count": 1},
            }
        ).encode(),
        "arn",
    ),
    (
        json.dumps(
            {"workers": 1, "item_list": {"items": ["x" * 300_000], "batch_size": 1}}
        ).encode(),
        "bytes",
    ),
    (
        json.dumps(
            {"workers": 1, "delimited_files": {"s3_paths": ["/etc/passwd"], "batch_size": 1}}
        ).encode(),
        "local paths are not allowed",
    ),
    (
        json.dumps(
            {"workers": 1, "delimited_files": {"s3_paths": ["../secret"], "batch_size": 1}}
        ).encode(),
        "local paths are not allowed",
    ),
]


def test_bad_submissions_are_400_and_store_nothing(one_api: tuple[Serve, Path]) -> None:
    s, rec = one_api
    for body, needle in BAD:
        r = requests.post(
            f"{s.url}/sum",
            data=body,
            headers={"Content-Type": "application/json"},
            timeout=TIMEOUT,
        )
        assert r.status_code == 400, (body[:80], r.text)
        message = r.json()["message"]
        assert needle in message, (body[:80], message)
        assert "\n" not in message.strip()
    assert requests.get(f"{s.url}/sum", timeout=TIMEOUT).json()["batch_job_statuses"] == []
    assert requests.post(f"{s.url}/nope", json=items_job(1), timeout=TIMEOUT).status_code == 404
    missing = requests.get(f"{s.url}/sum", params={"jobID": "ffff"}, timeout=TIMEOUT)
    assert missing.status_code == 404
    assert requests.put(f"{s.url}/sum", timeout=TIMEOUT).status_code == 405
    job_id = s.submit("sum", items_job(3)).json()["job_id"]  # still serving, and well
    assert s.wait_end("sum", job_id)["job_status"]["status"] == "succeeded"
    assert len(batches_of(read_records(rec))) == 3


def test_two_apis_at_once_and_three_workers(tmp_path: Path, cleanup: list[Serve]) -> None:
    rec_a, rec_b = tmp_path / "a", tmp_path / "b"
    rec_a.mkdir()
    rec_b.mkdir()
    api_a, port_a = api_file(tmp_path / "a.yaml", "alpha", rec_a, SLEEP_PER_BATCH="0.02")
    api_b, _ = api_file(tmp_path / "b.yaml", "beta", rec_b, SLEEP_PER_BATCH="0.02")
    s = start_serve(tmp_path, [api_a, api_b])
    cleanup.append(s)
    a = s.submit("alpha", {**items_job(60), "workers": 3}).json()["job_id"]
    b = s.submit("beta", items_job(40)).json()["job_id"]
    a2 = s.submit("alpha", items_job(20)).json()["job_id"]  # same API, its own ports
    for api, job_id, n in (("alpha", a, 60), ("beta", b, 40), ("alpha", a2, 20)):
        status = s.wait_end(api, job_id)
        assert status["job_status"]["status"] == "succeeded"
        assert status["metrics"]["succeeded"] == n
    by_job: dict[str, list[int]] = {}
    ports: dict[str, set[int]] = {}
    for r in batches_of(read_records(rec_a)) + batches_of(read_records(rec_b)):
        job = next(v for k, v in r["headers"] if k.lower() == "x-cortex-job-id")
        by_job.setdefault(job, []).extend(x["i"] for x in json.loads(r["body"]))
        ports.setdefault(job, set()).add(r["port"])
    assert sorted(by_job[a]) == list(range(60))
    assert sorted(by_job[b]) == list(range(40))
    assert sorted(by_job[a2]) == list(range(20))
    assert len(ports[a]) == 3  # three pods did the work
    assert not ports[a] & ports[a2]  # two jobs of one API never share a pod port
    assert min(ports[a] | ports[a2]) == port_a


def test_sigkill_then_restart_resumes(tmp_path: Path, cleanup: list[Serve]) -> None:
    rec = tmp_path / "rec"
    rec.mkdir()
    api, _ = api_file(tmp_path / "api.yaml", "r", rec, SLEEP_PER_BATCH="0.02")
    root = tmp_path / "root"
    s = start_serve(tmp_path, [api], root=root)
    cleanup.append(s)
    job_id = s.submit("r", items_job(300)).json()["job_id"]
    deadline = time.monotonic() + 30
    while len(batches_of(read_records(rec))) < 40:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    s.stop(signal.SIGKILL)  # the supervisor alone: its containers die with it (PDEATHSIG)
    import sqlite3

    with sqlite3.connect(root / "cortex" / "supervisor" / "queue.sqlite3") as conn:
        done = {
            seq for (seq,) in conn.execute("select id & 4294967295 from batches where state = 1")
        }
    assert done
    before = len(batches_of(read_records(rec)))
    s2 = start_serve(tmp_path, [api], root=root)
    cleanup.append(s2)
    status = s2.wait_end("r", job_id)
    assert status["job_status"]["status"] == "succeeded"
    again = batches_of(read_records(rec))[before:]
    resent = {json.loads(r["body"])[0]["i"] for r in again}
    assert not resent & done
    everything = {json.loads(r["body"])[0]["i"] for r in batches_of(read_records(rec))}
    assert everything == set(range(300))


def test_admin_endpoints(tmp_path: Path, cleanup: list[Serve]) -> None:
    rec = tmp_path / "rec"
    rec.mkdir()
    ready_file = tmp_path / "ready"
    api, _ = api_file(
        tmp_path / "api.yaml",
        "m",
        rec,
        FAIL_ITEMS=json.dumps([{"i": 1}]),
        READY_FILE=str(ready_file),
    )
    s = start_serve(tmp_path, [api])
    cleanup.append(s)
    assert requests.get(f"{s.url}/healthz", timeout=TIMEOUT).status_code == 200  # no job
    dlq = {"arn": "arn:aws:sqs:local:1:dead", "max_receive_count": 2}
    job_id = s.submit("m", items_job(4, sqs_dead_letter_queue=dlq)).json()["job_id"]
    deadline = time.monotonic() + 30
    while True:  # a job whose pod is not ready: healthz says so
        health = requests.get(f"{s.url}/healthz", timeout=TIMEOUT)
        status = requests.get(f"{s.url}/status", timeout=TIMEOUT).json()
        if status["jobs"] and status["jobs"][0]["pods"]:
            break
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert health.status_code == 503
    pod = status["jobs"][0]["pods"][0]
    assert {"index", "port", "state", "readiness", "containers", "port_owner"} <= set(pod)
    assert status["jobs"][0]["job_id"] == job_id
    ready_file.touch()
    assert s.wait_end("m", job_id)["job_status"]["status"] == "completed_with_failures"
    text = requests.get(f"{s.url}/metrics", timeout=TIMEOUT).text
    samples = {
        (m.name, sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for m in text_string_to_metric_families(text)
        for sample in m.samples
    }
    labels = (("api_name", "m"), ("job_id", job_id))
    assert samples[("cortex_batch_succeeded", "cortex_batch_succeeded_total", labels)] == 3
    assert samples[("cortex_batch_failed", "cortex_batch_failed_total", labels)] == 2  # attempts
    assert (
        samples[("cortex_time_per_batch_seconds", "cortex_time_per_batch_seconds_count", labels)]
        == 3
    )
    assert any(name[0].startswith("process_") for name in samples)

    letters = requests.get(
        f"{s.url}/m/dead-letters", params={"jobID": job_id}, timeout=TIMEOUT
    ).json()
    (letter,) = letters["dead_letters"]
    assert letter["body"] == [{"i": 1}]
    assert [a["status"] for a in letter["attempts"]] == [500, 500]
    retry = requests.post(f"{s.url}/m/dead-letters", params={"jobID": job_id}, timeout=TIMEOUT)
    assert retry.status_code == 200, retry.text
    new = retry.json()
    assert new["job_id"] != job_id and new["total_batch_count"] == 1
    assert s.wait_end("m", new["job_id"])["job_status"]["status"] == "completed_with_failures"


def test_chaining_from_inside_a_container(tmp_path: Path, cleanup: list[Serve]) -> None:
    """A container of API `first` submits a job to API `second` with the Python client and
    with plain requests, finding the server through CORTEX_CLI_CONFIG_DIR."""
    rec = tmp_path / "rec"
    rec.mkdir()
    second, _ = api_file(tmp_path / "second.yaml", "second", rec)
    out = tmp_path / "chained.json"
    code = (
        "import json, os, sys, requests\n"
        "from supervisor.client import Client\n"
        "spec = Client().submit('second', {'workers': 1, 'item_list': {'items': [1, 2], 'batch_size': 1}})\n"
        "auth = {'Authorization': 'Bearer ' + os.environ['SUPERVISOR_TOKEN']}\n"
        "r = requests.post(os.environ['CORTEX_OPERATOR_ENDPOINT'] + '/second', headers=auth,\n"
        "                  json={'workers': 1, 'item_list': {'items': [3], 'batch_size': 1}})\n"
        f"open({str(out)!r}, 'w').write(json.dumps([spec.job_id, r.json()['job_id']]))\n"
        "import time; time.sleep(3600)\n"
    )
    first_port = free_ports()
    first = tmp_path / "first.yaml"
    first.write_text(
        yaml.safe_dump(
            [
                {
                    "name": "first",
                    "kind": "BatchAPI",
                    "pod": {
                        "port": first_port,
                        "containers": [
                            {"name": "chain", "command": [sys.executable, "-c", code]},
                            {
                                "name": "api",
                                "command": [sys.executable, "-u", str(RECORDER)],
                                "env": {
                                    "RECORD_DIR": str(tmp_path / "first-rec"),
                                    "SLEEP_PER_BATCH": "0.1",
                                },
                            },
                        ],
                    },
                }
            ]
        )
    )
    (tmp_path / "first-rec").mkdir()
    token = tmp_path / "token"
    token.write_text("chain-token")  # the chain must authenticate, with what serve gives it
    s = start_serve(tmp_path, [first, second], "--token-file", str(token), token="chain-token")
    cleanup.append(s)
    job = s.submit("first", items_job(600)).json()["job_id"]  # runs while the chain submits
    deadline = time.monotonic() + 60
    while not out.exists() or not out.read_text():
        assert time.monotonic() < deadline, s.log.read_text()[-3000:]
        time.sleep(0.1)
    chained = json.loads(out.read_text())
    for job_id in chained:
        assert s.wait_end("second", job_id)["job_status"]["status"] == "succeeded"
    requests.delete(f"{s.url}/first", params={"jobID": job}, headers=s.headers(), timeout=TIMEOUT)
    cli_yaml = s.root / "cortex" / "client" / "cli.yaml"
    assert yaml.safe_load(cli_yaml.read_text())["environments"][0]["operator_endpoint"] == s.url


def test_tokens_and_loopback(tmp_path: Path, cleanup: list[Serve]) -> None:
    rec = tmp_path / "rec"
    rec.mkdir()
    api, _ = api_file(tmp_path / "api.yaml", "sec", rec)
    r = subprocess.run(
        supervisor_cmd("serve", str(api), "--listen", "0.0.0.0:0", "--root", str(tmp_path / "x")),
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in child_env().items() if k != "SUPERVISOR_TOKEN"},
    )
    assert r.returncode == 2
    assert "refusing to listen on 0.0.0.0 without a token" in r.stderr
    assert not (tmp_path / "x").exists()

    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    root = tmp_path / "root"
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            supervisor_cmd(
                "serve",
                str(api),
                "--listen",
                "0.0.0.0:0",
                "--root",
                str(root),
                "--token-file",
                str(token_file),
            ),
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            env=child_env(),
            start_new_session=True,
        )
    s = Serve(proc, log, root, "s3cret-token")
    cleanup.append(s)
    s.wait_listening()
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-token"}):
        r = requests.post(f"{s.url}/sec", json=items_job(1), headers=headers, timeout=TIMEOUT)
        assert r.status_code == 401, r.text
        assert requests.get(f"{s.url}/sec", headers=headers, timeout=TIMEOUT).status_code == 401
    assert requests.get(f"{s.url}/healthz", timeout=TIMEOUT).status_code == 200  # probes
    assert (
        requests.get(f"{s.url}/sec", headers=s.headers(), timeout=TIMEOUT).json()[
            "batch_job_statuses"
        ]
        == []
    )  # nothing was submitted
    job_id = s.submit("sec", items_job(2)).json()["job_id"]
    assert s.wait_end("sec", job_id)["job_status"]["status"] == "succeeded"
    assert "s3cret-token" not in log.read_text()
    assert (
        "s3cret-token"
        not in requests.get(f"{s.url}/status", headers=s.headers(), timeout=TIMEOUT).text
    )


def test_garbage_on_the_wire_keeps_the_server_serving(one_api: tuple[Serve, Path]) -> None:
    s, _ = one_api
    cases = [
        b"garbage\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST /sum HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n\r\n",
        b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\n\r\n",
        b"\x00\xff\xfe" * 100,
        b"POST /sum HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nab",  # then close
    ]
    for raw in cases:
        with socket.create_connection(("127.0.0.1", s.port), timeout=TIMEOUT) as c:
            c.sendall(raw)
            c.shutdown(socket.SHUT_WR)
            answer = c.recv(65536)
            assert answer == b"" or answer.startswith(b"HTTP/1.1 4"), answer[:100]
    assert requests.get(f"{s.url}/healthz", timeout=TIMEOUT).status_code == 200
    job_id = s.submit("sum", items_job(2)).json()["job_id"]
    assert s.wait_end("sum", job_id)["job_status"]["status"] == "succeeded"
