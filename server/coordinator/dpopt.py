"""Federated DP-OPT on the coordinator: collect the holders' DP candidates, have every holder score all of
them on its own holdout with noise, and keep the candidate with the largest sum of noisy scores.

Everything the coordinator receives is already differentially private on the holder's side (the candidates
through the limited-domain mechanism, the scores through the Gaussian mechanism; see
``fedprompt.client.dpopt.holder``); it adds nothing, and choosing the winner is post-processing. The
chosen instruction is saved as a text prompt artifact and, when the aggregation server runs, stored in its
registry as a text version.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedprompt import text_prompt
from fedprompt.cache import write_json_atomic
from fedprompt.models import zoo
from fedprompt.protocols.aggregator_client import AggregatorClient, AggregatorError
from fedprompt.protocols.dpopt_settings import dpopt_config
from fedprompt.protocols.records import ModelRef
from fedprompt.server.coordinator.config import FederationConfig
from fedprompt.server.coordinator.exchange import send_and_receive

INFO = 20
WARNING = 30
RESULT_FILE = "dpopt-result.json"
ARTIFACT_DIR = "dpopt-prompt"


def _wait_for_nodes(grid: Grid, cfg: FederationConfig) -> list[int]:
    deadline = time.monotonic() + cfg.wait_for_nodes_s
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= cfg.min_available_nodes:
            return nodes
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(nodes)} of {cfg.min_available_nodes} holders connected")
        time.sleep(1.0)


def _exchange(grid: Grid, cfg: FederationConfig, nodes: list[int], kind: str, config: dict) -> dict[int, Message]:
    content = RecordDict({"config": ConfigRecord(config)})
    msgs = [Message(content, dst_node_id=n, message_type=f"{MessageType.QUERY}.{kind}") for n in nodes]
    return {m.metadata.src_node_id: m for m in send_and_receive(grid, msgs, timeout=cfg.round_timeout_s)}


def _holder(msg: Message) -> str:
    return str(msg.content["info"]["holder"]) if msg.has_content() else str(msg.metadata.src_node_id)


def _answered(replies: dict[int, Message], stage: str, record: dict):
    """(node, holder, reply) of each reply that is not an error; the errors go to the record and the log."""
    for node, msg in replies.items():
        name = _holder(msg)
        if msg.has_error():
            record["failed"][name] = f"{stage}: {msg.error.reason}"
            log(WARNING, "DP-OPT: holder %s failed its %s: %s", name, stage, msg.error.reason)
            continue
        yield node, name, msg


def run_dpopt(grid: Grid, cfg: FederationConfig, run_id: str) -> dict:
    """One federated DP-OPT run; returns (and writes to the checkpoint folder) its record."""
    loaded = zoo.load(cfg.model)
    task = cfg.task_spec(loaded.weights_sha256)
    base = {
        **task.to_config(),
        "run_id": run_id,
        "target_epsilon": cfg.target_epsilon,
        "delta": cfg.delta,  # public: each holder's own 1/(2n) would tell the coordinator its n
        "dpopt_preset": cfg.dpopt_preset,
        "dpopt_settings": cfg.dpopt_settings,
        "max_length": cfg.max_length,
    }
    record: dict = {"method": "dpopt", "run_id": run_id, "holders": {}, "failed": {}}
    nodes = _wait_for_nodes(grid, cfg)
    started = time.monotonic()
    candidates, writers = _generate(grid, cfg, nodes, base, record)
    record["generation_seconds"] = time.monotonic() - started
    log(INFO, "DP-OPT: %d candidates from %d holders", len(candidates), len(writers))
    if not candidates:
        raise RuntimeError(f"no holder released a candidate: {record['failed']}")
    totals, scorers = _score(grid, cfg, writers, {**base, "candidates_json": json.dumps(candidates)}, record)
    if scorers == 0:
        raise RuntimeError(f"no holder scored the candidates: {record['failed']}")
    winner = int(np.argmax(totals))
    chosen = candidates[winner]
    record.update(candidates=candidates, noisy_score_sums=totals.tolist(), chosen=chosen, scorers=scorers)
    log(INFO, "DP-OPT: chosen %r (candidate %d of %d)", chosen, winner + 1, len(candidates))
    _save(cfg, run_id, loaded, task, chosen, record)
    write_json_atomic(Path(cfg.checkpoint_dir) / RESULT_FILE, record)
    return record


def _generate(grid: Grid, cfg: FederationConfig, nodes: list[int], base: dict, record: dict):
    """1. Every holder writes DP candidates from its own data: (the distinct candidates, the nodes that wrote)."""
    candidates: list[str] = []
    writers: list[int] = []
    for node, name, msg in _answered(_exchange(grid, cfg, nodes, "dpopt_generate", base), "generation", record):
        own = json.loads(str(msg.content["dpopt"]["candidates_json"]))
        record["holders"][name] = {"candidates": len(own), **dict(msg.content["metrics"])}
        if own:
            writers.append(node)
        for c in own:  # each distinct text once, however many holders (or candidates of one) wrote it
            if c not in candidates:
                candidates.append(c)
    return candidates, writers


def _score(grid: Grid, cfg: FederationConfig, writers: list[int], request: dict, record: dict):
    """2. The writers score every candidate on their holdouts (only they hold a run to settle): (the sums of
    their noisy scores, how many scored)."""
    totals = np.zeros(len(json.loads(request["candidates_json"])))
    scorers = 0
    for _, name, msg in _answered(_exchange(grid, cfg, writers, "dpopt_score", request), "scoring", record):
        scores = json.loads(str(msg.content["dpopt"]["scores_json"]))
        if len(scores) != len(totals) or not all(np.isfinite(scores)):
            record["failed"][name] = "scoring: malformed scores"
            continue
        totals += np.asarray(scores, dtype=np.float64)
        record["holders"].setdefault(name, {}).update(dict(msg.content["metrics"]))
        scorers += 1
    return totals, scorers


def _save(cfg: FederationConfig, run_id: str, loaded, task, chosen: str, record: dict) -> None:
    """3. The chosen prompt as a text-prompt artifact, and in the prompt registry when there is one."""
    holder_eps = {h: m["epsilon"] for h, m in record["holders"].items() if "epsilon" in m}
    privacy = {
        # every holder's data is (target epsilon, delta)-DP with respect to the run (each holder's ledger holds
        # its exact spend, which depends on its n and is not released)
        "epsilon": cfg.target_epsilon,
        "delta": cfg.delta,
        "accountant": "dpopt-rdp + rdp (Gaussian scores), per holder",
        "mechanism": "dp-opt-federated",
        "per_holder_epsilon": holder_eps,
    }
    meta = text_prompt.TextPromptMeta.create(
        task,
        loaded.model_id,
        loaded.weights_sha256,
        initial_instruction=task.init_text,
        privacy=privacy,
        settings={"dpopt_preset": cfg.dpopt_preset, "dpopt_settings": cfg.dpopt_settings, "run_id": run_id},
    )
    folder = text_prompt.save(f"{cfg.checkpoint_dir}/{ARTIFACT_DIR}", chosen, meta)
    record["artifact"] = str(folder)
    if cfg.aggregator:
        try:
            client = AggregatorClient(cfg.aggregator, cfg.aggregator_certs, "coordinator")
            v = client.publish_version(
                task=task.name,
                base_model=ModelRef(task.model, task.model_sha256),
                text=chosen,
                metadata={**asdict(meta), "run_id": run_id},
            )
            record["version_id"] = v.version_id
        except AggregatorError as exc:  # the artifact holds the prompt; the registry can catch up
            record["registry_error"] = str(exc)
            log(WARNING, "DP-OPT: not stored in the prompt registry: %s", exc)


class DPOPTCoordinator:
    soft_prompt = False  # a text prompt, usable on any model

    def check(self, cfg: FederationConfig) -> None:
        """The holders would refuse DP-OPT settings that fail here."""
        dpopt_config(
            {
                "dpopt_preset": cfg.dpopt_preset,
                "dpopt_settings": cfg.dpopt_settings,
                "target_epsilon": cfg.target_epsilon,
            }
        )

    def run(self, grid: Grid, cfg: FederationConfig, run_id: str) -> None:
        run_dpopt(grid, cfg, run_id=run_id)

    def result(self, cfg: FederationConfig) -> tuple[Path, str]:
        return Path(cfg.checkpoint_dir) / ARTIFACT_DIR, "DP-OPT complete: text prompt"


COORDINATOR = DPOPTCoordinator()
