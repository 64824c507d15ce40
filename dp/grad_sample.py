"""Exact per-example gradients of the soft prompt, from one ordinary backward pass.

Stock PEFT prompt tuning builds the prompt once and repeats it over the batch, so Opacus sees a
batch of one and reports the *batch* gradient as if it were per-example (a trap found on this project):
clipping then bounds the batch sum, not each example, and the reported epsilon is meaningless.

fedprompt's :class:`~fedprompt.prompt.SoftPrompt` takes the input embeddings as its input and
returns ``[prompt; embeddings]`` per example. The gradient Opacus captures at its output has a batch
dimension, and its first ``n`` positions for example ``i`` are exactly example ``i``'s gradient of
the prompt (the prompt enters example ``i``'s sequence and no other). Registering that as the
grad sampler of ``SoftPrompt`` makes Opacus's own clipping, noise and accounting correct, with no
vmap (which fails with dropout active) and no cost beyond the ordinary backward pass.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from opacus.grad_sample import register_grad_sampler
from torch import nn

from fedprompt.prompt import SoftPrompt

# The prompt's input (the frozen embeddings) never requires grad, so torch notes that Opacus's full backward
# hook on SoftPrompt sees gradients of the module's *output*: exactly what this grad sampler reads.
warnings.filterwarnings(
    "ignore", message="Full backward hook is firing when gradients are computed with respect to module outputs"
)


@register_grad_sampler(SoftPrompt)
def soft_prompt_grad_sampler(
    layer: SoftPrompt, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    n = layer.num_virtual_tokens
    return {layer.weight: backprops[:, :n, :].to(layer.weight.dtype)}


def reference_per_example_grads(
    param: torch.Tensor, loss_of: Callable[[int], torch.Tensor], batch_size: int
) -> torch.Tensor:
    """Per-example gradients the slow, obviously correct way: one backward pass per example.

    ``loss_of(i)`` must compute example ``i``'s loss alone. Used to check the fast path.
    """
    grads = []
    for i in range(batch_size):
        (g,) = torch.autograd.grad(loss_of(i), param)
        grads.append(g.detach().clone())
    return torch.stack(grads)


def max_abs_difference(per_example: torch.Tensor | None, reference: torch.Tensor) -> float:
    """How far a claimed per-example gradient is from the reference; inf if the shapes differ.

    A pipeline that returns a batch gradient in place of per-example ones (shape (1, n, d) or a
    wrong value) fails this check however it is dressed up.
    """
    if per_example is None or per_example.shape != reference.shape:
        return float("inf")
    return float((per_example.to(reference.dtype) - reference).abs().max())
