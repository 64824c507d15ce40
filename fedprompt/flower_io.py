"""Prompts in Flower records: float32 arrays only, checked on the way in (shared by ClientApp and ServerApp)."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord


def to_record(**tensors: torch.Tensor) -> ArrayRecord:
    return ArrayRecord(
        {k: Array(np.ascontiguousarray(t.detach().cpu().to(torch.float32).numpy())) for k, t in tensors.items()}
    )


def from_record(record: ArrayRecord, key: str) -> torch.Tensor:
    """The float32 tensor ``key`` of ``record``; any other dtype, or a missing key, is a ValueError."""
    if key not in record:
        raise ValueError(f"missing array {key!r}")
    arr = record[key].numpy()
    if arr.dtype != np.float32:
        raise ValueError(f"array {key!r} has dtype {arr.dtype}, expected float32")
    return torch.from_numpy(np.array(arr, copy=True))
