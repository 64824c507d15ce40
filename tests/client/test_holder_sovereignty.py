"""Holder sovereignty, played by the attacker against real processes on loopback (tiny model).

- An outsider who has only the public ``ca.crt`` and can reach the coordinator's port cannot list runs, register a
  node key or submit a run: the front forwards the Fleet API only, and the SuperLink itself listens on loopback.
- The coordinator operator itself cannot make a holder run code: a Flower App whose ClientApp writes a marker
  file is refused by every holder's runner, and the marker never appears.
- A coordinator cannot switch a holder's privacy off or stretch it: a run without DP, with ε above a holder's
  cap, δ above its ceiling, in the clear where the holder requires secure aggregation, or with more evaluations
  than the holder allows, is refused by the holder before it touches its data, and its ledger records nothing
  for what it refused.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_sentiment_rows, wait_for

from fedprompt import flower_procs as fp
from fedprompt.dp.ledger import PrivacyLedger
from fedprompt.local_federation import HolderSpec, LocalFederation

pytestmark = pytest.mark.integration

SETTINGS = (
    "--model", "tiny-llama",
    "--task", "rotten-tomatoes",
    "--local-steps", "1",
    "--batch-size", "8",
    "--target-epsilon", "8",
    "--num-rounds", "2",
    "--min-train-nodes", "2",
    "--min-available-nodes", "4",
    "--round-timeout-s", "60",
    "--set", "wait_for_nodes_s=180",
)  # fmt: skip

MARKER_APP = """
import json
from pathlib import Path
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

MARKER = Path({marker!r})
client = ClientApp()


@client.train()
def train(message, context):
    MARKER.write_text(json.dumps(dict(context.node_config)))  # what an attacker's code would read
    return Message(RecordDict({{"stolen": ConfigRecord({{"ok": 1}})}}), reply_to=message)


server = ServerApp()


@server.main()
def main(grid: Grid, context) -> None:
    import time
    deadline = time.monotonic() + 120
    while len(grid.get_node_ids()) < 4 and time.monotonic() < deadline:
        time.sleep(1)
    msgs = [Message(RecordDict({{"config": ConfigRecord({{"x": 1}})}}), dst_node_id=n, message_type=MessageType.TRAIN)
            for n in grid.get_node_ids()]
    replies = [{{"error": r.error.reason if r.has_error() else None}} for r in grid.send_and_receive(msgs, timeout=90)]
    Path({replies!r}).write_text(json.dumps(replies))
"""


def _holders(tmp_path: Path) -> list[HolderSpec]:
    specs = []
    for i in range(1, 5):
        path = tmp_path / f"holder-{i}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in make_sentiment_rows(80, seed=30 + i)))
        specs.append(HolderSpec(f"holder-{i}", path, 20.0))
    return specs


# each holder's own policy (flags of fedprompt client); none of them is the coordinator's to change
POLICIES = {
    "holder-1": ("--require-secure-aggregation",),
    "holder-2": ("--max-run-epsilon", "4"),
    "holder-3": ("--max-delta", "1e-6"),
    "holder-4": ("--allow-evaluations", "1"),
}


def _listening_addresses(port: int) -> set[str]:
    """Local addresses with a TCP socket listening on ``port`` (Linux /proc)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, hexport = local.rsplit(":", 1)
            if state == "0A" and int(hexport, 16) == port:  # 0A: LISTEN
                found.add(addr)
    return found


def _outsider_env(tmp_path: Path, address: str, ca: Path) -> dict[str, str]:
    home = tmp_path / "outsider-flwr"
    fp.write_cli_config(home, address, ca)
    return fp.flower_env(home)


def _marker_app(tmp_path: Path) -> tuple[Path, Path, Path]:
    app = tmp_path / "marker-app"
    app.mkdir()
    marker, replies = tmp_path / "MARKER", tmp_path / "marker-replies.json"
    (app / "markerapp.py").write_text(MARKER_APP.format(marker=str(marker), replies=str(replies)))
    (app / "LICENSE").write_text("test\n")
    (app / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n\n'
        '[project]\nname = "markerapp"\nversion = "1.0.0"\nlicense = {file = "LICENSE"}\n'
        'dependencies = ["flwr>=1.41.0"]\n\n[tool.hatch.build.targets.wheel]\npackages = ["."]\n\n'
        '[tool.flwr.app]\npublisher = "outsider"\n\n'
        '[tool.flwr.app.components]\nserverapp = "markerapp:server"\nclientapp = "markerapp:client"\n'
    )
    return app, marker, replies


def test_outsiders_coordinators_and_bundles_cannot_override_the_holders(tmp_path):
    superlink_port = fp.free_port()
    with LocalFederation(tmp_path / "fed", _holders(tmp_path)) as fed:
        # run 1: the coordinator switches DP off
        fed.start_server(*SETTINGS, "--no-dp", "--keep-running", "--superlink-port", str(superlink_port))
        for h in fed.holders:
            fed.start_holder(h, *POLICIES[h.name])
        wait_for(lambda: len(fed.history()) == 3, 300, "the run without DP", fed.logs)
        no_dp = fed.history()

        # the outsider: the public CA certificate and the coordinator's address, nothing else
        outsider = _outsider_env(tmp_path, f"127.0.0.1:{fed.port}", fed.certs / "ca.crt")
        for args in (
            ["ls", fp.FEDERATION],
            ["supernode", "register", str(fed.certs / "nodes" / "holder-1" / "node.pub"), fp.FEDERATION],
            ["run", str(fp.app_dir()), fp.FEDERATION],
        ):
            with pytest.raises(Exception, match="404"):
                fp.flwr(args, outsider)
        assert _listening_addresses(superlink_port) == {"0100007F"}  # 127.0.0.1: the SuperLink is loopback only

        # the coordinator operator itself submits an app whose ClientApp would read the holder's node config
        operator = fp.flower_env(fed.out / "coordinator" / "flwr" / "cli")
        app, marker, replies = _marker_app(tmp_path)
        fp.flwr(["run", str(app), fp.FEDERATION], operator)
        wait_for(replies.exists, 240, "the marker app's replies", fed.logs)
        answers = json.loads(replies.read_text())

        # run 2 (as the operator): DP on at epsilon 8 and delta 1e-5, in the clear, with evaluations
        config = {
            "checkpoint_dir": str(tmp_path / "run2"),
            "model": "tiny-llama",
            "local_steps": 1,
            "batch_size": 8,
            "num_rounds": 2,
            "min_train_nodes": 1,
            "min_available_nodes": 4,
            "round_timeout_s": 60.0,
            "evaluate": True,
        }
        toml = tmp_path / "run2.toml"
        toml.write_text("".join(f"{k} = {fp.toml_value(v)}\n" for k, v in config.items()))
        fp.flwr(["run", str(fp.app_dir()), fp.FEDERATION, "--run-config", str(toml)], operator)
        state = tmp_path / "run2" / "state.json"
        wait_for(lambda: state.exists() and len(json.loads(state.read_text())["history"]) == 3, 300, "run 2", fed.logs)
        run2 = json.loads(state.read_text())["history"]
        logs = {h.name: fed.tail(h.name, 400) for h in fed.holders}

    # run 1: every holder refused to train without DP, and released nothing
    for rec in no_dp[1:]:
        assert not rec.get("merged") and set(rec["failed"]) == set(POLICIES), rec
        assert all("rule require_dp" in why for why in rec["failed"].values()), rec

    # the marker app: refused by every holder's runner, never executed
    assert not marker.exists()
    assert len(answers) == 4 and all("rule installed_app" in a["error"] for a in answers), answers
    for name, log in logs.items():
        assert "rule installed_app" in log, name

    # run 2: each holder's own rule, named in its refusal
    rules = {"holder-1": "require_secure_aggregation", "holder-2": "max_run_epsilon", "holder-3": "max_delta"}
    for rec in run2[1:]:
        assert set(rec["holders"]) == {"holder-4"}, rec  # the only holder whose policy allows this run
        for name, rule in rules.items():
            assert f"rule {rule}" in rec["failed"][name], rec
    # evaluations: off on holders 1-3; holder-4 allows one per run and refuses the rest
    assert set(run2[0]["eval_holders"]) == {"holder-4"}
    assert set(run2[1]["eval_refused"]) == set(POLICIES), run2[1]
    assert "rule max_evaluations_per_run" in run2[1]["eval_refused"]["holder-4"]

    # the ledgers: nothing for what was refused
    for name in ("holder-1", "holder-2", "holder-3"):
        assert PrivacyLedger(fed.state_dir(name)).releases() == [], name
    released = [(r.mechanism, r.round) for r in PrivacyLedger(fed.state_dir("holder-4")).releases()]
    assert released == [("gaussian-counts", 0), ("dp-sgd", 1), ("dp-sgd", 2)], released
    # the budget shows what left, evaluations included
    shown = subprocess.run(
        [sys.executable, "-m", "fedprompt.cli", "budget", "show", "--state", str(fed.state_dir("holder-4"))],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "gaussian-counts" in shown and "dp-sgd" in shown
