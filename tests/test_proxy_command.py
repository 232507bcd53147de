"""`supervisor proxy` end to end: the real command in front of a real pod."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import (
    child_env,
    free_ports,
    header,
    pid_alive,
    read_records,
    recorder_container,
    server_sockets,
    supervisor_cmd,
    write_api,
)


@pytest.fixture(params=["asyncio", "trio"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class Proxy:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, rec: Path) -> None:
        self.proc, self.port, self.rec = proc, port, rec

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            r = conn.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            conn.close()

    def wait_healthy(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError("proxy exited early")
            try:
                if self.request("GET", "/healthz")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError("proxy never became healthy")


@pytest.fixture
def proxy(tmp_path: Path, backend: str, request: pytest.FixtureRequest) -> Iterator[Proxy]:
    extra: list[str] = getattr(request, "param", [])  # more options for the command
    pod_port = free_ports()
    listen = free_ports()
    rec = tmp_path / "rec"
    rec.mkdir()
    api = write_api(
        tmp_path / "api.yaml",
        [
            {
                **recorder_container(RECORD_DIR=str(rec), NOT_READY_SECONDS="1.5"),
                "readiness_probe": {
                    "http_get": {"port": pod_port, "path": "/healthz"},
                    "period_seconds": 1,
                },
            }
        ],
        port=pod_port,
    )
    proc = subprocess.Popen(
        supervisor_cmd(
            "proxy",
            str(api),
            "--listen",
            f"127.0.0.1:{listen}",
            "--root",
            str(tmp_path / "root"),
            "--grace",
            "2",
            *extra,
            backend=backend,
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        env=child_env(),
        start_new_session=True,
    )
    p = Proxy(proc, listen, rec)
    try:
        deadline = time.monotonic() + 20
        while True:  # wait for the listener (not for readiness)
            try:
                socket.create_connection(("127.0.0.1", listen), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise AssertionError("proxy did not listen") from None
                time.sleep(0.05)
        yield p
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def test_503_before_ready_then_byte_exact_forwarding(proxy: Proxy) -> None:
    status, headers, _ = proxy.request("POST", "/", b"[1]", {"Content-Type": "application/json"})
    assert status == 503
    assert "retry-after" in headers
    assert read_records(proxy.rec) == []  # nothing forwarded early

    proxy.wait_healthy()
    body = b'[{"a":  1}, "caf\xc3\xa9", 1.50]'
    status, _, answer = proxy.request(
        "POST",
        "/",
        body,
        {"Content-Type": "application/json", "X-Cortex-Job-ID": "job-1", "X-Custom": "k"},
    )
    assert status == 200
    assert answer == b"ok"
    status, _, _ = proxy.request(
        "POST",
        "/on-job-complete",
        b'{"message":"job_complete"}',
        {"Content-Type": "application/json"},
    )
    assert status == 404  # the worker ignores it; the status passes through
    records = read_records(proxy.rec)
    assert [r["path"] for r in records] == ["/", "/on-job-complete"]
    assert records[0]["body"].encode() == body
    assert header(records[0], "X-Cortex-Job-ID") == "job-1"
    assert header(records[0], "X-Custom") == "k"
    assert header(records[0], "Content-Type") == "application/json"


def test_garbage_gets_400_and_the_next_request_works(proxy: Proxy) -> None:
    proxy.wait_healthy()
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
        s.sendall(b"\x00\x01GARBAGE \xff\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 400")
    status, _, _ = proxy.request("POST", "/", b"[2]", {"Content-Type": "application/json"})
    assert status == 200
    assert proxy.proc.poll() is None


def test_clients_that_go_away_leave_no_socket_behind(proxy: Proxy) -> None:
    proxy.wait_healthy()
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
        s.sendall(b"garbage")  # printf garbage | nc -q 1
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 400")
    for partial in (
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Le",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc",
    ):
        for _ in range(20):
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
                s.sendall(partial)
    deadline = time.monotonic() + 10
    while server_sockets(proxy.port, proxy.proc.pid):  # nothing to wait on but /proc
        assert time.monotonic() < deadline, "the proxy kept sockets of clients that left"
        time.sleep(0.05)
    status, _, _ = proxy.request("POST", "/", b"[2]", {"Content-Type": "application/json"})
    assert status == 200


def test_sigterm_stops_everything(proxy: Proxy) -> None:
    proxy.wait_healthy()
    proxy.request("POST", "/", b"[3]")
    pids = {r["pid"] for r in read_records(proxy.rec)}
    proxy.proc.send_signal(signal.SIGTERM)
    assert proxy.proc.wait(timeout=20) == 128 + signal.SIGTERM
    assert pids and not any(pid_alive(p) for p in pids)


def test_status_reports_port_owner(proxy: Proxy) -> None:
    proxy.wait_healthy()
    status, _, body = proxy.request("GET", "/status")
    assert status == 200
    info = json.loads(body)
    assert info["port_owner"]["container"] == "api"


@pytest.mark.parametrize(
    "proxy", [["--read-timeout", "0.5", "--idle-timeout", "0.5"]], indirect=True
)
def test_client_timeouts_come_from_the_command_line(proxy: Proxy) -> None:
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as stalled:
        stalled.sendall(b"POST / HTTP/1.1\r\nHost: p\r\n")  # and no more
        answer = b""
        while chunk := stalled.recv(4096):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert b"0.5 seconds" in answer
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as idle:
        assert idle.recv(4096) == b""  # closed without a word
