"""The coordinator's own evaluation of each round's prompt (``server_eval``)."""

from __future__ import annotations

import torch

from fedprompt.protocols.rounds import TaskSpec
from fedprompt.server.coordinator.config import FederationConfig


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
            raise ValueError(f"server_eval {cfg.server_eval!r} has no {cfg.server_eval_split} examples")
        return cls(session, examples)

    def evaluate(self, weight: torch.Tensor) -> dict:
        acc = self.session.evaluate(self.session.prompted(weight.to(torch.float32)), self.examples, desc="server eval")
        return {"accuracy": acc, "eval_examples": len(self.examples)}
