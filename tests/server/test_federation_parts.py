"""The federation's pieces without Flower: a holder's round, merging, client-level DP, checkpoints, splits."""

from __future__ import annotations

import math

import pytest
import torch

from fedprompt.client.trainer import DP_NUM_EXAMPLES, Holder
from fedprompt.data import datasets, partition
from fedprompt.dp.accounting import epsilon
from fedprompt.dp.ledger import PrivacyLedger
from fedprompt.dp.spend import Budget
from fedprompt.errors import BudgetExceededError, ModelError
from fedprompt.protocols.rounds import LocalSettings, TaskSpec
from fedprompt.runtime import Runtime
from fedprompt.server.coordinator import checkpoint
from fedprompt.server.coordinator.config import FederationConfig
from fedprompt.server.coordinator.strategies import ClientLevelDP, FedAdam, FedAvg, weighted_mean

SENT = (("negative",), ("positive",))


def _task(loaded, **kw) -> TaskSpec:
    fields = dict(
        name="reviews",
        template="{text}\nAnswer:",
        label_names=("negative", "positive"),
        label_words=((" negative",), (" positive",)),
        init_text="Classify the sentiment.",
        model="tiny-llama",
        model_sha256=loaded.weights_sha256,
    )
    fields.update(kw)
    return TaskSpec(**fields)


def _holder(tiny_llama, sentiment_file, state, budget=50.0, **kw) -> Holder:
    PrivacyLedger.create(state, Budget(budget, 1e-3))
    return Holder(
        data=str(sentiment_file),
        state_dir=state,
        name="h1",
        model=tiny_llama,
        task=_task(tiny_llama, **kw),
        runtime=Runtime.create("cpu", "fp32"),
    )


def _settings(**kw) -> LocalSettings:
    base = dict(
        run_id="run-1",
        server_round=1,
        num_rounds=3,
        local_steps=3,
        batch_size=8,
        lr=0.05,
        target_epsilon=4.0,
        delta=0.0,
    )
    base.update(kw)
    return LocalSettings(**base)


def _global(h: Holder) -> torch.Tensor:
    return torch.randn(4, h.session.loaded.hidden_size) * 0.02


def test_dp_round_charges_the_ledger_and_reports_a_constant_count(tiny_llama, sentiment_file, tmp_path):
    h = _holder(tiny_llama, sentiment_file, tmp_path / "state")
    start = _global(h)
    s = _settings()
    out = h.train_round(start, s)
    assert out.num_examples == DP_NUM_EXAMPLES
    assert torch.allclose(out.weight - start, out.delta)
    assert out.delta.abs().max() > 0
    # trained, not sent: the spend is recorded but still a reservation (a stop now would cancel it)
    assert [(r.status, r.round, r.steps) for r in h.ledger.releases("reviews")] == [("reserved", 1, 3)]
    out.sent()
    releases = h.ledger.releases("reviews")
    assert [(r.status, r.round, r.steps) for r in releases] == [("committed", 1, 3)]
    p = h.privacy_plan(s)
    # the noise is calibrated so that all rounds together reach the run's target
    full = epsilon("rdp", [(p.noise_multiplier, p.sample_rate, s.num_rounds * s.local_steps)], delta=p.delta)
    assert full == pytest.approx(s.target_epsilon, rel=0.02)
    # the reply carries the run's bound only (the round's actual spend depends on the sampling rate, hence on n)
    assert out.metrics == {"dp": 1, "epsilon": s.target_epsilon, "steps": s.local_steps}
    first = h.ledger.run_epsilon(s.run_id, p.delta)
    assert 0 < first < s.target_epsilon
    h.train_round(out.weight, _settings(server_round=2)).sent()
    assert first < h.ledger.run_epsilon(s.run_id, p.delta) <= s.target_epsilon * 1.02


def test_the_optimiser_state_can_survive_rounds_of_one_run_only(tiny_llama, sentiment_file, tmp_path):
    h = _holder(tiny_llama, sentiment_file, tmp_path / "state")
    h.keep_optimizer_state = True
    out = h.train_round(_global(h), _settings())
    h.train_round(out.weight, _settings(server_round=2))
    (state,) = h._optimizer_states["run-1"]["state"]["state"].values()
    assert int(state["step"]) == 6  # Adam counted both rounds' steps: its moments carried over
    h.train_round(out.weight, _settings(run_id="run-2"))
    assert list(h._optimizer_states) == ["run-2"]
    (state,) = h._optimizer_states["run-2"]["state"]["state"].values()
    assert int(state["step"]) == 3


def test_over_budget_round_is_refused_before_training(tiny_llama, sentiment_file, tmp_path, monkeypatch):
    h = _holder(tiny_llama, sentiment_file, tmp_path / "state", budget=1.0)

    def boom(*a, **k):
        raise AssertionError("trained despite the refusal")

    monkeypatch.setattr("fedprompt.client.trainer.private_steps", boom)
    with pytest.raises(BudgetExceededError, match="refused before any training"):
        h.train_round(_global(h), _settings(target_epsilon=8.0, num_rounds=1))
    assert h.ledger.releases() == []


def test_failed_training_cancels_the_reservation(tiny_llama, sentiment_file, tmp_path, monkeypatch):
    h = _holder(tiny_llama, sentiment_file, tmp_path / "state")

    def crash(*a, **k):
        raise RuntimeError("out of memory")

    monkeypatch.setattr("fedprompt.client.trainer.private_steps", crash)
    with pytest.raises(RuntimeError):
        h.train_round(_global(h), _settings())
    assert h.ledger.releases() == []


def test_holder_refuses_another_model_and_bad_prompts(tiny_llama, sentiment_file, tmp_path):
    with pytest.raises(ModelError, match="weights"):
        _holder(tiny_llama, sentiment_file, tmp_path / "a", model_sha256="0" * 64)
    h = _holder(tiny_llama, sentiment_file, tmp_path / "b")
    bad = _global(h)
    bad[0, 0] = float("nan")
    with pytest.raises(Exception, match="NaN"):
        h.train_round(bad, _settings())
    with pytest.raises(Exception, match="shape"):
        h.evaluate(torch.zeros(4, 3))
    assert h.ledger.releases() == []


def test_non_private_round_and_evaluation(tiny_llama, sentiment_file, tmp_path):
    h = _holder(tiny_llama, sentiment_file, tmp_path / "state")
    out = h.train_round(_global(h), _settings(dp=False))
    assert out.num_examples == h.num_train
    assert h.ledger.releases() == []
    acc, n = h.evaluate(out.weight)
    assert n == len(h.session.dataset.split("test")) and 0 <= acc <= 1


def test_weighted_fedavg_and_server_lr():
    a, b = torch.ones(2, 3), torch.full((2, 3), 4.0)
    assert torch.allclose(weighted_mean([a, b], [3, 1]), torch.full((2, 3), 1.75))
    assert torch.allclose(FedAvg(0.5).apply(torch.zeros(2, 3), b), torch.full((2, 3), 2.0))
    with pytest.raises(ValueError):
        weighted_mean([a], [0])


def test_fedadam_moves_by_about_the_server_lr_and_keeps_state():
    opt = FedAdam(server_lr=0.01)
    x = opt.apply(torch.zeros(3), torch.tensor([1.0, -2.0, 0.0]))
    # first step: m = 0.1 g, sqrt(v) = 0.1 |g|, so the step is 0.01 * sign(g) (tau aside)
    assert torch.allclose(x, torch.tensor([0.01, -0.01, 0.0]), atol=2e-4)
    state = opt.state_dict()
    again = FedAdam(server_lr=0.01)
    again.load_state_dict(state)
    g = torch.tensor([0.5, 0.5, 0.5])
    assert torch.equal(opt.apply(x, g), again.apply(x, g))


def test_client_level_dp_clips_each_update_and_adds_calibrated_noise():
    dp = ClientLevelDP(clip_norm=1.0, noise_multiplier=2.0, sample_rate=1.0, expected_clients=4, delta=1e-3)
    big = torch.zeros(10_000)
    big[0] = 100.0
    merged, stats = dp.merge([big, torch.zeros(10_000)])
    assert stats["clipped_fraction"] == 0.5
    # the clipped update contributes 1.0 / 4; the noise has std sigma * C / expected = 0.5 per coordinate
    assert merged[1:].std().item() == pytest.approx(0.5, rel=0.05)
    assert abs(merged[0].item() - 0.25) < 4 * 0.5
    assert dp.epsilon(5) == pytest.approx(epsilon("rdp", [(2.0, 1.0, 5)], delta=1e-3))
    assert dp.epsilon(10) > dp.epsilon(5) > 0


def test_checkpoint_roundtrip_and_refusal_of_another_run(tiny_llama, tmp_path):
    from fedprompt.artifact import ArtifactMeta

    w = torch.randn(4, tiny_llama.hidden_size)
    meta = ArtifactMeta("t", "{text}", ["a", "b"], [[" a"], [" b"]], "tiny-llama", tiny_llama.weights_sha256, "o", {})
    fp = {"task": "t", "prompt_shape": [4, tiny_llama.hidden_size]}
    assert checkpoint.latest(tmp_path, fp) is None
    state = {"m": torch.ones(4, tiny_llama.hidden_size), "v": torch.zeros(4, tiny_llama.hidden_size)}
    checkpoint.save(tmp_path, checkpoint.Checkpoint(1, w, meta, state, [{"round": 1}]), fp)
    checkpoint.save(tmp_path, checkpoint.Checkpoint(2, w * 2, meta, state, [{"round": 1}, {"round": 2}]), fp)
    got = checkpoint.latest(tmp_path, fp)
    assert got.round == 2 and torch.equal(got.weight, w * 2) and torch.equal(got.strategy_state["m"], state["m"])
    assert [h["round"] for h in got.history] == [1, 2]
    with pytest.raises(Exception, match="another federation"):
        checkpoint.latest(tmp_path, {**fp, "task": "other"})


def test_label_skew_partition_covers_every_example_once(sentiment_file):
    ds = datasets.load(str(sentiment_file))
    parts = partition.partition(ds, 3, alpha=2.0, seed=0)
    for split in datasets.SPLITS:
        got = sorted(r["text"] for rows in parts for r in rows if r["split"] == split)
        assert got == sorted(e.text for e in ds.split(split))
    mixes = [sum(r["label"] == "positive" for r in rows) / len(rows) for rows in parts]
    assert max(mixes) - min(mixes) > 0.1  # not identically distributed


def test_federation_config_rejects_unknown_keys_and_relative_paths(tmp_path):
    with pytest.raises(ValueError, match="unknown run config"):
        FederationConfig.from_run_config({"checkpoint_dir": str(tmp_path), "num_round": 3})
    with pytest.raises(ValueError, match="absolute"):
        FederationConfig(checkpoint_dir="runs/x")
    cfg = FederationConfig(checkpoint_dir=str(tmp_path), task="rotten-tomatoes")
    spec = cfg.task_spec("abc")
    assert spec.label_names == ("negative", "positive") and "{text}" in spec.template
    assert TaskSpec.from_config(spec.to_config()) == spec
    assert math.isfinite(cfg.target_epsilon)


def test_federation_config_refuses_secure_aggregation_it_cannot_run(tmp_path):
    base = {"checkpoint_dir": str(tmp_path)}
    with pytest.raises(ValueError, match="needs the aggregation server"):
        FederationConfig(**base, secure_aggregation=True)
    agg = {**base, "aggregator": "127.0.0.1:9094", "aggregator_certs": str(tmp_path)}
    with pytest.raises(ValueError, match="go together"):
        FederationConfig(**base, aggregator="127.0.0.1:9094")
    with pytest.raises(ValueError, match="min_train_nodes >= 2"):
        FederationConfig(**agg, secure_aggregation=True, min_train_nodes=1, min_available_nodes=1)
    with pytest.raises(ValueError, match="client_dp"):
        FederationConfig(**agg, secure_aggregation=True, client_dp=True)
    cfg = FederationConfig(**agg, secure_aggregation=True)
    assert cfg.local_settings(run_id="r", server_round=1).secure_aggregation  # the holders keep their updates
