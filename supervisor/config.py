"""The BatchAPI configuration file (docs/api-file.md), as msgspec Structs.

Cortex users write a YAML list holding one API (or several, for ``serve``); a mapping or JSON
works too. Validation is msgspec's: every error names the path inside the API
(``pod.containers[1].readiness_probe.http_get.port``) and what was expected.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import msgspec
import yaml

from supervisor.errors import ConfigError
from supervisor.files import API_FILE_LIMIT, TooLarge, read_limited

__all__ = [
    "BatchAPI",
    "Compute",
    "Container",
    "ExecAction",
    "HTTPGetAction",
    "Networking",
    "Pod",
    "Probe",
    "TCPSocketAction",
    "format_validation_error",
    "load_api",
    "load_apis",
    "name_keys",
    "parse_apis",
]

Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=63)]


class _Strict(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    pass


class HTTPGetAction(_Strict):
    port: Port
    path: str = "/"


class TCPSocketAction(_Strict):
    port: Port


class ExecAction(_Strict):
    command: Annotated[list[str], msgspec.Meta(min_length=1)]


class Probe(_Strict):
    """A Kubernetes probe: exactly one of ``http_get``, ``tcp_socket``, ``exec``."""

    http_get: HTTPGetAction | None = None
    tcp_socket: TCPSocketAction | None = None
    exec: ExecAction | None = None
    initial_delay_seconds: NonNegativeInt = 0
    timeout_seconds: PositiveInt = 1
    period_seconds: PositiveInt = 10
    success_threshold: PositiveInt = 1
    failure_threshold: PositiveInt = 3

    def __post_init__(self) -> None:
        kinds = [k for k in ("http_get", "tcp_socket", "exec") if getattr(self, k) is not None]
        if len(kinds) != 1:
            found = " and ".join(f"`{k}`" for k in kinds) if kinds else "none"
            raise ValueError(
                f"A probe needs exactly one of `http_get`, `tcp_socket`, `exec`; found {found}"
            )

    @property
    def port(self) -> int | None:
        """The port this probe aims at, if it is a network probe."""
        if self.http_get is not None:
            return self.http_get.port
        if self.tcp_socket is not None:
            return self.tcp_socket.port
        return None


class Compute(_Strict):
    """Accepted for compatibility; has no local effect."""

    cpu: str | int | float | None = None
    gpu: NonNegativeInt | None = None
    inf: NonNegativeInt | None = None
    mem: str | None = None
    shm: str | None = None


class Container(_Strict):
    name: Name
    command: Annotated[list[str], msgspec.Meta(min_length=1)]
    image: str | None = None
    args: list[str] = []
    env: dict[str, str] = {}
    compute: Compute | None = None
    readiness_probe: Probe | None = None
    liveness_probe: Probe | None = None

    def __post_init__(self) -> None:
        if self.liveness_probe is not None and self.liveness_probe.success_threshold != 1:
            raise ValueError("`liveness_probe.success_threshold` must be 1 (as in Kubernetes)")


class Pod(_Strict):
    containers: Annotated[list[Container], msgspec.Meta(min_length=1)]
    port: Port = 8080
    shm: str | None = None

    def __post_init__(self) -> None:
        seen: dict[str, int] = {}
        for i, c in enumerate(self.containers):
            if c.name in seen:
                raise ValueError(
                    f"Container name `{c.name}` is used by `containers[{seen[c.name]}]` "
                    f"and `containers[{i}]`; names must be unique"
                )
            seen[c.name] = i


class Networking(_Strict):
    endpoint: str | None = None


class BatchAPI(_Strict):
    name: Name
    kind: Literal["BatchAPI"]
    pod: Pod
    node_groups: list[str] | None = None
    networking: Networking | None = None

    def ignored_fields(self) -> list[str]:
        """Paths of fields that are accepted but have no local effect (said once in logs)."""
        out = []
        if self.node_groups is not None:
            out.append("node_groups")
        for i, c in enumerate(self.pod.containers):
            if c.image is not None:
                out.append(f"pod.containers[{i}].image")
            if c.compute is not None:
                out.append(f"pod.containers[{i}].compute")
        return out


_AT = re.compile(r" - at `\$([^`]*)`$")  # the path msgspec ends its message with
_SEGMENT = re.compile(r"\.[^.\[`]+|\[\d+\]|\[\.\.\.\]")
_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
_UNQUOTED = re.compile(r"^Expected `str`, got `(int|float|bool|null|date|datetime|time)`")
Check = Callable[[Any, Any], object]


def _unwrap(tp: Any, value: Any) -> Any:
    """The type a value at a path is checked against: Annotated and ``X | None`` removed."""
    while True:
        if get_origin(tp) is Annotated:
            tp = get_args(tp)[0]
        elif get_origin(tp) in (Union, UnionType):
            members = [m for m in get_args(tp) if m is not type(None)]
            if len(members) != 1:
                fit = [m for m in members if isinstance(value, get_origin(m) or dict)]
                return fit[0] if len(fit) == 1 else Any
            tp = members[0]
        else:
            return tp


def _key_path(key: Any) -> str:
    text = str(key)
    return f".{text}" if _PLAIN_KEY.fullmatch(text) else f"[{json.dumps(text)}]"


def name_keys(path: str, data: Any, tp: Any, check: Check = msgspec.convert) -> str:
    """msgspec's ``path`` (``pod.containers[0].env[...]``) with each ``[...]`` (a mapping's
    value, which msgspec does not name) replaced by the key of the first value of ``data`` that
    ``check(value, value_type)`` refuses: ``pod.containers[0].env.THREADS``. ``tp`` is the type
    ``data`` was checked against; a path that cannot be followed is returned unchanged."""
    segments = _SEGMENT.findall(path)
    if "".join(segments) != path:
        return path
    out: list[str] = []
    for seg in segments:
        tp = _unwrap(tp, data)
        if seg == "[...]":
            args = get_args(tp)
            tp = args[1] if len(args) == 2 else Any
            bad = None
            for k, v in data.items() if isinstance(data, dict) else ():
                try:
                    check(v, tp)
                except (msgspec.ValidationError, msgspec.DecodeError):
                    bad = k
                    break
            out.append(seg if bad is None else _key_path(bad))
            data = None if bad is None else data[bad]
        elif seg.startswith("["):
            i = int(seg[1:-1])
            args = get_args(tp)
            tp = args[0] if args else Any
            data = data[i] if isinstance(data, list) and i < len(data) else None
            out.append(seg)
        else:
            name = seg[1:]
            fields = (
                {f.encode_name: f.type for f in msgspec.structs.fields(tp)}
                if isinstance(tp, type) and issubclass(tp, msgspec.Struct)
                else {}
            )
            tp = fields.get(name, Any)
            data = data.get(name) if isinstance(data, dict) else None
            out.append(seg)
    return "".join(out)


def format_validation_error(
    err: msgspec.ValidationError,
    where: str = "",
    *,
    data: Any = None,
    tp: Any = None,
    check: Check = msgspec.convert,
) -> str:
    """msgspec's message with ``$.a.b`` turned into ``a.b`` and an optional file prefix.

    Given the ``data`` that was checked against ``tp``, a mapping's value that msgspec calls
    ``[...]`` is named by its key (see :func:`name_keys`).
    """
    msg = str(err)
    at = _AT.search(msg)
    if at is not None and tp is not None and "[...]" in at.group(1):
        path = name_keys(at.group(1), data, tp, check)
        msg = f"{msg[: at.start()]} - at `${path}`"
    msg = msg.replace("`$.", "`").replace("`$[", "`[").replace("`$`", "the top level")
    return f"{where}: {msg}" if where else msg


def parse_apis(data: Any, where: str = "") -> list[BatchAPI]:
    """Validate already-decoded YAML/JSON data holding one BatchAPI or a list of them."""
    tp: Any
    if isinstance(data, list):
        if not data:
            raise ConfigError(f"{where}: the file holds an empty list; expected one BatchAPI")
        # A list of one reads as that API alone: its errors name `pod.port`, not `[0].pod.port`.
        data, tp = (data[0], BatchAPI) if len(data) == 1 else (data, list[BatchAPI])
    elif isinstance(data, dict):
        tp = BatchAPI
    elif data is None:
        raise ConfigError(
            f"{where}: the file holds nothing (it is empty or `null`); "
            "expected a BatchAPI mapping or a list of them"
        )
    else:
        raise ConfigError(
            f"{where}: expected a BatchAPI mapping or a list of them, got `{type(data).__name__}`"
        )
    try:
        converted = msgspec.convert(data, tp)
    except msgspec.ValidationError as e:
        msg = format_validation_error(e, where, data=data, tp=tp)
        if _UNQUOTED.match(str(e)):  # YAML reads `4`, `true`, `2024-01-01`, `~` as non-strings
            msg += "; quote it to make it a string"
        elif str(e).startswith("Invalid enum value") and str(e).endswith(".kind`"):
            msg += "; this supervisor runs `BatchAPI` only"
        raise ConfigError(msg) from None
    apis: list[BatchAPI] = converted if isinstance(converted, list) else [converted]
    names = [a.name for a in apis]
    for n in names:
        if names.count(n) > 1:
            raise ConfigError(f"{where}: the API name `{n}` is used more than once")
    return apis


class _DuplicateKey(yaml.constructor.ConstructorError):
    pass


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (as Go's YAML does)
    instead of keeping the last one silently."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<:` may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node)
            except TypeError:  # an unhashable key: the base class says so
                continue
            if first is not key_node:
                raise _DuplicateKey(
                    None,
                    None,
                    f"the key `{key}` is given twice in one mapping "
                    f"(lines {first.start_mark.line + 1} and {key_node.start_mark.line + 1})",
                    key_node.start_mark,
                )
        return super().construct_mapping(node, deep)


def _yaml_problem(e: yaml.YAMLError, text: bytes) -> str:
    """One sentence for a YAML error: where, and what (the parts PyYAML keeps apart)."""
    if isinstance(e, yaml.reader.ReaderError):
        if e.encoding == "unicode":  # a character YAML forbids; position counts characters
            line = text.decode("utf-8", "replace")[: e.position].count("\n") + 1
            return f"the character #x{e.character:04x} at line {line} is not allowed in YAML"
        line = text[: e.position].count(b"\n") + 1
        return (
            f"the file is not {e.encoding.upper()} text "
            f"(byte 0x{e.character:02x} at line {line}: {e.reason})"
        )
    if isinstance(e, _DuplicateKey):
        return str(e.problem)
    mark = getattr(e, "problem_mark", None)
    at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    context = getattr(e, "context", None)
    if isinstance(e, yaml.composer.ComposerError) and context and "single document" in context:
        return (
            f"the file holds more than one YAML document (another one starts{at}); "
            "put the APIs in one list"
        )
    problem = getattr(e, "problem", None) or "invalid YAML"
    if context and problem.startswith("but "):
        problem = f"{context}, {problem}"
    return f"the file is not valid YAML/JSON{at}: {problem}"


def load_apis(path: str | os.PathLike[str]) -> list[BatchAPI]:
    """Read and validate a Cortex API file (YAML or JSON)."""
    where = str(path)
    try:
        text = read_limited(path, API_FILE_LIMIT)
    except OSError as e:
        raise ConfigError(f"{where}: cannot read the API file ({e.strerror or e})") from None
    except TooLarge as e:
        raise ConfigError(f"{where}: cannot read the API file ({e})") from None
    try:
        data = yaml.load(text, Loader=_Loader)  # a SafeLoader
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: {_yaml_problem(e, text)}") from None
    except RecursionError:
        raise ConfigError(f"{where}: the file is nested too deeply to be read") from None
    return parse_apis(data, where)


def load_api(path: str | os.PathLike[str], name: str | None = None) -> BatchAPI:
    """Read the one API of a file, or the one called ``name`` when it lists several."""
    apis = load_apis(path)
    if name is not None:
        for a in apis:
            if a.name == name:
                return a
        known = ", ".join(f"`{a.name}`" for a in apis)
        raise ConfigError(f"{path}: no API named `{name}` (the file has {known})")
    if len(apis) > 1:
        known = ", ".join(f"`{a.name}`" for a in apis)
        raise ConfigError(f"{path}: the file lists several APIs ({known}); choose one with --api")
    return apis[0]


def api_id(api: BatchAPI) -> str:
    """A short id of the API's whole configuration (the job spec's ``api_id``)."""
    return hashlib.sha256(msgspec.json.encode(api)).hexdigest()[:16]
