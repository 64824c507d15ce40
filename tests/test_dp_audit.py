"""The one-run privacy audit: its statistics, and its verdict on a private and a broken mechanism."""

from __future__ import annotations

import math

import pytest
from scipy.stats import binom

from fedprompt.dp.audit import audit_dp_sgd, epsilon_lower_bound, p_value
from fedprompt.dp.engine import DPConfig, PrivacyPlan, plan
from fedprompt.runtime import Runtime
from fedprompt.training import Session, TuneConfig


def test_p_value_without_delta_is_the_binomial_tail():
    q = 1 / (1 + math.exp(-1.0))
    assert p_value(1000, 100, 70, 1.0, 0.0) == pytest.approx(binom.sf(69, 100, q))


def test_p_value_grows_with_delta_and_epsilon():
    base = p_value(1000, 100, 80, 1.0, 0.0)
    assert p_value(1000, 100, 80, 1.0, 1e-5) > base
    assert p_value(1000, 100, 80, 2.0, 0.0) > base


def test_lower_bounds():
    # all 1000 guesses right: the largest epsilon one run with 1000 canaries can certify is about ln(1/(1-q))
    perfect = epsilon_lower_bound(1000, 1000, 1000, 0.0)
    q = 0.05 ** (1 / 1000)
    assert perfect == pytest.approx(math.log(q / (1 - q)), rel=1e-3)
    assert epsilon_lower_bound(1000, 200, 100, 1e-5) == 0.0  # coin flipping certifies nothing
    bounds = [epsilon_lower_bound(1000, 200, v, 1e-5) for v in (120, 150, 180)]
    assert bounds == sorted(bounds) and bounds[0] > 0


def test_audit_separates_a_private_from_a_broken_mechanism(tiny_llama, sentiment_file):
    session = Session(tiny_llama, str(sentiment_file), runtime=Runtime.create("cpu", "fp32"))
    cfg = TuneConfig(prompt_length=16, steps=40, batch_size=32, eval_every=0, init="vocab", lr=0.01)
    n = len(session.dataset.split("train"))
    # the audit needs m * delta << 1 (its bound carries a 2 m delta term), hence the explicit small delta
    dp_plan = plan(DPConfig(target_epsilon=2.0, delta=1e-6), num_examples=n, batch_size=32, steps=40)
    private = audit_dp_sgd(session, cfg, dp_plan, canaries=400, guesses_per_side=40)
    broken = PrivacyPlan(0.0, dp_plan.sample_rate, 40, dp_plan.delta, math.inf, "rdp", 1e6, n)
    leaky = audit_dp_sgd(session, cfg, broken, canaries=400, guesses_per_side=40, canary_norm=100.0)
    assert private.epsilon_lower_bound <= dp_plan.epsilon
    # Without clipping and noise every sampled canary stands out. A miss needs an included canary that
    # Poisson sampling (q = 1/6) never drew in 40 steps ((5/6)^40 = 0.07 % each, ~0.14 of ~200) and that
    # then ranks among the 40 lowest: about 0.03 misses expected per run, so at most one is allowed.
    assert leaky.correct >= leaky.guesses - 1
    assert leaky.epsilon_lower_bound > 2.5 > private.epsilon_lower_bound
