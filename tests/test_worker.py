"""`supervisor worker` pods sharing jobs through a real redis-server, and `serve --queue`.

Each worker is a real process with its own containers (the recording worker) on its own
ports (``--port-offset``); jobs are put in the queue as ``serve --queue`` puts them, or
submitted to a real ``serve``. Leases are short (``--lease 2``) so that a dead pod's batches
move on quickly.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import coredis
import msgspec
import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from supervisor import jobs
from supervisor.jobs import JobSpec, WorkerCounts
from supervisor.proctable import scan_stats
from supervisor.queues import _redis_scripts as S
from supervisor.queues import open_queue
from supervisor.queues.base import Heartbeat, JobRecord
from tests.helpers import (
    batches_of,
    child_env,
    free_ports,
    log_events,
    pid_alive,
    probe_on,
    read_records,
    recorder_container,
    run_supervisor,
    supervisor_cmd,
    write_api,
)
from tests.redis_server import RedisServer
from tests.test_serve import start_serve

LEASE = "2"
WORKER_STATES = WorkerCounts.__struct_fields__
WAIT = 60.0  # seconds: the longest any step here may take


class Worker:
    """One `supervisor worker` process (JSON logs in a file)."""

    def __init__(self, proc: subprocess.Popen[str], log: Path) -> None:
        self.proc, self.log = proc, log

    @classmethod
    def start(cls, log: Path, args: list[str], wrap: tuple[str, ...] = ()) -> Worker:
        """``supervisor worker ARGS`` (under ``wrap``, e.g. ``ip netns exec NS``), logging
        to ``log``, once it said ``worker_started`` (connected to its queue)."""
        with log.open("w") as out:
            proc = subprocess.Popen(
                [*wrap, *supervisor_cmd("worker", *args)],
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
                env=child_env(),
                start_new_session=True,
                stdin=subprocess.DEVNULL,
            )
        worker = cls(proc, log)
        try:
            worker.wait_event("worker_started")
        except BaseException:
            worker.stop()
            raise
        return worker

    def events(self, name: str) -> list[dict[str, Any]]:
        return log_events(self.log, name)

    def wait_event(self, name: str, count: int = 1) -> list[dict[str, Any]]:
        wait_for(lambda: len(self.events(name)) >= count or self._exited(), f"{name}")
        assert self.proc.poll() is None, self.log.read_text()
        return self.events(name)

    def _exited(self) -> bool:
        return self.proc.poll() is not None

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=WAIT)
            except subprocess.TimeoutExpired:
                kill_tree(self.proc.pid)
                self.proc.wait()
        return self.proc.returncode


def wait_for(condition: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def descendants(pid: int) -> list[int]:
    stats = scan_stats()
    out, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        children = [s.pid for s in stats.values() if s.ppid == parent]
        out += children
        frontier += children
    return out


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every process under it at once: a machine that died."""
    for p in [pid, *descendants(pid)]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def api(tmp_path: Path) -> tuple[Path, Path, int]:
    """An API of one recording container (slow batches), gated by /healthz."""
    port = free_ports(4)
    rec = tmp_path / "rec"
    rec.mkdir()
    container = {
        **recorder_container(RECORD_DIR=str(rec), SLEEP_PER_BATCH="0.1"),
        "readiness_probe": {**probe_on(port), "period_seconds": 1},
    }
    # the probe follows CORTEX_PORT: probes aimed at pod.port move with the pod's offset
    return write_api(tmp_path / "api.yaml", [container], port=port), rec, port


def gated_api(tmp_path: Path, api: tuple[Path, Path, int], ready_file: Path) -> Path:
    """The same API, its /healthz answering 200 only while ``ready_file`` exists."""
    _, rec, port = api
    container = {
        **recorder_container(
            RECORD_DIR=str(rec), SLEEP_PER_BATCH="0.1", READY_FILE=str(ready_file)
        ),
        "readiness_probe": {**probe_on(port), "period_seconds": 1},
    }
    return write_api(tmp_path / "gated-api.yaml", [container], port=port)


@pytest.fixture
def workers(
    tmp_path: Path, redis_url: str, api: tuple[Path, Path, int]
) -> Iterator[Callable[..., Worker]]:
    started: list[Worker] = []

    def start(index: int, *extra: str, api_file: Path | None = None) -> Worker:
        log = tmp_path / f"worker-{index}-{time.monotonic_ns()}.log"
        api_path = api[0] if api_file is None else api_file
        args = [str(api_path), "--queue", redis_url, "--root", str(tmp_path / f"w{index}")]
        args += ["--lease", LEASE, "--grace", "5", "--port-offset", str(index), *extra]
        worker = Worker.start(log, args)
        started.append(worker)
        return worker

    try:
        yield start
    finally:
        for w in started:
            w.stop()


# -- the queue, as `serve --queue` uses it --------------------------------------------------


def submit(
    url: str, n: int, workers: int, timeout: int | None = None, attempts: int | None = None
) -> str:
    """Put a job of ``n`` one-item batches in the queue and mark it running (as serve does);
    ``attempts``: its ``max_receive_count``."""
    dlq = None if attempts is None else jobs.DeadLetterQueue(arn="dlq", max_receive_count=attempts)

    async def go() -> str:
        async with open_queue(url) as q:
            spec = JobSpec(
                job_id=jobs.new_job_id(),
                api_name="test-api",
                workers=workers,
                config=None,
                api_id="test",
                sqs_url=q.url,
                timeout=timeout,
                sqs_dead_letter_queue=dlq,
                created_time=jobs.rfc3339(),
            )
            body = msgspec.json.encode(spec)
            await q.create_job(spec.job_id, "test-api", spec.job_id, body, spec.created_time)
            await q.enqueue(spec.job_id, (b'[{"i": %d}]' % i for i in range(n)))
            await q.set_status(spec.job_id, jobs.RUNNING)
            return spec.job_id

    return anyio.run(go)


def job(url: str, job_id: str) -> JobRecord:
    async def go() -> JobRecord | None:
        async with open_queue(url) as q:
            return await q.get_job(job_id)

    record = anyio.run(go)
    assert record is not None
    return record


def heartbeats(url: str, job_id: str) -> list[Heartbeat]:
    async def go() -> list[Heartbeat]:
        async with open_queue(url) as q:
            return await q.pods(job_id)

    return anyio.run(go)


def set_status(url: str, job_id: str, status: str) -> None:
    async def go() -> None:
        async with open_queue(url) as q:
            await q.set_status(job_id, status, end_time=jobs.rfc3339())

    anyio.run(go)


def blocked_readers(url: str) -> int:
    """Clients of Redis blocked in ``XREAD``: idle workers waiting on the joinable stream."""

    async def go() -> int:
        async with coredis.Redis.from_url(url, decode_responses=True) as r:
            clients = await r.client_list()
        return sum(1 for c in clients if c.get("cmd") == "xread" and "b" in c.get("flags", ""))

    return anyio.run(go)


def wait_end(url: str, job_id: str) -> JobRecord:
    holder: list[JobRecord] = []

    def ended() -> bool:
        holder[:] = [job(url, job_id)]
        return holder[0].status in jobs.END_STATES

    wait_for(ended, f"job {job_id} to end")
    return holder[0]


def batch_items(rec: Path) -> list[tuple[int, int]]:
    """(item, port) of every batch the containers answered."""
    return [(json.loads(b["body"])[0]["i"], b["port"]) for b in batches_of(read_records(rec))]


def completions(rec: Path) -> list[dict[str, Any]]:
    return [r for r in read_records(rec) if r["path"] == "/on-job-complete"]


# -- the tests ---------------------------------------------------------------------------


def test_three_workers_share_one_job(
    workers: Callable[..., Worker], redis_url: str, api: tuple[Path, Path, int]
) -> None:
    _, rec, port = api
    pods = [workers(i) for i in range(3)]
    n = 60
    job_id = submit(redis_url, n, workers=3)
    record = wait_end(redis_url, job_id)
    assert record.status == jobs.SUCCEEDED, [p.log.read_text() for p in pods]
    done = batch_items(rec)
    assert sorted(i for i, _ in done) == list(range(n))  # each batch once: nobody died
    helped = {p for _, p in done}
    assert len(helped) >= 2, helped  # shared (three pods joined; at least two helped)
    (complete,) = completions(rec)  # one /on-job-complete across all pods
    assert complete["headers"] and ["X-Cortex-Batches-Succeeded", str(n)] in complete["headers"]
    assert record.worker_counts is not None
    counts = json.loads(record.worker_counts)
    assert counts.get("succeeded", 0) >= 2 and set(counts) <= {"succeeded", "unknown"}, counts
    for p in pods:  # each pod ran its containers for the job, stopped them, and waits again
        assert p.events("job_joined")[0]["job_id"] == job_id
        p.wait_event("job_left")
        assert p.proc.poll() is None
    assert {port + i for i in range(3)} >= {p for _, p in done}


def test_a_killed_worker_s_batches_finish_elsewhere(
    workers: Callable[..., Worker], redis_url: str, api: tuple[Path, Path, int], subreaper: None
) -> None:
    _, rec, port = api
    pods = [workers(i) for i in range(3)]
    n = 40
    # Delivered up to 3 times: a delivery lost with its pod is an attempt (as SQS counts a
    # receive whose visibility ran out), so a single attempt would dead-letter it.
    job_id = submit(redis_url, n, workers=3, attempts=3)
    victim = pods[0]
    wait_for(lambda: any(p == port for _, p in batch_items(rec)), "the victim's first batch")
    kill_tree(victim.proc.pid)  # the worker and its containers, as a machine that dies
    victim.proc.wait()
    record = wait_end(redis_url, job_id)
    assert record.status == jobs.SUCCEEDED
    assert (record.succeeded, record.dead) == (n, 0)
    done = batch_items(rec)
    seen = Counter(i for i, _ in done)
    assert set(seen) == set(range(n))  # none lost
    victims = {i for i, p in done if p == port}
    assert {i for i, c in seen.items() if c > 1} <= victims  # re-sent only after the death
    assert len(completions(rec)) == 1
    for p in pods[1:]:
        assert p.proc.poll() is None


def test_a_worker_that_joins_late_helps(
    workers: Callable[..., Worker], redis_url: str, api: tuple[Path, Path, int]
) -> None:
    _, rec, port = api
    first = workers(0)
    job_id = submit(redis_url, 60, workers=2)
    wait_for(lambda: len(batch_items(rec)) >= 3, "the first pod's batches")
    # one pod of two, ready by its heartbeat (sent every third of the lease)
    wait_for(lambda: [b.state for b in heartbeats(redis_url, job_id)] == ["ready"], "a beat")
    late = workers(1)
    late.wait_event("job_joined")
    record = wait_end(redis_url, job_id)
    assert record.status == jobs.SUCCEEDED, first.log.read_text()
    ports = Counter(p for _, p in batch_items(rec))
    assert ports[port + 1] >= 1  # the late pod took batches
    assert sum(ports.values()) == 60
    assert len(completions(rec)) == 1


def test_a_third_pod_waits_when_two_are_enough(
    workers: Callable[..., Worker], redis_url: str, api: tuple[Path, Path, int]
) -> None:
    _, rec, _port = api
    pods = [workers(i) for i in range(3)]
    job_id = submit(redis_url, 30, workers=2)
    record = wait_end(redis_url, job_id)
    assert record.status == jobs.SUCCEEDED
    joined = [p for p in pods if p.events("job_joined")]
    assert len(joined) == 2  # at most `workers` pods on one job
    assert len(completions(rec)) == 1


@pytest.mark.parametrize("end", ["stopped", "timed_out"])
def test_a_stop_or_timeout_reaches_every_pod(
    workers: Callable[..., Worker],
    redis_url: str,
    api: tuple[Path, Path, int],
    end: str,
) -> None:
    _, rec, _port = api
    pods = [workers(i) for i in range(2)]
    job_id = submit(redis_url, 400, workers=2, timeout=4 if end == "timed_out" else None)
    for p in pods:
        p.wait_event("job_joined")
    wait_for(lambda: len(batch_items(rec)) >= 4, "batches")
    if end == "stopped":
        set_status(redis_url, job_id, jobs.STOPPED)  # what `serve`'s stop does
    for p in pods:  # each pod stops its containers and waits for the next job
        p.wait_event("job_left")
        assert p.proc.poll() is None
    record = job(redis_url, job_id)
    assert record.status == end
    assert record.succeeded < 400
    assert completions(rec) == []
    after = len(batch_items(rec))
    # nothing is sent once every pod has left the job
    assert len(batch_items(rec)) == after


def test_idle_workers_wake_at_once_for_a_job_and_for_a_place_left(
    workers: Callable[..., Worker], redis_url: str, api: tuple[Path, Path, int]
) -> None:
    # --poll 30 (and a lease as long, which also bounds it): on their own the workers would
    # look for a job every 30 s. A job started, and a place its pod left, wake them at once
    # (within `prompt`), and a signal stops an idle one at once.
    prompt = 15.0
    pods = [workers(i, "--poll", "30", "--lease", "60") for i in range(3)]
    wait_for(lambda: blocked_readers(redis_url) == 3, "three idle workers", prompt)
    pods[2].proc.send_signal(signal.SIGTERM)
    assert pods[2].proc.wait(timeout=prompt) == 128 + signal.SIGTERM
    job_id = submit(redis_url, 400, workers=1)
    wait_for(lambda: any(p.events("job_joined") for p in pods[:2]), "a pod joining", prompt)
    pod, idle = pods[:2] if pods[0].events("job_joined") else pods[1::-1]
    wait_for(lambda: blocked_readers(redis_url) == 1, "the other one idle again", prompt)
    assert not idle.events("job_joined")  # one place: taken
    pod.proc.send_signal(signal.SIGTERM)  # it leaves the job: its place is free
    pod.wait_event("job_left")
    wait_for(lambda: bool(idle.events("job_joined")), "the idle pod taking the place", prompt)
    assert idle.events("job_joined")[0]["job_id"] == job_id
    assert pod.proc.wait(timeout=WAIT) == 128 + signal.SIGTERM


def test_serve_and_workers(
    tmp_path: Path,
    workers: Callable[..., Worker],
    redis_url: str,
    api: tuple[Path, Path, int],
) -> None:
    api_file, rec, _port = api
    first = start_serve(tmp_path, [api_file], "--queue", redis_url, root=tmp_path / "s1")
    second = start_serve(tmp_path, [api_file], "--queue", redis_url, root=tmp_path / "s2")
    try:
        first.wait_listening()
        second.wait_listening()
        pods = [workers(i, "--admin", "127.0.0.1:0") for i in range(2)]
        job = {"workers": 2, "item_list": {"items": [{"i": i} for i in range(30)], "batch_size": 1}}
        r = first.submit("test-api", job)
        assert r.status_code == 200, r.text
        spec = r.json()
        job_id = spec["job_id"]
        assert spec["sqs_url"] == redis_url
        assert not first.events("container_started")  # serve starts no pods of its own
        seen: list[dict[str, Any]] = []

        def ready_seen() -> bool:
            status = second.get("test-api", job_id)["job_status"]  # the other serve answers
            seen.append(status)
            return status["worker_counts"].get("ready", 0) >= 1 or status["status"] != "running"

        wait_for(ready_seen, "a ready pod in worker_counts")
        assert seen[-1]["status"] == "running", seen  # counts from the pods' heartbeats
        admin = pods[0].events("admin_listening")[0]["port"]
        assert requests.get(f"http://127.0.0.1:{admin}/status", timeout=10).json()["pod_id"]
        final = second.wait_end("test-api", job_id)
        assert final["job_status"]["status"] == "succeeded"
        assert final["metrics"]["succeeded"] == 30
        listed = requests.get(f"{first.url}/test-api", timeout=10).json()
        assert [j["job_id"] for j in listed["batch_job_statuses"]] == [job_id]
        letters = requests.get(
            f"{second.url}/test-api/dead-letters", params={"jobID": job_id}, timeout=10
        )
        assert letters.status_code == 200 and letters.json()["dead_letters"] == []
        assert len(completions(rec)) == 1
        assert sorted(i for i, _ in batch_items(rec)) == list(range(30))
        metrics = requests.get(f"http://127.0.0.1:{admin}/metrics", timeout=10).text
        assert "cortex_batch_succeeded_total" in metrics
        pods[0].wait_event("job_left")  # until then it may be stopping its containers: 503
        assert requests.get(f"http://127.0.0.1:{admin}/healthz", timeout=10).status_code == 200
        # a stop through either serve reaches the pods
        r = first.submit(
            "test-api",
            {**job, "item_list": {**job["item_list"], "items": [{"i": i} for i in range(400)]}},
        )
        job_id = r.json()["job_id"]
        wait_for(
            lambda: (
                second.get("test-api", job_id)["job_status"]["worker_counts"].get("ready", 0) == 2
            ),
            "both pods on the second job",
        )
        stop = requests.delete(f"{second.url}/test-api", params={"jobID": job_id}, timeout=10)
        assert stop.status_code == 200, stop.text
        for p in pods:
            p.wait_event("job_left", 2)
        assert first.get("test-api", job_id)["job_status"]["status"] == "stopped"
    finally:
        assert first.stop() == 128 + signal.SIGTERM
        assert second.stop() == 128 + signal.SIGTERM


def test_serve_answers_a_full_redis_with_one_sentence(
    tmp_path: Path, api: tuple[Path, Path, int]
) -> None:
    server = RedisServer(tmp_path, "--maxmemory", "2mb", "--maxmemory-policy", "noeviction")
    server.start()
    serve = None
    try:
        serve = start_serve(tmp_path, [api[0]], "--queue", server.url(), root=tmp_path / "s")
        items = [{"i": i, "pad": "x" * 4096} for i in range(1000)]  # 4 MiB of batches
        r = serve.submit("test-api", {"workers": 1, "item_list": {"items": items, "batch_size": 1}})
        assert r.status_code == 507, r.text
        error = r.json()
        assert error["kind"] == "insufficient_storage"
        assert "maxmemory" in error["message"] and "xxxx" not in error["message"]
        listed = requests.get(f"{serve.url}/test-api", timeout=10)  # serve is still up
        assert listed.status_code == 200 and listed.json()["batch_job_statuses"] == []
        small = {"workers": 1, "item_list": {"items": [{"i": 0}], "batch_size": 1}}
        assert serve.submit("test-api", small).status_code == 200  # room again: accepted
    finally:
        if serve is not None:
            assert serve.stop() == 128 + signal.SIGTERM
        server.kill()


def test_a_job_whose_submitter_died_mid_enqueue_ends_enqueue_failed(
    tmp_path: Path, redis_url: str, api: tuple[Path, Path, int]
) -> None:
    """One serve enqueues (its lease is live): a second serve starting on the same Redis
    leaves the job alone. Once the enqueuer's lease is gone (it was killed), the job is
    reported, and recorded, ``enqueue_failed`` instead of ``enqueuing`` for ever."""
    job_id = jobs.new_job_id()

    async def half_enqueued() -> None:  # what serve does first, then it was killed
        async with open_queue(redis_url) as q:
            spec = JobSpec(
                job_id=job_id,
                api_name="test-api",
                workers=1,
                config=None,
                api_id="test",
                sqs_url=q.url,
                created_time=jobs.rfc3339(),
            )
            await q.create_job(
                job_id, "test-api", job_id, msgspec.json.encode(spec), spec.created_time
            )

    anyio.run(half_enqueued)
    s = start_serve(tmp_path, [api[0]], "--queue", redis_url, root=tmp_path / "s")
    try:
        assert s.get("test-api", job_id)["job_status"]["status"] == "enqueuing"
        assert job(redis_url, job_id).status == "enqueuing"

        async def lease_gone() -> None:  # what ENQUEUE_LEASE seconds after a kill leave
            async with coredis.Redis.from_url(redis_url) as r:
                assert await r.delete([S.job_keys(job_id).enqueuer]) == 1

        anyio.run(lease_gone)
        listed = requests.get(f"{s.url}/test-api", timeout=10).json()["batch_job_statuses"]
        assert [(j["job_id"], j["status"]) for j in listed] == [(job_id, "enqueue_failed")]
        assert s.get("test-api", job_id)["job_status"]["status"] == "enqueue_failed"
        record = job(redis_url, job_id)
        assert (record.status, record.end_time is not None) == ("enqueue_failed", True)
    finally:
        assert s.stop() == 128 + signal.SIGTERM


def test_worker_refuses_a_queue_it_cannot_share(
    tmp_path: Path, api: tuple[Path, Path, int]
) -> None:
    result = run_supervisor("worker", str(api[0]), "--queue", str(tmp_path / "q.db"))
    assert result.returncode == 2
    assert "redis://" in result.stderr and "Traceback" not in result.stderr


def test_a_worker_s_containers_chain_through_serve(
    tmp_path: Path, workers: Callable[..., Worker], redis_url: str
) -> None:
    """With --operator-endpoint, a worker's containers get the chaining environment serve
    gives its own: a container of API `first` submits jobs to API `second` through serve,
    with the Python client (cli.yaml) and with plain requests (the endpoint and token)."""
    rec = tmp_path / "chain-rec"
    rec.mkdir()
    port = free_ports(4)
    second = write_api(
        tmp_path / "second.yaml",
        [recorder_container(RECORD_DIR=str(rec))],
        port=port + 2,
        name="second",
    )
    out = tmp_path / "chained.json"
    code = (
        "import json, os, requests\n"
        "from supervisor.client import Client\n"
        "spec = Client().submit('second', {'workers': 1, 'item_list': {'items': [1, 2], 'batch_size': 1}})\n"
        "auth = {'Authorization': 'Bearer ' + os.environ['SUPERVISOR_TOKEN']}\n"
        "r = requests.post(os.environ['CORTEX_OPERATOR_ENDPOINT'] + '/second', headers=auth,\n"
        "                  json={'workers': 1, 'item_list': {'items': [3], 'batch_size': 1}})\n"
        "found = [spec.job_id, r.json()['job_id'], os.environ['CORTEX_OPERATOR_ENDPOINT']]\n"
        f"open({str(out)!r}, 'w').write(json.dumps(found))\n"
        "import time; time.sleep(3600)\n"
    )
    first = write_api(
        tmp_path / "first.yaml",
        [
            {"name": "chain", "command": [sys.executable, "-c", code]},
            recorder_container(RECORD_DIR=str(rec), SLEEP_PER_BATCH="0.1"),
        ],
        port=port,
        name="first",
    )
    token = tmp_path / "token"
    token.write_text("chain-token")  # the chain must authenticate, with what the worker gives
    s = start_serve(
        tmp_path,
        [first, second],
        "--queue",
        redis_url,
        "--token-file",
        str(token),
        root=tmp_path / "s",
        token="chain-token",
    )
    try:
        chaining = workers(
            0, "--operator-endpoint", s.url, "--token-file", str(token), api_file=first
        )
        workers(1, api_file=second)  # runs the chained jobs (on port + 2 + 1)
        job_id = s.submit(
            "first", {"workers": 1, "item_list": {"items": list(range(400)), "batch_size": 1}}
        ).json()["job_id"]
        wait_for(lambda: out.exists() and bool(out.read_text()), "the chained submissions")
        *chained, endpoint = json.loads(out.read_text())
        assert endpoint == s.url
        for chained_id in chained:
            assert s.wait_end("second", chained_id)["job_status"]["status"] == "succeeded"
        stop = requests.delete(
            f"{s.url}/first", params={"jobID": job_id}, headers=s.headers(), timeout=10
        )
        assert stop.status_code == 200, stop.text
        chaining.wait_event("job_left")
        cli_yaml = tmp_path / "w0" / "cortex" / "client" / "cli.yaml"
        assert yaml.safe_load(cli_yaml.read_text())["environments"][0]["operator_endpoint"] == s.url
    finally:
        assert s.stop() == 128 + signal.SIGTERM


def test_worker_refuses_an_operator_endpoint_that_is_no_url(
    tmp_path: Path, redis_url: str, api: tuple[Path, Path, int]
) -> None:
    result = run_supervisor(
        "worker", str(api[0]), "--queue", redis_url, "--operator-endpoint", "supervisor-serve:8888"
    )
    assert result.returncode == 2
    assert "--operator-endpoint" in result.stderr and "Traceback" not in result.stderr


def test_one_pod_s_container_crash_ends_the_job_on_every_pod(
    tmp_path: Path, workers: Callable[..., Worker], redis_url: str
) -> None:
    """A container of one pod of three exits on its own mid-job: the job ends worker_error
    with that pod counted failed, no /on-job-complete, and every pod stops its containers
    and waits, healthy, for the next job."""
    port = free_ports(4)
    rec = tmp_path / "crash-rec"
    rec.mkdir()
    crash = tmp_path / "crash-now"
    container = {
        **recorder_container(
            RECORD_DIR=str(rec),
            SLEEP_PER_BATCH="0.1",
            CRASH_FILE=str(crash),
            CRASH_ON_PORT=str(port + 1),
        ),
        "readiness_probe": {**probe_on(port), "period_seconds": 1},
    }
    api_file = write_api(tmp_path / "crash.yaml", [container], port=port)
    pods = [workers(i, "--admin", "127.0.0.1:0", api_file=api_file) for i in range(3)]
    job_id = submit(redis_url, 400, workers=3)
    # every pod at work, then the container of the second pod exits at its next batch
    wait_for(lambda: {p for _, p in batch_items(rec)} == {port, port + 1, port + 2}, "3 pods")
    crash.touch()
    record = wait_end(redis_url, job_id)
    assert record.status == jobs.WORKER_ERROR, [p.log.read_text() for p in pods]
    assert record.succeeded < 400
    for p in pods:  # each pod leaves the job and stops its containers, but lives on
        p.wait_event("job_left")
        wait_for(lambda p=p: not [c for c in descendants(p.proc.pid) if pid_alive(c)], "stopped")
        admin = p.events("admin_listening")[0]["port"]
        health = requests.get(f"http://127.0.0.1:{admin}/healthz", timeout=10)
        assert health.status_code == 200
        status = requests.get(f"http://127.0.0.1:{admin}/status", timeout=10).json()
        assert status["state"] == "waiting" and status["job"] is None
    assert completions(rec) == []  # /on-job-complete follows only a job that completed
    assert record.worker_counts is not None
    counts = json.loads(record.worker_counts)
    assert counts.get("failed") == 1, counts  # the pod whose container crashed
    assert set(counts) <= {"failed", "killed", "unknown"}, counts
    crashed = pods[1]
    assert crashed.events("pod_failed")
    assert all(not p.events("pod_failed") for p in (pods[0], pods[2]))


def job_samples(url: str, job_id: str) -> dict[tuple[str, str], float]:
    """(sample name, state label) -> value, of ``job_id``'s series on ``url``/metrics."""
    text = requests.get(f"{url}/metrics", timeout=10).text
    return {
        (sample.name, sample.labels.get("state", "")): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.labels.get("job_id") == job_id and not sample.name.endswith("_created")
    }


def test_serve_metrics_add_up_every_pod(
    tmp_path: Path, workers: Callable[..., Worker], redis_url: str
) -> None:
    """serve --queue runs no pod, yet its /metrics show each job's figures from the queue,
    summed over the pods: the same series as run --admin, matching the job's status."""
    port = free_ports(4)
    rec = tmp_path / "metrics-rec"
    rec.mkdir()
    container = {
        **recorder_container(
            RECORD_DIR=str(rec), SLEEP_PER_BATCH="0.05", FAIL_ITEMS='[{"i": 3}, {"i": 7}]'
        ),
        "readiness_probe": {**probe_on(port), "period_seconds": 1},
    }
    api_file = write_api(tmp_path / "metrics.yaml", [container], port=port)
    s = start_serve(tmp_path, [api_file], "--queue", redis_url, root=tmp_path / "s")
    try:
        pods = [workers(i, api_file=api_file) for i in range(2)]
        job = {
            "workers": 2,
            "item_list": {"items": [{"i": i} for i in range(60)], "batch_size": 1},
            "sqs_dead_letter_queue": {"arn": "dlq", "max_receive_count": 2},
        }
        job_id = s.submit("test-api", job).json()["job_id"]
        running = job_samples(s.url, job_id)  # seen running: exported from now on
        assert running[("supervisor_job_batches", "")] == 60, running
        assert ("supervisor_job_workers", "pending") in running
        final = s.wait_end("test-api", job_id)
        assert final["job_status"]["status"] == "completed_with_failures", [
            p.log.read_text() for p in pods
        ]
        counts = final["job_status"]["worker_counts"]
        want = {
            ("cortex_batch_succeeded_total", ""): final["metrics"]["succeeded"],
            ("cortex_batch_failed_total", ""): final["metrics"]["failed"],
            ("supervisor_job_batches", ""): 60,
            ("supervisor_job_dead_batches", ""): 2,
            **{("supervisor_job_workers", k): counts.get(k, 0) for k in WORKER_STATES},
        }
        assert final["metrics"]["succeeded"] == 58 and final["metrics"]["failed"] == 4
        seen: list[dict[tuple[str, str], float]] = []

        def matches() -> bool:
            seen[:] = [job_samples(s.url, job_id)]
            return all(seen[0].get(k) == v for k, v in want.items())

        wait_for(matches, f"serve's /metrics to match the status: {want} vs {seen}")
    finally:
        assert s.stop() == 128 + signal.SIGTERM


def test_a_pod_that_never_gets_ready_holds_no_batch(
    workers: Callable[..., Worker], redis_url: str, api: tuple[Path, Path, int], tmp_path: Path
) -> None:
    """A pod whose containers never get ready reads nothing ahead: the job finishes through
    the other pod instead of waiting on batches the stuck pod would renew forever."""
    _, rec, port = api
    never = workers(0, "--concurrency", "2", api_file=gated_api(tmp_path, api, tmp_path / "no"))
    n = 30
    job_id = submit(redis_url, n, workers=2)
    never.wait_event("job_joined")
    never.wait_event("pod_not_ready")  # its feed has been open for a while
    ready = workers(1, "--concurrency", "2")
    holder: list[JobRecord] = []

    def ended() -> bool:
        holder[:] = [job(redis_url, job_id)]
        return holder[0].status in jobs.END_STATES

    wait_for(ended, f"job {job_id} to end", timeout=30)  # it never ends if batches are held
    record = holder[0]
    assert record.status == jobs.SUCCEEDED, ready.log.read_text()
    assert (record.succeeded, record.dead, record.failed_attempts) == (n, 0, 0)
    done = batch_items(rec)
    assert sorted(i for i, _ in done) == list(range(n))
    assert {p for _, p in done} == {port + 1}
    assert len(completions(rec)) == 1
    never.wait_event("job_left")


def test_a_pod_that_stops_being_ready_gives_back_what_it_read_ahead(
    workers: Callable[..., Worker], redis_url: str, api: tuple[Path, Path, int], tmp_path: Path
) -> None:
    """A pod that served, then fails its readiness probe for good, keeps no batch it is not
    sending: what it read ahead goes back uncounted and the other pod finishes the job."""
    _, rec, port = api
    ready_file = tmp_path / "ready"
    ready_file.touch()
    hung = workers(0, "--concurrency", "2", api_file=gated_api(tmp_path, api, ready_file))
    n = 200
    job_id = submit(redis_url, n, workers=2)
    wait_for(lambda: any(p == port for _, p in batch_items(rec)), "the first pod's batches")
    before = len(hung.events("pod_not_ready"))
    ready_file.unlink()  # its probe fails from now on
    hung.wait_event("pod_not_ready", before + 1)
    other = workers(1, "--concurrency", "2")
    holder: list[JobRecord] = []

    def ended() -> bool:
        holder[:] = [job(redis_url, job_id)]
        return holder[0].status in jobs.END_STATES

    wait_for(ended, f"job {job_id} to end", timeout=30)
    record = holder[0]
    assert record.status == jobs.SUCCEEDED, other.log.read_text()
    assert (record.succeeded, record.dead, record.failed_attempts) == (n, 0, 0)
    done = batch_items(rec)
    assert {i for i, _ in done} == set(range(n))
    assert {p for _, p in done} == {port, port + 1}
    assert len(completions(rec)) == 1
    hung.wait_event("job_left")


@pytest.mark.parametrize("command", ["worker", "serve"])
def test_a_redis_that_cannot_be_used_is_one_sentence_and_exit_2(
    tmp_path: Path, api: tuple[Path, Path, int], command: str
) -> None:
    server = RedisServer(tmp_path, "--requirepass", "right")

    def refused(url: str, message: str) -> None:
        args = [str(api[0]), "--queue", url, "--root", str(tmp_path / command)]
        if command == "serve":
            args += ["--listen", "127.0.0.1:0"]
        result = run_supervisor(command, *args)
        assert result.returncode == 2, (url, result.stdout, result.stderr)
        assert message in result.stderr, result.stderr
        assert result.stderr.count("\n") == 1, result.stderr  # one sentence, no traceback
        assert "wrong" not in result.stderr

    refused(server.url(), "cannot reach Redis at")  # not started: nothing listens
    server.start()
    try:
        refused(server.url(password="wrong"), "refused the password")
        refused(server.url(), "needs a password: put it in the queue URL")
    finally:
        server.kill()
