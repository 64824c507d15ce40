"""A task file: the one description of a classification task that every command reads.

A TOML file names the data (a CSV/TSV/JSONL file or a bundled dataset) and its columns, the labels in
order with their label words (several per label allowed, of any length) and optional descriptions, the
template each text is put in, how label words are scored, and the instruction a text-initialised prompt
starts from. The bundled datasets ship theirs (``fedprompt/tasks/NAME.toml``); ``fedprompt task init DATA``
writes a first one for a user's data. Example::

    name = "health-tweets"
    data = "tweets.csv"            # relative to this file; or a bundled dataset's name
    text_column = "text"
    label_column = "label"
    template = "Tweet: {text}\\nSource:"
    init_text = "Which outlet posted this tweet?"
    scoring = "sum"                # a word's log-probability: "sum" over its tokens, or "mean" per token

    [[labels]]
    name = "nprhealth"
    words = [" NPR"]
    description = "NPR's health desk"
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from fedprompt.errors import ConfigError, FedPromptError

if TYPE_CHECKING:
    from fedprompt.data.datasets import Dataset

SCORINGS = ("sum", "mean")
_KEYS = {"name", "data", "text_column", "label_column", "split_column", "template", "init_text", "scoring", "labels"}
_LABEL_KEYS = {"name", "words", "description"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class Task:
    name: str
    labels: tuple[str, ...]
    words: tuple[tuple[str, ...], ...]
    template: str
    init_text: str | None = None
    scoring: str = "sum"
    descriptions: tuple[str, ...] = ()
    data: str | None = None  # a data file (absolute, resolved against the task file) or a bundled dataset
    text_column: str = "text"
    label_column: str = "label"
    split_column: str = "split"
    source: str = field(default="", compare=False)  # the file it was read from, for messages

    def __post_init__(self) -> None:
        where = self.source or self.name
        if not _NAME.match(self.name):
            raise ConfigError(f"{where}: task name {self.name!r}: letters, digits, '.', '_' and '-' only")
        if len(self.labels) < 2:
            raise ConfigError(f"{where}: a task needs at least 2 labels, got {list(self.labels)}")
        if len(set(self.labels)) != len(self.labels):
            raise ConfigError(f"{where}: a label is listed twice in {list(self.labels)}")
        if len(self.words) != len(self.labels):
            raise ConfigError(f"{where}: {len(self.words)} label-word lists for {len(self.labels)} labels")
        for label, words in zip(self.labels, self.words, strict=True):
            if not words or not all(isinstance(w, str) and w for w in words):
                raise ConfigError(f"{where}: label {label!r} needs one or more non-empty label words")
        if "{text}" not in self.template:
            raise ConfigError(f"{where}: template must contain '{{text}}', got {self.template!r}")
        try:
            self.template.format(text="")
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigError(
                f"{where}: template {self.template!r} has a brace other than {{text}} ({exc}); write {{{{ or }}}}"
            ) from exc
        if self.scoring not in SCORINGS:
            raise ConfigError(f"{where}: scoring must be one of {SCORINGS}, got {self.scoring!r}")
        if self.descriptions and len(self.descriptions) != len(self.labels):
            raise ConfigError(f"{where}: descriptions for some labels only")

    @property
    def label_words(self) -> list[list[str]]:
        return [list(w) for w in self.words]


def bundled_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("fedprompt.tasks").iterdir() if p.name.endswith(".toml"))


def bundled(name: str) -> Task:
    """The task file a bundled dataset ships."""
    path = resources.files("fedprompt.tasks") / f"{name}.toml"
    if not path.is_file():
        raise ConfigError(f"no bundled task {name!r}; bundled: {', '.join(bundled_names())}")
    return parse(path.read_text(encoding="utf-8"), source=f"bundled task {name}", data_default=name)


def read(path: str | Path) -> Task:
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the task file: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text") from exc
    return parse(text, source=str(path), base=path.resolve().parent)


def is_task_file(value: str) -> bool:
    return value.endswith(".toml")


def resolve(value: str) -> Task:
    """A task file's path, or a bundled task's name."""
    if is_task_file(value):
        return read(value)
    if value in bundled_names():
        return bundled(value)
    raise ConfigError(
        f"{value!r} is neither a task file (.toml) nor a bundled task ({', '.join(bundled_names())}); "
        "write one for your data with: fedprompt task init DATA.csv"
    )


def parse(text: str, *, source: str, base: Path | None = None, data_default: str | None = None) -> Task:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from exc
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(_KEYS))}")
    for key in ("name", "template"):
        if not isinstance(raw.get(key), str):
            raise ConfigError(f"{source}: {key} (a string) is required")
    for key in ("data", "text_column", "label_column", "split_column", "init_text", "scoring"):
        if key in raw and not isinstance(raw[key], str):
            raise ConfigError(f"{source}: {key} must be a string, got {raw[key]!r}")
    labels = raw.get("labels")
    if not isinstance(labels, list) or not all(isinstance(x, dict) for x in labels):
        raise ConfigError(f"{source}: give the labels as [[labels]] tables, each with a name and its words")
    names, words, descriptions = [], [], []
    for i, entry in enumerate(labels, 1):
        extra = sorted(set(entry) - _LABEL_KEYS)
        if extra:
            raise ConfigError(
                f"{source}: label {i}: unknown key(s) {', '.join(extra)}; known: name, words, description"
            )
        name = entry.get("name")
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"{source}: label {i} has no name")
        got = entry.get("words", [f" {name}"])
        if isinstance(got, str):
            got = [got]
        if not isinstance(got, list) or not all(isinstance(w, str) for w in got):
            raise ConfigError(f"{source}: label {name!r}: words must be a list of strings")
        names.append(name)
        words.append(tuple(got))
        descriptions.append(str(entry.get("description", "")))
    data = raw.get("data", data_default)
    if data and base is not None and not _is_bundled_dataset(data):
        data = str((base / Path(data).expanduser()).resolve())
    return Task(
        name=raw["name"],
        labels=tuple(names),
        words=tuple(words),
        template=raw["template"],
        init_text=raw.get("init_text") or None,
        scoring=raw.get("scoring", "sum"),
        descriptions=tuple(descriptions) if any(descriptions) else (),
        data=data or None,
        text_column=raw.get("text_column", "text"),
        label_column=raw.get("label_column", "label"),
        split_column=raw.get("split_column", "split"),
        source=source,
    )


def add_task_arguments(p: argparse.ArgumentParser, *, default: str | None) -> None:
    """``--task`` (alias ``--dataset``) and ``--data``, as every command that reads a task takes them."""
    p.add_argument(
        "--task",
        "--dataset",
        dest="task",
        default=default,
        help="a task file (.toml: data, labels, label words, template; `fedprompt task init DATA` writes one), a "
        "bundled task, or a bare data file (default label words)",
    )
    p.add_argument("--data", default=None, help="the data file, in place of the task file's own")


def dataset_for(task_or_data: str, data: str | None) -> Dataset:
    """``--task`` (a task file, a bundled task, or a bare data file with default label words) with ``--data``."""
    from fedprompt.data import datasets

    if is_task_file(task_or_data) or task_or_data in bundled_names():
        return datasets.load_task(resolve(task_or_data), data)
    if data is not None:
        raise FedPromptError("--data goes with a task file or a bundled task (--task); --task is a data file here")
    ds = datasets.load(task_or_data)
    print(
        f"note: {task_or_data} has no task file: template {ds.template!r}, label words "
        f"{', '.join(repr(w[0]) for w in ds.label_words)}; `fedprompt task init {task_or_data}` writes a task file "
        "with the best template it finds and checked label words",
        file=sys.stderr,
    )
    return ds


def _is_bundled_dataset(name: str) -> bool:
    from fedprompt.data.datasets import BUNDLED

    return name in BUNDLED


def _toml_string(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)  # a JSON string is a TOML basic string


def dumps(task: Task, *, comments: dict[str, str] | None = None, data: str | None = None) -> str:
    """The task as a TOML file; ``comments`` adds a comment block above a key (or above "labels")."""
    comments = comments or {}

    def block(key: str) -> list[str]:
        return [f"# {line}" if line else "#" for line in comments.get(key, "").splitlines()]

    lines = [*block("header")]
    scalars = {
        "name": task.name,
        "data": data if data is not None else task.data,
        "text_column": task.text_column,
        "label_column": task.label_column,
        "template": task.template,
        "init_text": task.init_text,
        "scoring": task.scoring,
    }
    for key, value in scalars.items():
        if value is None:
            continue
        lines += [*block(key), f"{key} = {_toml_string(value)}"]
    lines += ["", *block("labels")]
    for i, (name, words) in enumerate(zip(task.labels, task.words, strict=True)):
        lines += [
            *block(f"label {name}"),
            "[[labels]]",
            f"name = {_toml_string(name)}",
            f"words = [{', '.join(map(_toml_string, words))}]",
        ]
        if task.descriptions and task.descriptions[i]:
            lines.append(f"description = {_toml_string(task.descriptions[i])}")
        lines.append("")
    return "\n".join(lines)
