"""Turning examples into model inputs: templates, verbalizers, left-padded batches."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from fedprompt.datasets import Example
from fedprompt.errors import ConfigError


@dataclass(frozen=True)
class Verbalizer:
    """Label words per class; a class's score is the mean next-token logit of its words' first tokens."""

    label_words: tuple[tuple[str, ...], ...]
    token_ids: tuple[tuple[int, ...], ...]

    @classmethod
    def build(cls, tokenizer: PreTrainedTokenizerBase, label_words: list[list[str]]) -> Verbalizer:
        if len(label_words) < 2:
            raise ConfigError(f"a verbalizer needs at least 2 classes, got {label_words!r}")
        ids = []
        for words in label_words:
            if not words:
                raise ConfigError(f"a class has no label words: {label_words!r}")
            first = []
            for w in words:
                toks = tokenizer(w, add_special_tokens=False).input_ids
                if not toks:
                    raise ConfigError(f"label word {w!r} has no tokens")
                first.append(toks[0])
            ids.append(tuple(first))
        flat = [t for group in ids for t in set(group)]
        if len(flat) != len(set(flat)):
            raise ConfigError(
                f"label words {label_words!r} share a first token between classes; "
                "choose words that start differently (e.g. with a leading space)"
            )
        return cls(tuple(tuple(w) for w in label_words), tuple(ids))

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, V) next-token logits -> (B, C) class scores, in float32."""
        logits = logits.float()
        return torch.stack([logits[:, list(ids)].mean(dim=-1) for ids in self.token_ids], dim=-1)


class TemplateEncoder:
    """Renders ``template`` around each text and tokenizes it, cutting the text (never the template)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, template: str, max_length: int = 128) -> None:
        if "{text}" not in template:
            raise ConfigError(f"template must contain '{{text}}', got {template!r}")
        self.tokenizer = tokenizer
        self.template = template
        self.max_length = max_length
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (tokenizer.eos_token_id or 0)

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer(self.template.format(text=text)).input_ids
        if len(ids) <= self.max_length:
            return ids
        overflow = len(ids) - self.max_length
        text_ids = self.tokenizer(text, add_special_tokens=False).input_ids
        keep = max(1, len(text_ids) - overflow - 2)  # slack for merges at the template boundary
        while True:
            cut = self.tokenizer.decode(text_ids[:keep])
            ids = self.tokenizer(self.template.format(text=cut)).input_ids
            if len(ids) <= self.max_length or keep == 1:
                return ids[-self.max_length :]
            keep = max(1, keep - max(1, len(ids) - self.max_length))

    def batch(self, examples: list[Example], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Left-padded ``input_ids``/``attention_mask`` and ``labels``; the answer is the last position."""
        encoded = [self.encode(e.text) for e in examples]
        return collate(encoded, [e.label for e in examples], self.pad_id, device)


def collate(
    encoded: list[list[int]], labels: list[int], pad_id: int, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    width = max((len(x) for x in encoded), default=1)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, x in enumerate(encoded):
        ids[i, width - len(x) :] = torch.tensor(x)
        mask[i, width - len(x) :] = 1
    return {
        "input_ids": ids.to(device),
        "attention_mask": mask.to(device),
        "labels": torch.tensor(labels, dtype=torch.long, device=device),
    }
