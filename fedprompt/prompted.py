"""A frozen Hugging Face causal LM with a soft prompt in front of its input embeddings."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from transformers import PreTrainedModel

from fedprompt.prompt import SoftPrompt
from fedprompt.task import Verbalizer


class PromptedLM(nn.Module):
    """Prepends a :class:`SoftPrompt` (or nothing, for the zero-shot model) to a frozen causal LM.

    The base model never trains: its parameters do not require gradients and it stays in eval mode,
    unless ``base_dropout`` is set, which keeps its dropout layers active while tuning (the DP engine
    supports that; a vmap-based per-example gradient would not).

    Inputs are left-padded, so the answer position is the last one; the prompt goes first,
    ``[prompt; pads; text]``, with position ids counted over real tokens only so that padding never
    shifts where the text sits relative to the prompt.
    """

    def __init__(self, model: PreTrainedModel, prompt: SoftPrompt | None, *, base_dropout: bool = False) -> None:
        super().__init__()
        model.requires_grad_(False)
        self.model = model
        self.prompt = prompt
        self.base_dropout = base_dropout
        self.train(False)

    def train(self, mode: bool = True) -> PromptedLM:
        super().train(mode)
        self.model.train(mode and self.base_dropout)
        return self

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        logits_to_keep: int = 1,
        appended: tuple[list[int], list[int]] | None = None,
    ) -> torch.Tensor:
        """Logits of the last ``logits_to_keep`` positions (0 = all), shape (B, k, V).

        ``appended`` = (tokens, block lengths) puts the same tokens after every row's text in blocks (a
        multi-token label word's continuation each); a block sees the prompt, the row's real tokens and its own
        earlier tokens, and its positions continue the text's, so each block is scored as if it alone followed
        the text.
        """
        embeds = self.model.get_input_embeddings()(input_ids)
        n = self.prompt.num_virtual_tokens if self.prompt is not None else 0
        if self.prompt is not None:
            embeds = self.prompt(embeds)
            ones = attention_mask.new_ones(attention_mask.shape[0], n)
            attention_mask = torch.cat([ones, attention_mask], dim=1)
        position_ids = (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)
        mask: torch.Tensor = attention_mask
        if appended is not None and appended[0]:
            tokens, blocks = appended
            extra = torch.tensor(tokens, dtype=input_ids.dtype, device=input_ids.device).expand(len(input_ids), -1)
            embeds = torch.cat([embeds, self.model.get_input_embeddings()(extra).to(embeds.dtype)], dim=1)
            position_ids = torch.cat([position_ids, _block_positions(attention_mask, blocks)], dim=1)
            mask = _block_mask(attention_mask, blocks, embeds.dtype)
        out = self.model(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=position_ids,
            logits_to_keep=logits_to_keep,
            use_cache=False,
        )
        return out.logits

    def class_scores(self, batch: dict[str, torch.Tensor], verbalizer: Verbalizer) -> torch.Tensor:
        if verbalizer.single_token:
            logits = self(batch["input_ids"], batch["attention_mask"], logits_to_keep=1)[:, -1]
            return verbalizer.scores(logits)
        tokens, _ = verbalizer.continuation()
        logits = self(
            batch["input_ids"],
            batch["attention_mask"],
            logits_to_keep=len(tokens) + 1,
            appended=(tokens, verbalizer.blocks()),
        )
        return verbalizer.scores(logits)

    def classification_loss(
        self,
        batch: dict[str, torch.Tensor],
        verbalizer: Verbalizer,
        reduction: str = "mean",
        *,
        logit_offsets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Cross-entropy of the class scores; ``logit_offsets`` (one per class, a constant) are added first.

        With the log of the training data's label prior as offsets this is the logit-adjusted loss (Menon et
        al. 2021): the scores it trains are those of a classifier with a uniform prior, so holders with opposite
        label skews pull the shared prompt towards one balanced classifier instead of towards their own priors.
        """
        scores = self.class_scores(batch, verbalizer)
        if logit_offsets is not None:
            scores = scores + logit_offsets.to(scores.device, scores.dtype)
        return F.cross_entropy(scores, batch["labels"], reduction=reduction)

    def lm_loss(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        reduction: str = "mean",
    ) -> torch.Tensor:
        """Next-token loss for generation tasks; ``labels`` is -100 where no loss is wanted.

        With ``reduction="none"`` it returns one loss per example (mean over its labelled tokens).
        """
        logits = self(input_ids, attention_mask, logits_to_keep=0)
        n = self.prompt.num_virtual_tokens if self.prompt is not None else 0
        logits = logits[:, n:-1].float()
        target = labels[:, 1:]
        tok = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="none")
        valid = (target != -100).float()
        per_example = (tok * valid).sum(-1) / valid.sum(-1).clamp(min=1)
        if reduction == "none":
            return per_example
        return per_example.mean() if reduction == "mean" else per_example.sum()


def _block_positions(context_mask: torch.Tensor, blocks: list[int]) -> torch.Tensor:
    """Positions of the appended blocks: each continues from the end of its row's real tokens."""
    end = context_mask.sum(dim=-1, keepdim=True)
    offsets = torch.cat([torch.arange(b, device=context_mask.device) for b in blocks if b])
    return end + offsets[None, :]


def _block_mask(context_mask: torch.Tensor, blocks: list[int], dtype: torch.dtype) -> torch.Tensor:
    """The (B, 1, T, T) additive mask: causal over the real tokens of ``[prompt; pads; text]``, and each
    appended block attending to those and to its own earlier tokens (never to another block)."""
    rows, width = context_mask.shape
    k = sum(blocks)
    total = width + k
    device = context_mask.device
    allowed = torch.tril(torch.ones(total, total, dtype=torch.bool, device=device))
    allowed[width:, width:] = False
    start = width
    for b in blocks:
        allowed[start : start + b, start : start + b] = torch.tril(torch.ones(b, b, dtype=torch.bool, device=device))
        start += b
    real = torch.cat([context_mask.bool(), context_mask.new_ones(rows, k, dtype=torch.bool)], dim=1)
    allowed = allowed[None] & real[:, None, :]
    allowed |= torch.eye(total, dtype=torch.bool, device=device)[None]  # a pad row attends to itself, never NaN
    mask = torch.zeros(rows, 1, total, total, dtype=dtype, device=device)
    return mask.masked_fill(~allowed[:, None], torch.finfo(dtype).min)
