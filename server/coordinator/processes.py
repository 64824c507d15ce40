"""The coordinator's processes: a Flower SuperLink (TLS, SuperNode authentication) behind the network front,
the data holders' node keys registered, the federation submitted and followed round by round, failing loudly
when the run fails (``flwr run`` itself reports success for a run that failed later).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from fedprompt import certs as certs_mod
from fedprompt import flower_procs as fp
from fedprompt.cache import write_json_atomic
from fedprompt.errors import FedPromptError
from fedprompt.server.aggregation.cli import STORE_ENV

if TYPE_CHECKING:  # the run settings pull in torch (via the training defaults): loaded when a run is set up
    from fedprompt.server.coordinator.config import FederationConfig

# Each `flwr ls` starts a Python process (about 1 s of CPU): the run status is polled rarely, the
# checkpoint state (a file) often.
STATUS_POLL_S = 10.0
NODE_IDS_FILE = "node-ids.json"
PROGRESS_POLL_S = 1.0
REMOTE_WAIT_S = 300.0  # how long a federation Job waits for the SuperLink and the aggregation server to come up


def wait_reachable(address: str, what: str, timeout: float = REMOTE_WAIT_S) -> None:
    """Wait until ``address`` accepts TCP connections (services started beside this Job may still be starting)."""
    import socket

    host, _, port = address.rpartition(":")
    deadline, said = time.monotonic() + timeout, False
    while True:
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=3).close()
            return
        except OSError as exc:
            if time.monotonic() > deadline:
                raise FedPromptError(f"the {what} at {address} is unreachable after {timeout:.0f} s: {exc}") from exc
            if not said:
                print(f"waiting for the {what} at {address} ...", flush=True)
                said = True
            time.sleep(2)


def loopback(address: str) -> str:
    """The address the coordinator's own processes use for a service listening on ``address``."""
    host, _, port = address.rpartition(":")
    return f"127.0.0.1:{port}" if host in ("0.0.0.0", "[::]", "::", "") else address


class Coordinator:
    """The SuperLink's side of the coordinator.

    The SuperLink listens on loopback only (its Control API authenticates nobody); the network reaches it
    through the front (``server/coordinator/front.py``), which forwards the Fleet API on ``host:port`` and, with
    ``operator_listen``, the Control API to the holder of the coordinator's client certificate.
    ``superlink=HOST:PORT`` submits to the operator listener of a SuperLink that runs elsewhere (the Kubernetes
    layout: a SuperLink StatefulSet, the federation as a Job), through a loopback relay for the ``flwr`` CLI."""

    def __init__(
        self,
        *,
        certs: Path,
        state: Path,
        host: str,
        port: int,
        superlink: str | None = None,
        superlink_port: int = 0,
        operator_listen: str | None = None,
    ) -> None:
        self.certs, self.state, self.host, self.port = certs, state, host, port
        self.external = superlink is not None
        self.operator_listen = operator_listen
        self.aggregator = None
        self.front = None
        self.relay = None
        names = (
            ("ca.crt", "coordinator.crt", "coordinator.key")
            if self.external
            else ("ca.crt", "server.crt", "server.key")
        )
        for name in names:
            if not (certs / name).is_file():
                raise FedPromptError(f"{certs / name} is missing; create the material with fedprompt certs")
        self.logs = state / "logs"
        self.superlink = None
        self.local_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        self.superlink_port = superlink_port or fp.free_port()
        self.cli_env = fp.flower_env(state / "flwr" / "cli")
        if self.external:
            from fedprompt.server.coordinator.control_relay import ControlRelay

            self.relay = ControlRelay(superlink, certs)
            self.address = f"127.0.0.1:{self.relay.start()}"
            fp.write_cli_config(state / "flwr" / "cli", self.address, None)
        else:
            self.address = f"127.0.0.1:{self.superlink_port}"
            fp.write_cli_config(state / "flwr" / "cli", self.address, (certs / "ca.crt").resolve())

    def start(self, health_listen: str | None = None) -> None:
        log = self.logs / "superlink.log"
        cmd = [
            fp.flower_bin("flower-superlink"),
            "--ssl-ca-certfile", self.certs / "ca.crt",
            "--ssl-certfile", self.certs / "server.crt",
            "--ssl-keyfile", self.certs / "server.key",
            "--enable-supernode-auth",
            "--disable-runtime-dependency-installation",
            "--database", self.state / "superlink.db",
            "--host", "127.0.0.1",  # never the network: the front is what listens there
            "--port", str(self.superlink_port),
        ]  # fmt: skip
        if health_listen:  # a plaintext health endpoint for probes that cannot present a certificate
            cmd += ["--health-server-address", health_listen]
        self.superlink = fp.start(cmd, log, fp.flower_env(self.state / "flwr" / "superlink"))
        fp.wait_for_port("127.0.0.1", self.superlink_port, self.superlink, log)
        front_log = self.logs / "front.log"
        front = [sys.executable, "-m", "fedprompt.cli", "front", "--certs", self.certs]
        front += ["--superlink", self.address, "--listen", f"{self.host}:{self.port}"]
        if self.operator_listen:
            front += ["--operator-listen", self.operator_listen]
        self.front = fp.start(front, front_log, dict(os.environ))
        fp.wait_for_port(self.local_host, self.port, self.front, front_log)
        if self.operator_listen:
            host, _, port = loopback(self.operator_listen).rpartition(":")
            fp.wait_for_port(host, int(port), self.front, front_log)
        operator = f"; operator listener {self.operator_listen} (mutual TLS)" if self.operator_listen else ""
        print(
            f"SuperLink on 127.0.0.1:{self.superlink_port} (TLS, node authentication; loopback only); "
            f"fleet front on {self.host}:{self.port}{operator}; logs: {self.logs}",
            flush=True,
        )

    def start_aggregator(self, listen: str, store: str, health_listen: str | None = None) -> None:
        """The aggregation server beside the SuperLink, as its own process (``fedprompt aggregator``)."""
        log = self.logs / "aggregator.log"
        cmd = [sys.executable, "-m", "fedprompt.cli", "aggregator", "--certs", self.certs, "--listen", listen]
        if health_listen:
            cmd += ["--health-listen", health_listen]
        env = dict(os.environ)
        env[STORE_ENV] = store  # a PostgreSQL URL may hold a password: keep it off the command line
        self.aggregator = fp.start(cmd, log, env)
        host, _, port = loopback(listen).rpartition(":")
        fp.wait_for_port(host, int(port), self.aggregator, log)
        print(f"aggregation server on {listen} (mutual TLS); log: {log}", flush=True)

    def register_nodes(self) -> int:
        """Register every node key under ``certs/nodes`` that the SuperLink does not know yet."""
        nodes = certs_mod.registered_nodes(self.certs)
        if not nodes:
            raise FedPromptError(f"{self.certs}/nodes holds no node keys; add holders with fedprompt certs --node NAME")
        added = 0
        ids = self.node_ids()
        for n in nodes:
            try:
                out = fp.flwr(["supernode", "register", str(n.public_key), fp.FEDERATION], self.cli_env)
                ids[n.name] = str(out.get("node-id", ""))
                added += 1
            except FedPromptError as exc:
                if "already" not in str(exc).lower():
                    raise
        write_json_atomic(self.state / NODE_IDS_FILE, ids)  # names for the SuperLink's node ids (node_status)
        print(f"node keys: {len(nodes)} known, {added} newly registered", flush=True)
        return added

    def node_ids(self) -> dict[str, str]:
        path = self.state / NODE_IDS_FILE
        return json.loads(path.read_text()) if path.exists() else {}

    def node_status(self) -> dict[str, str]:
        """Each registered holder's status on the SuperLink (online, offline, registered), by node name."""
        names = {v: k for k, v in self.node_ids().items() if v}
        nodes = fp.flwr(["supernode", "list", fp.FEDERATION], self.cli_env).get("nodes", [])
        return {names.get(str(n["node-id"]), f"node {n['node-id']}"): n["status"] for n in nodes}

    def report_waiting(self, cfg: FederationConfig, shown: str) -> str:
        """Print which holders are online and which the first round waits for, when that changed."""
        try:
            status = self.node_status()
        except FedPromptError:
            return shown  # the SuperLink is busy or restarting; the next poll tells
        online = sorted(n for n, st in status.items() if st == "online")
        waiting = sorted(n for n, st in status.items() if st != "online")
        line = (
            f"holders online {len(online)} of {len(status)}: {', '.join(online) or 'none'}"
            + (f"; not connected: {', '.join(waiting)}" if waiting else "")
            + f" (the first round starts with {cfg.min_available_nodes} online)"
        )
        if line != shown:
            print(line, flush=True)
        return line

    def submit(self, cfg: FederationConfig) -> str:
        toml = self.state / "run-config.toml"
        toml.write_text("".join(f"{k} = {fp.toml_value(v)}\n" for k, v in cfg.to_run_config().items()))
        out = fp.flwr(["run", str(fp.app_dir()), fp.FEDERATION, "--run-config", str(toml)], self.cli_env)
        return str(out["run-id"])

    def status(self, run_id: str) -> dict:
        """Flower's record of the run: status, details, timings, network traffic."""
        return fp.flwr(["ls", fp.FEDERATION, "--run-id", run_id], self.cli_env)["runs"][0]

    def follow(self, run_id: str, cfg: FederationConfig) -> None:
        """Print each round as the ServerApp checkpoints it; return when the run completed, raise otherwise.

        With a SuperLink elsewhere the checkpoints are on its machine: the rounds are read from the prompt
        registry instead (every round's global prompt is a version there), or not shown without one."""
        if self.external:
            return self._follow_remote(run_id, cfg)
        state_file = Path(cfg.checkpoint_dir) / "state.json"
        shown, next_status, waiting = 0, 0.0, ""
        while True:
            if self.superlink is not None and self.superlink.poll() is not None:
                raise FedPromptError(f"the SuperLink exited:\n{fp.tail(self.logs / 'superlink.log')}")
            if self.front is not None and self.front.poll() is not None:
                raise FedPromptError(f"the front exited:\n{fp.tail(self.logs / 'front.log')}")
            if self.aggregator is not None and self.aggregator.poll() is not None:
                raise FedPromptError(f"the aggregation server exited:\n{fp.tail(self.logs / 'aggregator.log')}")
            if state_file.exists():
                history = json.loads(state_file.read_text()).get("history", [])
                for rec in history[shown:]:
                    print(format_round(rec, cfg.num_rounds), flush=True)
                shown = max(shown, len(history))
                done = bool(history) and history[-1]["round"] >= cfg.num_rounds
            else:
                done = False
            if done or time.monotonic() >= next_status:
                if not shown:
                    waiting = self.report_waiting(cfg, waiting)  # until the first round is in
                run = self.status(run_id)
                status, details = run["status"], run.get("status-details", "")
                if status.startswith("finished"):
                    write_json_atomic(self.state / "runs" / f"{run_id}.json", run)  # Flower's final record
                    break
                next_status = time.monotonic() + (PROGRESS_POLL_S if done else STATUS_POLL_S)
            time.sleep(PROGRESS_POLL_S)
        if status != "finished:completed":
            log = self.run_log(run_id)
            raise FedPromptError(f"run {run_id} ended as {status}: {details}\n{log}")

    def _follow_remote(self, run_id: str, cfg: FederationConfig) -> None:
        from fedprompt.protocols.aggregator_client import AggregatorClient, AggregatorError

        registry = AggregatorClient(cfg.aggregator, cfg.aggregator_certs, "coordinator") if cfg.aggregator else None
        seen: set[str] = set()
        while True:
            if registry is not None:
                try:
                    for v in registry.list_versions(task=cfg.task):
                        meta = json.loads(v.metadata_json or "{}")
                        if v.version_id in seen or str(meta.get("run_id")) != run_id:
                            continue
                        seen.add(v.version_id)
                        rnd = meta.get("training", {}).get("round")
                        eps = (meta.get("privacy") or {}).get("epsilon")
                        spend = f", epsilon {eps:.2f}" if isinstance(eps, int | float) else ""
                        print(f"round {rnd}/{cfg.num_rounds}: version {v.version_id[:16]}{spend}", flush=True)
                except AggregatorError as exc:
                    print(f"(registry unreachable: {exc})", flush=True)
            run = self.status(run_id)
            status, details = run["status"], run.get("status-details", "")
            if status.startswith("finished"):
                write_json_atomic(self.state / "runs" / f"{run_id}.json", run)
                break
            time.sleep(STATUS_POLL_S)
        if status != "finished:completed":
            raise FedPromptError(f"run {run_id} ended as {status}: {details}\n{self.run_log(run_id)}")

    def run_log(self, run_id: str) -> str:
        import subprocess

        r = subprocess.run(
            [fp.flower_bin("flwr"), "log", run_id, fp.FEDERATION, "--show"],
            env=self.cli_env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        return "\n".join((r.stdout or r.stderr).splitlines()[-40:])

    def stop(self) -> None:
        fp.stop(self.front)
        self.front = None
        fp.stop(self.superlink)
        self.superlink = None
        fp.stop(self.aggregator)
        self.aggregator = None
        if self.relay is not None:
            self.relay.stop()
        if not self.external:  # the ServerApp process is started by Flower outside the SuperLink's process group
            fp.stop_matching(f"--runtime-api-address 127.0.0.1:{self.superlink_port}")


def format_round(rec: dict, num_rounds: int) -> str:
    acc = rec.get("accuracy")
    head = f"round {rec['round']}/{num_rounds}" + ("" if acc is None else f": global test accuracy {100 * acc:.2f} %")
    if rec["round"] == 0:
        return head + " (initial prompt)"
    # under DP a holder replies with its bound for the whole run (its per-round spend would depend on its n)
    eps = ", ".join(f"{h} eps<={m['epsilon']:.2f}" for h, m in sorted(rec.get("holders", {}).items()) if "epsilon" in m)
    parts = [head, f"{rec.get('replied', 0)}/{rec.get('sampled', 0)} holders merged"]
    if eps:
        parts.append(eps)
    if rec.get("failed"):
        parts.append("left out: " + "; ".join(f"{h}: {e[:120]}" for h, e in rec["failed"].items()))
    if "client_level_epsilon" in rec:
        parts.append(f"client-level eps={rec['client_level_epsilon']:.2f}")
    return " | ".join(parts)
