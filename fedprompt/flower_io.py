"""Prompts in Flower records: float32 arrays only, checked on the way in (shared by ClientApp and ServerApp).

numpy only: the ClientApp process Flower starts for every message stays light (no torch import) when it
forwards the message to the holder's worker.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord


def to_record(**arrays: np.ndarray) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(a, dtype=np.float32)) for k, a in arrays.items()})


def from_record(record: ArrayRecord, key: str) -> np.ndarray:
    """The float32 array ``key`` of ``record``; any other dtype, or a missing key, is a ValueError."""
    if key not in record:
        raise ValueError(f"missing array {key!r}")
    arr = record[key].numpy()
    if arr.dtype != np.float32:
        raise ValueError(f"array {key!r} has dtype {arr.dtype}, expected float32")
    return np.array(arr, copy=True)
