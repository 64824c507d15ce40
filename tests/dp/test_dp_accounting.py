"""Accountants against published and independently computed values; noise calibration; DP settings."""

from __future__ import annotations

import math

import numpy as np
import pytest
from opacus.accountants.rdp import RDPAccountant
from scipy.optimize import brentq
from scipy.stats import norm

from fedprompt.dp.accounting import calibrate_noise, epsilon
from fedprompt.dp.engine import DPConfig, plan


def test_rdp_matches_opacus_published_value():
    # opacus/tests/accountants_test.py: sigma 1.5, q 0.04, 90 epochs, delta 1e-5 -> 7.32911117143
    assert epsilon("rdp", [(1.5, 0.04, int(90 / 0.04))], delta=1e-5) == pytest.approx(7.32911117143, abs=1e-9)


def test_calibration_matches_opacus_published_value():
    # opacus/tests/accountants_test.py: epsilon 8, delta 1e-5, q 0.04, 90 epochs -> sigma 1.425307617 (older
    # search); Opacus 1.6 bisects to within epsilon_tolerance = 0.01 of the target, from below.
    sigma = calibrate_noise(target_epsilon=8, delta=1e-5, sample_rate=0.04, steps=2250, accountant="rdp")
    assert sigma == pytest.approx(1.425307617, abs=0.015)
    spent = epsilon("rdp", [(sigma, 0.04, 2250)], delta=1e-5)
    assert 8 - 0.01 <= spent <= 8


def test_rdp_of_the_plain_gaussian_matches_the_closed_form():
    """Without subsampling, the Gaussian's RDP is T*alpha/(2 sigma^2); Opacus converts with
    eps = min_alpha rdp + log((alpha-1)/alpha) - (log delta + log alpha)/(alpha-1) (Balle et al. 2020)."""
    sigma, steps, delta = 3.0, 50, 1e-6
    alphas = np.array(RDPAccountant.DEFAULT_ALPHAS, dtype=float)
    rdp = steps * alphas / (2 * sigma**2)
    eps = rdp + np.log((alphas - 1) / alphas) - (math.log(delta) + np.log(alphas)) / (alphas - 1)
    assert epsilon("rdp", [(sigma, 1.0, steps)], delta=delta) == pytest.approx(float(eps.min()), rel=1e-9)


def test_prv_matches_the_exact_gaussian_curve():
    """T compositions of the Gaussian mechanism are a Gaussian with mu = sqrt(T)/sigma (Balle & Wang 2018):
    delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)."""
    sigma, steps, delta = 10.0, 100, 1e-5
    mu = math.sqrt(steps) / sigma

    def gap(eps: float) -> float:
        return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2) - delta

    exact = brentq(gap, 1e-6, 50)
    got = epsilon("prv", [(sigma, 1.0, steps)], delta=delta)
    assert got == pytest.approx(exact, abs=0.03)
    assert got >= exact - 0.01  # an accountant may over-state epsilon, never under-state it


def test_composition_is_the_same_whether_split_or_not_and_grows():
    one = epsilon("rdp", [(1.0, 0.01, 200)], delta=1e-5)
    split = epsilon("rdp", [(1.0, 0.01, 120), (1.0, 0.01, 80)], delta=1e-5)
    assert one == pytest.approx(split, rel=1e-12)
    values = [epsilon("rdp", [(1.0, 0.01, t)], delta=1e-5) for t in (10, 100, 1000)]
    assert values == sorted(values) and values[0] > 0
    assert epsilon("rdp", [], delta=1e-5) == 0.0


def test_a_ledgers_rounds_compose_as_opacus_composes_them_entry_by_entry():
    # rounds of one run repeat one (sigma, q): they are merged into one entry, which must change nothing
    history = [(1.0, 0.01, 4)] * 30 + [(0.8, 0.02, 3)] * 5 + [(1.0, 0.01, 2)]
    acc = RDPAccountant()
    acc.history = list(history)
    assert epsilon("rdp", history, delta=1e-5) == pytest.approx(acc.get_epsilon(1e-5), rel=1e-12)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_plan_calibrates_to_the_target(accountant):
    p = plan(DPConfig(target_epsilon=8.0, accountant=accountant), num_examples=11752, batch_size=32, steps=200)
    assert p.delta == pytest.approx(1 / (2 * 11752))
    assert p.sample_rate == pytest.approx(1 / 368)  # Opacus: 1 / number of batches
    assert 7.9 <= p.epsilon <= 8.0
    assert 0.3 < p.noise_multiplier < 1.0


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({}, "exactly one"),
        ({"target_epsilon": 8, "noise_multiplier": 1.0}, "exactly one"),
        ({"target_epsilon": -1}, "target_epsilon"),
        ({"target_epsilon": 8, "delta": 1.5}, "delta"),
        ({"target_epsilon": 8, "max_grad_norm": 0}, "max_grad_norm"),
        ({"target_epsilon": 8, "accountant": "moments"}, "accountant"),
        ({"noise_multiplier": float("inf")}, "noise_multiplier"),
    ],
)
def test_dp_config_rejects_bad_settings(kwargs, field):
    with pytest.raises(ValueError, match=field):
        DPConfig(**kwargs)


def test_a_weak_delta_is_flagged():
    with pytest.warns(UserWarning, match="not below 1/n"):
        plan(DPConfig(target_epsilon=8, delta=0.01), num_examples=200, batch_size=8, steps=10)
