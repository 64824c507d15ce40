"""The federation for real: `fedprompt server` (a Flower SuperLink with TLS and node authentication) and
`fedprompt client` daemons (SuperNodes) on loopback, with the tiny model.

Each test starts real processes in their own process groups and ends them, whatever happens.
"""

from __future__ import annotations

import json
import signal

import pytest
import torch
from conftest import make_sentiment_rows, wait_for

from fedprompt import artifact
from fedprompt import flower_procs as fp
from fedprompt.dp.ledger import PrivacyLedger
from fedprompt.local_federation import HolderSpec, LocalFederation

pytestmark = pytest.mark.integration

TARGET_EPS = 8.0


@pytest.fixture
def holders(tmp_path) -> list[HolderSpec]:
    specs = []
    for i in range(1, 5):
        rows = make_sentiment_rows(80, seed=10 + i)
        path = tmp_path / f"holder-{i}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        specs.append(HolderSpec(f"holder-{i}", path, 20.0))
    return specs


SETTINGS = (
    "--model", "tiny-llama",
    "--task", "rotten-tomatoes",
    "--local-steps", "3",
    "--batch-size", "8",
    "--lr", "0.05",
    "--target-epsilon", str(TARGET_EPS),
    "--min-train-nodes", "2",
    "--set", "wait_for_nodes_s=120",
)  # fmt: skip


def test_rounds_go_on_without_a_killed_holder_and_an_over_budget_one(tmp_path, holders):
    holders[2] = HolderSpec("holder-3", holders[2].data, 1.0)  # cannot afford a single round
    with LocalFederation(tmp_path / "fed", holders) as fed:
        fed.start(*SETTINGS, "--num-rounds", "3", "--min-available-nodes", "4", "--round-timeout-s", "25")
        wait_for(lambda: len(fed.history()) >= 2, 240, "round 1", fed.logs)
        fed.clients["holder-4"].send_signal(signal.SIGKILL)  # the daemon dies; its SuperNode follows (PDEATHSIG)
        history = fed.wait(300)
    ckpt = fed.checkpoints
    assert [r["round"] for r in history] == [0, 1, 2, 3]
    for rec in history[1:]:
        assert rec["merged"], rec
        assert {"holder-1", "holder-2"} <= set(rec["holders"]), rec
        assert "budget" in rec["failed"]["holder-3"].lower() or "refused" in rec["failed"]["holder-3"], rec
    assert "holder-4" in history[1]["holders"]
    assert "holder-4" in history[2]["failed"] and "holder-4" not in history[2]["holders"]
    # the node that missed round 2 is not sent round 3 (no second timeout for a dead holder)
    assert history[2]["sampled"] == 4 and history[3]["sampled"] == 3 and "holder-4" not in history[3]["failed"]

    # the global prompt moved in every round
    weights = [artifact.load(ckpt / f"round-{r:04d}")[0] for r in (1, 2, 3)]
    assert not torch.equal(weights[0], weights[1]) and not torch.equal(weights[1], weights[2])
    _, meta = artifact.load(ckpt / "round-0003")
    assert meta.privacy["per_holder"]["holder-1"]["epsilon"] == pytest.approx(TARGET_EPS, rel=0.02)

    # every ledger holds exactly what was released
    for h in ("holder-1", "holder-2"):
        ledger = PrivacyLedger(fed.state_dir(h))
        releases = ledger.releases()
        assert [(r.round, r.status) for r in releases] == [(k, "committed") for k in (1, 2, 3)]
        # the run's releases compose to its target at the run's (public) delta
        assert ledger.run_epsilon(releases[0].run_id, 1e-5) == pytest.approx(TARGET_EPS, rel=0.02)
    assert PrivacyLedger(fed.state_dir("holder-3")).releases() == []
    killed = PrivacyLedger(fed.state_dir("holder-4")).releases()
    assert killed[0].round == 1 and killed[0].status == "committed"


def test_a_restarted_coordinator_resumes_from_its_last_checkpoint(tmp_path, holders):
    settings = (*SETTINGS, "--num-rounds", "3", "--min-available-nodes", "2", "--round-timeout-s", "60")
    with LocalFederation(tmp_path / "fed", holders[:2]) as fed:
        fed.start(*settings)
        wait_for(lambda: len(fed.history()) >= 2, 240, "round 1", fed.logs)
        first_server = fed.server
        fp.stop(first_server)  # the coordinator stops (SIGTERM) after round 1
        assert first_server.returncode != 0
        first = fed.history()
        assert first[-1]["round"] in (1, 2)
        fed.start_server(*settings, log="server-restarted.log")
        history = fed.wait(300)
    assert [r["round"] for r in history] == [0, 1, 2, 3]
    assert history[: len(first)] == first  # the rounds before the restart were kept, not redone
    # a round interrupted by the restart is run again, and charged again if the holder had trained
    rounds = sorted(r.round for r in PrivacyLedger(fed.state_dir("holder-1")).releases())
    assert set(rounds) == {1, 2, 3} and len(rounds) <= 4


def test_fedadam_with_client_level_dp_through_flower(tmp_path, holders):
    settings = (*SETTINGS, "--num-rounds", "2", "--min-available-nodes", "2", "--round-timeout-s", "60")
    with LocalFederation(tmp_path / "fed", holders[:2]) as fed:
        fed.start(*settings, "--strategy", "fedadam", "--client-dp", "--set", "client_noise_multiplier=1.5")
        history = fed.wait(300)
    assert [r["round"] for r in history] == [0, 1, 2]
    assert all(r["merged"] and r["client_level_epsilon"] > 0 for r in history[1:])
    assert history[2]["client_level_epsilon"] > history[1]["client_level_epsilon"]
    weight, meta = artifact.load(fed.checkpoints / "round-0002")
    assert meta.privacy["client_level"]["unit"] == "holder"
    assert meta.privacy["client_level"]["epsilon"] == pytest.approx(history[2]["client_level_epsilon"])
    assert not torch.equal(weight, artifact.load(fed.checkpoints / "round-0000")[0])
    state = fed.checkpoints / "strategy-0002.safetensors"
    assert state.stat().st_size > 1000  # FedAdam's moments are checkpointed for a resume


def test_secure_aggregation_rounds_store_every_global_prompt_in_the_registry(tmp_path, holders):
    from fedprompt.server.aggregation.registry import Registry
    from fedprompt.server.aggregation.store import open_store

    with LocalFederation(tmp_path / "fed", holders[:3]) as fed:
        fed.start(*SETTINGS, "--num-rounds", "2", "--min-available-nodes", "3", "--secure-aggregation")
        history = fed.wait(300)
    # the coordinator stopped its aggregation server at the end; its store stays
    with open_store(str(tmp_path / "fed" / "coordinator" / "registry.sqlite")) as store:
        registry = Registry(store)
        versions = {v.version_id: v for v in registry.list_versions()}
        final = registry.get_version(history[-1]["version_id"])
        rounds = store.dump()["rounds"]
        assert store.dump()["updates"] == []  # no holder's update was ever stored, or sent, in the clear
    assert [r["round"] for r in history] == [0, 1, 2]
    assert len(rounds) == 2
    for rec in history[1:]:
        assert rec["merged"] and rec["secure_contributors"] == 3, rec
        assert set(rec["holders"]) == {"holder-1", "holder-2", "holder-3"}
    # every round's global prompt is a version, each the child of the one before
    chain = [r["version_id"] for r in history]
    assert set(chain) <= set(versions) and len(set(chain)) == 3
    assert [versions[v].parent_id or None for v in chain] == [None, chain[0], chain[1]]
    weight, meta = artifact.load(fed.checkpoints / "round-0002")
    assert torch.equal(torch.from_numpy(final.embeddings), weight)
    assert final.metadata["privacy"]["epsilon"] == meta.privacy["epsilon"] > 0
    # the global prompt moved, by the mean of updates the coordinator never saw one by one
    first = artifact.load(fed.checkpoints / "round-0000")[0]
    assert not torch.equal(first, weight)
