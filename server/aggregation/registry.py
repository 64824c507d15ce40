"""The aggregation server's service layer: it checks every request and combines prompts; the store persists.

Every method validates before it writes and writes inside one store transaction, so a rejected request
(any ``RegistryError``) changes nothing, and a request that passes leaves a complete new state even when the
process dies right after. Checks that depend on stored state (is the round open, is it full) run in the same
transaction as the write, with the round's or stream's row locked, so concurrent requests cannot both pass
them; the store's UNIQUE keys are the last line (one update per client and round).

Versions and task vectors are content-addressed: their ids are SHA-256 hashes of what they hold, so
publishing the same prompt twice returns the first one, and anyone holding a version can verify its id.

The registry does not decide who may call what: the gRPC layer (``server/aggregation/service.py``) does, from the
caller's certificate (publishing, task vectors and composition are the coordinator's; holders submit to the
rounds that name them and read). What the registry checks is the request itself.

The rounds and streams live in ``registry_rounds.py`` and ``registry_streams.py`` (mixins of ``Registry``).
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from fedprompt.protocols.records import (
    Conflict,
    InvalidInput,
    ModelRef,
    NotFound,
    TaskVector,
    Version,
)
from fedprompt.server.aggregation.registry_checks import (
    canonical_json,
    check_embeddings,
    check_metadata,
    check_model,
    check_name,
    check_real,
)
from fedprompt.server.aggregation.registry_rounds import RoundsMixin
from fedprompt.server.aggregation.registry_streams import StreamsMixin
from fedprompt.server.aggregation.store import Store, Tx, tensor_bytes

_HEX = re.compile(r"[0-9a-f]+")


def _digest(domain: str, header: dict[str, Any], payload: bytes) -> str:
    """SHA-256 over a domain tag, the length-prefixed canonical JSON header, then the payload bytes."""
    head = canonical_json(header).encode()
    h = hashlib.sha256(domain.encode() + b"\0")
    h.update(len(head).to_bytes(8, "big") + head)
    h.update(payload)
    return h.hexdigest()


def version_id(
    *,
    task: str,
    base_model: ModelRef,
    embeddings: np.ndarray | None,
    text: str | None,
    parent_id: str | None,
    metadata: dict[str, Any],
) -> str:
    """The id of a version with this content; not its creation time or author, so republishing finds it."""
    soft = embeddings is not None
    header = {
        "task": task,
        "model_id": base_model.model_id,
        "weights_sha256": base_model.weights_sha256,
        "kind": "soft" if soft else "text",
        "shape": list(embeddings.shape) if soft else None,
        "parent_id": parent_id,
        "metadata": metadata,
    }
    payload = tensor_bytes(embeddings) if soft else (text or "").encode()
    return _digest("fedprompt.version.v1", header, payload)


def vector_id(*, task: str, origin_id: str, tuned_id: str, base_model: ModelRef, tau: np.ndarray) -> str:
    header = {
        "task": task,
        "origin_id": origin_id,
        "tuned_id": tuned_id,
        "model_id": base_model.model_id,
        "weights_sha256": base_model.weights_sha256,
        "shape": list(tau.shape),
    }
    return _digest("fedprompt.task_vector.v1", header, tensor_bytes(tau))


def initial_prompt_id(embeddings: np.ndarray) -> str:
    """``fedprompt.prompt.origin_id`` of a prompt, in numpy (this process need not load torch): the id a tuned
    prompt's artifact records for the initial prompt it started from."""
    arr = np.ascontiguousarray(embeddings, dtype="<f4")
    digest = hashlib.sha256(f"{tuple(arr.shape)}".encode())
    digest.update(arr.tobytes())
    return digest.hexdigest()[:16]


def verify_version(v: Version) -> bool:
    """Whether a stored version's id matches its content (nothing was lost or altered)."""
    return v.version_id == version_id(
        task=v.task,
        base_model=v.base_model,
        embeddings=v.embeddings,
        text=v.text,
        parent_id=v.parent_id,
        metadata=v.metadata,
    )


class Registry(RoundsMixin, StreamsMixin):
    """Prompt versions, task vectors, synchronous (plain or secure) rounds (``registry_rounds``) and
    asynchronous streams (``registry_streams``).

    A version's metadata is stored as claimed by its ``created_by`` and never checked: the privacy spend
    (epsilon, delta, accountant) and the training settings it records are its author's word, and all the
    registry vouches for is that the id hashes the content (a composed version copies its sources' claims)."""

    version_id = staticmethod(version_id)

    def __init__(self, store: Store, *, max_elements: int = 1 << 22, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.max_elements = max_elements
        self.clock = clock

    # --- versions ---------------------------------------------------------------------------------------------

    def _resolve(self, tx: Tx, id_or_prefix: str, what: str = "version") -> Version:
        if not isinstance(id_or_prefix, str) or not id_or_prefix:
            raise InvalidInput(f"{what} id must be a non-empty string, got {id_or_prefix!r}")
        key = id_or_prefix.lower()
        if not _HEX.fullmatch(key) or len(key) > 64:
            raise InvalidInput(f"{what} id {id_or_prefix!r} is not a hex SHA-256 (or a prefix of one)")
        if len(key) == 64:
            v = tx.get_version(key)
            if v is None:
                raise NotFound(f"unknown {what} {id_or_prefix!r}")
            return v
        if len(key) < 8:
            raise InvalidInput(f"{what} id prefix {id_or_prefix!r} is too short (at least 8 hex digits)")
        ids = tx.version_ids_with_prefix(key, limit=2)
        if not ids:
            raise NotFound(f"unknown {what} {id_or_prefix!r} (no version id starts with it)")
        if len(ids) > 1:
            raise NotFound(f"{what} id prefix {id_or_prefix!r} is ambiguous ({ids[0][:16]}…, {ids[1][:16]}…, …)")
        v = tx.get_version(ids[0])
        assert v is not None
        return v

    def get_version(self, id_or_prefix: str) -> Version:
        with self.store.transaction(write=False) as tx:
            return self._resolve(tx, id_or_prefix)

    def list_versions(
        self, *, task: str | None = None, model_id: str | None = None, include_content: bool = True
    ) -> list[Version]:
        """In the order they were created; without content, embeddings and text are None (a cheap listing)."""
        with self.store.transaction(write=False) as tx:
            return tx.list_versions(task or None, model_id or None, include_content)

    def _insert_version(
        self,
        tx: Tx,
        *,
        task: str,
        base_model: ModelRef,
        embeddings: np.ndarray | None,
        text: str | None,
        parent_id: str | None,
        metadata: dict,
        created_by: str,
    ) -> Version:
        """Store a checked version, or return the existing one with the same content (unchanged)."""
        if embeddings is not None:
            embeddings = np.ascontiguousarray(embeddings, dtype=np.float32).copy()
            embeddings.flags.writeable = False
        vid = version_id(
            task=task, base_model=base_model, embeddings=embeddings, text=text, parent_id=parent_id, metadata=metadata
        )
        v = Version(vid, task, base_model, embeddings, text, parent_id, metadata, float(self.clock()), created_by)
        if tx.insert_version(v):
            return v
        existing = tx.get_version(vid)
        assert existing is not None
        return existing

    def publish_version(
        self,
        *,
        task: str,
        base_model: ModelRef,
        embeddings: np.ndarray | None = None,
        text: str | None = None,
        parent_id: str | None = None,
        metadata: dict | None = None,
        created_by: str,
    ) -> Version:
        task = check_name(task, "task")
        check_model(base_model)
        created_by = check_name(created_by, "created_by")
        metadata = check_metadata(metadata)
        if (embeddings is None) == (text is None):
            raise InvalidInput("a version needs exactly one of embeddings (a soft prompt) and text (a discrete prompt)")
        if embeddings is not None:
            check_embeddings(embeddings, "embeddings", self.max_elements)
        elif not isinstance(text, str) or not text.strip():
            raise InvalidInput(f"text must be a non-empty string, got {text!r}")
        with self.store.transaction() as tx:
            if parent_id:
                parent = self._resolve(tx, parent_id, "parent version")
                if parent.base_model != base_model:
                    raise Conflict(f"parent {parent.version_id} belongs to {parent.base_model}, not {base_model}")
                parent_id = parent.version_id
            return self._insert_version(
                tx,
                task=task,
                base_model=base_model,
                embeddings=embeddings,
                text=text,
                parent_id=parent_id or None,
                metadata=metadata,
                created_by=created_by,
            )

    # --- task vectors -----------------------------------------------------------------------------------------

    def publish_task_vector(self, *, task: str, tuned_id: str, origin_id: str, created_by: str) -> TaskVector:
        """tau = tuned - origin (float32); both soft prompts of the same base model and shape."""
        task = check_name(task, "task")
        created_by = check_name(created_by, "created_by")
        with self.store.transaction() as tx:
            tuned = self._resolve(tx, tuned_id, "tuned version")
            origin = self._resolve(tx, origin_id, "origin version")
            if tuned.version_id == origin.version_id:
                raise InvalidInput(f"tuned and origin are the same version {tuned.version_id}: tau would be zero")
            for v, role in ((tuned, "tuned"), (origin, "origin")):
                if v.embeddings is None:
                    raise Conflict(f"{role} version {v.version_id} is a text prompt; task vectors need soft prompts")
            if tuned.base_model != origin.base_model:
                raise Conflict(
                    f"tuned version {tuned.version_id} belongs to {tuned.base_model}, origin "
                    f"{origin.version_id} to {origin.base_model}"
                )
            if tuned.embeddings.shape != origin.embeddings.shape:
                raise Conflict(f"tuned version has shape {tuned.embeddings.shape}, origin {origin.embeddings.shape}")
            claimed = tuned.metadata.get("origin_id")  # recorded by fedprompt's artifacts: the prompt it started from
            if claimed and claimed != initial_prompt_id(origin.embeddings):
                raise Conflict(
                    f"tuned version {tuned.version_id[:16]} was tuned from initial prompt {claimed}, "
                    f"not from version {origin.version_id[:16]} (initial prompt {initial_prompt_id(origin.embeddings)})"
                )
            tau = tuned.embeddings - origin.embeddings
            tau.flags.writeable = False
            vid = vector_id(
                task=task, origin_id=origin.version_id, tuned_id=tuned.version_id, base_model=origin.base_model, tau=tau
            )
            tv = TaskVector(
                vid, task, origin.version_id, tuned.version_id, origin.base_model, tau, float(self.clock()), created_by
            )
            if tx.insert_task_vector(tv):
                return tv
            existing = tx.get_task_vector(vid)
            assert existing is not None
            return existing

    def list_task_vectors(self, *, origin_id: str | None = None, task: str | None = None) -> list[TaskVector]:
        with self.store.transaction(write=False) as tx:
            if origin_id:
                origin_id = self._resolve(tx, origin_id, "origin version").version_id
            return tx.list_task_vectors(origin_id or None, task or None)

    def compose(self, *, origin_id: str, terms: list[tuple[str, float]], task: str, created_by: str) -> Version:
        """origin + sum(lambda * tau), in float64, stored as a child of the origin."""
        task = check_name(task, "task")
        created_by = check_name(created_by, "created_by")
        if not isinstance(terms, list | tuple) or not terms:
            raise InvalidInput("compose needs at least one (vector id, lambda) term")
        checked: list[tuple[str, float]] = []
        for i, term in enumerate(terms):
            if not isinstance(term, list | tuple) or len(term) != 2 or not isinstance(term[0], str) or not term[0]:
                raise InvalidInput(f"term {i} must be (vector id, lambda), got {term!r}")
            checked.append((term[0], check_real(term[1], f"lambda of vector {term[0]!r}")))
        ids = [t[0] for t in checked]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise InvalidInput(f"vector {dup!r} appears more than once in the terms (add the lambdas instead)")
        with self.store.transaction() as tx:
            origin = self._resolve(tx, origin_id, "origin version")
            if origin.embeddings is None:
                raise Conflict(f"origin {origin.version_id} is a text prompt; only soft prompts compose")
            total = origin.embeddings.astype(np.float64)
            recorded = []
            for vid, lam in checked:
                tv = tx.get_task_vector(vid)
                if tv is None:
                    raise NotFound(f"unknown task vector {vid!r}")
                if tv.origin_id != origin.version_id:
                    raise Conflict(f"task vector {vid} was tuned from origin {tv.origin_id}, not {origin.version_id}")
                if tv.base_model != origin.base_model:
                    raise Conflict(f"task vector {vid} belongs to {tv.base_model}, the origin to {origin.base_model}")
                if tv.tau.shape != origin.embeddings.shape:
                    raise Conflict(f"task vector {vid} has shape {tv.tau.shape}, the origin {origin.embeddings.shape}")
                total += lam * tv.tau.astype(np.float64)
                entry: dict[str, Any] = {"vector_id": vid, "task": tv.task, "lambda": lam, "tuned_id": tv.tuned_id}
                tuned = tx.get_version(tv.tuned_id)
                if tuned is not None and "privacy" in tuned.metadata:
                    # Each task's privacy spend stays with it: the tasks' data are different data sets.
                    entry["privacy"] = tuned.metadata["privacy"]
                recorded.append(entry)
            with np.errstate(over="ignore"):  # checked below
                composed = total.astype(np.float32)
            if not np.isfinite(composed).all():
                raise InvalidInput("the composition overflows float32 (lambdas too large)")
            metadata = {"composed": {"origin_id": origin.version_id, "terms": recorded}}
            return self._insert_version(
                tx,
                task=task,
                base_model=origin.base_model,
                embeddings=composed,
                text=None,
                parent_id=origin.version_id,
                metadata=metadata,
                created_by=created_by,
            )
