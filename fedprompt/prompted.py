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
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, logits_to_keep: int = 1
    ) -> torch.Tensor:
        """Logits of the last ``logits_to_keep`` positions (0 = all), shape (B, k, V)."""
        embeds = self.model.get_input_embeddings()(input_ids)
        if self.prompt is not None:
            embeds = self.prompt(embeds)
            ones = attention_mask.new_ones(attention_mask.shape[0], self.prompt.num_virtual_tokens)
            attention_mask = torch.cat([ones, attention_mask], dim=1)
        position_ids = (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)
        out = self.model(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            logits_to_keep=logits_to_keep,
            use_cache=False,
        )
        return out.logits

    def class_scores(self, batch: dict[str, torch.Tensor], verbalizer: Verbalizer) -> torch.Tensor:
        logits = self(batch["input_ids"], batch["attention_mask"], logits_to_keep=1)[:, -1]
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
