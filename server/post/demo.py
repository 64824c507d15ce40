"""``fedprompt demo-post`` (``make demo-post``): POST end to end on one machine.

1. The model provider distils a student from the teacher on public text (or reuses the cached one; an
   interrupted distillation resumes from its checkpoint).
2. Data holders (real ``fedprompt client`` daemons on loopback, label-skewed splits of the dataset) tune a
   prompt on the student under DP, federated by ``fedprompt server`` with secure aggregation.
3. The coordinator transfers the global prompt to the teacher with public inputs and stores it in the
   aggregation server's prompt registry (``fedprompt server --post-teacher``).
4. Test accuracy of every stage beside the teacher's zero-shot baseline, in ``OUT/report.md`` and JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

from fedprompt.cli.common import add_demo_federation
from fedprompt.errors import FedPromptError


def add_demo_post_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo-post", help="POST end to end: distil a student, federate on it privately, transfer")
    p.add_argument("--out", default="runs/demo-post", help="folder for certificates, data, state, logs and the report")
    p.add_argument(
        "--teacher",
        default="smollm2-135m",
        help="the large model: the student is distilled from it, the prompt moved to it",
    )
    p.add_argument("--preset", default="demo", help="distillation preset (fedprompt post distill --preset)")
    p.add_argument("--student", default=None, help="use this registered student instead of distilling one")
    p.add_argument("--dataset", default="rotten-tomatoes", help="the bundled dataset split among the holders")
    p.add_argument("--public", default="vader-amazon", help="the transfer's public inputs")
    p.add_argument("--holders", type=int, default=3, help="simulated data holders (at least 2)")
    p.add_argument("--alpha", type=float, default=2.0, help="Dirichlet label skew of the holders' splits")
    p.add_argument("--seed", type=int, default=0, help="fixes the split of the data among holders")
    p.add_argument("--rounds", type=int, default=5, help="federated rounds on the student")
    p.add_argument("--local-steps", type=int, default=10, help="optimiser steps of each holder per round")
    p.add_argument("--batch-size", type=int, default=16, help="examples per local step of each holder")
    p.add_argument("--lr", type=float, default=0.01, help="the holders' local learning rate")
    p.add_argument(
        "--target-epsilon", type=float, default=8.0, help="each holder's epsilon for the whole run (default 8)"
    )
    p.add_argument("--transfer-alpha", type=float, default=None, help="weight of the shift term (default 0.5)")
    p.add_argument("--transfer-steps", type=int, default=None, help="transfer steps (default 200)")
    add_demo_federation(p)
    p.set_defaults(func=cmd_demo_post)


def ensure_student(teacher: str, preset: str) -> str:
    """The registered student of ``teacher`` distilled with ``preset``: reused when its manifest matches
    (teacher weights and settings), resumed when an earlier run was interrupted, distilled otherwise."""
    from fedprompt.cache import cache_dir
    from fedprompt.models import zoo
    from fedprompt.server.post.cli import DISTILL_PRESETS
    from fedprompt.server.post.distill import CHECKPOINT, STATE, DistillConfig, distill

    if preset not in DISTILL_PRESETS:
        raise FedPromptError(f"unknown preset {preset!r}; known: {', '.join(DISTILL_PRESETS)}")
    cfg = DistillConfig(**DISTILL_PRESETS[preset])
    name = f"{teacher}-student-{preset}"
    loaded_teacher = zoo.load(teacher)
    folder = zoo.registered().get(name)
    if folder is not None and folder.is_dir():
        m = zoo.read_manifest(folder)
        settings = {k: v for k, v in m.get("distillation", {}).items() if k in asdict(cfg)}
        if m.get("teacher", {}).get("weights_sha256") == loaded_teacher.weights_sha256 and settings == asdict(cfg):
            print(f"reusing the distilled student {name} ({folder})", flush=True)
            return name
    folder = cache_dir() / "students" / name
    resume = (folder / CHECKPOINT / STATE).exists()
    if not resume and folder.exists():
        import shutil

        shutil.rmtree(folder)  # a student of other settings or another teacher: replaced
    print(f"{'resuming' if resume else 'distilling'} the student {name} (preset {preset})", flush=True)
    distill(loaded_teacher, cfg, folder, name=name, resume=resume)
    return name


def run_federation(a: argparse.Namespace, out: Path, student: str, data_files: list[Path]) -> list[dict]:
    from fedprompt.local_federation import HolderSpec, LocalFederation

    holders = [HolderSpec(f"holder-{i}", p, a.target_epsilon * 1.25) for i, p in enumerate(data_files, 1)]
    threads = max(1, (os.cpu_count() or 1) // a.holders)
    transfer = ["--post-teacher", a.teacher, "--post-public", a.public]
    if a.transfer_alpha is not None:
        transfer += ["--post-alpha", str(a.transfer_alpha)]
    if a.transfer_steps is not None:
        transfer += ["--post-steps", str(a.transfer_steps)]
    with LocalFederation(out, holders, port=a.port, threads=threads) as fed:
        fed.start(
            "--model", student,
            "--task", a.dataset,
            "--num-rounds", str(a.rounds),
            "--local-steps", str(a.local_steps),
            "--batch-size", str(a.batch_size),
            "--lr", str(a.lr),
            "--target-epsilon", str(a.target_epsilon),
            "--min-available-nodes", str(a.holders),
            "--min-train-nodes", str(max(2, a.holders - 1)),
            *([] if a.no_secure_aggregation else ["--secure-aggregation"]),
            *transfer,
        )  # fmt: skip
        print(f"coordinator on 127.0.0.1:{fed.port}; {a.holders} holder daemons; logs in {fed.logs}", flush=True)
        return fed.wait(a.timeout, echo=True)  # echoes the rounds, then the coordinator's POST lines


def evaluate(a: argparse.Namespace, student: str, checkpoints: Path) -> dict[str, float]:
    import torch

    from fedprompt import artifact
    from fedprompt.runtime import Runtime
    from fedprompt.training import Session

    torch.set_num_threads(os.cpu_count() or 1)
    runtime = Runtime.create()
    teacher = Session(a.teacher, a.dataset, runtime=runtime)
    small = Session(student, teacher.dataset, runtime=runtime)
    test = teacher.dataset.split("test")
    global_prompt, _ = artifact.load(checkpoints / f"round-{a.rounds:04d}")
    transferred, _ = artifact.load(checkpoints / "post-transfer")
    return {
        "teacher_zero_shot": teacher.evaluate(teacher.prompted(None), test, desc="teacher zero-shot"),
        "student_zero_shot": small.evaluate(small.prompted(None), test, desc="student zero-shot"),
        "student_federated_dp": small.evaluate(small.prompted(global_prompt), test, desc="student + global prompt"),
        "untransferred_on_teacher": teacher.evaluate(teacher.prompted(global_prompt), test, desc="untransferred"),
        "post_on_teacher": teacher.evaluate(teacher.prompted(transferred), test, desc="POST on teacher"),
    }


ROWS = (
    ("teacher_zero_shot", "teacher zero-shot, best template (baseline)"),
    ("student_zero_shot", "student zero-shot"),
    ("student_federated_dp", "student + federated DP prompt"),
    ("untransferred_on_teacher", "that prompt on the teacher, untransferred"),
    ("post_on_teacher", "**POST-transferred prompt on the teacher**"),
)


def transfer_notes(transfer: dict) -> list[str]:
    """The report's lines on where the teacher's prompt went and what the checkpoint choice kept."""
    notes = []
    if "version_id" in transfer:
        notes.append(f"Stored in the aggregation server's prompt registry as version {transfer['version_id']}.")
    if "registry_error" in transfer:
        notes.append(f"The teacher's prompt was {transfer['registry_error']}.")
    if transfer.get("note"):
        notes.append(f"Note: {transfer['note']} (the transferred prompt is its starting point).")
    return notes


def write_report(out: Path, results: dict) -> Path:
    acc = results["accuracy"]
    base = acc["teacher_zero_shot"]
    lines = [
        "# POST demo",
        "",
        f"{results['settings']['dataset']}, test split ({results['test_examples']} examples); teacher "
        f"{results['settings']['teacher']}, student {results['student']['name']} "
        f"(layers {results['student']['layers_kept']}, {results['student']['tokens']:,} distillation tokens, "
        f"{results['student']['seconds']:.0f} s).",
        "",
        "| | test accuracy | vs teacher zero-shot |",
        "|---|---:|---:|",
    ]
    for key, label in ROWS:
        delta = "" if key == "teacher_zero_shot" else f"{100 * (acc[key] - base):+.1f}"
        lines.append(f"| {label} | {100 * acc[key]:.1f} % | {delta} |")
    lines += [
        "",
        f"Privacy: every holder's epsilon = {results['epsilon']:.2f} (delta = {results.get('delta', 1e-5):g}); "
        "the transfer read public "
        f"inputs only ({results['transfer']['public']['name']}: {results['transfer']['public']['inputs']} inputs, "
        f"checkpoint of step {results['transfer']['chosen_step']} chosen on "
        f"{results['transfer']['public']['validation']} public validation examples).",
        *transfer_notes(results["transfer"]),
        "",
        "Wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in results["seconds"].items()) + ".",
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return path


def cmd_demo_post(a: argparse.Namespace) -> int:
    from fedprompt.data import datasets as ds_mod
    from fedprompt.data import partition
    from fedprompt.models import zoo

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    out = Path(a.out).resolve()
    if out.exists() and any(out.iterdir()):
        raise FedPromptError(f"{out} is not empty; remove it or choose another --out")
    if a.holders < 2:
        raise FedPromptError("a federation needs at least 2 holders")
    if a.teacher in zoo.ZOO:
        zoo.pull(a.teacher)  # downloads (once) before the clock starts
    full = ds_mod.load(a.dataset)
    ds_mod.load(a.public)  # fetched before the clock starts, and checked
    seconds: dict[str, float] = {}
    started = time.monotonic()
    student = a.student or ensure_student(a.teacher, a.preset)
    seconds["student"] = time.monotonic() - started
    data_files = partition.write_holder_files(full, out / "data", a.holders, alpha=a.alpha, seed=a.seed)
    for s in partition.describe(full, partition.partition(full, a.holders, alpha=a.alpha, seed=a.seed)):
        print(f"holder-{s['holder']}: {s['train']} train / {s['test']} test examples; train labels {s['train_labels']}")
    started = time.monotonic()
    history = run_federation(a, out, student, data_files)
    seconds["federation and transfer"] = time.monotonic() - started
    started = time.monotonic()
    checkpoints = out / "coordinator" / "checkpoints"
    acc = evaluate(a, student, checkpoints)
    seconds["evaluation"] = time.monotonic() - started
    manifest = zoo.read_manifest(zoo.registered().get(student, Path(student)))
    transfer = json.loads((checkpoints / "post-transfer.json").read_text())
    transfer.pop("history", None)
    eps = [m["epsilon"] for m in history[-1].get("holders", {}).values() if "epsilon" in m]
    results = {
        "accuracy": acc,
        "test_examples": len(full.split("test")),
        "epsilon": max(eps) if eps else float("nan"),
        "rounds": history,
        "transfer": transfer,
        "student": {
            "name": student,
            "layers_kept": manifest.get("layers_kept"),
            "tokens": manifest.get("distillation", {}).get("tokens", 0),
            "seconds": manifest.get("distillation", {}).get("seconds", 0.0),
        },
        "seconds": seconds,
        "settings": {k: v for k, v in vars(a).items() if k != "func"},
        "machine": f"{os.cpu_count()} CPUs, {platform.machine()}",
    }
    path = write_report(out, results)
    print(f"\nreport: {path}\n")
    print(path.read_text())
    return 0
