"""Turn a job submission into batch bodies (SPEC §5), without re-encoding a single item.

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
once per batch. NDJSON files are read in 1 MiB chunks: memory stays flat whatever the file
size. Each chunk's items are checked as JSON in one :class:`msgspec.json.Decoder` call on
``[item,item,...]``: the body must decode to one value per non-blank line, each exactly
as long as its line, which (the lines being stripped) means every line is one JSON value. Only
when that fails are lines decoded one by one, to name the bad one (``data/x.ndjson:77``).

Everything that can be checked before the first batch (item sizes of ``item_list`` and
``file_path_lister``, paths, globs, whose files) is checked by :func:`iter_batches` itself; for
``delimited_files`` the returned iterator may still raise :class:`JobError` for a bad line or an
oversized item further on.
"""

from __future__ import annotations

import gzip
import io
import itertools
import os
import zlib
from bisect import bisect_right
from collections.abc import Iterator, Sequence
from typing import Final

import msgspec

from supervisor.errors import JobError
from supervisor.jobs import JobSubmission
from supervisor.sources import Source, list_files, list_sources

__all__ = [
    "DEFAULT_MAX_BATCH_BYTES",
    "iter_batches",
    "list_files",
    "validate_submission",
]

DEFAULT_MAX_BATCH_BYTES: Final = 256 * 1024
_CHUNK: Final = 1 << 20  # NDJSON read size
_WINDOW: Final = 1 << 14  # item_list items sized at a time
_BOM: Final = b"\xef\xbb\xbf"

_one_raw = msgspec.json.Decoder(msgspec.Raw)
_raw_list = msgspec.json.Decoder(list[msgspec.Raw])
_add_one = (1).__add__

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


def _item_list(items: list[msgspec.Raw], packer: _Packer) -> Iterator[bytes]:
    # Sized in windows, so the bookkeeping stays small next to the items themselves.
    n = len(items)
    for start in range(0, n, _WINDOW):
        window = items[start : start + _WINDOW]
        yield from packer.feed(window, list(map(len, window)), final=start + _WINDOW >= n)


def _check_items(items: list[msgspec.Raw], limit: int) -> None:
    """Refuse an item too big for a batch of its own, before any batch is made."""
    if max(map(len, items)) + 2 > limit:
        for k, item in enumerate(items):
            if len(item) + 2 > limit:
                raise _too_big(f"`item_list.items[{k}]`", len(item), limit)


def _path_items(sources: list[Source], limit: int) -> list[bytes]:
    """The JSON strings of the selected files; refuses a path too long for a batch."""
    items: list[bytes] = []
    for s in sources:
        try:
            item = msgspec.json.encode(s.shown)
        except UnicodeEncodeError:
            raise JobError(f"the file name `{s.shown!r}` is not valid UTF-8") from None
        if len(item) + 2 > limit:
            raise _too_big(f"the path `{s.shown}`", len(item), limit)
        items.append(item)
    return items


def _open(src: Source) -> io.BufferedIOBase:
    try:
        if src.path.endswith(".gz"):
            return gzip.open(src.path, "rb")
        return open(src.path, "rb")
    except OSError as e:
        raise JobError(f"cannot open `{src.shown}` ({e.strerror or e})") from None


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
    return JobError(f"`{src.shown}` near line {first_line} is not valid NDJSON")  # not reached


def _ndjson_file(src: Source, packer: _Packer) -> Iterator[bytes]:
    """Items of one NDJSON file, fed to ``packer``; yields the batches that completes."""
    limit = packer.limit
    lineno = 0  # complete lines consumed
    carry = b""
    with _open(src) as f:
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
                try:
                    raws = _raw_list.decode(b"[" + b",".join(items) + b"]")
                    ok = list(map(len, raws)) == sizes
                except msgspec.DecodeError:
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
    item sizes of ``item_list`` and ``file_path_lister``, paths, globs, ``allowed_roots``.
    NDJSON files are read lazily, so a bad line or an oversized line of ``delimited_files``
    raises from the iterator, possibly after some batches (use :func:`validate_submission`
    first when nothing may be enqueued from a bad job). ``allowed_roots=None`` allows every
    path; ``[]`` allows none.
    """
    if sub.item_list is not None:
        il = sub.item_list
        _check_items(il.items, max_batch_bytes)
        return _item_list(il.items, _Packer(il.batch_size, max_batch_bytes))
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
