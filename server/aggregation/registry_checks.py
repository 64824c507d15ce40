"""The registry's input checks: each raises ``InvalidInput`` naming the offending value, before any write.

Kept apart from ``server/aggregation/registry.py`` so the service layer reads as the semantics of each request.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import numpy as np

from fedprompt.protocols.records import InvalidInput, ModelRef, NotFound

MAX_NAME = 256
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def canonical_json(obj: Any) -> str:
    """The one JSON text of a value that ids are hashed over: sorted keys, no spaces, no NaN."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def record_id(value: Any, what: str) -> str:
    """The id of a ``what`` (round, stream) a caller named: a non-empty string, else InvalidInput."""
    if not isinstance(value, str) or not value:
        raise InvalidInput(f"{what} id must be a non-empty string, got {value!r}")
    return value


def found(row: Any, what: str, key: str) -> Any:
    """The ``what`` the store returned for ``key``, or NotFound when it holds none."""
    if row is None:
        raise NotFound(f"unknown {what} {key!r}")
    return row


def check_name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidInput(f"{what} must be a non-empty string, got {value!r}")
    if len(value) > MAX_NAME or _CONTROL.search(value):
        raise InvalidInput(f"{what} {value[:80]!r} is longer than {MAX_NAME} characters or has control characters")
    return value


def check_model(ref: Any) -> ModelRef:
    if not isinstance(ref, ModelRef):
        raise InvalidInput(f"base_model must be a ModelRef, got {ref!r}")
    check_name(ref.model_id, "base model id")
    if not isinstance(ref.weights_sha256, str) or not _SHA256.fullmatch(ref.weights_sha256):
        raise InvalidInput(f"base model weights_sha256 must be 64 lowercase hex digits, got {ref.weights_sha256!r}")
    return ref


def check_metadata(metadata: Any) -> dict[str, Any]:
    """A JSON object, returned as it reads back from its canonical text (so a stored version's id verifies)."""
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) for k in metadata):
        raise InvalidInput(f"metadata must be a JSON object with string keys, got {str(metadata)[:200]!r}")
    try:
        return json.loads(canonical_json(metadata))
    except (TypeError, ValueError) as e:
        raise InvalidInput(f"metadata is not plain JSON (finite numbers, strings, lists, objects): {e}") from e


def check_real(value: Any, what: str, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise InvalidInput(f"{what} must be a number, got {value!r}")
    out = float(value)
    if not math.isfinite(out):
        raise InvalidInput(f"{what} must be finite, got {value!r}")
    if positive and out <= 0:
        raise InvalidInput(f"{what} must be > 0, got {value!r}")
    return out


def check_positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise InvalidInput(f"{what} must be an integer >= 1, got {value!r}")
    return int(value)


def check_shape(shape: Any, max_elements: int) -> tuple[int, ...]:
    if not isinstance(shape, tuple | list) or not shape:
        raise InvalidInput(f"shape must be a non-empty list of dimensions, got {shape!r}")
    dims = tuple(check_positive_int(d, f"dimension {i} of shape {list(shape)}") for i, d in enumerate(shape))
    if math.prod(dims) > max_elements:
        raise InvalidInput(f"shape {list(dims)} has {math.prod(dims)} elements, more than the limit {max_elements}")
    return dims


def check_delta(a: Any, what: str, max_elements: int) -> np.ndarray:
    """A non-empty float32 array of finite values, at most ``max_elements`` of them (the shape is the caller's)."""
    if not isinstance(a, np.ndarray):
        raise InvalidInput(f"{what} must be a numpy array, got {type(a).__name__}")
    if a.dtype != np.float32:
        raise InvalidInput(f"{what} must be float32, got {a.dtype}")
    if a.size == 0 or a.size > max_elements:
        raise InvalidInput(f"{what} has {a.size} elements; between 1 and {max_elements} are accepted")
    bad = ~np.isfinite(a)
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        raise InvalidInput(f"{what} has {int(bad.sum())} NaN or infinite values (the first at {idx}: {a[idx]})")
    return a


def check_embeddings(a: Any, what: str, max_elements: int) -> np.ndarray:
    check_delta(a, what, max_elements)
    if a.ndim != 2:
        raise InvalidInput(f"{what} must be 2-D (virtual tokens x hidden size), got shape {a.shape}")
    return a
