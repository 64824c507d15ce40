"""Render deploy/k8s overlays as an operator would, for the manifest tests and the local-process test.

The tree is copied to a temporary folder, `fedprompt certs --kustomize` writes the overlay's Secrets into its
git-ignored secrets/, `kubectl kustomize` renders it and `kubernetes-validate --strict` checks it offline.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
BIN = Path(sys.executable).parent
KUBECTL = BIN / "kubectl"
VALIDATE = BIN / "kubernetes-validate"
FEDPROMPT = BIN / "fedprompt"
K8S_VERSION = "1.37"
OVERLAYS = {
    # overlay: (namespace, nodes given to `fedprompt certs`)
    "dev": ("fedprompt-dev", ["holder-1", "holder-2", "holder-3"]),
    "coordinator": ("fedprompt", ["holder-1", "holder-2", "holder-3"]),
    "client": ("fedprompt-holder", ["holder-1"]),
}
WORKLOADS = {"Deployment", "StatefulSet", "Job", "DaemonSet", "ReplicaSet", "CronJob", "Pod"}


def run(cmd: list, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300, **kw)


def render(work: Path, overlay: str) -> dict:
    """{"objects", "text", "kustomize", "validate", "certs"} of one overlay rendered in ``work``."""
    tree = work / f"k8s-{overlay}"
    shutil.copytree(K8S, tree, ignore=shutil.ignore_patterns("secrets"))  # never a developer's own keys
    folder = tree / "overlays" / overlay
    certs_dir = work / f"certs-{overlay}"
    certs = [FEDPROMPT, "certs", "--out", certs_dir, "--kustomize", folder / "secrets"]
    certs += [a for n in OVERLAYS[overlay][1] for a in ("--node", n)]
    certs += ["--host", "fedprompt-aggregator", "--host", "fedprompt-secure-rounds", "--host", "fedprompt-superlink"]
    made = run(certs)
    assert made.returncode == 0, made.stderr
    built = run([KUBECTL, "kustomize", folder])
    checked = None
    if built.returncode == 0:
        checked = run([VALIDATE, "--strict", "--quiet", "-k", K8S_VERSION, "-"], input=built.stdout)
    objects = [o for o in yaml.safe_load_all(built.stdout) if o] if built.returncode == 0 else []
    return {"objects": objects, "text": built.stdout, "kustomize": built, "validate": checked, "certs": certs_dir}


def name_of(obj: dict) -> str:
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


def pod_specs(objects: list[dict]):
    """(object, pod template spec, pod template metadata) of every workload."""
    for obj in objects:
        kind = obj.get("kind")
        if kind not in WORKLOADS:
            continue
        if kind == "Pod":
            yield obj, obj.get("spec", {}), obj.get("metadata", {})
        elif kind == "CronJob":
            t = obj["spec"]["jobTemplate"]["spec"]["template"]
            yield obj, t.get("spec", {}), t.get("metadata", {})
        else:
            t = obj["spec"]["template"]
            yield obj, t.get("spec", {}), t.get("metadata", {})


def containers_of(spec: dict):
    """(container, is_init) of a pod spec."""
    for c in spec.get("initContainers") or []:
        yield c, True
    for c in spec.get("containers") or []:
        yield c, False


def find(objects: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def container(obj: dict, name: str) -> dict:
    spec = obj["spec"]["template"]["spec"]
    return next(c for c, _ in containers_of(spec) if c["name"] == name)


def expanded_args(objects: list[dict], c: dict) -> list[str]:
    """The container's args with $(VAR) expanded as the kubelet does (values from env and ConfigMaps)."""
    env = {}
    for e in c.get("env") or []:
        if "value" in e:
            env[e["name"]] = e["value"]
        elif ref := (e.get("valueFrom") or {}).get("configMapKeyRef"):
            env[e["name"]] = find(objects, "ConfigMap", ref["name"])[0]["data"][ref["key"]]
    return [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]), a) for a in c.get("args") or []]
