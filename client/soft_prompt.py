"""The holder's side of federated soft-prompt tuning (method ``prompt-tuning``): train a round's prompt under
DP and reply with the update, or hand it to the round's secure aggregation; evaluate a prompt as a DP release.

Secure aggregation: when a round's settings ask for it (and name the secure round the coordinator opened), the
holder runs SecAgg+ with the aggregation server itself after training (``client/secure_round.py``) and replies
to the coordinator only once the round is done; the update never leaves this process unmasked, and the masking
secrets live only in memory, in the round's SecAggClient.
"""

from __future__ import annotations

import contextlib
import logging
import math

import numpy as np

from fedprompt.errors import FedPromptError
from fedprompt.protocols.rounds import LocalSettings

log = logging.getLogger("fedprompt.client")

EVALUATION_MECHANISM = "gaussian-counts"
# adding or removing one test example moves the count of correct answers by at most 1 and the count of
# examples by exactly 1: the pair's L2 sensitivity
EVALUATION_SENSITIVITY = math.sqrt(2.0)


class SoftPromptHolder:
    """``train`` and ``evaluate`` requests of one holder's :class:`~fedprompt.client.service.HolderService`."""

    def __init__(self, service) -> None:
        self.service = service
        self._secagg_started: set[tuple[str, int]] = set()  # one protocol instance per update, ever

    def handle(self, kind: str, config: dict, prompt: np.ndarray) -> tuple[dict, np.ndarray | None]:
        settings = LocalSettings.from_config(config)
        if kind == "evaluate":
            return self.evaluate(settings, config, prompt), None
        if settings.secure_aggregation:
            return self.train_secure(settings, config, prompt), None
        return self.train(settings, config, prompt)

    def train(self, settings: LocalSettings, config: dict, prompt: np.ndarray) -> tuple[dict, np.ndarray]:
        policy = self.service.policy
        policy.check_run(
            dp=settings.dp,
            target_epsilon=settings.target_epsilon,
            delta=settings.delta or policy.max_delta,
            secure_aggregation=False,
        )
        holder = self.service.holder(config)
        outcome = holder.train_round(_weight(prompt), settings, run_cap=policy.max_run_epsilon)
        try:
            reply = {"metrics": {"num_examples": outcome.num_examples, **outcome.metrics}}, outcome.delta.numpy()
        except BaseException:
            outcome.dropped()
            raise
        outcome.sent()  # the reply goes from here to the runner, which sends it: from now on it counts
        return reply

    def train_secure(self, settings: LocalSettings, config: dict, prompt: np.ndarray) -> dict:
        """Train, then take part in the secure round the coordinator opened; the delta stays here. A holder that
        will not take part (its policy, its training) tells the aggregation server at once, so that the others
        do not wait for it."""
        round_id = str(config.get("secure_round_id") or "")
        if not round_id:
            raise FedPromptError("a secure round without the id of its round on the aggregation server")
        own = self.service.transport is None
        transport = self.service.transport or self.service.secure_transport(round_id)
        try:
            return self._take_part(settings, config, prompt, round_id, transport)
        finally:
            if own:
                transport.client.close()

    def _take_part(self, settings: LocalSettings, config: dict, prompt, round_id: str, transport) -> dict:
        from fedprompt.client import secure_round
        from fedprompt.protocols.secagg.protocol import SecAggRefused

        service, policy = self.service, self.service.policy
        key = (settings.run_id, settings.server_round)
        try:
            if key in self._secagg_started:
                # a second instance on the same update would let the server difference two protocols' results
                raise SecAggRefused(f"a second secure round for run {key[0]} round {key[1]}: one protocol per update")
            self._secagg_started.add(key)
            policy.check_run(
                dp=settings.dp,
                target_epsilon=settings.target_epsilon,
                delta=settings.delta or policy.max_delta,
                secure_aggregation=True,
            )
            setup = secure_round.join(transport, round_id, np.asarray(prompt).size, service.check_setup)
            outcome = service.holder(config).train_round(_weight(prompt), settings, run_cap=policy.max_run_epsilon)
            try:
                # counted from just before the masked update is sent, whatever happens after; a round that ends
                # before that (refused, excluded, stopped) charges nothing
                update = outcome.delta.numpy().reshape(-1)
                secure_round.run(transport, setup, update, service.secagg_client, outcome.sent)
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
        return {"metrics": {"num_examples": outcome.num_examples, **outcome.metrics}, "secure": True}

    def evaluate(self, settings: LocalSettings, config: dict, prompt: np.ndarray) -> dict:
        """A noisy count of correct answers and of examples on the holder's test split, charged first."""
        from fedprompt.dp.accounting import epsilon
        from fedprompt.dp.ledger import PrivacyLedger
        from fedprompt.dp.secure_rng import secure_gaussian

        policy = self.service.policy
        releases = [r for r in PrivacyLedger(self.service.state_dir).releases() if r.run_id == settings.run_id]
        policy.check_evaluation(sum(1 for r in releases if r.mechanism == EVALUATION_MECHANISM))
        delta = settings.delta or policy.max_delta
        policy.check_delta(delta)
        holder = self.service.holder(config)
        weight = _weight(prompt)
        holder.check_prompt(weight)
        z = policy.evaluation_noise / EVALUATION_SENSITIVITY
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
            run_cap=policy.max_run_epsilon,
        ) as charged:
            correct, total = holder.evaluate_counts(weight)
            noise = secure_gaussian((2,), policy.evaluation_noise).numpy()
            charged.settle(steps=1, epsilon=eps)
        log.info(
            "evaluation of run %s round %s released with noise %g: epsilon %.3f charged",
            settings.run_id,
            settings.server_round,
            policy.evaluation_noise,
            eps,
        )
        metrics = {"correct": float(correct + noise[0]), "examples": float(total + noise[1]), "dp": 1}
        return {"metrics": {**metrics, "noise": policy.evaluation_noise}}


def _weight(prompt: np.ndarray):
    import torch

    return torch.from_numpy(np.array(prompt, dtype=np.float32))
