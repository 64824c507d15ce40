"""The coordinator's side of federated soft-prompt tuning (method ``prompt-tuning``): sample holders, send the
global prompt, merge the deltas, evaluate, checkpoint.

A round goes on with the replies that arrived before its timeout as long as ``min_train_nodes`` of them
are usable; a holder that dropped, crashed, refused (privacy budget) or sent something malformed is
recorded and left out, never fatal. After every round the global prompt is written as a prompt artifact
and the run can be restarted from there (``checkpoint.latest``).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedprompt.artifact import ArtifactMeta
from fedprompt.models import zoo
from fedprompt.prompt import origin_id, prompt_sha256
from fedprompt.protocols.aggregator_client import AggregatorClient, AggregatorError
from fedprompt.protocols.flower_records import to_record
from fedprompt.protocols.records import ModelRef
from fedprompt.protocols.rounds import TaskSpec
from fedprompt.server.coordinator import checkpoint, secure_round
from fedprompt.server.coordinator.config import FederationConfig
from fedprompt.server.coordinator.evaluation import ServerEvaluation, holders_accuracy
from fedprompt.server.coordinator.exchange import send_and_receive
from fedprompt.server.coordinator.replies import holder_of, parse_train_reply
from fedprompt.server.coordinator.strategies import ClientLevelDP, make_strategy, weighted_mean
from fedprompt.task import Verbalizer
from fedprompt.training import initial_prompt
from fedprompt.tuning_settings import TuneConfig

INFO = 20
WARNING = 30


class Federation:
    """One federation run's state on the coordinator."""

    def __init__(self, grid: Grid, cfg: FederationConfig, run_id: str) -> None:
        self.grid, self.cfg, self.run_id = grid, cfg, run_id
        self.rng = random.SystemRandom()
        # nodes that did not answer the last round: skipped for one round, so that a holder that died does
        # not cost every following round (and its evaluation) a full timeout until Flower drops it
        self.unresponsive: set[int] = set()
        self.names: dict[int, str] = {}  # node id -> the holder name it reported
        loaded = zoo.load(cfg.model)
        self.task: TaskSpec = cfg.task_spec(loaded.weights_sha256)
        verbalizer = Verbalizer.build(
            loaded.tokenizer,
            [list(w) for w in self.task.label_words],
            scoring=self.task.scoring,
            label_names=list(self.task.label_names),
        )
        tune_cfg = TuneConfig(prompt_length=cfg.prompt_length, init="text")
        self.initial, self.init_info = initial_prompt(loaded, verbalizer, tune_cfg, self.task.init_text)
        self.strategy = make_strategy(cfg.strategy, cfg.server_lr or None)
        self.client_dp = (
            ClientLevelDP(
                cfg.client_clip_norm,
                cfg.client_noise_multiplier,
                cfg.fraction_train,
                expected_clients=cfg.fraction_train * cfg.min_available_nodes,
                delta=cfg.client_delta,
            )
            if cfg.client_dp
            else None
        )
        self.aggregator = (
            AggregatorClient(cfg.aggregator, cfg.aggregator_certs, "coordinator") if cfg.aggregator else None
        )
        self.secure_rounds = (
            AggregatorClient(cfg.secure_rounds or cfg.aggregator, cfg.aggregator_certs, "coordinator")
            if cfg.secure_aggregation
            else None
        )
        self.server_eval = ServerEvaluation.create(loaded, self.task, cfg) if cfg.server_eval else None
        self.fingerprint = {
            "task": self.task.name,
            "template": self.task.template,
            "model_sha256": self.task.model_sha256,
            "prompt_shape": list(self.initial.shape),
            "origin_id": origin_id(self.initial),
            "strategy": cfg.strategy,
            "dp": cfg.dp,
            "client_dp": cfg.client_dp,
        }

    # ------------------------------------------------------------------ nodes

    def wait_for_nodes(self, minimum: int) -> list[int]:
        """The connected nodes (less those that missed the last round) once there are ``minimum`` of them."""
        deadline = time.monotonic() + self.cfg.wait_for_nodes_s
        while True:
            nodes = sorted(set(self.grid.get_node_ids()) - self.unresponsive)
            if len(nodes) >= minimum:
                return nodes
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"only {len(nodes)} of the {minimum} holders needed are connected "
                    f"after {self.cfg.wait_for_nodes_s:.0f} s"
                )
            time.sleep(1.0)

    def sample(self, nodes: list[int]) -> list[int]:
        if self.client_dp is not None:  # Poisson sampling, which the client-level accountant assumes
            return [n for n in nodes if self.rng.random() < self.cfg.fraction_train]
        k = max(self.cfg.min_train_nodes, math.ceil(self.cfg.fraction_train * len(nodes)))
        return sorted(self.rng.sample(nodes, min(k, len(nodes))))

    # ------------------------------------------------------------------ messages

    def _messages(
        self, nodes: list[int], weight: torch.Tensor, kind: str, rnd: int, extra: dict | None = None
    ) -> list[Message]:
        config = {**self.task.to_config(), **self.cfg.local_settings(run_id=self.run_id, server_round=rnd).to_config()}
        config.update(extra or {})
        content = RecordDict({"prompt": to_record(weight=weight.numpy()), "config": ConfigRecord(config)})
        return [Message(content, dst_node_id=n, message_type=kind, group_id=str(rnd)) for n in nodes]

    def learn_names(self, nodes: list[int]) -> None:
        """Ask the nodes whose holder name is not known yet who they are (a secure round names its participants
        before they train). The holder answers from its name alone; nothing of its data is touched."""
        unknown = [n for n in nodes if n not in self.names]
        if not unknown:
            return
        content = RecordDict({"config": ConfigRecord({})})
        msgs = [Message(content, dst_node_id=n, message_type=f"{MessageType.QUERY}.hello") for n in unknown]
        for reply in send_and_receive(self.grid, msgs, timeout=min(120.0, self.cfg.round_timeout_s)):
            name = holder_of(reply)
            if not reply.has_error() and name != str(reply.metadata.src_node_id):
                self.names[reply.metadata.src_node_id] = name

    def train_round(self, rnd: int, weight: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """One round: the sampled holders train the prompt; their updates (or, secure, their mean) are merged.
        Whatever goes wrong leaves the prompt unchanged and is recorded in the round's record."""
        nodes = self.sample(self.wait_for_nodes(self.cfg.min_train_nodes))
        record: dict = {"round": rnd, "sampled": len(nodes), "holders": {}, "failed": {}}
        if not nodes:
            log(WARNING, "round %d: no holder sampled; the prompt is unchanged", rnd)
            return weight, record
        extra, round_id = {}, None
        if self.cfg.secure_aggregation:
            nodes, round_id = self._open_secure_round(rnd, nodes, weight, record)
            if round_id is None:
                return weight, record
            extra["secure_round_id"] = round_id
        started = time.monotonic()
        replies = list(
            send_and_receive(
                self.grid,
                self._messages(nodes, weight, MessageType.TRAIN, rnd, extra),
                timeout=self.cfg.round_timeout_s,
            )
        )
        record["train_seconds"] = time.monotonic() - started
        ok = self._usable_replies(rnd, nodes, replies, weight.shape, record)
        mean = self._merge(rnd, ok, weight, round_id, record)
        if mean is None:
            return weight, record
        record["merged"] = True
        return self.strategy.apply(weight, mean), record

    def _open_secure_round(self, rnd: int, nodes: list[int], weight: torch.Tensor, record: dict):
        """(the nodes invited, the id of the round opened on the aggregation server), or (nodes, None)."""
        self.learn_names(nodes)
        nodes = [n for n in nodes if n in self.names]  # a node that did not say who it is cannot be invited
        try:
            round_id = secure_round.open_round(
                self.secure_rounds,
                task=self.task,
                shape=tuple(weight.shape),
                participants=[self.names[n] for n in nodes],
                min_clients=self.cfg.min_train_nodes,
                clip_range=self.cfg.secagg_clip_range,
            )
        except secure_round.SecureRoundFailed as exc:
            record["failed"]["secure aggregation"] = str(exc)
            log(WARNING, "round %d: %s; the prompt is unchanged", rnd, exc)
            return nodes, None
        return nodes, round_id

    def _usable_replies(self, rnd: int, nodes: list[int], replies: list[Message], shape, record: dict) -> list:
        """The replies that can be merged; the others, and the nodes that did not answer, go to the record."""
        parsed = [parse_train_reply(m, shape, secure=self.cfg.secure_aggregation) for m in replies]
        for r in parsed:
            if r.holder != str(r.node_id):
                self.names[r.node_id] = r.holder
            else:
                r.holder = self.names.get(r.node_id, r.holder)
            if r.error:
                record["failed"][r.holder] = r.error
                log(WARNING, "round %d: holder %s left out: %s", rnd, r.holder, r.error)
        self.unresponsive = set(nodes) - {r.node_id for r in parsed}
        for n in sorted(self.unresponsive):
            record["failed"][self.names.get(n, str(n))] = f"no reply within {self.cfg.round_timeout_s:.0f} s"
            log(WARNING, "round %d: node %s did not reply in time; skipped next round", rnd, n)
        ok = [r for r in parsed if not r.error]
        for r in ok:
            record["holders"][r.holder] = {k: v for k, v in r.metrics.items() if isinstance(v, int | float)}
        record["replied"] = len(ok)
        return ok

    def _merge(self, rnd: int, ok: list, weight: torch.Tensor, round_id: str | None, record: dict):
        """The mean update of the round (client-level DP, secure or plain), or None: the prompt stays."""
        if self.client_dp is not None:
            if not ok:
                log(WARNING, "round %d: no usable update; the prompt is unchanged", rnd)
                return None
            mean, stats = self.client_dp.merge([r.delta for r in ok])
            record.update(stats)
            return mean
        if round_id is not None:
            if len(ok) < max(2, self.cfg.min_train_nodes):  # the "sum" of one holder would be its update
                secure_round.abort(self.secure_rounds, round_id, f"{len(ok)} holder(s) took part")
                log(WARNING, "round %d: %d holder(s) took part, too few to aggregate securely; unchanged", rnd, len(ok))
                return None
            try:
                mean_np, stats = secure_round.collect(self.secure_rounds, round_id, tuple(weight.shape))
            except secure_round.SecureRoundFailed as exc:
                record["failed"]["secure aggregation"] = str(exc)
                log(WARNING, "round %d: secure aggregation failed, the prompt is unchanged: %s", rnd, exc)
                return None
            record.update(stats)
            # every holder counts once: the protocol sums, and the sum is divided by the survivors
            return torch.from_numpy(mean_np)
        if len(ok) < self.cfg.min_train_nodes:
            log(
                WARNING,
                "round %d: %d usable update(s), fewer than min_train_nodes=%d; the prompt is unchanged",
                rnd,
                len(ok),
                self.cfg.min_train_nodes,
            )
            return None
        # under DP a holder's count is not to be trusted or used (it is private): equal weights
        weights = [1.0] * len(ok) if self.cfg.dp else [float(r.num_examples) for r in ok]
        return weighted_mean([r.delta for r in ok], weights)

    def evaluate(self, rnd: int, weight: torch.Tensor) -> dict:
        """The round's accuracy: on the coordinator's own evaluation data (``server_eval``) and, when asked,
        from the holders' DP answers (noisy counts of correct answers and of examples; a holder answers only
        as often as its policy allows, each answer charged to its ledger)."""
        record: dict = {}
        if self.server_eval is not None:
            record.update(self.server_eval.evaluate(weight))
        if self.cfg.evaluate:
            record.update(self.evaluate_on_holders(rnd, weight))
        if "accuracy" not in record and "holders_accuracy" in record:
            record["accuracy"] = record["holders_accuracy"]
        return record

    def evaluate_on_holders(self, rnd: int, weight: torch.Tensor) -> dict:
        nodes = self.wait_for_nodes(1)
        replies = send_and_receive(
            self.grid, self._messages(nodes, weight, MessageType.EVALUATE, rnd), timeout=self.cfg.round_timeout_s
        )
        record, names = holders_accuracy(replies)
        self.names.update(names)
        if record["eval_refused"]:
            log(WARNING, "round %d: evaluation refused or failed on %s", rnd, record["eval_refused"])
        return record

    # ------------------------------------------------------------------ the run

    def artifact_meta(self, rnd: int, history: list[dict]) -> ArtifactMeta:
        holders = sorted({h for rec in history for h, m in rec.get("holders", {}).items() if m.get("dp")})
        privacy = None
        if self.cfg.dp:
            privacy = {
                # each holder's examples are (target_epsilon, delta)-DP for everything the run released (its
                # noise was calibrated to reach the target over all rounds; its ledger holds the exact spend);
                # the merged prompt is post-processing
                "epsilon": self.cfg.target_epsilon,
                "delta": self.cfg.delta,
                "accountant": self.cfg.accountant,
                "mechanism": "dp-sgd, federated",
                "unit": "example",
                "per_holder": {h: {"epsilon": self.cfg.target_epsilon, "delta": self.cfg.delta} for h in holders},
            }
            if self.client_dp is not None:
                privacy["client_level"] = {
                    "epsilon": self.client_dp.epsilon(rnd),
                    "delta": self.client_dp.delta,
                    "unit": "holder",
                    "noise_multiplier": self.client_dp.noise_multiplier,
                    "clip_norm": self.client_dp.clip_norm,
                }
        return ArtifactMeta.create(
            self.task,
            self.task.model,
            self.task.model_sha256,
            origin_id=origin_id(self.initial),
            init=self.init_info,
            privacy=privacy,
            training={"federated": True, "round": rnd, "run_config": self.cfg.to_run_config()},
        )

    def save(self, rnd: int, weight: torch.Tensor, history: list[dict]) -> None:
        """Publish the round's prompt to the registry (when there is one), then checkpoint it."""
        meta = self.artifact_meta(rnd, history)
        if self.aggregator is not None:
            parent = next((r["version_id"] for r in reversed(history[:-1]) if r.get("version_id")), None)
            try:
                v = self.aggregator.publish_version(
                    task=self.task.name,
                    base_model=ModelRef(self.task.model, self.task.model_sha256),
                    embeddings=weight.numpy(),
                    parent_id=parent,
                    metadata={**asdict(meta), "prompt_sha256": prompt_sha256(weight), "run_id": self.run_id},
                )
                history[-1]["version_id"] = v.version_id
            except AggregatorError as exc:  # the checkpoint still holds the prompt; the registry can catch up
                history[-1]["registry_error"] = str(exc)
                log(WARNING, "round %d: not stored in the prompt registry: %s", rnd, exc)
        ckpt = checkpoint.Checkpoint(rnd, weight, meta, self.strategy.state_dict(), history)
        checkpoint.save(self.cfg.checkpoint_dir, ckpt, self.fingerprint)

    def run(self) -> None:
        cfg = self.cfg
        ckpt = checkpoint.latest(cfg.checkpoint_dir, self.fingerprint)
        self.wait_for_nodes(cfg.min_available_nodes)  # the federation starts once enough holders are in
        if ckpt is not None:
            weight, history, start = ckpt.weight, ckpt.history, ckpt.round + 1
            self.strategy.load_state_dict(ckpt.strategy_state)
            log(INFO, "resuming from round %d in %s", ckpt.round, cfg.checkpoint_dir)
        else:
            weight, history, start = self.initial.clone(), [], 1
            record = {"round": 0, "holders": {}}
            if cfg.evaluate or self.server_eval is not None:
                record.update(self.evaluate(0, weight))
                log(INFO, "round 0 (initial prompt): accuracy %s", _pct(record.get("accuracy")))
            history.append(record)
            self.save(0, weight, history)
        for rnd in range(start, cfg.num_rounds + 1):
            weight, record = self.train_round(rnd, weight)
            if (cfg.evaluate or self.server_eval is not None) and (rnd % cfg.eval_every == 0 or rnd == cfg.num_rounds):
                record.update(self.evaluate(rnd, weight))
            if self.client_dp is not None:
                record["client_level_epsilon"] = self.client_dp.epsilon(rnd)
            history.append(record)
            eps = ", ".join(
                f"{h} eps={m.get('epsilon', float('nan')):.2f}" for h, m in sorted(record["holders"].items())
            )
            log(
                INFO,
                "round %d/%d:%s %d/%d holders merged (%s)%s",
                rnd,
                cfg.num_rounds,
                "" if record.get("accuracy") is None else f" global test accuracy {_pct(record['accuracy'])};",
                record.get("replied", 0),
                record["sampled"],
                eps,
                f"; left out: {record['failed']}" if record["failed"] else "",
            )
            self.save(rnd, weight, history)
        log(INFO, "federation done: global prompt in %s", cfg.checkpoint_dir)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f} %"


class SoftPromptCoordinator:
    soft_prompt = True

    def check(self, cfg: FederationConfig) -> None:
        """Nothing beyond FederationConfig's own checks (the task's label words are checked on the model by
        ``fedprompt server`` before it submits)."""

    def run(self, grid: Grid, cfg: FederationConfig, run_id: str) -> None:
        Federation(grid, cfg, run_id=run_id).run()

    def result(self, cfg: FederationConfig) -> tuple[Path, str]:
        return checkpoint.round_dir(Path(cfg.checkpoint_dir), cfg.num_rounds), "federation complete: global prompt"


COORDINATOR = SoftPromptCoordinator()
