"""Confidence intervals for accuracies on one test set: each method's, and the gain of one over another."""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedprompt.errors import ConfigError

Z95 = 1.959963984540054  # the standard normal's 97.5 % quantile


@dataclass(frozen=True)
class Interval:
    value: float
    low: float
    high: float

    def as_dict(self) -> dict[str, float]:
        return {"value": self.value, "low": self.low, "high": self.high}


def accuracy_interval(correct: list[bool], z: float = Z95) -> Interval:
    """The accuracy with its Wilson score interval (sound near 0 and 1, unlike the normal approximation)."""
    n = len(correct)
    if n == 0:
        raise ConfigError("no examples")
    p = sum(correct) / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return Interval(p, centre - half, centre + half)


def gain_interval(correct: list[bool], baseline: list[bool], z: float = Z95) -> Interval:
    """Accuracy of ``correct`` minus that of ``baseline`` on the same examples, with a paired interval.

    Both were scored on one test set, so the difference is the mean of per-example differences in {-1, 0, 1}:
    its standard error counts only the examples where the two disagree, which is far tighter than treating
    the two accuracies as independent samples.
    """
    if len(correct) != len(baseline) or not correct:
        raise ConfigError("a paired comparison needs the same, non-empty, examples")
    n = len(correct)
    d = [int(a) - int(b) for a, b in zip(correct, baseline, strict=True)]
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / (n - 1) if n > 1 else 0.0
    half = z * math.sqrt(var / n)
    return Interval(mean, mean - half, mean + half)
