"""The federation for real: `fedprompt server` (a Flower SuperLink with TLS and node authentication) and
`fedprompt client` daemons (SuperNodes) on loopback, with the tiny model.

Each test starts real processes in their own process groups and ends them, whatever happens.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import make_sentiment_rows

from fedprompt import artifact
from fedprompt.dp.ledger import PrivacyLedger
from fedprompt.flower_procs import free_port

TARGET_EPS = 8.0


def _cli(*args: str, log: Path) -> subprocess.Popen:
    fh = open(log, "wb")  # closed with the process
    return subprocess.Popen(
        [sys.executable, "-m", "fedprompt.cli", *args],
        stdout=fh,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def _end(p: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(p.pid, sig)
    try:
        p.wait(20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait(5)


def _wait_for(predicate, timeout: float, what: str, logs: list[Path]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    dump = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in logs if p.exists())
    raise AssertionError(f"timed out waiting for {what}\n{dump}")


def _history(ckpt: Path) -> list[dict]:
    state = ckpt / "state.json"
    return json.loads(state.read_text())["history"] if state.exists() else []


@pytest.fixture
def federation(tmp_path):
    """Certificates for four holders, their data files, and a process list cleaned up at the end."""
    holders = ["holder-1", "holder-2", "holder-3", "holder-4"]
    certs = tmp_path / "certs"
    nodes = [arg for h in holders for arg in ("--node", h)]
    made = subprocess.run([sys.executable, "-m", "fedprompt.cli", "certs", "--out", str(certs), *nodes])
    assert made.returncode == 0
    for i, h in enumerate(holders):
        rows = make_sentiment_rows(80, seed=10 + i)
        (tmp_path / f"{h}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    procs: list[subprocess.Popen] = []
    yield tmp_path, certs, procs
    for p in procs:
        _end(p)


def _server(tmp_path, certs, port, *extra, log="server.log"):
    return _cli(
        "server",
        "--certs", str(certs),
        "--state", str(tmp_path / "coordinator"),
        "--port", str(port),
        "--model", "tiny-llama",
        "--task", "rotten-tomatoes",
        "--local-steps", "3",
        "--batch-size", "8",
        "--lr", "0.05",
        "--target-epsilon", str(TARGET_EPS),
        "--min-train-nodes", "2",
        "--set", "wait_for_nodes_s=120",
        *extra,
        log=tmp_path / log,
    )  # fmt: skip


def _client(tmp_path, certs, port, name, budget):
    return _cli(
        "client",
        "--superlink", f"127.0.0.1:{port}",
        "--certs", str(certs),
        "--name", name,
        "--data", str(tmp_path / f"{name}.jsonl"),
        "--state", str(tmp_path / f"state-{name}"),
        "--budget-epsilon", str(budget),
        "--threads", "1",
        log=tmp_path / f"{name}.log",
    )  # fmt: skip


def test_rounds_go_on_without_a_killed_holder_and_an_over_budget_one(federation):
    tmp_path, certs, procs = federation
    port = free_port()
    logs = [tmp_path / n for n in ("server.log", "holder-1.log", "holder-2.log", "holder-3.log", "holder-4.log")]
    server = _server(
        tmp_path, certs, port, "--num-rounds", "3", "--min-available-nodes", "4", "--round-timeout-s", "25"
    )
    procs.append(server)
    budgets = {"holder-1": 20, "holder-2": 20, "holder-3": 1.0, "holder-4": 20}  # holder-3 cannot afford a round
    clients = {h: _client(tmp_path, certs, port, h, b) for h, b in budgets.items()}
    procs.extend(clients.values())
    ckpt = tmp_path / "coordinator" / "checkpoints"

    _wait_for(lambda: len(_history(ckpt)) >= 2, 240, "round 1", logs)
    clients["holder-4"].send_signal(signal.SIGKILL)  # the daemon dies; its SuperNode follows (PDEATHSIG)
    _wait_for(lambda: server.poll() is not None, 300, "the federation to finish", logs)
    assert server.returncode == 0, (tmp_path / "server.log").read_text()[-4000:]

    history = _history(ckpt)
    assert [r["round"] for r in history] == [0, 1, 2, 3]
    for rec in history[1:]:
        assert rec["merged"], rec
        assert {"holder-1", "holder-2"} <= set(rec["holders"]), rec
        assert "budget" in rec["failed"]["holder-3"].lower() or "refused" in rec["failed"]["holder-3"], rec
    assert "holder-4" in history[1]["holders"]
    assert "holder-4" in history[2]["failed"] and "holder-4" not in history[2]["holders"]

    # the global prompt moved in every round
    weights = [artifact.load(ckpt / f"round-{r:04d}")[0] for r in (1, 2, 3)]
    assert not torch.equal(weights[0], weights[1]) and not torch.equal(weights[1], weights[2])
    _, meta = artifact.load(ckpt / "round-0003")
    assert meta.privacy["per_holder"]["holder-1"]["epsilon"] == pytest.approx(TARGET_EPS, rel=0.02)

    # every ledger holds exactly what was released
    for h in ("holder-1", "holder-2"):
        ledger = PrivacyLedger(tmp_path / f"state-{h}")
        assert [(r.round, r.status) for r in ledger.releases()] == [(k, "committed") for k in (1, 2, 3)]
        assert ledger.spent().epsilon == pytest.approx(TARGET_EPS, rel=0.02)
    assert PrivacyLedger(tmp_path / "state-holder-3").releases() == []
    killed = PrivacyLedger(tmp_path / "state-holder-4").releases()
    assert killed[0].round == 1 and killed[0].status == "committed"


def test_a_restarted_coordinator_resumes_from_its_last_checkpoint(federation):
    tmp_path, certs, procs = federation
    port = free_port()
    logs = [tmp_path / n for n in ("server.log", "server2.log", "holder-1.log", "holder-2.log")]
    args = ("--num-rounds", "3", "--min-available-nodes", "2", "--round-timeout-s", "60")
    server = _server(tmp_path, certs, port, *args)
    procs.append(server)
    procs.extend(_client(tmp_path, certs, port, h, 20) for h in ("holder-1", "holder-2"))
    ckpt = tmp_path / "coordinator" / "checkpoints"
    _wait_for(lambda: len(_history(ckpt)) >= 2, 240, "round 1", logs)
    _end(server)  # the coordinator stops (SIGTERM) after round 1
    assert server.returncode != 0
    first = _history(ckpt)
    done = first[-1]["round"]
    assert done in (1, 2)

    again = _server(tmp_path, certs, port, *args, log="server2.log")
    procs.append(again)
    _wait_for(lambda: again.poll() is not None, 300, "the resumed federation", logs)
    assert again.returncode == 0, (tmp_path / "server2.log").read_text()[-4000:]
    history = _history(ckpt)
    assert [r["round"] for r in history] == [0, 1, 2, 3]
    assert history[: len(first)] == first  # the rounds before the restart were kept, not redone
    # a round interrupted by the restart is run again, and charged again if the holder had trained
    rounds = sorted(r.round for r in PrivacyLedger(tmp_path / "state-holder-1").releases())
    assert set(rounds) == {1, 2, 3} and len(rounds) <= 4
