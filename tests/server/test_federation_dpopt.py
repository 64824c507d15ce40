"""Federated DP-OPT through real processes: a coordinator with its aggregation server and three holder daemons."""

from __future__ import annotations

import json

import pytest

from fedprompt import text_prompt
from fedprompt.dp.ledger import PrivacyLedger
from fedprompt.local_federation import HolderSpec, LocalFederation
from fedprompt.server.coordinator.dpopt import ARTIFACT_DIR, RESULT_FILE
from tests.conftest import make_sentiment_rows

pytestmark = pytest.mark.integration

DPOPT = {
    "teachers": 6,
    "shots": 2,
    "candidates": 2,
    "max_new_tokens": 4,
    "min_new_tokens": 1,
    "temperature": 0.0,
    "token_epsilon": 6.0,
    "token_delta": 1e-3,
    "holdout_fraction": 0.1,
}


def test_holders_write_candidates_score_them_with_noise_and_the_winner_is_registered(tmp_path):
    from fedprompt.server.aggregation.registry import Registry
    from fedprompt.server.aggregation.store import open_store

    holders = []
    for i in range(1, 4):
        path = tmp_path / f"holder-{i}.jsonl"
        rows = make_sentiment_rows(300, seed=20 + i)
        path.write_text("".join(json.dumps({**r, "text": f"{r['text']} ({i}-{k})"}) + "\n" for k, r in enumerate(rows)))
        holders.append(HolderSpec(f"holder-{i}", path, 20.0))
    with LocalFederation(tmp_path / "fed", holders) as fed:
        fed.start_server(
            "--model", "tiny-llama",
            "--task", "rotten-tomatoes",
            "--method", "dpopt",
            "--target-epsilon", "20",
            "--set", "delta=0.05",  # public, the toy data's size: each holder's 1/(2n) would tell its n
            "--min-available-nodes", "3",
            "--set", "dpopt_preset=quick",
            "--set", f"dpopt_settings={json.dumps(DPOPT)}",
            "--set", "wait_for_nodes_s=120",
        )  # fmt: skip
        for h in holders:  # the toy data needs a large delta: each holder raises its own ceiling to allow it
            fed.start_holder(h, "--max-delta", "0.05")
        fed.wait(400)
    result = json.loads((fed.checkpoints / RESULT_FILE).read_text())
    assert result["failed"] == {} and result["scorers"] == 3
    assert set(result["holders"]) == {"holder-1", "holder-2", "holder-3"}
    assert result["chosen"] in result["candidates"]
    assert len(set(result["candidates"])) == len(result["candidates"])  # each distinct text is scored once
    assert result["noisy_score_sums"][result["candidates"].index(result["chosen"])] == max(result["noisy_score_sums"])
    text, meta = text_prompt.load(fed.checkpoints / ARTIFACT_DIR)
    assert text == result["chosen"]
    for name, h in result["holders"].items():
        # a holder reports only the run's public bound; its ledger holds max(generation's projection, noisy
        # scores) for disjoint data, never above the target
        assert (h["epsilon"], h["delta"]) == (20.0, 0.05) and not {"epsilon_generation", "epsilon_scores"} & set(h)
        releases = PrivacyLedger(fed.state_dir(name)).releases()
        assert [(r.mechanism, r.status) for r in releases] == [("dp-opt-federated", "committed")]
        assert 0 < releases[0].epsilon <= 20.0 + 1e-6
    assert (meta.privacy["epsilon"], meta.privacy["delta"]) == (20.0, 0.05)
    # the winner is a text version in the aggregation server's registry
    with open_store(str(tmp_path / "fed" / "coordinator" / "registry.sqlite")) as store:
        version = Registry(store).get_version(result["version_id"])
    assert version.text == text and version.embeddings is None
    assert version.metadata["privacy"]["mechanism"] == "dp-opt-federated"
