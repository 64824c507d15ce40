"""A text prompt artifact (DP-OPT's output): an instruction that works on any model, with its privacy spend.

prompt.txt        the instruction, UTF-8, exactly as released
fedprompt.json    kind "text", task, the task template it goes above, label words, the model that wrote it
                  (id + weights hash), the instruction it started from, the privacy spend, the settings

No accuracy on the holder's data is written here: such a number is not covered by the DP guarantee.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedprompt import __version__
from fedprompt.cache import atomic_dir
from fedprompt.errors import ArtifactError
from fedprompt.prompt_meta import PromptTask, check_recorded, task_fields

FORMAT_VERSION = 1
TEXT_FILE = "prompt.txt"
META_FILE = "fedprompt.json"


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass
class TextPromptMeta:
    task: str
    template: str
    label_names: list[str]
    label_words: list[list[str]]
    writer_model_id: str
    writer_model_sha256: str
    initial_instruction: str
    privacy: dict[str, Any] | None  # None: not private
    settings: dict[str, Any] = field(default_factory=dict)
    scoring: str = "sum"  # how multi-token label words are scored (fedprompt.task.Verbalizer)
    text_sha256: str = ""
    kind: str = "text"
    format_version: int = FORMAT_VERSION
    fedprompt_version: str = __version__

    def __post_init__(self) -> None:
        if self.kind != "text":
            raise ArtifactError(f"not a text prompt (kind {self.kind!r})")
        check_recorded(self.label_names, self.label_words, self.privacy)

    @classmethod
    def create(
        cls,
        task: PromptTask,
        writer_model_id: str,
        writer_model_sha256: str,
        *,
        initial_instruction: str,
        privacy: dict[str, Any] | None,
        settings: dict[str, Any] | None = None,
    ) -> TextPromptMeta:
        """The metadata of a new text prompt for ``task`` (a PromptTask, TaskSpec or dataset), written by the model
        ``writer_model_id``: the one way every tool makes it."""
        return cls(
            **task_fields(task),
            writer_model_id=writer_model_id,
            writer_model_sha256=writer_model_sha256,
            initial_instruction=initial_instruction,
            privacy=privacy,
            settings=dict(settings or {}),
        )


def save(folder: str | Path, text: str, meta: TextPromptMeta) -> Path:
    """Write the artifact atomically (an interrupted save leaves no half-written folder)."""
    if not text.strip():
        raise ArtifactError("refusing to save an empty text prompt")
    meta.text_sha256 = text_sha256(text)
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        (tmp / TEXT_FILE).write_text(text, encoding="utf-8")
        (tmp / META_FILE).write_text(json.dumps(asdict(meta), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return folder


def load(folder: str | Path) -> tuple[str, TextPromptMeta]:
    folder = Path(folder)
    try:
        text = (folder / TEXT_FILE).read_text(encoding="utf-8")
        raw = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ArtifactError(f"{folder} is not a text prompt artifact: {exc.filename} is missing") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{folder}: unreadable text prompt artifact: {exc}") from exc
    if raw.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{folder}: unsupported format_version {raw.get('format_version')!r}")
    try:
        meta = TextPromptMeta(**raw)
    except TypeError as exc:
        raise ArtifactError(f"{folder}: malformed {META_FILE}: {exc}") from exc
    if meta.text_sha256 != text_sha256(text):
        raise ArtifactError(f"{folder}: {TEXT_FILE} does not match the hash recorded in {META_FILE}")
    return text, meta


def is_text_prompt(folder: str | Path) -> bool:
    return (Path(folder) / TEXT_FILE).is_file()
