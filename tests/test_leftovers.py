"""What a supervisor that died uncleanly left running is ended by the next run on the root."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from supervisor.leftovers import (
    OWNER_ENV,
    RECORDS_DIR,
    Ledger,
    Owner,
    Record,
    Verdict,
    judge,
    plan_sweep,
    read_records,
)
from supervisor.proctable import ProcStat, read_stat
from tests.helpers import (
    RECORDER,
    child_env,
    free_ports,
    pid_alive,
    run_supervisor,
    supervisor_cmd,
    write_api,
    write_job,
)
from tests.helpers import (
    read_records as read_requests,
)

# --------------------------------------------------------------------------------------------
# The decision, as a table

BOOT = "boot-a"
NS = "pid:[4026531836]"
ROOT = "r00t"
ME = 500
OWNER = 100  # the dead supervisor
OWNER_START = 1000


def st(pid: int, *, ppid: int = 1, session: int = 0, start: int = 0, state: str = "S") -> ProcStat:
    return ProcStat(pid, state, ppid, session or pid, session or pid, start or pid * 10)


# The world: init, our own supervisor (500, a child of 499 in session 499), and three
# sessions a dead supervisor left: 200 (leader alive), 300 (leader gone, member 301 left),
# 400 (pid reused by a new leader, with its own member 401), plus a setsid'd daemon 600
# carrying the dead supervisor's marker and 700 carrying a live one's.
WORLD = {
    1: st(1, ppid=0),
    499: st(499),
    ME: st(ME, ppid=499, session=499),
    200: st(200, start=2000),
    201: st(201, ppid=200, session=200),
    202: st(202, ppid=201, session=200, state="Z"),
    301: st(301, session=300),
    400: st(400, start=4001),
    401: st(401, ppid=400, session=400),
    600: st(600),
    700: st(700),
    800: st(800, start=8000),  # a live supervisor
}


def rec(sid: int, start: int, *, owner: int = OWNER, owner_start: int = OWNER_START) -> Record:
    return Record(BOOT, NS, sid, start, owner, owner_start)


def marker(pid: int, start: int, *, root: str = ROOT, ns: str = NS) -> str:
    return Owner(root, ns, pid, start).encode()


@pytest.mark.parametrize(
    ("record", "world", "boot", "verdict", "members"),
    [
        pytest.param(rec(200, 2000), WORLD, BOOT, Verdict.LEFTOVER, [200, 201], id="leader-alive"),
        pytest.param(rec(300, 3000), WORLD, BOOT, Verdict.LEFTOVER, [301], id="leader-dead"),
        pytest.param(rec(400, 4000), WORLD, BOOT, Verdict.PID_REUSED, [], id="reused-pid"),
        pytest.param(rec(900, 9000), WORLD, BOOT, Verdict.GONE, [], id="all-gone"),
        pytest.param(rec(200, 2000), WORLD, "boot-b", Verdict.OTHER_BOOT, [], id="other-boot"),
        pytest.param(
            Record(BOOT, "pid:[1]", 200, 2000, OWNER, OWNER_START),
            WORLD,
            BOOT,
            Verdict.OTHER_BOOT,
            [],
            id="other-pid-namespace",
        ),
        pytest.param(
            rec(200, 2000, owner=800, owner_start=8000),
            WORLD,
            BOOT,
            Verdict.OWNER_ALIVE,
            [],
            id="owner-alive",
        ),
        pytest.param(
            rec(200, 2000, owner=800, owner_start=7999),
            WORLD,
            BOOT,
            Verdict.LEFTOVER,
            [200, 201],
            id="owner-pid-reused",
        ),
        pytest.param(
            rec(200, 2000),
            {**WORLD, 200: st(200, start=2000, state="Z")},
            BOOT,
            Verdict.LEFTOVER,
            [201],
            id="leader-zombie",
        ),
    ],
)
def test_judge(
    record: Record, world: dict[int, ProcStat], boot: str, verdict: Verdict, members: list[int]
) -> None:
    assert judge(record, world, boot_id=boot, pid_ns=NS) == (verdict, members)


def test_judge_without_a_boot_id_trusts_nothing() -> None:
    assert judge(rec(200, 2000), WORLD, boot_id=None, pid_ns=NS) == (Verdict.OTHER_BOOT, [])


MARKERS = {
    600: marker(OWNER, OWNER_START),  # a setsid'd daemon of the dead supervisor
    700: marker(800, 8000),  # a live supervisor's container
    701: marker(OWNER, OWNER_START),  # vanished since the scan
    401: marker(OWNER, OWNER_START, root="elsewhere"),  # another root's
    301: marker(OWNER, OWNER_START, ns="pid:[1]"),  # another pid namespace's (and in 300)
    499: marker(OWNER, OWNER_START),  # our own parent: never
    ME: marker(OWNER, OWNER_START),  # ourselves: never
}


@pytest.mark.parametrize(
    ("records", "markers", "kill", "settled"),
    [
        pytest.param([], {}, {}, [], id="nothing"),
        pytest.param(
            [rec(200, 2000), rec(300, 3000), rec(400, 4000), rec(900, 9000)],
            {},
            {200: "session 200", 201: "session 200", 301: "session 300"},
            [rec(200, 2000), rec(300, 3000), rec(400, 4000), rec(900, 9000)],
            id="records",
        ),
        pytest.param(
            [rec(200, 2000, owner=800, owner_start=8000)], {}, {}, [], id="live-owner-kept"
        ),
        pytest.param([], MARKERS, {600: f"marked {OWNER_ENV}"}, [], id="markers"),
        pytest.param(
            [rec(499, 4990)],  # a record naming our own session: we are never killed
            {},
            {},
            [rec(499, 4990)],
            id="own-session",
        ),
        pytest.param(
            [rec(300, 3000)],
            {301: marker(OWNER, OWNER_START)},
            {301: "session 300"},
            [rec(300, 3000)],
            id="found-twice-killed-once",
        ),
    ],
)
def test_plan_sweep(
    records: list[Record], markers: dict[int, str], kill: dict[int, str], settled: list[Record]
) -> None:
    plan = plan_sweep(records, WORLD, markers, root_id=ROOT, boot_id=BOOT, pid_ns=NS, me=ME)
    assert {pid: why for pid, (_, why) in plan.kill.items()} == kill
    assert all(start == WORLD[pid].starttime for pid, (start, _) in plan.kill.items())
    assert plan.settled == settled


def test_owner_marker_round_trip() -> None:
    owner = Owner("abc", NS, 12, 34)
    assert Owner.decode(owner.encode()) == owner
    assert Owner.decode("junk") is None
    assert Owner.decode("a:b:c:d") is None


# --------------------------------------------------------------------------------------------
# The ledger, with real processes


def test_ledger_records_and_forgets(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    assert ledger.env()[OWNER_ENV].startswith((tmp_path / "root-id").read_text().strip() + ":")
    # A container whose member left the process group (but not the session).
    code = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setpgid(0, 0)\n"
        "    print(os.getpid(), flush=True)\n"
        "    time.sleep(60)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], start_new_session=True, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        member = int(proc.stdout.readline())
        ledger.add(proc.pid)
        ((_, record),) = read_records(tmp_path / RECORDS_DIR)
        stat = read_stat(proc.pid)
        assert record is not None and stat is not None
        assert (record.sid, record.start) == (proc.pid, stat.starttime)
        os.killpg(proc.pid, signal.SIGKILL)  # what a container's cleanup does
        proc.wait()
        ledger.discard(proc.pid)  # the member outside the group lives on: remembered
        assert len(read_records(tmp_path / RECORDS_DIR)) == 1
        assert pid_alive(member)
    finally:
        if proc.stdout is not None:
            proc.stdout.close()
        _kill_session(proc.pid)
    ledger.discard(proc.pid)
    assert read_records(tmp_path / RECORDS_DIR) == []


def _kill_session(sid: int) -> None:
    for name in os.listdir("/proc"):
        if name.isdigit() and (s := read_stat(int(name))) is not None and s.session == sid:
            try:
                os.kill(s.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(
        (s := read_stat(int(n))) is not None and s.session == sid and s.state != "Z"
        for n in os.listdir("/proc")
        if n.isdigit()
    ):
        time.sleep(0.02)


# --------------------------------------------------------------------------------------------
# End to end: `supervisor run`, SIGKILLed, run again

# The container: a master that forks its server (same session and group, as uvicorn --workers
# does) and a daemon that calls setsid; the master dies with the supervisor (parent-death
# signal), the other two do not.
MASTER = """
import os, sys
server = os.fork()
if server == 0:
    os.execv(sys.executable, [sys.executable, "-u", sys.argv[1]])
daemon = os.fork()
if daemon == 0:
    os.setsid()
    os.execvp("sleep", ["sleep", "3600"])
with open(sys.argv[2] + ".tmp", "w") as f:
    f.write(f"{os.getpid()} {server} {daemon}")
os.replace(sys.argv[2] + ".tmp", sys.argv[2])
os.waitpid(server, 0)
"""


def forking_api(tmp_path: Path) -> tuple[Path, Path, Path, int]:
    port = free_ports()
    rec = tmp_path / "rec"
    rec.mkdir()
    pids = tmp_path / "pids"
    container = {
        "name": "api",
        "command": [sys.executable, "-c", MASTER, str(RECORDER), str(pids)],
        "env": {"RECORD_DIR": str(rec), "SLEEP_PER_BATCH": "0.02"},
        "readiness_probe": {
            "http_get": {"port": port, "path": "/healthz"},
            "period_seconds": 1,
        },
    }
    return write_api(tmp_path / "api.yaml", [container], port=port), rec, pids, port


def _job(tmp_path: Path, n: int) -> Path:
    items = ", ".join(json.dumps({"i": i}) for i in range(n))
    return write_job(
        tmp_path / "job.json",
        b'{"workers": 1, "item_list": {"batch_size": 1, "items": [%s]}}' % items.encode(),
    )


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _wait(predicate: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _start(args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        supervisor_cmd(*args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(),
        start_new_session=True,
        stdin=subprocess.DEVNULL,
    )


def test_sigkilled_supervisor_leftovers_are_ended_by_the_next_run(tmp_path: Path) -> None:
    """`kill -9` of the supervisor alone: the container's server (same session) and daemon
    (its own session) outlive it and keep pod.port; the next run ends them first, then
    resumes the job."""
    api, rec, pidfile, port = forking_api(tmp_path)
    job = _job(tmp_path, 300)
    root = tmp_path / "root"
    args = ["run", str(api), "--job", str(job), "--root", str(root)]
    proc = _start(args)
    strays: list[int] = []
    try:
        _wait(lambda: len(read_requests(rec)) >= 5 or proc.poll() is not None, "batches")
        assert proc.poll() is None, proc.communicate()[1]
        master, server, daemon = map(int, pidfile.read_text().split())
        strays = [server, daemon]
        os.kill(proc.pid, signal.SIGKILL)  # the supervisor only, as the OOM killer would
        proc.communicate(timeout=30)
        _wait(lambda: not pid_alive(master), "the master to die with its parent")
        # What the next run meets: the server still listens on pod.port, the daemon lives.
        assert pid_alive(server) and pid_alive(daemon)
        assert _listening(port)
        with sqlite3.connect(root / "cortex" / "supervisor" / "queue.sqlite3") as conn:
            (job_id,) = conn.execute("select job_id from jobs").fetchone()

        r = run_supervisor(*args, timeout=120)
        assert "leftover_killed" in r.stderr, r.stderr
        assert "not a container of this pod" not in r.stderr, r.stderr
        assert not pid_alive(server) and not pid_alive(daemon)
        killed = [json.loads(x) for x in r.stderr.splitlines() if '"leftover_killed"' in x]
        assert set(killed[0]["pids"]) == {server, daemon}
        assert r.returncode == 0, r.stderr
        status = json.loads(r.stdout)
        assert status["job_status"]["job_id"] == job_id
        assert status["job_status"]["status"] == "succeeded"
        # Nothing of the second run is left either, and its records are gone.
        _, server2, daemon2 = map(int, pidfile.read_text().split())
        assert not pid_alive(server2) and not pid_alive(daemon2)
        assert read_records(root / "cortex" / "supervisor" / RECORDS_DIR) == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
        for pid in strays:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("how", ["exit", "sigterm"])
def test_nothing_outlives_a_clean_stop(tmp_path: Path, how: str) -> None:
    """Finished or stopped by SIGTERM, the supervisor leaves none of the container's
    processes (not even the setsid'd daemon) and no records behind."""
    api, rec, pidfile, _port = forking_api(tmp_path)
    root = tmp_path / "root"
    n = 10 if how == "exit" else 1000
    args = ["run", str(api), "--job", str(_job(tmp_path, n)), "--root", str(root), "--grace", "2"]
    proc = _start(args)
    pids: list[int] = []
    try:
        if how == "sigterm":
            _wait(lambda: len(read_requests(rec)) >= 3 or proc.poll() is not None, "batches")
            proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        pids = list(map(int, pidfile.read_text().split()))
        assert proc.returncode == (0 if how == "exit" else 128 + signal.SIGTERM), err
        assert json.loads(out)["job_status"]["status"] == (
            "succeeded" if how == "exit" else "stopped"
        )
        assert [p for p in pids if pid_alive(p)] == []
        assert read_records(root / "cortex" / "supervisor" / RECORDS_DIR) == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
        for pid in pids:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
