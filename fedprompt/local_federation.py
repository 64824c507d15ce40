"""A whole federation on one machine, as real processes on loopback: ``fedprompt server`` and one
``fedprompt client`` daemon per holder, with fresh certificates. Used by the demo, the round-overhead
benchmark and the integration tests; every process is ended on exit, whatever happened.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from fedprompt import certs
from fedprompt import flower_procs as fp
from fedprompt.errors import FedPromptError


@dataclass(frozen=True)
class HolderSpec:
    name: str
    data: Path
    budget_epsilon: float


class LocalFederation:
    def __init__(self, out: Path, holders: list[HolderSpec], *, port: int = 0, threads: int = 1) -> None:
        self.out, self.holders, self.threads = out, holders, threads
        self.port = port or fp.free_port()
        self.aggregator_port = fp.free_port()
        self.certs = out / "certs"
        self.logs = out / "logs"
        self.checkpoints = out / "coordinator" / "checkpoints"
        certs.create(self.certs, nodes=[h.name for h in holders], hosts=["localhost", "127.0.0.1"])
        self.server: subprocess.Popen | None = None
        self.clients: dict[str, subprocess.Popen] = {}

    def _spawn(self, args: list[str], log: Path) -> subprocess.Popen:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_MININTERVAL": "5"}
        return fp.start([sys.executable, "-m", "fedprompt.cli", *args], log, env)

    def start_server(self, *settings: str, log: str = "server.log") -> subprocess.Popen:
        """``fedprompt server`` with ``settings`` (its command-line flags)."""
        args = ["server", "--certs", str(self.certs), "--state", str(self.out / "coordinator")]
        args += ["--port", str(self.port), "--aggregator-listen", f"127.0.0.1:{self.aggregator_port}"]
        self.server = self._spawn([*args, *settings], self.logs / log)
        return self.server

    def start_holder(self, h: HolderSpec, *extra: str, superlink: str | None = None) -> subprocess.Popen:
        """``fedprompt client`` for ``h`` (``extra``: its flags, e.g. its policy), connecting to the coordinator's
        fleet front (or to ``superlink``, e.g. the SuperLink's own loopback port, for measuring the front)."""
        self.clients[h.name] = self._spawn(
            [
                "client",
                "--superlink", superlink or f"127.0.0.1:{self.port}",
                "--aggregator", f"127.0.0.1:{self.aggregator_port}",
                "--certs", str(self.certs),
                "--name", h.name,
                "--data", str(h.data),
                "--state", str(self.state_dir(h.name)),
                "--budget-epsilon", str(h.budget_epsilon),
                "--threads", str(self.threads),
                *extra,
            ],
            self.logs / f"{h.name}.log",
        )  # fmt: skip
        return self.clients[h.name]

    def start(self, *settings: str) -> LocalFederation:
        self.start_server(*settings)
        for h in self.holders:
            self.start_holder(h)
        return self

    def state_dir(self, name: str) -> Path:
        return self.out / "holders" / name

    def history(self) -> list[dict]:
        path = self.checkpoints / "state.json"
        try:
            return json.loads(path.read_text())["history"]
        except (FileNotFoundError, json.JSONDecodeError):
            return []

    def wait(self, timeout: float, *, echo: bool = False) -> list[dict]:
        """Wait for the coordinator to finish; raise if it failed, timed out, or a daemon died."""
        assert self.server is not None
        deadline, shown = time.monotonic() + timeout, 0
        while self.server.poll() is None:
            if echo:
                shown = self._echo(shown)
            for name, c in self.clients.items():
                if c.poll() is not None and c.returncode not in (0, -9, 130):
                    raise FedPromptError(f"{name}'s daemon exited with {c.returncode}:\n{self.tail(name)}")
            if time.monotonic() > deadline:
                raise FedPromptError(f"the federation did not finish within {timeout:.0f} s:\n{self.tail('server')}")
            time.sleep(1)
        if echo:
            self._echo(shown)
        if self.server.returncode != 0:
            raise FedPromptError(f"the coordinator failed ({self.server.returncode}):\n{self.tail('server', 60)}")
        return self.history()

    def run_traffic(self) -> dict:
        """Flower's count of the bytes of the last finished run's messages (saved by ``fedprompt server``)."""
        records = sorted((self.out / "coordinator" / "runs").glob("*.json"), key=lambda p: p.stat().st_mtime)
        if not records:
            raise FedPromptError("no finished run recorded by the coordinator")
        return json.loads(records[-1].read_text())["network-traffic"]

    def _echo(self, shown: int) -> int:
        log = self.logs / "server.log"
        if not log.exists():
            return shown
        text = log.read_text(errors="replace")
        lines = [ln for ln in text.splitlines() if ln.startswith(("round ", "federation", "POST"))]
        for ln in lines[shown:]:
            print(ln, flush=True)
        return len(lines)

    def tail(self, name: str, lines: int = 30) -> str:
        return fp.tail(self.logs / f"{name}.log", lines)

    def stop(self) -> None:
        for p in (self.server, *self.clients.values()):
            fp.stop(p)

    def __enter__(self) -> LocalFederation:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
