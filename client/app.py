"""The Flower ClientApp on a data holder: a thin adapter from Flower messages to :class:`Holder`.

Node config (set by ``fedprompt client``): ``data`` (a bundled dataset name or a file), ``state`` (the
folder with the privacy ledger), ``holder`` (a display name), ``device``, ``precision``, ``threads``.
The loaded model and data are kept for the life of the ClientApp process, so a long-lived ClientApp
(``flower-supernode --isolation process``) loads the frozen model once, not once per message.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedprompt.client.trainer import Holder
from fedprompt.errors import BudgetExceededError, FedPromptError
from fedprompt.flower_io import from_record, to_record
from fedprompt.rounds import LocalSettings, TaskSpec
from fedprompt.runtime import Runtime

# Error codes of fedprompt's own refusals (Flower's own codes are 0-8).
BUDGET_EXCEEDED = 100
REFUSED = 101

app = ClientApp()

_holders: dict[tuple, Holder] = {}


def holder_for(context: Context, task: TaskSpec, max_length: int) -> Holder:
    nc = context.node_config
    for key in ("data", "state"):
        if not str(nc.get(key, "")):
            raise FedPromptError(f"this SuperNode has no '{key}' in its node config; start it with fedprompt client")
    key = (str(nc["data"]), str(nc["state"]), task, max_length)
    if key not in _holders:
        threads = int(nc.get("threads", 0))
        if threads > 0:
            import torch

            torch.set_num_threads(threads)
        _holders.clear()  # one task at a time: a new task's model replaces the old one
        _holders[key] = Holder(
            data=str(nc["data"]),
            state_dir=str(nc["state"]),
            name=str(nc.get("holder", "")),
            model=task.model,
            task=task,
            runtime=Runtime.create(str(nc.get("device", "auto")), str(nc.get("precision", "auto"))),
            max_length=max_length,
        )
    return _holders[key]


def _refusal(message: Message, exc: FedPromptError) -> Message:
    code = BUDGET_EXCEEDED if isinstance(exc, BudgetExceededError) else REFUSED
    return Message(Error(code=code, reason=f"{type(exc).__name__}: {exc}"), reply_to=message)


@app.train()
def train(message: Message, context: Context) -> Message:
    try:
        config = dict(message.content["config"])
        task, settings = TaskSpec.from_config(config), LocalSettings.from_config(config)
        holder = holder_for(context, task, settings.max_length)
        outcome = holder.train_round(from_record(message.content["prompt"], "weight"), settings)
    except (FedPromptError, ValueError) as exc:
        return _refusal(message, exc if isinstance(exc, FedPromptError) else FedPromptError(str(exc)))
    metrics = MetricRecord({"num_examples": outcome.num_examples, **outcome.metrics})
    content = RecordDict(
        {
            "update": to_record(delta=outcome.delta),
            "metrics": metrics,
            "info": ConfigRecord({"holder": holder.name}),
        }
    )
    return Message(content, reply_to=message)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    try:
        config = dict(message.content["config"])
        task = TaskSpec.from_config(config)
        holder = holder_for(context, task, int(config.get("max_length", 128)))
        accuracy, n = holder.evaluate(from_record(message.content["prompt"], "weight"))
    except (FedPromptError, ValueError) as exc:
        return _refusal(message, exc if isinstance(exc, FedPromptError) else FedPromptError(str(exc)))
    content = RecordDict(
        {
            "metrics": MetricRecord({"accuracy": accuracy, "num_examples": n}),
            "info": ConfigRecord({"holder": holder.name}),
        }
    )
    return Message(content, reply_to=message)
