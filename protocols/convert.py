"""Paired ``*_to_proto`` / ``*_from_proto`` functions between ``server.records`` and ``fedprompt.v1`` messages.

Decoding is where untrusted bytes become arrays, so ``tensor_from_proto`` checks the dtype, the shape and the
byte count before it builds anything; whether the values are finite and of the right shape for a round is the
registry's business.
"""

from __future__ import annotations

import json
import math

import numpy as np

from fedprompt.protocols import aggregator_pb2 as pb
from fedprompt.protocols.records import (
    FinaliseResult,
    InvalidInput,
    ModelRef,
    PushResult,
    Round,
    Stream,
    TaskVector,
    Version,
)

_DTYPE_NAMES = {pb.FLOAT16: "float16", pb.BFLOAT16: "bfloat16", pb.FLOAT64: "float64"}
_ROUND_STATES = {"open": pb.OPEN, "finalised": pb.FINALISED, "aborted": pb.ABORTED}


def tensor_to_proto(values: np.ndarray) -> pb.Tensor:
    arr = np.ascontiguousarray(values, dtype="<f4")
    return pb.Tensor(shape=list(arr.shape), dtype=pb.FLOAT32, data=arr.tobytes())


def tensor_from_proto(msg: pb.Tensor, *, max_elements: int | None = None) -> np.ndarray:
    if msg.dtype != pb.FLOAT32:
        name = _DTYPE_NAMES.get(msg.dtype, "unspecified")
        raise InvalidInput(f"tensor dtype {name}: only float32 is accepted")
    shape = tuple(int(d) for d in msg.shape)
    if not shape or any(d <= 0 for d in shape):
        raise InvalidInput(f"tensor shape {list(shape)}: every dimension must be positive")
    count = math.prod(shape)
    if max_elements is not None and count > max_elements:
        raise InvalidInput(f"tensor of {count} values exceeds the server's limit of {max_elements}")
    if len(msg.data) != 4 * count:
        raise InvalidInput(f"tensor data has {len(msg.data)} bytes; shape {list(shape)} in float32 needs {4 * count}")
    return np.frombuffer(msg.data, dtype="<f4").reshape(shape).astype(np.float32)


def model_ref_to_proto(ref: ModelRef) -> pb.ModelRef:
    return pb.ModelRef(model_id=ref.model_id, weights_sha256=ref.weights_sha256)


def model_ref_from_proto(msg: pb.ModelRef) -> ModelRef:
    if not msg.model_id or not msg.weights_sha256:
        raise InvalidInput("the base model needs both a model id and its weights' SHA-256")
    return ModelRef(msg.model_id, msg.weights_sha256)


def metadata_from_json(text: str) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"metadata_json is not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise InvalidInput("metadata_json must be a JSON object")
    return value


def version_to_proto(v: Version, *, include_content: bool = True) -> pb.PromptVersion:
    msg = pb.PromptVersion(
        version_id=v.version_id,
        task=v.task,
        base_model=model_ref_to_proto(v.base_model),
        parent_id=v.parent_id or "",
        metadata_json=json.dumps(v.metadata, sort_keys=True),
        created_unix=v.created_unix,
        created_by=v.created_by,
    )
    if include_content:
        if v.embeddings is not None:
            msg.embeddings.CopyFrom(tensor_to_proto(v.embeddings))
        else:
            msg.text = v.text or ""
    return msg


def version_from_proto(msg: pb.PromptVersion) -> Version:
    kind = msg.WhichOneof("content")
    return Version(
        version_id=msg.version_id,
        task=msg.task,
        base_model=model_ref_from_proto(msg.base_model),
        embeddings=tensor_from_proto(msg.embeddings) if kind == "embeddings" else None,
        text=msg.text if kind == "text" else None,
        parent_id=msg.parent_id or None,
        metadata=metadata_from_json(msg.metadata_json),
        created_unix=msg.created_unix,
        created_by=msg.created_by,
    )


def task_vector_to_proto(t: TaskVector) -> pb.TaskVector:
    return pb.TaskVector(
        vector_id=t.vector_id,
        task=t.task,
        origin_id=t.origin_id,
        tuned_id=t.tuned_id,
        base_model=model_ref_to_proto(t.base_model),
        tau=tensor_to_proto(t.tau),
        created_unix=t.created_unix,
        created_by=t.created_by,
    )


def task_vector_from_proto(msg: pb.TaskVector) -> TaskVector:
    return TaskVector(
        vector_id=msg.vector_id,
        task=msg.task,
        origin_id=msg.origin_id,
        tuned_id=msg.tuned_id,
        base_model=model_ref_from_proto(msg.base_model),
        tau=tensor_from_proto(msg.tau),
        created_unix=msg.created_unix,
        created_by=msg.created_by,
    )


def round_to_proto(r: Round) -> pb.Round:
    return pb.Round(
        round_id=r.round_id,
        task=r.task,
        base_model=model_ref_to_proto(r.base_model),
        shape=list(r.shape),
        expected_clients=r.expected_clients,
        secure=r.secure,
        base_version_id=r.base_version_id or "",
        state=_ROUND_STATES[r.state],
        received=r.received,
        version_id=r.version_id or "",
        min_clients=r.min_clients,
    )


def round_from_proto(msg: pb.Round) -> Round:
    state = {v: k for k, v in _ROUND_STATES.items()}.get(msg.state)
    if state is None:
        raise InvalidInput(f"round state {msg.state} is unknown")
    return Round(
        round_id=msg.round_id,
        task=msg.task,
        base_model=model_ref_from_proto(msg.base_model),
        shape=tuple(msg.shape),
        expected_clients=msg.expected_clients,
        secure=msg.secure,
        base_version_id=msg.base_version_id or None,
        state=state,
        received=msg.received,
        version_id=msg.version_id or None,
        min_clients=msg.min_clients,
    )


def finalise_result_to_proto(f: FinaliseResult) -> pb.FinaliseRoundResponse:
    msg = pb.FinaliseRoundResponse(
        round=round_to_proto(f.round), mean_update=tensor_to_proto(f.mean_update), contributors=f.contributors
    )
    if f.version is not None:
        msg.version.CopyFrom(version_to_proto(f.version))
    return msg


def finalise_result_from_proto(msg: pb.FinaliseRoundResponse) -> FinaliseResult:
    return FinaliseResult(
        round=round_from_proto(msg.round),
        mean_update=tensor_from_proto(msg.mean_update),
        contributors=msg.contributors,
        version=version_from_proto(msg.version) if msg.HasField("version") else None,
    )


def stream_to_proto(s: Stream) -> pb.AsyncStream:
    return pb.AsyncStream(
        stream_id=s.stream_id,
        task=s.task,
        base_model=model_ref_to_proto(s.base_model),
        head_version_id=s.head_version_id,
        generation=s.generation,
        buffered=s.buffered,
        buffer_size=s.buffer_size,
        staleness_exponent=s.staleness_exponent,
        server_learning_rate=s.server_learning_rate,
    )


def stream_from_proto(msg: pb.AsyncStream) -> Stream:
    return Stream(
        stream_id=msg.stream_id,
        task=msg.task,
        base_model=model_ref_from_proto(msg.base_model),
        head_version_id=msg.head_version_id,
        generation=msg.generation,
        buffered=msg.buffered,
        buffer_size=msg.buffer_size,
        staleness_exponent=msg.staleness_exponent,
        server_learning_rate=msg.server_learning_rate,
    )


def push_result_to_proto(p: PushResult) -> pb.PushUpdateResponse:
    return pb.PushUpdateResponse(
        stream=stream_to_proto(p.stream), staleness=p.staleness, merged_version_id=p.merged_version_id or ""
    )


def push_result_from_proto(msg: pb.PushUpdateResponse) -> PushResult:
    return PushResult(
        stream=stream_from_proto(msg.stream), staleness=msg.staleness, merged_version_id=msg.merged_version_id or None
    )
