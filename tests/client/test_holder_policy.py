"""The holder's policy: every rule refuses before any example is read, names itself, leaks none of the holder's
numbers to the coordinator, and leaves the ledger unchanged."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import make_sentiment_rows, round_config

from fedprompt.client.policy import HolderPolicy, PolicyViolation
from fedprompt.client.service import HolderService
from fedprompt.dp.ledger import PrivacyLedger
from fedprompt.dp.spend import Budget
from fedprompt.errors import FedPromptError

N = 64  # the holder's training examples (80 rows less the held-out splits)


@pytest.fixture
def holder(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_sentiment_rows(80)))
    state = tmp_path / "state"
    PrivacyLedger.create(state, Budget(30.0, 1e-3))
    return data, state


def _config(tiny_llama, **kw) -> dict:
    return round_config(tiny_llama, **{"local_steps": 1, **kw})


def _service(holder, **policy) -> HolderService:
    data, state = holder
    return HolderService(
        data=str(data),
        state_dir=state,
        name="h",
        num_examples=N,
        policy=HolderPolicy(**policy),
        device="cpu",
        precision="fp32",
    )


@pytest.mark.parametrize(
    ("policy", "settings", "rule"),
    [
        ({}, {"dp": False}, "require_dp"),
        ({"max_run_epsilon": 4.0}, {"target_epsilon": 8.0}, "max_run_epsilon"),
        ({}, {"delta": 0.5 / N + 1e-6}, "max_delta"),  # the default ceiling is 1/(2n) of the holder's own n
        ({"max_delta": 1e-6}, {"delta": 1e-5}, "max_delta"),
        ({"require_secure_aggregation": True}, {"secure_aggregation": False}, "require_secure_aggregation"),
    ],
)
def test_each_rule_refuses_training_before_any_release(tiny_llama, holder, policy, settings, rule):
    service = _service(holder, **policy)
    prompt = np.zeros((4, tiny_llama.hidden_size), np.float32)
    reply, arr = service.handle("train", _config(tiny_llama, **settings), prompt)
    assert not reply["ok"] and arr is None
    assert f"rule {rule}" in reply["reason"]
    # nothing of the holder's own: not its n, not its 1/(2n) ceiling
    assert str(N) not in reply["reason"] and f"{0.5 / N:g}" not in reply["reason"]
    assert PrivacyLedger(holder[1]).releases() == []


def test_allowed_runs_train_and_the_cap_counts_the_whole_run(tiny_llama, holder):
    service = _service(holder, max_run_epsilon=9.0)
    prompt = np.zeros((4, tiny_llama.hidden_size), np.float32)
    assert service.handle("train", _config(tiny_llama), prompt)[0]["ok"]  # round 1 of 2 at target 8
    assert service.handle("train", _config(tiny_llama, server_round=2), prompt)[0]["ok"]
    # a coordinator that replays round 2 (or asks for more rounds) spends beyond the run's target: refused
    again, _ = service.handle("train", _config(tiny_llama, server_round=2), prompt)
    assert not again["ok"] and "rule max_run_epsilon" in again["reason"]
    assert len(PrivacyLedger(holder[1]).releases()) == 2


def test_no_dp_runs_need_the_holders_explicit_opt_out(tiny_llama, holder):
    service = _service(holder, require_dp=False)
    prompt = np.zeros((4, tiny_llama.hidden_size), np.float32)
    reply, delta = service.handle("train", _config(tiny_llama, dp=False), prompt)
    assert reply["ok"] and delta.shape == prompt.shape
    assert reply["metrics"]["dp"] == 0 and reply["metrics"]["num_examples"] == N


def test_evaluation_is_off_by_default_and_each_answer_is_charged(tiny_llama, holder):
    prompt = np.zeros((4, tiny_llama.hidden_size), np.float32)
    off, _ = _service(holder).handle("evaluate", _config(tiny_llama), prompt)
    assert not off["ok"] and "rule max_evaluations_per_run" in off["reason"]
    assert PrivacyLedger(holder[1]).releases() == []
    service = _service(holder, max_evaluations_per_run=3, evaluation_noise=5.0)
    answers = [service.handle("evaluate", _config(tiny_llama), prompt)[0] for _ in range(4)]
    assert [a["ok"] for a in answers] == [True, True, True, False]
    counts = [a["metrics"]["examples"] for a in answers[:3]]
    assert len(set(counts)) == 3  # noisy: the true test-set size (8) is never released as such
    releases = PrivacyLedger(holder[1]).releases()
    assert [r.mechanism for r in releases] == ["gaussian-counts"] * 3
    assert all(r.noise_multiplier == pytest.approx(5.0 / np.sqrt(2)) and r.sample_rate == 1.0 for r in releases)


def test_secure_rounds_smaller_than_the_policy_allows_are_refused_before_training(tiny_llama, holder):
    from fedprompt.protocols import aggregator_pb2, secagg_pb2

    prompt = np.zeros((4, tiny_llama.hidden_size), np.float32)
    setup = secagg_pb2.SecAggSetup(
        round_id="x", client_index=1, num_clients=3, neighbours=[2, 3], threshold=3, modulus_bits=32,
        quant_bits=28, clip_range=1.0, vector_length=prompt.size, node_names={1: "h1", 2: "h2", 3: "h3"},
    )  # fmt: skip

    class FirstAnswer:  # the aggregation server as far as its first answer: the setup of a round of three
        declined = False

        def exchange(self, stage, message=None):
            return aggregator_pb2.SecAggExchangeResponse(message=secagg_pb2.SecAggMessage(setup=setup))

        def decline(self):
            self.declined = True

    service = _service(holder, min_secure_cohort=4)
    service.transport = FirstAnswer()
    before = PrivacyLedger(holder[1]).spent().epsilon
    config = _config(tiny_llama, secure_aggregation=True) | {"secure_round_id": "x"}
    reply, _ = service.handle("train", config, prompt)
    assert not reply["ok"] and "rule min_secure_cohort" in reply["reason"]
    assert service.transport.declined  # the others need not wait for this holder
    assert PrivacyLedger(holder[1]).spent().epsilon == before  # refused before any training: nothing charged


def test_policy_file_and_flags(tmp_path):
    (tmp_path / "policy.toml").write_text("max_run_epsilon = 6\nallow_no_dp = true\nmax_evaluations_per_run = 2\n")
    p = HolderPolicy.load(tmp_path)
    assert p.max_run_epsilon == 6 and p.require_dp is False and p.max_evaluations_per_run == 2
    assert HolderPolicy.load(tmp_path, max_run_epsilon=3.0, require_dp=None).max_run_epsilon == 3.0  # flag wins
    assert HolderPolicy.load(tmp_path / "none").require_dp  # no file: the strict defaults
    (tmp_path / "policy.toml").write_text("max_run_epsilon = 6\nsecure = true\n")
    with pytest.raises(FedPromptError, match="unknown policy setting"):
        HolderPolicy.load(tmp_path)
    (tmp_path / "policy.toml").write_text("min_secure_cohort = 2\n")
    with pytest.raises(FedPromptError, match="min_secure_cohort"):
        HolderPolicy.load(tmp_path)
    (tmp_path / "policy.toml").write_text("max_run_epsilon = [")
    with pytest.raises(FedPromptError, match="TOML"):
        HolderPolicy.load(tmp_path)
    with pytest.raises(PolicyViolation, match="rule max_delta"):
        HolderPolicy().resolved(100).check_delta(0.01)
