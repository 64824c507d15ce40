"""The privacy audit: its statistics, its ceiling, and its verdict on the real mechanism and on broken ones."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from conftest import make_sentiment_rows

from fedprompt.dp.audit import audit_dp_sgd, ceiling, epsilon_lower_bound, rate_interval
from fedprompt.dp.engine import DPConfig, plan
from fedprompt.runtime import Runtime
from fedprompt.training import Session
from fedprompt.tuning_settings import TuneConfig

DELTA = 1e-5


def test_rate_intervals_cover_the_rate():
    low, high = rate_interval(30, 100, 0.025)
    assert low < 0.3 < high and (low, high) == pytest.approx((0.2124, 0.3998), abs=1e-3)
    assert rate_interval(0, 100, 0.025)[0] == 0.0 and rate_interval(100, 100, 0.025)[1] == 1.0


def test_the_bound_of_the_same_distribution_is_zero_and_of_a_shifted_one_grows():
    rng = np.random.default_rng(0)
    same = epsilon_lower_bound(rng.normal(0, 1, 20_000), rng.normal(0, 1, 20_000), DELTA)[0]
    assert same == 0.0
    bounds = [epsilon_lower_bound(rng.normal(mu, 1, 20_000), rng.normal(0, 1, 20_000), DELTA)[0] for mu in (1, 2, 3)]
    assert bounds == sorted(bounds) and bounds[0] > 0.5


def test_the_ceiling_is_what_a_perfect_separation_certifies():
    perfect = epsilon_lower_bound(np.full(10_000, 9.0), np.full(10_000, -9.0), DELTA)[0]
    assert perfect == pytest.approx(ceiling(10_000, DELTA))
    # it grows like log(canaries): 200 guesses could never certify 8, 200,000 canaries a side can
    assert ceiling(100, DELTA) < 3 < 8 < ceiling(200_000, DELTA)


@pytest.fixture
def audit_session(tiny_llama, tmp_path):
    rows = make_sentiment_rows(32)
    split = ["train"] * 16 + ["validation", "test"] * 8
    path = tmp_path / "audit.jsonl"
    path.write_text("".join(json.dumps({**r, "split": s}) + "\n" for r, s in zip(rows, split, strict=True)))
    session = Session(tiny_llama, str(path), runtime=Runtime.create("cpu", "fp32"), max_length=32)
    cfg = TuneConfig(prompt_length=64, steps=4, batch_size=16, eval_every=0, init="vocab")
    claimed = plan(DPConfig(target_epsilon=2.0, delta=DELTA), num_examples=16, batch_size=16, steps=4)
    return session, cfg, claimed


def test_the_audit_bounds_the_real_mechanism_below_its_claim_and_catches_broken_ones(audit_session):
    """The real pipeline (clipping, noise, Poisson sampling at rate 1) stays within its claim; the same pipeline
    with a quarter of the noise is caught. (The benchmark measures the harder case: twice the claimed epsilon,
    with ten times the canaries.)"""
    session, cfg, claimed = audit_session
    assert claimed.sample_rate == 1.0
    real = audit_dp_sgd(session, cfg, claimed, claimed=claimed, canaries_per_side=20_000)
    assert real.ceiling > claimed.epsilon  # the audit could say more than the claim: it can fail
    assert real.epsilon_lower_bound <= claimed.epsilon
    quarter = replace(claimed, noise_multiplier=claimed.noise_multiplier / 4)
    caught = audit_dp_sgd(session, cfg, quarter, claimed=claimed, canaries_per_side=20_000)
    assert caught.epsilon_lower_bound > claimed.epsilon, caught
