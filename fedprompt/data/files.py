"""The user's own data: a CSV or JSONL file of texts and labels (and, optionally, its split), read with limits
that refuse a file no classifier data would be before it is parsed whole."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from fedprompt.cache import sha256_bytes
from fedprompt.data.datasets import SPLITS, Dataset, Example, default_words, split_indices
from fedprompt.errors import DatasetError

# One limit for a field of CSV and JSONL alike (csv's own default): a text longer than this is not a snippet to
# classify, and reading it (a 50 MB JSONL line peaked at 6.7 GB) is refused before it is parsed.
MAX_FIELD_CHARS = 131_072
MAX_LINE_CHARS = 4 * MAX_FIELD_CHARS


def _check_fields(path: Path, where: str, row: dict) -> None:
    for key, value in row.items():
        if isinstance(value, str) and len(value) > MAX_FIELD_CHARS:
            raise DatasetError(
                f"{path}:{where}: field {key!r} has {len(value):,} characters, more than {MAX_FIELD_CHARS:,}"
            )


def _read_rows(path: Path) -> list[dict]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    if not text.strip():
        raise DatasetError(f"{path}: the file is empty")
    if path.suffix.lower() in (".jsonl", ".json"):
        rows = []
        for lineno, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            if len(line) > MAX_LINE_CHARS:
                raise DatasetError(f"{path}:{lineno}: a line of {len(line):,} characters, more than {MAX_LINE_CHARS:,}")
            try:
                obj = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as exc:
                raise DatasetError(f"{path}:{lineno}: invalid JSON ({getattr(exc, 'msg', 'nested too deep')})") from exc
            if not isinstance(obj, dict):
                raise DatasetError(f"{path}:{lineno}: each line must be a JSON object")
            _check_fields(path, str(lineno), obj)
            rows.append(obj)
        return rows
    if path.suffix.lower() in (".csv", ".tsv"):
        try:
            reader = csv.DictReader(io.StringIO(text), delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
            rows = list(reader)
        except csv.Error as exc:  # a field above csv.field_size_limit() (MAX_FIELD_CHARS) lands here too
            raise DatasetError(f"{path}: malformed CSV ({exc})") from exc
        for i, row in enumerate(rows, 2):
            _check_fields(path, str(i), row)
        return rows
    raise DatasetError(f"{path}: unsupported file type {path.suffix!r}; use .csv, .tsv or .jsonl")


def load_file(
    path: str | Path,
    *,
    label_names: list[str] | None = None,
    template: str = "{text}\nAnswer:",
    label_words: list[list[str]] | None = None,
    held_out_fraction: float = 0.1,
    text_column: str = "text",
    label_column: str = "label",
    split_column: str = "split",
) -> Dataset:
    """Load a CSV/TSV/JSONL file with a text and a label column (and optionally a split column).

    ``label_names`` fixes the label set and order; a label outside it is an error. Without it, the
    labels are the sorted distinct values. Without a split column, validation and test are each
    ``held_out_fraction`` of the file, chosen by a seeded shuffle.
    """
    path = Path(path)
    rows = _read_rows(path)
    if not rows:
        raise DatasetError(f"{path}: no examples")
    missing = [c for c in (text_column, label_column) if c not in rows[0]]
    if missing:
        raise DatasetError(
            f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(rows[0])} "
            "(a task file names the columns: text_column, label_column)"
        )
    columns = {text_column: "text", label_column: "label", split_column: "split"}
    rows = [{columns.get(k, f"_{k}"): v for k, v in r.items()} for r in rows]
    for i, r in enumerate(rows, 1):
        if not isinstance(r.get("text"), str) or not r["text"].strip():
            raise DatasetError(f"{path}: example {i} has an empty or non-text 'text'")
        label = r.get("label")
        if isinstance(label, bool) or not isinstance(label, str | int):
            kind = "no label" if label is None else f"a {type(label).__name__} as its label"
            raise DatasetError(f"{path}: example {i} has {kind}; a label is a string (or an integer)")
        if str(label).strip() == "":
            raise DatasetError(f"{path}: example {i} has no label")
    labels = [str(r["label"]).strip() for r in rows]
    names = list(label_names) if label_names else sorted(set(labels))
    unknown = sorted(set(labels) - set(names))
    if unknown:
        raise DatasetError(f"{path}: unknown label(s) {', '.join(map(repr, unknown))}; expected {names}")
    if len(names) < 2:
        raise DatasetError(f"{path}: a classification dataset needs at least 2 labels, found {names}")
    index = {n: i for i, n in enumerate(names)}
    splits: dict[str, list[Example]] = {s: [] for s in SPLITS}
    if "split" in rows[0]:
        for i, (r, lab) in enumerate(zip(rows, labels, strict=True), 1):
            if r.get("split") not in SPLITS:
                raise DatasetError(f"{path}: example {i} has split {r.get('split')!r}; use one of {SPLITS}")
            splits[r["split"]].append(Example(r["text"], index[lab]))
        train_labels = {e.label for e in splits["train"]}
        for s in ("validation", "test"):
            extra = {names[e.label] for e in splits[s]} - {names[i] for i in train_labels}
            if extra:
                raise DatasetError(f"{path}: label(s) {sorted(extra)} appear in {s} but never in train")
    else:
        held = max(1, int(len(rows) * held_out_fraction))
        if len(rows) < 3 * held:
            raise DatasetError(f"{path}: {len(rows)} examples are too few to split into train/validation/test")
        idx = split_indices(len(rows), held)
        for s, ids in idx.items():
            splits[s] = [Example(rows[i]["text"], index[labels[i]]) for i in ids]
        untrained = sorted(set(names) - {names[e.label] for e in splits["train"]})
        if untrained:
            raise DatasetError(
                f"{path}: label(s) {untrained} fell only into the held-out splits (too few examples of them): add "
                "examples, or give a 'split' column that puts some of each label in train"
            )
    digest = sha256_bytes(path.read_bytes())
    return Dataset(path.stem, names, label_words or default_words(names), template, splits, digest, str(path))
