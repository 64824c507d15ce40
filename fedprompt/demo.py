"""``fedprompt demo``: the main job, end to end on one machine.

A coordinator (``fedprompt server``) and one daemon per data holder (``fedprompt client``) run as real
processes on loopback with TLS and node authentication; the holders get label-skewed splits of a bundled
dataset and tune under DP. Afterwards the same budget is spent by each holder alone, and a non-private
prompt is tuned on the pooled data, for comparison. A report folder gets the figures and plots.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import time
from pathlib import Path

from fedprompt.errors import FedPromptError

# the demo's defaults, in one place (its flags; benchmarks/round_overhead.py runs rounds of the same)
DEMO_DEFAULTS = {
    "model": "smollm2-135m",
    "dataset": "rotten-tomatoes",
    "holders": 3,
    "alpha": 2.0,
    "rounds": 5,
    "local_steps": 4,
    "batch_size": 16,
    "lr": 0.01,
}


def add_demo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="a private federation of simulated holders on loopback, with a report")
    p.add_argument("--out", default="runs/demo", help="folder for certificates, data, state, logs and the report")
    p.add_argument("--model", default=DEMO_DEFAULTS["model"])
    p.add_argument("--dataset", default=DEMO_DEFAULTS["dataset"])
    p.add_argument("--holders", type=int, default=DEMO_DEFAULTS["holders"])
    p.add_argument(
        "--alpha",
        type=float,
        default=DEMO_DEFAULTS["alpha"],
        help="Dirichlet label skew (smaller: more different holders)",
    )
    p.add_argument("--seed", type=int, default=0, help="fixes the split of the data among holders")
    p.add_argument("--rounds", type=int, default=DEMO_DEFAULTS["rounds"])
    p.add_argument("--local-steps", type=int, default=DEMO_DEFAULTS["local_steps"])
    p.add_argument("--batch-size", type=int, default=DEMO_DEFAULTS["batch_size"])
    p.add_argument("--lr", type=float, default=DEMO_DEFAULTS["lr"])
    p.add_argument("--optimizer", default="adam", choices=["adam", "sgd"], help="the holders' local optimiser")
    p.add_argument("--target-epsilon", type=float, default=8.0)
    p.add_argument("--port", type=int, default=0, help="coordinator port (0: a free one)")
    p.add_argument("--timeout", type=float, default=3600.0, help="give up on the federation after this many seconds")
    p.add_argument(
        "--no-secure-aggregation",
        action="store_true",
        help="holders send their updates in the clear to the coordinator (default: SecAgg+ via the aggregation server)",
    )
    p.add_argument("--skip-baselines", action="store_true", help="federation only (no local-only / centralised)")
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
            "--target-epsilon", str(a.target_epsilon),
            "--min-available-nodes", str(a.holders),
            "--min-train-nodes", str(max(1, a.holders - 1)),
            # the coordinator evaluates each round's prompt on the bundled test split (public data): the
            # holders, whose evaluation is off by default, release nothing for it
            "--set", f"server_eval={a.dataset}",
            *([] if a.no_secure_aggregation else ["--secure-aggregation"]),
        )  # fmt: skip
        print(f"coordinator on 127.0.0.1:{fed.port}; {a.holders} holder daemons; logs in {fed.logs}", flush=True)
        return fed.wait(a.timeout, echo=True)


def run_baselines(a: argparse.Namespace, data_files: list[Path], init_text: str) -> dict:
    """Each holder alone under the same DP budget and steps; the pooled data without DP; zero-shot."""
    import torch

    from fedprompt import datasets as ds_mod
    from fedprompt.dp.engine import DPConfig, private_tune
    from fedprompt.runtime import Runtime
    from fedprompt.training import Session, TuneConfig, tune

    torch.set_num_threads(os.cpu_count() or 1)
    runtime = Runtime.create()
    full = ds_mod.load(a.dataset)
    central = Session(a.model, full, runtime=runtime)
    test = full.split("test")
    steps = a.rounds * a.local_steps
    cfg = TuneConfig(
        steps=steps, lr=a.lr, batch_size=a.batch_size, init_text=init_text, eval_every=0, optimizer=a.optimizer
    )
    results: dict = {"zero_shot": central.evaluate(central.prompted(None), test, desc="zero-shot")}
    local = {}
    for i, path in enumerate(data_files, 1):
        ds = ds_mod.load(str(path), label_names=full.label_names, template=full.template, label_words=full.label_words)
        s = Session(central.loaded, ds, runtime=runtime)
        result, spend = private_tune(s, cfg, DPConfig(target_epsilon=a.target_epsilon))
        local[f"holder-{i}"] = central.evaluate(central.prompted(result.weight), test, desc=f"holder-{i} alone")
        print(
            f"holder-{i} alone, DP (epsilon = {spend['epsilon']:.2f}): {100 * local[f'holder-{i}']:.2f} %", flush=True
        )
    results["local_only"] = local
    # the pooled data, no DP, the same steps and batch size as one holder
    results["centralised"] = central.evaluate(central.prompted(tune(central, cfg).weight), test, desc="central")
    print(f"centralised, non-private: {100 * results['centralised']:.2f} %", flush=True)
    return results


def cmd_demo(a: argparse.Namespace) -> int:
    from fedprompt import datasets as ds_mod
    from fedprompt import partition, report, zoo

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the federation's processes on the way out
    out = Path(a.out).resolve()
    if out.exists() and any(out.iterdir()):
        raise FedPromptError(f"{out} is not empty; remove it or choose another --out")
    if a.holders < 2:
        raise FedPromptError("a federation needs at least 2 holders")
    zoo.pull(a.model)  # downloads (once) before the clock starts
    full = ds_mod.load(a.dataset)
    data_files = partition.write_holder_files(full, out / "data", a.holders, alpha=a.alpha, seed=a.seed)
    splits = partition.describe(full, partition.partition(full, a.holders, alpha=a.alpha, seed=a.seed))
    for s in splits:
        print(f"holder-{s['holder']}: {s['train']} train / {s['test']} test examples; train labels {s['train_labels']}")
    started = time.monotonic()
    history = run_federation(a, out, data_files)
    fed_seconds = time.monotonic() - started
    results = {"federated": history[-1].get("accuracy"), "initial": history[0].get("accuracy")}
    baseline_seconds = 0.0
    if not a.skip_baselines:
        started = time.monotonic()
        init_text = ds_mod.BUNDLED[a.dataset].init_text if a.dataset in ds_mod.BUNDLED else None
        results.update(run_baselines(a, data_files, init_text))
        baseline_seconds = time.monotonic() - started
    settings = {
        **{k: getattr(a, k) for k in ("model", "dataset", "holders", "alpha", "rounds", "local_steps", "batch_size")},
        "lr": a.lr,
        "optimizer": a.optimizer,
        "target_epsilon": a.target_epsilon,
        "secure_aggregation": not a.no_secure_aggregation,
        "template": full.template,
        "federation_seconds": fed_seconds,
        "baseline_seconds": baseline_seconds,
        "machine": f"{os.cpu_count()} CPUs, {platform.machine()}",
    }
    if a.skip_baselines:
        print(json.dumps({"federated": results["federated"], "seconds": fed_seconds}))
        return 0
    path = report.write(out / "report", history=history, results=results, settings=settings, splits=splits)
    print(f"\nreport: {path}")
    print(path.read_text().split("Per round")[0])
    return 0
