"""Merging prompt updates on the coordinator: FedAvg of the deltas or FedAdam, and optional client-level DP.

No Flower here: the ServerApp feeds these with the deltas it received. Everything is float32 torch on CPU
(a prompt is tens of thousands of numbers).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Protocol

import torch

from fedprompt.dp.accounting import epsilon
from fedprompt.errors import ConfigError


def weighted_mean(deltas: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    if not deltas:
        raise ConfigError("no updates to merge")
    if len(weights) != len(deltas) or any(not math.isfinite(w) or w <= 0 for w in weights):
        raise ConfigError(f"need one positive weight per update, got {weights}")
    total = float(sum(weights))
    return sum(d.to(torch.float32) * (w / total) for d, w in zip(deltas, weights, strict=True))


class Strategy(Protocol):
    """How the coordinator moves the global prompt given the round's mean update; its state is checkpointed
    with each round (``state_dict``) so that a resumed run continues the same trajectory."""

    name: str
    default_lr: float

    def apply(self, current: torch.Tensor, mean_delta: torch.Tensor) -> torch.Tensor: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...


def _positive(server_lr: float) -> float:
    if not (math.isfinite(server_lr) and server_lr > 0):
        raise ConfigError(f"server_lr must be positive, got {server_lr}")
    return server_lr


class FedAvg:
    """x ← x + η · Σ wᵢ Δᵢ / Σ wᵢ (McMahan et al. 2017 with a server learning rate η)."""

    name = "fedavg"
    default_lr = 1.0

    def __init__(self, server_lr: float = default_lr) -> None:
        self.server_lr = _positive(server_lr)

    def apply(self, current: torch.Tensor, mean_delta: torch.Tensor) -> torch.Tensor:
        return current + self.server_lr * mean_delta

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass


class FedAdam:
    """Adaptive server optimiser on the mean delta as a pseudo-gradient (Reddi et al. 2021, FedAdam)."""

    name = "fedadam"
    default_lr = 1e-2

    def __init__(
        self, server_lr: float = default_lr, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3
    ) -> None:
        self.server_lr = _positive(server_lr)
        self.beta1, self.beta2, self.tau = beta1, beta2, tau
        self.m: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def apply(self, current: torch.Tensor, mean_delta: torch.Tensor) -> torch.Tensor:
        if self.m is None or self.v is None:
            self.m = torch.zeros_like(mean_delta)
            self.v = torch.zeros_like(mean_delta)
        self.m = self.beta1 * self.m + (1 - self.beta1) * mean_delta
        self.v = self.beta2 * self.v + (1 - self.beta2) * mean_delta.square()
        return current + self.server_lr * self.m / (self.v.sqrt() + self.tau)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {} if self.m is None else {"m": self.m, "v": self.v}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.m, self.v = state.get("m"), state.get("v")


_BY_NAME: dict[str, type[Strategy]] = {cls.name: cls for cls in (FedAvg, FedAdam)}
STRATEGIES = tuple(_BY_NAME)


def make_strategy(name: str, server_lr: float | None = None) -> Strategy:
    """The strategy ``name`` with its step ``server_lr`` (None: the strategy's default)."""
    if name not in _BY_NAME:
        raise ConfigError(f"strategy must be one of {STRATEGIES}, got {name!r}")
    cls = _BY_NAME[name]
    return cls(cls.default_lr if server_lr is None else server_lr)


@dataclass(frozen=True)
class ClientLevelDP:
    """DP-FedAvg with a fixed denominator (McMahan et al. 2018): each holder's delta is clipped to L2 norm
    ``clip_norm``, the clipped deltas are summed, Gaussian noise of standard deviation
    ``noise_multiplier · clip_norm`` is added to the sum, and the sum is divided by the *expected* number
    of participants. Holders are sampled independently with probability ``sample_rate`` each round
    (Poisson sampling, which the subsampled-Gaussian accountant assumes).

    The guarantee is per holder (its whole dataset), against whoever sees the merged prompt; it sits
    beside, not instead of, each holder's own per-example DP, which also holds against the coordinator.
    """

    clip_norm: float
    noise_multiplier: float
    sample_rate: float
    expected_clients: float
    delta: float

    def __post_init__(self) -> None:
        if not (self.clip_norm > 0 and self.noise_multiplier > 0 and 0 < self.sample_rate <= 1):
            raise ConfigError("client-level DP needs clip_norm > 0, noise_multiplier > 0, 0 < sample_rate <= 1")
        if not (self.expected_clients > 0 and 0 < self.delta < 1):
            raise ConfigError("client-level DP needs expected_clients > 0 and 0 < delta < 1")

    def merge(self, deltas: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        if not deltas:
            raise ConfigError("no updates to merge")
        clipped, norms = [], []
        for d in deltas:
            norm = float(d.norm())
            norms.append(norm)
            clipped.append(d * min(1.0, self.clip_norm / (norm + 1e-12)))
        noise = _os_gaussian(deltas[0].shape) * (self.noise_multiplier * self.clip_norm)
        merged = (sum(clipped) + noise) / self.expected_clients
        clipped_share = sum(n > self.clip_norm for n in norms) / len(norms)
        return merged, {"clipped_fraction": clipped_share, "median_update_norm": float(torch.tensor(norms).median())}

    def epsilon(self, rounds: int) -> float:
        if rounds == 0:
            return 0.0
        return epsilon("rdp", [(self.noise_multiplier, self.sample_rate, rounds)], delta=self.delta)


def _os_gaussian(shape: torch.Size) -> torch.Tensor:
    # The coordinator's noise must not be replayable from a public seed: draw it from a generator seeded
    # with OS entropy.
    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))
    return torch.randn(shape, generator=gen, dtype=torch.float32)
