"""Flower messages in and out of the holder's service.

``fedprompt client`` runs its SuperNode in Flower's ``process`` isolation, and its own runner
(``client/runner.py``) takes each message from the SuperNode and calls :func:`answer` here, in the daemon's
process, with the code of this installed version. Nothing a run's app bundle holds is imported or executed.

The Flower App that ``fedprompt server`` submits still names ``fedprompt.client.app:app`` as its ClientApp,
because a Flower App must name one. That ClientApp refuses every message: it would only ever run on a stock
SuperNode in ``subprocess`` isolation, and fedprompt's holder side is its daemon, which owns the privacy ledger
and the holder's policy, not a ClientApp process.

This module imports no torch; the service loads it when it first trains.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedprompt.protocols import methods
from fedprompt.protocols.flower_records import from_record, to_record

# Error codes of fedprompt's refusals, beside Flower's own 0-8.
BUDGET_EXCEEDED = 100
REFUSED = 101
FAILED = 102
_CODES = {"budget": BUDGET_EXCEEDED, "refused": REFUSED, "error": FAILED}

MAX_CONFIG_ENTRIES = 256
MAX_TEXT = 64 << 10  # a config value: a template, label words as JSON, DP-OPT candidates


def request_of(message: Message) -> tuple[str, dict, object]:
    """(kind, config, prompt or None) of a message; ValueError when it is not a request fedprompt knows."""
    request = methods.requests().get(message.metadata.message_type)
    if request is None:
        raise ValueError(f"unknown message type {message.metadata.message_type!r}")
    content = message.content
    if "config" not in content.config_records:
        raise ValueError("the message has no config record")
    config = dict(content.config_records["config"])
    if len(config) > MAX_CONFIG_ENTRIES:
        raise ValueError(f"the config record has {len(config)} entries")
    for key, value in config.items():
        if isinstance(value, str | bytes) and len(value) > MAX_TEXT:
            raise ValueError(f"config value {key!r} has {len(value)} characters, more than {MAX_TEXT}")
        if isinstance(value, list):
            raise ValueError(f"config value {key!r} is a list; fedprompt sends lists as JSON text")
    prompt = None
    if request.carries_prompt:
        if "prompt" not in content.array_records:
            raise ValueError("the message has no prompt")
        prompt = from_record(content.array_records["prompt"], "weight")
    return request.kind, config, prompt


def answer(service, message: Message) -> Message:
    """The holder's reply to one Flower message: a result, or an error that says why."""
    try:
        kind, config, prompt = request_of(message)
    except (KeyError, ValueError, TypeError) as exc:
        return Message(Error(code=REFUSED, reason=f"malformed message: {exc}"), reply_to=message)
    header, arr = service.handle(kind, config, prompt)
    if not header.get("ok"):
        code = _CODES.get(header.get("code"), FAILED)
        # Flower's error replies carry no records: the holder's name leads the reason (the coordinator reads it:
        # server/coordinator/replies.py)
        reason = f"{header.get('holder', '')}: {header.get('reason', '')}"
        return Message(Error(code=code, reason=reason), reply_to=message)
    records: dict = {
        "metrics": MetricRecord(header["metrics"]),
        "info": ConfigRecord({"holder": str(header.get("holder", ""))}),
    }
    if arr is not None:  # a round's update (none under secure aggregation: the holder kept it)
        records["update"] = to_record(delta=arr)
    for name, record in header.get("records", {}).items():
        records[name] = ConfigRecord(record)
    return Message(RecordDict(records), reply_to=message)


# ------------------------------------------------------------------ the Flower App's ClientApp

app = ClientApp()
NOT_HERE = (
    "fedprompt's holder side runs inside `fedprompt client` (Flower's process isolation with fedprompt's own "
    "runner); this ClientApp does not train or release anything"
)


def _refuse(message: Message, context: Context) -> Message:
    return Message(Error(code=REFUSED, reason=NOT_HERE), reply_to=message)


for _request in methods.requests().values():
    if _request.message_type.startswith(methods.QUERY):
        app.query(_request.kind)(_refuse)
    else:  # train, evaluate
        getattr(app, _request.message_type)()(_refuse)
