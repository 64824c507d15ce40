"""The holders' replies to a soft-prompt round as the coordinator reads them: whose reply it is, and a training
reply checked (shape, finiteness, its count of examples) before anything of it is merged."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from flwr.app import Message

from fedprompt.protocols.flower_records import from_record


@dataclass
class Reply:
    node_id: int
    holder: str
    delta: torch.Tensor | None = None
    num_examples: int = 0
    metrics: dict = field(default_factory=dict)
    error: str = ""


_NAMED = re.compile(r"^([a-z0-9-]{1,64}): ")


def holder_of(msg: Message) -> str:
    """The holder name a reply gives (its info record, or the lead of an error's reason), else its node id.
    Only for records and logs: nothing is decided by a name a holder claims."""
    if msg.has_error():
        m = _NAMED.match(msg.error.reason)
        return m.group(1) if m else str(msg.metadata.src_node_id)
    content = msg.content
    return str(content["info"]["holder"]) if "info" in content else str(msg.metadata.src_node_id)


def parse_train_reply(msg: Message, shape: torch.Size, *, secure: bool = False) -> Reply:
    """A holder's training reply; under secure aggregation it carries no update (the holder keeps it)."""
    node = msg.metadata.src_node_id
    if msg.has_error():
        return Reply(node, holder_of(msg), error=f"error {msg.error.code}: {msg.error.reason}")
    content = msg.content
    holder = holder_of(msg)
    try:
        delta = None
        if secure:
            if "update" in content:
                raise ValueError("the holder sent its update in the clear in a secure round")
        else:
            delta = torch.from_numpy(from_record(content["update"], "delta"))
            if delta.shape != shape:
                raise ValueError(f"update has shape {tuple(delta.shape)}, the prompt {tuple(shape)}")
            if not torch.isfinite(delta).all():
                raise ValueError("update holds NaN or infinite values")
        metrics = dict(content["metrics"])
        n = int(metrics.get("num_examples", 0))
        if n < 1:
            raise ValueError(f"num_examples must be positive, got {n}")
    except (KeyError, ValueError, TypeError) as exc:
        return Reply(node, holder, error=f"malformed reply: {exc}")
    return Reply(node, holder, delta, n, metrics)
