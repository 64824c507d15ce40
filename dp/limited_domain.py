"""DP-OPT's token release (Hong et al., ICLR 2024): the limited-domain mechanism of Durfee and Rogers (2019)
over the votes of an ensemble of teachers, and its privacy accounting.

Each teacher (an in-context learner fed a disjoint group of private demonstrations) proposes one next token.
The release looks only at the ``k_bar`` most voted tokens: it adds Gumbel noise to their counts and to a
threshold ``THRESHOLD_MARGIN`` above the (k̄+1)-th count plus ln(min(Δ, k̄, V − k̄)/δ₀)/ε', and outputs the noisy
winner if it beats the noisy threshold, otherwise nothing (the caller may retry: each try is a query and is
accounted).

The margin is 2, not Durfee and Rogers' 1: their threshold is for counts that move one way, but a moved vote
lowers one top-k̄ count and raises the (k̄+1)-th, so the threshold itself moves by 1 while a token at the
boundary moves by 1 the other way: with a margin of 1 a token can sit at h(k̄+1) + 2 on one histogram and be
outside the domain on its neighbour, and the release's δ exceeds δ₀ (2.1 δ₀ at ε₀ = 3 by exact computation).
:meth:`LimitedDomain.distribution` gives the release's exact output distribution (Gumbel-max is a softmax), and
``tests/dp/test_dp_limited_domain.py`` checks (ε₀, δ₀) over every pair of neighbouring histograms of small
vocabularies exactly, boundary crossings included, and that a margin of 1 fails it.

One private example sits in one teacher, whose vote can move from one token to another: Δ = 2 counts
change by 1, in opposite directions. Report-noisy-max with Gumbel(1/ε') is ε'-DP only when all counts move
the same way; a moved vote costs 2ε'. DP-OPT's code uses Gumbel(1/ε₀) and accounts ε₀ per token: on the
neighbouring histograms of ``tests/dp/test_dp_limited_domain.py`` that release put 3.8 times more mass on one
token than its neighbour did, above e^ε₀ = 2.7. fedprompt uses ε' = ε₀/2 (scale 2/ε₀), so a token release
is (ε₀, δ₀)-DP under the add/remove-one-example relation the rest of fedprompt uses.

Accounting: each query is ε₀-DP (with probability 1 − δ₀), and an ε₀-DP mechanism has RDP
min(αε₀²/2, log((sinh(αε₀) − sinh((α−1)ε₀)) / sinh ε₀) / (α−1)) (Bun and Steinke 2016; the second term is
the divergence of randomized response, which attains it), as in DP-OPT's code; the teachers' data is a Poisson
subsample of rate q, amplified by the general upper bound for Poisson-subsampled RDP (Zhu and Wang 2019,
Theorem 6) at the rate q' = q(1−δ₀)/(1−qδ₀) (the δ₀ part is paid separately: q·T·δ₀ over T queries);
queries compose additively in RDP and convert to (ε, δ₁) by Balle et al. (2020).
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

from fedprompt.errors import ConfigError

L0_SENSITIVITY = 2
THRESHOLD_MARGIN = 2  # see the module docstring: 1 (Durfee-Rogers) is not enough for a moved vote
ORDERS = tuple(range(2, 257))


def gumbel(rng: random.Random, scale: float) -> float:
    u = rng.random()
    while u <= 0.0:  # random() is in [0, 1): log(0) must not happen
        u = rng.random()
    return -scale * math.log(-math.log(u))


@dataclass(frozen=True)
class LimitedDomain:
    """The (ε₀, δ₀)-DP release of one token from a vote histogram over a vocabulary of ``vocab_size``."""

    epsilon: float
    delta: float
    vocab_size: int
    k_bar: int = 10
    margin: float = THRESHOLD_MARGIN

    def __post_init__(self) -> None:
        if not (self.epsilon > 0 and 0 < self.delta < 1):
            raise ConfigError(f"need epsilon > 0 and 0 < delta < 1, got {self.epsilon}, {self.delta}")
        if not 1 <= self.k_bar < self.vocab_size:
            raise ConfigError(f"need 1 <= k_bar < vocab_size, got {self.k_bar}, {self.vocab_size}")

    @property
    def noise_epsilon(self) -> float:
        """ε' of the Gumbel noise: half of ε₀, because a moved vote changes two counts in opposite directions."""
        return self.epsilon / L0_SENSITIVITY

    def threshold(self, counts: Mapping[int, int]) -> float:
        ranked = sorted(counts.values(), reverse=True)
        next_count = ranked[self.k_bar] if len(ranked) > self.k_bar else 0
        spread = min(L0_SENSITIVITY, self.k_bar, self.vocab_size - self.k_bar)
        return next_count + self.margin + math.log(spread / self.delta) / self.noise_epsilon

    def _top(self, counts: Mapping[int, int]) -> list[tuple[int, int]]:
        # ties broken by token id, never by data order
        return sorted(((c, t) for t, c in counts.items() if c > 0), key=lambda ct: (-ct[0], ct[1]))[: self.k_bar]

    def distribution(self, counts: Mapping[int, int]) -> dict[int | None, float]:
        """The exact probability of every outcome (None: no release). Adding i.i.d. Gumbel(b) noise and taking
        the argmax picks each candidate with probability softmax(value / b) (the Gumbel-max trick), so the
        release is a softmax over the top-k̄ counts and the threshold."""
        scale = 1.0 / self.noise_epsilon
        values = {t: c for c, t in self._top(counts)}
        values[None] = self.threshold(counts)
        top = max(values.values())
        weights = {t: math.exp((v - top) / scale) for t, v in values.items()}
        total = sum(weights.values())
        return {t: w / total for t, w in weights.items()}

    def release(self, counts: Mapping[int, int], rng: random.Random | None = None) -> int | None:
        """A token id, or None when no token beats the noisy threshold.

        ``rng`` defaults to the OS CSPRNG; pass a seeded ``random.Random`` only in tests.
        """
        rng = rng or random.SystemRandom()
        if any(c < 0 for c in counts.values()):
            raise ConfigError("vote counts must be non-negative")
        top = self._top(counts)
        scale = 1.0 / self.noise_epsilon
        best_token, best_value = None, self.threshold(counts) + gumbel(rng, scale)
        for c, t in top:
            value = c + gumbel(rng, scale)
            if value > best_value:
                best_token, best_value = t, value
        return best_token


def select_candidate(correct_counts: list[int], epsilon: float, rng: random.Random | None = None) -> int:
    """DP-OPT's selection: the index of argmax(correct_k + Gumbel(1/ε)) over the candidates' numbers of
    correct answers on a private holdout (the exponential mechanism; ε-DP).

    Adding or removing one holdout example moves every count by 0 or +1 in the same direction, so the
    utility is monotone with sensitivity 1 and Gumbel(1/ε) gives ε-DP (not 2ε as for a moved vote).
    The holdout is disjoint from the examples the candidates were written from: the selection's ε and the
    generation's ε are not added, the guarantee is their maximum.
    """
    if not correct_counts:
        raise ConfigError("no candidates to select from")
    if not epsilon > 0:
        raise ConfigError(f"epsilon must be positive, got {epsilon}")
    if any(c < 0 for c in correct_counts):
        raise ConfigError("counts must be non-negative")
    rng = rng or random.SystemRandom()
    noisy = [c + gumbel(rng, 1.0 / epsilon) for c in correct_counts]
    return max(range(len(noisy)), key=noisy.__getitem__)


# ---------------------------------------------------------------- accounting


def pure_dp_rdp(alpha: float, eps0: float) -> float:
    """RDP of order ``alpha`` of an ε₀-DP mechanism (tight: randomized response attains it)."""
    if alpha <= 1:
        raise ConfigError("RDP orders must exceed 1")
    a_e = alpha * eps0
    # log(sinh(αε) - sinh((α-1)ε)) computed stably: sinh x - sinh y = 2 cosh((x+y)/2) sinh((x-y)/2)
    log_num = math.log(2.0) + _log_cosh((2 * alpha - 1) * eps0 / 2) + math.log(math.sinh(eps0 / 2))
    tight = (log_num - math.log(math.sinh(eps0))) / (alpha - 1)
    return min(a_e * eps0 / 2, tight)


def _log_cosh(x: float) -> float:
    x = abs(x)
    return x + math.log1p(math.exp(-2 * x)) - math.log(2.0)


def _log_add(a: float, b: float) -> float:
    if a == -math.inf:
        return b
    if b == -math.inf:
        return a
    hi, lo = max(a, b), min(a, b)
    return hi + math.log1p(math.exp(lo - hi))


def _log_binom(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def poisson_subsampled_rdp(alpha: int, q: float, rdp) -> float:
    """Zhu and Wang (2019), Theorem 6: an upper bound on the RDP of ``rdp`` (a function of the order) run on
    a Poisson subsample of rate ``q``, for integer orders ``alpha`` >= 2."""
    if not (isinstance(alpha, int) and alpha >= 2):
        raise ConfigError("the bound holds for integer orders >= 2")
    if q == 0:
        return 0.0
    if q == 1:
        return rdp(alpha)
    log_q, log_1q = math.log(q), math.log1p(-q)
    terms = (alpha - 1) * log_1q + math.log(alpha * q - q + 1)
    terms = _log_add(terms, _log_binom(alpha, 2) + 2 * log_q + (alpha - 2) * log_1q + rdp(2))
    for ell in range(3, alpha + 1):
        t = math.log(3) + _log_binom(alpha, ell) + ell * log_q + (alpha - ell) * log_1q + (ell - 1) * rdp(ell)
        terms = _log_add(terms, t)
    return terms / (alpha - 1)


def rdp_to_dp(rdp_values: dict[int, float], delta: float) -> tuple[float, int]:
    """(ε, best order) at ``delta`` from RDP values, by the conversion of Balle et al. (2020)."""
    best = (math.inf, 0)
    for a, r in rdp_values.items():
        eps = r + math.log((a - 1) / a) - (math.log(delta) + math.log(a)) / (a - 1)
        best = min(best, (max(eps, 0.0), a))
    return best


@lru_cache(maxsize=64)
def _per_query_rdp(eps0: float, delta0: float, q: float) -> tuple[float, ...]:
    q_eff = q * (1 - delta0) / (1 - q * delta0)
    return tuple(poisson_subsampled_rdp(a, q_eff, lambda o: pure_dp_rdp(o, eps0)) for a in ORDERS)


def dpopt_epsilon(queries: int, *, sample_rate: float, eps0: float, delta0: float, delta: float) -> float:
    """ε after ``queries`` token releases (failed ones included) at total failure probability ``delta``.

    The δ₀ of every query on its subsample costs q·T·δ₀ of ``delta``; the rest converts the composed RDP.
    Raises ValueError when that δ₀ part alone exceeds ``delta``.
    """
    if queries < 0:
        raise ConfigError("queries must be >= 0")
    if queries == 0:
        return 0.0
    delta1 = delta - sample_rate * queries * delta0
    if delta1 <= 0:
        raise ConfigError(
            f"{queries} queries at delta0 = {delta0:g}, q = {sample_rate:g} spend q*T*delta0 = "
            f"{sample_rate * queries * delta0:.3g}, not below the target delta {delta:g}"
        )
    per_query = _per_query_rdp(eps0, delta0, sample_rate)
    return rdp_to_dp({a: queries * r for a, r in zip(ORDERS, per_query, strict=True)}, delta1)[0]


def max_queries(target_epsilon: float, **kw) -> int:
    """The most token releases whose composed ε stays within ``target_epsilon`` (binary search)."""
    lo, hi = 0, 1
    while True:
        try:
            if dpopt_epsilon(hi, **kw) > target_epsilon:
                break
        except ValueError:
            break
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        try:
            ok = dpopt_epsilon(mid, **kw) <= target_epsilon
        except ValueError:
            ok = False
        lo, hi = (mid, hi) if ok else (lo, mid)
    return lo
