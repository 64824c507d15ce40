"""``fedprompt models`` and ``fedprompt datasets``."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedprompt.cache import check_out_folder
from fedprompt.errors import FedPromptError


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


def add_models_parser(sub: argparse._SubParsersAction) -> None:
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


def add_datasets_parser(sub: argparse._SubParsersAction) -> None:
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
