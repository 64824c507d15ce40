"""Synchronous rounds of the registry: invited clients send updates, the round closes with their mean.

Every round names its participants when it opens (the coordinator invites them); an update from anyone else
is refused, so a registered holder cannot join a round it was not asked to. The weights are the server's:
every update of a plain round weighs the same (``UPDATE_WEIGHT``), and what a caller says about its own
update (a number of examples, say) is never used, since the server cannot check it (a weight of 1e30 would
otherwise dictate the mean). The mean of a round is the mean of its equally weighted updates.

Plain rounds keep each update until the round closes and then delete them: only the mean is needed afterwards,
and a client's own update is the thing most worth protecting (it may leak its training data). Secure rounds
never see an update: the secure-aggregation protocol hands over the unmasked mean.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from fedprompt.protocols.records import (
    ROUND_ABORTED,
    ROUND_FINALISED,
    ROUND_OPEN,
    AlreadyExists,
    Conflict,
    FinaliseResult,
    Forbidden,
    InvalidInput,
    ModelRef,
    Round,
    Version,
)
from fedprompt.server.aggregation.registry_checks import (
    check_delta,
    check_metadata,
    check_model,
    check_name,
    check_positive_int,
    check_real,
    check_shape,
    found,
    record_id,
)
from fedprompt.server.aggregation.store import Store, Tx, tensor_bytes, tensor_from

RESERVED_ROUND_KEYS = ("round_id", "contributors")
UPDATE_WEIGHT = 1.0  # every update's weight, in rounds and (before its staleness discount) in streams


def weighted_mean(items: list[tuple[np.ndarray, float]]) -> np.ndarray:
    """sum(w * delta) / sum(w), in float64."""
    total = np.zeros(items[0][0].shape, dtype=np.float64)
    wsum = 0.0
    for delta, w in items:
        total += float(w) * delta.astype(np.float64)
        wsum += float(w)
    return total / wsum


class RegistryPart:
    """What the mixins of ``Registry`` (rounds here, streams in ``registry_streams``) use of it."""

    store: Store
    max_elements: int
    clock: Callable[[], float]

    if TYPE_CHECKING:  # provided by Registry

        def _resolve(self, tx: Tx, id_or_prefix: str, what: str = "version") -> Version: ...

        def _insert_version(self, tx: Tx, **kwargs: Any) -> Version: ...


class RoundsMixin(RegistryPart):
    """Mixed into ``Registry``: open, fill, finalise and abort rounds."""

    def open_round(
        self,
        *,
        task: str,
        base_model: ModelRef,
        shape: tuple[int, ...] | list[int],
        expected_clients: int,
        secure: bool = False,
        base_version_id: str | None = None,
        participants: list[str] | tuple = (),
        clip_range: float = 0.0,
        min_clients: int | None = None,
        created_by: str,
    ) -> Round:
        """``min_clients`` None: all expected clients. ``participants`` are required (unique names, at least
        ``expected_clients`` of them; a secure round exactly that many, in the order of their indices): a round
        accepts updates from them alone."""
        task = check_name(task, "task")
        check_model(base_model)
        created_by = check_name(created_by, "created_by")
        shape = check_shape(shape, self.max_elements)
        expected_clients = check_positive_int(expected_clients, "expected_clients")
        min_clients = expected_clients if min_clients is None else check_positive_int(min_clients, "min_clients")
        if min_clients > expected_clients:
            raise InvalidInput(f"min_clients {min_clients} exceeds expected_clients {expected_clients}")
        if not isinstance(secure, bool):
            raise InvalidInput(f"secure must be a bool, got {secure!r}")
        if isinstance(participants, str) or not isinstance(participants, list | tuple):
            raise InvalidInput(f"participants must be a list of client names, got {participants!r}")
        parts = tuple(check_name(p, "participant") for p in participants)
        if len(set(parts)) != len(parts):
            raise InvalidInput(f"participants are not unique: {sorted({p for p in parts if parts.count(p) > 1})}")
        clip = check_real(clip_range, "clip_range")
        if clip < 0:
            raise InvalidInput(f"clip_range must be >= 0, got {clip_range!r}")
        if secure:
            if len(parts) != expected_clients:
                raise InvalidInput(f"a secure round names its {expected_clients} participants, got {len(parts)}")
            if clip <= 0:
                raise InvalidInput(f"a secure round needs clip_range > 0, got {clip_range!r}")
        elif not parts:
            raise InvalidInput(
                "a round names its participants (the holders invited to it); a round open to every registered "
                "node is not offered"
            )
        elif len(parts) < expected_clients:
            raise InvalidInput(f"{len(parts)} participants cannot send {expected_clients} updates")
        with self.store.transaction() as tx:
            base_id = None
            if base_version_id:
                base = self._resolve(tx, base_version_id, "base version")
                if base.embeddings is None:
                    raise Conflict(f"base version {base.version_id} is a text prompt; rounds aggregate soft prompts")
                if base.base_model != base_model:
                    raise Conflict(f"base version {base.version_id} belongs to {base.base_model}, not {base_model}")
                if base.embeddings.shape != shape:
                    raise Conflict(
                        f"base version {base.version_id} has shape {base.embeddings.shape}, the round {shape}"
                    )
                base_id = base.version_id
            r = Round(
                uuid.uuid4().hex,
                task,
                base_model,
                shape,
                expected_clients,
                secure,
                base_id,
                ROUND_OPEN,
                0,
                None,
                min_clients,
                parts,
                clip,
                created_by,
            )
            tx.insert_round(r, float(self.clock()))
            return r

    def _round(self, tx: Tx, round_id: str, *, lock: bool = False) -> Round:
        return found(tx.get_round(record_id(round_id, "round"), lock=lock), "round", round_id)

    @staticmethod
    def _require_open(r: Round) -> None:
        if r.state != ROUND_OPEN:
            raise Conflict(f"round {r.round_id} is {r.state}, not open")

    def get_round(self, round_id: str) -> Round:
        with self.store.transaction(write=False) as tx:
            return self._round(tx, round_id)

    def submit_update(self, *, round_id: str, client: str, base_model: ModelRef, delta: np.ndarray) -> int:
        """Store one participant's update to a plain round (it weighs ``UPDATE_WEIGHT``, like every other);
        returns how many the round has received."""
        client = check_name(client, "client")
        check_model(base_model)
        check_delta(delta, "delta", self.max_elements)
        with self.store.transaction() as tx:
            r = self._round(tx, round_id, lock=True)
            self._require_open(r)
            if r.secure:
                raise Conflict(f"round {r.round_id} is secure: updates arrive masked through the secure protocol")
            if base_model != r.base_model:
                raise Conflict(f"round {r.round_id} aggregates {r.base_model}, the update is for {base_model}")
            if delta.shape != r.shape:
                raise InvalidInput(f"delta has shape {delta.shape}, round {r.round_id} expects {r.shape}")
            if client not in r.participants:  # a round stored without participants (older servers) admits no one
                raise Forbidden(f"client {client!r} is not a participant of round {r.round_id}")
            if not tx.insert_update(r.round_id, client, tensor_bytes(delta), UPDATE_WEIGHT):
                raise AlreadyExists(f"client {client!r} already sent its update to round {r.round_id}")
            if r.received >= r.expected_clients:
                raise Conflict(f"round {r.round_id} is full: it has all {r.expected_clients} expected updates")
            tx.set_round_received(r.round_id, r.received + 1)
            return r.received + 1

    def _finish(
        self, tx: Tx, r: Round, mean: np.ndarray, contributors: int, metadata: dict, created_by: str
    ) -> FinaliseResult:
        """Store base + mean as a new version (when the round has a base) and close the round, in ``tx``."""
        version = None
        if r.base_version_id is not None:
            base = tx.get_version(r.base_version_id)
            assert base is not None and base.embeddings is not None
            with np.errstate(over="ignore"):  # checked below
                new = base.embeddings + mean  # float32, as a client applying mean_update to the base would get
            if not np.isfinite(new).all():
                raise InvalidInput(f"base + mean update of round {r.round_id} overflows float32")
            meta = {**metadata, "round_id": r.round_id, "contributors": contributors}
            version = self._insert_version(
                tx,
                task=r.task,
                base_model=r.base_model,
                embeddings=new,
                text=None,
                parent_id=base.version_id,
                metadata=meta,
                created_by=created_by,
            )
        vid = version.version_id if version else None
        received = r.received if not r.secure else contributors
        tx.close_round(
            r.round_id, state=ROUND_FINALISED, received=received, version_id=vid, closed_unix=float(self.clock())
        )
        tx.delete_updates(r.round_id)
        closed = tx.get_round(r.round_id)
        assert closed is not None
        mean = mean.copy()
        mean.flags.writeable = False
        return FinaliseResult(closed, mean, contributors, version)

    @staticmethod
    def _round_metadata(metadata: dict | None) -> dict:
        metadata = check_metadata(metadata)
        for key in RESERVED_ROUND_KEYS:
            if key in metadata:
                raise InvalidInput(f"metadata key {key!r} is reserved: the server records it")
        return metadata

    def finalise_round(self, *, round_id: str, metadata: dict | None = None, created_by: str) -> FinaliseResult:
        """Close a plain round with the mean of its equally weighted updates (at least ``min_clients`` of them).

        The weights stored with the updates are not read: a round left open by an older server, which took the
        caller's weight, still closes with every update weighing ``UPDATE_WEIGHT``."""
        metadata = self._round_metadata(metadata)
        created_by = check_name(created_by, "created_by")
        with self.store.transaction() as tx:
            r = self._round(tx, round_id, lock=True)
            self._require_open(r)
            if r.secure:
                raise Conflict(f"round {r.round_id} is secure: it is finalised by the secure-aggregation protocol")
            updates = tx.list_updates(r.round_id)
            if len(updates) < r.min_clients:
                raise Conflict(f"round {r.round_id} has {len(updates)} updates, fewer than min_clients {r.min_clients}")
            mean = weighted_mean([(tensor_from(d, r.shape), UPDATE_WEIGHT) for _, d, _ in updates])
            mean = mean.astype(np.float32)
            return self._finish(tx, r, mean, len(updates), metadata, created_by)

    def finalise_secure_round(
        self,
        *,
        round_id: str,
        mean_update: np.ndarray,
        contributors: int,
        metadata: dict | None = None,
        created_by: str,
    ) -> FinaliseResult:
        """Close a secure round with the mean the secure-aggregation protocol unmasked."""
        metadata = self._round_metadata(metadata)
        created_by = check_name(created_by, "created_by")
        contributors = check_positive_int(contributors, "contributors")
        check_delta(mean_update, "mean_update", self.max_elements)
        with self.store.transaction() as tx:
            r = self._round(tx, round_id, lock=True)
            self._require_open(r)
            if not r.secure:
                raise Conflict(f"round {r.round_id} is not secure: finalise it with its plain updates")
            if mean_update.shape != r.shape:
                raise InvalidInput(f"mean_update has shape {mean_update.shape}, round {r.round_id} expects {r.shape}")
            if not r.min_clients <= contributors <= r.expected_clients:
                raise Conflict(
                    f"round {r.round_id} needs {r.min_clients}..{r.expected_clients} contributors, got {contributors}"
                )
            return self._finish(tx, r, np.asarray(mean_update, np.float32), contributors, metadata, created_by)

    def abort_round(self, *, round_id: str, reason: str = "") -> Round:
        if not isinstance(reason, str):
            raise InvalidInput(f"reason must be a string, got {reason!r}")
        with self.store.transaction() as tx:
            r = self._round(tx, round_id, lock=True)
            self._require_open(r)
            tx.close_round(
                r.round_id,
                state=ROUND_ABORTED,
                received=r.received,
                version_id=None,
                closed_unix=float(self.clock()),
                abort_reason=reason,
            )
            tx.delete_updates(r.round_id)
            closed = tx.get_round(r.round_id)
            assert closed is not None
            return closed
