"""The ``fedprompt`` command line."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from fedprompt import taskfile
from fedprompt.cache import check_out_folder
from fedprompt.dp.cli import add_budget_parser, add_dp_arguments, dp_config_from_args, private_tuning
from fedprompt.errors import FedPromptError


def add_runtime(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda, cuda:1, ...")
    p.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16"],
        help="bf16 = autocast over float32 weights; auto picks it where the hardware has bf16 units",
    )


# ------------------------------------------------------------------ models / datasets


def cmd_models(args: argparse.Namespace) -> int:
    from fedprompt.models import zoo

    if args.action == "pull":
        folder = zoo.pull(args.name)
        print(f"{args.name}: {folder}")
        return 0
    if args.action == "path":
        # the folder stock transformers loads: AutoModelForCausalLM.from_pretrained(<this folder>)
        folder, _, local = zoo.locate(args.name)
        if not local:
            raise FedPromptError(f"{args.name!r} is not a zoo model, a registered model or a model folder")
        print(folder)
        return 0
    if args.action == "add":
        name = zoo.register(args.name, args.as_name)
        print(f"registered {args.name} as {name!r}")
        return 0
    if args.action == "remove":
        zoo.unregister(args.name)
        print(f"unregistered {args.name!r} (its folder is kept)")
        return 0
    for name, entry in zoo.ZOO.items():
        folder = zoo.model_folder(name)
        state = "cached" if (folder / zoo.MANIFEST).exists() else "not pulled"
        print(f"{name:16} {state:11} {entry.description}")
    for name, folder in sorted(zoo.registered().items()):
        m = zoo.read_manifest(folder) if folder.is_dir() else {}
        if not folder.is_dir():
            print(f"{name:16} {'missing':11} {folder}")
            continue
        weights = (m.get("weights_sha256") or "?")[:12]
        line = f"{name:16} {'registered':11} {folder}; weights {weights}"
        if m.get("kind") == "distilled":
            t = m.get("teacher", {})
            d = m.get("distillation", {})
            line += (
                f"\n{'':28} distilled from {t.get('id')} (weights {str(t.get('weights_sha256'))[:12]}), "
                f"layers {m.get('layers_kept')} of {m.get('teacher_layers')}, {d.get('tokens', 0):,} tokens "
                f"of {m.get('corpus', {}).get('name')}"
            )
        print(line)
    return 0


def cmd_datasets(args: argparse.Namespace) -> int:
    from fedprompt.data import datasets

    if args.action == "split":
        from fedprompt.data import partition

        if not args.dataset or not args.out or args.holders < 2:
            raise FedPromptError("datasets split needs --dataset, --out and --holders >= 2")
        check_out_folder(Path(args.out), args.force)  # the folder is replaced as a whole: never one with files in it
        ds = datasets.load(args.dataset)
        files = partition.write_holder_files(ds, args.out, args.holders, alpha=args.alpha, seed=args.seed)
        for f in files:
            s = datasets.summary(datasets.load(str(f)))
            print(f"{f}: {s['train']} train / {s['test']} test; train labels {s['train_label_counts']}")
        return 0
    for name, spec in datasets.BUNDLED.items():
        s = datasets.summary(datasets.load(name))
        print(
            f"{name:16} train {s['train']:6} validation {s['validation']:4} test {s['test']:4}  "
            f"labels {', '.join(s['labels'])}"
        )
        print(f"{'':16} {spec.description}")
    return 0


# ------------------------------------------------------------------ tune / eval


def _session(args: argparse.Namespace, model: str, dataset, **kw):
    from fedprompt.runtime import Runtime
    from fedprompt.training import Session

    runtime = Runtime.create(args.device, args.precision)
    print(f"runtime: {runtime.describe()}", file=sys.stderr)
    return Session(model, dataset, runtime=runtime, max_length=args.max_length, **kw)


def cmd_tune(args: argparse.Namespace) -> int:
    from fedprompt import artifact
    from fedprompt.training import TuneConfig, tune

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
        meta = artifact.ArtifactMeta(
            task=session.dataset.name,
            template=session.template,
            label_names=session.dataset.label_names,
            label_words=session.label_words,
            scoring=session.scoring,
            base_model_id=session.loaded.model_id,
            base_model_sha256=session.loaded.weights_sha256,
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
    from fedprompt.data import datasets

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
    return datasets.load_file(source, label_names=list(meta.label_names))


def cmd_eval(args: argparse.Namespace) -> int:
    from fedprompt import artifact, text_prompt
    from fedprompt.evaluation import report

    if text_prompt.is_text_prompt(args.prompt):
        return _eval_text_prompt(args)
    weight, meta = artifact.load(args.prompt)  # the template, labels, words and scoring are the prompt's own
    session = _session(
        args,
        args.model or meta.base_model_id,
        _eval_dataset(args, meta),
        template=meta.template,
        label_words=meta.label_words,
        scoring=meta.scoring,
    )
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


def _eval_text_prompt(args: argparse.Namespace) -> int:
    """A text prompt (DP-OPT) works on any model: the instruction goes above the task's template."""
    from fedprompt import text_prompt
    from fedprompt.client.dpopt.text import correct_count, instruction_template

    text, meta = text_prompt.load(args.prompt)
    session = _session(
        args,
        args.model or meta.writer_model_id,
        _eval_dataset(args, meta),
        template=meta.template,
        label_words=meta.label_words,
        scoring=meta.scoring,
    )
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


def cmd_health(args: argparse.Namespace) -> int:
    from fedprompt.protocols.health import check

    return check(args)


def cmd_certs(args: argparse.Namespace) -> int:
    from fedprompt import certs

    done = certs.create(args.out, nodes=args.node, hosts=args.host or [], days=args.days)
    print(f"{args.out}: created {', '.join(done['created']) or 'nothing'}; kept {', '.join(done['kept']) or 'nothing'}")
    every = [n.name for n in certs.registered_nodes(args.out) if n.private_key.exists()]
    if args.bundles:
        certs.write_bundles(args.out, args.bundles, nodes=every)
        print(f"{args.bundles}: coordinator/ and nodes/NAME/, one folder per party ({len(every)} node(s))")
    if args.kustomize:
        certs.write_bundles(args.out, args.kustomize, nodes=every, kustomize=True)
        print(f"{args.kustomize}: coordinator/ and nodes/NAME/ for the overlays' Secrets ({len(every)} node(s))")
    print("keep ca.key offline; give each holder ca.crt and its own nodes/NAME folder only")
    return 0


# ------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedprompt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "models", help="list or pull zoo models; print a model's folder (path); add or remove a local model folder"
    )
    p.add_argument(
        "action",
        choices=["list", "pull", "path", "add", "remove"],
        help="path prints the folder stock transformers loads (pulling a zoo model first)",
    )
    p.add_argument("name", nargs="?", help="pull/path/remove: a model name; add: a model folder")
    p.add_argument("--as", dest="as_name", default=None, help="add: the name to register (default: its manifest's)")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("datasets", help="list the bundled datasets, or split one among holders (label skew)")
    p.add_argument(
        "action",
        choices=["list", "split"],
        help="list: show the bundled datasets and their sizes; split: write one label-skewed file per holder",
    )
    p.add_argument("--dataset", help="split: a bundled dataset name or a data file")
    p.add_argument("--holders", type=int, default=3, help="split: into this many holder-K.jsonl files")
    p.add_argument("--alpha", type=float, default=2.0, help="split: Dirichlet label skew (smaller: more skewed)")
    p.add_argument("--seed", type=int, default=0, help="split: fixes the split")
    p.add_argument("--out", help="split: a new or empty folder for holder-1.jsonl ... (written atomically)")
    p.add_argument("--force", action="store_true", help="split: replace a folder that has files in it")
    p.set_defaults(func=cmd_datasets)

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

    add_budget_parser(sub)

    from fedprompt.task_cli import add_task_parser

    add_task_parser(sub)

    p = sub.add_parser("certs", help="create the federation's CA, server certificate and node keys")
    p.add_argument("--out", required=True, help="certificate folder (existing material is kept)")
    p.add_argument("--node", action="append", default=[], help="a data holder's node name (repeatable)")
    p.add_argument(
        "--host",
        action="append",
        default=None,
        help="a name or address the coordinator is reached at (repeatable; localhost and 127.0.0.1 are always in)",
    )
    p.add_argument("--days", type=int, default=365, help="validity of new certificates")
    p.add_argument(
        "--kustomize",
        default=None,
        metavar="DIR",
        help="also write the material as the Secrets the Kubernetes overlays include (DIR/coordinator, DIR/nodes/NAME)",
    )
    p.add_argument(
        "--bundles",
        default=None,
        metavar="DIR",
        help="also write what each party is given, one folder each: DIR/coordinator (mounted by the coordinator "
        "side's containers) and DIR/nodes/NAME (one holder's); ca.key is in none",
    )
    p.set_defaults(func=cmd_certs)

    from fedprompt.protocols.health import add_arguments as add_health_arguments

    p = sub.add_parser("health", help="check a plaintext grpc.health.v1 endpoint (container health checks)")
    add_health_arguments(p)
    p.set_defaults(func=cmd_health)

    from fedprompt.client.daemon import add_client_parser
    from fedprompt.client.dpopt.cli import add_dpopt_parser
    from fedprompt.demo import add_demo_parser
    from fedprompt.server.aggregation.cli import add_aggregator_parser, add_prompts_parser, add_registry_parser
    from fedprompt.server.coordinator.cli import add_front_parser, add_server_parser, add_superlink_parser
    from fedprompt.server.post.cli import add_post_parser
    from fedprompt.server.post.demo import add_demo_post_parser

    add_server_parser(sub)
    add_superlink_parser(sub)
    add_front_parser(sub)
    add_aggregator_parser(sub)
    add_prompts_parser(sub)
    add_registry_parser(sub)
    add_client_parser(sub)
    add_dpopt_parser(sub)
    add_demo_parser(sub)
    add_post_parser(sub)
    add_demo_post_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "models" and args.action != "list" and not args.name:
        print(f"error: models {args.action} needs a {'FOLDER' if args.action == 'add' else 'NAME'}", file=sys.stderr)
        return 2
    if args.command == "budget" and (args.action in ("backup", "restore")) != bool(args.path):
        print("error: budget backup and restore take a PATH (and only they do)", file=sys.stderr)
        return 2
    if args.command == "budget" and args.action == "set" and args.budget_epsilon is None:
        print("error: budget set needs --budget-epsilon (and --budget-delta on a new ledger)", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except FedPromptError as exc:  # errors a user can cause; anything else is a bug and keeps its traceback
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
