"""Turn a job submission into batch bodies (docs/job-file.md), without re-encoding a single item.

Theory of operation
-------------------
A batch body is ``[`` + the items joined by ``,`` + ``]``, each item the exact bytes that were
submitted: :class:`msgspec.Raw` slices of the submission for ``item_list``, the JSON value on
each non-blank line for ``delimited_files`` (surrounding whitespace and the ``\\n`` / ``\\r\\n``
are not part of it), the JSON string of each selected file for ``file_path_lister``.

Batches hold ``batch_size`` items, as in Cortex, except that a batch is cut early when one more
item would take its body over ``max_batch_bytes``: the job still goes through, in more batches.
Only an item too big for a batch of its own is an error. Like Cortex, batches of
``delimited_files`` run on from one file into the next.

Cut points are found with running sums and :func:`bisect.bisect_right`, so the per-item work is
done by C loops (``map(len, ...)``, ``itertools.accumulate``, ``bytes.join``); Python code runs
once per batch.

``item_list`` arrives as one :class:`msgspec.Raw`, the text of the whole array (see
:mod:`supervisor.jobs`), and is decoded about 1 MiB at a time, so no object per item is held
beyond one chunk (peak memory: the submission plus a few MiB). A chunk ends at a comma p found
by a regular expression (a comma followed by what the array's items start with), and is
*verified* by decoding it: ``[`` + text[start:p] + ``]`` with ``list[Raw]``, start being a known
element boundary. That is sound: were p inside a string (an unterminated string) or inside a
nested value (an unclosed container: our one ``]`` closes at most one level), the text would not
be JSON, so it decodes only when p is a comma between two items. A failed guess costs one chunk
parse; the next candidate is tried, then a plainer pattern, then a bigger chunk; past a budget
of failures (items whose insides look like item boundaries) the rest of the array is decoded in
one piece, as a list of Raw, which is always right. Chunks' items go to the same packer, so the
bodies are byte for byte those of the whole list.

NDJSON files are read in 1 MiB chunks: memory stays flat whatever the file
size. Each chunk's items are checked as JSON in one :class:`msgspec.json.Decoder` call on
``[item,item,...]``: the body must decode to one value per non-blank line, each exactly
as long as its line, which (the lines being stripped) means every line is one JSON value. Only
when that fails are lines decoded one by one, to name the bad one (``data/x.ndjson:77``).

Everything that can be checked before the first batch (item sizes of ``file_path_lister``,
paths, globs, whose files) is checked by :func:`iter_batches` itself, and so are the item sizes
of an ``item_list`` array of up to 1 MiB (the first chunks). Past that, the returned iterator
may raise :class:`JobError` for an oversized item further on, as it may for a bad line or an
oversized item of ``delimited_files``: a caller that must store nothing from a bad job consumes
the iterator before committing (``EmbeddedQueue.enqueue`` is all or nothing) or runs
:func:`validate_submission` first.
"""

from __future__ import annotations

import itertools
import os
import re
import zlib
from bisect import bisect_right
from collections.abc import Iterator, Sequence
from typing import Final

import msgspec

from supervisor.errors import JobError, printable
from supervisor.jobs import JobSubmission
from supervisor.sources import Source, list_files, list_sources, open_source

__all__ = [
    "DEFAULT_MAX_BATCH_BYTES",
    "iter_batches",
    "list_files",
    "validate_submission",
]

DEFAULT_MAX_BATCH_BYTES: Final = 256 * 1024
_CHUNK: Final = 1 << 20  # NDJSON read size
_ITEM_CHUNK: Final = 1 << 20  # item_list array text decoded at a time
_TRIES: Final = 2  # guesses per pattern and window, spread over the window
_FIRST: Final = 1 << 16  # the first chunk at most: cheap guesses until the items' start is learned
_SPARE: Final = 16  # chunks' worth of failed parses allowed beyond the text cut so far
_LEARN: Final = 32  # longest item prefix learned to tell item boundaries
_BOM: Final = b"\xef\xbb\xbf"

_one_raw = msgspec.json.Decoder(msgspec.Raw)
_raw_list = msgspec.json.Decoder(list[msgspec.Raw])
_add_one = (1).__add__

_WS: Final = rb"[ \t\r\n]*"
_OPEN = re.compile(_WS + rb"\[" + _WS)
_ANY_COMMA = re.compile(rb",")
# What follows the comma before an item, by the first byte of the array's first item.
_ITEM_START: Final = {
    ord("{"): rb"\{",
    ord("["): rb"\[",
    ord('"'): rb'"',
    ord("t"): rb"[tf]",
    ord("f"): rb"[tf]",
    ord("n"): rb"n",
}

Roots = Sequence[str | os.PathLike[str]] | None


def _too_big(name: str, size: int, limit: int, *, at_least: bool = False) -> JobError:
    more = "more than " if at_least else ""
    return JobError(
        f"{name} is {more}{size} bytes; a batch holding it would be over the batch limit "
        f"of {limit} bytes"
    )


class _Packer:
    """Cuts a stream of items into batch bodies; keeps the unfinished tail between feeds."""

    def __init__(self, batch_size: int, limit: int) -> None:
        self.batch_size = batch_size
        self.limit = limit
        self.items: list[bytes] = []
        self.sizes: list[int] = []
        self.count = 0  # batches emitted

    def feed(
        self, items: Sequence[bytes], sizes: Sequence[int], *, final: bool = False
    ) -> Iterator[bytes]:
        """Yield every complete batch (all of them if ``final``); items must each fit alone."""
        if self.items:
            items = self.items + list(items)
            sizes = self.sizes + list(sizes)
        n = len(items)
        # cum[k] = sum(size + 1) of the first k items, so the body of items[i:j] is
        # cum[j] - cum[i] + 1 bytes: the items, j - i - 1 commas and the brackets.
        cum = list(itertools.accumulate(map(_add_one, sizes), initial=0))
        bs, room = self.batch_size, self.limit - 1
        i = 0
        while i < n:
            j = min(i + bs, n)
            if cum[j] - cum[i] > room:
                j = bisect_right(cum, cum[i] + room, i, j) - 1
            elif j == n and j - i < bs and not final:
                break  # an unfinished batch: wait for more items
            self.count += 1
            yield b"[" + b",".join(items[i:j]) + b"]"
            i = j
        self.items = list(items[i:])
        self.sizes = list(sizes[i:])


class _Bad(Exception):
    """The array text is not JSON (only a hand-made :class:`msgspec.Raw` can be)."""


def _decode_run(text: memoryview, start: int, stop: int) -> list[msgspec.Raw] | None:
    """The items of ``text[start:stop]`` (whole items and their commas), or None if it is not."""
    try:
        items = _raw_list.decode(b"".join((b"[", text[start:stop], b"]")))
    except msgspec.DecodeError:
        return None
    return items or None  # whitespace alone is no run of items


def _learned(items: list[msgspec.Raw]) -> re.Pattern[bytes] | None:
    """A comma followed by the bytes every item of ``items`` starts with, if that says more."""
    if len(items) < 2:
        return None
    heads = [memoryview(r)[:_LEARN].tobytes() for r in items[:1024]]
    lo, hi = min(heads), max(heads)  # every head's common prefix is theirs
    n = next((k for k, (a, b) in enumerate(zip(lo, hi, strict=False)) if a != b), len(lo))
    if n < 2:
        return None
    return re.compile(b"," + _WS + re.escape(lo[:n]))


def _array_chunks(array: bytes, chunk: int, spare: int = _SPARE) -> Iterator[list[msgspec.Raw]]:
    """The items of the JSON array ``array`` (its text), decoded ``chunk`` bytes or so at a time.

    Each chunk is cut at a comma after ``chunk`` bytes, verified by decoding it (see the module
    docstring); the first chunk is smaller, so that wrong guesses cost little until the items'
    common start is learned from it. The bytes parsed in vain are counted: once they outweigh
    the text cut so far plus ``spare`` chunks, the rest is decoded in one piece, so the work
    stays linear.
    """
    text = memoryview(array)
    opened = _OPEN.match(text)
    end = len(text) - 1
    while end > 0 and text[end] in b" \t\r\n":
        end -= 1
    if opened is None or text[end] != ord("]"):
        raise _Bad("not an array")
    pos = opened.end()
    if pos > end:
        raise _Bad("not an array")
    if pos == end:
        raise JobError("`item_list.items` is an empty array; a job needs at least one item")
    first = _ITEM_START.get(text[pos], rb"[-0-9]")
    patterns = [re.compile(b"," + _WS + first), _ANY_COMMA]
    start, wasted, done, size = pos, 0, 0, min(chunk, _FIRST)
    while True:
        found: tuple[int, list[msgspec.Raw]] | None = None
        failed: set[int] = set()  # commas already tried for this cut
        target = pos + size
        while found is None and target < end and wasted <= pos - start + spare * chunk:
            window = min(end, target + size)
            for pattern in tuple(patterns):
                # Guesses spread over the window: nearby commas tend to fail together.
                hits: list[int] = []
                for k in range(_TRIES):
                    m = pattern.search(text, target + k * (window - target) // _TRIES, window)
                    if m is not None and m.start() not in hits:
                        hits.append(m.start())
                if not hits and len(patterns) > 2 and pattern is patterns[0]:
                    patterns.pop(0)  # the learned start no longer shows up: forget it
                for p in hits:
                    if p in failed:
                        continue
                    items = _decode_run(text, pos, p)
                    if items is not None:
                        found = (p, items)
                        break
                    failed.add(p)
                    wasted += p - pos
                if found is not None:
                    break
            target = window  # nothing found: a bigger chunk
        if found is None:
            yield _rest(text, pos, end, done, chunk)
            return
        p, items = found
        if pos == start and (learned := _learned(items)) is not None:
            patterns.insert(0, learned)
        size = chunk
        done += len(items)
        pos = p + 1
        yield items


def _rest(text: memoryview, pos: int, end: int, done: int, chunk: int) -> list[msgspec.Raw]:
    """The items from ``pos`` to the end: a copy of that text when small, else the whole array
    decoded in place (today's one Raw per item) minus the ``done`` items already yielded."""
    if end - pos <= 4 * chunk:
        items = _decode_run(text, pos, end)
        if items is None:
            raise _Bad("not JSON")
        return items
    try:
        items = _raw_list.decode(text)
    except msgspec.DecodeError:
        raise _Bad("not JSON") from None
    del items[:done]
    return items


def _sized(items: list[msgspec.Raw], first: int, limit: int) -> list[int]:
    """The items' sizes; refuses an item too big for a batch of its own (``first``: its index)."""
    sizes = list(map(len, items))
    if max(sizes) + 2 > limit:
        for k, size in enumerate(sizes):
            if size + 2 > limit:
                raise _too_big(f"`item_list.items[{first + k}]`", size, limit)
    return sizes


def _item_list(array: bytes, packer: _Packer, chunk: int) -> Iterator[bytes]:
    """Batches of an ``item_list``. Its first two chunks (the first one small, the second one
    ``chunk`` bytes: an array of up to ``chunk`` bytes) are decoded and checked right here."""
    chunks = _array_chunks(array, chunk)
    head: list[tuple[list[msgspec.Raw], list[int]]] = []
    k = 0
    try:
        for items in itertools.islice(chunks, 2):
            head.append((items, _sized(items, k, packer.limit)))
            k += len(items)
    except _Bad:
        raise JobError("`item_list.items` is not a valid JSON array") from None
    return _pack_items(head, k, chunks, packer)


def _pack_items(
    head: list[tuple[list[msgspec.Raw], list[int]]],
    k: int,
    chunks: Iterator[list[msgspec.Raw]],
    packer: _Packer,
) -> Iterator[bytes]:
    """Feeds the checked ``head`` chunks, then the rest (``k``: the index of its first item)."""
    for items, sizes in head:
        yield from packer.feed(items, sizes)
    del head[:]
    try:
        for items in chunks:
            sizes = _sized(items, k, packer.limit)
            k += len(items)
            yield from packer.feed(items, sizes)
    except _Bad:
        raise JobError("`item_list.items` is not a valid JSON array") from None
    yield from packer.feed([], [], final=True)


def _path_items(sources: list[Source], limit: int) -> list[bytes]:
    """The JSON strings of the selected files; refuses a path too long for a batch."""
    items: list[bytes] = []
    for s in sources:
        try:
            item = msgspec.json.encode(s.shown)
        except UnicodeEncodeError:
            raise JobError(f"the file name `{printable(s.shown)}` is not valid UTF-8") from None
        if len(item) + 2 > limit:
            raise _too_big(f"the path `{s.shown}`", len(item), limit)
        items.append(item)
    return items


def _is_utf8(data: bytes) -> bool:
    if data.isascii():
        return True
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


def _bad_line(src: Source, first_line: int, lines: list[bytes], limit: int) -> JobError:
    """The error for the first oversized or invalid line of ``lines`` (the slow path)."""
    for k, line in enumerate(lines):
        item = line.strip()
        if not item:
            continue
        where = f"`{src.shown}:{first_line + k}`"
        if len(item) + 2 > limit:
            return _too_big(where, len(item), limit)
        try:
            _one_raw.decode(item)
        except msgspec.DecodeError as e:
            return JobError(f"{where} is not valid JSON ({e})")
        except RecursionError:
            return JobError(f"{where} is not valid JSON (nested too deeply to be read)")
        if not _is_utf8(item):
            return JobError(f"{where} is not valid JSON (not UTF-8 text)")
    return JobError(f"`{src.shown}` near line {first_line} is not valid NDJSON")  # not reached


def _ndjson_file(src: Source, packer: _Packer) -> Iterator[bytes]:
    """Items of one NDJSON file, fed to ``packer``; yields the batches that completes."""
    limit = packer.limit
    lineno = 0  # complete lines consumed
    carry = b""
    with open_source(src) as f:
        first = True
        while True:
            try:
                chunk = f.read(_CHUNK)
            except (OSError, EOFError, zlib.error) as e:
                raise JobError(f"cannot read `{src.shown}` ({e})") from None
            eof = not chunk
            if first:
                first = False
                if chunk.startswith(_BOM):
                    chunk = chunk[len(_BOM) :]
            if eof:
                lines, carry = [carry], b""
            else:
                lines = (carry + chunk if carry else chunk).split(b"\n")
                carry = lines.pop()
                if len(carry) + 2 > limit:  # a long line: bound memory, fail early if too big
                    carry = carry.lstrip()
                    if len(carry.rstrip()) + 2 > limit:
                        at = f"`{src.shown}:{lineno + len(lines) + 1}`"
                        raise _too_big(at, len(carry.rstrip()), limit, at_least=True)
            items = list(filter(None, map(bytes.strip, lines)))
            if items:
                sizes = list(map(len, items))
                if max(sizes) + 2 > limit:
                    raise _bad_line(src, lineno + 1, lines, limit)
                body = b"[" + b",".join(items) + b"]"
                try:
                    raws = _raw_list.decode(body)  # skips strings: their UTF-8 is checked apart
                    ok = list(map(len, raws)) == sizes and _is_utf8(body)
                except (msgspec.DecodeError, RecursionError):
                    ok = False
                if not ok:
                    raise _bad_line(src, lineno + 1, lines, limit)
                yield from packer.feed(items, sizes)
            lineno += len(lines)
            if eof:
                return


def _delimited(sources: list[Source], packer: _Packer) -> Iterator[bytes]:
    for src in sources:
        yield from _ndjson_file(src, packer)
    yield from packer.feed([], [], final=True)
    if not packer.count:
        raise JobError("the files of `delimited_files.s3_paths` hold no items (no non-blank line)")


def iter_batches(
    sub: JobSubmission,
    *,
    max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
    allowed_roots: Roots = None,
) -> Iterator[bytes]:
    """Batch bodies of ``sub``, in order, each at most ``max_batch_bytes`` long.

    Everything knowable up front is checked before this returns (raising :class:`JobError`):
    item sizes of ``file_path_lister`` and of the first 1 MiB (at least) of an ``item_list``,
    paths, globs, ``allowed_roots``. The rest of an ``item_list`` and NDJSON files are read
    lazily, so an oversized item or a bad line further on raises from the iterator, possibly
    after some batches (consume it all before committing anything, or use
    :func:`validate_submission` first, when nothing may be stored from a bad job).
    ``allowed_roots=None`` allows every path; ``[]`` allows none.
    """
    if sub.item_list is not None:
        il = sub.item_list
        return _item_list(il.items, _Packer(il.batch_size, max_batch_bytes), _ITEM_CHUNK)
    if sub.delimited_files is not None:
        df = sub.delimited_files
        sources = list_sources(
            df.s3_paths,
            df.includes,
            df.excludes,
            allowed_roots=allowed_roots,
            where="delimited_files",
        )
        return _delimited(sources, _Packer(df.batch_size, max_batch_bytes))
    if sub.file_path_lister is not None:
        fl = sub.file_path_lister
        sources = list_sources(
            fl.s3_paths,
            fl.includes,
            fl.excludes,
            allowed_roots=allowed_roots,
            where="file_path_lister",
        )
        items = _path_items(sources, max_batch_bytes)
        packer = _Packer(fl.batch_size, max_batch_bytes)
        return packer.feed(items, list(map(len, items)), final=True)
    raise JobError("a job needs one of `item_list`, `delimited_files`, `file_path_lister`")


def validate_submission(
    sub: JobSubmission,
    *,
    max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
    allowed_roots: Roots = None,
) -> int:
    """Split the whole submission, discarding the bodies; returns the number of batches."""
    batches = iter_batches(sub, max_batch_bytes=max_batch_bytes, allowed_roots=allowed_roots)
    return sum(1 for _ in batches)
