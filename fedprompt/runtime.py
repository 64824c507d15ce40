"""Device and numeric precision: GPU when present, CPU otherwise; float32 or bfloat16 autocast.

On CPUs with bfloat16 matrix units, autocast to bfloat16 with float32 weights ran prompt tuning
1.8x faster than float32, while casting the weights themselves to bfloat16 ran slower (measured on
this project's 2-core development machine). So "bf16" here always means autocast over float32 weights: the prompt, its
gradients, optimizer state and the DP noise stay in float32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from fedprompt.errors import ConfigError

PRECISIONS = ("auto", "fp32", "bf16")


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU; any explicit torch device string is honoured."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} was asked for but CUDA is not available")
    return dev


def bf16_is_fast(device: torch.device) -> bool:
    """Whether the hardware has native bfloat16 matrix support (so autocast is a speed-up, not a cost)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """Map ``auto`` to ``bf16`` where the hardware has bfloat16 units, else ``fp32``."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "bf16" if bf16_is_fast(device) else "fp32"
    return precision


@dataclass(frozen=True)
class Runtime:
    """Where and in which precision the frozen model runs."""

    device: torch.device
    precision: str  # "fp32" or "bf16" (autocast)

    @classmethod
    def create(cls, device: str = "auto", precision: str = "auto") -> Runtime:
        dev = resolve_device(device)
        return cls(device=dev, precision=resolve_precision(precision, dev))

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        if self.precision == "bf16":
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                yield
        else:
            yield

    def describe(self) -> str:
        return f"{self.device.type}/{self.precision}"
