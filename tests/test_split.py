"""supervisor.split / supervisor.sources: submissions into batch bodies, file selection."""

from __future__ import annotations

import contextlib
import gzip
import itertools
import json
import os
import shutil
import sqlite3
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor import jobs, split
from supervisor.errors import JobError
from supervisor.jobs import JobSubmission, decode_submission
from supervisor.sources import compile_glob, list_files
from supervisor.split import DEFAULT_MAX_BATCH_BYTES, iter_batches, validate_submission
from tests.helpers import free_ports, run_supervisor, write_api, write_job

# -- helpers ---------------------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=8,
)

# How one item may be spelled: compact, spaced, indented over several lines, non-ASCII kept.
spellings = st.sampled_from(
    [
        {"separators": (",", ":")},
        {},
        {"indent": 1},
        {"ensure_ascii": False, "separators": (", ", " : ")},
    ]
)


def spell(value: Any, how: dict[str, Any]) -> bytes:
    return json.dumps(value, **how).encode()


def item_list_job_bytes(items: list[bytes], batch_size: int) -> bytes:
    body = b'{"workers":1,"item_list":{"items":[ ' + b" ,\n".join(items) + b" ],"
    return body + b'"batch_size":%d}}' % batch_size


def item_list_job(items: list[bytes], batch_size: int) -> JobSubmission:
    return decode_submission(item_list_job_bytes(items, batch_size))


def files_job(kind: str, paths: list[str], batch_size: int = 10, **kw: Any) -> JobSubmission:
    spec = {"s3_paths": paths, "batch_size": batch_size, **kw}
    return decode_submission(json.dumps({"workers": 1, kind: spec}).encode())


def unpack(body: bytes) -> list[bytes]:
    return [bytes(r) for r in msgspec.json.decode(body, type=list[msgspec.Raw])]


def check_batches(bodies: list[bytes], expected: list[bytes], batch_size: int, limit: int) -> None:
    """Every item once, in order, byte for byte; batches full unless the limit forced a cut."""
    got: list[bytes] = []
    for k, body in enumerate(bodies):
        assert len(body) <= limit
        items = unpack(body)
        assert 1 <= len(items) <= batch_size
        assert body == b"[" + b",".join(items) + b"]"
        got.extend(items)
        if k < len(bodies) - 1 and len(items) < batch_size:
            nxt = expected[len(got)]
            assert len(body) + 1 + len(nxt) > limit  # cut early only when the next didn't fit
    assert got == expected


@contextlib.contextmanager
def chunk_size(n: int) -> Iterator[None]:
    """Read NDJSON in tiny chunks, so lines straddle reads (a tuning knob, not a mock)."""
    saved = split._CHUNK
    split._CHUNK = n  # type: ignore[misc]
    try:
        yield
    finally:
        split._CHUNK = saved  # type: ignore[misc]


@contextlib.contextmanager
def item_chunk(n: int) -> Iterator[None]:
    """Decode item_list arrays ``n`` bytes at a time, so many cuts are made (a tuning knob)."""
    saved = split._ITEM_CHUNK
    split._ITEM_CHUNK = n  # type: ignore[misc]
    try:
        yield
    finally:
        split._ITEM_CHUNK = saved  # type: ignore[misc]


def reference_items(array: bytes) -> list[bytes]:
    """The items as the whole-list decoder sees them: one Raw per item."""
    return [bytes(r) for r in msgspec.json.decode(array, type=list[msgspec.Raw])]


def reference_batches(array: bytes, batch_size: int, limit: int) -> list[bytes]:
    """``batch_size`` items a batch, cut early when one more would go over ``limit``."""
    bodies: list[bytes] = []
    batch: list[bytes] = []
    for item in reference_items(array):
        if batch and (
            len(batch) == batch_size or len(b"[" + b",".join([*batch, item]) + b"]") > limit
        ):
            bodies.append(b"[" + b",".join(batch) + b"]")
            batch = []
        batch.append(item)
    return [*bodies, b"[" + b",".join(batch) + b"]"]


def chunked_items(array: bytes, chunk: int, spare: int = split._SPARE) -> list[list[bytes]]:
    """The items of ``array`` per chunk (``spare``: how much vain parsing before the fallback)."""
    return [[bytes(r) for r in c] for c in split._array_chunks(array, chunk, spare)]


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def ndjson(*values: Any) -> bytes:
    return b"".join(json.dumps(v).encode() + b"\n" for v in values)


# -- item_list -------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(json_values, spellings), min_size=1, max_size=40),
    st.integers(1, 12),
    st.integers(0, 200),
)
def test_item_list_properties(
    values: list[tuple[Any, dict[str, Any]]], batch_size: int, slack: int
) -> None:
    items = [spell(v, how) for v, how in values]
    limit = max(map(len, items)) + 2 + slack
    bodies = list(iter_batches(item_list_job(items, batch_size), max_batch_bytes=limit))
    check_batches(bodies, items, batch_size, limit)


def test_item_list_keeps_bytes_and_cuts_by_count() -> None:
    items = [b'{"b": 1,  "a": 1.0e0}', b'"\\u00e9"', b"[ ]", b"1E+2", b'"x"']
    bodies = list(iter_batches(item_list_job(items, 2)))
    assert bodies == [b'[{"b": 1,  "a": 1.0e0},"\\u00e9"]', b"[[ ],1E+2]", b'["x"]']


def test_item_list_cuts_early_at_the_byte_limit() -> None:
    items = [b'"aaaa"', b'"bbbb"', b'"cccc"']  # 6 bytes each
    # [a,b] is 15 bytes; [a,b,c] would be 22.
    bodies = list(iter_batches(item_list_job(items, 3), max_batch_bytes=15))
    assert bodies == [b'["aaaa","bbbb"]', b'["cccc"]']
    assert validate_submission(item_list_job(items, 3), max_batch_bytes=15) == 2


def test_item_list_item_over_the_limit_is_named() -> None:
    items = [b"1", b'"' + b"x" * 100 + b'"', b"2"]
    with pytest.raises(JobError, match=r"`item_list\.items\[1\]` is 102 bytes.*limit of 50 bytes"):
        iter_batches(item_list_job(items, 1), max_batch_bytes=50)  # raises before any batch


def test_item_list_long_list_runs_across_size_windows() -> None:
    items = [b"%d" % i for i in range(40_000)]
    job = item_list_job(items, 7)
    check_batches(list(iter_batches(job, max_batch_bytes=30)), items, 7, 30)
    items[33_333] = b'"' + b"x" * 40 + b'"'
    with pytest.raises(JobError, match=r"`item_list\.items\[33333\]` is 42 bytes"):
        iter_batches(item_list_job(items, 7), max_batch_bytes=30)


def test_default_limit_is_256_kib() -> None:
    assert DEFAULT_MAX_BATCH_BYTES == 256 * 1024
    big = b'"' + b"x" * (DEFAULT_MAX_BATCH_BYTES - 4) + b'"'  # exactly fills a batch
    assert [len(b) for b in iter_batches(item_list_job([big], 1))] == [DEFAULT_MAX_BATCH_BYTES]
    with pytest.raises(JobError, match="over the batch limit"):
        list(iter_batches(item_list_job([big + b" "], 1), max_batch_bytes=len(big) + 1))


# -- item_list: the array decoded a chunk at a time ------------------------------------------

# Text that looks like JSON structure: commas, brackets, quotes, escapes, item-like prefixes.
tricky_text = st.lists(
    st.sampled_from([",", "[", "]", "{", "}", '"', "\\", ":", " ", "\n", "a", "é", "😀", "\u2028"])
    | st.sampled_from([',{"id":', "],[", '},{"', ", [", ',"', '\\"', "\\u00e9"]),
    max_size=8,
).map("".join)
tricky_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**20), 10**20)
    | st.floats(allow_nan=False, allow_infinity=False)
    | tricky_text,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(["id", "a", ",{"]), inner)
    ),
    max_leaves=10,
)
blank = st.text(st.sampled_from([" ", "\n", "\t", "\r"]), max_size=3).map(str.encode)


@st.composite
def spelled_arrays(draw: st.DrawFn) -> bytes:
    """A JSON array spelled in any legal way: items indented or not, any blanks between."""
    values = draw(st.lists(st.tuples(tricky_values, spellings), min_size=1, max_size=25))
    out = b"[" + draw(blank)
    for k, (value, how) in enumerate(values):
        if k:
            out += draw(blank) + b"," + draw(blank)
        out += spell(value, how)
    return out + draw(blank) + b"]"


@settings(max_examples=300, deadline=None)
@given(spelled_arrays(), st.integers(1, 64), st.sampled_from([0, split._SPARE, 10**9]))
def test_array_chunks_are_the_whole_list(array: bytes, chunk: int, spare: int) -> None:
    # spare=10**9: no fallback, every chunk is cut by a guessed comma that decoded.
    chunks = chunked_items(array, chunk, spare)
    assert all(chunks)
    assert [item for c in chunks for item in c] == reference_items(array)


@settings(max_examples=200, deadline=None)
@given(spelled_arrays(), st.integers(1, 64), st.integers(1, 9), st.integers(0, 100))
def test_item_list_batches_equal_the_whole_list_ones(
    array: bytes, chunk: int, batch_size: int, slack: int
) -> None:
    limit = max(map(len, reference_items(array))) + 2 + slack
    job = b'{"workers":1,"item_list":{"items": ' + array + b', "batch_size":%d}}' % batch_size
    with item_chunk(chunk):
        bodies = list(iter_batches(decode_submission(job), max_batch_bytes=limit))
    assert bodies == reference_batches(array, batch_size, limit)


def test_array_chunks_with_item_like_insides() -> None:
    """Items whose insides repeat how items start: most guessed cuts fail, none is wrong."""
    kid = b'{"id":1,"s":"],{\\"id\\":2"}'
    items = [b'{"id":%d,"kids":[%s]}' % (i, b",".join([kid] * (i % 5))) for i in range(300)]
    array = b"[" + b",".join(items) + b"]"
    for chunk in (1, 7, 64, 500, 4096):
        for spare in (split._SPARE, 10**9):
            chunks = chunked_items(array, chunk, spare)
            assert [item for c in chunks for item in c] == items
    assert len(chunked_items(array, 4096)) > 1


def test_array_chunks_fall_back_for_one_huge_nested_item() -> None:
    huge = b"[" + b",".join(b'[[%d,{"a":[1,2]}],[]]' % i for i in range(800)) + b"]"
    for array in (
        b"[" + huge + b"]",
        b"[1,2,3," + huge + b"]",
        b"[" + b",".join([b"[0]"] * 40 + [huge] + [b"[0]"] * 40) + b"]",
    ):
        for chunk, spare in itertools.product((1, 16, 1000), (0, split._SPARE, 10**9)):
            chunks = chunked_items(array, chunk, spare)
            assert [item for c in chunks for item in c] == reference_items(array)
    assert huge in chunked_items(b"[" + huge + b"]", 16)[-1]


def test_array_chunks_of_a_big_array_are_many() -> None:
    items = [b'{"id":%d,"text":"a, b, {c}"}' % i for i in range(120_000)]  # ~3.5 MB
    chunks = chunked_items(b"[" + b",\n  ".join(items) + b"]", 1 << 20)
    assert 3 <= len(chunks) <= 5
    assert [item for c in chunks for item in c] == items


def test_item_list_late_oversized_item_is_named_with_its_index() -> None:
    items = [b"%d" % (10**6 + i) for i in range(200_000)]  # 1.6 MB: past the first chunk
    items[180_001] = b'"' + b"x" * 60 + b'"'
    batches = iter_batches(item_list_job(items, 10), max_batch_bytes=50)  # no error yet
    with pytest.raises(JobError, match=r"`item_list\.items\[180001\]` is 62 bytes"):
        list(batches)
    with item_chunk(64), pytest.raises(JobError, match=r"`item_list\.items\[5\]` is 62 bytes"):
        iter_batches(item_list_job([*items[:5], items[180_001]], 10), max_batch_bytes=50)


def test_item_list_bad_json_inside_the_array() -> None:
    with pytest.raises(
        JobError, match=r"^job: not valid JSON \(JSON is malformed: .*\(byte \d+\)\)"
    ):
        item_list_job([b"1", b'{"a": }', b"3"], 1)
    with pytest.raises(JobError, match="not valid JSON"):
        item_list_job([b"1", b"", b"3"], 1)
    hand_made = JobSubmission(
        workers=1, item_list=jobs.ItemList(items=msgspec.Raw(b"[1,2,[3]"), batch_size=1)
    )
    with pytest.raises(JobError, match=r"`item_list\.items` is not a valid JSON array"):
        iter_batches(hand_made)
    hand_made.item_list = jobs.ItemList(items=msgspec.Raw(b"[1,2, ,3]"), batch_size=1)
    with item_chunk(1), pytest.raises(JobError, match="is not a valid JSON array"):
        list(iter_batches(hand_made))
    for text, message in [(b"[ ]", "is an empty array"), (b"3", "is not a valid JSON array")]:
        hand_made.item_list = jobs.ItemList(items=msgspec.Raw(text), batch_size=1)
        with pytest.raises(JobError, match=message):
            iter_batches(hand_made)


@pytest.mark.parametrize(
    ("items", "message"),
    [
        (b"[]", "Expected `array` of length >= 1"),
        (b"[ \n\t]", "Expected `array` of length >= 1"),
        (b"3", "Expected `array`, got `int`"),
        (b"1.5", "Expected `array`, got `float`"),
        (b"null", "Expected `array`, got `null`"),
        (b'{"a": [1]}', "Expected `array`, got `object`"),
        (b'"[1]"', "Expected `array`, got `str`"),
        (b"true", "Expected `array`, got `bool`"),
    ],
)
def test_item_list_items_must_be_a_non_empty_array(items: bytes, message: str) -> None:
    job = b'{"workers":1,"item_list":{"items": ' + items + b' ,"batch_size":1}}'
    with pytest.raises(JobError) as e:
        decode_submission(job, "job.json")
    assert str(e.value) == f"job.json: {message} - at `item_list.items`"


def test_run_with_a_late_oversized_item_stores_nothing(tmp_path: Path) -> None:
    """The error comes after batches were made: `run` exits 2, no pod starts, nothing stays."""
    marker = tmp_path / "started"
    api = write_api(
        tmp_path / "api.yaml", [{"name": "a", "command": ["touch", str(marker)]}], port=free_ports()
    )
    items = [b'{"i":%d}' % (10**6 + i) for i in range(150_000)]  # 2 MB
    items[140_000] = b'"' + b"x" * 300_000 + b'"'
    job = write_job(tmp_path / "job.json", item_list_job_bytes(items, 10))
    root = tmp_path / "root"
    r = run_supervisor("run", str(api), "--job", str(job), "--root", str(root))
    assert r.returncode == 2, r.stderr
    assert "`item_list.items[140000]` is 300002 bytes" in r.stderr
    assert "Traceback" not in r.stderr
    assert r.stdout == ""
    assert not marker.exists()
    assert not root.exists()  # the job was created, then removed, and the root with it

    # On a root that is already in use, only the bad job goes: the queue file stays.
    db = root / "cortex" / "supervisor" / "queue.sqlite3"
    db.parent.mkdir(parents=True)
    db.touch()
    r = run_supervisor("run", str(api), "--job", str(job), "--root", str(root))
    assert r.returncode == 2, r.stderr
    assert db.exists()  # the job was created, then removed with its batches
    with contextlib.closing(sqlite3.connect(db)) as conn:
        for table in ("jobs", "batches"):
            assert conn.execute(f"select count(*) from {table}").fetchone()[0] == 0
    assert not [p for p in db.parent.iterdir() if p.name.startswith("bodies")]
    r = run_supervisor("validate", str(api), "--job", str(job))
    assert r.returncode == 2
    assert "`item_list.items[140000]`" in r.stderr


# -- delimited_files: NDJSON -----------------------------------------------------------------

line_endings = st.sampled_from([b"\n", b"\r\n", b" \n", b"\n\n", b"\n  \t\n"])


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.lists(st.tuples(json_values, line_endings), max_size=15), min_size=1, max_size=3),
    st.integers(1, 7),
    st.integers(0, 60),
    st.integers(1, 64),
    st.booleans(),
)
def test_ndjson_properties(
    files: list[list[tuple[Any, bytes]]], batch_size: int, slack: int, chunk: int, tail: bool
) -> None:
    expected = [spell(v, {}) for f in files for v, _ in f]
    if not expected:
        expected = [b"0"]
        files[0].append((0, b"\n"))
    with tempfile.TemporaryDirectory() as tmp:
        for i, f in enumerate(files):
            data = b"".join(b"  " + spell(v, {}) + end for v, end in f)
            if not tail:
                data = data.rstrip(b"\r\n")  # no newline at the end of the file
            write(Path(tmp, f"part-{i}.ndjson"), data)
        limit = max(map(len, expected)) + 2 + slack
        job = files_job("delimited_files", [tmp], batch_size)
        with chunk_size(chunk):
            bodies = list(iter_batches(job, max_batch_bytes=limit))
    check_batches(bodies, expected, batch_size, limit)


def test_ndjson_crlf_blank_lines_bom_and_whitespace(tmp_path: Path) -> None:
    data = b'\xef\xbb\xbf{"a": 1}\r\n\r\n   \n\t[1, 2] \r\n"\xc3\xa9"'
    write(tmp_path / "x.ndjson", data)
    bodies = list(iter_batches(files_job("delimited_files", [str(tmp_path / "x.ndjson")], 2)))
    assert bodies == [b'[{"a": 1},[1, 2]]', b'["\xc3\xa9"]']


def test_ndjson_batches_run_on_across_files(tmp_path: Path) -> None:
    write(tmp_path / "d" / "a.ndjson", ndjson(1, 2, 3))
    write(tmp_path / "d" / "b.ndjson", ndjson(4, 5))
    bodies = list(iter_batches(files_job("delimited_files", [str(tmp_path / "d")], 2)))
    assert bodies == [b"[1,2]", b"[3,4]", b"[5]"]


def test_ndjson_gzip(tmp_path: Path) -> None:
    with gzip.open(tmp_path / "x.ndjson.gz", "wb") as f:
        f.write(ndjson(*range(5)))
    job = files_job("delimited_files", [str(tmp_path / "x.ndjson.gz")], 3)
    assert list(iter_batches(job)) == [b"[0,1,2]", b"[3,4]"]


def test_ndjson_bad_line_is_named(tmp_path: Path) -> None:
    write(tmp_path / "x.ndjson", b'{"a": 1}\n\n{"a": }\n3\n')
    job = files_job("delimited_files", [f"{tmp_path}/x.ndjson"], 1)
    with pytest.raises(JobError, match=r"`.*/x\.ndjson:3` is not valid JSON"):
        list(iter_batches(job))


@pytest.mark.parametrize(
    ("line", "why"),
    [
        (b'"caf\xe9"', "not UTF-8 text"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply to be read"),
    ],
    ids=["latin-1", "deep"],
)
def test_ndjson_lines_msgspec_skips_are_checked(tmp_path: Path, line: bytes, why: str) -> None:
    """Items are kept as text, not decoded: their UTF-8 and depth are checked all the same."""
    write(tmp_path / "x.ndjson", b'"ok"\n' + line + b"\n")
    job = files_job("delimited_files", [f"{tmp_path}/x.ndjson"], 1)
    with pytest.raises(JobError) as e:
        list(iter_batches(job))
    assert str(e.value) == f"`{tmp_path}/x.ndjson:2` is not valid JSON ({why})"


@pytest.mark.parametrize(
    "line",
    [b"1, 2", b"[1", b"2]", b'"a', b"{}{}", b"1 2", b"nul"],
    ids=["two-values", "open", "close", "open-string", "two-objects", "space", "truncated"],
)
def test_ndjson_lines_that_would_only_parse_together_are_refused(
    tmp_path: Path, line: bytes
) -> None:
    # [1 / 2] / 3,4 make the valid array [[1,2],3,4] when joined: each line must stand alone.
    write(tmp_path / "x.ndjson", b"0\n" + line + b"\n2]\n3,4\n")
    with pytest.raises(JobError, match=r"x\.ndjson:2` is not valid JSON"):
        list(iter_batches(files_job("delimited_files", [str(tmp_path / "x.ndjson")], 10)))


def test_ndjson_oversized_line_is_named(tmp_path: Path) -> None:
    write(tmp_path / "x.ndjson", ndjson(1, "x" * 100, 2))
    job = files_job("delimited_files", [str(tmp_path / "x.ndjson")], 1)
    with pytest.raises(JobError, match=r"x\.ndjson:2` is 102 bytes.*limit of 64 bytes"):
        list(iter_batches(job, max_batch_bytes=64))


def test_ndjson_endless_line_fails_without_reading_it_whole(tmp_path: Path) -> None:
    write(tmp_path / "x.ndjson", b"1\n" + b"[" + b"0," * 200_000)  # no newline, no end
    job = files_job("delimited_files", [str(tmp_path / "x.ndjson")], 1)
    with chunk_size(4096), pytest.raises(JobError, match=r"x\.ndjson:2` is more than"):
        list(iter_batches(job, max_batch_bytes=10_000))


def test_ndjson_long_whitespace_is_not_an_item(tmp_path: Path) -> None:
    write(tmp_path / "x.ndjson", b"1\n" + b" " * 50_000 + b"2\n")
    job = files_job("delimited_files", [str(tmp_path / "x.ndjson")], 5)
    with chunk_size(4096):
        assert list(iter_batches(job, max_batch_bytes=1000)) == [b"[1,2]"]


def test_ndjson_files_without_items(tmp_path: Path) -> None:
    write(tmp_path / "a.ndjson", b"\n \n")
    write(tmp_path / "b.ndjson", b"")
    with pytest.raises(JobError, match="hold no items"):
        list(iter_batches(files_job("delimited_files", [str(tmp_path)], 5)))


# -- file selection --------------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """data/{a.ndjson, b.json, part-1.ndjson, part-2/c.ndjson, sub/deep/d.ndjson}, cwd=tmp."""
    for name in ["a.ndjson", "b.json", "part-1.ndjson", "part-2/c.ndjson", "sub/deep/d.ndjson"]:
        write(tmp_path / "data" / name, ndjson(name))
    write(tmp_path / "datafile.ndjson", ndjson("datafile"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_folder_is_a_recursive_prefix_in_sorted_order(tree: Path) -> None:
    expected = [
        "data/a.ndjson",
        "data/b.json",
        "data/part-1.ndjson",
        "data/part-2/c.ndjson",
        "data/sub/deep/d.ndjson",
    ]
    assert list_files(["data"]) == expected
    assert list_files(["data/"]) == expected


def test_plain_prefix_matches_like_s3(tree: Path) -> None:
    assert list_files(["data/part-"]) == ["data/part-1.ndjson", "data/part-2/c.ndjson"]
    assert list_files(["data"]) != list_files(["dat"])  # `dat` also selects datafile.ndjson
    assert "datafile.ndjson" in list_files(["dat"])


def test_single_file_and_dedupe(tree: Path) -> None:
    assert list_files(["data/b.json", "data/", str(tree / "data" / "b.json")]) == [
        "data/b.json",
        "data/a.ndjson",
        "data/part-1.ndjson",
        "data/part-2/c.ndjson",
        "data/sub/deep/d.ndjson",
    ]


@pytest.mark.parametrize(
    ("includes", "excludes", "expected"),
    [
        (["**.ndjson"], [], ["a.ndjson", "part-1.ndjson", "part-2/c.ndjson", "sub/deep/d.ndjson"]),
        (["data/*.ndjson"], [], ["a.ndjson", "part-1.ndjson"]),
        (["*.ndjson"], [], []),  # `*` stays within one component: matches nothing here
        (
            ["data/**/*.ndjson"],
            [],
            ["a.ndjson", "part-1.ndjson", "part-2/c.ndjson", "sub/deep/d.ndjson"],
        ),
        (["**.ndjson"], ["**/part-*"], ["a.ndjson", "part-2/c.ndjson", "sub/deep/d.ndjson"]),
        (["**.ndjson"], ["**/part-**"], ["a.ndjson", "sub/deep/d.ndjson"]),
        ([], ["**.ndjson"], ["b.json"]),
        (["data/{a,b}.*"], ["**.json"], ["a.ndjson"]),
        (["data/part-?.ndjson", "**/d.ndjson"], [], ["part-1.ndjson", "sub/deep/d.ndjson"]),
        (["data/[ab].*"], [], ["a.ndjson", "b.json"]),
        (["data/[!ab]*"], [], ["part-1.ndjson"]),
    ],
)
def test_includes_and_excludes(
    tree: Path, includes: list[str], excludes: list[str], expected: list[str]
) -> None:
    if not expected:
        with pytest.raises(JobError, match="no file matches"):
            list_files(["data/"], includes, excludes)
    else:
        assert list_files(["data/"], includes, excludes) == [f"data/{e}" for e in expected]


@pytest.mark.parametrize(
    ("includes", "excludes", "message"),
    [
        (
            ["*.csv"],
            [],
            "no file matches the includes `*.csv` (of the 6 file(s) under `data/`, "
            "`datafile.ndjson`) - at `delimited_files.includes`",
        ),
        (
            ["**.csv", "**.tsv", "a", "b"],
            ["**.json"],
            "no file matches the includes `**.csv`, `**.tsv`, `a` and 1 more (of the 6 file(s) "
            "under `data/`, `datafile.ndjson`) - at `delimited_files.includes`",
        ),
        (
            ["**.ndjson"],
            ["**"],
            "the excludes `**` leave out the 5 file(s) the includes match (of the 6 file(s) "
            "under `data/`, `datafile.ndjson`) - at `delimited_files.excludes`",
        ),
        (
            [],
            ["**.*"],
            "the excludes `**.*` leave out the 6 file(s) under `data/`, `datafile.ndjson` "
            "- at `delimited_files.excludes`",
        ),
    ],
)
def test_nothing_left_after_globs(
    tree: Path, includes: list[str], excludes: list[str], message: str
) -> None:
    """The message says what matched nothing, naming the globs and the paths."""
    job = files_job(
        "delimited_files", ["data/", "datafile.ndjson"], includes=includes, excludes=excludes
    )
    with pytest.raises(JobError) as e:
        iter_batches(job)
    assert str(e.value) == message


def test_file_urls(tree: Path) -> None:
    spaced = write(tree / "my data" / "x y.ndjson", ndjson(1))
    url = (tree / "data").as_uri()
    assert list_files([url], ["file://**/sub/**"]) == [f"{url}/sub/deep/d.ndjson"]
    assert list_files([(tree / "my data").as_uri() + "/"]) == [spaced.as_uri()]
    assert list_files([f"file://localhost{tree}/data/b.json"]) == [
        f"file://localhost{tree}/data/b.json"
    ]
    job = files_job("file_path_lister", [url], 2, includes=["**.ndjson"])
    bodies = list(iter_batches(job))
    assert [json.loads(b) for b in bodies] == [
        [f"{url}/a.ndjson", f"{url}/part-1.ndjson"],
        [f"{url}/part-2/c.ndjson", f"{url}/sub/deep/d.ndjson"],
    ]


def test_file_path_lister_local_paths(tree: Path) -> None:
    job = files_job("file_path_lister", ["data/part-", "data/b.json"], 10)
    assert list(iter_batches(job)) == [
        b'["data/part-1.ndjson","data/part-2/c.ndjson","data/b.json"]'
    ]
    with pytest.raises(JobError, match=r"the path `data/b\.json` is 13 bytes"):
        iter_batches(files_job("file_path_lister", ["data/b.json"], 1), max_batch_bytes=14)


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("gs://bucket/key", "in an object store other than S3, which is not supported"),
        ("s3:///key", "`s3:///key` names no bucket"),
        ("file://otherhost/data", "must be local"),
        ("missing/", "`missing/` does not exist"),
        ("missing/x.ndjson", "`missing/x.ndjson` does not exist"),
        ("data/nope-", "`data/nope-` does not exist (nor any name starting with it)"),
        ("data/b.json/", "`data/b.json/` does not exist (not a folder)"),
        ("data/empty", "the folder `data/empty` holds no file"),
        ("data/fifo", "`data/fifo` is not a regular file or a folder"),
        ("data/\x00", "`data/\\x00` does not exist (nor any name starting with it)"),
        ("", "the path is empty; expected an s3:// URL, a local path or a file:// URL"),
    ],
)
def test_bad_paths(tree: Path, path: str, message: str) -> None:
    """One sentence naming the path, then the field, as msgspec's messages end."""
    (tree / "data" / "empty").mkdir()
    os.mkfifo(tree / "data" / "fifo")
    with pytest.raises(JobError) as e:
        iter_batches(files_job("delimited_files", ["data/a.ndjson", path]))  # raises eagerly
    assert message in str(e.value)
    assert str(e.value).endswith(" - at `delimited_files.s3_paths[1]`")


def test_bad_globs(tree: Path) -> None:
    for pattern, what in [("data/[ab", "`\\[`"), ("{a,b", "`{`"), ("a\\", "lone"), ("[]", "empty")]:
        with pytest.raises(JobError, match=f"{what}.* - at `file_path_lister.includes\\[0\\]`"):
            iter_batches(files_job("file_path_lister", ["data/"], includes=[pattern]))
    with pytest.raises(JobError, match=r"malformed.* - at `excludes\[0\]`"):
        list_files(["data/"], [], ["[z-a]"])


def test_glob_semantics() -> None:
    def match(pattern: str, path: str) -> bool:
        return compile_glob(pattern).fullmatch(path) is not None

    assert match("**.jpg", "s3://bucket/images/img_2.jpg")
    assert match("s3://b/dir/**/*.json", "s3://b/dir/x.json")
    assert match("s3://b/dir/**/*.json", "s3://b/dir/y/z/x.json")
    assert not match("s3://b/dir/*.json", "s3://b/dir/y/x.json")
    assert not match("a?c", "a/c")
    assert match("a\\*c", "a*c") and not match("a\\*c", "abc")
    assert match("{x,y/z}.txt", "y/z.txt")
    assert match("a.b", "a.b") and not match("a.b", "axb")


def test_symlinked_folders_are_followed_once(tmp_path: Path) -> None:
    write(tmp_path / "d" / "x.ndjson", ndjson(1))
    (tmp_path / "d" / "loop").symlink_to(tmp_path / "d")
    assert list_files([str(tmp_path / "d")]) == [f"{tmp_path}/d/x.ndjson"]


# -- whose files (allowed_roots) -------------------------------------------------------------


def test_allowed_roots(tmp_path: Path) -> None:
    root = tmp_path / "allowed"
    write(root / "in.ndjson", ndjson(1))
    write(tmp_path / "secret.ndjson", ndjson("secret"))
    (root / "link.ndjson").symlink_to(tmp_path / "secret.ndjson")
    (root / "linkdir").symlink_to(tmp_path, target_is_directory=True)
    roots = [root]

    assert list_files([str(root / "in.ndjson")], allowed_roots=roots) == [str(root / "in.ndjson")]
    assert list_files([root.as_uri() + "/in"], allowed_roots=roots) == [
        root.as_uri() + "/in.ndjson"
    ]

    outside = [
        str(root / ".." / "secret.ndjson"),
        str(tmp_path / "secret.ndjson"),
        str(root / "link.ndjson"),
        str(root / "linkdir" / "secret.ndjson"),
        (root / ".." / "secret.ndjson").as_uri(),
        "/etc/",
    ]
    for path in outside:
        with pytest.raises(JobError, match="is outside the allowed data folders"):
            list_files([path], allowed_roots=roots)

    # A folder inside, holding a symlink leading out: refused unless excluded.
    with pytest.raises(JobError, match=r"`.*link\.ndjson` is outside the allowed data folders"):
        list_files([str(root)], allowed_roots=roots)
    assert list_files([str(root)], [], ["**/link**"], allowed_roots=roots) == [
        str(root / "in.ndjson")
    ]

    with pytest.raises(JobError, match=r"not allowed .* until the server is given a data folder"):
        list_files([str(root / "in.ndjson")], allowed_roots=[])
    job = files_job("delimited_files", [str(root / "in.ndjson")])
    assert list(iter_batches(job, allowed_roots=None)) == [b"[1]"]
    with pytest.raises(JobError, match="outside"):
        iter_batches(job, allowed_roots=[tmp_path / "elsewhere"])


def test_unreadable_file() -> None:
    """Also as root (CI): the check runs in a forked child that dropped its privileges."""
    folder = Path(tempfile.mkdtemp())
    try:
        folder.chmod(0o755)  # anyone may look in, nobody but the owner may read the file
        f = write(folder / "x.ndjson", ndjson(1))
        f.chmod(0)
        read, write_end = os.pipe()
        with warnings.catch_warnings():  # 3.12+ warns of fork with threads: the child only
            warnings.simplefilter("ignore", DeprecationWarning)  # calls list_files and exits
            pid = os.fork()
        if pid == 0:  # the child: become `nobody` if root, then ask
            code = 1
            try:
                os.close(read)
                if os.geteuid() == 0:
                    os.setgid(65534)
                    os.setuid(65534)
                try:
                    list_files([str(f)])
                    message = "no error"
                except JobError as e:
                    message = str(e)
                os.write(write_end, message.encode())
                code = 0
            finally:
                os._exit(code)
        os.close(write_end)
        with os.fdopen(read, "rb") as pipe:
            message = pipe.read().decode()
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert "is not readable" in message, message
    finally:
        shutil.rmtree(folder)
