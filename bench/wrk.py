"""wrk, the C load generator every ratio is taken against.

One thread (it is pinned to one CPU), K connections, for a fixed duration. The Lua script
pre-formats one request per batch body (read from a file, one body per line, the exact bodies
the supervisor sends) and cycles through them (the method and path are the script's next two
arguments, ``POST /`` unless given; an empty line is a request without a body); ``done()`` prints one ``BENCH {json}`` line with
the counts and latency percentiles (microseconds), which :func:`run_wrk` parses.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from bench.procs import LOAD_CPU, Procs

LUA = r"""
local reqs = {}
local n = 0
local i = 0

function init(args)
  local method = args[2] or "POST"
  local path = args[3] or "/"
  for line in io.lines(args[1]) do
    local headers = {}
    local body = nil
    if line ~= "" then
      headers["Content-Type"] = "application/json"
      body = line
    end
    headers["X-Cortex-Job-ID"] = "bench"
    reqs[#reqs + 1] = wrk.format(method, path, headers, body)
  end
  n = #reqs
end

function request()
  i = i % n + 1
  return reqs[i]
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,' ..
    '"write":%d,"status":%d,"timeout":%d,"p50":%d,"p90":%d,"p99":%d,"max":%d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max))
end
"""


@dataclass(frozen=True)
class WrkResult:
    rps: float
    p50_us: float
    p99_us: float
    errors: int
    requests: int = 0


def wrk_path() -> str | None:
    return shutil.which("wrk")


def run_wrk(
    procs: Procs,
    port: int,
    bodies: Path,
    *,
    connections: int,
    seconds: float,
    workdir: Path,
    method: str = "POST",
    path: str = "/",
) -> WrkResult:
    """wrk -t1 -cK for ``seconds`` against 127.0.0.1:port, sending ``method path`` with the
    bodies of ``bodies`` (one per line; an empty line: no body)."""
    exe = wrk_path()
    if exe is None:
        raise RuntimeError("wrk is not installed (apt-get install -y wrk)")
    script = workdir / "bench.lua"
    if not script.exists() or script.read_text() != LUA:
        script.write_text(LUA)
    argv = [
        exe, "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "10s",
        "-s", str(script), f"http://127.0.0.1:{port}/", "--", str(bodies), method, path,
    ]  # fmt: skip
    code, out, err = procs.run(argv, cpu=LOAD_CPU, timeout=seconds + 30)
    for line in out.decode(errors="replace").splitlines():
        if line.startswith("BENCH "):
            r = json.loads(line[6:])
            errors = r["connect"] + r["read"] + r["write"] + r["status"] + r["timeout"]
            if r["requests"] == 0 or errors > r["requests"] // 100:
                raise RuntimeError(f"wrk saw {errors} errors in {r['requests']} requests")
            return WrkResult(
                rps=r["requests"] / (r["duration_us"] / 1e6),
                p50_us=float(r["p50"]),
                p99_us=float(r["p99"]),
                errors=errors,
                requests=int(r["requests"]),
            )
    tail = (err or out).decode(errors="replace").strip()[-200:]
    raise RuntimeError(f"wrk exited {code} without a result: {tail}")
