"""`supervisor run` end to end: the real command, real child processes, real HTTP on loopback."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import (
    batches_of,
    free_ports,
    header,
    pid_alive,
    probe_on,
    raw_job,
    read_records,
    recorder_api,
    recorder_container,
    run_supervisor,
    start_supervisor,
    wait_for_batches,
    write_api,
    write_job,
)

# Items chosen to catch any re-encoding: odd spacing, escapes, unicode, big numbers, nesting.
RAW_ITEMS = [
    b'{"a": 1,   "b":[1,2 ,3]}',
    b'"caf\\u00e9 \xc3\xa9"',
    b"12345678901234567890123",
    b"1.50",
    b"null",
    b'{"nested":{"x":[{"y":"\\n"}]}}',
    b"[ ]",
    b"true",
] + [b'{"i": %d}' % i for i in range(40)]


def test_contract_byte_for_byte(tmp_path: Path, backend: str) -> None:
    api, rec, _port = recorder_api(tmp_path)
    job = write_job(tmp_path / "job.json", raw_job(RAW_ITEMS, 7))
    root = tmp_path / "root"
    r = run_supervisor("run", str(api), "--job", str(job), "--root", str(root), backend=backend)
    assert r.returncode == 0, r.stderr
    status = json.loads(r.stdout)  # stdout holds only the final status JSON
    js = status["job_status"]
    assert js["status"] == "succeeded"
    assert js["total_batch_count"] == 7
    assert status["metrics"]["succeeded"] == 7
    assert status["metrics"]["failed"] == 0
    job_id = js["job_id"]

    records = read_records(rec)
    batches = batches_of(records)
    expected = [b"[" + b",".join(RAW_ITEMS[i : i + 7]) + b"]" for i in range(0, len(RAW_ITEMS), 7)]
    assert [b["body"].encode() for b in batches] == expected  # order kept, bytes exact
    for b in batches:
        assert header(b, "Content-Type") == "application/json"
        assert header(b, "X-Cortex-Job-ID") == job_id
        assert header(b, "Content-Length") == str(len(b["body"].encode()))
        assert b["spec_job_id"] == job_id  # job.json was written before the container started
        assert b["ready"]
    completes = [r for r in records if r["path"] == "/on-job-complete"]
    assert len(completes) == 1
    assert records[-1]["path"] == "/on-job-complete"  # after the last batch
    c = completes[0]
    assert json.loads(c["body"]) == {"message": "job_complete"}
    assert header(c, "X-Cortex-Job-ID") == job_id
    assert header(c, "X-Cortex-Batches-Succeeded") == "7"
    assert header(c, "X-Cortex-Batches-Failed") == "0"
    spec = json.loads((root / "cortex" / "spec" / "job.json").read_text())
    assert spec["job_id"] == job_id
    assert spec["config"] == {"k": "v"}
    assert spec["kind"] == "BatchAPI"
    assert (root / "mnt").is_dir()


def test_no_batch_before_http_probe_passes(tmp_path: Path, backend: str) -> None:
    """The port is bound at once but /healthz fails for 2 s: nothing may arrive early."""
    api, rec, _port = recorder_api(tmp_path, NOT_READY_SECONDS="2")
    job = write_job(tmp_path / "job.json", raw_job(RAW_ITEMS[:10], 1))
    r = run_supervisor(
        "run", str(api), "--job", str(job), "--root", str(tmp_path / "root"), backend=backend
    )
    assert r.returncode == 0, r.stderr
    batches = batches_of(read_records(rec))
    assert len(batches) == 10
    assert all(b["ready"] for b in batches)


@pytest.mark.parametrize("dlq", [None, 3])
def test_retries_and_dead_letters(tmp_path: Path, dlq: int | None) -> None:
    port = free_ports()
    rec = tmp_path / "rec"
    rec.mkdir()
    items = [json.dumps({"i": i}).encode() for i in range(10)]
    api = write_api(
        tmp_path / "api.yaml",
        [
            {
                **recorder_container(
                    RECORD_DIR=str(rec),
                    FAIL_ITEMS=json.dumps([{"i": 3}]),
                    FLAKY_ITEMS=json.dumps([{"i": 7}]),
                    FLAKY_TIMES="1",
                ),
                "readiness_probe": probe_on(port),
            }
        ],
        port=port,
    )
    extra = (
        b'"sqs_dead_letter_queue": {"arn": "local", "max_receive_count": %d}, ' % dlq
        if dlq
        else b""
    )
    job = write_job(tmp_path / "job.json", raw_job(items, 1, extra))
    root = tmp_path / "root"
    r = run_supervisor("run", str(api), "--job", str(job), "--root", str(root))
    assert r.returncode == 1, r.stderr
    status = json.loads(r.stdout)
    assert status["job_status"]["status"] == "completed_with_failures"
    attempts: dict[str, int] = {}
    for b in batches_of(read_records(rec)):
        attempts[b["body"]] = attempts.get(b["body"], 0) + 1
    if dlq is None:
        # Cortex: one attempt per batch; the flaky one and the bad one both fail for good.
        assert attempts['[{"i": 3}]'] == 1
        assert attempts['[{"i": 7}]'] == 1
        assert status["metrics"]["succeeded"] == 8
        assert status["metrics"]["failed"] == 2
        dead_bodies = {'[{"i": 3}]', '[{"i": 7}]'}
    else:
        assert attempts['[{"i": 3}]'] == dlq
        assert attempts['[{"i": 7}]'] == 2  # failed once, then succeeded
        assert status["metrics"]["succeeded"] == 9
        assert status["metrics"]["failed"] == dlq + 1  # failed attempts
        dead_bodies = {'[{"i": 3}]'}
    assert all(n == 1 for body, n in attempts.items() if body not in ('[{"i": 3}]', '[{"i": 7}]'))
    job_id = status["job_status"]["job_id"]
    dl_dir = root / "cortex" / "supervisor" / "dead-letters" / job_id
    letters = [json.loads(p.read_bytes()) for p in sorted(dl_dir.glob("*.json"))]
    assert {json.dumps(letter["body"]) for letter in letters} == dead_bodies
    bad = next(x for x in letters if x["body"] == [{"i": 3}])
    assert len(bad["attempts"]) == (dlq or 1)
    assert all(a["status"] == 500 for a in bad["attempts"])
    assert all("worker says no" in a["response_head"] for a in bad["attempts"])
    assert all("failing batch with 500" in a["stderr_tail"] for a in bad["attempts"])


BAD_APIS = [
    ({"pod": {"port": "x"}}, "pod.port"),
    (
        {
            "pod": {
                "containers": [
                    {"name": "a", "command": ["x"], "readiness_probe": {"http_get": {"port": "p"}}}
                ]
            }
        },
        "pod.containers[0].readiness_probe.http_get.port",
    ),
    (
        {
            "pod": {
                "containers": [
                    {
                        "name": "a",
                        "command": ["x"],
                        "readiness_probe": {"http_get": {"port": 1}, "tcp_socket": {"port": 1}},
                    }
                ]
            }
        },
        "pod.containers[0].readiness_probe",
    ),
    (
        {"pod": {"containers": [{"name": "a", "command": ["x"]}, {"name": "a", "command": ["y"]}]}},
        "pod",
    ),
    ({"pod": {"containers": [{"name": "a", "comand": ["x"]}]}}, "comand"),
    ({"kind": "RealtimeAPI"}, "kind"),
]


@pytest.mark.parametrize(("patch", "path"), BAD_APIS)
def test_bad_config_exits_2_and_starts_nothing(
    tmp_path: Path, patch: dict[str, Any], path: str
) -> None:
    marker = tmp_path / "started"
    good: dict[str, Any] = {
        "name": "x",
        "kind": "BatchAPI",
        "pod": {"port": 8080, "containers": [{"name": "a", "command": ["touch", str(marker)]}]},
    }
    api = {**good, **patch}
    if "pod" in patch:
        api["pod"] = {**good["pod"], **patch["pod"]}
    (tmp_path / "api.yaml").write_text(json.dumps([api]))
    job = write_job(
        tmp_path / "job.json", {"workers": 1, "item_list": {"items": [1], "batch_size": 1}}
    )
    r = run_supervisor(
        "run", str(tmp_path / "api.yaml"), "--job", str(job), "--root", str(tmp_path / "root")
    )
    assert r.returncode == 2
    assert f"`{path}`" in r.stderr or path in r.stderr
    assert "Traceback" not in r.stderr
    assert r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1
    assert not marker.exists()


BAD_JOBS: list[tuple[bytes, str]] = [
    (b"{", "not valid JSON"),
    (b"[]", "Expected `object`"),
    (b'{"workers": 1}', "exactly one of"),
    (b'{"workers": 0, "item_list": {"items": [1], "batch_size": 1}}', "`workers`"),
    (b'{"workers": 1, "item_list": {"items": [1], "batch_size": 0}}', "`item_list.batch_size`"),
    (
        b'{"workers": 1, "item_list": {"items": [1], "batch_size": 1}, "extra": 1}',
        "unknown field `extra`",
    ),
    (
        b'{"workers": 1, "delimited_files": {"s3_paths": ["/nonexistent/x"], "batch_size": 1}}',
        "/nonexistent/x",
    ),
    (
        b'{"workers": 1, "item_list": {"items": ["' + b"x" * 300_000 + b'"], "batch_size": 1}}',
        "item_list.items[0]",
    ),
]


@pytest.mark.parametrize(("job", "needle"), BAD_JOBS, ids=[n for _, n in BAD_JOBS])
def test_bad_job_exits_2_and_starts_nothing(tmp_path: Path, job: bytes, needle: str) -> None:
    marker = tmp_path / "started"
    write_api(
        tmp_path / "api.yaml", [{"name": "a", "command": ["touch", str(marker)]}], port=free_ports()
    )
    write_job(tmp_path / "job.json", job)
    root = tmp_path / "root"
    r = run_supervisor(
        "run", str(tmp_path / "api.yaml"), "--job", str(tmp_path / "job.json"), "--root", str(root)
    )
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr
    assert "Traceback" not in r.stderr
    assert r.stdout == ""
    assert not marker.exists()
    # nothing enqueued: a later good run of the same root starts from a clean slate
    db = root / "cortex" / "supervisor" / "queue.sqlite3"
    if db.exists():
        with sqlite3.connect(db) as conn:
            tables = [
                t for (t,) in conn.execute("select name from sqlite_master where type='table'")
            ]
            for t in tables:
                if t in ("batches", "bodies", "jobs"):
                    assert conn.execute(f"select count(*) from {t}").fetchone()[0] == 0


def test_validate(tmp_path: Path) -> None:
    write_api(tmp_path / "api.yaml", [{"name": "a", "command": ["true"]}], port=9000)
    write_job(
        tmp_path / "job.json", {"workers": 1, "item_list": {"items": [1, 2, 3], "batch_size": 2}}
    )
    r = run_supervisor("validate", str(tmp_path / "api.yaml"), "--job", str(tmp_path / "job.json"))
    assert r.returncode == 0, r.stderr
    assert "2 batch" in r.stdout
    r = run_supervisor("validate", str(tmp_path / "missing.yaml"))
    assert r.returncode == 2
    assert "missing.yaml" in r.stderr


def test_two_containers_share_mnt_exec_probe_and_n_pods(tmp_path: Path, backend: str) -> None:
    """A sidecar writes a file into mnt; the server is gated by an exec probe reading it.
    Three local pods on shifted ports, one /on-job-complete for the whole job."""
    n = 3
    port = free_ports(n)
    rec = tmp_path / "rec"
    rec.mkdir()
    sidecar_code = (
        "import os,time,pathlib;time.sleep(0.5);"
        "p=pathlib.Path(os.environ['CORTEX_MNT_DIR'])/('sidecar-'+os.environ['CORTEX_PORT']);"
        "p.write_text('ok');time.sleep(3600)"
    )
    check_code = (
        "import os,sys,pathlib;"
        "sys.exit(0 if (pathlib.Path(os.environ['CORTEX_MNT_DIR'])/('sidecar-'+os.environ['CORTEX_PORT'])).exists() else 1)"
    )
    api = write_api(
        tmp_path / "api.yaml",
        [
            {"name": "sidecar", "command": [sys.executable, "-c", sidecar_code]},
            {
                **recorder_container("server", RECORD_DIR=str(rec)),
                "readiness_probe": {
                    "exec": {"command": [sys.executable, "-c", check_code]},
                    "period_seconds": 1,
                },
            },
        ],
        port=port,
    )
    items = [json.dumps({"i": i}).encode() for i in range(60)]
    job = write_job(tmp_path / "job.json", raw_job(items, 2))
    r = run_supervisor(
        "run",
        str(api),
        "--job",
        str(job),
        "--root",
        str(tmp_path / "root"),
        "--workers",
        str(n),
        "--concurrency",
        "2",
        backend=backend,
    )
    assert r.returncode == 0, r.stderr
    records = read_records(rec)
    batches = batches_of(records)
    assert len(batches) == 30
    assert {b["port"] for b in batches} <= {port + i for i in range(n)}
    assert sorted(json.loads(b["body"])[0]["i"] for b in batches) == list(range(0, 60, 2))
    assert len([x for x in records if x["path"] == "/on-job-complete"]) == 1
    assert records[-1]["path"] == "/on-job-complete"
    mnt = tmp_path / "root" / "mnt"
    assert {p.name for p in mnt.glob("sidecar-*")} == {f"sidecar-{port + i}" for i in range(n)}


def test_container_crash_mid_job_is_worker_error(tmp_path: Path, backend: str) -> None:
    api, rec, _port = recorder_api(tmp_path, CRASH_AFTER="3")
    items = [json.dumps({"i": i}).encode() for i in range(20)]
    job = write_job(tmp_path / "job.json", raw_job(items, 1))
    r = run_supervisor(
        "run", str(api), "--job", str(job), "--root", str(tmp_path / "root"), backend=backend
    )
    assert r.returncode == 1, r.stderr
    status = json.loads(r.stdout)
    assert status["job_status"]["status"] == "worker_error"
    assert "exited with code 3" in r.stderr
    pids = {b["pid"] for b in read_records(rec)}
    assert pids and not any(pid_alive(p) for p in pids)


def test_sigterm_mid_job_leaves_nothing_behind(tmp_path: Path, backend: str) -> None:
    port = free_ports()
    rec = tmp_path / "rec"
    rec.mkdir()
    # A grandchild in the container's process group must go too.
    api = write_api(
        tmp_path / "api.yaml",
        [
            {
                **recorder_container(RECORD_DIR=str(rec), SLEEP_PER_BATCH="0.05"),
                "readiness_probe": probe_on(port),
            },
            {
                "name": "sleeper",
                "command": [
                    "sh",
                    "-c",
                    "sleep 3600 & echo $! > " + str(tmp_path / "grandchild.pid") + "; wait",
                ],
            },
        ],
        port=port,
    )
    items = [json.dumps({"i": i}).encode() for i in range(2000)]
    job = write_job(tmp_path / "job.json", raw_job(items, 1))
    proc = start_supervisor(
        ["run", str(api), "--job", str(job), "--root", str(tmp_path / "root"), "--grace", "2"],
        backend,
    )
    try:
        wait_for_batches(rec, 5, proc)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert json.loads(out)["job_status"]["status"] == "stopped"
    pids = {b["pid"] for b in read_records(rec)}
    grandchild = int((tmp_path / "grandchild.pid").read_text())
    for pid in [*pids, grandchild]:
        assert not pid_alive(pid), pid


def test_sigkill_whole_pod_then_resume(tmp_path: Path, backend: str) -> None:
    api, rec, _port = recorder_api(tmp_path, SLEEP_PER_BATCH="0.01")
    items = [json.dumps({"i": i}).encode() for i in range(600)]
    job = write_job(tmp_path / "job.json", raw_job(items, 1))
    root = tmp_path / "root"
    args = ["run", str(api), "--job", str(job), "--root", str(root), "--concurrency", "4"]
    proc = start_supervisor(args, backend)
    try:
        wait_for_batches(rec, 100, proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole pod: supervisor and containers
        proc.communicate(timeout=30)
    first_pids = {b["pid"] for b in read_records(rec)}
    for pid in first_pids:  # the container is in its own group: kill it as the kernel would
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    db = root / "cortex" / "supervisor" / "queue.sqlite3"
    with sqlite3.connect(db) as conn:
        (job_id,) = conn.execute("select job_id from jobs").fetchone()
        # batches.id is (job << 32 | seq); state 1 = succeeded (see queues/embedded.py)
        done = {
            seq for (seq,) in conn.execute("select id & 4294967295 from batches where state = 1")
        }
    assert done, "some batches should have been recorded as succeeded before the kill"
    before = len(batches_of(read_records(rec)))

    r = run_supervisor(*args, backend=backend, timeout=120)
    assert r.returncode == 0, r.stderr
    status = json.loads(r.stdout)
    assert status["job_status"]["job_id"] == job_id
    assert status["job_status"]["status"] == "succeeded"
    second = batches_of(read_records(rec))[before:]
    resent = {json.loads(b["body"])[0]["i"] for b in second}
    assert not (resent & done), "a batch that had succeeded was sent again"
    everything = {json.loads(b["body"])[0]["i"] for b in batches_of(read_records(rec))}
    assert everything == set(range(600))
    # only the in-flight ones (and acks not yet committed) were resent
    assert len(resent) == 600 - len(done)


def test_batch_timeout_and_job_timeout(tmp_path: Path) -> None:
    """A batch slower than --batch-timeout is a failed attempt ("timed out"); the job's own
    `timeout` ends it as timed_out with exit 1."""
    api, _rec, _port = recorder_api(tmp_path, SLEEP_PER_BATCH="0.6")
    items = [json.dumps({"i": i}).encode() for i in range(2)]
    job = write_job(tmp_path / "job.json", raw_job(items, 1))
    root = tmp_path / "root"
    r = run_supervisor(
        "run", str(api), "--job", str(job), "--root", str(root), "--batch-timeout", "0.2"
    )
    assert r.returncode == 1, r.stderr
    status = json.loads(r.stdout)
    assert status["job_status"]["status"] == "completed_with_failures"
    letters = list((root / "cortex" / "supervisor" / "dead-letters").glob("*/*.json"))
    assert len(letters) == 2
    assert "timed out after 0.2s" in json.loads(letters[0].read_bytes())["attempts"][0]["error"]

    many = [json.dumps({"i": i}).encode() for i in range(100)]
    job2 = write_job(tmp_path / "job2.json", raw_job(many, 1, b'"timeout": 2, '))
    r = run_supervisor("run", str(api), "--job", str(job2), "--root", str(root))
    assert r.returncode == 1, r.stderr
    status = json.loads(r.stdout)
    assert status["job_status"]["status"] == "timed_out"
    assert status["metrics"]["succeeded"] < 100


def test_liveness_restart_retries_in_flight_batch(tmp_path: Path, backend: str) -> None:
    """The worker wedges on its first batch and fails liveness: it is restarted, and the batch
    that was in flight is sent again without counting as a failed attempt."""
    port = free_ports()
    rec = tmp_path / "rec"
    rec.mkdir()
    api = write_api(
        tmp_path / "api.yaml",
        [
            {
                **recorder_container(RECORD_DIR=str(rec), HANG_ONCE_FILE=str(tmp_path / "hung")),
                "readiness_probe": probe_on(port),
                "liveness_probe": {
                    "http_get": {"port": port, "path": "/live"},
                    "initial_delay_seconds": 1,
                    "period_seconds": 1,
                    "failure_threshold": 1,
                },
            }
        ],
        port=port,
    )
    items = [json.dumps({"i": i}).encode() for i in range(5)]
    job = write_job(tmp_path / "job.json", raw_job(items, 1))
    r = run_supervisor(
        "run",
        str(api),
        "--job",
        str(job),
        "--root",
        str(tmp_path / "root"),
        "--grace",
        "1",
        backend=backend,
    )
    assert r.returncode == 0, r.stderr
    status = json.loads(r.stdout)
    assert status["metrics"]["succeeded"] == 5
    assert status["metrics"]["failed"] == 0
    assert "container_restart" in r.stderr
    records = batches_of(read_records(rec))
    assert records[0]["status"] == "hung"
    ok = [json.loads(b["body"])[0]["i"] for b in records if b["status"] == 200]
    assert sorted(ok) == list(range(5))
    assert len({b["pid"] for b in records}) == 2


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP])
def test_fresh_starts_a_new_job(tmp_path: Path, sig: signal.Signals) -> None:
    """Stopped by a signal (Ctrl-C, or the terminal closing), then started over with --fresh."""
    api, rec, _port = recorder_api(tmp_path, SLEEP_PER_BATCH="0.05")
    items = [json.dumps({"i": i}).encode() for i in range(30)]
    job = write_job(tmp_path / "job.json", raw_job(items, 1))
    root = tmp_path / "root"
    args = ["run", str(api), "--job", str(job), "--root", str(root), "--grace", "1"]
    proc = start_supervisor(args)
    try:
        wait_for_batches(rec, 3, proc)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 128 + sig, err
    first = json.loads(out)["job_status"]["job_id"]
    r = run_supervisor(*args, "--fresh")
    assert r.returncode == 0, r.stderr
    status = json.loads(r.stdout)
    assert status["job_status"]["job_id"] != first
    assert status["metrics"]["succeeded"] == 30  # all of it again, not the rest


def test_supervisor_killed_alone_takes_its_containers_along(tmp_path: Path) -> None:
    """Only the supervisor is SIGKILLed (the OOM killer's choice, say): its containers must
    not outlive it and keep pod.port, or the next run could not start."""
    api, rec, _port = recorder_api(tmp_path, SLEEP_PER_BATCH="0.05")
    items = [json.dumps({"i": i}).encode() for i in range(500)]
    job = write_job(tmp_path / "job.json", raw_job(items, 1))
    proc = start_supervisor(["run", str(api), "--job", str(job), "--root", str(tmp_path / "root")])
    try:
        wait_for_batches(rec, 3, proc)
        os.kill(proc.pid, signal.SIGKILL)  # the supervisor only, not its process group
        proc.communicate(timeout=30)
        pids = {b["pid"] for b in read_records(rec)}
        deadline = time.monotonic() + 10
        while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)  # the kernel delivers the parent-death signal asynchronously
        assert pids and not any(pid_alive(p) for p in pids)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
