"""Secure rounds on the aggregation server, run by the holders themselves: the server plays SecAgg+'s server, the
holders call it directly over mutual TLS, and the coordinator only opens the round and waits for its mean.

Why not relay the stages through the coordinator's Flower messages, as before: Flower polls every 3 s on both
sides, so each of the five stages cost a Flower exchange (about 25 s a round here), and the relay saw every
message. Here a holder's ``SecAggExchange`` call carries its reply to one stage and returns its request for the
next as soon as the stage is complete: every live participant has answered (or declined), or the stage's
deadline passed (a holder that went silent is a dropout, which the protocol recovers from). A round's whole
protocol then costs a few round trips on top of waiting for the slowest holder.

The per-round protocol state (who advertised which keys, which masked inputs arrived) lives here, in memory, so
the coordinator never holds anything that could unmask a single update; it gets the mean of the survivors'
updates from ``AwaitSecureRound``. Key advertisements and the survivors of the consistency round are signed
with the holders' node identity keys and checked here against ``nodes/<name>/node.pub`` (and, what matters
against a malicious server, by every holder against its own roster). A round that fails is aborted in the
registry and its waiters get ABORTED with the reason.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives import serialization

from fedprompt import certs
from fedprompt.protocols import aggregator_pb2 as pb
from fedprompt.protocols.records import ROUND_OPEN, Conflict, FinaliseResult, Forbidden, InvalidInput, NotFound
from fedprompt.protocols.secagg.protocol import LAST_STAGE, STAGE_KEYS, SecAggAbort
from fedprompt.protocols.secagg.server import SecAggServer
from fedprompt.protocols.secagg_pb2 import SecAggMessage
from fedprompt.server.aggregation.registry import Registry

JOIN_TIMEOUT_S = 1800.0  # the adverts: the holders train first, and the slowest sets the pace
STAGE_TIMEOUT_S = 60.0  # every later stage, from the first reply of the stage
RESULT_KEEP_S = 3600.0  # a finished round's mean waits this long for the coordinator


@dataclass
class _Session:
    """One secure round's protocol: its server, the stage it waits on, the replies that came, who is still in."""

    round_id: str
    server: SecAggServer
    index: dict[str, int]  # participant name -> client index
    setups: dict[int, SecAggMessage]
    stage: int = STAGE_KEYS  # the stage whose replies are awaited (1: adverts, ..., LAST_STAGE: unmasking)
    expected: set[int] = field(default_factory=set)
    replies: dict[int, SecAggMessage] = field(default_factory=dict)
    outputs: dict[int, SecAggMessage] = field(default_factory=dict)  # the requests of the stage after the last one done
    declined: set[int] = field(default_factory=set)
    advanced: asyncio.Event = field(default_factory=asyncio.Event)
    deadline: float = 0.0
    failure: str | None = None
    result: FinaliseResult | None = None
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    finished_at: float = 0.0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class SecureRounds:
    """Every secure round this server runs; created on its first holder call, in the server's event loop."""

    def __init__(
        self,
        registry: Registry,
        certs_dir: Path,
        *,
        join_timeout: float = JOIN_TIMEOUT_S,
        stage_timeout: float = STAGE_TIMEOUT_S,
    ) -> None:
        self.registry, self.certs_dir = registry, Path(certs_dir)
        self.join_timeout, self.stage_timeout = join_timeout, stage_timeout
        self.sessions: dict[str, _Session] = {}
        self._creating = asyncio.Lock()

    async def abort(self, round_id: str, reason: str) -> None:
        """End a round's protocol here (the coordinator aborted it): its waiters get ABORTED."""
        session = self.sessions.get(round_id)
        if session is not None and not session.finished.is_set():
            async with session.lock:
                session.failure = f"aborted by the coordinator: {reason}"
                session.finished_at = time.monotonic()
                session.finished.set()
                done, session.advanced = session.advanced, asyncio.Event()
                done.set()

    # ------------------------------------------------------------------ the holders' calls

    async def exchange(self, request: pb.SecAggExchangeRequest, *, caller: str) -> pb.SecAggExchangeResponse:
        session = await self._session(request.round_id, caller=caller)
        me = session.index[caller]
        if request.decline:
            async with session.lock:
                session.declined.add(me)
                session.expected.discard(me)
                await self._maybe_advance(session)
            return pb.SecAggExchangeResponse(stage=request.stage, excluded="declined")
        if request.stage == 0:
            return pb.SecAggExchangeResponse(stage=0, message=session.setups[me])
        async with session.lock:
            if session.failure is not None:
                raise SecAggAbort(session.failure)
            if request.stage != session.stage:
                raise Conflict(f"secure round {request.round_id} is at stage {session.stage}, not {request.stage}")
            if me not in session.expected:
                return pb.SecAggExchangeResponse(stage=request.stage, excluded=self._why_out(session, me))
            if me in session.replies:
                raise Conflict(f"a second stage-{request.stage} reply from {caller!r}")
            if not session.replies and request.stage > STAGE_KEYS:
                session.deadline = time.monotonic() + self.stage_timeout
            session.replies[me] = request.message
            waiting_on = session.advanced
            await self._maybe_advance(session)
        await self._wait(session, waiting_on)
        if session.failure is not None:
            raise SecAggAbort(session.failure)
        if session.result is not None and request.stage == LAST_STAGE:
            return pb.SecAggExchangeResponse(stage=request.stage, done=True)
        nxt = session.outputs.get(me)
        if nxt is None:
            return pb.SecAggExchangeResponse(stage=request.stage, excluded=self._why_out(session, me))
        return pb.SecAggExchangeResponse(stage=request.stage, message=nxt)

    async def await_result(self, round_id: str, wait_seconds: float) -> FinaliseResult:
        """The coordinator's wait for the mean (``wait_seconds`` at most); NotFound if the round never ran here."""
        session = self.sessions.get(round_id)
        if session is None:
            r = self.registry.get_round(round_id)  # raises NotFound for an unknown round
            if r.state != ROUND_OPEN:
                raise Conflict(f"secure round {round_id} is {r.state}; its result is not held here")
            session = await self._session(round_id)
        try:
            await asyncio.wait_for(session.finished.wait(), timeout=max(0.0, wait_seconds))
        except TimeoutError:
            raise Conflict(f"secure round {round_id} is still running (stage {session.stage})") from None
        if session.failure is not None:
            raise SecAggAbort(session.failure)
        assert session.result is not None
        return session.result

    # ------------------------------------------------------------------ the protocol's progress

    async def _session(self, round_id: str, *, caller: str | None = None) -> _Session:
        """The round's protocol, started on the first call of one of its participants (``caller``) or of the
        coordinator (``None``): anyone else is refused before anything starts."""
        session = self.sessions.get(round_id)
        if session is None:
            async with self._creating:
                session = self.sessions.get(round_id)
                if session is None:
                    session = await asyncio.to_thread(self._start, round_id, caller)
                    self.sessions[round_id] = session
                    asyncio.get_running_loop().create_task(self._watch(session))
                self._drop_old()
        if caller is not None and caller not in session.index:
            raise Forbidden(f"{caller!r} is not a participant of secure round {round_id}")
        return session

    def _start(self, round_id: str, caller: str | None) -> _Session:
        if not isinstance(round_id, str) or not round_id:
            raise InvalidInput("a secure round id is a non-empty string")
        r = self.registry.get_round(round_id)
        if caller is not None and caller not in r.participants:
            raise Forbidden(f"{caller!r} is not a participant of secure round {round_id}")
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
        setups = server.step(0, {})
        session = _Session(round_id, server, {n: i for i, n in enumerate(r.participants, start=1)}, setups)
        session.expected = set(setups)
        session.deadline = time.monotonic() + self.join_timeout
        return session

    def _identities(self, participants: tuple[str, ...]) -> dict[int, tuple[str, object]]:
        registered = certs.node_public_keys(self.certs_dir)
        identities = {}
        for i, name in enumerate(participants, start=1):
            pub = registered.get(name)
            if pub is None:
                raise Conflict(f"participant {name!r} is not a registered node: its signatures cannot be verified")
            identities[i] = (name, serialization.load_ssh_public_key(pub.read_bytes()))
        return identities

    async def _maybe_advance(self, session: _Session, *, timed_out: bool = False) -> None:
        """Complete the awaited stage when every expected reply is in (or its deadline passed). Holds the lock."""
        if session.failure is not None or session.result is not None:
            return
        if not timed_out and not session.expected <= set(session.replies):
            return
        stage, replies = session.stage, dict(session.replies)
        try:
            outputs = await asyncio.to_thread(session.server.step, stage, replies)
        except SecAggAbort as exc:
            await self._fail(session, str(exc))
            return
        session.replies = {}
        if stage == LAST_STAGE:
            await self._finish(session)
        else:
            session.outputs = outputs
            session.expected = set(outputs) - session.declined
            session.stage = stage + 1
            session.deadline = math.inf  # armed by the next stage's first reply
        done, session.advanced = session.advanced, asyncio.Event()
        done.set()

    async def _finish(self, session: _Session) -> None:
        total, survivors = session.server.result
        r = await asyncio.to_thread(self.registry.get_round, session.round_id)
        mean = (np.asarray(total, dtype=np.float64) / len(survivors)).astype(np.float32).reshape(r.shape)
        names = [r.participants[i - 1] for i in sorted(survivors)]
        try:
            session.result = await asyncio.to_thread(
                self.registry.finalise_secure_round,
                round_id=session.round_id,
                mean_update=mean,
                contributors=len(survivors),
                metadata={"aggregation": "secagg+ (malicious-server variant)", "survivors": names},
                created_by=r.created_by or certs.COORDINATOR_CN,
            )
        except Exception as exc:  # the registry refused: nothing half-done, the round is aborted
            await self._fail(session, f"the mean could not be stored: {exc}")
            return
        session.finished_at = time.monotonic()
        session.finished.set()

    async def _fail(self, session: _Session, reason: str) -> None:
        session.failure = reason
        session.finished_at = time.monotonic()
        try:
            await asyncio.to_thread(self.registry.abort_round, round_id=session.round_id, reason=reason)
        except (Conflict, NotFound):
            pass  # already closed
        session.finished.set()
        done, session.advanced = session.advanced, asyncio.Event()
        done.set()

    async def _wait(self, session: _Session, event: asyncio.Event) -> None:
        await event.wait()

    async def _watch(self, session: _Session) -> None:
        """Advance a stage whose deadline passed with the replies that came (the silent ones are dropouts)."""
        while not session.finished.is_set():
            await asyncio.sleep(0.25)
            if time.monotonic() < session.deadline:
                continue
            async with session.lock:
                if time.monotonic() >= session.deadline and not session.finished.is_set():
                    if session.stage == STAGE_KEYS and not session.replies:
                        await self._fail(session, "no participant advertised its keys before the deadline")
                    else:
                        await self._maybe_advance(session, timed_out=True)

    def _drop_old(self) -> None:
        now = time.monotonic()
        for rid, s in list(self.sessions.items()):
            if s.finished.is_set() and now - s.finished_at > RESULT_KEEP_S:
                del self.sessions[rid]

    @staticmethod
    def _why_out(session: _Session, me: int) -> str:
        if me in session.declined:
            return "declined"
        return session.server.rejected.get(me, "dropped: no reply before the stage's deadline")
