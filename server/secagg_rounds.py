"""Secure rounds on the aggregation server: it plays the SecAgg+ server; the coordinator only relays.

The coordinator calls ``SecAggStep`` with the replies its Flower messages brought back and forwards the
requests it gets to the clients. The per-round protocol state (who advertised which keys, which masked inputs
arrived) lives here, in memory, so the coordinator never holds anything that could unmask a single update; it
receives the mean of the survivors' updates when the last stage completes.

Key advertisements and the survivors of the consistency round are signed with the holders' node identity keys
and checked here against ``nodes/<name>/node.pub`` in the certificate folder (and, what matters against a
malicious server, by every holder against its own copy of those keys). Every participant must be a registered
node. A round that fails (a client's material, too many dropouts, an out-of-order call) is aborted in the
registry and forgotten here; its caller gets ABORTED with the reason.
"""

from __future__ import annotations

import math
import threading
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives import serialization

from fedprompt import certs
from fedprompt.protocols import aggregator_pb2 as pb
from fedprompt.protocols import convert
from fedprompt.protocols.secagg import LAST_STAGE, SecAggAbort
from fedprompt.protocols.secagg_server import SecAggServer
from fedprompt.server.records import ROUND_OPEN, Conflict, InvalidInput
from fedprompt.server.registry import Registry


class _Session:
    def __init__(self, server: SecAggServer) -> None:
        self.server = server
        self.next_stage = 1
        self.lock = threading.Lock()


class SecureRounds:
    def __init__(self, registry: Registry, certs_dir: Path) -> None:
        self.registry, self.certs_dir = registry, Path(certs_dir)
        self.sessions: dict[str, _Session] = {}
        self.lock = threading.Lock()

    def forget(self, round_id: str) -> None:
        with self.lock:
            self.sessions.pop(round_id, None)

    def _identities(self, participants: tuple[str, ...]) -> dict[int, tuple[str, object]]:
        registered = certs.node_public_keys(self.certs_dir)
        identities = {}
        for i, name in enumerate(participants, start=1):
            pub = registered.get(name)
            if pub is None:
                raise Conflict(f"participant {name!r} is not a registered node: its signatures cannot be verified")
            identities[i] = (name, serialization.load_ssh_public_key(pub.read_bytes()))
        return identities

    def _start(self, round_id: str) -> pb.SecAggStepResponse:
        r = self.registry.get_round(round_id)
        if not r.secure or r.state != ROUND_OPEN:
            raise Conflict(f"round {round_id} is not an open secure round (secure={r.secure}, state={r.state})")
        try:
            server = SecAggServer(
                round_id,
                len(r.participants),
                math.prod(r.shape),
                r.clip_range,
                min_clients=r.min_clients,
                identities=self._identities(r.participants),
            )
        except ValueError as exc:  # parameters the protocol cannot run with (one client, min_clients < 2, ...)
            raise InvalidInput(f"secure round {round_id}: {exc}") from exc
        with self.lock:
            if round_id in self.sessions:
                raise Conflict(f"secure round {round_id} has already started")
            self.sessions[round_id] = _Session(server)
        return pb.SecAggStepResponse(stage=0, requests=_envelopes(server.step(0, {})))

    def step(self, request: pb.SecAggStepRequest, *, created_by: str) -> pb.SecAggStepResponse:
        if request.stage == 0:
            if request.replies:
                raise InvalidInput("stage 0 starts the protocol and takes no replies")
            return self._start(request.round_id)
        with self.lock:
            session = self.sessions.get(request.round_id)
        if session is None:
            raise Conflict(f"secure round {request.round_id} is not running here (not started, done or restarted)")
        with session.lock:
            if request.stage != session.next_stage:
                raise Conflict(
                    f"secure round {request.round_id} expects stage {session.next_stage}, not {request.stage}"
                )
            replies: dict[int, object] = {}
            for env in request.replies:
                if env.client_index in replies:
                    raise InvalidInput(f"two replies from client {env.client_index} in one stage")
                replies[env.client_index] = env.message
            try:
                requests = session.server.step(request.stage, replies)
            except SecAggAbort as exc:
                self.forget(request.round_id)
                self.registry.abort_round(round_id=request.round_id, reason=f"secure aggregation failed: {exc}")
                raise
            session.next_stage += 1
            if request.stage < LAST_STAGE:
                return pb.SecAggStepResponse(stage=request.stage, requests=_envelopes(requests))
            total, survivors = session.server.result
        self.forget(request.round_id)
        r = self.registry.get_round(request.round_id)
        mean = (np.asarray(total, dtype=np.float64) / len(survivors)).astype(np.float32).reshape(r.shape)
        done = self.registry.finalise_secure_round(
            round_id=request.round_id,
            mean_update=mean,
            contributors=len(survivors),
            metadata={"aggregation": "secagg+", "survivors": [r.participants[i - 1] for i in sorted(survivors)]},
            created_by=created_by,
        )
        return pb.SecAggStepResponse(stage=request.stage, done=True, result=convert.finalise_result_to_proto(done))


def _envelopes(requests: dict) -> list[pb.SecAggEnvelope]:
    return [pb.SecAggEnvelope(client_index=i, message=m) for i, m in sorted(requests.items())]
