"""Prompts in Flower records: float32 arrays only, checked on the way in (shared by the holder and the ServerApp).

A record's array is a ``.npy`` blob written by the other party, which may be hostile: a header that claims
4·10¹² values makes ``np.load`` try to allocate them before it notices the data is short. So the header is
parsed and checked here (float32, C order, at most ``MAX_VALUES`` values, exactly as many bytes as it claims)
before any array is built. numpy only: nothing here loads torch.
"""

from __future__ import annotations

import ast
import math

import numpy as np
from flwr.app import Array, ArrayRecord

MAX_VALUES = 1 << 24  # 16M float32 values (64 MiB): far above any prompt (a 100 x 4096 prompt is 409,600)
_MAGIC = b"\x93NUMPY"


def to_record(**arrays: np.ndarray) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(a, dtype=np.float32)) for k, a in arrays.items()})


def from_record(record: ArrayRecord, key: str, *, max_values: int = MAX_VALUES) -> np.ndarray:
    """The float32 array ``key`` of ``record``; anything else (another dtype or serialisation, a shape the data
    does not hold, too many values, a missing key) is a ValueError, raised before any allocation."""
    if key not in record:
        raise ValueError(f"missing array {key!r}")
    arr = record[key]
    if arr.stype != "numpy.ndarray":
        raise ValueError(f"array {key!r} is serialised as {arr.stype!r}, not numpy.ndarray")
    return npy_float32(arr.data, what=f"array {key!r}", max_values=max_values)


def npy_float32(data: bytes, *, what: str = "array", max_values: int = MAX_VALUES) -> np.ndarray:
    """Parse a ``.npy`` blob holding a float32 array, checking its header against its length first."""
    data = bytes(data)
    if len(data) < 10 or not data.startswith(_MAGIC):
        raise ValueError(f"{what} is not a .npy blob")
    major = data[6]
    if major == 1:
        header_len, start = int.from_bytes(data[8:10], "little"), 10
    elif major in (2, 3):
        header_len, start = int.from_bytes(data[8:12], "little"), 12
    else:
        raise ValueError(f"{what}: unknown .npy version {major}")
    if header_len > 4096 or start + header_len > len(data):
        raise ValueError(f"{what}: malformed .npy header")
    try:
        header = ast.literal_eval(data[start : start + header_len].decode("latin-1"))
    except (ValueError, SyntaxError, MemoryError, RecursionError) as exc:
        raise ValueError(f"{what}: malformed .npy header") from exc
    if not isinstance(header, dict) or set(header) != {"descr", "fortran_order", "shape"}:
        raise ValueError(f"{what}: malformed .npy header")
    if header["descr"] not in ("<f4", "=f4") or np.dtype(header["descr"]) != np.float32:
        raise ValueError(f"{what} has dtype {header['descr']!r}, expected float32")
    shape = header["shape"]
    if header["fortran_order"] is not False or not isinstance(shape, tuple):
        raise ValueError(f"{what}: only C-ordered arrays are accepted")
    if len(shape) > 8 or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d for d in shape):
        raise ValueError(f"{what}: bad shape {shape!r}")
    count = math.prod(shape)
    if count > max_values:
        raise ValueError(f"{what} claims {count} values, more than the {max_values} accepted")
    body = start + header_len
    if len(data) - body != 4 * count:
        raise ValueError(f"{what} claims shape {shape} ({4 * count} bytes) but holds {len(data) - body} bytes")
    return np.frombuffer(data, dtype="<f4", offset=body).reshape(shape).astype(np.float32)  # a writable copy
