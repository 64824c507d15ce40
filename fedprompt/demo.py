"""``fedprompt demo``: the main job, end to end on one machine.

A coordinator (``fedprompt server``) and one daemon per data holder (``fedprompt client``) run as real
processes on loopback with TLS and node authentication; the holders get label-skewed splits of a bundled
dataset and tune under DP, merged by secure aggregation. Then the comparisons a sceptic asks for, on the
bundled test split with 95 % intervals: the zero-shot model with the dataset's template, each holder alone
with the same DP budget and steps, and the pooled data under DP with the federation's compute (optionally
without DP too). A report folder gets the figures, the plots and the wall time of each part.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import signal
import sys
import time
from pathlib import Path

from fedprompt.cli.common import add_demo_federation
from fedprompt.errors import FedPromptError

# the demo's defaults, in one place (its flags; benchmarks/round_overhead.py runs rounds of the same)
DEMO_DEFAULTS = {
    "model": "smollm2-135m",
    "dataset": "rotten-tomatoes",
    "holders": 3,
    "alpha": 2.0,
    "rounds": 8,
    "local_steps": 4,
    "batch_size": 16,
    "lr": 0.03,
    # one virtual token: DP noise grows with the prompt's size (its norm with the square root of it) while the
    # clipped signal does not, and one token starting as "Review" already scores at the zero-shot level (chosen
    # on the validation split: README "The federation, measured")
    "prompt_length": 1,
    "init_text": "Review",
}
# where a GPU is present the same 15 minutes buy more: more rounds, larger batches (less DP noise per step)
GPU_DEFAULTS = {"rounds": 20, "batch_size": 64}


def resolve_defaults(a: argparse.Namespace, *, gpu: bool) -> None:
    """Fill the settings left unset with the CPU defaults, or the GPU ones where a GPU is present."""
    for key in GPU_DEFAULTS:
        if getattr(a, key) is None:
            setattr(a, key, GPU_DEFAULTS[key] if gpu else DEMO_DEFAULTS[key])


def add_demo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="a private federation of simulated holders on loopback, with a report")
    p.add_argument("--out", default="runs/demo", help="folder for certificates, data, state, logs and the report")
    p.add_argument("--model", default=DEMO_DEFAULTS["model"], help="the frozen model every holder tunes a prompt for")
    p.add_argument("--dataset", default=DEMO_DEFAULTS["dataset"], help="the bundled dataset split among the holders")
    p.add_argument("--holders", type=int, default=DEMO_DEFAULTS["holders"], help="simulated data holders (at least 2)")
    p.add_argument(
        "--alpha",
        type=float,
        default=DEMO_DEFAULTS["alpha"],
        help="Dirichlet label skew (smaller: more different holders)",
    )
    p.add_argument("--seed", type=int, default=0, help="fixes the split of the data among holders")
    gpu = ", ".join(f"{k} {v}" for k, v in GPU_DEFAULTS.items())
    p.add_argument("--rounds", type=int, default=None, help=f"default {DEMO_DEFAULTS['rounds']} ({gpu} on a GPU)")
    p.add_argument(
        "--local-steps", type=int, default=DEMO_DEFAULTS["local_steps"], help="optimiser steps of each holder per round"
    )
    p.add_argument("--batch-size", type=int, default=None, help=f"default {DEMO_DEFAULTS['batch_size']}")
    p.add_argument("--lr", type=float, default=DEMO_DEFAULTS["lr"], help="the holders' local learning rate")
    p.add_argument("--optimizer", default="adam", choices=["adam", "sgd"], help="the holders' local optimiser")
    p.add_argument(
        "--target-epsilon", type=float, default=8.0, help="each holder's epsilon for the whole run (default 8)"
    )
    add_demo_federation(p)
    p.add_argument(
        "--prompt-length", type=int, default=DEMO_DEFAULTS["prompt_length"], help="virtual tokens of the soft prompt"
    )
    p.add_argument(
        "--init-text",
        default=DEMO_DEFAULTS["init_text"],
        help="the prompt starts as the embeddings of this text's tokens (tiled or cut to --prompt-length); the "
        "default was chosen for rotten-tomatoes",
    )
    p.add_argument(
        "--skip-baselines", action="store_true", help="zero-shot and the federation only (no holder alone, no pooled)"
    )
    p.add_argument(
        "--non-private-reference",
        action="store_true",
        help="also tune on the pooled data without DP, with the federation's compute",
    )
    p.set_defaults(func=cmd_demo)


def run_federation(a: argparse.Namespace, out: Path, data_files: list[Path]) -> list[dict]:
    from fedprompt.local_federation import HolderSpec, LocalFederation

    # the run targets target_epsilon; the budget leaves room for calibration rounding
    holders = [HolderSpec(f"holder-{i}", p, a.target_epsilon * 1.25) for i, p in enumerate(data_files, 1)]
    # one torch thread per holder: the holders share this machine's cores
    threads = max(1, (os.cpu_count() or 1) // a.holders)
    with LocalFederation(out, holders, port=a.port, threads=threads) as fed:
        fed.start(
            "--model", a.model,
            "--task", a.dataset,
            "--num-rounds", str(a.rounds),
            "--local-steps", str(a.local_steps),
            "--batch-size", str(a.batch_size),
            "--lr", str(a.lr),
            "--optimizer", a.optimizer,
            "--prompt-length", str(a.prompt_length),
            "--set", f"init_text={json.dumps(a.init_text)}",
            "--target-epsilon", str(a.target_epsilon),
            "--min-available-nodes", str(a.holders),
            "--min-train-nodes", str(max(1, a.holders - 1)),
            *([] if a.no_secure_aggregation else ["--secure-aggregation"]),
        )  # fmt: skip
        print(f"coordinator on 127.0.0.1:{fed.port}; {a.holders} holder daemons; logs in {fed.logs}", flush=True)
        return fed.wait(a.timeout, echo=True)


class Parts:
    """The demo's wall time, part by part (the report shows where the 15 minutes go)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def timed(self, name: str):
        started = time.monotonic()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.monotonic() - started


def evaluate_all(a: argparse.Namespace, out: Path, data_files: list[Path], parts: Parts) -> dict[str, list[bool]]:
    """Every method's per-example results on the bundled test split: zero-shot, the untuned and the federated
    prompt, each holder alone and the pooled data under DP (compute-matched), the pooled data without DP."""
    import torch

    from fedprompt import artifact
    from fedprompt.data import datasets as ds_mod
    from fedprompt.dp.engine import DPConfig, private_tune
    from fedprompt.runtime import Runtime
    from fedprompt.server.coordinator import checkpoint
    from fedprompt.server.coordinator.config import FederationConfig
    from fedprompt.training import Session, tune
    from fedprompt.tuning_settings import TuneConfig

    torch.set_num_threads(os.cpu_count() or 1)
    runtime = Runtime.create()
    full = ds_mod.load(a.dataset)
    central = Session(a.model, full, runtime=runtime)
    test = full.split("test")
    steps = a.rounds * a.local_steps
    cfg = TuneConfig(
        steps=steps,
        lr=a.lr,
        batch_size=a.batch_size,
        prompt_length=a.prompt_length,
        init_text=a.init_text,
        eval_every=0,
        optimizer=a.optimizer,
    )
    final, _ = artifact.load(checkpoint.round_dir(out / "coordinator" / "checkpoints", a.rounds))
    initial, _ = central.initial_prompt(cfg)
    right: dict[str, list[bool]] = {}
    with parts.timed("evaluation"):
        right["zero-shot"] = central.correct(central.prompted(None), test, desc="zero-shot")
        right["untuned prompt"] = central.correct(central.prompted(initial), test, desc="untuned")
        right["federated"] = central.correct(central.prompted(final), test, desc="federated")
    if a.skip_baselines:
        return right
    dp = DPConfig(target_epsilon=a.target_epsilon, delta=FederationConfig.delta)  # the federation's public delta
    for i, path in enumerate(data_files, 1):
        with parts.timed("holders alone"):
            ds = ds_mod.load(
                str(path), label_names=full.label_names, template=full.template, label_words=full.label_words
            )
            result, spend = private_tune(Session(central.loaded, ds, runtime=runtime), cfg, dp)
        with parts.timed("evaluation"):
            right[f"holder-{i} alone"] = central.correct(central.prompted(result.weight), test, desc=f"holder-{i}")
        print(f"holder-{i} alone, DP (epsilon {spend['epsilon']:.2f}): {_pct(right[f'holder-{i} alone'])}", flush=True)
    # the pooled data, as if one party held it all, with the federation's compute: each step takes the examples
    # of one round's step on every holder (batch holders x batch_size), for the federation's number of steps
    matched = dataclasses.replace(cfg, batch_size=a.batch_size * a.holders)
    with parts.timed("centralised DP"):
        result, spend = private_tune(central, matched, dp)
    with parts.timed("evaluation"):
        right["centralised DP"] = central.correct(central.prompted(result.weight), test, desc="centralised DP")
    print(f"centralised, DP (epsilon {spend['epsilon']:.2f}): {_pct(right['centralised DP'])}", flush=True)
    if a.non_private_reference:
        with parts.timed("centralised, non-private"):
            weight = tune(central, matched).weight
        with parts.timed("evaluation"):
            right["centralised, non-private"] = central.correct(central.prompted(weight), test, desc="non-private")
    return right


def spend_per_round(out: Path, holders: int, rounds: int) -> dict[str, list[float]]:
    """Each holder's ε after each round, its run's releases composed at the run's δ, read from its ledger.

    The holders run on this machine, so the demo can read what in a real federation only each holder sees
    (under DP a holder replies with its bound for the run, never its per-round spend, which depends on its n).
    """
    from fedprompt.dp.ledger import PrivacyLedger
    from fedprompt.dp.spend import compose
    from fedprompt.server.coordinator.config import FederationConfig

    spend = {}
    for i in range(1, holders + 1):
        name = f"holder-{i}"
        releases = PrivacyLedger(out / "holders" / name).releases()
        spend[name] = [
            compose([r for r in releases if r.round <= rnd], FederationConfig.delta).epsilon
            for rnd in range(1, rounds + 1)
        ]
    return spend


def _pct(right: list[bool]) -> str:
    return f"{100 * sum(right) / len(right):.2f} %"


def cmd_demo(a: argparse.Namespace) -> int:
    from fedprompt import report
    from fedprompt.data import datasets as ds_mod
    from fedprompt.data import partition
    from fedprompt.models import zoo
    from fedprompt.server.coordinator.config import FederationConfig

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the federation's processes on the way out
    out = Path(a.out).resolve()
    if out.exists() and any(out.iterdir()):
        raise FedPromptError(f"{out} is not empty; remove it or choose another --out")
    if a.holders < 2:
        raise FedPromptError("a federation needs at least 2 holders")
    import torch

    resolve_defaults(a, gpu=torch.cuda.is_available())
    zoo.pull(a.model)  # downloads (once) before the clock starts
    full = ds_mod.load(a.dataset)
    data_files = partition.write_holder_files(full, out / "data", a.holders, alpha=a.alpha, seed=a.seed)
    splits = partition.describe(full, partition.partition(full, a.holders, alpha=a.alpha, seed=a.seed))
    for s in splits:
        print(f"holder-{s['holder']}: {s['train']} train / {s['test']} test examples; train labels {s['train_labels']}")
    parts = Parts()
    started = time.monotonic()
    with parts.timed("federation"):
        history = run_federation(a, out, data_files)
    right = evaluate_all(a, out, data_files, parts)
    spend = spend_per_round(out, a.holders, a.rounds)
    settings = {
        **{k: getattr(a, k) for k in ("model", "dataset", "holders", "alpha", "seed", "rounds", "local_steps")},
        **{k: getattr(a, k) for k in ("batch_size", "prompt_length", "init_text", "lr", "optimizer", "target_epsilon")},
        "delta": FederationConfig.delta,
        "secure_aggregation": not a.no_secure_aggregation,
        "template": full.template,
        "seconds": {**parts.seconds, "total": time.monotonic() - started},
        "machine": f"{os.cpu_count()} CPUs, {platform.machine()}"
        + (f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""),
    }
    path = report.write(out / "report", history=history, right=right, spend=spend, settings=settings, splits=splits)
    print(f"\nreport: {path}")
    print(path.read_text().split("Per round")[0])
    return 0
