"""Which local files a ``delimited_files`` / ``file_path_lister`` submission names (docs/job-file.md).

Theory of operation
-------------------
Every ``s3_paths`` entry is a *prefix*, as an S3 key is in Cortex, written as an
``s3://bucket/key`` URL (listed and read by :mod:`supervisor.objectstore`), as a local path
(``data/``, ``/srv/data/part-``) or as a ``file://`` URL (``file:///srv/data/``). Any other
scheme (``gs://``, ...) is refused. An ``s3://`` entry selects every object whose key starts
with its key, shown as ``s3://bucket/key``. A local entry selects:

* a folder: every regular file under it, recursively (symlinked folders are followed, once);
* a regular file: that file;
* anything else: every entry of its parent folder whose name starts with the last component
  (``data/part-`` selects ``data/part-0.ndjson`` and everything under ``data/part-1/``).

Each selected file is *shown* as the entry followed by the rest of the file's path, with ``/``
separators (percent-encoded after a ``file://`` entry): ``data/`` shows ``data/a/x.ndjson``,
``file:///srv/d`` shows ``file:///srv/d/a/x.ndjson``. Within one entry files are sorted by that
string (S3 lists keys in the same order); entries keep the submitted order; a file selected by
two entries is kept once, at its first place.

``includes`` / ``excludes`` are globs matched against the whole shown string, with the
semantics of the glob library Cortex uses (gobwas/glob with ``/`` as separator): ``*`` and
``?`` stay within one path component, ``**`` matches anything including ``/``, ``[abc]``,
``[a-z]``, ``[!abc]`` are character classes, ``{a,b}`` is an alternation, ``\\`` escapes.
One addition: a whole ``**/`` component also matches no folder at all, so ``data/**/*.ndjson``
selects ``data/x.ndjson`` too. A file is kept when ``includes`` is empty or one of them
matches, and none of ``excludes`` matches (excludes win).

``allowed_roots`` (job submissions over HTTP) confines every local entry and every selected
file, after resolving ``..`` and symlinks, to the given folders; ``None`` means no restriction
(the ``run`` command reads whatever its user can). ``s3://`` entries are not local paths: the
store's credentials decide what they may read.

:func:`open_source` opens any selected file or object the same way, so the splitter does not
know where its bytes come from (``.gz`` names are decompressed as they are read).
"""

from __future__ import annotations

import gzip
import io
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple
from urllib.parse import quote, unquote

from supervisor import objectstore
from supervisor.errors import JobError, printable

__all__ = ["Source", "compile_glob", "list_files", "list_sources", "open_source"]


class Source(NamedTuple):
    """One selected file: how it is shown (to globs, users and workers) and where it is."""

    shown: str
    path: str


_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


def compile_glob(pattern: str, where: str = "pattern") -> re.Pattern[str]:
    """Translate a Cortex-style glob (see the module docstring) into a regular expression.

    Use ``.fullmatch``. A malformed pattern raises :class:`JobError` naming ``where``.
    """
    out: list[str] = []
    depth = 0  # open `{` groups
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "*":
            j = i
            while j < n and pattern[j] == "*":
                j += 1
            if j - i == 1:
                out.append("[^/]*")
            elif (i == 0 or pattern[i - 1] == "/") and pattern[j : j + 1] == "/":
                out.append("(?:.*/)?")  # a whole `**/` component: zero or more folders
                j += 1
            else:
                out.append(".*")
            i = j
            continue
        if c == "?":
            out.append("[^/]")
        elif c == "[":
            k = i + 1
            negate = pattern[k : k + 1] in ("!", "^")
            if negate:
                k += 1
            end = pattern.find("]", k)
            if end < 0:
                raise JobError(f"the glob `{pattern}` has a `[` without its `]` - at `{where}`")
            body = pattern[k:end]
            if not body:
                raise JobError(f"the glob `{pattern}` has an empty `[]` class - at `{where}`")
            chars = "".join(ch if ch == "-" else re.escape(ch) for ch in body)
            out.append(f"[^/{chars}]" if negate else f"[{chars}]")
            i = end
        elif c == "{":
            depth += 1
            out.append("(?:")
        elif c == "}" and depth:
            depth -= 1
            out.append(")")
        elif c == "," and depth:
            out.append("|")
        elif c == "\\":
            if i + 1 == n:
                raise JobError(f"the glob `{pattern}` ends with a lone `\\` - at `{where}`")
            i += 1
            out.append(re.escape(pattern[i]))
        else:
            out.append(re.escape(c))
        i += 1
    if depth:
        raise JobError(f"the glob `{pattern}` has a `{{` without its `}}` - at `{where}`")
    try:
        return re.compile("".join(out), re.DOTALL)
    except re.error as e:
        raise JobError(f"the glob `{pattern}` is malformed ({e}) - at `{where}`") from None


def _local_path(entry: str, where: str) -> tuple[str, bool]:
    """The local path an ``s3_paths`` entry names, and whether it was a ``file://`` URL."""
    if not entry:
        raise JobError(
            f"the path is empty; expected an s3:// URL, a local path or a file:// URL - at `{where}`"
        )
    m = _SCHEME.match(entry)
    if m is None:
        return entry, False
    if m.group(1).lower() != "file":
        raise JobError(
            f"`{entry}` is in an object store other than S3, which is not supported "
            f"(use an s3:// URL, a local path or a file:// URL) - at `{where}`"
        )
    rest = entry[m.end() :]
    host, slash, tail = rest.partition("/")
    if host not in ("", "localhost"):
        raise JobError(
            f"`{entry}` names the host `{host}`; file:// URLs must be local - at `{where}`"
        )
    return unquote(slash + tail) or "/", True


def _walk(top: str, seen: set[tuple[int, int]]) -> Iterator[str]:
    """Relative paths (``/``-separated) of the regular files under ``top``, following links."""
    st = os.stat(top)
    key = (st.st_dev, st.st_ino)
    if key in seen:  # a symlink loop, or a folder reached twice
        return
    seen.add(key)
    with os.scandir(top) as it:
        entries = list(it)
    for e in entries:
        try:
            if e.is_dir():
                for rel in _walk(e.path, seen):
                    yield f"{e.name}/{rel}"
            elif e.is_file():
                yield e.name
        except FileNotFoundError:  # removed while listing, or a broken link below
            continue


def _expand(local: str) -> list[tuple[str, str]]:
    """(suffix to append to the entry, local path) for every file the prefix ``local`` selects."""
    if os.path.isdir(local):
        sep = "" if local.endswith("/") else "/"
        return [(sep + rel, os.path.join(local, rel)) for rel in _walk(local, set())]
    if os.path.isfile(local):
        return [("", local)]
    parent, name = os.path.split(local)
    if not name or not os.path.isdir(parent or "."):
        return []
    found: list[tuple[str, str]] = []
    with os.scandir(parent or ".") as it:
        children = [e for e in it if e.name.startswith(name)]
    for e in children:
        rest = e.name[len(name) :]
        if e.is_dir():
            found.extend(
                (f"{rest}/{rel}", os.path.join(e.path, rel)) for rel in _walk(e.path, set())
            )
        elif e.is_file():
            found.append((rest, e.path))
    return found


def _inside(path: str, roots: Sequence[Path]) -> bool:
    real = Path(path).resolve()
    return any(real.is_relative_to(r) for r in roots)


def list_sources(
    paths: Sequence[str],
    includes: Sequence[str] = (),
    excludes: Sequence[str] = (),
    *,
    allowed_roots: Sequence[str | os.PathLike[str]] | None = None,
    where: str = "",
) -> list[Source]:
    """The files ``paths`` select after ``includes``/``excludes``, in processing order.

    Raises :class:`JobError` (one sentence naming ``<where>.s3_paths[i]`` or the glob) for an
    object-store path, a path outside ``allowed_roots``, an entry that selects no file, an
    unreadable file, or when the globs leave nothing.
    """
    pre = f"{where}." if where else ""
    inc = [compile_glob(p, f"{pre}includes[{i}]") for i, p in enumerate(includes)]
    exc = [compile_glob(p, f"{pre}excludes[{i}]") for i, p in enumerate(excludes)]
    roots = None if allowed_roots is None else [Path(r).resolve() for r in allowed_roots]

    result: list[Source] = []
    seen: set[str] = set()
    listed = included = 0  # files the paths select, and those the includes keep
    for i, entry in enumerate(paths):
        field = f"{pre}s3_paths[{i}]"
        if objectstore.is_s3(entry):
            objects = objectstore.list_objects(entry, field)
            listed += len(objects)
            for shown in objects:
                if inc and not any(p.fullmatch(shown) for p in inc):
                    continue
                included += 1
                if shown in seen or any(p.fullmatch(shown) for p in exc):
                    continue
                seen.add(shown)
                result.append(Source(shown, shown))
            continue
        local, is_url = _local_path(entry, field)
        if roots is not None:
            if not roots:
                raise JobError(
                    "local paths are not allowed in jobs submitted over HTTP until the server "
                    f"is given a data folder (--data-dir) - at `{field}`"
                )
            if not _inside(local, roots):
                raise JobError(f"`{entry}` is outside the allowed data folders - at `{field}`")
        try:
            found = _expand(local)
        except OSError as e:
            raise JobError(
                f"cannot list `{entry}` ({e.strerror or e}: {printable(str(e.filename))}) "
                f"- at `{field}`"
            ) from None
        if not found:
            raise JobError(f"{_why_nothing(local, entry)} - at `{field}`")
        listed += len(found)
        shown_found = [
            Source(entry + (quote(suffix, safe="/") if is_url else suffix), path)
            for suffix, path in found
        ]
        shown_found.sort()
        for src in shown_found:
            if inc and not any(p.fullmatch(src.shown) for p in inc):
                continue
            included += 1
            if any(p.fullmatch(src.shown) for p in exc):
                continue
            real = os.path.realpath(src.path)
            if real in seen:
                continue
            seen.add(real)
            if roots is not None and not _inside(src.path, roots):
                raise JobError(
                    f"`{printable(src.shown)}` is outside the allowed data folders - at `{field}`"
                )
            if not os.access(src.path, os.R_OK):
                raise JobError(f"`{printable(src.shown)}` is not readable - at `{field}`")
            result.append(src)
    if not result:
        raise JobError(_none_left(paths, includes, excludes, listed, included, pre))
    return result


class _Gunzip(gzip.GzipFile):
    """Decompresses a stream it owns: closing it closes the stream too."""

    def __init__(self, raw: io.BufferedIOBase) -> None:
        super().__init__(fileobj=raw, mode="rb")
        self._raw = raw

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._raw.close()


def open_source(src: Source) -> io.BufferedIOBase:
    """The bytes of a selected file or object (decompressed when its name ends with ``.gz``)."""
    if objectstore.is_s3(src.path):
        raw = objectstore.open_object(src.path)
        return _Gunzip(raw) if src.path.endswith(".gz") else raw
    try:
        if src.path.endswith(".gz"):
            return gzip.open(src.path, "rb")
        return open(src.path, "rb")
    except OSError as e:
        raise JobError(f"cannot open `{src.shown}` ({e.strerror or e})") from None


def _why_nothing(local: str, entry: str) -> str:
    """Why the ``s3_paths`` entry ``entry`` (the local path ``local``) selects no file."""
    shown = f"`{printable(entry)}`"
    if os.path.isdir(local):
        return f"the folder {shown} holds no file"
    if os.path.lexists(local):
        return f"{shown} is not a regular file or a folder"
    parent, name = os.path.split(local)
    if not name and os.path.lexists(parent):
        return f"{shown} does not exist (not a folder)"
    if not name or not os.path.isdir(parent or "."):
        return f"{shown} does not exist"
    return f"{shown} does not exist (nor any name starting with it)"


def _listing(items: Sequence[str], most: int = 3) -> str:
    named = ", ".join(f"`{printable(x)}`" for x in items[:most])
    return named if len(items) <= most else f"{named} and {len(items) - most} more"


def _none_left(
    paths: Sequence[str],
    includes: Sequence[str],
    excludes: Sequence[str],
    listed: int,
    included: int,
    pre: str,
) -> str:
    """Why ``includes``/``excludes`` left no file, naming the globs and the paths."""
    files = f"{listed} file(s) under {_listing(paths)}"
    if includes and not included:
        return f"no file matches the includes {_listing(includes)} (of the {files}) - at `{pre}includes`"
    matched = f"the {included} file(s) the includes match" if includes else f"the {files}"
    if includes:
        matched += f" (of the {files})"
    return f"the excludes {_listing(excludes)} leave out {matched} - at `{pre}excludes`"


def list_files(
    paths: Sequence[str],
    includes: Sequence[str] = (),
    excludes: Sequence[str] = (),
    *,
    allowed_roots: Sequence[str | os.PathLike[str]] | None = None,
    where: str = "",
) -> list[str]:
    """What ``?dryRun=true`` shows: the selected files, as shown (see the module docstring)."""
    return [
        s.shown
        for s in list_sources(paths, includes, excludes, allowed_roots=allowed_roots, where=where)
    ]
