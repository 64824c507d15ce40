"""Federated optimisation settings compared fast: the holders' real DP rounds in one process, no transport.

Each holder is a real :class:`fedprompt.client.trainer.Holder` (its ledger, its privacy plan, Opacus DP-SGD on
its label-skewed split of the demo's data); the coordinator's side is the ServerApp's own strategy
(``fedprompt.server.coordinator.strategies``) applied to the equal-weight mean of the deltas, which is what secure
aggregation delivers. Holders train one after another, so a setting costs its training compute and nothing
else; the real federation (``fedprompt demo``) confirms what is kept. Settings are chosen on the bundled
*validation* split (500 snippets): the test split stays for the report.

    python benchmarks/federation_settings.py --grid '{"lr": [0.01, 0.03]}' [--num-rounds 10 --local-steps 4
        --prompt-length 1 --init-text Review --optimizer sgd --keep-optimizer-state --exact-prior-offsets ...]

Prints one JSON object: the zero-shot accuracy and, per setting, the validation accuracy of the final prompt
(and of the untuned one; the test accuracy beside them, never used to choose), with the training time.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from common import emit

from fedprompt.client.trainer import Holder
from fedprompt.data import datasets as ds_mod
from fedprompt.data import partition
from fedprompt.dp.ledger import PrivacyLedger
from fedprompt.dp.spend import Budget
from fedprompt.models import zoo
from fedprompt.runtime import Runtime
from fedprompt.server.coordinator.config import FederationConfig
from fedprompt.server.coordinator.strategies import make_strategy
from fedprompt.training import Session
from fedprompt.tuning_settings import TuneConfig

# FederationConfig's fields the sweep varies, at the demo's values
BASE = {
    "num_rounds": 5,
    "local_steps": 4,
    "batch_size": 16,
    "lr": 0.01,
    "optimizer": "adam",
    "strategy": "fedavg",
    "server_lr": 0.0,
    "prompt_length": 20,
    "init_text": "",  # "": the dataset's
    "target_epsilon": 8.0,
}


def federate(holders: list[Holder], initial: torch.Tensor, cfg: FederationConfig, run_id: str) -> torch.Tensor:
    strategy = make_strategy(cfg.strategy, cfg.server_lr or None)
    weight = initial.clone()
    for rnd in range(1, cfg.num_rounds + 1):
        settings = cfg.local_settings(run_id=run_id, server_round=rnd)
        outcomes = [h.train_round(weight, settings) for h in holders]
        for o in outcomes:
            o.sent()  # as a holder's service does before its reply leaves: the round's spend counts
        deltas = [o.delta for o in outcomes]
        weight = strategy.apply(weight, torch.stack(deltas).mean(0))
    return weight


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--grid", default="{}", help="JSON: setting -> list of values; every combination is run")
    ap.add_argument("--alpha", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--holders", type=int, default=3)
    ap.add_argument("--keep-optimizer-state", action="store_true", help="each holder's Adam state survives rounds")
    ap.add_argument(
        "--exact-prior-offsets",
        action="store_true",
        help="logit-adjusted local losses from each holder's exact label counts: what a DP estimate can at best give",
    )
    for k, v in BASE.items():
        ap.add_argument("--" + k.replace("_", "-"), type=type(v), default=v)
    a = ap.parse_args()
    base = {k: getattr(a, k) for k in BASE}
    grid = json.loads(a.grid)
    torch.set_num_threads(os.cpu_count() or 1)
    runtime = Runtime.create()
    # nothing is checkpointed: the coordinator's side here is its strategy alone
    cfg = FederationConfig(checkpoint_dir=tempfile.gettempdir(), model="smollm2-135m", task="rotten-tomatoes")
    full = ds_mod.load(cfg.task)
    loaded = zoo.load(cfg.model, device=runtime.device)
    task = cfg.task_spec(loaded.weights_sha256)
    central = Session(loaded, full, runtime=runtime)
    val = full.split("validation")
    results = {"zero_shot": central.evaluate(central.prompted(None), val, desc="zero-shot"), "settings": []}
    with tempfile.TemporaryDirectory() as tmp:
        files = partition.write_holder_files(full, Path(tmp) / "data", a.holders, alpha=a.alpha, seed=a.seed)
        for values in itertools.product(*grid.values()) if grid else [()]:
            s = {**base, **dict(zip(grid, values, strict=True))}
            holders = []
            for i, f in enumerate(files):
                state = Path(tmp) / f"state-{len(results['settings'])}-{i}"
                PrivacyLedger.create(state, Budget(s["target_epsilon"] * 1.25, 1e-5))
                h = Holder(data=str(f), state_dir=state, model=loaded, task=task, runtime=runtime)
                h.keep_optimizer_state = a.keep_optimizer_state
                if a.exact_prior_offsets:
                    counts = torch.bincount(torch.tensor([e.label for e in h.session.dataset.split("train")]))
                    h.logit_offsets = torch.log(counts.float() / counts.sum())
                holders.append(h)
            run = dataclasses.replace(cfg, **s)
            initial, _ = central.initial_prompt(
                TuneConfig(prompt_length=run.prompt_length, init_text=run.task_spec(loaded.weights_sha256).init_text)
            )
            started = time.monotonic()
            final = federate(holders, initial, run, run_id=f"sweep-{len(results['settings'])}")
            seconds = time.monotonic() - started
            record = {
                **s,
                "keep_optimizer_state": a.keep_optimizer_state,
                "exact_prior_offsets": a.exact_prior_offsets,
                "validation_accuracy": central.evaluate(central.prompted(final), val, desc="federated"),
                # shown, never used to choose: a setting picked on the test split would flatter the report
                "test_accuracy": central.evaluate(central.prompted(final), full.split("test"), desc="test"),
                "untuned_accuracy": central.evaluate(central.prompted(initial), val, desc="untuned"),
                "train_seconds": seconds,
            }
            print(json.dumps(record), flush=True)
            results["settings"].append(record)
    emit({"benchmark": "federation_settings", "alpha": a.alpha, "seed": a.seed, **results})


if __name__ == "__main__":
    main()
