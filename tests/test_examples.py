"""The shipped example works as the README and docs say, under `run` and under `proxy`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import yaml

from tests.helpers import REPO, child_env, free_ports, run_supervisor, supervisor_cmd
from tests.test_proxy_command import Proxy

EXAMPLE = REPO / "examples" / "wordcount"


def example_api(tmp_path: Path) -> tuple[Path, int]:
    """The example's API file on a free port (8080 may be taken on a test machine)."""
    port = free_ports()
    (api,) = yaml.safe_load((EXAMPLE / "api.yaml").read_text())
    api["pod"]["port"] = port
    api["pod"]["containers"][0]["readiness_probe"]["http_get"]["port"] = port
    path = tmp_path / "api.yaml"
    path.write_text(yaml.safe_dump([api]))
    return path, port


def test_the_example_job_runs(tmp_path: Path) -> None:
    api, _port = example_api(tmp_path)
    root = tmp_path / "root"
    job = EXAMPLE / "job.json"
    r = run_supervisor("run", str(api), "--job", str(job), "--root", str(root), cwd=REPO)
    assert r.returncode == 0, r.stderr
    status = json.loads(r.stdout)
    job_id = status["job_status"]["job_id"]
    assert status["job_status"]["status"] == "succeeded"
    out = root / "mnt" / "wordcount" / job_id
    summary = json.loads((out / "summary.json").read_text())
    assert summary["items"] == len(json.loads(job.read_text())["item_list"]["items"])
    assert summary["succeeded"] == str(status["metrics"]["succeeded"])


def test_the_example_worker_runs_under_proxy(tmp_path: Path) -> None:
    """Under proxy there is no job spec: the worker takes the job id from the request."""
    api, _port = example_api(tmp_path)
    listen = free_ports()
    root = tmp_path / "root"
    proc = subprocess.Popen(
        supervisor_cmd("proxy", str(api), "--listen", f"127.0.0.1:{listen}", "--root", str(root)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=child_env(),
        cwd=REPO,
        start_new_session=True,
    )
    proxy = Proxy(proc, listen, tmp_path)
    try:
        proxy.wait_healthy(timeout=30)
        headers = {"Content-Type": "application/json", "X-Cortex-Job-ID": "job-from-outside"}
        status, _, body = proxy.request("POST", "/", b'["one two", "three"]', headers)
        assert status == 200, body
        assert json.loads(body) == {"words": 3}
        status, _, _ = proxy.request(
            "POST", "/on-job-complete", b'{"message":"job_complete"}', headers
        )
        assert status == 200
        summary = json.loads(
            (root / "mnt" / "wordcount" / "job-from-outside" / "summary.json").read_text()
        )
        assert summary["words"] == 3
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
