"""What every prompt's metadata shares, soft (``artifact.py``) or text (``text_prompt.py``): the task it is tied
to, and the checks its recorded labels and privacy spend must pass."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedprompt.errors import ArtifactError


@dataclass(frozen=True)
class PromptTask:
    """What a prompt is tied to on its model: the task's name, its template, labels and label words, and how the
    words are scored. A :class:`~fedprompt.protocols.rounds.TaskSpec` and a dataset have the same five attributes;
    a prompt's metadata is made from any of them (``ArtifactMeta.create``, ``TextPromptMeta.create``)."""

    name: str
    template: str
    label_names: tuple[str, ...]
    label_words: tuple[tuple[str, ...], ...]
    scoring: str = "sum"


def task_fields(task: PromptTask) -> dict[str, Any]:
    """The fields of a prompt's metadata that say its task, from a PromptTask (or a TaskSpec, or a dataset)."""
    return {
        "task": task.name,
        "template": task.template,
        "label_names": list(task.label_names),
        "label_words": [list(w) for w in task.label_words],
        "scoring": task.scoring,
    }


def check_recorded(label_names: list[str], label_words: list[list[str]], privacy: dict[str, Any] | None) -> None:
    """A prompt's metadata names one list of label words per label, and a private prompt records its spend."""
    if len(label_words) != len(label_names):
        raise ArtifactError("label_words and label_names differ in length")
    if privacy is not None:
        for key in ("epsilon", "delta", "accountant"):
            if key not in privacy:
                raise ArtifactError(f"privacy spend must record {key!r}; got {sorted(privacy)}")
