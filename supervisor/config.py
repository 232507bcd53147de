"""The BatchAPI configuration file (SPEC §4), as msgspec Structs.

Cortex users write a YAML list holding one API (or several, for ``serve``); a mapping or JSON
works too. Validation is msgspec's: every error names the path inside the API
(``pod.containers[1].readiness_probe.http_get.port``) and what was expected.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import yaml

from supervisor.errors import ConfigError

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


def format_validation_error(err: msgspec.ValidationError, where: str = "") -> str:
    """msgspec's message with ``$.a.b`` turned into ``a.b`` and an optional file prefix."""
    msg = str(err)
    msg = msg.replace("`$.", "`").replace("`$[", "`[").replace("`$`", "the top level")
    return f"{where}: {msg}" if where else msg


def parse_apis(data: Any, where: str = "") -> list[BatchAPI]:
    """Validate already-decoded YAML/JSON data holding one BatchAPI or a list of them."""
    items: Sequence[Any]
    if isinstance(data, list):
        items = data
        if not items:
            raise ConfigError(f"{where}: the file holds an empty list; expected one BatchAPI")
    elif isinstance(data, dict):
        items = [data]
    else:
        kind = type(data).__name__ if data is not None else "nothing"
        raise ConfigError(f"{where}: expected a BatchAPI mapping or a list of them, got {kind}")
    apis = []
    for i, item in enumerate(items):
        prefix = f"{where}[{i}]" if isinstance(data, list) and len(items) > 1 else where
        try:
            apis.append(msgspec.convert(item, BatchAPI))
        except msgspec.ValidationError as e:
            raise ConfigError(format_validation_error(e, prefix)) from None
    names = [a.name for a in apis]
    for n in names:
        if names.count(n) > 1:
            raise ConfigError(f"{where}: the API name `{n}` is used more than once")
    return apis


def load_apis(path: str | os.PathLike[str]) -> list[BatchAPI]:
    """Read and validate a Cortex API file (YAML or JSON)."""
    where = str(path)
    try:
        text = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"{where}: cannot read the API file ({e.strerror or e})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise ConfigError(f"{where}: the file is not valid YAML/JSON{at}: {problem}") from None
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
