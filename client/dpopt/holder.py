"""A data holder's part of a federated DP-OPT run: write candidates from its data, then score everyone's.

1. ``generate``: the holder splits its training data into generation examples and a holdout (keyed hash per
   example, the key kept in memory only), charges its ledger the run's projected spend, and writes DP
   candidates (``dpopt.DPOPTGenerator``). The candidates are DP releases: they go to the coordinator as text.
2. ``score``: the holder scores every holder's candidates on its holdout and releases the counts of correct
   answers through the Gaussian mechanism. One holdout example changes each of the K counts by at most 1,
   so the vector's L2 sensitivity is sqrt(K); the noise's standard deviation is z * sqrt(K) with z calibrated
   by the RDP accountant to the selection epsilon. The coordinator adds the noisy vectors and picks the
   largest sum: post-processing, which costs nothing more.

The holdout and the generation examples are disjoint per example, so the holder's whole spend is
max(epsilon of generation, epsilon of the noisy scores) at its delta; the ledger is settled with that after
scoring. A run whose scoring never comes stays reserved at its projection (counted as spent).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fedprompt.errors import ConfigError, FedPromptError
from fedprompt.protocols.dpopt_settings import dpopt_config

if TYPE_CHECKING:
    from fedprompt.dp.ledger import Reservation

MECHANISM = "dp-opt-federated"
SCORE_ACCOUNTANT = "rdp"


@dataclass
class _Pending:
    holdout: list
    release: Reservation
    epsilon_generation: float
    delta: float
    queries: int
    selection_epsilon: float


class DPOPTHolder:
    """The holder's side of federated DP-OPT (method ``dpopt``): ``dpopt_generate`` and ``dpopt_score`` requests
    of one holder's :class:`~fedprompt.client.service.HolderService`; ``holder`` below is its loaded
    :class:`~fedprompt.client.trainer.Holder`."""

    def __init__(self, service) -> None:
        self.service = service
        self._pending: dict[str, _Pending] = {}  # runs between their generation and their scoring

    def handle(self, kind: str, config: dict, prompt: None) -> tuple[dict, None]:
        policy = self.service.policy
        policy.check_run(
            dp=True,
            target_epsilon=float(config["target_epsilon"]),
            delta=float(config.get("delta") or policy.max_delta),
            secure_aggregation=False,
        )
        holder = self.service.holder(config)
        if kind == "dpopt_generate":
            out = self.generate(holder, config, run_cap=policy.max_run_epsilon)
            records = {"dpopt": {"candidates_json": json.dumps(out["candidates"])}}
        else:
            out = self.score(holder, config)
            records = {"dpopt": {"scores_json": json.dumps(out["scores"])}}
        return {"metrics": out["metrics"], "records": records}, None

    def generate(self, holder, config: dict, run_cap: float | None = None) -> dict:
        from fedprompt.client.dpopt import generation as dpopt

        run_id = str(config["run_id"])
        if run_id in self._pending:
            raise FedPromptError(f"DP-OPT run {run_id} already generated here; a second generation is refused")
        cfg = dpopt_config(config)
        s, task = holder.session, holder.task
        words = [w[0] for w in task.label_words]
        train = s.dataset.split("train")
        gen, holdout = dpopt.prepare(
            s.loaded, s.runtime, s.verbalizer, task.template, words, task.init_text, train, cfg
        )
        eps_sel = cfg.selection_epsilon or cfg.target_epsilon
        reservation = {"mechanism": MECHANISM, "delta": gen.delta, "epsilon": dpopt.projected_epsilon(gen)}
        holder.check_run_cap(run_id, reservation, run_cap)
        # open across two messages (generation, then scoring): closed by score(), or counted as reserved
        release = holder.ledger.open(task=task.name, run_id=run_id, **reservation)
        try:
            candidates, _exhausted, tokens = gen.generate()
        except BaseException:
            release.close(failed=True)  # nothing left this process
            raise
        # the generation's guarantee is its projection (valid under adaptive stopping, see dpopt.finish)
        eps_gen = gen.epsilon_spent(gen.projected_queries())
        release.leaving()  # the candidates leave with this reply
        if not candidates:  # nothing to score: settle now
            release.settle(steps=gen.queries, epsilon=eps_gen)
        else:
            self._pending[run_id] = _Pending(holdout, release, eps_gen, gen.delta, gen.queries, eps_sel)
        # the reply holds the candidates (DP outputs) and counts of them; the ε, which depends on the sampling
        # rate and so on n, stays in the holder's ledger
        return {"candidates": candidates, "metrics": {"queries": gen.queries, "tokens": tokens}}

    def score(self, holder, config: dict) -> dict:
        from fedprompt.client.dpopt.generation import score_candidates
        from fedprompt.dp.accounting import calibrate_noise, epsilon
        from fedprompt.dp.secure_rng import secure_gaussian

        run_id = str(config["run_id"])
        pending = self._pending.pop(run_id, None)  # one scoring per generation: a replay is refused
        if pending is None:
            raise FedPromptError(f"no DP-OPT generation of run {run_id} awaits scoring here")
        candidates = json.loads(str(config["candidates_json"]))
        if not (isinstance(candidates, list) and candidates and all(isinstance(c, str) and c for c in candidates)):
            raise ConfigError("candidates_json must be a non-empty JSON list of non-empty strings")
        try:
            s, task = holder.session, holder.task
            correct = score_candidates(s.loaded, s.runtime, s.verbalizer, task.template, candidates, pending.holdout)
            z = calibrate_noise(
                target_epsilon=pending.selection_epsilon,
                delta=pending.delta,
                sample_rate=1.0,
                steps=1,
                accountant=SCORE_ACCOUNTANT,
            )
            noise = secure_gaussian((len(candidates),), z * math.sqrt(len(candidates))).numpy()
            eps_score = epsilon(SCORE_ACCOUNTANT, [(z, 1.0, 1)], delta=pending.delta)
        except BaseException:
            # nothing about the holdout left this process: the generation's spend is what was released
            pending.release.settle(steps=pending.queries, epsilon=pending.epsilon_generation)
            raise
        total = max(pending.epsilon_generation, eps_score)
        pending.release.settle(steps=pending.queries, epsilon=total)
        noisy = (np.asarray(correct, dtype=np.float64) + noise).tolist()
        metrics = {"epsilon": float(config["target_epsilon"])}  # the bound; the exact spend is in the ledger
        if float(config.get("delta") or 0) > 0:
            metrics["delta"] = float(config["delta"])
        return {"scores": noisy, "metrics": metrics}
