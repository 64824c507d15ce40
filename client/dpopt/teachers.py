"""DP-OPT's teachers: J in-context learners over one shared head, one batched forward per token."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch

from fedprompt.errors import ConfigError
from fedprompt.models.zoo import LoadedModel
from fedprompt.runtime import Runtime


class TeacherEnsemble:
    """J in-context learners that share a head: one batched forward per token.

    With ``reuse_head`` the head's keys and values are computed once and every batch attends to them;
    each teacher's own tokens follow, left-padded inside their block, with position ids counted over real
    tokens. Without it every forward recomputes the whole meta-prompt (the benchmark's baseline); both give
    the same logits (a test holds them to it).
    """

    def __init__(
        self,
        loaded: LoadedModel,
        runtime: Runtime,
        head_ids: list[int],
        *,
        reuse_head: bool = True,
        batch_size: int = 64,
    ) -> None:
        if not head_ids:
            raise ConfigError("the shared head is empty")
        self.model = loaded.model
        self.runtime = runtime
        self.head_ids = list(head_ids)
        self.batch_size = batch_size
        pad = loaded.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (loaded.tokenizer.eos_token_id or 0)
        self._head_cache = None
        if reuse_head:
            with torch.inference_mode(), runtime.autocast():
                ids = torch.tensor([self.head_ids], device=runtime.device)
                self._head_cache = self.model(input_ids=ids, use_cache=True, logits_to_keep=1).cache

    @torch.inference_mode()
    def next_token_logits(self, bodies: Sequence[Sequence[int]]) -> torch.Tensor:
        """(J, V) float32 logits of the next token after ``head + body`` for each teacher's body."""
        if not bodies or any(len(b) == 0 for b in bodies):
            raise ConfigError("every teacher needs a non-empty body")
        # batches of similar lengths waste little on padding
        order = sorted(range(len(bodies)), key=lambda i: len(bodies[i]))
        logits = torch.empty(0)
        for s in range(0, len(order), self.batch_size):
            idx = order[s : s + self.batch_size]
            part = self._forward([bodies[i] for i in idx])
            if logits.numel() == 0:
                logits = part.new_empty((len(bodies), part.shape[-1]))
            logits[idx] = part
        return logits

    def _left_padded(self, seqs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, width - len(s) :] = torch.tensor(list(s))
            mask[i, width - len(s) :] = 1
        return ids.to(self.runtime.device), mask.to(self.runtime.device)

    def _forward(self, bodies: Sequence[Sequence[int]]) -> torch.Tensor:
        kw: dict = {}
        if self._head_cache is None:
            ids, mask = self._left_padded([self.head_ids + list(b) for b in bodies])
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
            kw["use_cache"] = False
        else:
            ids, body_mask = self._left_padded(bodies)
            head = len(self.head_ids)
            mask = torch.cat([body_mask.new_ones(len(bodies), head), body_mask], dim=1)
            position_ids = (head + body_mask.cumsum(-1) - 1).clamp(min=head)
            cache = copy.deepcopy(self._head_cache)
            cache.batch_repeat_interleave(len(bodies))
            kw.update(cache=cache, use_cache=True)
        with self.runtime.autocast():
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids, logits_to_keep=1, **kw)
        return out.logits[:, -1].float()
