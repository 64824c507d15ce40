"""What an evaluation tells a person: accuracy, per-class accuracy, the confusion matrix, and per-example
predictions with their class scores."""

from __future__ import annotations

import csv
import os
import sys
from pathlib import Path

import torch

from fedprompt.data.datasets import Example
from fedprompt.errors import ConfigError


def confusion(num_classes: int, labels: list[int], predicted: list[int]) -> list[list[int]]:
    """``matrix[true][predicted]`` counts."""
    matrix = [[0] * num_classes for _ in range(num_classes)]
    for y, p in zip(labels, predicted, strict=True):
        matrix[y][p] += 1
    return matrix


def report(
    label_names: list[str],
    examples: list[Example],
    predicted: list[int],
    scores: torch.Tensor,
    *,
    predictions: str | Path | None = None,
    out=None,
) -> dict:
    """The evaluation as a dict (accuracy, per class, confusion matrix); prints the matrix to ``out`` and
    writes the per-example predictions to ``predictions`` (CSV) when given."""
    labels = [e.label for e in examples]
    matrix = confusion(len(label_names), labels, predicted)
    per_class = {}
    for i, name in enumerate(label_names):
        n = sum(matrix[i])
        per_class[name] = {"examples": n, "correct": matrix[i][i], "accuracy": matrix[i][i] / n if n else None}
    correct = sum(matrix[i][i] for i in range(len(label_names)))
    result = {
        "examples": len(examples),
        "accuracy": correct / len(examples),
        "per_class": per_class,
        "confusion": {"rows": "true label", "columns": "predicted label", "labels": label_names, "matrix": matrix},
    }
    print(format_confusion(label_names, matrix), file=out or sys.stderr)
    if predictions is not None:
        result["predictions"] = str(write_predictions(predictions, label_names, examples, predicted, scores))
    return result


def format_confusion(label_names: list[str], matrix: list[list[int]]) -> str:
    width = max(14, *(len(n) for n in label_names))
    corner = "true/predicted"
    head = f"{corner:>{width}} " + " ".join(f"{n[:width]:>{width}}" for n in label_names) + "  accuracy"
    rows = [head]
    for name, row in zip(label_names, matrix, strict=True):
        total = sum(row)
        acc = f"{100 * row[label_names.index(name)] / total:7.1f} %" if total else "      -"
        rows.append(f"{name[:width]:>{width}} " + " ".join(f"{c:>{width}}" for c in row) + f"  {acc}")
    return "\n".join(rows)


def write_predictions(
    path: str | Path, label_names: list[str], examples: list[Example], predicted: list[int], scores: torch.Tensor
) -> Path:
    """One CSV row per example, in the split's order: index, text, label, predicted, correct, a score per class
    (its log-probability under the task's scoring). Written whole or not at all."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"--predictions {path} is a folder; give a file name")
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["index", "text", "label", "predicted", "correct", *[f"score:{n}" for n in label_names]])
            for i, (e, p) in enumerate(zip(examples, predicted, strict=True)):
                row = [f"{float(v):.6g}" for v in scores[i]]
                writer.writerow([i, e.text, label_names[e.label], label_names[p], int(p == e.label), *row])
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ConfigError(f"cannot write predictions to {path}: {exc.strerror or exc}") from exc
    return path
