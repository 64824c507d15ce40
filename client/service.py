"""The holder's service: answers the coordinator's requests under the holder's own policy.

``fedprompt client`` keeps one :class:`HolderService` in its process, with the frozen model and the data loaded
once, and its ClientApp runner (``client/runner.py``) hands it every Flower message of the run. Each request is
checked against the holder's :class:`~fedprompt.client.policy.HolderPolicy` before any example is read: a
violation is a refusal naming the rule, and the ledger is unchanged.

Each federated method's requests are answered by its holder side (``protocols/methods.py`` names them:
``client/soft_prompt.py``, ``client/dpopt/holder.py``); this service routes them, loads the model and data
once, holds the holder's identity for secure rounds, and turns every refusal into a reply.

A reply is a dict (``ok``, ``holder``, ``metrics``, the method's ``records`` and, for a secure round,
``secure``) and an optional array. Refusals carry ``code`` (``refused``, ``budget``, ``error``) and a ``reason``
written for the coordinator: it names the rule but none of the holder's own numbers, which go to its log.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from fedprompt.client.policy import HolderPolicy, PolicyViolation
from fedprompt.errors import BudgetExceededError, FedPromptError
from fedprompt.protocols import methods

log = logging.getLogger("fedprompt.client")


class HolderService:
    """Answers train/evaluate/secagg/DP-OPT requests for one data holder from a :class:`Holder` loaded on first use."""

    def __init__(
        self,
        *,
        data: str,
        state_dir: str | Path,
        name: str,
        num_examples: int,
        policy: HolderPolicy | None = None,
        device: str = "auto",
        precision: str = "auto",
        allowed_models: set[str] | None = None,
        signing_key: str | Path | None = None,
        peers: dict[str, Path] | None = None,
        aggregator=None,
        local_task=None,
        threads=None,
    ) -> None:
        """``signing_key``: the holder's node identity key; ``peers``: its roster, node name -> public key file
        (its own copy of every node's key: secure rounds verify neighbours against it); ``aggregator``: an
        :class:`~fedprompt.client.secure_round.AggregatorAccess` (where secure rounds run), from the holder's flags."""
        self.data, self.state_dir, self.name = data, Path(state_dir), name
        self.device, self.precision = device, precision
        self.allowed_models = allowed_models
        self.policy = (policy or HolderPolicy()).resolved(num_examples)
        self.signing_key = Path(signing_key) if signing_key else None  # signs SecAgg key adverts and survivors
        self.peers = dict(peers or {})
        self.aggregator = aggregator
        self.threads = threads  # a ThreadChoice (the daemon's): torch's threads, set before each request
        self.local_task = local_task  # the holder's own task file: its data's columns, the labels it expects
        self.transport = None  # a secure round's transport for tests (a fake server); None: the aggregation server
        self._holder = None
        self._holder_key: tuple | None = None
        # each method's holder side, by the kinds of request it answers (a side keeps state across requests:
        # a DP-OPT run between its generation and its scoring, the secure rounds an update took part in)
        self.requests = {r.kind: r for r in methods.requests().values()}
        self._sides = {}
        for method in methods.METHODS.values():
            side = methods.load(method.holder)(self)
            self._sides.update({r.kind: side for r in method.requests})

    # ------------------------------------------------------------------ requests

    def holder(self, config: dict):
        from fedprompt.client.trainer import Holder  # torch and transformers load here, once
        from fedprompt.models.zoo import known_names
        from fedprompt.protocols.rounds import TaskSpec
        from fedprompt.runtime import Runtime

        task = TaskSpec.from_config(config)
        # by default only the zoo's names and the models this holder registered itself (a student from the
        # provider): a coordinator must not make a holder open paths of its choosing
        allowed = self.allowed_models if self.allowed_models is not None else known_names()
        if task.model not in allowed:
            raise FedPromptError(
                f"the coordinator asked for model {task.model!r}; this holder allows {sorted(allowed)}"
            )
        key = (task, int(config.get("max_length", 128)))
        if self._holder_key != key:
            self._holder = None  # free the previous task's model before loading the next
            self._holder = Holder(
                data=self.data,
                state_dir=self.state_dir,
                name=self.name,
                model=task.model,
                task=task,
                runtime=Runtime.create(self.device, self.precision),
                max_length=key[1],
                local_task=self.local_task,
            )
            self._holder_key = key
        return self._holder

    def handle(self, kind: str, config: dict, prompt: np.ndarray | None) -> tuple[dict, np.ndarray | None]:
        """One request; never raises (a bug is reported as ``code: error`` and logged with its traceback)."""
        request = self.requests.get(kind)
        if request is None or not isinstance(config, dict) or (prompt is None) == request.carries_prompt:
            return _refusal("refused", f"malformed request (kind={kind!r})"), None
        reply, arr = self._answer(kind, config, prompt)
        reply["holder"] = self.name
        return reply, arr

    def _answer(self, kind: str, config: dict, prompt: np.ndarray | None) -> tuple[dict, np.ndarray | None]:
        try:
            return self._handle(kind, config, prompt)
        except PolicyViolation as exc:
            log.warning("%s", exc)
            return _refusal("refused", str(exc)), None
        except BudgetExceededError as exc:
            log.warning("refused: %s", exc)  # the holder's numbers stay in its log
            reason = "refused by the holder's privacy ledger (rule budget): this request would pass its budget"
            return _refusal("budget", reason), None
        except (FedPromptError, ValueError, KeyError, TypeError) as exc:
            log.warning("refused: %s", exc)
            return _refusal("refused", f"{type(exc).__name__}: {str(exc)[:500]}"), None
        except RecursionError:  # JSON nested deeper than Python's parser goes
            log.warning("refused: a config value nested too deep")
            return _refusal("refused", "malformed request: a value nested too deep"), None
        except Exception as exc:  # reported to the coordinator as a failed reply; the daemon keeps serving
            log.exception("request failed")
            return _refusal("error", f"{type(exc).__name__} on the holder (details in its log)"), None

    def _handle(self, kind: str, config: dict, prompt: np.ndarray | None) -> tuple[dict, np.ndarray | None]:
        if kind == "hello":  # who this node is: the coordinator names the participants of its secure rounds
            return {"ok": True, "metrics": {}}, None
        if self.threads is not None:
            self.threads.apply()
        reply, arr = self._sides[kind].handle(kind, config, prompt)
        return {"ok": True, **reply}, arr

    # ------------------------------------------------------------------ secure rounds (the holder's identity)

    def secure_transport(self, round_id: str):
        """The connection of secure round ``round_id`` to the aggregation server (``--aggregator``)."""
        from fedprompt.client.secure_round import Transport

        if self.aggregator is None:
            raise FedPromptError("this holder has no aggregation server to run secure rounds with (--aggregator)")
        return Transport(self.aggregator.connect(self.name), round_id)

    def _identity(self):
        """This holder's SecAgg identity: its node key, its roster, its policy's cohort and colluders."""
        from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

        from fedprompt.protocols.secagg.client import ClientIdentity

        if self.signing_key is None or not self.peers:
            raise FedPromptError("this holder has no node key or no roster of its peers' keys: no secure rounds")
        return ClientIdentity(
            name=self.name,
            signing_key=load_ssh_private_key(self.signing_key.read_bytes(), None),
            roster={name: load_ssh_public_key(path.read_bytes()) for name, path in self.peers.items()},
            min_cohort=self.policy.min_secure_cohort,
            colluders=self.policy.secagg_colluders,
        )

    def check_setup(self, setup) -> None:
        """Refuse a round's setup that breaks this holder's policy or does not match its roster."""
        from fedprompt.protocols.secagg.client import check_setup

        self.policy.check_secure_cohort(setup.num_clients)
        check_setup(setup, self._identity())

    def secagg_client(self, setup, update: np.ndarray):
        """The protocol's holder for one update: its masking secrets live in this object only."""
        from fedprompt.protocols.secagg.client import SecAggClient

        return SecAggClient(setup, update, self._identity())


def _refusal(code: str, reason: str) -> dict:
    return {"ok": False, "code": code, "reason": reason}
