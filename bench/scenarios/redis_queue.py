"""Redis: batches/s through the Redis queue with 1, 2 and 4 pods, beside the embedded queue.

Against worker (a) (the fastest) and worker (d) (10 ms per batch), batches of 10 items,
``--concurrency 16`` per pod. Per repeat and worker: ``supervisor run`` (the embedded queue,
one pod), then one job each of ``workers: 1``, ``2`` and ``4`` through a redis-server of the
bench's own (loopback, AOF on, as tests/redis_server.py starts it) worked on by four
``supervisor worker`` processes started once per worker (each its own containers on
``pod.port + K`` with ``--port-offset K``; ``workers: N`` lets N of them join). The job is
put in Redis as ``serve --queue`` puts it (``open_queue`` + ``create_job`` + ``enqueue``
+ ``running``), the same batch bodies ``supervisor run`` cuts from its item_list job.

Timing (the same on both sides): the worker program holds every batch unanswered
(``$BENCH_GATE``) until the bench posts ``/bench-gate`` to it; the bench does so once each
of the N pods' containers has its first batch (the ``first_batch`` stamps). The interval runs
from that post to the worker's ``job_complete`` stamp (the one ``/on-job-complete``, sent
after the last batch was acknowledged). So pod start-up, joining (a pod looks for work every
2 s), readiness and enqueueing are outside it, and all pods start together; every batch of
the job is answered inside it.

Costs over the same interval, per batch: the pods' processes' CPU (``/proc/<pid>/stat``
utime+stime, the containers not included; all four pods, the idle ones poll every 2 s), and
from ``INFO all`` deltas of the redis-server: its CPU (used_cpu_user+sys), round trips
(``total_reads_processed``: one per read of a client socket, so pipelined commands that
arrive together count once), script calls (EVALSHA/EVAL/FCALL: one request each) and
commands (``total_commands_processed``: each command a script runs counts too). The bench's
own INFO is subtracted.

Pinning: the worker programs on CPU 0 as elsewhere; the pods, ``supervisor run`` and
redis-server are not pinned (on 2 CPUs four pods, four workers and Redis share them: against
worker (a), 2 and 4 pods are CPU-bound and say so).
"""

from __future__ import annotations

import http.client
import json
import os
import random
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio

from bench import data
from bench.procs import Procs
from bench.product import WORKERS, supervisor_argv, why, write_api
from bench.scenarios import Context
from bench.table import Row, Series

PODS = (1, 2, 4)
BATCH = 10  # items per batch
CONCURRENCY = 16  # batches in flight per pod
A_BATCHES = (20_000, 5_000)  # worker (a): batches per job (full, quick)
D_PER_POD = (4_000, 1_000)  # worker (d): batches per pod (~1,600/s per pod at best)
WAIT = 60.0  # seconds: the longest a pod may take to get its first batch
TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class RedisCost:
    reads: float
    commands: float
    scripts: float
    cpu: float  # seconds


@dataclass(frozen=True)
class Window:
    """One job, timed from the gate to job_complete."""

    batches: int
    seconds: float
    cpu: float  # the pods' (or supervisor run's) CPU seconds in the window
    redis: RedisCost | None = None

    @property
    def rate(self) -> float:
        return self.batches / self.seconds


# -- measuring --------------------------------------------------------------------------------


def proc_cpu(pid: int) -> float:
    """utime + stime of ``pid`` (its threads included, its children not), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def redis_info(port: int) -> dict[str, str]:
    """``INFO all`` of the redis-server on 127.0.0.1:port, as {field: value}."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"INFO all\r\n")
        buf = b""
        while b"\r\n" not in buf:
            buf += s.recv(65536)
        head, _, buf = buf.partition(b"\r\n")
        size = int(head[1:])
        while len(buf) < size:
            chunk = s.recv(65536)
            if not chunk:
                raise ConnectionError("redis-server closed the connection")
            buf += chunk
    out = {}
    for line in buf[:size].decode().splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key] = value
    return out


def _calls(info: dict[str, str], command: str) -> int:
    m = re.match(r"calls=(\d+)", info.get(f"cmdstat_{command}", ""))
    return int(m.group(1)) if m else 0


def redis_counters(port: int) -> RedisCost:
    info = redis_info(port)
    return RedisCost(
        reads=float(info["total_reads_processed"]),
        commands=float(info["total_commands_processed"]) - _calls(info, "info"),
        scripts=float(sum(_calls(info, c) for c in ("evalsha", "eval", "fcall", "evalsha_ro"))),
        cpu=float(info["used_cpu_user"]) + float(info["used_cpu_sys"]),
    )


def redis_delta(before: RedisCost, after: RedisCost) -> RedisCost:
    return RedisCost(
        reads=after.reads - before.reads - 1,  # the second INFO's own read
        commands=after.commands - before.commands,
        scripts=after.scripts - before.scripts,
        cpu=after.cpu - before.cpu,
    )


def stamp_lines(path: Path) -> list[tuple[str, float]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        what, _, ts = line.partition(" ")
        if ts:
            out.append((what, float(ts)))
    return out


def open_gates(
    stamps: Path, pods: int, ports: list[int], procs: list[subprocess.Popen[bytes]]
) -> float:
    """Once ``pods`` containers have their first batch, ``POST /bench-gate`` to every port
    (a pod not in the job has nothing there); returns the time.time() before the first post."""
    deadline = time.monotonic() + WAIT
    while sum(1 for what, _ in stamp_lines(stamps) if what == "first_batch") < pods:
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"a supervisor process exited ({p.returncode})")
        if time.monotonic() > deadline:
            got = sum(1 for what, _ in stamp_lines(stamps) if what == "first_batch")
            raise TimeoutError(f"{got} of {pods} pods got a batch within {WAIT:g} s")
        time.sleep(0.002)
    conns = []
    for port in ports:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            conn.connect()
        except OSError:
            continue  # this pod is not in the job
        conns.append(conn)
    start = time.time()
    for conn in conns:
        conn.request("POST", "/bench-gate", body=b"")
    for conn in conns:
        conn.getresponse().read()
        conn.close()
    return start


def wait_complete(stamps: Path, procs: list[subprocess.Popen[bytes]], timeout: float) -> float:
    """The worker's ``job_complete`` stamp, once it is there."""
    deadline = time.monotonic() + timeout
    while True:
        done = [ts for what, ts in stamp_lines(stamps) if what == "job_complete"]
        if done:
            return done[0]
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"a supervisor process exited ({p.returncode})")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the job did not complete within {timeout:g} s")
        time.sleep(0.01)


# -- the embedded queue -----------------------------------------------------------------------


def embedded(ctx: Context, worker: str, job: Path, n: int) -> Window:
    """``supervisor run`` of the item_list job, gated and timed like the Redis jobs."""
    root = ctx.fresh_dir("redis-embedded")
    stamps = root / "stamps.txt"
    port = port_block(1)
    api = write_api(root / "api.yaml", worker, port, stamps, gate=True)
    argv = supervisor_argv("run", str(api), "--job", str(job), "--root", str(root))
    argv += ["--concurrency", str(CONCURRENCY), "--fresh"]
    out, err = root / "status.json", root / "run.log"
    with out.open("wb") as o, err.open("wb") as e:
        proc = ctx.procs.start(argv, stdout=o, stderr=e)
    try:
        start = open_gates(stamps, 1, [port], [proc])
        cpu = proc_cpu(proc.pid)
        end = wait_complete(stamps, [proc], timeout=30 + n / 100)
        cpu = proc_cpu(proc.pid) - cpu
        code = proc.wait(60)
        if code != 0:
            raise RuntimeError(f"supervisor run exited {code}: {err.read_text()[-200:]}")
        succeeded = int(json.loads(out.read_text())["metrics"]["succeeded"])
        if succeeded != n:
            raise RuntimeError(f"supervisor run: {succeeded} of {n} batches succeeded")
        return Window(batches=n, seconds=end - start, cpu=cpu)
    finally:
        ctx.procs.stop(proc)
        shutil.rmtree(root, ignore_errors=True)


# -- the Redis queue --------------------------------------------------------------------------


class Pods:
    """Four ``supervisor worker`` processes on one API and one redis-server."""

    def __init__(self, procs: Procs, root: Path, worker: str, url: str, count: int) -> None:
        self.url = url
        self.stamps = root / "stamps.txt"
        base = port_block(count)
        self.ports = [base + i for i in range(count)]
        api = write_api(root / "api.yaml", worker, base, self.stamps, gate=True)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []
        for i in range(count):
            log = root / f"pod-{i}.log"
            argv = supervisor_argv(
                "worker", str(api), "--queue", url, "--root", str(root / f"p{i}")
            )
            argv += ["--port-offset", str(i), "--concurrency", str(CONCURRENCY)]
            with log.open("wb") as f:
                self.procs.append(procs.start(argv, stdout=f, stderr=f))
            self.logs.append(log)
        deadline = time.monotonic() + WAIT
        for proc, log in zip(self.procs, self.logs, strict=True):
            while b'"worker_started"' not in log.read_bytes():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"a supervisor worker did not start: {log.read_text()[-300:]}"
                    )
                time.sleep(0.02)

    def job(self, bodies: list[bytes], pods: int, redis_port: int) -> Window:
        self.stamps.unlink(missing_ok=True)
        job_id = anyio.run(submit, self.url, iter(bodies), pods)
        try:
            start = open_gates(self.stamps, pods, self.ports, self.procs)
        except (RuntimeError, TimeoutError) as e:
            logs = [log.read_bytes() for log in self.logs]
            joined = [job_id.encode() in text for text in logs]
            tails = "; ".join(
                f"pod {i}: {why(text)}" for i, text in enumerate(logs) if not joined[i]
            )
            raise RuntimeError(f"{e}; {sum(joined)} joined the job; {tails}") from None
        before, cpu = redis_counters(redis_port), sum(proc_cpu(p.pid) for p in self.procs)
        end = wait_complete(self.stamps, self.procs, timeout=30 + len(bodies) / 100)
        cpu = sum(proc_cpu(p.pid) for p in self.procs) - cpu
        cost = redis_delta(before, redis_counters(redis_port))
        status, succeeded = anyio.run(wait_end, self.url, job_id)
        if status != "succeeded" or succeeded != len(bodies):
            raise RuntimeError(f"job {status}: {succeeded} of {len(bodies)} batches succeeded")
        return Window(batches=len(bodies), seconds=end - start, cpu=cpu, redis=cost)


def port_block(count: int) -> int:
    """A port p such that p .. p+count-1 are free on 127.0.0.1 now, below the ephemeral
    range: a pod's port is only written in its API file until its container binds it, and
    meanwhile the many connections of the run must not take it as their local port."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for _ in range(200):
        base = random.randrange(10000, max(10001, low - count))
        try:
            for port in range(base, base + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError(f"no block of {count} free ports")


async def submit(url: str, bodies: Iterator[bytes], workers: int) -> str:
    """Put a job in the queue and mark it running, as ``serve --queue`` does."""
    import msgspec

    from supervisor import jobs
    from supervisor.queues import open_queue

    async with open_queue(url) as q:
        spec = jobs.JobSpec(
            job_id=jobs.new_job_id(),
            api_name="bench",
            workers=workers,
            api_id="bench",
            sqs_url=q.url,
            created_time=jobs.rfc3339(),
        )
        await q.create_job(
            spec.job_id, "bench", spec.job_id, msgspec.json.encode(spec), spec.created_time
        )
        await q.enqueue(spec.job_id, bodies)
        await q.set_status(spec.job_id, jobs.RUNNING)
        return spec.job_id


async def wait_end(url: str, job_id: str) -> tuple[str, int]:
    from supervisor import jobs
    from supervisor.queues import open_queue

    async with open_queue(url) as q:
        with anyio.fail_after(WAIT):
            while True:
                record = await q.get_job(job_id)
                if record is not None and record.status in jobs.END_STATES:
                    return record.status, record.succeeded
                await anyio.sleep(0.02)


# -- the scenario -----------------------------------------------------------------------------


def sizes(ctx: Context, worker: str) -> dict[int, int]:
    """Batches per job for each pod count (0: the embedded run), capped by --max-items."""
    cap = max(1, ctx.max_items // BATCH)
    if worker == "a":
        n = min(A_BATCHES[ctx.quick], cap)
        return {0: n, **dict.fromkeys(PODS, n)}
    per_pod = D_PER_POD[ctx.quick]
    return {0: min(per_pod, cap), **{p: min(per_pod * p, cap) for p in PODS}}


def run(ctx: Context) -> list[Row]:
    rows: list[Row] = []
    for worker in (w for w in ("a", "d") if w in ctx.workers):
        rows += _one_worker(ctx, worker)
    return rows


def _one_worker(ctx: Context, worker: str) -> list[Row]:
    name = f"{WORKERS[worker][1]} B={BATCH} c={CONCURRENCY}"
    n = sizes(ctx, worker)
    emb = Series("embedded (run)")
    emb_cpu = Series("embedded supervisor")
    rate = {p: Series(f"Redis {p} pod{'s' if p > 1 else ''}") for p in PODS}
    cpu = {p: Series(f"supervisor x{p}") for p in PODS}
    trips = {p: Series("round trips") for p in PODS}
    extra = {
        p: [Series("script calls"), Series("commands"), Series("redis-server CPU us")] for p in PODS
    }
    every = [emb, emb_cpu, *rate.values(), *cpu.values(), *trips.values()]
    every += [s for group in extra.values() for s in group]
    bound = f" [CPU-bound: {os.cpu_count()} CPUs]"
    rows: list[Row] = []
    for p in PODS:
        base = [rate[1], emb] if p > 1 else [emb]
        label = f"{name} {p} pod{'s' if p > 1 else ''}" + (bound if worker == "a" and p > 1 else "")
        rows.append(Row("redis", f"{label} ({n[p]} batches)", "batches/s", rate[p], base))
        rows.append(
            Row("redis", f"{label}", "CPU us/batch", cpu[p], [emb_cpu], lower_is_better=True)
        )
        rows.append(Row("redis", f"{label} Redis", "per batch", trips[p], extra[p], ratios=False))
    if "redis-server" in ctx.missing:
        for s in every:
            s.fail(ctx.missing["redis-server"])
        return rows
    items = data.items(max(n.values()) * BATCH)
    work = ctx.fresh_dir(f"redis-{worker}")
    job = data.write_item_list_job(work / "job.json", items[: n[0] * BATCH], BATCH)
    bodies = {p: list(data.bodies(items, BATCH, n[p])) for p in PODS}
    del items

    from tests.redis_server import RedisServer  # the tests' server, started the same way

    server = RedisServer(ctx.fresh_dir("redis-server"))
    pods = None
    try:
        server.start()
        url = server.url()
        pods = Pods(ctx.procs, work, worker, url, max(PODS))
        for rep in range(ctx.repeats):
            ctx.say(f"redis {name} repeat {rep + 1}/{ctx.repeats}: embedded")
            try:
                w = embedded(ctx, worker, job, n[0])
                emb.add(w.rate)
                emb_cpu.add(w.cpu / w.batches * 1e6)
            except Exception as e:
                emb.fail(e)
                emb_cpu.fail(e)
                ctx.say(f"  embedded: {e}")
            for p in PODS:
                ctx.say(f"redis {name} repeat {rep + 1}/{ctx.repeats}: {p} pod(s)")
                try:
                    w = pods.job(bodies[p], p, server.port)
                except Exception as e:
                    for s in (rate[p], cpu[p], trips[p], *extra[p]):
                        s.fail(e)
                    ctx.say(f"  {p} pod(s): {e}")
                    continue
                assert w.redis is not None
                rate[p].add(w.rate)
                cpu[p].add(w.cpu / w.batches * 1e6)
                trips[p].add(w.redis.reads / w.batches)
                for s, value in zip(
                    extra[p],
                    (w.redis.scripts, w.redis.commands, w.redis.cpu * 1e6),
                    strict=True,
                ):
                    s.add(value / w.batches)
    except Exception as e:
        for s in every:
            s.fail(e)
    finally:
        if pods is not None:
            for proc in pods.procs:
                ctx.procs.stop(proc)
        server.kill()
        shutil.rmtree(work, ignore_errors=True)
    return rows
