"""Privacy auditing with one training run (Steinke, Nasr & Jagielski, NeurIPS 2023).

m canaries are each included with probability 1/2. After one training run, the auditor scores every
canary, guesses "included" for the k+ highest scores and "excluded" for the k- lowest, and counts the
correct guesses. Under (epsilon, delta)-DP the number of correct guesses is (nearly) dominated by a
Binomial(r, e^eps / (1 + e^eps)); the largest epsilon whose p-value for the observed count stays below
beta = 0.05 is a lower bound on the true epsilon at 95 % confidence. A correct implementation keeps the
bound below the accountant's epsilon; a broken one (no clipping, no noise, batch gradients passed off as
per-example ones) exceeds it.

The canaries here are white-box *gradient canaries* (Dirac canaries): canary i contributes the gradient
max_grad_norm * e_{j_i} on its own coordinate of the prompt, fed through the real Opacus pipeline
(Poisson sampling, per-example clipping, Gaussian noise) alongside real training examples; its score
is the sum over steps of the released noisy gradient on that coordinate. DP-SGD's guarantee covers
the release of every noisy gradient, so this auditor is within the threat model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from scipy.stats import binom
from tqdm.auto import tqdm

from fedprompt.dp.engine import PrivacyPlan, make_private
from fedprompt.training import Session, TuneConfig


def p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """Probability of at least v correct of r guesses among m canaries under (eps, delta)-DP.

    Steinke et al. 2023, Theorem 5.2 / Algorithm 2: the epsilon-DP Binomial tail plus a delta term.
    """
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    q = 1.0 / (1.0 + math.exp(-eps))
    tail = float(binom.sf(v - 1, r, q))
    alpha, acc = 0.0, 0.0
    for i in range(1, v + 1):
        acc += float(binom.pmf(v - i, r, q))
        alpha = max(alpha, acc / i)
    return min(1.0, tail + alpha * delta * 2 * m)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, beta: float = 0.05) -> float:
    """The largest eps rejected at confidence 1 - beta: a lower bound on the mechanism's epsilon."""
    if p_value(m, r, v, 0.0, delta) > beta:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) <= beta:
        lo, hi = hi, 2 * hi
        if hi > 1e3:
            return math.inf
    for _ in range(50):
        mid = (lo + hi) / 2
        if p_value(m, r, v, mid, delta) <= beta:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass
class AuditResult:
    canaries: int
    guesses: int
    correct: int
    epsilon_lower_bound: float
    delta: float
    confidence: float

    def as_dict(self) -> dict:
        return self.__dict__.copy()


def score_guesses(scores: torch.Tensor, included: torch.Tensor, k: int, delta: float, beta: float) -> AuditResult:
    """Guess 'in' for the k highest scores and 'out' for the k lowest; bound epsilon from the hits."""
    order = torch.argsort(scores, descending=True)
    guessed_in, guessed_out = order[:k], order[-k:]
    correct = int(included[guessed_in].sum()) + int((~included[guessed_out]).sum())
    m = len(scores)
    return AuditResult(m, 2 * k, correct, epsilon_lower_bound(m, 2 * k, correct, delta, beta), delta, 1 - beta)


def audit_dp_sgd(
    session: Session,
    cfg: TuneConfig,
    p: PrivacyPlan,
    *,
    canaries: int,
    guesses_per_side: int,
    beta: float = 0.05,
    seed: int = 0,
    canary_norm: float | None = None,
) -> AuditResult:
    """One DP-SGD run of prompt tuning with gradient canaries; returns the audited epsilon lower bound.

    Each canary's gradient has norm ``canary_norm`` (default: the clipping norm, the strongest canary
    that clipping leaves untouched).
    """
    canary_norm = p.max_grad_norm if canary_norm is None else canary_norm
    gen = torch.Generator().manual_seed(seed)
    initial, _ = session.initial_prompt(cfg)
    prompted = session.prompted(initial)
    weight = prompted.prompt.weight
    if canaries > weight.numel():
        raise ValueError(f"{canaries} canaries need as many prompt coordinates; the prompt has {weight.numel()}")
    coords = torch.randperm(weight.numel(), generator=gen)[:canaries]
    included = torch.rand(canaries, generator=gen) < 0.5
    in_coords = coords[included]
    train = session.encode_split("train")
    sgd = torch.optim.SGD([weight], lr=cfg.lr)
    private = make_private(session, prompted, sgd, train, p, batch_size=cfg.batch_size, steps=cfg.steps)
    scores = torch.zeros(canaries, dtype=torch.float64)
    for _ in tqdm(range(cfg.steps), desc="audit run", unit="step"):
        batch = next(private.batches)
        private.optimizer.zero_grad(set_to_none=True)
        prompted.train()
        if batch["labels"].numel():
            with session.runtime.autocast():
                loss = prompted.classification_loss(batch, session.verbalizer)
            loss.backward()
        else:
            private.on_empty_batch()
        # included canaries join this step's Poisson sample at the same rate as every example
        picked = in_coords[torch.rand(len(in_coords), generator=gen) < p.sample_rate]
        rows = torch.zeros((len(picked), weight.numel()), device=weight.device)
        rows[torch.arange(len(picked)), picked.to(weight.device)] = canary_norm
        weight.grad_sample = torch.cat([weight.grad_sample, rows.view(-1, *weight.shape)])
        private.optimizer.step()
        scores += weight.grad.detach().flatten()[coords.to(weight.device)].double().cpu()
    private.module.remove_hooks()
    return score_guesses(scores, included, guesses_per_side, p.delta, beta)
