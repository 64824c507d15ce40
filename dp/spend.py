"""What a privacy ledger records (a :class:`Release` per DP mechanism run, the holder's :class:`Budget`) and how
the releases compose into one (epsilon, delta) :class:`Spend`; ``ledger.py`` keeps them durable."""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedprompt.dp.accounting import epsilon
from fedprompt.errors import ConfigError


@dataclass(frozen=True)
class Release:
    id: int
    created_at: float
    task: str
    run_id: str
    round: int
    mechanism: str
    accountant: str | None
    noise_multiplier: float | None
    sample_rate: float | None
    steps: int | None
    delta: float
    epsilon: float
    status: str
    owner: str = ""


@dataclass(frozen=True)
class Spend:
    epsilon: float
    delta: float
    releases: int
    method: str  # how the releases were composed


@dataclass(frozen=True)
class Budget:
    epsilon: float
    delta: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.epsilon) and self.epsilon > 0):
            raise ConfigError(f"budget epsilon must be positive and finite, got {self.epsilon!r}")
        if not 0 < self.delta < 1:
            raise ConfigError(f"budget delta must be in (0, 1), got {self.delta!r}")


def compose(releases: list[Release], delta: float) -> Spend:
    """The (epsilon, delta) of all ``releases`` together (cancelled ones left out), at total ``delta``."""
    releases = [r for r in releases if r.status != "cancelled"]
    if not releases:
        return Spend(0.0, 0.0, 0, "nothing released")
    pure = [r for r in releases if r.accountant is None]
    groups: dict[str, list[tuple[float, float, int]]] = {}
    for r in releases:
        if r.accountant is not None:
            groups.setdefault(r.accountant, []).append((r.noise_multiplier, r.sample_rate, r.steps))
    eps = sum(r.epsilon for r in pure)
    left = delta - sum(r.delta for r in pure)
    if groups and left <= 0:
        return Spend(math.inf, delta, len(releases), "the (epsilon, delta) releases use up all of delta")
    for name, hist in groups.items():
        eps += epsilon(name, hist, delta=left / len(groups))
    used_delta = delta if groups else delta - left
    parts = [f"{name} accountant over {len(h)} release(s)" for name, h in groups.items()]
    if pure:
        parts.append(f"{len(pure)} (epsilon, delta) release(s) added")
    method = "; ".join(parts)
    if len(groups) + bool(pure) > 1:
        method += "; groups added by basic composition"
    return Spend(eps, used_delta, len(releases), method)
