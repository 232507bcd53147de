"""A test worker: records every request it gets, and misbehaves on demand.

Environment (all optional):
  RECORD_DIR        where to write requests-<port>.ndjson (one JSON line per request)
  NOT_READY_SECONDS /healthz answers 503 for this long after start (the port is bound at once)
  FAIL_ITEMS        JSON list: a batch containing one of these items gets HTTP 500, always
  FLAKY_ITEMS       JSON list: a batch containing one of these fails its first FLAKY_TIMES tries
  FLAKY_TIMES       default 1
  CRASH_AFTER       exit(3) upon receiving this many batches
  CRASH_FILE        exit(3) upon receiving a batch while this file exists
  CRASH_ON_PORT     only the worker on this port crashes (CRASH_AFTER, CRASH_FILE)
  SLEEP_PER_BATCH   seconds to sleep before answering a batch
  ON_COMPLETE_STATUS status for /on-job-complete (default 404, as a worker that ignores it)
  PORT_ENV          name of the env var holding the port (default CORTEX_PORT)
  READY_FILE        /healthz answers 200 only while this file exists
  DEAD_FILE         /live answers 500 while this file exists (a liveness probe target)
  REUSE_PORT        bind with SO_REUSEPORT (to provoke two owners of one port)
  HANG_ONCE_FILE    if this file does not exist: create it, then hang on the first batch and
                    fail /live from then on (a wedged worker that liveness must restart)
  HEALTHZ_DELAY     seconds /healthz takes to answer (a probe slower than its timeout)
  ENV_FILE          write this process's environment there as JSON at start
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

PORT = int(os.environ[os.environ.get("PORT_ENV", "CORTEX_PORT")])
RECORD = Path(os.environ.get("RECORD_DIR", ".")) / f"requests-{PORT}.ndjson"
START = time.monotonic()
NOT_READY = float(os.environ.get("NOT_READY_SECONDS", "0"))
FAIL = {json.dumps(x) for x in json.loads(os.environ.get("FAIL_ITEMS", "[]"))}
FLAKY = {json.dumps(x) for x in json.loads(os.environ.get("FLAKY_ITEMS", "[]"))}
FLAKY_TIMES = int(os.environ.get("FLAKY_TIMES", "1"))
CRASH_AFTER = int(os.environ.get("CRASH_AFTER", "0"))
CRASH_FILE = os.environ.get("CRASH_FILE")
if os.environ.get("CRASH_ON_PORT") and int(os.environ["CRASH_ON_PORT"]) != PORT:
    CRASH_AFTER, CRASH_FILE = 0, None
SLEEP = float(os.environ.get("SLEEP_PER_BATCH", "0"))
ON_COMPLETE = int(os.environ.get("ON_COMPLETE_STATUS", "404"))
LOCK = threading.Lock()
SEEN: dict[str, int] = {}
BATCHES = 0

spec_path = os.environ.get("CORTEX_SPEC_PATH")
SPEC = json.loads(Path(spec_path).read_text()) if spec_path and Path(spec_path).exists() else None


HEALTHZ_DELAY = float(os.environ.get("HEALTHZ_DELAY", "0"))
if os.environ.get("ENV_FILE"):
    Path(os.environ["ENV_FILE"]).write_text(json.dumps(dict(os.environ)))
READY_FILE = os.environ.get("READY_FILE")
DEAD_FILE = os.environ.get("DEAD_FILE")
HANG_ONCE_FILE = os.environ.get("HANG_ONCE_FILE")
WEDGED = threading.Event()


def ready() -> bool:
    if READY_FILE and not Path(READY_FILE).exists():
        return False
    return time.monotonic() - START >= NOT_READY


def record(entry: dict[str, object]) -> None:
    entry["t"] = time.monotonic_ns()  # CLOCK_MONOTONIC: comparable across processes
    line = json.dumps(entry) + "\n"
    with LOCK, open(RECORD, "a") as f:
        f.write(line)
        f.flush()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def _reply(self, status: int, body: bytes = b"ok") -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/healthz":
            time.sleep(HEALTHZ_DELAY)
            self._reply(200 if ready() else 503)
        elif self.path == "/live":
            dead = WEDGED.is_set() or bool(DEAD_FILE and Path(DEAD_FILE).exists())
            self._reply(500 if dead else 200)
        else:
            self._reply(404)

    def do_POST(self) -> None:
        global BATCHES
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        entry = {
            "path": self.path,
            "headers": [[k, v] for k, v in self.headers.items()],
            "body": body.decode(),
            "port": PORT,
            "pid": os.getpid(),
            "ready": ready(),
            "spec_job_id": SPEC["job_id"] if SPEC else None,
        }
        if self.path == "/on-job-complete":
            record(entry)
            self._reply(ON_COMPLETE)
            return
        if HANG_ONCE_FILE and not Path(HANG_ONCE_FILE).exists():
            Path(HANG_ONCE_FILE).touch()
            WEDGED.set()
            record({**entry, "status": "hung"})
            time.sleep(3600)
        items = {json.dumps(x) for x in json.loads(body)}
        status = 200
        with LOCK:
            BATCHES += 1
            n = BATCHES
            if items & FLAKY:
                SEEN[body.decode()] = SEEN.get(body.decode(), 0) + 1
                if SEEN[body.decode()] <= FLAKY_TIMES:
                    status = 503
        if items & FAIL:
            status = 500
        if SLEEP:
            time.sleep(SLEEP)
        entry["status"] = status
        record(entry)
        if (CRASH_AFTER and n >= CRASH_AFTER) or (CRASH_FILE and Path(CRASH_FILE).exists()):
            print("crashing on purpose", file=sys.stderr, flush=True)
            os._exit(3)
        if status != 200:
            print(f"failing batch with {status}", file=sys.stderr, flush=True)
        self._reply(status, b"worker says no" if status != 200 else b"ok")

    def log_message(self, format: str, *args: object) -> None:
        pass


if __name__ == "__main__":

    class Server(ThreadingHTTPServer):
        def server_bind(self) -> None:
            if os.environ.get("REUSE_PORT"):
                import socket

                self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            super().server_bind()

    server = Server(("127.0.0.1", PORT), Handler)
    server.daemon_threads = True
    print(f"recorder listening on {PORT}", flush=True)
    server.serve_forever()
