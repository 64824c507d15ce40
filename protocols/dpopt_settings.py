"""The settings of a DP-OPT run (``DPOPTConfig``, its presets) and the request a coordinator sends a holder for one:
what both sides validate, the coordinator before it starts anything and the holder before it generates."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields, replace

from fedprompt.errors import ConfigError
from fedprompt.settings_checks import finite_numbers, non_negative_ints, positive_ints


@dataclass(frozen=True)
class DPOPTConfig:
    """Settings of one DP-OPT run. The defaults are the paper's (Vicuna-7b on a GPU); see ``PRESETS``."""

    teachers: int = 205  # J
    shots: int = 5  # m: expected demonstrations per teacher
    candidates: int = 40  # K
    max_new_tokens: int = 50
    min_new_tokens: int = 5
    temperature: float = 1.1
    token_epsilon: float = 1.8  # eps0 of one token release
    token_delta: float = 5e-7  # delta0 of one token release
    k_bar: int = 10
    target_epsilon: float = 8.0
    delta: float | None = None  # default 1/(2n), n = generation examples (as for DP-SGD here)
    selection_epsilon: float | None = None  # default: target_epsilon (disjoint data: the run costs the max)
    holdout_fraction: float = 0.01
    retries_per_token: int = 1
    max_failures: int = 5  # per candidate
    max_demo_tokens: int = 64
    teacher_batch_size: int = 64
    private: bool = True  # False: plain majority vote, no noise, no budget (a comparison, never released)
    seed: int | None = None  # tests only: seeds the sampling and the noise; otherwise the OS CSPRNG

    def __post_init__(self) -> None:
        positive_ints(
            self, "teachers", "shots", "candidates", "max_new_tokens", "k_bar", "max_demo_tokens", "teacher_batch_size"
        )
        non_negative_ints(self, "min_new_tokens", "retries_per_token", "max_failures")
        finite_numbers(self, "token_epsilon", "target_epsilon", positive=True)
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0 (0: greedy teachers), got {self.temperature!r}")
        if not 0 < self.token_delta < 1:
            raise ConfigError(f"token_delta must be in (0, 1), got {self.token_delta!r}")
        if self.delta is not None and not 0 < self.delta < 1:
            raise ConfigError(f"delta must be in (0, 1), got {self.delta!r}")
        if self.selection_epsilon is not None and not self.selection_epsilon > 0:
            raise ConfigError(f"selection_epsilon must be positive, got {self.selection_epsilon!r}")
        if not 0 < self.holdout_fraction < 1:
            raise ConfigError(f"holdout_fraction must be in (0, 1), got {self.holdout_fraction!r}")


PRESETS: dict[str, DPOPTConfig] = {
    "paper": DPOPTConfig(),
    # 2 CPU cores, a 135M model: about 5 s per token. Fewer teachers need a larger eps0 for the release
    # threshold (2 + 2 ln(2/delta0)/eps0 votes above the 11th count) to be reachable.
    # Small teacher batches: the demonstrations' lengths vary, and on the CPU padding costs as much as text.
    "cpu": DPOPTConfig(
        teachers=24,
        shots=3,
        candidates=4,
        max_new_tokens=20,
        temperature=0.7,
        token_epsilon=3.0,
        teacher_batch_size=4,
    ),
    "quick": DPOPTConfig(
        teachers=16,
        shots=2,
        candidates=2,
        max_new_tokens=12,
        temperature=0.5,
        token_epsilon=4.0,
        teacher_batch_size=4,
    ),
}


def dpopt_config(config: dict):
    """The DP-OPT settings a coordinator sent: a preset plus JSON overrides (seeds are never accepted)."""
    preset = str(config.get("dpopt_preset", "cpu"))
    public = {"target_epsilon": float(config["target_epsilon"])}
    if float(config.get("delta") or 0) > 0:  # a federation's public delta (a holder's own 1/(2n) would tell its n)
        public["delta"] = float(config["delta"])
    if preset not in PRESETS:
        raise ConfigError(f"unknown DP-OPT preset {preset!r}; known: {sorted(PRESETS)}")
    overrides = json.loads(str(config.get("dpopt_settings") or "{}"))
    known = {f.name for f in fields(DPOPTConfig)} - {"seed", "private"}
    if not isinstance(overrides, dict) or set(overrides) - known:
        raise ConfigError(f"DP-OPT settings must be a JSON object with keys among {sorted(known)}; got {overrides!r}")
    return replace(PRESETS[preset], **public, **overrides)
