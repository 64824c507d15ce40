"""The soft prompt: n virtual tokens x hidden size, prepended to a frozen model's input embeddings."""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from fedprompt.errors import ConfigError


class SoftPrompt(nn.Module):
    """A trainable (n, d) prompt; ``forward`` prepends it to every sequence of a batch of embeddings.

    Taking the input embeddings as the module's input (rather than producing the prompt from nothing)
    is what lets the DP engine compute exact per-example gradients: the gradient reaching this
    module's output has a batch dimension, and its first n positions of example i are exactly
    example i's gradient of the prompt (see ``fedprompt.dp.grad_sample``).
    """

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        if weight.dim() != 2:
            raise ConfigError(f"a soft prompt is (num_virtual_tokens, hidden_size), got shape {tuple(weight.shape)}")
        self.weight = nn.Parameter(weight.detach().clone().float())

    @property
    def num_virtual_tokens(self) -> int:
        return self.weight.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.weight.shape[1]

    def forward(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        batch = inputs_embeds.shape[0]
        prompt = self.weight.to(inputs_embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
        return torch.cat([prompt, inputs_embeds], dim=1)


def _tile(rows: torch.Tensor, n: int) -> torch.Tensor:
    reps = -(-n // rows.shape[0])
    return rows.repeat(reps, 1)[:n].clone()


def init_from_vocab(embeddings: torch.Tensor, n: int, *, seed: int = 0, max_token_id: int = 5000) -> torch.Tensor:
    """Rows of the vocabulary embeddings of random token ids below ``max_token_id`` (frequent tokens)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, min(max_token_id, embeddings.shape[0]), (n,), generator=gen)
    return embeddings[ids.to(embeddings.device)].detach().float().cpu().clone()


def init_from_token_ids(embeddings: torch.Tensor, token_ids: list[int], n: int) -> torch.Tensor:
    """Embeddings of the given tokens, tiled (or cut) to n rows: used for a text or the label words."""
    if not token_ids:
        raise ConfigError("the initialisation text has no tokens")
    ids = torch.tensor(token_ids, device=embeddings.device)
    return _tile(embeddings[ids].detach().float().cpu(), n)


def prompt_sha256(weight: torch.Tensor) -> str:
    t = weight.detach().to("cpu", torch.float32).contiguous()
    digest = hashlib.sha256(f"{tuple(t.shape)}".encode())
    digest.update(t.numpy().tobytes())
    return digest.hexdigest()


def origin_id(initial: torch.Tensor) -> str:
    """Identity of a prompt's initialisation: task prompt vectors may only be combined at equal origins."""
    return prompt_sha256(initial)[:16]
