"""A Cortex Batch API worker that needs nothing but the standard library.

It counts words in the text items it receives. Like a real model server it takes a moment to
"load" (so the readiness probe matters), reads the job's config from the job spec, writes one
result line per batch under the shared mnt folder, and writes a summary on /on-job-complete.

Under `supervisor run` the job spec exists before the worker starts. Under `supervisor proxy`
batches come from outside and there may be no job spec: the worker then uses no config and
takes the job id from each request's X-Cortex-Job-ID header.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

PORT = int(os.environ.get("CORTEX_PORT", "8080"))
SPEC_PATH = Path(os.environ.get("CORTEX_SPEC_PATH", "/cortex/spec/job.json"))
SPEC = json.loads(SPEC_PATH.read_text()) if SPEC_PATH.exists() else {}
CONFIG = SPEC.get("config") or {}
MNT = Path(os.environ.get("CORTEX_MNT_DIR", "/mnt"))
LOCK = threading.Lock()
READY = threading.Event()
TOTALS = {"batches": 0, "items": 0, "words": 0}


def load_model() -> None:
    time.sleep(float(CONFIG.get("load_seconds", 0.5)))  # pretend to load weights
    READY.set()
    print(
        f"model loaded; serving job {SPEC.get('job_id', '(from requests)')} on port {PORT}",
        flush=True,
    )


def out_dir(job_id: str | None) -> Path:
    out = MNT / "wordcount" / (job_id or SPEC.get("job_id") or "unknown-job")
    out.mkdir(parents=True, exist_ok=True)
    return out


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the supervisor expects
    disable_nagle_algorithm = True  # headers and body go in two writes: do not wait 40 ms

    def _reply(self, status: int, body: bytes = b"{}") -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/healthz":
            self._reply(200 if READY.is_set() else 503)
        else:
            self._reply(404)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        out = out_dir(self.headers.get("X-Cortex-Job-ID"))
        if self.path == "/on-job-complete":
            summary = {
                **TOTALS,
                "succeeded": self.headers.get("X-Cortex-Batches-Succeeded"),
                "failed": self.headers.get("X-Cortex-Batches-Failed"),
            }
            (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            print(f"job complete: {json.dumps(summary)}", flush=True)
            self._reply(200)
            return
        if self.path != "/":
            self._reply(404)
            return
        items = json.loads(body)
        lower = bool(CONFIG.get("lowercase", True))
        counts: dict[str, int] = {}
        for text in items:
            for word in str(text).split():
                word = word.strip(".,;:!?\"'()").lower() if lower else word
                if word:
                    counts[word] = counts.get(word, 0) + 1
        with LOCK:
            TOTALS["batches"] += 1
            TOTALS["items"] += len(items)
            TOTALS["words"] += sum(counts.values())
            with open(out / "results.ndjson", "a") as f:
                f.write(json.dumps({"items": len(items), "counts": counts}) + "\n")
        self._reply(200, json.dumps({"words": sum(counts.values())}).encode())

    def log_message(self, format: str, *args: object) -> None:  # quiet per-request logs
        pass


def main() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", PORT), Handler)
    threading.Thread(target=load_model, daemon=True).start()
    print(f"listening on 127.0.0.1:{PORT}", file=sys.stderr, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
