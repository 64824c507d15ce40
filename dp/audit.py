"""Auditing fedprompt's DP-SGD with many gradient canaries: a lower bound on ε that a broken mechanism exceeds.

Each canary is a *Dirac gradient canary* on a coordinate of its own: an example whose per-example gradient is
``max_grad_norm`` on that coordinate and zero elsewhere (the strongest canary clipping lets through). Half of the
canaries are included, half are not; they go through the real pipeline beside real examples (Opacus's
per-example clipping, its Gaussian noise from an OS-seeded generator, fedprompt's Poisson sampler), and a
canary's score is the sum over the steps of the released noisy gradient on its coordinate, in units of the noise
the *claimed* mechanism adds (the auditor knows only the claim). Coordinates are distinct and the noise is
independent across them, so each canary is a separate membership test of the mechanism.

Any (ε, δ)-DP mechanism gives, for every test, TPR ≤ e^ε · FPR + δ. For each threshold of a fixed grid (chosen
before the run), the audit bounds TPR from below and FPR from above (Clopper–Pearson, a union bound over the grid
and both rates at level ``beta``) and reports the largest ε = ln((TPR_lo − δ) / FPR_hi): with probability at
least 1 − beta a correct mechanism's bound stays at or below its true ε. (The rates pool canaries whose scores
also carry the real examples' gradients on their coordinates; a pooled count of independent, not identically
distributed, trials is at least as concentrated as a binomial one (Hoeffding 1956), so the intervals stay valid.)

Why not a one-run audit (Steinke, Nasr and Jagielski 2023), as before: with 200 guesses its bound cannot exceed
about 4 at the deployment's δ, below the ε = 8 it was meant to check, so it could not fail. Here the ceiling, the
bound a perfect separation would give, is reported and must exceed the claim for the audit to mean anything.
With a full batch (sample rate 1) the mechanism is exactly Gaussian and the threshold test is close to optimal
for it, which is where a lower bound is tightest; ``benchmarks/privacy_audit.py`` measures how often the audit
catches a mechanism whose true ε is twice the claimed one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy.stats import beta as beta_dist
from tqdm.auto import tqdm

from fedprompt.dp.engine import PrivacyPlan, make_private
from fedprompt.training import Session
from fedprompt.tuning_settings import TuneConfig

THRESHOLDS = tuple(float(t) for t in np.linspace(1.0, 5.0, 17))  # in units of the claimed noise, fixed in advance


def rate_interval(hits: int, trials: int, alpha: float) -> tuple[float, float]:
    """Clopper–Pearson bounds on a rate: P(rate < low) ≤ alpha and P(rate > high) ≤ alpha."""
    low = 0.0 if hits == 0 else float(beta_dist.ppf(alpha, hits, trials - hits + 1))
    high = 1.0 if hits == trials else float(beta_dist.ppf(1 - alpha, hits + 1, trials - hits))
    return low, high


def epsilon_lower_bound(
    included: np.ndarray, excluded: np.ndarray, delta: float, *, beta: float = 0.05, thresholds=THRESHOLDS
) -> tuple[float, float]:
    """(ε lower bound, the threshold that gave it) from the scores of included and excluded canaries."""
    alpha = beta / (2 * len(thresholds))
    best, at = 0.0, math.nan
    for tau in thresholds:
        tpr_low, _ = rate_interval(int((included > tau).sum()), len(included), alpha)
        _, fpr_high = rate_interval(int((excluded > tau).sum()), len(excluded), alpha)
        if tpr_low - delta > 0:
            eps = math.log((tpr_low - delta) / fpr_high)
            if eps > best:
                best, at = eps, tau
    return best, at


def ceiling(canaries_per_side: int, delta: float, *, beta: float = 0.05, thresholds=THRESHOLDS) -> float:
    """The largest bound ``canaries_per_side`` canaries a side can give: every included canary above every
    threshold and no excluded one. A claim above this cannot be caught, however broken the mechanism."""
    alpha = beta / (2 * len(thresholds))
    tpr_low, _ = rate_interval(canaries_per_side, canaries_per_side, alpha)
    _, fpr_high = rate_interval(0, canaries_per_side, alpha)
    return math.log((tpr_low - delta) / fpr_high)


@dataclass
class AuditResult:
    canaries_per_side: int
    runs: int
    epsilon_lower_bound: float
    threshold: float
    ceiling: float
    claimed_epsilon: float
    delta: float
    confidence: float

    def as_dict(self) -> dict:
        return asdict(self)


def canary_scores(
    session: Session, cfg: TuneConfig, p: PrivacyPlan, *, claimed_noise_multiplier: float, generator: torch.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One DP-SGD run of ``cfg.steps`` steps under ``p`` with one canary per prompt coordinate, half included.
    Returns the included and the excluded canaries' scores, in units of the claimed mechanism's noise."""
    initial, _ = session.initial_prompt(cfg)
    prompted = session.prompted(initial)
    weight = prompted.prompt.weight
    coords = torch.randperm(weight.numel(), generator=generator)
    half = weight.numel() // 2
    inside, outside = coords[:half], coords[half : 2 * half]
    train = session.encode_split("train")
    sgd = torch.optim.SGD([weight], lr=cfg.lr)
    private = make_private(session, prompted, sgd, train, p, batch_size=cfg.batch_size, steps=cfg.steps)
    total = torch.zeros(weight.numel(), dtype=torch.float64)
    canary = p.max_grad_norm
    try:
        for _ in range(cfg.steps):
            batch = next(private.batches)
            private.optimizer.zero_grad(set_to_none=True)
            prompted.train()
            if batch["labels"].numel():
                with session.runtime.autocast():
                    loss = prompted.classification_loss(batch, session.verbalizer)
                loss.backward()
            else:
                private.on_empty_batch()
            # the included canaries join this step's Poisson sample at the rate every example does
            picked = inside[torch.rand(len(inside), generator=generator) < p.sample_rate]
            rows = torch.zeros((len(picked), weight.numel()), device=weight.device)
            rows[torch.arange(len(picked)), picked.to(weight.device)] = canary
            weight.grad_sample = torch.cat([weight.grad_sample, rows.view(-1, *weight.shape)])
            private.optimizer.step()
            total += weight.grad.detach().flatten().double().cpu()
    finally:
        private.module.remove_hooks()
    # p.grad = (sum of clipped rows + N(0, (σC)²)) / expected batch: the claimed noise of the sum over the steps
    unit = claimed_noise_multiplier * canary * math.sqrt(cfg.steps) / private.optimizer.expected_batch_size
    return (total[inside] / unit).numpy(), (total[outside] / unit).numpy()


def audit_dp_sgd(
    session: Session,
    cfg: TuneConfig,
    p: PrivacyPlan,
    *,
    claimed: PrivacyPlan,
    canaries_per_side: int,
    beta: float = 0.05,
    seed: int = 0,
) -> AuditResult:
    """Audit the mechanism that runs with ``p`` against the ``claimed`` plan (its σ and ε): as many runs as it
    takes to collect ``canaries_per_side`` included and excluded canaries. ``p`` equal to ``claimed`` audits the
    real mechanism; a ``p`` with less noise is a deliberately broken one the audit must catch."""
    generator = torch.Generator().manual_seed(seed)  # the canaries' placement: public, unlike the DP noise
    per_run = session.prompted(session.initial_prompt(cfg)[0]).prompt.weight.numel() // 2
    runs = math.ceil(canaries_per_side / per_run)
    included, excluded = [], []
    for _ in tqdm(range(runs), desc="audit runs", unit="run"):
        i, o = canary_scores(session, cfg, p, claimed_noise_multiplier=claimed.noise_multiplier, generator=generator)
        included.append(i)
        excluded.append(o)
    inc, exc = np.concatenate(included)[:canaries_per_side], np.concatenate(excluded)[:canaries_per_side]
    bound, at = epsilon_lower_bound(inc, exc, claimed.delta, beta=beta)
    return AuditResult(
        canaries_per_side=len(inc),
        runs=runs,
        epsilon_lower_bound=bound,
        threshold=at,
        ceiling=ceiling(len(inc), claimed.delta, beta=beta),
        claimed_epsilon=claimed.epsilon,
        delta=claimed.delta,
        confidence=1 - beta,
    )
