"""The compose files (deploy/compose) against the Kubernetes manifests: the same workloads, run the same way.

`make images-test` runs the compose files for real (images built here, a secure round in containers); these
tests make sure the manifests describe those same containers: the same command and flags with the same values,
the same ports, mount paths (read-only where the other is), health port, environment and hardening. A
compose variable (``${X:?...}``) stands for a value each deployment chooses and matches anything; a variable
with a default (``${X:-v}``) is compared by its default (the federation's defaults are the manifests'
ConfigMap). Each rule is shown failing on a deliberately broken copy.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

from tests.k8s_render import container, expanded_args, find, render

pytestmark = pytest.mark.deploy

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "deploy" / "compose"
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
ANY = object()  # a value the deployment chooses
# compose (file, service) -> Kubernetes (overlay, kind, object name, container): the single-host coordinator side
# is the dev overlay's (one aggregation server on its own store), the holder is the client overlay's
PAIRS = {
    ("coordinator.yml", "aggregator"): ("dev", "Deployment", "fedprompt-aggregator", "aggregator"),
    ("coordinator.yml", "superlink"): ("dev", "StatefulSet", "fedprompt-superlink", "superlink"),
    ("coordinator.yml", "federation"): ("dev", "Job", "fedprompt-federation", "federation"),
    ("holder.yml", "holder"): ("client", "StatefulSet", "fedprompt-client", "client"),
}
VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def load_compose(name: str) -> dict:
    return yaml.safe_load((COMPOSE / name).read_text())


def resolve(value):
    """A compose value with its variables replaced: by their default, or ANY where the deployment must set one."""
    if not isinstance(value, str):
        return value
    chosen = False

    def sub(m: re.Match) -> str:
        nonlocal chosen
        if m[2] in (":-", "-"):
            return m[3]
        chosen = True
        return ""

    out = VARIABLE.sub(sub, value)
    return ANY if chosen else out


def volume(spec: str) -> tuple[str, str, bool]:
    """(source, target, read-only) of a compose short-syntax volume (a variable's message may hold colons)."""
    parts = VARIABLE.sub("$VAR", spec).split(":")
    assert len(parts) in (2, 3) and parts[2:] in ([], ["ro"], ["rw"]), f"unexpected volume {spec!r}"
    return parts[0], parts[1], parts[2:] == ["ro"]


def image_healthcheck_port(target: str) -> int | None:
    """The port of the HEALTHCHECK in the Dockerfile's stage ``target`` (None: it has none)."""
    stage = re.search(rf"^FROM \S+ AS {target}\n(.*?)(?=^FROM |\Z)", DOCKERFILE.read_text(), re.M | re.S)
    assert stage, f"no stage {target} in {DOCKERFILE}"
    hc = re.search(r"^HEALTHCHECK .*?CMD \[(.*?)\]", stage[1], re.M | re.S)
    return int(hc[1].rsplit(":", 1)[1].strip('" ')) if hc else None


def compose_facts(service: dict) -> dict:
    image = resolve(service["image"])
    name = image.split(":")[0] if image is not ANY else ANY
    mounts = {target: ro for _, target, ro in map(volume, service.get("volumes") or [])}
    for t in service.get("tmpfs") or []:
        mounts[t.split(":")[0]] = False
    ports = {int(str(p).rsplit(":", 1)[-1]) for p in service.get("ports") or []}
    ports |= {int(p) for p in service.get("expose") or []}
    health = None
    if hc := service.get("healthcheck"):
        health = int(hc["test"][-1].rsplit(":", 1)[1])
    elif name is not ANY:
        health = image_healthcheck_port(name.removeprefix("fedprompt-"))
    return {
        "image": name,
        "argv": [resolve(a) for a in [*service.get("entrypoint", []), *service["command"]]],
        "ports": ports,
        "mounts": mounts,
        "health": health,
        "env": {k: str(v) for k, v in (service.get("environment") or {}).items()},
        "hardening": (
            service.get("read_only") is True,
            service.get("user") == "10001:10001",
            service.get("cap_drop") == ["ALL"],
            "no-new-privileges:true" in (service.get("security_opt") or []),
        ),
    }


def k8s_facts(objects: list[dict], kind: str, name: str, container_name: str) -> dict:
    (obj,) = find(objects, kind, name)
    pod = obj["spec"]["template"]["spec"]
    c = container(obj, container_name)
    sc, psc = c.get("securityContext") or {}, pod.get("securityContext") or {}
    probes = [c[p]["grpc"]["port"] for p in ("startupProbe", "readinessProbe", "livenessProbe") if p in c]
    assert len(set(probes)) <= 1, f"{name}: probes on several ports {probes}"
    user = (sc.get("runAsUser", psc.get("runAsUser")), sc.get("runAsGroup", psc.get("runAsGroup")))
    return {
        "image": c["image"].split(":")[0],
        "argv": [*c.get("command", []), *expanded_args(objects, c)],
        "ports": {p["containerPort"] for p in c.get("ports") or []},
        "mounts": {m["mountPath"]: bool(m.get("readOnly")) for m in c.get("volumeMounts") or []},
        "health": probes[0] if probes else None,
        "env": {e["name"]: e["value"] for e in c.get("env") or [] if "value" in e},
        "hardening": (
            sc.get("readOnlyRootFilesystem") is True,
            user == (10001, 10001),
            (sc.get("capabilities") or {}).get("drop") == ["ALL"],
            sc.get("allowPrivilegeEscalation") is False,
        ),
    }


def differences(compose: dict, k8s: dict) -> list[str]:
    """What differs between a compose service's facts and its Kubernetes container's (empty: the same)."""
    out = []
    ca, ka = compose["argv"], k8s["argv"]
    if len(ca) != len(ka):
        out.append(f"argv: compose {ca} vs manifest {ka}")
    else:
        for i, (c, k) in enumerate(zip(ca, ka, strict=True)):
            if c is not ANY and c != k:
                out.append(f"argv[{i}] (after {ka[i - 1] if i else 'start'}): compose {c!r} vs manifest {k!r}")
    for key in ("image", "ports", "mounts", "health", "env", "hardening"):
        if compose[key] is not ANY and compose[key] != k8s[key]:
            out.append(f"{key}: compose {compose[key]} vs manifest {k8s[key]}")
    return out


@pytest.fixture(scope="module")
def manifests(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("k8s")
    out = {}
    for overlay in {o for o, *_ in PAIRS.values()}:
        r = render(work, overlay)
        assert r["kustomize"].returncode == 0, r["kustomize"].stderr
        out[overlay] = r["objects"]
    return out


def facts_of(manifests: dict, pair: tuple[str, str], compose_files: dict | None = None) -> tuple[dict, dict]:
    file, service = pair
    overlay, kind, name, container_name = PAIRS[pair]
    doc = (compose_files or {}).get(file) or load_compose(file)
    return compose_facts(doc["services"][service]), k8s_facts(manifests[overlay], kind, name, container_name)


@pytest.mark.parametrize("pair", list(PAIRS), ids=lambda p: f"{p[0]}:{p[1]}")
def test_compose_service_runs_like_its_manifest(manifests, pair):
    compose, k8s = facts_of(manifests, pair)
    assert differences(compose, k8s) == []
    assert all(compose["hardening"]), compose["hardening"]


def test_every_compose_service_is_compared():
    services = {(f.name, s) for f in COMPOSE.glob("*.yml") for s in load_compose(f.name)["services"]}
    assert services == set(PAIRS)


def test_state_lives_on_named_volumes():
    """The ledger and policy (holder) and the registry and SuperLink state (coordinator) survive a recreate."""
    for file, service, target in [
        ("holder.yml", "holder", "/var/lib/fedprompt"),
        ("coordinator.yml", "aggregator", "/var/lib/fedprompt"),
        ("coordinator.yml", "superlink", "/var/lib/fedprompt"),
    ]:
        doc = load_compose(file)
        (source,) = [src for src, dst, _ in map(volume, doc["services"][service]["volumes"]) if dst == target]
        assert source in doc["volumes"], f"{file}:{service}: {target} is not on a named volume"


def test_the_operator_front_is_not_published():
    superlink = load_compose("coordinator.yml")["services"]["superlink"]
    assert {int(str(p).rsplit(":", 1)[-1]) for p in superlink["ports"]} == {9093}


def _break(doc: dict, service: str, edit) -> dict:
    broken = copy.deepcopy(doc)
    edit(broken["services"][service])
    return broken


BREAKAGES = {
    "a flag's value": (("coordinator.yml", "aggregator"), lambda s: s["command"].__setitem__(4, "0.0.0.0:9999")),
    "a flag dropped": (("coordinator.yml", "federation"), lambda s: s["command"].remove("--secure-aggregation")),
    "a default off the ConfigMap": (
        ("coordinator.yml", "federation"),
        lambda s: s["command"].__setitem__(s["command"].index("--num-rounds") + 1, "${RUN_NUM_ROUNDS:-50}"),
    ),
    "writable certificates": (
        ("coordinator.yml", "superlink"),
        lambda s: s["volumes"].__setitem__(0, s["volumes"][0].removesuffix(":ro")),
    ),
    "state elsewhere": (("holder.yml", "holder"), lambda s: s["volumes"].__setitem__(2, "state:/srv/state")),
    "another health port": (
        ("coordinator.yml", "superlink"),
        lambda s: s["healthcheck"].__setitem__(
            "test", ["CMD", "python", "-m", "fedprompt.protocols.health", "grpc", "x:9"]
        ),
    ),
    "a port more": (("holder.yml", "holder"), lambda s: s.__setitem__("expose", ["9097", "8080"])),
    "root filesystem writable": (("holder.yml", "holder"), lambda s: s.__setitem__("read_only", False)),
    "capabilities kept": (("coordinator.yml", "aggregator"), lambda s: s.pop("cap_drop")),
    "another image": (("holder.yml", "holder"), lambda s: s.__setitem__("image", "fedprompt-coordinator:0.1.0")),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_the_comparison_reports_a_broken_compose_file(manifests, breakage):
    pair, edit = BREAKAGES[breakage]
    file, service = pair
    broken = {file: _break(load_compose(file), service, edit)}
    compose, k8s = facts_of(manifests, pair, broken)
    assert differences(compose, k8s), f"{breakage}: not reported"
