"""The aggregation server (``fedprompt aggregator``): a ``grpc.aio`` server in front of the registry.

Who may call: mutual TLS with the federation's CA (``fedprompt certs``); a client without a certificate from
that CA is refused in the handshake. The caller's identity is its certificate's common name: ``coordinator``
(opens and finalises rounds, relays secure aggregation, opens asynchronous streams, publishes versions and
task vectors, composes) or ``node:<name>`` for a data holder listed in the certificate folder's ``nodes/``
(submits updates to the rounds that name it, pushes to streams, reads). Whether a holder's key is still in
the folder is checked on every call: removing its folder revokes it at its next call (UNAUTHENTICATED), even
though its certificate still verifies.

Every call is rate-limited per identity (token bucket), refused when its deadline has already passed, and
bounded in size (gRPC's own maximum message size, set explicitly on both directions). The registry runs in
worker threads; its errors map to gRPC status codes (``FedPromptError.status``). On SIGTERM the health status
turns NOT_SERVING, calls in flight get ``--grace`` seconds, then the store closes; a round interrupted by a
kill stays open in the store with the updates it had (plain rounds) and no version is ever half-written (one
transaction). Secure rounds keep their protocol state in memory: a restart aborts them.

Health: the standard ``grpc.health.v1`` service on the TLS port and, with ``--health-port``, alone on a
plaintext port for probes that cannot present a client certificate (kubelet's gRPC probe).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from fedprompt import certs
from fedprompt.errors import FedPromptError
from fedprompt.protocols import aggregator_pb2 as pb
from fedprompt.protocols import aggregator_pb2_grpc as pb_grpc
from fedprompt.protocols import convert
from fedprompt.protocols.aggregator_client import DEFAULT_PORT
from fedprompt.server.aggregation.registry import Registry
from fedprompt.server.aggregation.secagg_rounds import JOIN_TIMEOUT_S, STAGE_TIMEOUT_S, SecureRounds
from fedprompt.server.aggregation.store import open_store

SERVICE_NAMES = ("fedprompt.v1.PromptRegistry", "fedprompt.v1.RoundAggregation")
# Holders get PERMISSION_DENIED for these. Publishing is here because a version's model, hash, width and
# metadata (its privacy spend) are the publisher's claims: only the coordinator's are stored.
COORDINATOR_ONLY = {
    "OpenRound",
    "FinaliseRound",
    "AbortRound",
    "AwaitSecureRound",
    "OpenAsyncStream",
    "PublishVersion",
    "PublishTaskVector",
    "Compose",
}


@dataclass
class AggregatorSettings:
    certs_dir: Path
    store: str  # a SQLite file path or a postgresql:// URL
    listen: str = f"127.0.0.1:{DEFAULT_PORT}"
    health_listen: str | None = None
    max_message_bytes: int = 16 * 1024 * 1024
    max_elements: int = 1 << 22
    rate_per_second: float = 50.0
    burst: int = 100
    secagg_join_timeout_s: float = JOIN_TIMEOUT_S  # a secure round waits this long for the slowest trainer
    secagg_stage_timeout_s: float = STAGE_TIMEOUT_S  # then each stage this long for a holder that went silent
    grace_seconds: float = 10.0


class RateLimiter:
    """A token bucket per identity: a misbehaving client slows itself down, not the others."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self.clock = rate, burst, clock
        self.buckets: dict[str, tuple[float, float]] = {}

    def allow(self, who: str) -> bool:
        now = self.clock()
        tokens, last = self.buckets.get(who, (float(self.burst), now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens < 1.0:
            self.buckets[who] = (tokens, now)
            return False
        self.buckets[who] = (tokens - 1.0, now)
        return True


class Gate:
    """Identity from the client certificate, authorisation by role, and the rate limit."""

    def __init__(self, certs_dir: Path, limiter: RateLimiter) -> None:
        self.certs_dir, self.limiter = Path(certs_dir), limiter

    def _node_known(self, name: str) -> bool:
        """Whether the node's public key is in the folder now, as ``certs.node_public_keys`` would list it
        (``nodes/NAME/node.pub``, or the flat ``node.NAME.pub``), found by name: a stat or two per call and no
        cache, so a removed folder refuses the node's very next call and an added one is admitted at once."""
        if not name or name in (".", "..") or any(c in name for c in "/\\\0"):  # one path component only
            return False
        # os.path.exists: False (not an exception) for any error, a name too long for the file system included
        if os.path.exists(self.certs_dir / "nodes" / name / "node.pub"):
            return True
        return set(name) <= certs.NODE_NAME_CHARS and os.path.exists(self.certs_dir / f"node.{name}.pub")

    async def admit(self, context: grpc.aio.ServicerContext, method: str) -> str:
        names = context.auth_context().get("x509_common_name") or []
        cn = names[0].decode() if names else ""
        # first, so that a caller whose name is unknown (a revoked node) spends its tokens like any other and
        # cannot make the server look in the folder faster than the rate allows
        if not self.limiter.allow(cn):
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"rate limit for {cn!r}: slow down and retry")
        if cn == certs.COORDINATOR_CN:
            who = cn
        elif cn.startswith(certs.NODE_CN_PREFIX) and self._node_known(cn[len(certs.NODE_CN_PREFIX) :]):
            who = cn[len(certs.NODE_CN_PREFIX) :]
            if method in COORDINATOR_ONLY:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{method} is for the coordinator only")
        else:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"unknown client identity {cn!r}")
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed before the call started")
        return who


class _Base:
    def __init__(self, registry: Registry, gate: Gate, max_elements: int) -> None:
        self.registry, self.gate, self.max_elements = registry, gate, max_elements

    async def _run(self, context, method: str, work: Callable[[str], Any]) -> Any:
        """Admit the caller, run ``work(identity)`` in a thread, map registry errors to status codes."""
        who = await self.gate.admit(context, method)
        try:
            return await asyncio.to_thread(work, who)
        except FedPromptError as exc:  # a refusal: bad input, a malformed secure-aggregation message, an abort
            await context.abort(getattr(grpc.StatusCode, exc.status), str(exc))

    async def _mapped(self, context, awaitable) -> Any:
        """Await ``awaitable`` and map fedprompt's errors to status codes, as ``_run`` does for thread work."""
        try:
            return await awaitable
        except FedPromptError as exc:
            await context.abort(getattr(grpc.StatusCode, exc.status), str(exc))

    def tensor(self, msg: pb.Tensor):
        return convert.tensor_from_proto(msg, max_elements=self.max_elements)


class RegistryService(_Base, pb_grpc.PromptRegistryServicer):
    async def PublishVersion(self, request: pb.PublishVersionRequest, context) -> pb.PromptVersion:
        def work(who: str) -> pb.PromptVersion:
            kind = request.WhichOneof("content")
            v = self.registry.publish_version(
                task=request.task,
                base_model=convert.model_ref_from_proto(request.base_model),
                embeddings=self.tensor(request.embeddings) if kind == "embeddings" else None,
                text=request.text if kind == "text" else None,
                parent_id=request.parent_id or None,
                metadata=convert.metadata_from_json(request.metadata_json),
                created_by=who,
            )
            return convert.version_to_proto(v)

        return await self._run(context, "PublishVersion", work)

    async def GetVersion(self, request: pb.GetVersionRequest, context) -> pb.PromptVersion:
        return await self._run(
            context, "GetVersion", lambda who: convert.version_to_proto(self.registry.get_version(request.version_id))
        )

    async def ListVersions(self, request: pb.ListVersionsRequest, context) -> pb.ListVersionsResponse:
        def work(who: str) -> pb.ListVersionsResponse:
            found = self.registry.list_versions(
                task=request.task or None, model_id=request.model_id or None, include_content=request.include_content
            )
            return pb.ListVersionsResponse(
                versions=[convert.version_to_proto(v, include_content=request.include_content) for v in found]
            )

        return await self._run(context, "ListVersions", work)

    async def PublishTaskVector(self, request: pb.PublishTaskVectorRequest, context) -> pb.TaskVector:
        def work(who: str) -> pb.TaskVector:
            t = self.registry.publish_task_vector(
                task=request.task, tuned_id=request.tuned_id, origin_id=request.origin_id, created_by=who
            )
            return convert.task_vector_to_proto(t)

        return await self._run(context, "PublishTaskVector", work)

    async def ListTaskVectors(self, request: pb.ListTaskVectorsRequest, context) -> pb.ListTaskVectorsResponse:
        def work(who: str) -> pb.ListTaskVectorsResponse:
            found = self.registry.list_task_vectors(origin_id=request.origin_id or None, task=request.task or None)
            return pb.ListTaskVectorsResponse(vectors=[convert.task_vector_to_proto(t) for t in found])

        return await self._run(context, "ListTaskVectors", work)

    async def Compose(self, request: pb.ComposeRequest, context) -> pb.PromptVersion:
        def work(who: str) -> pb.PromptVersion:
            terms = [(t.vector_id, t.weight) for t in request.terms]
            v = self.registry.compose(origin_id=request.origin_id, terms=terms, task=request.task, created_by=who)
            return convert.version_to_proto(v)

        return await self._run(context, "Compose", work)


class RoundService(_Base, pb_grpc.RoundAggregationServicer):
    def __init__(self, registry: Registry, gate: Gate, max_elements: int, secure: SecureRounds) -> None:
        super().__init__(registry, gate, max_elements)
        self.secure = secure

    async def OpenRound(self, request: pb.OpenRoundRequest, context) -> pb.Round:
        def work(who: str) -> pb.Round:
            r = self.registry.open_round(
                task=request.task,
                base_model=convert.model_ref_from_proto(request.base_model),
                shape=tuple(request.shape),
                expected_clients=request.expected_clients,
                secure=request.secure,
                base_version_id=request.base_version_id or None,
                participants=list(request.participants),
                clip_range=request.clip_range,
                min_clients=request.min_clients or request.expected_clients,
                created_by=who,
            )
            return convert.round_to_proto(r)

        return await self._run(context, "OpenRound", work)

    async def GetRound(self, request: pb.GetRoundRequest, context) -> pb.Round:
        return await self._run(
            context, "GetRound", lambda who: convert.round_to_proto(self.registry.get_round(request.round_id))
        )

    async def SubmitUpdate(self, request: pb.SubmitUpdateRequest, context) -> pb.SubmitUpdateResponse:
        def work(who: str) -> pb.SubmitUpdateResponse:  # the registry checks participation in its transaction
            received = self.registry.submit_update(
                round_id=request.round_id,
                client=who,
                base_model=convert.model_ref_from_proto(request.base_model),
                delta=self.tensor(request.delta),
            )  # request.weight is ignored: every update weighs the same
            return pb.SubmitUpdateResponse(round_id=request.round_id, received=received)

        return await self._run(context, "SubmitUpdate", work)

    async def FinaliseRound(self, request: pb.FinaliseRoundRequest, context) -> pb.FinaliseRoundResponse:
        def work(who: str) -> pb.FinaliseRoundResponse:
            metadata = convert.metadata_from_json(request.metadata_json)
            done = self.registry.finalise_round(round_id=request.round_id, metadata=metadata, created_by=who)
            return convert.finalise_result_to_proto(done)

        return await self._run(context, "FinaliseRound", work)

    async def AbortRound(self, request: pb.AbortRoundRequest, context) -> pb.Round:
        def work(who: str) -> pb.Round:
            return convert.round_to_proto(self.registry.abort_round(round_id=request.round_id, reason=request.reason))

        aborted = await self._run(context, "AbortRound", work)
        await self.secure.abort(request.round_id, request.reason)
        return aborted

    async def SecAggExchange(self, request: pb.SecAggExchangeRequest, context) -> pb.SecAggExchangeResponse:
        """A holder's stage of a secure round; waits (in the event loop, no thread held) for the stage to end."""
        who = await self.gate.admit(context, "SecAggExchange")
        return await self._mapped(context, self.secure.exchange(request, caller=who))

    async def AwaitSecureRound(self, request: pb.AwaitSecureRoundRequest, context) -> pb.FinaliseRoundResponse:
        await self.gate.admit(context, "AwaitSecureRound")
        wait = min(max(request.wait_seconds, 0.0), max(0.0, (context.time_remaining() or 3600.0) - 1.0))
        done = await self._mapped(context, self.secure.await_result(request.round_id, wait))
        return convert.finalise_result_to_proto(done)

    async def OpenAsyncStream(self, request: pb.OpenAsyncStreamRequest, context) -> pb.AsyncStream:
        def work(who: str) -> pb.AsyncStream:
            s = self.registry.open_stream(
                task=request.task,
                base_model=convert.model_ref_from_proto(request.base_model),
                head_version_id=request.head_version_id,
                buffer_size=request.buffer_size,
                staleness_exponent=request.staleness_exponent,
                server_learning_rate=request.server_learning_rate or 1.0,
                created_by=who,
            )
            return convert.stream_to_proto(s)

        return await self._run(context, "OpenAsyncStream", work)

    async def GetAsyncStream(self, request: pb.GetAsyncStreamRequest, context) -> pb.AsyncStream:
        return await self._run(
            context, "GetAsyncStream", lambda who: convert.stream_to_proto(self.registry.get_stream(request.stream_id))
        )

    async def PushUpdate(self, request: pb.PushUpdateRequest, context) -> pb.PushUpdateResponse:
        def work(who: str) -> pb.PushUpdateResponse:
            done = self.registry.push_update(
                stream_id=request.stream_id,
                client=who,
                base_model=convert.model_ref_from_proto(request.base_model),
                base_version_id=request.base_version_id,
                delta=self.tensor(request.delta),
            )  # request.weight is ignored: the server weighs by staleness alone
            return convert.push_result_to_proto(done)

        return await self._run(context, "PushUpdate", work)


def server_credentials(certs_dir: Path) -> grpc.ServerCredentials:
    for name in ("ca.crt", "server.crt", "server.key"):
        if not (certs_dir / name).is_file():
            raise FileNotFoundError(f"{certs_dir / name} is missing: run `fedprompt certs` first")
    return grpc.ssl_server_credentials(
        [((certs_dir / "server.key").read_bytes(), (certs_dir / "server.crt").read_bytes())],
        root_certificates=(certs_dir / "ca.crt").read_bytes(),
        require_client_auth=True,
    )


def message_options(max_bytes: int) -> list[tuple[str, int]]:
    return [("grpc.max_receive_message_length", max_bytes), ("grpc.max_send_message_length", max_bytes)]


class Aggregator:
    """The running server: ``await start()``, then ``await wait()`` or ``await stop()``."""

    def __init__(self, settings: AggregatorSettings) -> None:
        self.settings = settings
        self.store = open_store(settings.store)
        self.registry = Registry(self.store, max_elements=settings.max_elements)
        self.health = health.aio.HealthServicer()
        gate = Gate(Path(settings.certs_dir), RateLimiter(settings.rate_per_second, settings.burst))
        secure = SecureRounds(
            self.registry,
            gate.certs_dir,
            join_timeout=settings.secagg_join_timeout_s,
            stage_timeout=settings.secagg_stage_timeout_s,
        )
        self.rounds = RoundService(self.registry, gate, settings.max_elements, secure)
        self.prompts = RegistryService(self.registry, gate, settings.max_elements)
        self.server: grpc.aio.Server | None = None
        self.health_server: grpc.aio.Server | None = None
        self.port = 0
        self.health_port = 0

    async def start(self) -> None:
        s = self.settings
        self.server = grpc.aio.server(options=message_options(s.max_message_bytes))
        pb_grpc.add_PromptRegistryServicer_to_server(self.prompts, self.server)
        pb_grpc.add_RoundAggregationServicer_to_server(self.rounds, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = self.server.add_secure_port(s.listen, server_credentials(Path(s.certs_dir)))
        if self.port == 0:
            raise OSError(f"cannot listen on {s.listen}")
        if s.health_listen:
            self.health_server = grpc.aio.server(options=message_options(64 * 1024))
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)
            self.health_port = self.health_server.add_insecure_port(s.health_listen)
            await self.health_server.start()
        await self.server.start()
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self) -> None:
        await self.health.enter_graceful_shutdown()
        if self.server is not None:
            await self.server.stop(self.settings.grace_seconds)
        if self.health_server is not None:
            await self.health_server.stop(0)
        self.store.close()

    async def serve_forever(self, on_ready: Callable[[Aggregator], Awaitable[None] | None] | None = None) -> None:
        await self.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if on_ready is not None:
            maybe = on_ready(self)
            if maybe is not None:
                await maybe
        await stop.wait()
        print(f"shutting down: {self.settings.grace_seconds:.0f} s for the calls in flight", flush=True)
        await self.stop()
        print("stopped; the store is closed", flush=True)
