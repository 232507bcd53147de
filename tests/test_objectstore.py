"""`s3://` paths against a real S3-protocol server (SeaweedFS on loopback), and the pure parts of
supervisor.objectstore (error classification, AWS profiles) without one."""

from __future__ import annotations

import gzip
import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from supervisor.errors import JobError
from supervisor.jobs import decode_submission
from supervisor.objectstore import Failure, classify, open_object, profile_settings
from supervisor.sources import list_files
from supervisor.split import iter_batches, validate_submission
from tests.helpers import (
    REPO,
    batches_of,
    child_env,
    free_ports,
    read_records,
    recorder_api,
    run_supervisor,
    start_supervisor,
    wait_for_batches,
    write_api,
    write_job,
)
from tests.seaweed import CuttingProxy, Seaweed, seaweed_server

AWS_VARS = [
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
]


@pytest.fixture(scope="session")
def weed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seaweed]:
    yield from seaweed_server(tmp_path_factory)


@pytest.fixture(scope="session")
def bucket(weed: Seaweed) -> str:
    """A bucket holding Cortex's filtering example and some NDJSON (plain and gzipped)."""
    name = "cortex-data"
    weed.make_bucket(name)
    for key in [
        "images/img_1.png",
        "images/img_2.jpg",
        "images/img_3.jpg",
        "images/img_4.gif",
        "images/imgx/img_5.jpg",
        "images/other.jpg",
        "images/folder/",  # a console's folder marker: not an object to process
    ]:
        weed.put(name, key, b"")
    for key, data in NDJSON.items():
        weed.put(name, key, gzip.compress(data) if key.endswith(".gz") else data)
    return name


NDJSON = {
    "lines/part-0.ndjson": b'{"a": 1,   "b":[1,2 ,3]}\n"caf\xc3\xa9"\n\n12345678901234567890123\n',
    "lines/part-1.ndjson": b"".join(b'{"i": %d}\r\n' % i for i in range(25)),
    "lines/part-2.ndjson.gz": b"".join(b'{"z": %d}\n' % i for i in range(7)) + b"[ ]",
}


@pytest.fixture
def s3env(weed: Seaweed, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Seaweed:
    """This test (and its subprocesses) reach the server as an AWS tool would."""
    for name in AWS_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.aws of the machine's
    for name, value in weed.env().items():
        monkeypatch.setenv(name, value)
    return weed


def job(kind: str, paths: list[str], batch_size: int, **extra: Any) -> Any:
    body = {"workers": 1, kind: {"s3_paths": paths, "batch_size": batch_size, **extra}}
    return decode_submission(json.dumps(body).encode(), where="job")


def test_cortex_filtering_examples(s3env: Seaweed, bucket: str) -> None:
    """Cortex's docs: a path is a key or a prefix; globs apply to the whole s3:// path."""
    b = f"s3://{bucket}"
    assert list_files([f"{b}/images/img"]) == [
        f"{b}/images/img_1.png",
        f"{b}/images/img_2.jpg",
        f"{b}/images/img_3.jpg",
        f"{b}/images/img_4.gif",
        f"{b}/images/imgx/img_5.jpg",
    ]
    assert list_files([f"{b}/images/img_2.jpg"]) == [f"{b}/images/img_2.jpg"]
    assert list_files([f"{b}/images/"], includes=["**.jpg"]) == [
        f"{b}/images/img_2.jpg",
        f"{b}/images/img_3.jpg",
        f"{b}/images/imgx/img_5.jpg",
        f"{b}/images/other.jpg",
    ]
    assert list_files([f"{b}/images/"], includes=["**.jpg"], excludes=["**/img_3.*"]) == [
        f"{b}/images/img_2.jpg",
        f"{b}/images/imgx/img_5.jpg",
        f"{b}/images/other.jpg",
    ]
    assert list_files([f"{b}/images/img"], excludes=[f"{b}/images/*/**"]) == [
        f"{b}/images/img_1.png",
        f"{b}/images/img_2.jpg",
        f"{b}/images/img_3.jpg",
        f"{b}/images/img_4.gif",
    ]
    # file_path_lister batches hold the s3:// paths as strings, as Cortex sends them.
    sub = job("file_path_lister", [f"{b}/images/img"], 2, includes=["**.jpg"])
    assert list(iter_batches(sub)) == [
        json.dumps(
            [f"{b}/images/img_2.jpg", f"{b}/images/img_3.jpg"], separators=(",", ":")
        ).encode(),
        json.dumps([f"{b}/images/imgx/img_5.jpg"]).encode(),
    ]


def test_ndjson_objects_as_local_files(s3env: Seaweed, bucket: str, tmp_path: Path) -> None:
    """Several objects (one gzipped): the batches, byte for byte, are those of local files."""
    local = tmp_path / "lines"
    local.mkdir()
    for key, data in NDJSON.items():
        (tmp_path / key).write_bytes(gzip.compress(data) if key.endswith(".gz") else data)
    for size in (1, 4, 100):
        remote = list(iter_batches(job("delimited_files", [f"s3://{bucket}/lines/"], size)))
        here = list(iter_batches(job("delimited_files", [f"{local}/"], size)))
        assert remote == here
    first = list(iter_batches(job("delimited_files", [f"s3://{bucket}/lines/part-0"], 10)))
    assert first == [b'[{"a": 1,   "b":[1,2 ,3]},"caf\xc3\xa9",12345678901234567890123]']
    gz = list(iter_batches(job("delimited_files", [f"s3://{bucket}/lines/part-2"], 100)))
    assert gz == [b"[" + b",".join(b'{"z": %d}' % i for i in range(7)) + b",[ ]]"]


def test_bad_line_names_the_object(s3env: Seaweed, bucket: str) -> None:
    s3env.put(bucket, "bad/x.ndjson", b'{"ok": 1}\n{"no"\n')
    with pytest.raises(JobError, match=rf"`s3://{bucket}/bad/x\.ndjson:2` is not valid JSON"):
        validate_submission(job("delimited_files", [f"s3://{bucket}/bad/"], 1))


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing bucket", "the bucket `no-such-bucket` of `s3://no-such-bucket/x` does not exist"),
        ("missing key", "`s3://{b}/lines/nope` selects no object (no key is or starts with it)"),
        (
            "wrong secret",
            "the S3 credentials were refused for `s3://{b}/lines/` (SignatureDoesNotMatch)",
        ),
        (
            "unknown key id",
            "the S3 credentials were refused for `s3://{b}/lines/` (InvalidAccessKeyId)",
        ),
        (
            "endpoint down",
            "cannot reach the S3 endpoint http://127.0.0.1:{port} for `s3://{b}/lines/`",
        ),
    ],
)
def test_errors_are_one_sentence_and_nothing_starts(
    s3env: Seaweed,
    bucket: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    case: str,
    message: str,
) -> None:
    port = free_ports()
    path = {"missing bucket": "s3://no-such-bucket/x", "missing key": f"s3://{bucket}/lines/nope"}
    entry = path.get(case, f"s3://{bucket}/lines/")
    if case == "wrong secret":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-" + s3env.env()["AWS_SECRET_ACCESS_KEY"])
    elif case == "unknown key id":
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody")
    elif case == "endpoint down":
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    expected = message.format(b=bucket, port=port)
    with pytest.raises(JobError) as e:
        list(iter_batches(job("delimited_files", [entry], 1)))
    assert str(e.value) == f"{expected} - at `delimited_files.s3_paths[0]`" or (
        str(e.value).startswith(expected) and str(e.value).endswith("s3_paths[0]`")
    )
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]

    # The real command: exit 2, one line naming the path, nothing started, no secret shown.
    marker = tmp_path / "started"
    api = write_api(
        tmp_path / "api.yaml", [{"name": "a", "command": ["touch", str(marker)]}], port=port + 1
    )
    body = {"workers": 1, "delimited_files": {"s3_paths": [entry], "batch_size": 1}}
    jobfile = write_job(tmp_path / "job.json", body)
    for command in (
        ["validate", str(api), "--job", str(jobfile)],
        ["run", str(api), "--job", str(jobfile), "--root", str(tmp_path / "root")],
    ):
        r = run_supervisor(*command)
        assert r.returncode == 2, r.stderr
        assert expected in r.stderr
        assert secret not in r.stderr + r.stdout
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not marker.exists()
    assert not (tmp_path / "root" / "cortex").exists()


def test_s3_endpoint_option(
    s3env: Seaweed, bucket: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`--s3-endpoint` names an S3-compatible store when AWS_ENDPOINT_URL is not set."""
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    api = write_api(tmp_path / "api.yaml", [{"name": "a", "command": ["true"]}], port=free_ports())
    body = {
        "workers": 1,
        "delimited_files": {"s3_paths": [f"s3://{bucket}/lines/"], "batch_size": 5},
    }
    jobfile = write_job(tmp_path / "job.json", body)
    r = run_supervisor("validate", str(api), "--job", str(jobfile), "--s3-endpoint", s3env.endpoint)
    assert r.returncode == 0, r.stderr
    assert "job is valid (8 batch(es))" in r.stdout


def test_dropped_connection_resumes_every_item_once(
    s3env: Seaweed, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A proxy cuts the first responses mid-object; the reader resumes from the next byte."""
    data = b"".join(b'{"n": %d, "pad": "%s"}\n' % (i, b"p" * (i % 50)) for i in range(60_000))
    s3env.put(bucket, "big/cut.ndjson", data)
    upstream = int(s3env.endpoint.rsplit(":", 1)[1])
    # More cuts than obstore's own retries of one GET (3): some reach our reader, which
    # resumes with a new GET from the next byte.
    proxy = CuttingProxy(upstream, after=250_000, cuts=9)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
        batches = list(iter_batches(job("delimited_files", [f"s3://{bucket}/big/cut"], 1000)))
    finally:
        proxy.close()
    assert proxy.cut == 9
    assert [item["n"] for b in batches for item in json.loads(b)] == list(range(60_000))
    assert b"\n".join(batches) == b"\n".join(
        b"[" + b",".join(data.splitlines()[i : i + 1000]) + b"]" for i in range(0, 60_000, 1000)
    )

    proxy = CuttingProxy(upstream, after=250_000, cuts=9)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
        with open_object(f"s3://{bucket}/big/cut.ndjson") as f:
            assert f.read() == data
            assert f.raw.breaks >= 1  # type: ignore[attr-defined]
    finally:
        proxy.close()


MEASURE = r"""
import json, resource, sys
from supervisor.jobs import decode_submission
from supervisor.split import validate_submission
sub = decode_submission(sys.argv[1].encode(), where="job")
small = decode_submission(sys.argv[2].encode(), where="job")
validate_submission(small)  # obstore, its runtime and the first chunks are in memory now
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
batches = validate_submission(sub)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"batches": batches, "before_kb": before, "after_kb": after}))
"""


def test_large_object_at_flat_memory(s3env: Seaweed, bucket: str, tmp_path: Path) -> None:
    """A 100 MB object is split with a peak RSS that grows by far less than its size."""
    line = b'{"id": %8d, "text": "' + b"x" * 90 + b'"}\n'
    count = 1_000_000
    big = tmp_path / "big.ndjson"
    with big.open("wb") as f:
        block = 10_000
        for start in range(0, count, block):
            f.write(b"".join(line % i for i in range(start, start + block)))
    size = big.stat().st_size
    s3env.put(bucket, "huge/big.ndjson", big)
    big.unlink()
    sub = {
        "workers": 1,
        "delimited_files": {"s3_paths": [f"s3://{bucket}/huge/"], "batch_size": 100},
    }
    small = {
        "workers": 1,
        "delimited_files": {"s3_paths": [f"s3://{bucket}/lines/"], "batch_size": 1},
    }
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run(
        [sys.executable, "-c", MEASURE, json.dumps(sub), json.dumps(small)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["batches"] == count // 100
    grew = (out["after_kb"] - out["before_kb"]) * 1024
    assert size > 100_000_000
    assert grew < size // 5, f"peak RSS grew by {grew} bytes splitting {size} bytes"


def test_resume_never_rereads_the_source(
    s3env: Seaweed, bucket: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The embedded queue holds every batch before the job runs: a `run` killed mid-job
    resumes with the store unreachable and still sends every item."""
    items = b"".join(b'{"i": %d}\n' % i for i in range(300))
    s3env.put(bucket, "resume/items.ndjson", items)
    api, rec, _port = recorder_api(tmp_path, SLEEP_PER_BATCH="0.02")
    body = {
        "workers": 1,
        "delimited_files": {"s3_paths": [f"s3://{bucket}/resume/"], "batch_size": 1},
    }
    jobfile = write_job(tmp_path / "job.json", body)
    root = tmp_path / "root"
    args = ["run", str(api), "--job", str(jobfile), "--root", str(root)]
    proc = start_supervisor(args)
    try:
        wait_for_batches(rec, 30, proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)
    for pid in {b["pid"] for b in read_records(rec)}:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    with sqlite3.connect(root / "cortex" / "supervisor" / "queue.sqlite3") as conn:
        (total,) = conn.execute("select total_batches from jobs").fetchone()
    assert total == 300

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_ports()}")  # nothing there
    r = run_supervisor(*args, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["job_status"]["status"] == "succeeded"
    seen = {json.loads(b["body"])[0]["i"] for b in batches_of(read_records(rec))}
    assert seen == set(range(300))


# ---- without a server ---------------------------------------------------------------------------

CLASSIFY = [
    ("GenericError", "... 404 Not Found: <Error><Code>NoSuchBucket</Code>", Failure.NO_BUCKET),
    ("FileNotFoundError", "status code: 404 Not Found: <Code>NoSuchKey</Code>", Failure.NO_KEY),
    ("FileNotFoundError", "Object at location x not found", Failure.NO_KEY),
    ("GenericError", "status code: 403 Forbidden: <Code>AccessDenied</Code>", Failure.DENIED),
    ("PermissionDeniedError", "denied", Failure.DENIED),
    (
        "GenericError",
        "status code: 403 Forbidden: <Code>SignatureDoesNotMatch</Code>",
        Failure.BAD_CREDENTIALS,
    ),
    ("GenericError", "<Code>ExpiredToken</Code>", Failure.BAD_CREDENTIALS),
    ("UnauthenticatedError", "nope", Failure.BAD_CREDENTIALS),
    ("GenericError", "status code: 301 <Code>PermanentRedirect</Code>", Failure.WRONG_REGION),
    (
        "GenericError",
        "HTTP error: error sending request ... tcp connect error",
        Failure.UNREACHABLE,
    ),
    ("GenericError", "operation timed out", Failure.UNREACHABLE),
    ("PreconditionError", "status code: 412", Failure.CHANGED),
    ("GenericError", "Error getting credentials from IMDS", Failure.NO_CREDENTIALS),
    ("GenericError", "status code: 500 <Code>InternalError</Code>", Failure.OTHER),
]


@pytest.mark.parametrize(("kind", "message", "failure"), CLASSIFY)
def test_classify(kind: str, message: str, failure: Failure) -> None:
    assert classify(kind, message)[0] is failure


def test_profiles() -> None:
    creds = "[default]\naws_access_key_id = AK\naws_secret_access_key = SK\n[dev]\naws_access_key_id = DK\naws_secret_access_key = DS\naws_session_token = T\n"
    config = "[default]\nregion = eu-west-1\n[profile dev]\nregion = us-west-2\nendpoint_url = http://minio:9000\n"
    assert profile_settings({}, creds, config) == {
        "access_key_id": "AK",
        "secret_access_key": "SK",
        "region": "eu-west-1",
    }
    assert profile_settings({"AWS_PROFILE": "dev"}, creds, config) == {
        "access_key_id": "DK",
        "secret_access_key": "DS",
        "session_token": "T",
        "region": "us-west-2",
        "endpoint": "http://minio:9000",
    }
    # The environment wins over the files.
    env = {
        "AWS_PROFILE": "dev",
        "AWS_ACCESS_KEY_ID": "E",
        "AWS_REGION": "r",
        "AWS_ENDPOINT_URL": "e",
    }
    assert profile_settings(env, creds, config) == {}
    assert profile_settings({}, None, None) == {}
    with pytest.raises(JobError, match=r"the AWS profile `ops` .* is in neither"):
        profile_settings({"AWS_PROFILE": "ops"}, creds, config)


@pytest.mark.anyio
async def test_a_bad_s3_path_over_http_is_a_400_and_stores_nothing(
    s3env: Seaweed, bucket: str, tmp_path: Path
) -> None:
    """The job API answers the same sentence with 400, and the job is not created."""
    import anyio

    from tests.test_api import job_api

    body = json.dumps(
        {"workers": 1, "delimited_files": {"s3_paths": ["s3://no-such-bucket/x"], "batch_size": 1}}
    ).encode()
    request = (
        b"POST /sum HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
    )
    async with job_api(tmp_path) as port:
        async with await anyio.connect_tcp("127.0.0.1", port) as s:
            await s.send(request)
            answer = b""
            with anyio.fail_after(30):
                while True:
                    try:
                        answer += await s.receive()
                    except anyio.EndOfStream:
                        break
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), answer[:300]
    message = json.loads(payload)["message"]
    assert "s3://no-such-bucket" in message and "delimited_files.s3_paths[0]" in message
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in answer.decode(errors="replace")
    assert not list((tmp_path / "root" / "jobs").glob("*"))


def test_without_the_extra_the_error_names_it() -> None:
    """obstore missing (the `s3` extra not installed): one sentence saying what to install."""
    code = (
        "import sys; sys.modules['obstore'] = None\n"
        "from supervisor.errors import JobError\n"
        "from supervisor.sources import list_files\n"
        "try:\n"
        "    list_files(['s3://bucket/prefix'])\n"
        "except JobError as e:\n"
        "    print(e)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=child_env()
    )
    assert r.returncode == 0, r.stderr
    assert "cortex-batch-supervisor[s3]" in r.stdout, r.stdout
    assert len(r.stdout.strip().splitlines()) == 1
