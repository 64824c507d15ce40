"""The coordinator's side of a secure round: relay SecAgg+ between the holders and the aggregation server.

After local training the holders keep their updates. The ServerApp opens a secure round on the aggregation
server with the holders that trained, then carries each protocol stage: the server's requests go out as Flower
messages (``train.secagg``) and the holders' replies go back to the server. The coordinator handles only
public keys, ciphertexts, masked vectors and the final mean; the aggregation server unmasks the sum.
A holder that stops answering mid-protocol is recovered from by the protocol itself (its neighbours reveal its
shares); too many losses abort the round on the server and leave the prompt unchanged.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedprompt.aggregator_client import AggregatorClient, AggregatorError
from fedprompt.protocols import aggregator_pb2 as pb
from fedprompt.protocols import convert, secagg_pb2
from fedprompt.protocols.secagg import LAST_STAGE
from fedprompt.rounds import TaskSpec
from fedprompt.server.records import InvalidInput, ModelRef

SECAGG_MESSAGE_TYPE = "train.secagg"
STAGES = LAST_STAGE  # key advertisement, key shares, masked inputs, the survivors' signatures, unmasking


class SecureRoundFailed(RuntimeError):
    pass


def relay(
    grid: Grid,
    client: AggregatorClient,
    *,
    task: TaskSpec,
    shape: tuple[int, ...],
    holders: dict[int, str],
    run_id: str,
    rnd: int,
    min_clients: int,
    clip_range: float,
    timeout: float,
) -> tuple[np.ndarray, dict]:
    """Run SecAgg+ over ``holders`` (Flower node id -> holder name); returns the mean update and a record."""
    nodes = sorted(holders)
    participants = [holders[n] for n in nodes]
    node_of = {i: n for i, n in enumerate(nodes, start=1)}
    started = time.monotonic()
    opened = None
    try:
        opened = client.open_round(
            task=task.name,
            base_model=ModelRef(task.model, task.model_sha256),
            shape=shape,
            expected_clients=len(nodes),
            secure=True,
            participants=participants,
            clip_range=clip_range,
            min_clients=min_clients,
        )
        response = client.secagg_step(opened.round_id, 0, [])
        lost: dict[str, str] = {}
        for stage in range(1, STAGES + 1):
            replies = _exchange(grid, response.requests, node_of, run_id, rnd, stage - 1, timeout, lost, holders)
            response = client.secagg_step(opened.round_id, stage, replies)
    except AggregatorError as exc:
        if opened is not None:  # close it on the server too, so that nothing waits on it (a no-op if aborted)
            with contextlib.suppress(AggregatorError):
                client.abort_round(opened.round_id, f"the coordinator gave up: {exc}")
        raise SecureRoundFailed(str(exc)) from exc
    if not response.done:
        raise SecureRoundFailed("the aggregation server did not finish the protocol after the unmasking stage")
    result = response.result
    try:
        mean = convert.tensor_from_proto(result.mean_update)
    except InvalidInput as exc:
        raise SecureRoundFailed(f"the aggregation server returned a malformed mean: {exc}") from exc
    if mean.shape != shape:
        raise SecureRoundFailed(f"the aggregation server returned a mean of shape {mean.shape}, not {shape}")
    record = {
        "secure_round_id": opened.round_id,
        "secure_contributors": int(result.contributors),
        "secure_seconds": time.monotonic() - started,
    }
    if lost:
        record["secure_lost"] = lost
    return mean, record


def _exchange(
    grid: Grid,
    requests: Iterable[pb.SecAggEnvelope],
    node_of: dict[int, int],
    run_id: str,
    rnd: int,
    stage: int,
    timeout: float,
    lost: dict[str, str],
    holders: dict[int, str],
) -> list[pb.SecAggEnvelope]:
    index_of = {n: i for i, n in node_of.items()}
    config = ConfigRecord({"run_id": run_id, "server_round": rnd, "stage": stage})
    messages = [
        Message(
            RecordDict({"secagg": ConfigRecord({"message": env.message.SerializeToString()}), "config": config}),
            dst_node_id=node_of[env.client_index],
            message_type=SECAGG_MESSAGE_TYPE,
            group_id=str(rnd),
        )
        for env in requests
    ]
    asked = {m.metadata.dst_node_id for m in messages}
    replies: list[pb.SecAggEnvelope] = []
    answered = set()
    for reply in grid.send_and_receive(messages, timeout=timeout):
        node = reply.metadata.src_node_id
        answered.add(node)
        if reply.has_error():
            lost[holders.get(node, str(node))] = f"stage {stage}: error {reply.error.code}: {reply.error.reason}"
            continue
        try:
            body = secagg_pb2.SecAggMessage.FromString(bytes(reply.content["secagg"]["message"]))
        except Exception as exc:  # a malformed reply counts as a dropout; the protocol recovers from it
            lost[holders.get(node, str(node))] = f"stage {stage}: malformed reply ({exc})"
            continue
        replies.append(pb.SecAggEnvelope(client_index=index_of[node], message=body))
    for node in asked - answered:
        lost[holders.get(node, str(node))] = f"stage {stage}: no reply within {timeout:.0f} s"
    return replies
