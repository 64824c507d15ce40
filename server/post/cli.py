"""``fedprompt post distill`` and ``fedprompt post transfer``: the model provider's side of POST."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from fedprompt.cache import check_out_folder
from fedprompt.cli.common import add_runtime
from fedprompt.errors import FedPromptError

# Distillation presets, measured on 2 CPU cores with smollm2-135m as the teacher (README, POST):
# "demo" fits `make demo-post`; "hour" is the best student found for about an hour of those cores.
DISTILL_PRESETS: dict[str, dict] = {
    "demo": {"keep_layers": "first3,last3", "steps": 300, "lr": 1e-3},
    "hour": {"keep_layers": "first3,last3", "steps": 2400, "lr": 1e-3},
}


def _runtime(args: argparse.Namespace):
    from fedprompt.runtime import Runtime

    runtime = Runtime.create(args.device, args.precision)
    print(f"runtime: {runtime.describe()}", file=sys.stderr)
    return runtime


# ------------------------------------------------------------------ distil


_DISTILL_FLAGS = (
    "keep_layers", "corpus", "steps", "batch_size", "seq_len", "lr", "warmup_steps", "temperature",
    "kl_weight", "lm_weight", "cos_weight", "checkpoint_every", "seed",
)  # fmt: skip


def distill_config_from_args(args: argparse.Namespace):
    """Preset values, overridden by every flag given; with --resume, the checkpoint's own settings."""
    from fedprompt.server.post.distill import DistillConfig

    values = dict(DISTILL_PRESETS[args.preset]) if args.preset else {}
    for name in _DISTILL_FLAGS:
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    return DistillConfig(**values)


def cmd_distill(args: argparse.Namespace) -> int:
    from fedprompt.server.post.distill import CHECKPOINT, STATE, DistillConfig, distill

    out = Path(args.out)
    teacher = args.teacher
    if args.resume:
        given = [f"--{n.replace('_', '-')}" for n in _DISTILL_FLAGS if getattr(args, n) is not None]
        if given or args.preset:
            flags = ", ".join(given + (["--preset"] if args.preset else []))
            raise FedPromptError(f"--resume continues with the checkpoint's own settings; drop {flags}")
        state_file = out / CHECKPOINT / STATE
        if not state_file.is_file():
            raise FedPromptError(f"{out} holds no checkpoint to resume from")
        saved = json.loads(state_file.read_text())["fingerprint"]
        cfg = DistillConfig(**saved["config"])
        teacher = teacher or saved["teacher"]["id"]
    else:
        cfg = distill_config_from_args(args)
        teacher = teacher or "smollm2-135m"
    runtime = _runtime(args)
    result = distill(
        teacher, cfg, out, name=args.name, runtime=runtime, resume=args.resume, register=not args.no_register
    )
    d = result.manifest["distillation"]
    print(
        f"student {result.name}: layers {result.manifest['layers_kept']} of {result.manifest['teacher_layers']}, "
        f"{d['steps_done']} steps, {d['tokens']:,} tokens, {d['seconds']:.0f} s; folder {result.folder}"
    )
    if d.get("heldout"):
        h = d["heldout"]
        print(
            f"held-out corpus ({h['blocks']} blocks): next-token loss teacher {h['teacher_lm']:.3f}, "
            f"student {h['student_lm']:.3f}; KL(teacher || student) at T={cfg.temperature:g}: {h['kl']:.3f}"
        )
    if not args.no_register:
        print(f"registered as {result.name!r}: fedprompt tune --model {result.name} ... (fedprompt models list)")
    if args.eval_dataset:
        _print_zero_shot([teacher, str(result.folder)], args.eval_dataset, runtime)
    return 0


def _print_zero_shot(models: list[str], dataset: str, runtime) -> dict[str, float]:
    from fedprompt.training import Session

    accs = {}
    for name in models:
        s = Session(name, dataset, runtime=runtime)
        accs[s.loaded.model_id] = s.evaluate(s.prompted(None), s.dataset.split("test"), desc=f"zero-shot {name}")
        print(f"zero-shot test accuracy on {dataset}, {s.loaded.model_id}: {100 * accs[s.loaded.model_id]:.2f} %")
    return accs


# ------------------------------------------------------------------ transfer


_TRANSFER_FLAGS = (
    "alpha", "steps", "lr", "batch_size", "public_examples", "validation_examples", "eval_every", "select", "seed",
)  # fmt: skip


def transfer_and_save(
    source: str | Path,
    teacher: str,
    public: str,
    out: Path,
    cfg,
    *,
    student: str | None = None,
    runtime=None,
    aggregator: str | None = None,
    certs: str | Path | None = None,
    identity: str = "coordinator",
) -> dict:
    """Transfer ``source`` to ``teacher``, save the teacher's artifact in ``out`` and, with an aggregation
    server, store it in the prompt registry. Returns the transfer report (+ ``version_id``)."""
    from fedprompt import artifact
    from fedprompt.server.post.transfer import transfer

    result = transfer(str(source), teacher, public, cfg, student=student, runtime=runtime)
    artifact.save(out, result.weight, result.meta)
    report = dict(result.report)
    if aggregator:
        from fedprompt.protocols.aggregator_client import AggregatorClient, AggregatorError

        try:
            with AggregatorClient(aggregator, certs, identity) as client:
                v = client.publish_artifact(result.weight.numpy(), asdict(result.meta))
            report["version_id"] = v.version_id
        except AggregatorError as exc:  # the artifact is saved: the transfer's work is not lost
            report["registry_error"] = (
                f"not stored in the prompt registry ({exc}); store it later with "
                f"fedprompt prompts publish --prompt {out}"
            )
    return report


def cmd_transfer(args: argparse.Namespace) -> int:
    from fedprompt.server.post.transfer import TransferConfig

    out = Path(args.out)
    check_out_folder(out, args.force)
    if bool(args.aggregator) != bool(args.certs):
        raise FedPromptError("--aggregator and --certs go together (the registry's address and your certificate)")
    values = {n: getattr(args, n) for n in _TRANSFER_FLAGS if getattr(args, n) is not None}
    cfg = TransferConfig(**values)
    runtime = _runtime(args)
    report = transfer_and_save(
        args.prompt, args.teacher, args.public, out, cfg, student=args.student, runtime=runtime,
        aggregator=args.aggregator, certs=args.certs, identity=args.identity,
    )  # fmt: skip
    chosen = next(r for r in report["history"] if r["step"] == report["chosen_step"])
    acc = chosen["val_accuracy"]
    print(
        f"transferred to {args.teacher}: checkpoint of step {report['chosen_step']} chosen by {report['select']} on "
        f"{report['public']['validation']} public validation examples"
        + (f" (accuracy {100 * acc:.2f} %)" if acc is not None else f" (loss {chosen['val_loss']:.4f})")
    )
    print(f"prompt artifact: {out}")
    if "version_id" in report:
        print(f"stored in the prompt registry as version {report['version_id']}")
    if "registry_error" in report:
        print(f"error: {report['registry_error']}", file=sys.stderr)
    if args.evaluate or args.eval_dataset:
        evaluate_transfer(args.prompt, out, args.teacher, runtime, dataset=args.eval_dataset)
    return 1 if "registry_error" in report else 0


def evaluate_transfer(
    source: str | Path, transferred: str | Path, teacher: str, runtime, *, dataset: str | None = None
) -> dict[str, float]:
    """Test accuracy (the task's bundled data, or ``dataset``): the teacher zero-shot, the source prompt put on
    the teacher as it is (where the widths agree), and the transferred prompt."""
    import torch

    from fedprompt import artifact
    from fedprompt.data import datasets as ds_mod
    from fedprompt.training import Session

    weight, meta = artifact.load(transferred)
    source_weight, _ = artifact.load(source)
    data = ds_mod.load(dataset or meta.task, label_names=list(meta.label_names), template=meta.template)
    if list(data.label_names) != list(meta.label_names):
        raise FedPromptError(f"{data.name} has labels {data.label_names}, the prompt's task {meta.label_names}")
    s = Session(
        teacher, data, runtime=runtime, template=meta.template, label_words=meta.label_words, scoring=meta.scoring
    )
    artifact.check_base_model(meta, weight, s.loaded)
    test = s.dataset.split("test")
    accs = {"teacher_zero_shot": s.evaluate(s.prompted(None), test, desc="teacher zero-shot")}
    if source_weight.shape[1] == s.loaded.hidden_size:
        accs["source_prompt_untransferred"] = s.evaluate(s.prompted(source_weight), test, desc="untransferred")
    accs["transferred"] = s.evaluate(s.prompted(torch.as_tensor(weight)), test, desc="transferred")
    for k, v in accs.items():
        print(f"  {k:28} {100 * v:6.2f} %  ({meta.task} test, {len(test)} examples, {s.loaded.model_id})")
    return accs


# ------------------------------------------------------------------ parser


def add_post_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("post", help="POST: distil a student from a large model; transfer a prompt back to it")
    acts = p.add_subparsers(dest="action", required=True)

    d = acts.add_parser("distill", help="distil a student (teacher's tokenizer, embeddings, head; some layers)")
    d.add_argument("--teacher", default=None, help="zoo name or model folder (default smollm2-135m)")
    d.add_argument("--keep-layers", default=None, help="layers kept: first3,last3 (default) / 0-2,27-29 / every5")
    d.add_argument("--corpus", default=None, help="public corpus name or text file (default public-mix)")
    d.add_argument("--out", required=True, help="the student's folder (a Hugging Face model folder)")
    d.add_argument("--preset", default=None, choices=sorted(DISTILL_PRESETS), help="measured settings; flags override")
    d.add_argument("--steps", type=int, default=None, help="optimiser steps (default: the preset's, else 400)")
    d.add_argument("--resume", action="store_true", help="continue an interrupted run from OUT/checkpoint")
    d.add_argument("--name", default=None, help="the name it is registered under (default TEACHER-student-NL)")
    d.add_argument("--no-register", action="store_true", help="do not register the student in the model zoo")
    d.add_argument("--batch-size", type=int, default=None, help="training blocks per step (default 8)")
    d.add_argument("--seq-len", type=int, default=None, help="tokens per training block")
    d.add_argument("--lr", type=float, default=None, help="peak learning rate, then cosine decay (default 1e-3)")
    d.add_argument("--warmup-steps", type=int, default=None, help="steps of linear learning-rate warm-up (default 20)")
    d.add_argument("--temperature", type=float, default=None, help="softmax temperature T of the KL term (default 2)")
    d.add_argument("--kl-weight", type=float, default=None, help="weight of T²·KL (POST: 5)")
    d.add_argument("--lm-weight", type=float, default=None, help="weight of the next-token loss (POST: 2)")
    d.add_argument("--cos-weight", type=float, default=None, help="weight of the hidden-state cosine (POST: 1)")
    d.add_argument(
        "--checkpoint-every", type=int, default=None, help="steps between checkpoints in OUT/checkpoint (default 50)"
    )
    d.add_argument("--seed", type=int, default=None, help="fixes the student's start and the block order (default 0)")
    d.add_argument("--eval-dataset", default=None, help="afterwards, zero-shot test accuracy of teacher and student")
    add_runtime(d)
    d.set_defaults(func=cmd_distill)

    t = acts.add_parser("transfer", help="transfer a prompt tuned on a student to its teacher, with public inputs")
    t.add_argument("--prompt", required=True, help="the prompt artifact tuned on the student")
    t.add_argument("--teacher", required=True, help="the large model (zoo name, registered name or folder)")
    t.add_argument("--public", required=True, help="public dataset (bundled name or file); inputs only, no labels")
    t.add_argument("--out", required=True, help="folder for the teacher's prompt artifact")
    t.add_argument("--student", default=None, help="default: the prompt's base model")
    t.add_argument("--alpha", type=float, default=None, help="weight of the prompt-induced shift term (default 0.5)")
    t.add_argument("--steps", type=int, default=None, help="optimiser steps (default 200)")
    t.add_argument(
        "--lr", type=float, default=None, help="Adam's learning rate for the teacher's prompt (default 1e-3)"
    )
    t.add_argument("--batch-size", type=int, default=None, help="public inputs per step (default 32)")
    t.add_argument("--public-examples", type=int, default=None, help="public inputs to train on (default 64)")
    t.add_argument("--validation-examples", type=int, default=None, help="public validation examples (default 200)")
    t.add_argument(
        "--eval-every",
        type=int,
        default=None,
        help="steps between validation checks, each a candidate checkpoint (default 20)",
    )
    t.add_argument(
        "--select",
        default=None,
        choices=["auto", "accuracy", "loss", "last"],
        help="the checkpoint kept: best public validation accuracy or loss, or the last; auto (default): accuracy "
        "when the public set has the task's labels, else loss",
    )
    t.add_argument(
        "--seed", type=int, default=None, help="fixes which public inputs are used and their order (default 0)"
    )
    t.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
    t.add_argument("--evaluate", action="store_true", help="afterwards, test accuracy on the task's bundled data")
    t.add_argument("--eval-dataset", default=None, help="afterwards, test accuracy on this dataset (name or file)")
    t.add_argument("--aggregator", default=None, help="HOST:PORT of the aggregation server: store the result there")
    t.add_argument("--certs", default=None, help="certificate folder for --aggregator")
    t.add_argument(
        "--as",
        dest="identity",
        default="coordinator",
        help="identity for --aggregator (publishing is the coordinator's: a holder's is refused)",
    )
    add_runtime(t)
    t.set_defaults(func=cmd_transfer)
