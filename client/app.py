"""The Flower ClientApp on a data holder: a thin adapter from Flower messages to the holder's code.

Node config, set by ``fedprompt client``:

- ``worker`` and ``worker-key``: the Unix socket and key file of the holder's worker process
  (:mod:`fedprompt.client.worker`), which keeps the model loaded. The usual mode.
- or ``data`` and ``state`` (plus optional ``holder``, ``device``, ``precision``): load everything in
  this process. Flower starts a new ClientApp process per message, so this pays the model load every
  message; it exists for SuperNodes started by hand and for measuring that cost. Secure aggregation
  needs the worker (the masked update's secrets must outlive one message).

This module imports no torch: in the worker mode the per-message process stays light.
"""

from __future__ import annotations

import base64
import json

import numpy as np
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedprompt.flower_io import from_record, to_record

# Error codes of fedprompt's refusals, beside Flower's own 0-8.
BUDGET_EXCEEDED = 100
REFUSED = 101
FAILED = 102
_CODES = {"budget": BUDGET_EXCEEDED, "refused": REFUSED, "error": FAILED}

app = ClientApp()


def _in_process_service(context: Context):
    from fedprompt.client.worker import HolderService

    nc = context.node_config
    missing = [k for k in ("data", "state") if not str(nc.get(k, ""))]
    if missing:
        raise ValueError(f"the node config has no 'worker' and no {missing}; start the SuperNode with fedprompt client")
    return HolderService(
        data=str(nc["data"]),
        state_dir=str(nc["state"]),
        name=str(nc.get("holder", "holder")),
        device=str(nc.get("device", "auto")),
        precision=str(nc.get("precision", "auto")),
    )


def _handle(kind: str, message: Message, context: Context) -> Message:
    try:
        if kind == "secagg":
            prompt = None
            config = dict(message.content["config"])
            config["message"] = base64.b64encode(bytes(message.content["secagg"]["message"])).decode()
        elif kind.startswith("dpopt_"):
            prompt = None
            config = dict(message.content["config"])
        else:
            prompt = from_record(message.content["prompt"], "weight")
            config = dict(message.content["config"])
    except (KeyError, ValueError, TypeError) as exc:
        return Message(Error(code=REFUSED, reason=f"malformed message: {exc}"), reply_to=message)
    nc = context.node_config
    if str(nc.get("worker", "")):
        from fedprompt.client.worker import request

        try:
            header, arr = request(str(nc["worker"]), str(nc["worker-key"]), kind, prompt, config)
        except (OSError, EOFError) as exc:
            return Message(Error(code=FAILED, reason=f"the holder's worker is unreachable: {exc}"), reply_to=message)
    else:
        try:
            service = _in_process_service(context)
        except ValueError as exc:
            return Message(Error(code=REFUSED, reason=str(exc)), reply_to=message)
        header, arr = service.handle({"kind": kind, "config": config}, prompt)
    if not header.get("ok"):
        code = _CODES.get(header.get("code"), FAILED)
        return Message(Error(code=code, reason=str(header.get("reason", ""))), reply_to=message)
    records: dict = {
        "metrics": MetricRecord(header["metrics"]),
        "info": ConfigRecord({"holder": str(header.get("holder", ""))}),
    }
    if kind == "train" and not header.get("secure"):
        records["update"] = to_record(delta=np.asarray(arr))
    if kind == "secagg":
        records["secagg"] = ConfigRecord({"message": base64.b64decode(header["message"])})
    if kind == "dpopt_generate":
        records["dpopt"] = ConfigRecord({"candidates_json": json.dumps(header["candidates"])})
    if kind == "dpopt_score":
        records["dpopt"] = ConfigRecord({"scores_json": json.dumps(header["scores"])})
    return Message(RecordDict(records), reply_to=message)


@app.train()
def train(message: Message, context: Context) -> Message:
    return _handle("train", message, context)


@app.train("secagg")
def secagg(message: Message, context: Context) -> Message:
    """One stage of SecAgg+ for the update this holder kept from the round's training."""
    return _handle("secagg", message, context)


@app.query("dpopt_generate")
def dpopt_generate(message: Message, context: Context) -> Message:
    """Federated DP-OPT, step 1: write DP candidate instructions from this holder's data."""
    return _handle("dpopt_generate", message, context)


@app.query("dpopt_score")
def dpopt_score(message: Message, context: Context) -> Message:
    """Federated DP-OPT, step 2: every candidate's correct answers on this holder's holdout, with noise."""
    return _handle("dpopt_score", message, context)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    return _handle("evaluate", message, context)
