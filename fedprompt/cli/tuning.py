"""``fedprompt tune`` and ``fedprompt eval``."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from fedprompt import taskfile
from fedprompt.cache import check_out_folder
from fedprompt.cli.common import add_runtime
from fedprompt.dp.cli import add_dp_arguments, dp_config_from_args, private_tuning
from fedprompt.errors import FedPromptError


def _session(args: argparse.Namespace, model: str, dataset, **kw):
    from fedprompt.runtime import Runtime
    from fedprompt.training import Session

    runtime = Runtime.create(args.device, args.precision)
    print(f"runtime: {runtime.describe()}", file=sys.stderr)
    return Session(model, dataset, runtime=runtime, max_length=args.max_length, **kw)


def cmd_tune(args: argparse.Namespace) -> int:
    from fedprompt import artifact
    from fedprompt.training import tune
    from fedprompt.tuning_settings import TuneConfig

    out = Path(args.out)
    check_out_folder(out, args.force)
    cfg = TuneConfig(
        prompt_length=args.prompt_length,
        steps=args.steps,
        lr=args.lr,
        batch_size=args.batch_size,
        init=args.init,
        init_text=args.init_text,
        max_length=args.max_length,
        eval_every=args.eval_every,
        seed=args.seed,
        base_dropout=args.base_dropout,
    )
    dp = dp_config_from_args(args)  # before loading anything: bad privacy settings fail fast
    session = _session(args, args.model, taskfile.dataset_for(args.task, args.data))
    init_weight, init_info = session.initial_prompt(cfg)
    with contextlib.ExitStack() as stack:
        if dp is not None:
            result, private, reservation = stack.enter_context(private_tuning(session, cfg, dp, args))
        else:
            result, private, reservation = tune(session, cfg), None, None
        test = session.dataset.split(args.eval_split)
        accs = {
            "zero_shot": session.evaluate(session.prompted(None), test, desc="zero-shot"),
            "initial_prompt": session.evaluate(session.prompted(init_weight), test, desc="initial prompt"),
            "tuned_prompt": session.evaluate(session.prompted(result.weight), test, desc="tuned prompt"),
        }
        training = {
            "steps": cfg.steps,
            "lr": cfg.lr,
            "batch_size": cfg.batch_size,
            "seed": cfg.seed,
            "prompt_length": cfg.prompt_length,
            "precision": session.runtime.precision,
        }
        if private is None:
            training[f"{args.eval_split}_accuracy"] = accs
        # A private prompt carries no accuracy on the holder's own data: that number is not covered by the
        # DP guarantee, so it is printed here for the holder and never shipped with the prompt.
        meta = artifact.ArtifactMeta.create(
            session.prompt_task,
            session.loaded.model_id,
            session.loaded.weights_sha256,
            origin_id=result.origin_id,
            init=init_info,
            privacy=private,
            training=training,
        )
        if reservation is not None:
            reservation.leaving()  # the artifact is the release: from here on the spend counts
        artifact.save(out, result.weight, meta)
    print(
        f"\n{args.eval_split} accuracy on {session.dataset.name} ({len(test)} examples, "
        f"model {session.loaded.model_id}):"
    )
    for k, v in accs.items():
        print(f"  {k:15} {100 * v:6.2f} %")
    if private:
        print(
            f"privacy spent: epsilon = {private['epsilon']:.3f}, delta = {private['delta']:.3g} "
            f"({private['accountant']} accountant)"
        )
    print(f"prompt artifact: {out}")
    return 0


def _eval_dataset(args: argparse.Namespace, meta):
    """The data to evaluate a prompt on, labelled as its artifact says: ``--data`` (columns from ``--task`` if
    given), else the task's own data, else the artifact's task when it is a bundled one."""
    from fedprompt import taskfile
    from fedprompt.data import datasets, files

    task = taskfile.resolve(args.task) if args.task else None
    if task is not None and list(task.labels) != list(meta.label_names):
        raise FedPromptError(f"the task's labels {list(task.labels)} are not the prompt's {meta.label_names}")
    source = args.data or (task.data if task else None) or (meta.task if meta.task in datasets.BUNDLED else None)
    if source is None:
        raise FedPromptError(
            f"the prompt's task {meta.task!r} is not a bundled dataset: give the data to evaluate on (--data FILE)"
        )
    if task is not None:
        return datasets.load_task(task, source)
    if source in datasets.BUNDLED:
        return datasets.load(source)
    return files.load_file(source, label_names=list(meta.label_names))


def cmd_eval(args: argparse.Namespace) -> int:
    from fedprompt import artifact, text_prompt
    from fedprompt.evaluation import report

    if text_prompt.is_text_prompt(args.prompt):
        return _eval_text_prompt(args)
    weight, meta = artifact.load(args.prompt)  # the template, labels, words and scoring are the prompt's own
    session = _session_of_prompt(args, meta, meta.base_model_id)
    artifact.check_base_model(meta, weight, session.loaded)
    examples = session.dataset.split(args.split)
    predicted, scores = session.predict(session.prompted(weight), examples, batch_size=args.batch_size)
    out = report(session.dataset.label_names, examples, predicted, scores, predictions=args.predictions)
    if args.zero_shot:
        zero, _ = session.predict(session.prompted(None), examples, batch_size=args.batch_size, desc="zero-shot")
        out["zero_shot_accuracy"] = sum(p == e.label for p, e in zip(zero, examples, strict=True)) / len(examples)
    out = {"dataset": session.dataset.name, "split": args.split, "precision": session.runtime.precision, **out}
    out["privacy"] = meta.privacy
    print(json.dumps(out, indent=2))
    return 0


def _session_of_prompt(args: argparse.Namespace, meta, model_id: str):
    """A session on ``--model`` (default ``model_id``) and the evaluation data, labelled, templated and scored as
    the prompt's metadata says."""
    dataset = _eval_dataset(args, meta)
    return _session(
        args,
        args.model or model_id,
        dataset,
        template=meta.template,
        label_words=meta.label_words,
        scoring=meta.scoring,
    )


def _eval_text_prompt(args: argparse.Namespace) -> int:
    """A text prompt (DP-OPT) works on any model: the instruction goes above the task's template."""
    from fedprompt import text_prompt
    from fedprompt.client.dpopt.text import correct_count, instruction_template

    text, meta = text_prompt.load(args.prompt)
    session = _session_of_prompt(args, meta, meta.writer_model_id)
    examples = session.dataset.split(args.split)

    def accuracy(template: str) -> float:
        rt, loaded, verbalizer = session.runtime, session.loaded, session.verbalizer
        return correct_count(loaded, rt, verbalizer, template, examples, max_length=args.max_length) / len(examples)

    report = {
        "dataset": session.dataset.name,
        "model": session.loaded.model_id,
        "split": args.split,
        "examples": len(examples),
        "accuracy": accuracy(instruction_template(text, meta.template)),
        "zero_shot_accuracy": accuracy(meta.template) if args.zero_shot else None,
        "privacy": meta.privacy,
    }
    print(json.dumps(report, indent=2))
    return 0


def add_tune_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tune", help="tune a soft prompt (add --dp for differential privacy)")
    p.add_argument("--model", default="smollm2-135m", help="a zoo model, a registered one or a model folder")
    taskfile.add_task_arguments(p, default="rotten-tomatoes")
    p.add_argument("--out", required=True, help="the prompt artifact's folder (written whole or not at all)")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
    p.add_argument("--prompt-length", type=int, default=20, help="virtual tokens of the soft prompt")
    p.add_argument("--steps", type=int, default=300, help="optimiser steps")
    p.add_argument("--lr", type=float, default=3e-3, help="Adam's learning rate")
    p.add_argument(
        "--batch-size",
        type=int,
        default=32,
        help="batch size; under --dp the expected batch size of Poisson sampling",
    )
    p.add_argument(
        "--init",
        default="text",
        choices=["text", "vocab", "labels"],
        help="the starting prompt: the task's instruction (text), random vocabulary rows, or the label words",
    )
    p.add_argument("--init-text", default=None, help="the instruction --init text starts from (default: the task's)")
    p.add_argument("--max-length", type=int, default=128, help="tokens per example; longer texts are cut")
    p.add_argument("--eval-every", type=int, default=50, help="steps between validation checks (0: none)")
    p.add_argument(
        "--eval-split", default="test", choices=["validation", "test"], help="the split the final accuracies use"
    )
    p.add_argument("--seed", type=int, default=0, help="fixes data-independent choices only (never DP noise)")
    p.add_argument("--base-dropout", action="store_true", help="keep the frozen model's dropout active")
    add_runtime(p)
    add_dp_arguments(p)
    p.set_defaults(func=cmd_tune)


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a prompt artifact (soft prompt, or DP-OPT text prompt on any model)")
    p.add_argument("--prompt", required=True, help="a prompt artifact's folder")
    p.add_argument(
        "--task",
        default=None,
        help="a task file or bundled task for the data's columns (its labels must be the prompt's; the template, "
        "label words and scoring are always the prompt's own)",
    )
    p.add_argument(
        "--data",
        "--dataset",
        dest="data",
        default=None,
        help="the data to evaluate on (default: the task's data, else the prompt's task if it is bundled)",
    )
    p.add_argument("--model", default=None, help="default: the artifact's base model")
    p.add_argument("--split", default="test", choices=["train", "validation", "test"], help="the split to score")
    p.add_argument("--zero-shot", action="store_true", help="also report the zero-shot model")
    p.add_argument("--predictions", default=None, metavar="FILE", help="write per-example predictions and scores (CSV)")
    p.add_argument("--batch-size", type=int, default=32, help="examples per forward pass")
    p.add_argument("--max-length", type=int, default=128, help="tokens per example; longer texts are cut")
    add_runtime(p)
    p.set_defaults(func=cmd_eval)
