"""POST's distillation loss (``distill.py`` has the formula): the KL to the teacher's next-token distribution and
the next-token loss computed with their gradient in one pass over the vocabulary, plus the hidden-state cosine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch.nn import functional as F

if TYPE_CHECKING:
    from fedprompt.runtime import Runtime
    from fedprompt.server.post.distill import DistillConfig


@dataclass
class LossParts:
    total: torch.Tensor
    kl: float
    lm: float
    cos: float


class _SoftTargetLoss(torch.autograd.Function):
    """``kl_scale · Σ_rows KL(softmax(t/T) ‖ softmax(s/T)) + lm_scale · Σ_rows CE(s, target)`` for (N, V)
    student logits ``s`` and teacher logits ``t``, with its gradient computed in the same pass.

    Over smollm2's 49,152-word vocabulary every elementwise pass over a (1,024, V) float32 tensor costs
    50-100 ms here (memory-bound), and autograd through two log-softmaxes made about a dozen of them:
    1.1 s per 1,024 tokens, more than the student's forward and backward. Rows are processed a few at a
    time instead, so each chunk stays in cache while the loss and its gradient,
    ``kl_scale·(softmax(s/T) − softmax(t/T))/T + lm_scale·(softmax(s) − onehot(target))``, are computed:
    0.2 s. The backward only scales the stored gradient.
    """

    ROWS = 16

    @staticmethod
    def forward(ctx, s_logits, t_logits, target, has_target, temperature, kl_scale, lm_scale):
        n = s_logits.shape[0]
        grad = torch.empty_like(s_logits)
        kl_rows = torch.empty(n, device=s_logits.device)
        ce_rows = torch.empty(n, device=s_logits.device)
        for i in range(0, n, _SoftTargetLoss.ROWS):
            rows = slice(i, i + _SoftTargetLoss.ROWS)
            s = s_logits[rows].float()
            s_scaled = s / temperature
            lse_t = torch.logsumexp(s_scaled, dim=-1, keepdim=True)
            t_log = torch.log_softmax(t_logits[rows].float() / temperature, dim=-1)
            p = t_log.exp()
            kl_rows[rows] = (p * (t_log - s_scaled)).sum(-1) + lse_t.squeeze(1)
            lse_1 = torch.logsumexp(s, dim=-1, keepdim=True)
            tgt = target[rows].unsqueeze(1)
            ce_rows[rows] = (lse_1.squeeze(1) - s.gather(1, tgt).squeeze(1)) * has_target[rows]
            g = s_scaled.sub_(lse_t).exp_().sub_(p).mul_(kl_scale / temperature)
            q = s.sub_(lse_1).exp_()
            q.scatter_add_(1, tgt, torch.full_like(lse_1, -1.0))
            g.add_(q.mul_((lm_scale * has_target[rows]).unsqueeze(1)))
            grad[rows] = g
        ctx.save_for_backward(grad)
        total = kl_rows.sum() * kl_scale + ce_rows.sum() * lm_scale
        return total, kl_rows, ce_rows

    @staticmethod
    def backward(ctx, grad_total, _grad_kl, _grad_ce):
        (grad,) = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None, None, None, None, None


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    input_ids: torch.Tensor,
    cfg: DistillConfig,
) -> LossParts:
    """POST's distillation loss over every position of a (B, L) batch (see the module docstring): the KL
    averaged over all B·L positions, the next-token loss over the B·(L−1) that have a next token."""
    b, length, _ = student_logits.shape
    t = cfg.temperature
    target = torch.zeros(b, length, dtype=torch.long, device=input_ids.device)
    target[:, :-1] = input_ids[:, 1:]
    has_target = torch.ones(b, length, device=input_ids.device)
    has_target[:, -1] = 0
    n_kl, n_lm = b * length, b * (length - 1)
    total, kl_rows, ce_rows = _SoftTargetLoss.apply(
        student_logits.flatten(0, 1),
        teacher_logits.detach().flatten(0, 1),
        target.flatten(),
        has_target.flatten(),
        t,
        cfg.kl_weight * t * t / n_kl,
        cfg.lm_weight / n_lm,
    )
    cos = (1 - F.cosine_similarity(student_hidden.float(), teacher_hidden.float(), dim=-1)).mean()
    kl = float(kl_rows.detach().sum()) * t * t / n_kl
    lm = float(ce_rows.detach().sum()) / n_lm
    return LossParts(total + cfg.cos_weight * cos, kl, lm, float(cos.detach()))


def forward_with_hidden(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits at every position and the final hidden states (what the loss compares)."""
    out = model(input_ids=ids, output_hidden_states=True, use_cache=False, logits_to_keep=0)
    return out.logits, out.hidden_states[-1]


@torch.no_grad()
def heldout_losses(teacher, student, blocks: torch.Tensor, cfg: DistillConfig, runtime: Runtime) -> dict:
    """Next-token loss of teacher and student, and their KL, on held-out corpus blocks (never trained on)."""
    if len(blocks) == 0:
        return {}
    sums = {"teacher_lm": 0.0, "student_lm": 0.0, "kl": 0.0}
    student.eval()
    for i in range(0, len(blocks), cfg.batch_size):
        ids = blocks[i : i + cfg.batch_size].to(runtime.device)
        with runtime.autocast():
            t_logits, t_h = forward_with_hidden(teacher, ids)
            s_logits, s_h = forward_with_hidden(student, ids)
        parts = distillation_loss(s_logits, t_logits, s_h, t_h, ids, cfg)
        t_lm = F.cross_entropy(t_logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())
        n = len(ids)
        sums["teacher_lm"] += float(t_lm) * n
        sums["student_lm"] += parts.lm * n
        sums["kl"] += parts.kl * n
    return {k: v / len(blocks) for k, v in sums.items()} | {"blocks": len(blocks)}
