"""The dev overlay describes programs that really start and federate with the arguments it gives them.

Every container of the rendered `dev` overlay (init containers first) runs here as a local process with the
command, args and environment of its manifest, its volumes materialised as folders (Secrets and ConfigMaps
written from the rendered objects, emptyDirs and PVCs as empty folders, one set per pod), and the cluster's
network folded onto loopback: a container listening on 0.0.0.0:N gets a free local port, and a Service
name:port resolves to the port of the pod its selector picks. What is changed, and only for speed: the run
settings ConfigMap asks for the tiny random model, one round and two local steps instead of smollm2-135m and
five rounds of four.

It then checks what a cluster would: the aggregation server and the SuperLink answer their readiness probes,
the SuperLink accepts the three client daemons (whose probes answer too), and the federation Job completes a
round whose global prompt lands in the aggregation server's registry.
"""

from __future__ import annotations

import base64
import os
import re
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

from conftest import wait_for  # noqa: E402
from k8s_render import KUBECTL, containers_of, expanded_args, find, render  # noqa: E402

from fedprompt import flower_procs as fp  # noqa: E402

pytestmark = [
    pytest.mark.deploy,
    pytest.mark.integration,
    pytest.mark.skipif(not KUBECTL.exists(), reason="needs kubectl in the virtualenv"),
]

FAST_RUN = {"RUN_MODEL": "tiny-llama", "RUN_NUM_ROUNDS": "1", "RUN_LOCAL_STEPS": "2", "RUN_BATCH_SIZE": "8"}
ADDRESS = re.compile(r"^([a-z0-9.-]+):(\d+)$")


@dataclass
class Pod:
    name: str
    kind: str
    spec: dict
    labels: dict
    root: Path
    ports: dict[int, int] = field(default_factory=dict)  # containerPort -> local port
    mounts: dict[str, dict[str, Path]] = field(default_factory=dict)  # container -> {mountPath: folder}


def _write_files(folder: Path, data: dict[str, str], *, encoded: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for key, value in data.items():
        path = folder / key
        path.write_bytes(base64.b64decode(value) if encoded else value.encode())
        path.chmod(0o600 if key.endswith(".key") else 0o644)


def build_pods(objects: list[dict], work: Path) -> dict[str, Pod]:
    pods = {}
    for obj in objects:
        if obj["kind"] not in ("Deployment", "StatefulSet", "Job"):
            continue
        template = obj["spec"]["template"]
        name = obj["metadata"]["name"]
        pod = Pod(name, obj["kind"], template["spec"], template["metadata"].get("labels", {}), work / "pods" / name)
        volumes: dict[str, Path] = {}
        for v in pod.spec.get("volumes", []):
            folder = pod.root / "volumes" / v["name"]
            if "secret" in v:
                (secret,) = find(objects, "Secret", v["secret"]["secretName"])
                _write_files(folder, secret.get("data", {}), encoded=True)
            elif "configMap" in v:
                (cm,) = find(objects, "ConfigMap", v["configMap"]["name"])
                _write_files(folder, cm.get("data", {}), encoded=False)
            else:  # emptyDir, persistentVolumeClaim: a folder of this pod's
                folder.mkdir(parents=True)
            volumes[v["name"]] = folder
        for claim in obj["spec"].get("volumeClaimTemplates", []):
            volumes[claim["metadata"]["name"]] = pod.root / "volumes" / claim["metadata"]["name"]
            volumes[claim["metadata"]["name"]].mkdir(parents=True)
        for c, _ in containers_of(pod.spec):
            pod.mounts[c["name"]] = {m["mountPath"]: volumes[m["name"]] for m in c.get("volumeMounts", [])}
            for p in c.get("ports", []):
                pod.ports[p["containerPort"]] = fp.free_port()
        pods[name] = pod
    return pods


def service_addresses(objects: list[dict], pods: dict[str, Pod]) -> dict[str, str]:
    """'service:port' -> '127.0.0.1:local port' of the pod the Service selects."""
    out = {}
    for svc in find(objects, "Service"):
        selector = svc["spec"].get("selector", {})
        chosen = [p for p in pods.values() if selector.items() <= p.labels.items()]
        assert len(chosen) == 1, f"Service {svc['metadata']['name']} selects {[p.name for p in chosen]}"
        (pod,) = chosen
        named = {p["name"]: p["containerPort"] for c, _ in containers_of(pod.spec) for p in c.get("ports", [])}
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            target = named[target] if isinstance(target, str) else target
            out[f"{svc['metadata']['name']}:{port['port']}"] = f"127.0.0.1:{pod.ports[target]}"
    return out


def local_path(value: str, mounts: dict[str, Path]) -> str:
    for mount in sorted(mounts, key=len, reverse=True):
        if value == mount or value.startswith(mount + "/"):
            return str(mounts[mount]) + value[len(mount) :]
    return value


def local_command(objects, pods, services, pod: Pod, c: dict) -> tuple[list[str], dict[str, str]]:
    assert c["command"] == ["fedprompt"], c["command"]
    mounts = pod.mounts[c["name"]]
    superlink_mounts = pods["fedprompt-superlink"].mounts["superlink"]
    args, out = expanded_args(objects, c), []
    for i, a in enumerate(args):
        prev = args[i - 1] if i else ""
        if m := re.fullmatch(r"0\.0\.0\.0:(\d+)", a):
            a = f"127.0.0.1:{pod.ports[int(m[1])]}"
        elif a == "0.0.0.0":
            a = "127.0.0.1"
        elif prev == "--port":
            a = str(pod.ports[int(a)])
        elif a in services:
            a = services[a]
        elif prev == "--checkpoint-dir":  # a path in the SuperLink's pod: its ServerApp writes the checkpoints
            a = local_path(a, superlink_mounts)
        else:
            a = local_path(a, mounts)
        assert not ADDRESS.fullmatch(a) or a.startswith("127.0.0.1:"), f"{pod.name}: unresolved address {a}"
        out.append(a)
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "FEDPROMPT_CACHE", "LANG", "TOKENIZERS_PARALLELISM")}
    for e in c.get("env", []):
        if ref := (e.get("valueFrom") or {}).get("configMapKeyRef"):
            env[e["name"]] = find(objects, "ConfigMap", ref["name"])[0]["data"][ref["key"]]
        else:
            assert "value" in e, f"{pod.name}/{c['name']}: env {e['name']}: only literals and ConfigMap keys in dev"
            env[e["name"]] = local_path(e["value"], mounts)
    env["PYTHONUNBUFFERED"] = "1"
    return [sys.executable, "-m", "fedprompt.cli", *out], env


def probe_port(pod: Pod, c: dict) -> int:
    port = c["readinessProbe"]["grpc"]["port"]
    return pod.ports[port]


def healthy(port: int) -> bool:
    from fedprompt.protocols.health import main as health

    return health(["grpc", f"127.0.0.1:{port}", "--timeout", "2"]) == 0


def test_dev_overlay_commands_run_as_local_processes_and_complete_a_round(tmp_path):
    rendered = render(tmp_path, "dev")
    assert rendered["kustomize"].returncode == 0, rendered["kustomize"].stderr
    objects = rendered["objects"]
    (settings,) = find(objects, "ConfigMap", "fedprompt-run-settings")
    settings["data"].update(FAST_RUN)
    pods = build_pods(objects, tmp_path)
    services = service_addresses(objects, pods)
    logs = tmp_path / "logs"
    procs: dict[str, object] = {}

    def start(pod: Pod, c: dict):
        cmd, env = local_command(objects, pods, services, pod, c)
        return fp.start(cmd, logs / f"{pod.name}.{c['name']}.log", env)

    try:
        for pod in pods.values():  # init containers run to completion before their pod's containers
            for c, is_init in containers_of(pod.spec):
                if is_init:
                    proc = start(pod, c)
                    assert proc.wait(300) == 0, (logs / f"{pod.name}.{c['name']}.log").read_text()
        order = ["fedprompt-aggregator", "fedprompt-superlink"]
        order += sorted(n for n, p in pods.items() if p.kind == "StatefulSet" and n not in order)
        for name in order:
            pod = pods[name]
            for c, is_init in containers_of(pod.spec):
                if not is_init:
                    procs[name] = start(pod, c)
        for name in order[:2]:  # the readiness probes of the manifests, on the mapped ports
            pod = pods[name]
            (c,) = [c for c, init in containers_of(pod.spec) if not init]
            wait_for(lambda p=pod, c=c: healthy(probe_port(p, c)), 180, f"{name} readiness", logs)
        (job,) = [p for p in pods.values() if p.kind == "Job"]
        (job_container,) = job.spec["containers"]
        procs[job.name] = start(job, job_container)
        deadline = time.monotonic() + 600
        while procs[job.name].poll() is None and time.monotonic() < deadline:
            for name, proc in procs.items():
                if proc.poll() is not None and name != job.name:
                    raise AssertionError(
                        f"{name} exited:\n" + "\n".join(fp.tail(p) for p in logs.glob(f"{name}.*.log"))
                    )
            time.sleep(2)
        job_log = (logs / f"{job.name}.{job_container['name']}.log").read_text()
        all_logs = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}" for p in logs.glob("*.log"))
        assert procs[job.name].returncode == 0, all_logs
        assert "round 1/1: version" in job_log and "federation complete" in job_log, job_log
        for name in order[2:]:  # the client daemons' probes answer, now that their SuperNodes run
            pod = pods[name]
            c = next(c for c, init in containers_of(pod.spec) if not init)
            assert healthy(probe_port(pod, c)), name
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            fp.stop(proc)

    # the round's global prompt is in the registry the aggregator pod's volume holds, under secure aggregation
    from fedprompt.server.aggregation.registry import Registry
    from fedprompt.server.aggregation.store import open_store

    agg = pods["fedprompt-aggregator"]
    store_path = local_path("/var/lib/fedprompt/registry.sqlite", agg.mounts["aggregator"])
    with open_store(store_path) as store:
        versions = Registry(store).list_versions()
        rounds = store.dump()["rounds"]
    assert [v.metadata["training"]["round"] for v in versions] == [0, 1]
    assert versions[1].metadata["privacy"]["epsilon"] > 0 and len(rounds) == 1
    # and the holders' privacy ledgers, on their own volumes, recorded the spend
    for name in order[2:]:
        state = pods[name].mounts["client"]["/var/lib/fedprompt"]
        from fedprompt.dp.ledger import LEDGER_FILE

        assert (state / LEDGER_FILE).is_file(), f"{name} has no privacy ledger in its state volume"
