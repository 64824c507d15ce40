"""The holder's service: answers the coordinator's requests under the holder's own policy.

``fedprompt client`` keeps one :class:`HolderService` in its process, with the frozen model and the data loaded
once, and its ClientApp runner (``client/runner.py``) hands it every Flower message of the run. Each request is
checked against the holder's :class:`~fedprompt.client.policy.HolderPolicy` before any example is read: a
violation is a refusal naming the rule, and the ledger is unchanged.

A reply is a dict (``ok``, ``holder``, ``metrics``, and per kind ``secure``, ``candidates`` or ``scores``) and
an optional array. Refusals carry ``code`` (``refused``, ``budget``, ``error``) and a ``reason``
written for the coordinator: it names the rule but none of the holder's own numbers, which go to its log.

Secure aggregation: when a round's settings ask for it (and name the secure round the coordinator opened), the
holder runs SecAgg+ with the aggregation server itself after training (``client/secure_round.py``) and replies
to the coordinator only once the round is done; the update never leaves this process unmasked, and the masking
secrets live only in memory, in the round's SecAggClient.
"""

from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path

import numpy as np

from fedprompt.client.policy import HolderPolicy, PolicyViolation
from fedprompt.errors import BudgetExceededError, FedPromptError

log = logging.getLogger("fedprompt.client")

KINDS = ("hello", "train", "evaluate", "dpopt_generate", "dpopt_score")
NO_PROMPT = ("hello", "dpopt_generate", "dpopt_score")  # requests that carry no prompt array
EVALUATION_MECHANISM = "gaussian-counts"
# adding or removing one test example moves the count of correct answers by at most 1 and the count of
# examples by exactly 1: the pair's L2 sensitivity
EVALUATION_SENSITIVITY = math.sqrt(2.0)


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
        self._secagg_started: set[tuple[str, int]] = set()  # one protocol instance per update, ever
        from fedprompt.client.dpopt.holder import DPOPTJobs

        self._dpopt = DPOPTJobs()  # federated DP-OPT runs between their generation and their scoring

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
        if kind not in KINDS or not isinstance(config, dict) or (prompt is None) != (kind in NO_PROMPT):
            return _refusal("refused", f"malformed request (kind={kind!r})"), None
        reply, arr = self._answer(kind, config, prompt)
        if not reply["ok"]:
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
        from fedprompt.protocols.rounds import LocalSettings

        if self.threads is not None and kind != "hello":
            self.threads.apply()
        if kind == "hello":  # who this node is: the coordinator names the participants of its secure rounds
            return {"ok": True, "holder": self.name, "metrics": {}}, None
        if kind in ("dpopt_generate", "dpopt_score"):
            self.policy.check_run(
                dp=True,
                target_epsilon=float(config["target_epsilon"]),
                delta=float(config.get("delta") or self.policy.max_delta),
                secure_aggregation=False,
            )
            holder = self.holder(config)
            if kind == "dpopt_generate":
                result = self._dpopt.generate(holder, config, run_cap=self.policy.max_run_epsilon)
            else:
                result = self._dpopt.score(holder, config)
            return {"ok": True, "holder": self.name, **result}, None
        settings = LocalSettings.from_config(config)
        if kind == "evaluate":
            return self._evaluate(settings, config, prompt), None
        if settings.secure_aggregation:
            return self._train_secure(settings, config, prompt), None
        self.policy.check_run(
            dp=settings.dp,
            target_epsilon=settings.target_epsilon,
            delta=settings.delta or self.policy.max_delta,
            secure_aggregation=False,
        )
        outcome = self.holder(config).train_round(_weight(prompt), settings, run_cap=self.policy.max_run_epsilon)
        try:
            metrics = {"num_examples": outcome.num_examples, **outcome.metrics}
            reply = {"ok": True, "holder": self.name, "metrics": metrics}, outcome.delta.numpy()
        except BaseException:
            outcome.dropped()
            raise
        outcome.sent()  # the reply goes from here to the runner, which sends it: from now on it counts
        return reply

    def _train_secure(self, settings, config: dict, prompt: np.ndarray | None) -> dict:
        """Train, then take part in the secure round the coordinator opened; the delta stays here. A holder that
        will not take part (its policy, its training) tells the aggregation server at once, so that the others
        do not wait for it."""
        round_id = str(config.get("secure_round_id") or "")
        if not round_id:
            raise FedPromptError("a secure round without the id of its round on the aggregation server")
        key = (settings.run_id, settings.server_round)
        own = self.transport is None
        transport = self.transport or self._transport(round_id)
        try:
            return self._take_part(settings, config, prompt, round_id, key, transport)
        finally:
            if own:
                transport.client.close()

    def _take_part(self, settings, config: dict, prompt, round_id: str, key, transport) -> dict:
        from fedprompt.client import secure_round
        from fedprompt.protocols.secagg.protocol import SecAggRefused

        try:
            if key in self._secagg_started:
                # a second instance on the same update would let the server difference two protocols' results
                raise SecAggRefused(f"a second secure round for run {key[0]} round {key[1]}: one protocol per update")
            self._secagg_started.add(key)
            self.policy.check_run(
                dp=settings.dp,
                target_epsilon=settings.target_epsilon,
                delta=settings.delta or self.policy.max_delta,
                secure_aggregation=True,
            )
            setup = secure_round.join(transport, round_id, np.asarray(prompt).size, self._check_setup)
            outcome = self.holder(config).train_round(_weight(prompt), settings, run_cap=self.policy.max_run_epsilon)
            try:
                # counted from just before the masked update is sent, whatever happens after; a round that ends
                # before that (refused, excluded, stopped) charges nothing
                secure_round.run(transport, setup, outcome.delta.numpy().reshape(-1), self._secagg_client, outcome.sent)
            except BaseException:
                outcome.dropped()  # a no-op once sent
                raise
            outcome.sent()
        except BaseException:
            # out of the round (refused, or failed): say so, so that the others need not wait for this holder's
            # stage deadline; the protocol recovers from a holder that leaves after sharing its keys
            with contextlib.suppress(Exception):
                transport.decline()
            raise
        metrics = {"num_examples": outcome.num_examples, **outcome.metrics}
        return {"ok": True, "holder": self.name, "metrics": metrics, "secure": True}

    def _transport(self, round_id: str):
        from fedprompt.client.secure_round import Transport

        if self.aggregator is None:
            raise FedPromptError("this holder has no aggregation server to run secure rounds with (--aggregator)")
        return Transport(self.aggregator.connect(self.name), round_id)

    def _evaluate(self, settings, config: dict, prompt: np.ndarray | None) -> dict:
        """A noisy count of correct answers and of examples on the holder's test split, charged first."""
        from fedprompt.dp.accounting import epsilon
        from fedprompt.dp.secure_rng import secure_gaussian

        ledger_releases = self._run_releases(settings.run_id)
        done = sum(1 for r in ledger_releases if r.mechanism == EVALUATION_MECHANISM)
        self.policy.check_evaluation(done)
        delta = settings.delta or self.policy.max_delta
        self.policy.check_delta(delta)
        holder = self.holder(config)
        weight = _weight(prompt)
        holder.check_prompt(weight)
        z = self.policy.evaluation_noise / EVALUATION_SENSITIVITY
        eps = epsilon("rdp", [(z, 1.0, 1)], delta=delta)
        with holder.release(
            mechanism=EVALUATION_MECHANISM,
            run_id=settings.run_id,
            round=settings.server_round,
            delta=delta,
            epsilon=eps,
            accountant="rdp",
            noise_multiplier=z,
            sample_rate=1.0,
            steps=1,
            run_cap=self.policy.max_run_epsilon,
        ) as charged:
            correct, total = holder.evaluate_counts(weight)
            noise = secure_gaussian((2,), self.policy.evaluation_noise).numpy()
            charged.settle(steps=1, epsilon=eps)
        noisy_correct, noisy_total = float(correct + noise[0]), float(total + noise[1])
        log.info(
            "evaluation of run %s round %s released with noise %g: epsilon %.3f charged",
            settings.run_id,
            settings.server_round,
            self.policy.evaluation_noise,
            eps,
        )
        metrics = {"correct": noisy_correct, "examples": noisy_total, "dp": 1, "noise": self.policy.evaluation_noise}
        return {"ok": True, "holder": self.name, "metrics": metrics}

    def _run_releases(self, run_id: str) -> list:
        from fedprompt.dp.ledger import PrivacyLedger

        return [r for r in PrivacyLedger(self.state_dir).releases() if r.run_id == run_id]

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

    def _check_setup(self, setup) -> None:
        from fedprompt.protocols.secagg.client import check_setup

        self.policy.check_secure_cohort(setup.num_clients)
        check_setup(setup, self._identity())

    def _secagg_client(self, setup, update: np.ndarray):
        from fedprompt.protocols.secagg.client import SecAggClient

        return SecAggClient(setup, update, self._identity())


def _weight(prompt: np.ndarray | None):
    import torch

    return torch.from_numpy(np.array(prompt, dtype=np.float32))


def _refusal(code: str, reason: str) -> dict:
    return {"ok": False, "code": code, "reason": reason}
