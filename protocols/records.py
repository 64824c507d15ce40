"""What the aggregation server stores and returns, independent of gRPC and of the database.

The gRPC layer (``server/aggregation/service.py``) converts these to and from ``fedprompt.v1`` messages
(``fedprompt.protocols.convert``); the registry (``server/aggregation/registry.py``) validates and combines them;
the store (``server/aggregation/store.py``) persists them. Every error the registry raises for bad input is a
``RegistryError`` whose ``status`` names the gRPC status code the server answers with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedprompt.errors import FedPromptError


class RegistryError(FedPromptError):
    """Bad input or state; the request changed nothing."""

    status = "INVALID_ARGUMENT"


class InvalidInput(RegistryError):
    """Malformed values: NaN or infinite, wrong shape or dtype, an empty name, a round without participants."""

    status = "INVALID_ARGUMENT"


class NotFound(RegistryError):
    """An unknown version, vector, round or stream (or an ambiguous id prefix)."""

    status = "NOT_FOUND"


class AlreadyExists(RegistryError):
    """A second update from the same client in one round."""

    status = "ALREADY_EXISTS"


class Conflict(RegistryError):
    """The request does not fit the state: a closed or full round, another base model, origin or shape."""

    status = "FAILED_PRECONDITION"


class Forbidden(RegistryError):
    """The caller's identity may not do this (a holder opening rounds, an outsider in a secure round)."""

    status = "PERMISSION_DENIED"


@dataclass(frozen=True)
class ModelRef:
    model_id: str
    weights_sha256: str


@dataclass(frozen=True)
class Version:
    """An immutable prompt version: ``version_id`` is the SHA-256 of its content (see registry.version_id)."""

    version_id: str
    task: str
    base_model: ModelRef
    embeddings: np.ndarray | None  # float32 (num_virtual_tokens, hidden); None for a text prompt
    text: str | None
    parent_id: str | None
    metadata: dict[str, Any] = field(default_factory=dict)
    created_unix: float = 0.0
    created_by: str = ""


@dataclass(frozen=True)
class TaskVector:
    """tau = tuned - origin for one task on one base model."""

    vector_id: str
    task: str
    origin_id: str
    tuned_id: str
    base_model: ModelRef
    tau: np.ndarray
    created_unix: float = 0.0
    created_by: str = ""


ROUND_OPEN, ROUND_FINALISED, ROUND_ABORTED = "open", "finalised", "aborted"


@dataclass(frozen=True)
class Round:
    round_id: str
    task: str
    base_model: ModelRef
    shape: tuple[int, ...]
    expected_clients: int
    secure: bool
    base_version_id: str | None
    state: str  # ROUND_OPEN | ROUND_FINALISED | ROUND_ABORTED
    received: int
    version_id: str | None
    min_clients: int
    participants: tuple[str, ...] = ()
    clip_range: float = 0.0
    created_by: str = ""


@dataclass(frozen=True)
class FinaliseResult:
    round: Round
    mean_update: np.ndarray
    contributors: int
    version: Version | None


@dataclass(frozen=True)
class Stream:
    """An asynchronous aggregation stream: updates are buffered and merged every ``buffer_size``."""

    stream_id: str
    task: str
    base_model: ModelRef
    head_version_id: str
    generation: int
    buffered: int
    buffer_size: int
    staleness_exponent: float
    server_learning_rate: float


@dataclass(frozen=True)
class PushResult:
    stream: Stream
    staleness: int
    merged_version_id: str | None
