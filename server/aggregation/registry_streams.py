"""Asynchronous streams of the registry: updates are buffered as they come and merged every K of them.

An update trained from an older head is weighted down by (1 + staleness) ** -exponent, so late clients still
count but cannot drag the head back (FedBuff-style buffered asynchronous aggregation). That is the only
weight: every update starts from the same base weight (``UPDATE_WEIGHT``) and the server computes the discount
from the generations it recorded; nothing the caller says about its update changes how much it counts.
"""

from __future__ import annotations

import uuid

import numpy as np

from fedprompt.protocols.records import (
    Conflict,
    InvalidInput,
    ModelRef,
    PushResult,
    Stream,
)
from fedprompt.server.aggregation.registry_checks import (
    check_delta,
    check_model,
    check_name,
    check_positive_int,
    check_real,
    found,
    record_id,
)
from fedprompt.server.aggregation.registry_rounds import UPDATE_WEIGHT, RegistryPart, weighted_mean
from fedprompt.server.aggregation.store import Tx, tensor_bytes, tensor_from

MERGED_BY = "aggregation-server"  # the author of a merged head: the server computed it


def _staleness_weight(staleness: int, exponent: float) -> float:
    """The weight of an update trained ``staleness`` generations before the head: (1 + s) ** -a."""
    return UPDATE_WEIGHT * (1.0 + staleness) ** (-exponent)


class StreamsMixin(RegistryPart):
    """Mixed into ``Registry``: open streams and push updates to them."""

    def open_stream(
        self,
        *,
        task: str,
        base_model: ModelRef,
        head_version_id: str,
        buffer_size: int,
        staleness_exponent: float = 0.5,
        server_learning_rate: float = 1.0,
        created_by: str,
    ) -> Stream:
        task = check_name(task, "task")
        check_model(base_model)
        created_by = check_name(created_by, "created_by")
        buffer_size = check_positive_int(buffer_size, "buffer_size")
        exponent = check_real(staleness_exponent, "staleness_exponent")
        if exponent < 0:
            raise InvalidInput(f"staleness_exponent must be >= 0, got {staleness_exponent!r}")
        lr = check_real(server_learning_rate, "server_learning_rate", positive=True)
        with self.store.transaction() as tx:
            head = self._resolve(tx, head_version_id, "head version")
            if head.embeddings is None:
                raise Conflict(f"head version {head.version_id} is a text prompt; streams aggregate soft prompts")
            if head.base_model != base_model:
                raise Conflict(f"head version {head.version_id} belongs to {head.base_model}, not {base_model}")
            s = Stream(uuid.uuid4().hex, task, base_model, head.version_id, 0, 0, buffer_size, exponent, lr)
            tx.insert_stream(s, created_by, float(self.clock()))
            tx.add_stream_version(s.stream_id, head.version_id, 0)
            return s

    def _stream(self, tx: Tx, stream_id: str, *, lock: bool = False) -> Stream:
        return found(tx.get_stream(record_id(stream_id, "stream"), lock=lock), "stream", stream_id)

    def get_stream(self, stream_id: str) -> Stream:
        with self.store.transaction(write=False) as tx:
            return self._stream(tx, stream_id)

    def push_update(
        self,
        *,
        stream_id: str,
        client: str,
        base_model: ModelRef,
        base_version_id: str,
        delta: np.ndarray,
    ) -> PushResult:
        """Buffer one update, weighted down by its staleness alone; the K-th buffered update merges the buffer."""
        client = check_name(client, "client")
        check_model(base_model)
        check_delta(delta, "delta", self.max_elements)
        if not isinstance(base_version_id, str) or not base_version_id:
            raise InvalidInput(
                f"base_version_id must name the version the client trained from, got {base_version_id!r}"
            )
        with self.store.transaction() as tx:
            s = self._stream(tx, stream_id, lock=True)
            if base_model != s.base_model:
                raise Conflict(f"stream {s.stream_id} aggregates {s.base_model}, the update is for {base_model}")
            head = tx.get_version(s.head_version_id)
            assert head is not None and head.embeddings is not None
            if delta.shape != head.embeddings.shape:
                raise InvalidInput(
                    f"delta has shape {delta.shape}, stream {s.stream_id} expects {head.embeddings.shape}"
                )
            base = self._resolve(tx, base_version_id, "base version")
            generation = tx.stream_generation(s.stream_id, base.version_id)
            if generation is None:
                raise Conflict(f"version {base.version_id} was never the head of stream {s.stream_id}")
            staleness = s.generation - generation
            scaled = _staleness_weight(staleness, s.staleness_exponent)
            tx.insert_buffered(s.stream_id, s.buffered, client, tensor_bytes(delta), scaled, staleness)
            merged = None
            if s.buffered + 1 >= s.buffer_size:
                buffered = tx.list_buffered(s.stream_id)
                # recomputed from the recorded staleness, not read back: a buffer an older server filled with
                # its callers' weights merges with the server's weights all the same
                step = weighted_mean(
                    [
                        (tensor_from(d, head.embeddings.shape), _staleness_weight(st, s.staleness_exponent))
                        for _, d, _, st in buffered
                    ]
                )
                with np.errstate(over="ignore"):  # checked below
                    new = (head.embeddings.astype(np.float64) + s.server_learning_rate * step).astype(np.float32)
                if not np.isfinite(new).all():
                    raise InvalidInput(f"merging the buffer of stream {s.stream_id} overflows float32")
                meta = {
                    "stream_id": s.stream_id,
                    "generation": s.generation + 1,
                    "updates": [{"client": c, "staleness": st} for c, _, _, st in buffered],
                }
                version = self._insert_version(
                    tx,
                    task=s.task,
                    base_model=s.base_model,
                    embeddings=new,
                    text=None,
                    parent_id=head.version_id,
                    metadata=meta,
                    created_by=MERGED_BY,  # the server computed this version; its metadata is no one's claim
                )
                tx.add_stream_version(s.stream_id, version.version_id, s.generation + 1)
                tx.set_stream_head(s.stream_id, version.version_id, s.generation + 1)
                tx.clear_buffer(s.stream_id)
                merged = version.version_id
            after = tx.get_stream(s.stream_id)
            assert after is not None
            return PushResult(after, staleness, merged)
