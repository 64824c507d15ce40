"""The prompt artifact: a folder stock PEFT loads, plus ``fedprompt.json`` with provenance and privacy spend.

adapter_config.json         PEFT PromptTuningConfig (written by PEFT itself)
adapter_model.safetensors   {"prompt_embeddings": (n, d) float32}
fedprompt.json              task, template, label words, base model id + weights hash,
                            origin id, prompt hash, privacy spend (or "non-private")
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PromptTuningConfig, TaskType
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fedprompt import __version__
from fedprompt.cache import atomic_dir
from fedprompt.errors import ArtifactError
from fedprompt.models.zoo import LoadedModel
from fedprompt.prompt import prompt_sha256
from fedprompt.prompt_meta import PromptTask, check_recorded, task_fields

FORMAT_VERSION = 1
WEIGHTS_FILE = "adapter_model.safetensors"
META_FILE = "fedprompt.json"


@dataclass
class ArtifactMeta:
    """Everything a receiver needs to use a prompt correctly and to know what it cost in privacy."""

    task: str
    template: str
    label_names: list[str]
    label_words: list[list[str]]
    base_model_id: str
    base_model_sha256: str
    origin_id: str
    init: dict[str, Any]
    # None for a non-private prompt; otherwise epsilon, delta, accountant, mechanism and its settings.
    privacy: dict[str, Any] | None = None
    training: dict[str, Any] = field(default_factory=dict)
    lineage: dict[str, Any] = field(default_factory=dict)
    scoring: str = "sum"  # how multi-token label words are scored (fedprompt.task.Verbalizer)
    prompt_sha256: str = ""
    format_version: int = FORMAT_VERSION
    fedprompt_version: str = __version__

    def __post_init__(self) -> None:
        check_recorded(self.label_names, self.label_words, self.privacy)

    @classmethod
    def create(
        cls,
        task: PromptTask,
        model_id: str,
        model_sha256: str,
        *,
        origin_id: str,
        init: dict[str, Any],
        privacy: dict[str, Any] | None = None,
        training: dict[str, Any] | None = None,
        lineage: dict[str, Any] | None = None,
    ) -> ArtifactMeta:
        """The metadata of a new prompt for ``task`` on model ``model_id`` (weights hash ``model_sha256``): the one
        way every tool makes it (:meth:`from_record` reads a stored one back)."""
        return cls(
            **task_fields(task),
            base_model_id=model_id,
            base_model_sha256=model_sha256,
            origin_id=origin_id,
            init=dict(init),
            privacy=privacy,
            training=dict(training or {}),
            lineage=dict(lineage or {}),
        )

    @classmethod
    def from_record(cls, raw: dict[str, Any], *, ignore_unknown: bool = False) -> ArtifactMeta:
        """Stored metadata (``fedprompt.json``, a registry version's) back as an ArtifactMeta; ArtifactError when
        it is not one. ``ignore_unknown``: drop keys that are not fields (a registry version records more)."""
        if not isinstance(raw, dict):
            raise ArtifactError(f"artifact metadata is a JSON object, got {type(raw).__name__}")
        if ignore_unknown:
            raw = {k: v for k, v in raw.items() if k in cls.__dataclass_fields__}
        try:
            return cls(**raw)
        except TypeError as exc:
            raise ArtifactError(f"not prompt-artifact metadata: {exc}") from exc

    @property
    def prompt_task(self) -> PromptTask:
        words = tuple(tuple(w) for w in self.label_words)
        return PromptTask(self.task, self.template, tuple(self.label_names), words, self.scoring)


def save(folder: str | Path, weight: torch.Tensor, meta: ArtifactMeta) -> Path:
    """Write the artifact atomically: an interrupted save leaves the previous folder (or none)."""
    folder = Path(folder)
    w = weight.detach().to("cpu", torch.float32).contiguous()
    meta.prompt_sha256 = prompt_sha256(w)
    config = PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        num_virtual_tokens=w.shape[0],
        token_dim=w.shape[1],
        num_transformer_submodules=1,
        base_model_name_or_path=meta.base_model_id,
    )
    with atomic_dir(folder) as scratch:
        config.save_pretrained(str(scratch))
        save_file({"prompt_embeddings": w}, str(scratch / WEIGHTS_FILE))
        (scratch / META_FILE).write_text(json.dumps(asdict(meta), indent=2, sort_keys=True) + "\n")
        (scratch / "README.md").write_text(readme(meta, w.shape[0]), encoding="utf-8")
    return folder


def readme(meta: ArtifactMeta, num_virtual_tokens: int) -> str:
    """How to use the prompt without fedprompt: the base model's folder, stock PEFT, the template and scoring."""
    privacy = (
        f"differentially private: epsilon = {meta.privacy['epsilon']:.3g}, delta = {meta.privacy['delta']:.3g} "
        f"({meta.privacy['accountant']})"
        if meta.privacy
        else "not private"
    )
    words = "\n".join(
        f"- `{name}`: {', '.join(repr(w) for w in ws)}"
        for name, ws in zip(meta.label_names, meta.label_words, strict=True)
    )
    return f"""# Soft prompt for {meta.task}

A prompt-tuning adapter ({num_virtual_tokens} virtual tokens) for the frozen model `{meta.base_model_id}` (weights
SHA-256 `{meta.base_model_sha256}`); {privacy}. `fedprompt.json` records everything below.

## Load it with stock transformers and PEFT

`adapter_config.json` names the base model by its fedprompt name. Its folder (a plain Hugging Face model
folder, safetensors weights) is printed by `fedprompt models path {meta.base_model_id}`:

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base_folder = "..."  # the output of: fedprompt models path {meta.base_model_id}
tokenizer = AutoTokenizer.from_pretrained(base_folder)
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_folder), "<this folder>").eval()
```

## Classify with it

Put each text in the template {meta.template!r} (no special tokens are added by the template itself; the
tokenizer's own are kept). A label's score is the log-probability that the model's answer is one of its words,
each word scored over all of its tokens ({"summed" if meta.scoring == "sum" else "averaged per token"}), the
words of one label combined with logsumexp; the prediction is the label with the highest score. Label words:

{words}
"""


def load(folder: str | Path) -> tuple[torch.Tensor, ArtifactMeta]:
    folder = Path(folder)
    for name in (WEIGHTS_FILE, META_FILE, "adapter_config.json"):
        if not (folder / name).is_file():
            raise ArtifactError(f"{folder} is not a prompt artifact: {name} is missing")
    try:
        meta = ArtifactMeta.from_record(json.loads((folder / META_FILE).read_text(encoding="utf-8")))
    except (json.JSONDecodeError, ArtifactError, UnicodeDecodeError, RecursionError) as exc:
        raise ArtifactError(f"{folder / META_FILE}: malformed ({type(exc).__name__}: {str(exc)[:200]})") from exc
    if meta.format_version > FORMAT_VERSION:
        raise ArtifactError(f"{folder}: format version {meta.format_version} is newer than this fedprompt")
    try:
        tensors = load_file(str(folder / WEIGHTS_FILE))
    except (SafetensorError, OSError) as exc:
        raise ArtifactError(f"{folder / WEIGHTS_FILE}: not a readable safetensors file ({exc})") from exc
    if set(tensors) != {"prompt_embeddings"}:
        raise ArtifactError(f"{folder / WEIGHTS_FILE}: expected one tensor 'prompt_embeddings', got {sorted(tensors)}")
    weight = tensors["prompt_embeddings"]
    if weight.dim() != 2 or not torch.isfinite(weight).all():
        raise ArtifactError(f"{folder}: the prompt must be a finite 2-D tensor, got shape {tuple(weight.shape)}")
    if prompt_sha256(weight) != meta.prompt_sha256:
        raise ArtifactError(f"{folder}: prompt weights do not match the hash recorded in {META_FILE}")
    return weight, meta


def check_base_model(meta: ArtifactMeta, weight: torch.Tensor, loaded: LoadedModel) -> None:
    """Refuse to put a prompt on a model other than the one it was tuned for."""
    if meta.base_model_sha256 != loaded.weights_sha256:
        raise ArtifactError(
            f"this prompt was tuned on {meta.base_model_id} (weights {meta.base_model_sha256[:12]}), "
            f"not on {loaded.model_id} (weights {loaded.weights_sha256[:12]}); "
            "transfer it (fedprompt post transfer) instead of loading it"
        )
    if weight.shape[1] != loaded.hidden_size:
        raise ArtifactError(f"prompt width {weight.shape[1]} != model hidden size {loaded.hidden_size}")
