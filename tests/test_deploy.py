"""The deployment files hold together: the Dockerfile and every manifest under deploy/kubernetes.

Nothing is built or applied here (no registry, no cluster). Instead every YAML document is
parsed and what ties the files to each other and to the code is checked: names that refer to
other objects exist, ports agree between containers, probes, Services and the command lines,
the queue URL points at the Valkey Service, the kubelet waits longer than the supervisor's
grace, and every container's arguments are accepted by the parser of the image's entry point,
``supervisor`` (docs/deploy.md).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from supervisor.admin import ADMIN_PATHS
from supervisor.cli import build_parser
from supervisor.cli_options import host_port as _host_port
from supervisor.config import load_apis
from tests.helpers import REPO

KUBE = REPO / "deploy" / "kubernetes"
DOCKERFILE = REPO / "Dockerfile"
USER_DOCKERFILE = REPO / "deploy" / "wordcount.Dockerfile"
DOCS = REPO / "docs" / "deploy.md"

# Objects the manifests refer to but do not contain: the token Secret is created by hand so
# that no token is ever committed (the command is in serve.yaml and docs/deploy.md).
CREATED_BY_HAND = {("Secret", "supervisor-token")}

# The variables the supervisor reads (docs/operations.md, docs/job-api.md).
SUPERVISOR_ENV = {"SUPERVISOR_ROOT", "SUPERVISOR_TOKEN", "SUPERVISOR_BACKEND", "CORTEX_LOG_LEVEL"}

WORKLOADS = ("Deployment", "StatefulSet")


# -- reading the files ----------------------------------------------------------------------


def manifest_files() -> list[Path]:
    return sorted(p for p in KUBE.glob("*.yaml") if p.name != "kustomization.yaml")


def documents() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in manifest_files():
        for doc in yaml.safe_load_all(path.read_text()):
            assert isinstance(doc, dict), f"{path.name}: a document that is not a mapping"
            docs.append(doc)
    return docs


def objects(kind: str) -> list[dict[str, Any]]:
    return [d for d in documents() if d["kind"] == kind]


def named(kind: str, name: str) -> dict[str, Any]:
    (found,) = [d for d in objects(kind) if d["metadata"]["name"] == name]
    return found


def workloads() -> list[dict[str, Any]]:
    return [d for d in documents() if d["kind"] in WORKLOADS]


def containers() -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(workload, container) for every container of every workload."""
    for w in workloads():
        for c in w["spec"]["template"]["spec"]["containers"]:
            yield w, c


def supervisor_containers() -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """The containers that run the image built FROM ours (entry point ``supervisor``)."""
    return [(w, c) for w, c in containers() if not c["image"].startswith("valkey/")]


def option(args: list[str], name: str) -> str | None:
    """The value of ``--name VALUE`` or ``--name=VALUE`` in ``args``, else None."""
    for i, a in enumerate(args):
        if a == name:
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def port_number(container: dict[str, Any], port: int | str) -> int:
    """A probe's or Service's port, by number or by the container port's name."""
    by_name: dict[str, int] = {
        p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p
    }
    numbers = {p["containerPort"] for p in container.get("ports", [])}
    if isinstance(port, str):
        assert port in by_name, f"{container['name']}: no container port named {port!r}"
        return by_name[port]
    assert port in numbers, f"{container['name']}: port {port} is not a container port"
    return port


def dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) for every instruction, continuation lines joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):  # a comment inside a continued instruction
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        whole = pending + stripped
        pending = ""
        instruction, _, rest = whole.partition(" ")
        out.append((instruction.upper(), rest.strip()))
    assert not pending, f"{path.name}: ends inside a continued line"
    return out


def final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    starts = [i for i, (ins, _) in enumerate(instructions) if ins == "FROM"]
    return instructions[starts[-1] :]


def values(instructions: list[tuple[str, str]], name: str) -> list[str]:
    return [rest for ins, rest in instructions if ins == name]


# -- every document ------------------------------------------------------------------------


def test_every_document_parses_and_is_applied_by_the_kustomization() -> None:
    docs = documents()
    assert docs
    for d in docs:
        assert {"apiVersion", "kind", "metadata"} <= d.keys(), d
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", d["metadata"]["name"]), d
    keys = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(keys) == len(set(keys)), "two objects of one kind with one name"
    kustomization = yaml.safe_load((KUBE / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == [p.name for p in manifest_files()]
    # Every image the workloads run that kustomize is told to rewrite is used, and vice versa
    # for ours (Valkey's is public and stays as it is).
    rewritten = {i["name"] for i in kustomization["images"]}
    assert rewritten == {c["image"].split(":")[0] for _, c in supervisor_containers()}


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_builds_every_object_with_the_named_image() -> None:
    built = subprocess.run(
        ["kubectl", "kustomize", str(KUBE)], capture_output=True, text=True, timeout=60, check=True
    )
    out = [d for d in yaml.safe_load_all(built.stdout) if d]
    assert sorted((d["kind"], d["metadata"]["name"]) for d in out) == sorted(
        (d["kind"], d["metadata"]["name"]) for d in documents()
    )
    kustomization = yaml.safe_load((KUBE / "kustomization.yaml").read_text())
    wanted = {f"{i['newName']}:{i['newTag']}" for i in kustomization["images"]}
    images = {
        c["image"]
        for d in out
        if d["kind"] in WORKLOADS
        for c in d["spec"]["template"]["spec"]["containers"]
        if not c["image"].startswith("valkey/")
    }
    assert images == wanted


def test_workloads_select_their_own_pods() -> None:
    for w in workloads():
        selector = w["spec"]["selector"]["matchLabels"]
        labels = w["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), w["metadata"]["name"]


def test_services_select_pods_and_target_their_ports() -> None:
    for svc in objects("Service"):
        selected = [
            w
            for w in workloads()
            if svc["spec"]["selector"].items()
            <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(selected) == 1, f"Service {svc['metadata']['name']} selects {len(selected)}"
        (container,) = selected[0]["spec"]["template"]["spec"]["containers"]
        for p in svc["spec"]["ports"]:
            assert port_number(container, p.get("targetPort", p["port"])) == p["port"]


def test_the_statefulset_is_governed_by_a_headless_service() -> None:
    for sts in objects("StatefulSet"):
        svc = named("Service", sts["spec"]["serviceName"])
        assert svc["spec"].get("clusterIP") == "None"
        assert (
            svc["spec"]["selector"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()
        )


def test_the_network_policy_admits_the_supervisor_pods() -> None:
    (policy,) = objects("NetworkPolicy")
    protected = policy["spec"]["podSelector"]["matchLabels"]
    assert (
        protected.items()
        <= named("StatefulSet", "valkey")["spec"]["template"]["metadata"]["labels"].items()
    )
    (rule,) = policy["spec"]["ingress"]
    (source,) = rule["from"]
    for w, _ in supervisor_containers():
        labels = w["spec"]["template"]["metadata"]["labels"]
        assert source["podSelector"]["matchLabels"].items() <= labels.items(), w["metadata"]
    assert [p["port"] for p in rule["ports"]] == [valkey_port()]


# -- names the pods refer to ----------------------------------------------------------------


def test_configmaps_and_secrets_exist_and_every_mount_has_its_volume() -> None:
    for w in workloads():
        spec = w["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        claims = {t["metadata"]["name"] for t in w["spec"].get("volumeClaimTemplates", [])}
        mounted: set[str] = set()
        for c in spec["containers"]:
            for m in c.get("volumeMounts", []):
                assert m["name"] in volumes or m["name"] in claims, (w["metadata"]["name"], m)
                mounted.add(m["name"])
        assert mounted == volumes.keys() | claims, f"{w['metadata']['name']}: unused volumes"
        for v in volumes.values():
            if "configMap" in v:
                named("ConfigMap", v["configMap"]["name"])
            if "secret" in v:
                name = v["secret"]["secretName"]
                assert ("Secret", name) in CREATED_BY_HAND or named("Secret", name)


def test_the_hand_made_secret_is_documented_with_its_command() -> None:
    for kind, name in CREATED_BY_HAND:
        assert kind == "Secret"
        command = f"kubectl create secret generic {name} --from-literal=token="
        assert command in DOCS.read_text()
        assert command in (KUBE / "serve.yaml").read_text()


def test_the_api_file_argument_is_the_mounted_configmap_and_loads(tmp_path: Path) -> None:
    for w, c in supervisor_containers():
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in w["spec"]["template"]["spec"]["volumes"]}
        api_path = Path(c["args"][1])
        (volume,) = [n for n, path in mounts.items() if Path(path) == api_path.parent]
        config_map = named("ConfigMap", volumes[volume]["configMap"]["name"])
        text = config_map["data"][api_path.name]
        local = tmp_path / api_path.name
        local.write_text(text)
        apis = load_apis(str(local))
        assert apis
        # The API's containers share the pod's network with the supervisor: their port must
        # not be the supervisor's own.
        own = {p["containerPort"] for p in c["ports"]}
        assert all(api.pod.port not in own for api in apis)


def test_the_api_runs_code_the_user_image_contains() -> None:
    copied = {shlex.split(rest)[-1] for rest in values(dockerfile(USER_DOCKERFILE), "COPY")}
    (config_map,) = objects("ConfigMap")
    for api in yaml.safe_load(config_map["data"]["api.yaml"]):
        for c in api["pod"]["containers"]:
            scripts = [a for a in c["command"] if a.startswith("/app/")]
            assert scripts and set(scripts) <= copied, c["command"]


def test_env_names_are_ones_the_supervisor_reads() -> None:
    source = "\n".join(p.read_text() for p in (REPO / "supervisor").rglob("*.py"))
    for w, c in supervisor_containers():
        for e in c.get("env", []):
            assert e["name"] in SUPERVISOR_ENV, (w["metadata"]["name"], e["name"])
            assert f'"{e["name"]}"' in source, f"nothing in supervisor/ reads {e['name']}"


def test_every_root_is_on_a_volume_the_image_user_owns() -> None:
    """A pod's root is --root, else SUPERVISOR_ROOT, else the image's ``/``: what the
    supervisor writes there must be mounted (and, in the image, owned by its user)."""
    stage = final_stage(dockerfile(DOCKERFILE))
    (env_root,) = [
        r.split("=", 1)[1]
        for r in " ".join(values(stage, "ENV")).split()
        if r.startswith("SUPERVISOR_ROOT=")
    ]
    # The paths of ``chown UID:GID PATH...``, up to the next command or instruction.
    chowned = " ".join(values(stage, "RUN")).split("chown ", 1)[1].split("&&")[0].split()[1:]
    for w, c in supervisor_containers():
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        root = Path(option(c["args"], "--root") or env.get("SUPERVISOR_ROOT") or env_root)
        mounts = {Path(m["mountPath"]) for m in c["volumeMounts"]}
        if root == Path("/"):
            assert mounts >= {Path("/cortex"), Path("/mnt")}, w["metadata"]["name"]
            assert {"/cortex", "/mnt"} <= set(chowned)
        else:
            assert root in mounts, w["metadata"]["name"]
            assert str(root) in chowned


# -- ports and probes -----------------------------------------------------------------------


def test_probes_aim_at_container_ports_and_admin_paths() -> None:
    for _, c in containers():
        for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
            probe = c.get(kind)
            if probe is None:
                continue
            for how in ("httpGet", "tcpSocket"):
                if how in probe:
                    port_number(c, probe[how]["port"])
            if "httpGet" in probe:
                assert probe["httpGet"]["path"] in ADMIN_PATHS
    for w, c in supervisor_containers():
        readiness, liveness = c["readinessProbe"], c["livenessProbe"]
        assert readiness["httpGet"]["path"] == "/healthz", w["metadata"]["name"]
        # /healthz is 503 while the API's containers load: liveness on it would restart
        # every pod whose model takes long to load.
        assert liveness["httpGet"]["path"] != "/healthz", w["metadata"]["name"]


def test_the_listen_and_admin_ports_are_the_container_ports() -> None:
    for w, c in supervisor_containers():
        addresses = [a for a in (option(c["args"], "--listen"), option(c["args"], "--admin")) if a]
        assert len(addresses) == 1, w["metadata"]["name"]
        host, port = _host_port(addresses[0])
        assert host == "0.0.0.0", "a pod's listener must be reachable by the kubelet"
        assert [p["containerPort"] for p in c["ports"]] == [port]
        for probe in (c["readinessProbe"], c["livenessProbe"]):
            assert port_number(c, probe["httpGet"]["port"]) == port
        annotations = w["spec"]["template"]["metadata"].get("annotations", {})
        if annotations.get("prometheus.io/scrape") == "true":
            assert int(annotations["prometheus.io/port"]) == port
            assert annotations["prometheus.io/path"] == "/metrics"


def test_serve_off_loopback_has_a_token() -> None:
    for w, c in supervisor_containers():
        if c["args"][0] != "serve":
            continue
        token_file = option(c["args"], "--token-file")
        names = {e["name"] for e in c.get("env", [])}
        assert token_file or "SUPERVISOR_TOKEN" in names, w["metadata"]["name"]
        if token_file:
            mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
            volumes = {v["name"]: v for v in w["spec"]["template"]["spec"]["volumes"]}
            (volume,) = [n for n, p in mounts.items() if Path(p) == Path(token_file).parent]
            secret = volumes[volume]["secret"]
            assert secret["secretName"] and Path(token_file).name == "token"


def valkey_service() -> dict[str, Any]:
    (sts,) = [
        w
        for w, c in containers()
        if c["image"].startswith(("valkey/valkey:", "redis:7.2")) and w["kind"] == "StatefulSet"
    ]
    (svc,) = [
        s
        for s in objects("Service")
        if s["spec"]["selector"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()
    ]
    return svc


def valkey_port() -> int:
    (port,) = valkey_service()["spec"]["ports"]
    return int(port["port"])


def test_the_queue_url_is_the_valkey_service() -> None:
    urls = {option(c["args"], "--queue") for _, c in supervisor_containers()}
    assert len(urls) == 1, f"serve and the workers must share one queue: {urls}"
    (url,) = urls
    assert url is not None
    parts = urlsplit(url)
    assert parts.scheme == "redis"
    assert parts.hostname == valkey_service()["metadata"]["name"]
    assert parts.port == valkey_port()
    assert re.fullmatch(r"/\d+", parts.path)


def test_valkey_keeps_its_data() -> None:
    sts = named("StatefulSet", "valkey")
    (c,) = sts["spec"]["template"]["spec"]["containers"]
    args = c["args"]
    assert option(args, "--appendonly") == "yes"
    assert option(args, "--appendfsync") == "everysec"
    assert option(args, "--maxmemory-policy") == "noeviction"
    (mount,) = c["volumeMounts"]
    assert option(args, "--dir") == mount["mountPath"]
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == mount["name"]
    assert "valkey-cli ping" in " ".join(c["readinessProbe"]["exec"]["command"])
    assert port_number(c, c["livenessProbe"]["tcpSocket"]["port"]) == valkey_port()


def test_the_kubelet_waits_longer_than_the_supervisor_stops() -> None:
    # A stop is two steps of up to --grace each: batches in flight finish, then the
    # containers get SIGTERM and --grace before SIGKILL (docs/operations.md).
    for w, c in supervisor_containers():
        grace = float(option(c["args"], "--grace") or 30)
        kubelet = w["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert kubelet >= 2 * grace + 10, w["metadata"]["name"]


# -- the image's entry point ----------------------------------------------------------------


def test_the_dockerfile_entrypoint_is_supervisor() -> None:
    stage = final_stage(dockerfile(DOCKERFILE))
    (base,) = values(stage, "FROM")
    assert re.fullmatch(r"python:3\.1[1-9]-slim(-\w+)?", base), base
    (entrypoint,) = values(stage, "ENTRYPOINT")
    assert json.loads(entrypoint) == ["supervisor"]
    (cmd,) = values(stage, "CMD")
    assert json.loads(cmd) == ["--help"]
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["supervisor"] == "supervisor.cli:main"
    # The manifests use the Redis queue: its extra is installed.
    (extras,) = [rest for rest in values(stage, "ARG") if rest.startswith("EXTRAS=")]
    assert "redis" in extras.split("=", 1)[1].split(",")
    assert any("${EXTRAS}" in rest and "pip install" in rest for rest in values(stage, "RUN"))


def test_the_image_user_owns_the_cortex_paths_and_matches_the_pods() -> None:
    stage = final_stage(dockerfile(DOCKERFILE))
    (user,) = values(stage, "USER")
    uid, gid = (int(x) for x in user.split(":"))  # numeric, so runAsNonRoot can check it
    assert uid != 0
    setup = " ".join(values(stage, "RUN"))
    assert f"chown {uid}:{gid} /cortex /mnt " in setup
    for w, _ in supervisor_containers():
        security = w["spec"]["template"]["spec"]["securityContext"]
        assert security["runAsNonRoot"] is True
        assert (security["runAsUser"], security["runAsGroup"]) == (uid, gid)


def test_the_exposed_ports_are_the_ones_the_pods_use() -> None:
    (exposed,) = values(final_stage(dockerfile(DOCKERFILE)), "EXPOSE")
    used = {p["containerPort"] for _, c in supervisor_containers() for p in c["ports"]}
    assert {int(p) for p in exposed.split()} == used


def ignored(path: str, patterns: list[str]) -> bool:
    parts = Path(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(
        fnmatch.fnmatch(prefix, pattern.removeprefix("**/")) or fnmatch.fnmatch(prefix, pattern)
        for pattern in patterns
        for prefix in [*prefixes, parts[-1]]
    )


def test_the_build_context_keeps_what_the_dockerfiles_copy() -> None:
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for path in (DOCKERFILE, USER_DOCKERFILE):
        for rest in values(dockerfile(path), "COPY"):
            if rest.startswith("--from="):
                continue
            *sources, _dest = shlex.split(rest)
            for source in sources:
                assert (REPO / source).exists(), source
                assert not ignored(source, patterns), f"{path.name}: .dockerignore drops {source}"
    assert ignored(".git", patterns) and ignored("tests/test_deploy.py", patterns)


def test_the_user_image_builds_from_the_base_and_keeps_its_entrypoint() -> None:
    instructions = dockerfile(USER_DOCKERFILE)
    (base,) = values(instructions, "FROM")
    assert base.startswith("cortex-batch-supervisor:")
    assert not values(instructions, "ENTRYPOINT")
    assert not values(instructions, "CMD")
    # The documented base build tags the image the user Dockerfile starts from.
    assert f"docker build -t {base} ." in DOCS.read_text()


# -- every container's arguments, against `supervisor`'s own parser --------------------------


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no subcommands")


@pytest.mark.parametrize("name", ["supervisor-serve", "wordcount-worker"])
def test_every_container_args_parse(name: str) -> None:
    (container,) = named("Deployment", name)["spec"]["template"]["spec"]["containers"]
    assert "command" not in container, "the image's ENTRYPOINT runs; manifests give args only"
    args = [str(a) for a in container["args"]]
    command = args[0]
    parser = build_parser()
    assert command in _subcommands(parser), f"`supervisor {command}` does not exist"
    parsed = parser.parse_args(args)
    assert parsed.command == command


def test_docs_cover_every_manifest() -> None:
    text = DOCS.read_text()
    for path in [*manifest_files(), KUBE / "kustomization.yaml", USER_DOCKERFILE]:
        assert str(path.relative_to(REPO)) in text, path.name
    assert "(deploy.md)" in (REPO / "docs" / "README.md").read_text()
