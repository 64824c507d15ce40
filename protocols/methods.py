"""The federated methods fedprompt runs, one registration each: the requests a method sends to the holders
(its part of the wire), and where its holder side and its coordinator side live.

A method's two sides are named here by import path rather than imported: the holder's side is in ``client/`` and
the coordinator's in ``server/``, which never import each other (tests/core/test_layout.py), and this module is
below both. Adding a method is its holder side (a :class:`HolderSide` factory), its coordinator side (a
:class:`CoordinatorSide`) and one line in :data:`METHODS`; the ClientApp, the holder's service, the run settings
and the ServerApp take every method from here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Protocol

from fedprompt.errors import ConfigError

QUERY = "query."  # the prefix of Flower's query message types ("query.dpopt_generate")


@dataclass(frozen=True)
class Request:
    """One kind of request a method sends a holder: its Flower message type and whether it carries a prompt."""

    message_type: str  # "train", "evaluate" or "query.<name>"
    carries_prompt: bool

    @property
    def kind(self) -> str:
        """The holder service's name of the request: the message type without Flower's query prefix."""
        return self.message_type.removeprefix(QUERY)


@dataclass(frozen=True)
class FederatedMethod:
    name: str  # the run setting ``method``
    requests: tuple[Request, ...]
    holder: str  # "module:factory" of its holder side: factory(service) -> HolderSide
    coordinator: str  # "module:object" of its coordinator side, a CoordinatorSide


class HolderSide(Protocol):
    """A method's requests on a holder, answered inside its service (``client/service.py``), which checks the
    message, turns the holder's refusals into replies and never lets an exception out."""

    def handle(self, kind: str, config: dict, prompt: Any) -> tuple[dict, Any]:
        """The reply to one request: ``{"metrics": ..., "records": {name: {key: scalar}}}`` (the records are the
        Flower config records the reply carries) and the array it sends, or None."""


class CoordinatorSide(Protocol):
    """A method on the coordinator: checked when the run's settings are, run by the ServerApp."""

    soft_prompt: bool  # its result is a soft prompt on the run's model (POST can transfer it)

    def check(self, cfg: Any) -> None:
        """Refuse settings the holders would refuse (ConfigError), before any process starts."""

    def run(self, grid: Any, cfg: Any, run_id: str) -> None:
        """The whole run, on the ServerApp's grid."""

    def result(self, cfg: Any) -> Any:
        """Where the run's result lands (a Path under cfg.checkpoint_dir) and what it is, for the operator."""


HELLO = Request(f"{QUERY}hello", carries_prompt=False)  # every method's: who a node is (its holder name)

METHODS: dict[str, FederatedMethod] = {
    m.name: m
    for m in (
        FederatedMethod(
            "prompt-tuning",
            (Request("train", True), Request("evaluate", True)),
            holder="fedprompt.client.soft_prompt:SoftPromptHolder",
            coordinator="fedprompt.server.coordinator.soft_prompt:COORDINATOR",
        ),
        FederatedMethod(
            "dpopt",
            (Request(f"{QUERY}dpopt_generate", False), Request(f"{QUERY}dpopt_score", False)),
            holder="fedprompt.client.dpopt.holder:DPOPTHolder",
            coordinator="fedprompt.server.coordinator.dpopt:COORDINATOR",
        ),
    )
}


def method(name: str) -> FederatedMethod:
    if name not in METHODS:
        raise ConfigError(f"method must be one of {tuple(METHODS)}, got {name!r}")
    return METHODS[name]


def requests() -> dict[str, Request]:
    """Every request a holder may be sent, by message type."""
    out = {HELLO.message_type: HELLO}
    for m in METHODS.values():
        out.update({r.message_type: r for r in m.requests})
    return out


def load(reference: str) -> Any:
    """The object a "module:name" reference of :data:`METHODS` names."""
    module, _, name = reference.partition(":")
    return getattr(importlib.import_module(module), name)
