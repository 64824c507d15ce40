"""``fedprompt task``: write a task file for one's own data (``init``), check one (``check``), print one (``show``).

``init`` reads the data and searches, on the validation split with the zero-shot model, in three stages (each
keeps the best of the one before): the label words (the labels as written, without what they all share, in upper
case), the answer cue (``Text: {text}\nLabel:``, ``...\nSource:``, ...), the text's name (``Tweet:``,
``Article:``, ...). It shows every word's tokens, explains collisions by label, and writes the task file with the
best choice and every measurement as comments. Nothing is written when a check fails.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from fedprompt.errors import FedPromptError

ANSWER_CUES = ("Label", "Category", "Topic", "Source", "Sentiment", "Answer")
TEXT_NAMES = ("Text", "Tweet", "Article", "Review", "Message")
DEFAULT_MODEL = "smollm2-135m"


def _common_start(names: list[str]) -> str:
    first, last = min(names), max(names)  # the sorted extremes share what every name shares
    i = 0
    while i < min(len(first), len(last)) and first[i] == last[i]:
        i += 1
    return first[:i]


def word_sets(labels: list[str]) -> list[tuple[str, list[list[str]]]]:
    """Candidate label words, one word per label: as written; with a prefix or suffix they all share removed
    (and ``_``/``-`` as spaces); that in upper case. Only sets whose words stay distinct."""
    spaced = [re.sub(r"[_-]+", " ", n).strip() for n in labels]
    low = [n.lower() for n in spaced]
    prefix = _common_start(low)
    suffix = _common_start([n[::-1] for n in low])[::-1]
    # an affix worth removing is a word of its own (after a space) or a long one ("health"), not a shared ending
    prefix = prefix if prefix.endswith(" ") or len(prefix) >= 5 else ""
    suffix = suffix if suffix.startswith(" ") or len(suffix) >= 5 else ""
    core = [n[len(prefix) : len(n) - len(suffix)].strip() if len(prefix) + len(suffix) < len(n) else n for n in spaced]
    sets = [("as written", [[f" {n}"] for n in labels])]
    if (prefix or suffix) and all(core) and len(set(core)) == len(core):
        shared = " and ".join(repr(x.strip()) for x in (prefix, suffix) if x)
        sets.append((f"without the shared {shared}", [[f" {c}"] for c in core]))
        sets.append((f"without the shared {shared}, upper case", [[f" {c.upper()}"] for c in core]))
    elif spaced != labels:
        sets.append(("with spaces", [[f" {n}"] for n in spaced]))
    seen, out = set(), []
    for name, words in sets:
        key = tuple(w[0] for w in words)
        if key not in seen and len(set(key)) == len(key):
            seen.add(key)
            out.append((name, words))
    return out


def word_report(tokenizer, labels: list[str], words: list[list[str]]) -> tuple[list[str], list[str]]:
    """Lines that show each label word's tokens, and the problems found (empty: the words can be used)."""
    lines, problems = [], []
    seen: dict[tuple[int, ...], tuple[str, str]] = {}
    firsts: dict[int, list[str]] = {}
    for label, group in zip(labels, words, strict=True):
        for w in group:
            ids = tuple(tokenizer(w, add_special_tokens=False).input_ids)
            pieces = [tokenizer.decode([t]) for t in ids]
            lines.append(f"{label!r}: word {w!r} -> {len(ids)} token(s) {pieces}")
            if not ids:
                problems.append(f"label {label!r}: word {w!r} has no tokens")
                continue
            if ids in seen and seen[ids][0] != label:
                other, other_word = seen[ids]
                problems.append(
                    f"label {label!r} (word {w!r}) and label {other!r} (word {other_word!r}) are the same tokens: "
                    "the model cannot tell them apart; give one of them another word"
                )
            seen.setdefault(ids, (label, w))
            firsts.setdefault(ids[0], [])
            if label not in firsts[ids[0]]:
                firsts[ids[0]].append(label)
    for tok, sharing in firsts.items():
        if len(sharing) > 1:
            lines.append(
                f"labels {', '.join(map(repr, sharing))} share their first token {tokenizer.decode([tok])!r}: fine, "
                "a word is scored by all of its tokens"
            )
    flat = [
        (label, w, tuple(tokenizer(w, add_special_tokens=False).input_ids))
        for label, g in zip(labels, words, strict=True)
        for w in g
    ]
    for la, wa, a in flat:
        for lb, wb, b in flat:
            if la != lb and len(a) < len(b) and b[: len(a)] == a:
                lines.append(
                    f"word {wa!r} ({la!r}) is the start of {wb!r} ({lb!r}): with scoring 'sum' the shorter word is "
                    "favoured; scoring 'mean' or other words avoid that"
                )
    return lines, problems


class ZeroShot:
    """Zero-shot accuracy of (template, words) on the first ``examples`` validation examples, printed as it goes."""

    def __init__(self, model, dataset, scoring: str, examples: int, args) -> None:
        from fedprompt.runtime import Runtime

        self.model, self.dataset, self.scoring = model, dataset, scoring
        self.runtime = Runtime.create(args.device, args.precision)
        self.val = dataset.split("validation")[:examples]
        self.max_length = args.max_length
        self.measured: list[tuple[str, str, float]] = []  # (what, template, accuracy)

    def __call__(self, template: str, words: list[list[str]], what: str) -> float:
        from fedprompt.training import Session

        s = Session(
            self.model, self.dataset, runtime=self.runtime, max_length=self.max_length, template=template,
            label_words=words, scoring=self.scoring,
        )  # fmt: skip
        acc = s.evaluate(s.prompted(None), self.val, desc=f"zero-shot {what}")
        self.measured.append((what, template, acc))
        print(f"  {100 * acc:6.2f} %  {what}: {template!r}", file=sys.stderr)
        return acc


def search(zero_shot: ZeroShot, labels: list[str]) -> tuple[list[list[str]], str, float]:
    """The best label words, then answer cue, then text name (see the module's docstring)."""
    base = "Text: {text}\nLabel:"
    words, best = max(((w, zero_shot(base, w, f"words {name}")) for name, w in word_sets(labels)), key=lambda x: x[1])
    template = base
    for cue in ANSWER_CUES:
        candidate = f"Text: {{text}}\n{cue}:"
        if candidate != base and (acc := zero_shot(candidate, words, f"cue {cue}")) > best:
            template, best = candidate, acc
    cue_line = template.split("\n", 1)[1]
    for name in TEXT_NAMES:
        candidate = f"{name}: {{text}}\n{cue_line}"
        if candidate != template and (acc := zero_shot(candidate, words, f"text name {name}")) > best:
            template, best = candidate, acc
    return words, template, best


def cmd_init(args: argparse.Namespace) -> int:
    from fedprompt import taskfile
    from fedprompt.data import files
    from fedprompt.models import zoo

    data = Path(args.data).expanduser()
    out = Path(args.out) if args.out else data.with_suffix(".task.toml")
    if out.exists() and not args.force:
        raise FedPromptError(f"{out} exists; pass --force to replace it")
    ds = files.load_file(data, text_column=args.text_column, label_column=args.label_column)
    labels = ds.label_names
    loaded = zoo.load(args.model)
    print(f"{data}: {len(ds.split('train'))} train, {len(ds.split('validation'))} validation, "
          f"{len(ds.split('test'))} test; labels {labels}", file=sys.stderr)  # fmt: skip
    n = min(args.examples, len(ds.split("validation")))
    if n == 0:
        raise FedPromptError(f"{data}: no validation examples to choose the template and label words on")
    print(f"zero-shot accuracy on {n} validation examples ({loaded.model_id}):", file=sys.stderr)
    zero_shot = ZeroShot(loaded, ds, args.scoring, n, args)
    words, best, best_acc = search(zero_shot, labels)
    lines, problems = word_report(loaded.tokenizer, labels, words)
    print("label words on " + loaded.model_id + ":\n  " + "\n  ".join(lines), file=sys.stderr)
    if problems:
        raise FedPromptError("label words that cannot work:\n  " + "\n  ".join(problems))
    chance = max(sum(e.label == i for e in zero_shot.val) for i in range(len(labels))) / n
    task = taskfile.Task(
        name=_task_name(data),
        labels=tuple(labels),
        words=tuple(tuple(w) for w in words),
        template=best,
        init_text=f"Classify this text as one of: {', '.join(w[0].strip() for w in words)}.",
        scoring=args.scoring,
        text_column=args.text_column,
        label_column=args.label_column,
    )
    try:
        rel = str(data.resolve().relative_to(out.resolve().parent))
    except ValueError:
        rel = str(data.resolve())
    comments = {
        "header": (
            f"Written by `fedprompt task init {args.data}` for {loaded.model_id}; edit freely, then check it with\n"
            f"`fedprompt task check {out}`.\n\nZero-shot accuracy on {n} validation examples (the most frequent "
            f"label alone: {100 * chance:.1f} %),\nthe label words, then the answer cue, then the text's name, each "
            "keeping the best:\n"
            + "\n".join(f"  {100 * acc:5.1f} %  {what}: {t!r}" for what, t, acc in zero_shot.measured)
        ),
        "template": f"the best of the candidates above ({100 * best_acc:.1f} %)",
        "labels": "Label words as the model sees them:\n" + "\n".join(f"  {line}" for line in lines),
        "scoring": '"sum": a word\'s log-probability over all its tokens; "mean": per token (favours no length)',
    }
    text = taskfile.dumps(task, comments=comments, data=rel)
    taskfile.parse(text, source=str(out))  # what is written reads back
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out)
    print(f"wrote {out}: template {best!r} ({100 * best_acc:.1f} % zero-shot on validation)")
    return 0


def _task_name(data: Path) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "-", data.stem).strip("-._")[:64] or "task"


def cmd_check(args: argparse.Namespace) -> int:
    from fedprompt import taskfile
    from fedprompt.data import datasets
    from fedprompt.models import zoo

    task = taskfile.resolve(args.task)
    ds = datasets.load_task(task, args.data)
    loaded = zoo.load(args.model)
    lines, problems = word_report(loaded.tokenizer, list(task.labels), task.label_words)
    print("label words on " + loaded.model_id + ":\n  " + "\n  ".join(lines))
    if problems:
        raise FedPromptError("label words that cannot work:\n  " + "\n  ".join(problems))
    counts = {name: 0 for name in task.labels}
    for e in ds.split("train"):
        counts[task.labels[e.label]] += 1
    print(f"data: {len(ds.split('train'))} train {counts}, {len(ds.split('validation'))} validation, "
          f"{len(ds.split('test'))} test")  # fmt: skip
    if args.examples and ds.split("validation"):
        n = min(args.examples, len(ds.split("validation")))
        print(f"zero-shot accuracy of the task's template on {n} validation examples:")
        ZeroShot(loaded, ds, task.scoring, n, args)(task.template, task.label_words, "the task's template")
    print(f"{task.source}: ok")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from fedprompt import taskfile

    task = taskfile.resolve(args.task)
    print(taskfile.dumps(task, comments={"header": f"{task.source}"}), end="")
    return 0


def add_task_parser(sub) -> None:
    from fedprompt.cli.common import add_runtime

    p = sub.add_parser("task", help="write a task file for your data (init), check one (check), print one (show)")
    actions = p.add_subparsers(dest="action", required=True)
    i = actions.add_parser("init", help="propose label words and the best template for DATA; write a task file")
    i.add_argument("data", help="a CSV/TSV/JSONL file with a text and a label column (and optionally split)")
    i.add_argument("--out", default=None, help="the task file to write (default: DATA with .task.toml)")
    i.add_argument("--force", action="store_true", help="replace an existing --out")
    i.add_argument("--text-column", default="text", help="the column with the texts")
    i.add_argument("--label-column", default="label", help="the column with the labels")
    i.add_argument("--model", default=DEFAULT_MODEL, help="the model the label words and templates are checked on")
    i.add_argument("--scoring", default="sum", choices=["sum", "mean"], help="how multi-token label words score")
    i.add_argument("--examples", type=int, default=200, help="validation examples per candidate template")
    i.add_argument("--max-length", type=int, default=128, help="tokens per example; longer texts are cut")
    add_runtime(i)
    i.set_defaults(func=cmd_init)
    c = actions.add_parser("check", help="check a task file: its data, label words, zero-shot accuracy")
    c.add_argument("task", help="a task file or a bundled task")
    c.add_argument("--data", default=None, help="the data file, in place of the task file's own")
    c.add_argument("--model", default=DEFAULT_MODEL, help="the model to check the label words on")
    c.add_argument("--examples", type=int, default=200, help="validation examples for the zero-shot check (0: none)")
    c.add_argument("--max-length", type=int, default=128, help="tokens per example; longer texts are cut")
    add_runtime(c)
    c.set_defaults(func=cmd_check)
    s = actions.add_parser("show", help="print a task file (a bundled task's too)")
    s.add_argument("task", help="a task file or a bundled task")
    s.set_defaults(func=cmd_show)
