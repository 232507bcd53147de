"""`supervisor validate` fed garbage: one line naming the file and the field, exit 2, no traceback."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from supervisor.cli import main
from supervisor.config import name_keys, parse_apis
from supervisor.errors import ConfigError

API = b'- name: a\n  kind: BatchAPI\n  pod:\n    containers:\n      - name: c\n        command: ["true"]\n'
JOB = b'{"workers":1,"item_list":{"items":[1],"batch_size":1}'


def job(extra: bytes = b"") -> bytes:
    return JOB + extra + b"}"


# (API file, job file or None, the message after `supervisor: <the bad file>: `)
CASES: dict[str, tuple[bytes, bytes | None, str]] = {
    # -- the API file
    "env int": (
        API + b"        env: {THREADS: 4}\n",
        None,
        "Expected `str`, got `int` - at `pod.containers[0].env.THREADS`; "
        "quote it to make it a string",
    ),
    "env bool, second key": (
        API + b"        env: {A: x, DEBUG: true}\n",
        None,
        "Expected `str`, got `bool` - at `pod.containers[0].env.DEBUG`; "
        "quote it to make it a string",
    ),
    "env null, odd key": (
        API + b'        env: {"my var": }\n',
        None,
        'Expected `str`, got `null` - at `pod.containers[0].env["my var"]`; '
        "quote it to make it a string",
    ),
    "date name": (
        API.replace(b"name: a", b"name: 2024-01-01"),
        None,
        "Expected `str`, got `date` - at `name`; quote it to make it a string",
    ),
    "unknown field": (
        API + b"        comand: [x]\n",
        None,
        "Object contains unknown field `comand` - at `pod.containers[0]`",
    ),
    "wrong type": (
        API.replace(b"  pod:\n", b"  pod:\n    port: abc\n"),
        None,
        "Expected `int`, got `str` - at `pod.port`",
    ),
    "huge number": (
        API.replace(b"  pod:\n", b"  pod:\n    port: 1" + b"0" * 40 + b"\n"),
        None,
        "Expected `int` <= 65535 - at `pod.port`",
    ),
    "null mapping": (
        API.split(b"  pod:")[0] + b"  pod: null\n",
        None,
        "Expected `object`, got `null` - at `pod`",
    ),
    "wrong kind": (
        API.replace(b"kind: BatchAPI", b"kind: RealtimeAPI"),
        None,
        "Invalid enum value 'RealtimeAPI' - at `kind`; this supervisor runs `BatchAPI` only",
    ),
    "second of two APIs": (
        API + API.replace(b"name: a", b"name: b", 1).replace(b"command: [", b"command: 7 #"),
        None,
        "Expected `array`, got `int` - at `[1].pod.containers[0].command`",
    ),
    "non-UTF-8": (
        API.replace(b"name: c", b"name: \xff"),
        None,
        "the file is not UTF-8 text (byte 0xff at line 5: invalid start byte)",
    ),
    "control character": (
        API.replace(b"name: c", b"name: \x00"),
        None,
        "the character #x0000 at line 5 is not allowed in YAML",
    ),
    "empty": (
        b"",
        None,
        "the file holds nothing (it is empty or `null`); "
        "expected a BatchAPI mapping or a list of them",
    ),
    "scalar": (b"42\n", None, "expected a BatchAPI mapping or a list of them, got `int`"),
    "two documents": (
        API + b"---\n" + API,
        None,
        "the file holds more than one YAML document (another one starts at line 7, "
        "column 1); put the APIs in one list",
    ),
    "a key twice": (
        API.replace(b"  kind: BatchAPI\n", b"  kind: BatchAPI\n  kind: BatchAPI\n"),
        None,
        "the key `kind` is given twice in one mapping (lines 2 and 3)",
    ),
    "nested too deeply": (b"[" * 100_000, None, "the file is nested too deeply to be read"),
    "JSON with a syntax error": (
        b'{"name": "a", "kind": "BatchAPI" "pod": {}}',
        None,
        "the file is not valid YAML/JSON at line 1, column 34: "
        "expected ',' or '}', but got '<scalar>'",
    ),
    # -- the job file
    "empty dead-letter arn": (
        API,
        job(b',"sqs_dead_letter_queue":{"arn":"","max_receive_count":1}'),
        "Expected `str` of length >= 1 - at `sqs_dead_letter_queue.arn`",
    ),
    "max_receive_count 0": (
        API,
        job(b',"sqs_dead_letter_queue":{"arn":"x","max_receive_count":0}'),
        "Expected `int` >= 1 - at `sqs_dead_letter_queue.max_receive_count`",
    ),
    "workers 0": (API, job(b',"workers":0'), "Expected `int` >= 1 - at `workers`"),
    "timeout 0": (API, job(b',"timeout":0'), "Expected `int` >= 1 - at `timeout`"),
    "huge workers": (
        API,
        job(b',"workers":1' + b"0" * 30),
        "Expected `int` <= 9223372036854775807 - at `workers`",
    ),
    "huge timeout": (
        API,
        job(b',"timeout":99999999999999999999'),
        "Expected `int` <= 9223372036854775807 - at `timeout`",
    ),
    "number out of range in config": (
        API,
        job(b',"config":{"a":1,"b c":1e999}'),
        'Number out of range - at `config["b c"]`',
    ),
    "job wrong type": (
        API,
        job(b',"timeout":"60"'),
        "Expected `int | null`, got `str` - at `timeout`",
    ),
    "job unknown field": (API, job(b',"wrkers":2'), "Object contains unknown field `wrkers`"),
    "job null": (API, b"null", "Expected `object`, got `null`"),
    "job null mapping": (
        API,
        b'{"workers":1,"item_list":null}',
        "A job needs exactly one of `item_list`, `delimited_files`, `file_path_lister`; found none",
    ),
    "job empty": (API, b" \n", "the job is empty; expected a JSON object"),
    "trailing comma": (
        API,
        job(b","),
        "not valid JSON (JSON is malformed: trailing comma in object (byte 54))",
    ),
    "two JSON documents": (
        API,
        job() + job(),
        "not valid JSON (JSON is malformed: trailing characters (byte 55))",
    ),
    "non-UTF-8 in an item": (
        API,
        b'{"workers":1,"item_list":{"items":["\xff"],"batch_size":1}}',
        "not valid JSON (byte 36, 0xff, is not UTF-8)",
    ),
    "non-UTF-8 in a key": (
        API,
        job(b',"\xfe":1'),
        "not valid JSON (byte 55, 0xfe, is not UTF-8)",
    ),
    "byte order mark": (
        API,
        b"\xef\xbb\xbf" + job(),
        "not valid JSON (it starts with a byte order mark; save it as UTF-8 without one)",
    ),
    "job nested too deeply": (
        API,
        b'{"workers":1,"item_list":{"items":[' + b"[" * 100_000 + b"]" * 100_000 + b"]}}",
        "not valid JSON (nested too deeply to be read)",
    ),
}


@pytest.mark.parametrize(("api", "job_file", "message"), CASES.values(), ids=CASES.keys())
def test_garbage_gets_one_line_and_exit_2(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    api: bytes,
    job_file: bytes | None,
    message: str,
) -> None:
    (tmp_path / "api.yaml").write_bytes(api)
    argv = ["validate", str(tmp_path / "api.yaml")]
    bad = tmp_path / "api.yaml"
    if job_file is not None:
        (tmp_path / "job.json").write_bytes(job_file)
        argv += ["--job", str(tmp_path / "job.json")]
        bad = tmp_path / "job.json"
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"supervisor: {bad}: {message}\n"


@pytest.mark.parametrize("which", ["api", "job"])
def test_a_folder_or_a_missing_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], which: str
) -> None:
    (tmp_path / "api.yaml").write_bytes(API)
    what = "API" if which == "api" else "job"
    for bad, reason in [(tmp_path, "Is a directory"), (tmp_path / "nope", "No such file")]:
        argv = ["validate", str(tmp_path / "api.yaml"), "--job", str(bad)]
        if which == "api":
            argv = ["validate", str(bad)]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"supervisor: {bad}: cannot read the {what} file ({reason}")
        assert err.count("\n") == 1


@pytest.mark.parametrize("which", ["api", "job"])
def test_an_endless_file_is_refused_past_its_limit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, which: str
) -> None:
    # /dev/zero (or a FIFO that never ends) would otherwise be read until memory runs out.
    monkeypatch.setattr(
        f"supervisor.{'config.API' if which == 'api' else 'jobs.JOB'}_FILE_LIMIT", 1 << 20
    )
    (tmp_path / "api.yaml").write_bytes(API)
    argv = ["validate", str(tmp_path / "api.yaml"), "--job", "/dev/zero"]
    if which == "api":
        argv = ["validate", "/dev/zero"]
    assert main(argv) == 2
    what = "API" if which == "api" else "job"
    err = capsys.readouterr().err
    assert (
        err
        == f"supervisor: /dev/zero: cannot read the {what} file (the file is larger than 1 MiB)\n"
    )


def test_a_job_file_from_a_fifo_is_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # What `supervisor validate api.yaml --job <(make-job)` hands over.
    (tmp_path / "api.yaml").write_bytes(API)
    fifo = tmp_path / "job.fifo"
    os.mkfifo(fifo)
    writer = threading.Thread(target=fifo.write_bytes, args=(job(),), daemon=True)
    writer.start()
    assert main(["validate", str(tmp_path / "api.yaml"), "--job", str(fifo)]) == 0
    writer.join(timeout=10)
    assert not writer.is_alive()


def test_name_keys_follows_the_types_and_gives_up_politely() -> None:
    data = {"pod": {"containers": [{"name": "c", "command": ["x"], "env": {"A": "1", "B": 2}}]}}
    from supervisor.config import BatchAPI

    assert name_keys(".pod.containers[0].env[...]", data, BatchAPI) == ".pod.containers[0].env.B"
    assert name_keys(".pod.containers[3].env[...]", data, BatchAPI) == (
        ".pod.containers[3].env[...]"
    )
    assert name_keys("not a path", data, BatchAPI) == "not a path"


def test_a_list_of_one_api_reads_as_that_api() -> None:
    api = json.loads(json.dumps({"name": "a", "kind": "BatchAPI", "pod": {"containers": []}}))
    with pytest.raises(ConfigError) as e:
        parse_apis([api], "f.yaml")
    assert str(e.value) == "f.yaml: Expected `array` of length >= 1 - at `pod.containers`"
