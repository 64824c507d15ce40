"""A federated method is one registration (protocols/methods.py): the ClientApp, the holder's service, the run
settings and the ServerApp take every method from it. Shown with a third method registered by this test only."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedprompt.client import app as client_app
from fedprompt.client.service import HolderService
from fedprompt.errors import ConfigError
from fedprompt.protocols import methods
from fedprompt.server.coordinator.config import FederationConfig


class CountingHolder:
    """The holder side of the test's method: answers "query.count" with the number of requests it saw."""

    def __init__(self, service) -> None:
        self.service, self.seen = service, 0

    def handle(self, kind, config, prompt):
        self.seen += 1
        return {"metrics": {"seen": self.seen}, "records": {"count": {"holder": self.service.name}}}, None


class CountingCoordinator:
    soft_prompt = False

    def __init__(self) -> None:
        self.checked: list[str] = []

    def check(self, cfg):
        self.checked.append(cfg.method)

    def run(self, grid, cfg, run_id):
        raise NotImplementedError

    def result(self, cfg):
        return cfg.checkpoint_dir, "counted"


COUNTING = methods.FederatedMethod(
    "counting",
    (methods.Request("query.count", carries_prompt=False),),
    holder=f"{__name__}:CountingHolder",
    coordinator=f"{__name__}:COUNTING_COORDINATOR",
)
COUNTING_COORDINATOR = CountingCoordinator()


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(methods.METHODS, "counting", COUNTING)


def test_every_registered_method_resolves_to_its_two_sides():
    assert set(methods.METHODS) == {"prompt-tuning", "dpopt"}
    for m in methods.METHODS.values():
        side = methods.load(m.holder)
        assert callable(side) and callable(getattr(side, "handle", None)), m.name
        coord = methods.load(m.coordinator)
        assert {"check", "run", "result"} <= set(dir(coord)) and isinstance(coord.soft_prompt, bool), m.name
    # each message type belongs to one method (or to every one: hello)
    all_types = [r.message_type for m in methods.METHODS.values() for r in m.requests] + [methods.HELLO.message_type]
    assert len(all_types) == len(set(all_types))
    with pytest.raises(ConfigError, match="method must be one of"):
        methods.method("fedsgd")


def test_a_method_added_by_one_registration_reaches_the_holder_and_the_settings(registered, tmp_path, as_serverapp):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a", "label": "negative"}\n')
    service = HolderService(data=str(data), state_dir=tmp_path / "state", name="h-1", num_examples=1)
    msg = Message(RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=3, message_type="query.count")
    assert client_app.request_of(msg) == ("count", {"x": 1}, None)
    reply = client_app.answer(service, msg)
    assert not reply.has_error()
    assert reply.content["metrics"]["seen"] == 1 and reply.content["count"]["holder"] == "h-1"
    assert reply.content["info"]["holder"] == "h-1"
    assert client_app.answer(service, msg).content["metrics"]["seen"] == 2  # one side per service, kept
    # a prompt where the method declared none is malformed, refused before its side sees it
    refused, _ = service.handle("count", {}, np.zeros((2, 2), np.float32))
    assert not refused["ok"] and "malformed request" in refused["reason"]
    cfg = FederationConfig(checkpoint_dir=str(tmp_path), method="counting")
    assert COUNTING_COORDINATOR.checked[-1] == "counting" and cfg.coordinator_side() is COUNTING_COORDINATOR


def test_without_the_registration_the_method_does_not_exist(tmp_path, as_serverapp):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a", "label": "negative"}\n')
    service = HolderService(data=str(data), state_dir=tmp_path / "state", name="h-1", num_examples=1)
    msg = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=3, message_type="query.count")
    assert "unknown message type" in client_app.answer(service, msg).error.reason
    assert not service.handle("count", {}, None)[0]["ok"]
    with pytest.raises(ConfigError, match="method must be one of"):
        FederationConfig(checkpoint_dir=str(tmp_path), method="counting")


def test_the_stock_clientapp_refuses_every_registered_request(as_serverapp):
    for request in methods.requests().values():
        content = RecordDict({"config": ConfigRecord({})})
        msg = Message(content, dst_node_id=1, message_type=request.message_type)
        ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
        reply = client_app.app(msg, ctx)
        assert reply.has_error() and reply.error.code == client_app.REFUSED, request.message_type
