"""Randomness from the operating system's CSPRNG for ``secure_mode``.

Opacus's own secure mode needs ``torchcsprng``, which has no build for current torch on the package
registry. These replacements draw every random bit from ``os.urandom``: Poisson sampling of the
batch, and Gaussian noise (Box-Muller in float64, then Opacus's defence against floating-point
attacks: the sum of 4 draws halved, Holohan & Braghin 2021, section 5.1).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator

import numpy as np
import torch
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

from fedprompt.errors import ConfigError


def urandom_uniform(n: int) -> np.ndarray:
    """``n`` uniform floats in (0, 1], 53 random bits each, from the OS CSPRNG."""
    words = np.frombuffer(os.urandom(8 * n), dtype=np.uint64) >> np.uint64(11)
    return (words.astype(np.float64) + 1.0) / float(1 << 53)


def urandom_normal(shape: tuple[int, ...], std: float) -> torch.Tensor:
    n = math.prod(shape)
    u1, u2 = urandom_uniform(n), urandom_uniform(n)
    z = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)
    return torch.from_numpy(z.reshape(shape) * std)


def secure_gaussian(shape: tuple[int, ...], std: float) -> torch.Tensor:
    total = sum(urandom_normal(shape, std) for _ in range(4))
    return total / 2.0


class SecurePoissonSampler:
    """Batch sampler: each example joins each batch independently with probability ``sample_rate``."""

    def __init__(self, num_samples: int, sample_rate: float, steps: int) -> None:
        if not 0 < sample_rate <= 1:
            raise ConfigError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.num_samples, self.sample_rate, self.steps = num_samples, sample_rate, steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            mask = urandom_uniform(self.num_samples) <= self.sample_rate
            yield np.flatnonzero(mask).tolist()


class SecureNoiseDPOptimizer(DPOptimizer):
    """Opacus's DPOptimizer with its Gaussian noise drawn from the OS CSPRNG."""

    def add_noise(self) -> None:
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            noise = secure_gaussian(tuple(p.summed_grad.shape), self.noise_multiplier * self.max_grad_norm)
            p.grad = (p.summed_grad + noise.to(p.summed_grad)).view_as(p)
            _mark_as_processed(p.summed_grad)
