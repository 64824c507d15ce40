"""A blocking client of the aggregation server for the CLI, the coordinator and the holders.

It authenticates with the certificate folder of ``fedprompt certs``: ``coordinator.crt`` for the coordinator,
``nodes/<name>/client.crt`` for a data holder. gRPC failures come back as ``AggregatorError`` carrying the
status code name and the server's message, which the CLI prints as they are.

Updates carry no weight of the caller's choosing: the server weighs every update of a round the same (and a
stream's by staleness alone). The requests' ``weight`` fields are still set to 1.0, which the server ignores,
so that a server from before that change (which refused a weight <= 0) accepts them too.
"""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import numpy as np

from fedprompt import certs
from fedprompt.errors import FedPromptError
from fedprompt.protocols import aggregator_pb2 as pb
from fedprompt.protocols import aggregator_pb2_grpc as pb_grpc
from fedprompt.protocols import convert
from fedprompt.protocols.records import FinaliseResult, ModelRef, PushResult, Round, Stream, TaskVector, Version

DEFAULT_PORT = 9094  # the aggregation server's port, everywhere a default address is made
DEFAULT_TIMEOUT = 30.0
_IGNORED_WEIGHT = 1.0  # see the module docstring
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


class AggregatorError(FedPromptError):
    def __init__(self, method: str, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"aggregation server: {method} failed with {code.name}: {details}")
        self.code = code
        self.details = details


def identity_files(certs_dir: str | Path, identity: str) -> tuple[Path, Path, Path]:
    """(CA certificate, client certificate, its key) of ``identity`` in a certificate folder."""
    folder = Path(certs_dir)
    if identity == certs.COORDINATOR_CN:
        return folder / "ca.crt", folder / "coordinator.crt", folder / "coordinator.key"
    files = certs.node_files(folder, identity)
    return folder / "ca.crt", files.client_cert, files.client_key


def channel_credentials(ca: Path, cert: Path, key: Path) -> grpc.ChannelCredentials:
    for p in (ca, cert, key):
        if not p.is_file():
            raise FedPromptError(f"{p} is missing: run `fedprompt certs` (a client certificate of the federation)")
    return grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(), private_key=key.read_bytes(), certificate_chain=cert.read_bytes()
    )


class AggregatorClient:
    def __init__(
        self,
        address: str,
        certs_dir: str | Path | None,
        identity: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        files: tuple[Path, Path, Path] | None = None,
    ) -> None:
        """``identity`` in the certificate folder ``certs_dir``, or given as ``files`` (CA, certificate, key)."""
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ]
        creds = channel_credentials(*(files or identity_files(certs_dir, identity)))
        self.channel = grpc.secure_channel(address, creds, options=options)
        self.registry = pb_grpc.PromptRegistryStub(self.channel)
        self.rounds = pb_grpc.RoundAggregationStub(self.channel)
        self.timeout = timeout
        self.address = address

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> AggregatorClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, stub, method: str, request, timeout: float | None = None):
        try:
            return getattr(stub, method)(request, timeout=timeout or self.timeout)
        except grpc.RpcError as exc:
            raise AggregatorError(method, exc.code(), exc.details() or "") from None

    # registry
    def publish_version(
        self,
        *,
        task: str,
        base_model: ModelRef,
        embeddings: np.ndarray | None = None,
        text: str | None = None,
        parent_id: str | None = None,
        metadata: dict | None = None,
    ) -> Version:
        req = pb.PublishVersionRequest(
            task=task,
            base_model=convert.model_ref_to_proto(base_model),
            parent_id=parent_id or "",
            metadata_json=json.dumps(metadata or {}, sort_keys=True),
        )
        if embeddings is not None:
            req.embeddings.CopyFrom(convert.tensor_to_proto(embeddings))
        if text is not None:
            req.text = text
        return convert.version_from_proto(self._call(self.registry, "PublishVersion", req))

    def publish_artifact(self, weight: np.ndarray, meta: dict, *, parent_id: str | None = None) -> Version:
        """Store a soft-prompt artifact (its weight and ``asdict(ArtifactMeta)``) as a version."""
        return self.publish_version(
            task=meta["task"],
            base_model=ModelRef(meta["base_model_id"], meta["base_model_sha256"]),
            embeddings=weight,
            parent_id=parent_id,
            metadata=meta,
        )

    def get_version(self, version_id: str) -> Version:
        msg = self._call(self.registry, "GetVersion", pb.GetVersionRequest(version_id=version_id))
        return convert.version_from_proto(msg)

    def list_versions(self, *, task: str = "", model_id: str = "") -> list[pb.PromptVersion]:
        req = pb.ListVersionsRequest(task=task, model_id=model_id, include_content=False)
        return list(self._call(self.registry, "ListVersions", req).versions)

    def publish_task_vector(self, *, task: str, tuned_id: str, origin_id: str) -> TaskVector:
        req = pb.PublishTaskVectorRequest(task=task, tuned_id=tuned_id, origin_id=origin_id)
        return convert.task_vector_from_proto(self._call(self.registry, "PublishTaskVector", req))

    def list_task_vectors(self, *, origin_id: str = "", task: str = "") -> list[TaskVector]:
        req = pb.ListTaskVectorsRequest(origin_id=origin_id, task=task)
        return [convert.task_vector_from_proto(v) for v in self._call(self.registry, "ListTaskVectors", req).vectors]

    def compose(self, *, origin_id: str, terms: list[tuple[str, float]], task: str) -> Version:
        req = pb.ComposeRequest(
            origin_id=origin_id, task=task, terms=[pb.ComposeTerm(vector_id=v, weight=w) for v, w in terms]
        )
        return convert.version_from_proto(self._call(self.registry, "Compose", req))

    # rounds
    def open_round(
        self,
        *,
        task: str,
        base_model: ModelRef,
        shape: tuple[int, ...],
        expected_clients: int,
        secure: bool = False,
        base_version_id: str | None = None,
        participants: list[str] | None = None,
        clip_range: float = 0.0,
        min_clients: int = 0,
    ) -> Round:
        req = pb.OpenRoundRequest(
            task=task,
            base_model=convert.model_ref_to_proto(base_model),
            shape=list(shape),
            expected_clients=expected_clients,
            secure=secure,
            base_version_id=base_version_id or "",
            participants=participants or [],
            clip_range=clip_range,
            min_clients=min_clients,
        )
        return convert.round_from_proto(self._call(self.rounds, "OpenRound", req))

    def get_round(self, round_id: str) -> Round:
        return convert.round_from_proto(self._call(self.rounds, "GetRound", pb.GetRoundRequest(round_id=round_id)))

    def submit_update(self, *, round_id: str, base_model: ModelRef, delta: np.ndarray) -> int:
        """Send this holder's update to a round that names it; returns how many updates the round has."""
        req = pb.SubmitUpdateRequest(
            round_id=round_id,
            base_model=convert.model_ref_to_proto(base_model),
            delta=convert.tensor_to_proto(delta),
            weight=_IGNORED_WEIGHT,
        )
        return self._call(self.rounds, "SubmitUpdate", req).received

    def finalise_round(self, round_id: str, metadata: dict | None = None) -> FinaliseResult:
        req = pb.FinaliseRoundRequest(round_id=round_id, metadata_json=json.dumps(metadata or {}, sort_keys=True))
        return convert.finalise_result_from_proto(self._call(self.rounds, "FinaliseRound", req))

    def abort_round(self, round_id: str, reason: str) -> Round:
        req = pb.AbortRoundRequest(round_id=round_id, reason=reason)
        return convert.round_from_proto(self._call(self.rounds, "AbortRound", req))

    def secagg_exchange(
        self, round_id: str, stage: int, message=None, *, decline: bool = False, timeout: float | None = None
    ) -> pb.SecAggExchangeResponse:
        """A holder's reply to stage ``stage - 1`` of a secure round (stage 0: ask for the setup); returns its
        request for the next stage once that stage is complete. ``decline``: this holder will not take part."""
        req = pb.SecAggExchangeRequest(round_id=round_id, stage=stage, decline=decline)
        if message is not None:
            req.message.CopyFrom(message)
        return self._call(self.rounds, "SecAggExchange", req, timeout=timeout)

    def await_secure_round(self, round_id: str, wait_seconds: float) -> FinaliseResult:
        """The coordinator's wait for a secure round the holders run with the server: its mean."""
        req = pb.AwaitSecureRoundRequest(round_id=round_id, wait_seconds=wait_seconds)
        resp = self._call(self.rounds, "AwaitSecureRound", req, timeout=wait_seconds + 30)
        return convert.finalise_result_from_proto(resp)

    def open_stream(
        self,
        *,
        task: str,
        base_model: ModelRef,
        head_version_id: str,
        buffer_size: int,
        staleness_exponent: float = 0.5,
        server_learning_rate: float = 1.0,
    ) -> Stream:
        req = pb.OpenAsyncStreamRequest(
            task=task,
            base_model=convert.model_ref_to_proto(base_model),
            head_version_id=head_version_id,
            buffer_size=buffer_size,
            staleness_exponent=staleness_exponent,
            server_learning_rate=server_learning_rate,
        )
        return convert.stream_from_proto(self._call(self.rounds, "OpenAsyncStream", req))

    def push_update(
        self, *, stream_id: str, base_model: ModelRef, base_version_id: str, delta: np.ndarray
    ) -> PushResult:
        req = pb.PushUpdateRequest(
            stream_id=stream_id,
            base_model=convert.model_ref_to_proto(base_model),
            base_version_id=base_version_id,
            delta=convert.tensor_to_proto(delta),
            weight=_IGNORED_WEIGHT,
        )
        return convert.push_result_from_proto(self._call(self.rounds, "PushUpdate", req))
