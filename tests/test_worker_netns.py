"""`supervisor worker` pods on "different hosts": each in its own Linux network namespace.

As Kubernetes pods on different machines, every worker and its containers live in a network
namespace of their own (``ip netns exec``), all on the SAME pod port (no ``--port-offset``),
and reach one real ``redis-server`` over a veth pair: the host side of each pair has an
address in the root namespace that Redis listens on; loopback inside a namespace is the
namespace's own. Needs root and iproute2; skipped (with the reason) where namespaces cannot be
made, as in an unprivileged container.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from supervisor import jobs
from tests.helpers import (
    batches_of,
    free_ports,
    probe_on,
    read_records,
    recorder_container,
    write_api,
)
from tests.redis_server import RedisServer
from tests.test_worker import (
    LEASE,
    Worker,
    completions,
    kill_tree,
    submit,
    wait_end,
    wait_for,
)

PODS = 3
SUBNETS = range(213, 233)  # the first second octet K whose 10.K.0.0/16 the host does not use


@dataclass(frozen=True, slots=True)
class Netns:
    """One pod's "host": a network namespace and the veth pair into it (a /30 of its own)."""

    name: str
    veth: str  # the host side, in the root namespace; the pod side is `eth0` in `name`
    host_ip: str  # the host side's address: where Redis listens for this pod
    pod_ip: str

    def pids(self) -> list[int]:
        """The processes running in the namespace."""
        out = ip("netns", "pids", self.name).stdout
        return [int(p) for p in out.split()]

    def inode(self) -> int:
        return os.stat(f"/run/netns/{self.name}").st_ino


def ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", *args], capture_output=True, text=True, timeout=10, stdin=subprocess.DEVNULL
    )


def unused_subnet() -> int | None:
    """A K for 10.K.i.0/30 that no address or route of the host touches."""
    used = ip("-4", "-o", "addr", "show").stdout + ip("-4", "route", "show", "table", "all").stdout
    for k in SUBNETS:
        if not re.search(rf"(^|[\s/]){re.escape(f'10.{k}.')}", used, re.MULTILINE):
            return k
    return None


def remove(ns: Netns) -> None:
    """Kill whatever still runs in ``ns``, then delete the veth pair and the namespace."""
    for pid in ns.pids():
        kill_tree(pid)
    ip("link", "del", ns.veth)  # both ends at once (absent if it was never made)
    ip("netns", "del", ns.name)


@pytest.fixture
def namespaces() -> Iterator[list[Netns]]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if shutil.which("ip") is None:
        pytest.skip("no `ip` command (iproute2) to make network namespaces")
    k = unused_subnet()
    if k is None:
        pytest.skip(f"every 10.K.0.0/16 for K in {SUBNETS} is in use on this host")
    made: list[Netns] = []
    try:
        for i in range(PODS):
            pid = os.getpid()
            ns = Netns(f"sv-{pid}-{i}", f"sv{pid}h{i}", f"10.{k}.{i}.1", f"10.{k}.{i}.2")
            made.append(ns)
            steps = [
                ("netns", "add", ns.name),
                ("link", "add", ns.veth, "type", "veth", "peer", "name", "eth0", "netns", ns.name),
                ("addr", "add", f"{ns.host_ip}/30", "dev", ns.veth),
                ("link", "set", ns.veth, "up"),
                ("-n", ns.name, "addr", "add", f"{ns.pod_ip}/30", "dev", "eth0"),
                ("-n", ns.name, "link", "set", "eth0", "up"),
                ("-n", ns.name, "link", "set", "lo", "up"),
            ]
            for step in steps:
                r = ip(*step)
                if r.returncode != 0:  # not allowed here (no CAP_NET_ADMIN, no veth, ...)
                    pytest.skip(f"`ip {' '.join(step)}` failed: {r.stderr.strip()}")
        yield made
    finally:
        for ns in made:
            remove(ns)


@pytest.fixture
def redis_on_veths(tmp_path: Path, namespaces: list[Netns]) -> Iterator[RedisServer]:
    """A redis-server on loopback (for the test) and on each pair's host side (for the pods)."""
    directory = tmp_path / "redis"
    directory.mkdir()
    # no password: the pods' addresses are not loopback, which protected mode would refuse
    binds = ["127.0.0.1", *(ns.host_ip for ns in namespaces)]
    with RedisServer(directory, "--bind", *binds, "--protected-mode", "no").running() as server:
        yield server


@pytest.fixture
def api(tmp_path: Path) -> tuple[Path, Path, int]:
    """One recording container (slow batches) gated by /healthz, on one port for every pod."""
    port = free_ports()
    rec = tmp_path / "rec"
    rec.mkdir()
    container = {
        **recorder_container(RECORD_DIR=str(rec), SLEEP_PER_BATCH="0.1"),
        "readiness_probe": {**probe_on(port), "period_seconds": 1},
    }
    return write_api(tmp_path / "api.yaml", [container], port=port), rec, port


@pytest.fixture
def pods(
    tmp_path: Path,
    namespaces: list[Netns],
    redis_on_veths: RedisServer,
    api: tuple[Path, Path, int],
) -> Iterator[Callable[[int], Worker]]:
    """Start the worker of namespace ``i``; every one is stopped at the end."""
    started: list[Worker] = []

    def start(i: int) -> Worker:
        ns = namespaces[i]
        log = tmp_path / f"worker-{i}.log"
        url = redis_on_veths.url(host=ns.host_ip)
        args = [str(api[0]), "--queue", url, "--root", str(tmp_path / f"w{i}")]
        args += ["--lease", LEASE, "--grace", "5"]
        # started: connected to Redis across the veth pair
        worker = Worker.start(log, args, wrap=("ip", "netns", "exec", ns.name))
        started.append(worker)
        return worker

    try:
        yield start
    finally:
        for w in started:
            w.stop()


def test_workers_in_their_own_network_namespaces_share_one_job(
    pods: Callable[[int], Worker],
    namespaces: list[Netns],
    redis_on_veths: RedisServer,
    api: tuple[Path, Path, int],
) -> None:
    _, rec, port = api
    workers = [pods(i) for i in range(PODS)]
    for w, ns in zip(workers, namespaces, strict=True):  # `ip netns exec` ran it in there
        assert os.stat(f"/proc/{w.proc.pid}/ns/net").st_ino == ns.inode()
    url = redis_on_veths.url()
    n = 60
    job_id = submit(url, n, workers=PODS)
    record = wait_end(url, job_id)
    logs = [w.log.read_text() for w in workers]
    assert record.status == jobs.SUCCEEDED, logs
    batches = batches_of(read_records(rec))
    assert sorted(b["body"] for b in batches) == sorted(f'[{{"i": {i}}}]' for i in range(n))
    assert {b["port"] for b in batches} == {port}  # one pod port, the same in every namespace
    # each pod's container is a process of its own, and more than one of them took batches
    helpers = {b["pid"] for b in batches}
    assert len(helpers) >= 2, helpers
    (complete,) = completions(rec)  # one /on-job-complete across all pods
    assert ["X-Cortex-Batches-Succeeded", str(n)] in complete["headers"]
    assert record.worker_counts is not None
    for w in workers:  # each pod joined, ran its containers, stopped them and waits again
        assert w.events("job_joined")[0]["job_id"] == job_id
        w.wait_event("job_left")
    for w in workers:
        assert w.stop() == 128 + signal.SIGTERM, w.log.read_text()
    # nothing the pods started is left running in their namespaces
    wait_for(lambda: not any(ns.pids() for ns in namespaces), "the namespaces to empty")
