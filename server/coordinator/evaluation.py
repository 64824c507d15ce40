"""How the coordinator learns a round's accuracy: on its own evaluation data (``server_eval``), or from the
holders' DP answers (noisy counts, each charged to the holder's ledger)."""

from __future__ import annotations

import math

import torch
from flwr.app import Message

from fedprompt.errors import DatasetError
from fedprompt.protocols.rounds import TaskSpec
from fedprompt.server.coordinator.config import FederationConfig
from fedprompt.server.coordinator.replies import holder_of


class ServerEvaluation:
    """The coordinator's own evaluation of each round's prompt, on data it holds itself (a public test set):
    it costs the holders nothing and releases nothing of theirs."""

    def __init__(self, session, examples) -> None:
        self.session, self.examples = session, examples

    @classmethod
    def create(cls, loaded, task: TaskSpec, cfg: FederationConfig) -> ServerEvaluation:
        from fedprompt.data import datasets as ds_mod
        from fedprompt.runtime import Runtime
        from fedprompt.training import Session

        data = ds_mod.load(cfg.server_eval, label_names=list(task.label_names))
        session = Session(
            loaded,
            data,
            runtime=Runtime.create(),
            max_length=cfg.max_length,
            template=task.template,
            label_words=[list(w) for w in task.label_words],
            scoring=task.scoring,
        )
        examples = data.split(cfg.server_eval_split)
        if not examples:
            raise DatasetError(f"server_eval {cfg.server_eval!r} has no {cfg.server_eval_split} examples")
        return cls(session, examples)

    def evaluate(self, weight: torch.Tensor) -> dict:
        acc = self.session.evaluate(self.session.prompted(weight.to(torch.float32)), self.examples, desc="server eval")
        return {"accuracy": acc, "eval_examples": len(self.examples)}


def holders_accuracy(replies: list[Message]) -> tuple[dict, dict[int, str]]:
    """The accuracy the holders' noisy counts add up to (each holder's too), the holders that refused, and the
    names of the nodes that answered. A count that is not finite is left out; ratios are clipped to [0, 1] (the
    noise can push them out)."""
    correct = total = 0.0
    per_holder, refused, names = {}, {}, {}
    for m in replies:
        holder = holder_of(m)
        if m.has_error():
            refused[holder] = m.error.reason[:200]
            continue
        try:
            metrics = m.content["metrics"]
            c, n = float(metrics["correct"]), float(metrics["examples"])
        except (KeyError, TypeError, ValueError) as exc:
            refused[holder] = f"malformed evaluation reply: {exc}"
            continue
        if not (math.isfinite(c) and math.isfinite(n)):
            continue
        names[m.metadata.src_node_id] = holder
        per_holder[holder] = min(1.0, max(0.0, c / n)) if n > 0 else None
        correct += c
        total += n
    acc = min(1.0, max(0.0, correct / total)) if total > 0 else None
    return {"holders_accuracy": acc, "eval_holders": per_holder, "eval_refused": refused}, names
