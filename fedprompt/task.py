"""Turning examples into model inputs: templates, verbalizers, left-padded batches."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from fedprompt.data.datasets import Example
from fedprompt.errors import ConfigError

SCORINGS = ("sum", "mean")


@dataclass(frozen=True)
class Verbalizer:
    """Label words per class, each a token sequence; a class's score is the log-probability that the model's
    answer is one of the class's words.

    A word's log-probability is that of its whole token sequence after the prompt (``scoring="sum"``, the exact
    probability) or the mean over its tokens (``scoring="mean"``, which does not favour short words); a class
    with several words scores ``logsumexp`` of its words' log-probabilities. When every word is one token,
    one next-token distribution is all it takes (``single_token``); otherwise the words' later tokens ride in
    the same row as the text, after it, each seeing the text and its own earlier tokens only (a block
    attention mask; :meth:`continuation`), so one example is still one row: its loss, and its per-example
    gradient for DP, are exactly those of the example.
    """

    label_words: tuple[tuple[str, ...], ...]
    token_ids: tuple[tuple[tuple[int, ...], ...], ...]  # class -> word -> tokens
    scoring: str = "sum"

    @classmethod
    def build(
        cls,
        tokenizer: PreTrainedTokenizerBase,
        label_words: list[list[str]] | tuple,
        *,
        scoring: str = "sum",
        label_names: list[str] | None = None,
    ) -> Verbalizer:
        names = list(label_names) if label_names else [f"class {i}" for i in range(len(label_words))]
        if scoring not in SCORINGS:
            raise ConfigError(f"label-word scoring must be one of {SCORINGS}, got {scoring!r}")
        if len(label_words) < 2:
            raise ConfigError(f"a verbalizer needs at least 2 classes, got {label_words!r}")
        ids: list[tuple[tuple[int, ...], ...]] = []
        owner: dict[tuple[int, ...], tuple[str, str]] = {}
        for name, words in zip(names, label_words, strict=True):
            if not words:
                raise ConfigError(f"label {name!r} has no label words")
            seqs = []
            for w in words:
                toks = tuple(tokenizer(w, add_special_tokens=False).input_ids)
                if not toks:
                    raise ConfigError(f"label word {w!r} of label {name!r} has no tokens")
                if toks in owner and owner[toks][0] != name:
                    other, other_word = owner[toks]
                    raise ConfigError(
                        f"label word {w!r} of label {name!r} and {other_word!r} of label {other!r} are the same "
                        f"tokens {list(toks)}: the model cannot tell them apart; give one of them other words"
                    )
                owner[toks] = (name, w)
                seqs.append(toks)
            ids.append(tuple(seqs))
        return cls(tuple(tuple(w) for w in label_words), tuple(ids), scoring)

    @classmethod
    def of(cls, tokenizer: PreTrainedTokenizerBase, dataset) -> Verbalizer:
        """The verbalizer of a :class:`~fedprompt.data.datasets.Dataset`: its words, scoring and label names."""
        return cls.build(tokenizer, dataset.label_words, scoring=dataset.scoring, label_names=dataset.label_names)

    @property
    def single_token(self) -> bool:
        """Every word is one token: the next-token logits alone give the exact scores."""
        return all(len(seq) == 1 for words in self.token_ids for seq in words)

    def continuation(self) -> tuple[list[int], list[list[int]]]:
        """The tokens appended after the text, and for each class and word the positions of its tokens' logits.

        Positions count in the kept logits of ``continuation_length() + 1`` last positions: 0 is the answer
        position (the text's last token), ``1 + j`` is the ``j``-th appended token. A word of ``k`` tokens
        appends its first ``k - 1`` tokens; its token ``t`` is read at the position before it.
        """
        appended: list[int] = []
        positions: list[list[int]] = []
        for words in self.token_ids:
            for seq in words:
                start = len(appended)
                appended.extend(seq[:-1])
                positions.append([0] + [1 + start + j for j in range(len(seq) - 1)])
        return appended, positions

    def blocks(self) -> list[int]:
        """The length of each word's appended block, in :meth:`continuation`'s order."""
        return [len(seq) - 1 for words in self.token_ids for seq in words]

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Class scores (B, C) in float32 from logits (B, V) at the answer position (single-token words), or
        (B, 1 + continuation length, V) at the answer position and the appended tokens."""
        if logits.dim() == 2:
            if not self.single_token:
                raise ConfigError("multi-token label words need the logits of their appended tokens too")
            logits = logits[:, None]
        logp = logits.float().log_softmax(dim=-1)
        _, positions = self.continuation()
        word_scores = []
        flat = [seq for words in self.token_ids for seq in words]
        for seq, pos in zip(flat, positions, strict=True):
            targets = torch.tensor(seq, device=logp.device)[None, :, None].expand(logp.shape[0], -1, 1)
            total = logp[:, pos, :].gather(-1, targets).squeeze(-1).sum(dim=-1)
            word_scores.append(total / len(seq) if self.scoring == "mean" else total)
        out, i = [], 0
        for words in self.token_ids:
            out.append(torch.logsumexp(torch.stack(word_scores[i : i + len(words)], dim=-1), dim=-1))
            i += len(words)
        return torch.stack(out, dim=-1)


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
