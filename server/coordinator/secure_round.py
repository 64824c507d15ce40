"""The coordinator's side of a secure round: open it on the aggregation server before the holders train, and
collect the mean of their updates once they have run SecAgg+ with the server directly.

The coordinator never sees a protocol message: it names the participants (the holders it sampled, by node
name), sends each the round's id with its training request, and waits for the mean. A holder replies to its
training request only when the round is done (or it refused, or was dropped), so by the time the replies are in,
the mean is too.
"""

from __future__ import annotations

import contextlib
import time

import numpy as np

from fedprompt.errors import FedPromptError
from fedprompt.protocols.aggregator_client import AggregatorClient, AggregatorError
from fedprompt.protocols.records import ModelRef
from fedprompt.protocols.rounds import TaskSpec

RESULT_WAIT_S = 30.0  # after the holders' replies: the last unmasking is already done or about to be


class SecureRoundFailed(FedPromptError, RuntimeError):
    pass


def open_round(
    client: AggregatorClient,
    *,
    task: TaskSpec,
    shape: tuple[int, ...],
    participants: list[str],
    min_clients: int,
    clip_range: float,
) -> str:
    """Open the secure round on the aggregation server; returns its id (what the holders are told)."""
    try:
        opened = client.open_round(
            task=task.name,
            base_model=ModelRef(task.model, task.model_sha256),
            shape=shape,
            expected_clients=len(participants),
            secure=True,
            participants=participants,
            clip_range=clip_range,
            min_clients=min_clients,
        )
    except AggregatorError as exc:
        raise SecureRoundFailed(f"the aggregation server did not open the secure round: {exc}") from exc
    return opened.round_id


def collect(
    client: AggregatorClient, round_id: str, shape: tuple[int, ...], *, wait: float = RESULT_WAIT_S
) -> tuple[np.ndarray, dict]:
    """The mean the holders' secure round produced, and a record of it; the round is aborted if it failed."""
    started = time.monotonic()
    try:
        done = client.await_secure_round(round_id, wait)
    except AggregatorError as exc:
        abort(client, round_id, f"the coordinator gave up: {exc.details}")
        raise SecureRoundFailed(str(exc)) from exc
    mean = np.asarray(done.mean_update, dtype=np.float32)
    if mean.shape != shape:
        raise SecureRoundFailed(f"the aggregation server returned a mean of shape {mean.shape}, not {shape}")
    record = {
        "secure_round_id": round_id,
        "secure_contributors": int(done.contributors),
        "secure_wait_seconds": time.monotonic() - started,
    }
    return mean, record


def abort(client: AggregatorClient, round_id: str, reason: str) -> None:
    with contextlib.suppress(AggregatorError):  # already closed (failed or aborted): nothing waits on it
        client.abort_round(round_id, reason)
