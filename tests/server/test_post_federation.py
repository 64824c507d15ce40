"""POST end to end through real processes: holders tune under DP on a registered student, unchanged; the
coordinator transfers the global prompt to the teacher and stores it in the aggregation server's registry."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fedprompt import artifact
from fedprompt.dp.ledger import PrivacyLedger
from fedprompt.local_federation import HolderSpec, LocalFederation
from fedprompt.models import zoo
from fedprompt.models.student import build_student
from tests.conftest import make_sentiment_rows


@pytest.mark.integration
def test_a_federation_on_the_student_ends_with_the_prompt_on_the_teacher(tmp_path, monkeypatch):
    from fedprompt.server.aggregation.registry import Registry
    from fedprompt.server.aggregation.store import open_store

    monkeypatch.setenv("FEDPROMPT_CACHE", str(tmp_path / "cache"))  # the daemons and the coordinator see it too
    teacher = zoo.load("tiny-llama-4l")
    student = build_student(teacher.model, [0, 3])
    student.save_pretrained(tmp_path / "student")
    teacher.tokenizer.save_pretrained(tmp_path / "student")
    zoo.register(tmp_path / "student", "tiny-student")  # as a holder does with the folder the provider ships
    student_sha = zoo.load("tiny-student").weights_sha256

    holders = []
    for i in (1, 2):
        path = tmp_path / f"holder-{i}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in make_sentiment_rows(80, seed=30 + i)))
        holders.append(HolderSpec(f"holder-{i}", path, 20.0))
    public = tmp_path / "public.jsonl"
    public.write_text("".join(json.dumps(r) + "\n" for r in make_sentiment_rows(120, seed=77)))
    with LocalFederation(tmp_path / "fed", holders) as fed:
        fed.start(
            "--model", "tiny-student",
            "--task", "reviews",
            "--set", "template=Review: {text}\nSentiment:",
            "--set", 'label_names=["negative", "positive"]',
            "--num-rounds", "2",
            "--local-steps", "2",
            "--batch-size", "8",
            "--target-epsilon", "8",
            "--min-available-nodes", "2",
            "--set", "wait_for_nodes_s=120",
            "--post-teacher", "tiny-llama-4l",
            "--post-public", str(public),
            "--post-steps", "6",
        )  # fmt: skip
        history = fed.wait(400)
    assert [r["round"] for r in history] == [0, 1, 2]
    final_weight, final_meta = artifact.load(fed.checkpoints / "round-0002")
    assert final_meta.base_model_id == "tiny-student" and final_meta.base_model_sha256 == student_sha
    for h in holders:  # the holders paid for their DP rounds on the student, and nothing for the transfer
        releases = PrivacyLedger(fed.state_dir(h.name)).releases()
        assert [r.round for r in releases] == [1, 2] and {r.mechanism for r in releases} == {"dp-sgd"}
    weight, meta = artifact.load(fed.checkpoints / "post-transfer")
    artifact.check_base_model(meta, weight, zoo.load("tiny-llama-4l"))
    assert meta.privacy == final_meta.privacy and meta.privacy["epsilon"] > 0
    assert meta.lineage["source_prompt_sha256"] == final_meta.prompt_sha256
    assert meta.lineage["source_model"] == {"id": "tiny-student", "weights_sha256": student_sha}
    assert not torch.equal(weight, final_weight)
    report = json.loads((fed.checkpoints / "post-transfer.json").read_text())
    with open_store(str(tmp_path / "fed" / "coordinator" / "registry.sqlite")) as store:
        version = Registry(store).get_version(report["version_id"])
    assert version.base_model.model_id == "tiny-llama-4l"
    assert torch.equal(torch.from_numpy(np.array(version.embeddings)), weight)
    assert version.metadata["lineage"]["method"] == "post-transfer"
    assert "POST complete" in (fed.logs / "server.log").read_text()


def test_the_coordinator_refuses_a_bad_transfer_before_the_federation_starts(tmp_path):
    from fedprompt.cli import build_parser
    from fedprompt.errors import FedPromptError
    from fedprompt.server.coordinator.cli import config_from_args, post_transfer_settings

    def settings(*extra: str):
        args = build_parser().parse_args(
            ["server", "--certs", str(tmp_path), "--state", str(tmp_path), "--model", "tiny-llama-4l", *extra]
        )
        return post_transfer_settings(args, config_from_args(args))

    assert settings() is None
    cfg = settings("--post-teacher", "tiny-llama-4l", "--post-public", "vader-amazon", "--post-alpha", "0.25")
    assert (cfg.alpha, cfg.steps) == (0.25, 200)
    for extra, message in [
        (("--post-teacher", "tiny-llama-4l"), "needs both"),
        (("--post-alpha", "0.5"), "belong to a transfer"),
        (("--post-teacher", "no-such-model", "--post-public", "vader-amazon"), "neither a known model"),
        (("--post-teacher", "tiny-llama-4l", "--post-public", "no-such-set"), "no-such-set"),
    ]:
        with pytest.raises(FedPromptError, match=message):
            settings(*extra)
