"""A holder's part of a secure round, run with the aggregation server directly over mutual TLS.

After its local training the holder calls the aggregation server itself (``SecAggExchange``) with each of its
SecAgg+ replies and gets the next request once the stage is complete; the coordinator relays nothing and only
collects the mean. The update never leaves this process unmasked, the masking secrets live in its
:class:`SecAggClient` and are dropped with it, and every check that protects the holder against a malicious
server (its roster, the threshold against its policy, the consistency round) is the client's own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedprompt.errors import FedPromptError
from fedprompt.protocols.secagg_pb2 import SecAggMessage, SecAggSetup

EXCHANGE_TIMEOUT_S = 3600.0  # a stage call waits for the slowest holder's training (the first) or its reply


@dataclass(frozen=True)
class AggregatorAccess:
    """Where the holder reaches the aggregation server and with which client certificate (its own files)."""

    address: str
    ca: Path
    cert: Path
    key: Path

    def connect(self, name: str):
        from fedprompt.protocols.aggregator_client import AggregatorClient

        return AggregatorClient(self.address, None, name, files=(self.ca, self.cert, self.key))


class Transport:
    """The holder's calls of one secure round (the real one is the aggregation server; tests put a fake here)."""

    def __init__(self, client, round_id: str) -> None:
        self.client, self.round_id = client, round_id

    def exchange(self, stage: int, message=None):
        return self.client.secagg_exchange(self.round_id, stage, message, timeout=EXCHANGE_TIMEOUT_S)

    def decline(self) -> None:
        self.client.secagg_exchange(self.round_id, 0, decline=True, timeout=30)


def join(transport: Transport, round_id: str, vector_length: int, check) -> SecAggSetup:
    """The round's setup for this holder, asked for before it trains, so that a round it would refuse (too
    small, a threshold that does not resist its colluders, a neighbour outside its roster) costs it no budget.
    ``check(setup)`` raises SecAggRefused for such a round."""
    from fedprompt.protocols.secagg.protocol import SecAggRefused

    first = transport.exchange(0)
    if first.message.WhichOneof("body") != "setup":
        raise SecAggRefused("the aggregation server did not start the round with a setup")
    setup = first.message.setup
    if setup.round_id != round_id:
        raise SecAggRefused(f"a setup for round {setup.round_id!r}, not the round {round_id!r} it was asked to join")
    if setup.vector_length != vector_length:
        raise SecAggRefused(f"secure aggregation of {setup.vector_length} values; the update has {vector_length}")
    check(setup)
    return setup


def run(transport: Transport, setup: SecAggSetup, update: np.ndarray, make_client, before_masked_input=None) -> None:
    """Take part with ``update`` in the round ``setup`` opened; returns once the round is done, raises when this
    holder refuses (SecAggRefused) or the protocol went on without it. ``make_client(setup, update)`` builds the
    holder's SecAggClient (its identity, roster and policy). ``before_masked_input()`` is called just before the
    masked update is sent, the first message that depends on the update (the keys and shares before it do not)."""
    client = make_client(setup, update)
    message, stage = SecAggMessage(setup=setup), 0
    while True:
        reply = client.handle(message)  # SecAggRefused ends the protocol here; the client and its secrets go
        if before_masked_input is not None and reply.WhichOneof("body") == "masked_input":
            before_masked_input()
        stage += 1
        response = transport.exchange(stage, reply)
        if response.done:
            return
        if response.excluded:
            raise FedPromptError(f"the secure round went on without this holder ({response.excluded})")
        message = response.message
