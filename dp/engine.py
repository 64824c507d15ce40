"""DP-SGD prompt tuning: Opacus's PrivacyEngine over fedprompt's SoftPrompt (exact per-example gradients)."""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from opacus import PrivacyEngine
from opacus.optimizers import DPOptimizer
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch.utils.data import DataLoader

from fedprompt.dp import grad_sample as _grad_sample  # noqa: F401  (registers the SoftPrompt grad sampler)
from fedprompt.dp.accounting import DEFAULT_ACCOUNTANT, calibrate_noise, check_accountant, epsilon
from fedprompt.dp.secure_rng import SecureNoiseDPOptimizer, SecurePoissonSampler
from fedprompt.errors import ConfigError
from fedprompt.prompt import origin_id
from fedprompt.prompted import PromptedLM
from fedprompt.training import Session, TuneResult, make_optimizer, run_steps
from fedprompt.tuning_settings import TuneConfig

MECHANISM = "dp-sgd"


@dataclass
class DPConfig:
    """Privacy settings of one DP-SGD run, with Opacus's names.

    Give either ``target_epsilon`` (the noise multiplier is calibrated to reach it after the run's
    steps) or ``noise_multiplier``. ``delta=None`` means 1/(2n) for the n training examples.
    """

    target_epsilon: float | None = None
    delta: float | None = None
    max_grad_norm: float = 1.0
    noise_multiplier: float | None = None
    accountant: str = DEFAULT_ACCOUNTANT
    secure_mode: bool = False

    def __post_init__(self) -> None:
        if (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise ConfigError("give exactly one of target_epsilon and noise_multiplier")
        if self.target_epsilon is not None and not (math.isfinite(self.target_epsilon) and self.target_epsilon > 0):
            raise ConfigError(f"target_epsilon must be a positive finite number, got {self.target_epsilon!r}")
        if self.noise_multiplier is not None and not (
            math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0
        ):
            raise ConfigError(f"noise_multiplier must be positive and finite, got {self.noise_multiplier!r}")
        if self.delta is not None and not 0 < self.delta < 1:
            raise ConfigError(f"delta must be in (0, 1), got {self.delta!r}")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ConfigError(f"max_grad_norm must be positive and finite, got {self.max_grad_norm!r}")
        check_accountant(self.accountant)


@dataclass(frozen=True)
class PrivacyPlan:
    """What a run will spend, fixed before it touches the data."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    epsilon: float
    accountant: str
    max_grad_norm: float
    num_examples: int

    def history(self) -> list[tuple[float, float, int]]:
        return [(self.noise_multiplier, self.sample_rate, self.steps)]


def plan(dp: DPConfig, *, num_examples: int, batch_size: int, steps: int) -> PrivacyPlan:
    if num_examples < 2:
        raise ConfigError(f"DP training needs at least 2 examples, got {num_examples}")
    if batch_size > num_examples:
        raise ConfigError(f"expected batch size {batch_size} exceeds the {num_examples} training examples")
    # Opacus derives Poisson's rate from the non-private loader as 1 / number of batches.
    sample_rate = 1.0 / math.ceil(num_examples / batch_size)
    delta = dp.delta if dp.delta is not None else 1.0 / (2 * num_examples)
    if delta >= 1.0 / num_examples:
        warnings.warn(f"delta={delta:g} is not below 1/n = {1 / num_examples:g}: a weak guarantee", stacklevel=2)
    if dp.noise_multiplier is not None:
        sigma = dp.noise_multiplier
    else:
        sigma = calibrate_noise(
            target_epsilon=dp.target_epsilon,
            delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=dp.accountant,
        )
    eps = epsilon(dp.accountant, [(sigma, sample_rate, steps)], delta=delta)
    return PrivacyPlan(sigma, sample_rate, steps, delta, eps, dp.accountant, dp.max_grad_norm, num_examples)


def release_of(p: PrivacyPlan) -> dict:
    """The ledger's description of the release the plan ``p`` makes (``PrivacyLedger.reserve``'s arguments)."""
    return {
        "mechanism": MECHANISM,
        "delta": p.delta,
        "epsilon": p.epsilon,
        "accountant": p.accountant,
        "noise_multiplier": p.noise_multiplier,
        "sample_rate": p.sample_rate,
        "steps": p.steps,
    }


def spend_record(p: PrivacyPlan, spent_epsilon: float, steps_done: int, secure_mode: bool) -> dict:
    """The privacy spend carried by a released prompt (fedprompt.json) and the ledger."""
    return {
        "epsilon": spent_epsilon,
        "delta": p.delta,
        "accountant": p.accountant,
        "mechanism": MECHANISM,
        "noise_multiplier": p.noise_multiplier,
        "sample_rate": p.sample_rate,
        "steps": steps_done,
        "max_grad_norm": p.max_grad_norm,
        "num_examples": p.num_examples,
        "sampling": "poisson",
        "unit": "example",
        "secure_mode": secure_mode,
    }


def _batches(loader: DataLoader, session: Session) -> Iterator[dict[str, torch.Tensor]]:
    while True:
        for batch in loader:
            # Opacus's DPDataLoader turns an empty Poisson batch into a list of empty tensors.
            yield session.collate([]) if not isinstance(batch, dict) else batch


@dataclass
class PrivateTraining:
    """The objects Opacus made private, plus what the training loop needs to drive them."""

    engine: PrivacyEngine
    module: torch.nn.Module
    optimizer: DPOptimizer
    batches: Iterator[dict[str, torch.Tensor]]
    prompt_weight: torch.nn.Parameter

    def on_empty_batch(self) -> None:
        # A step must still happen (with its noise) on an empty Poisson batch: skipping it would reveal
        # that the batch was empty. Opacus clips and sums an empty per-example gradient to zero.
        w = self.prompt_weight
        w.grad_sample = torch.zeros((0, *w.shape), device=w.device, dtype=w.dtype)


def make_private(
    session: Session,
    prompted: PromptedLM,
    optimizer: torch.optim.Optimizer,
    train: list,
    p: PrivacyPlan,
    *,
    batch_size: int,
    steps: int,
    secure_mode: bool = False,
    loss_reduction: str = "mean",
) -> PrivateTraining:
    """Opacus's PrivacyEngine over ``prompted``: per-example clipping, Gaussian noise, Poisson sampling.

    The noise and the Poisson sampling never follow a public seed: torch's default generator starts from
    a fixed seed, and anyone who can replay the noise can subtract it. Both draw from generators seeded
    with OS entropy here (or, in ``secure_mode``, from the OS CSPRNG directly).
    """
    torch.seed()  # Opacus's Poisson sampler draws from the global generator: reseed it from OS entropy
    noise_generator = torch.Generator(device=session.runtime.device)
    noise_generator.manual_seed(int.from_bytes(os.urandom(8), "little"))
    loader = DataLoader(train, batch_size=batch_size, collate_fn=session.collate)
    prompted.train()  # Opacus validates training mode; the frozen base stays in eval unless base_dropout
    with warnings.catch_warnings():
        # Opacus's secure mode needs torchcsprng; ours (secure_rng) replaces it when secure_mode is set.
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant=p.accountant)
        module, dp_optimizer, dp_loader = engine.make_private(
            module=prompted,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=p.noise_multiplier,
            max_grad_norm=p.max_grad_norm,
            noise_generator=noise_generator,
            poisson_sampling=True,
            grad_sample_mode="hooks",
            loss_reduction=loss_reduction,
        )
    if abs(dp_optimizer.expected_batch_size - p.sample_rate * len(train)) > 1:
        raise RuntimeError("Opacus's sample rate differs from the planned one")
    if secure_mode:
        dp_optimizer = SecureNoiseDPOptimizer(
            optimizer,
            noise_multiplier=p.noise_multiplier,
            max_grad_norm=p.max_grad_norm,
            expected_batch_size=dp_optimizer.expected_batch_size,
            loss_reduction=loss_reduction,
        )
        dp_optimizer.attach_step_hook(engine.accountant.get_optimizer_hook_fn(sample_rate=p.sample_rate))
        sampler = SecurePoissonSampler(len(train), p.sample_rate, steps)
    else:
        # Opacus's own Poisson sampling, from a generator seeded with OS entropy, but fedprompt's collate: Opacus's
        # DPDataLoader builds an empty batch from the first batch's dtypes and fails (TypeError) when the very
        # first Poisson batch is empty; ours collates an empty list into an empty batch, which takes its step.
        sampler_rng = torch.Generator()
        sampler_rng.manual_seed(int.from_bytes(os.urandom(8), "little"))
        sampler = UniformWithReplacementSampler(
            num_samples=len(train), sample_rate=p.sample_rate, generator=sampler_rng
        )
    dp_loader = DataLoader(train, batch_sampler=sampler, collate_fn=session.collate)
    return PrivateTraining(engine, module, dp_optimizer, _batches(dp_loader, session), prompted.prompt.weight)


def private_steps(
    session: Session,
    start: torch.Tensor,
    cfg: TuneConfig,
    p: PrivacyPlan,
    *,
    secure_mode: bool = False,
    desc: str = "",
    logit_offsets: torch.Tensor | None = None,
    optimizer_state: dict | None = None,
) -> tuple[torch.Tensor, float, int, list[dict]]:
    """``cfg.steps`` DP-SGD steps from the prompt ``start`` (fresh optimiser state) under the plan ``p``.

    Returns the new prompt, the epsilon of these steps alone, the steps taken and the loop's history.
    The caller charges the ledger with ``p`` *before* calling this. ``logit_offsets`` must not depend on the
    data beyond a DP release the caller has charged too (the loss must be fixed before the data is read).
    ``optimizer_state``, a dict, carries the optimiser's state from one call to the next (empty at first).
    """
    train = session.encode_split("train")
    if len(train) != p.num_examples:
        raise RuntimeError(f"the plan was made for {p.num_examples} examples, the data has {len(train)}")
    prompted = session.prompted(start, base_dropout=cfg.base_dropout)
    optimizer = make_optimizer(prompted.prompt.parameters(), cfg)
    if optimizer_state:  # the optimiser's state from the caller's earlier rounds (a function of noised gradients)
        optimizer.load_state_dict(optimizer_state["state"])
    private = make_private(
        session, prompted, optimizer, train, p, batch_size=cfg.batch_size, steps=cfg.steps, secure_mode=secure_mode
    )
    weight = prompted.prompt.weight

    def spent_so_far() -> float:
        # the ledger's own accounting (its RDP orders), not the engine's: a round never reports more than it reserved
        return epsilon(p.accountant, private.engine.accountant.history, delta=p.delta)

    def after_step(step: int) -> dict:
        return {"eps": f"{spent_so_far():.3f}"}

    history = run_steps(
        session,
        prompted,
        private.optimizer,
        private.batches,
        cfg,
        desc=desc or f"DP tune (sigma={p.noise_multiplier:.3f})",
        on_empty_batch=private.on_empty_batch,
        after_step=after_step,
        logit_offsets=logit_offsets,
    )
    spent = spent_so_far()
    steps_done = sum(t for _, _, t in private.engine.accountant.history)
    if optimizer_state is not None:
        optimizer_state["state"] = optimizer.state_dict()
    private.module.remove_hooks()
    return weight.detach().cpu().clone(), spent, steps_done, history


def private_tune(
    session: Session, cfg: TuneConfig, dp: DPConfig, *, privacy_plan: PrivacyPlan | None = None
) -> tuple[TuneResult, dict]:
    """Tune a prompt with DP-SGD; returns the result and the spend record of the released prompt.

    The caller charges the ledger with ``plan(...)`` *before* calling this (see ``fedprompt.dp.cli``).
    Only the final prompt is released: validation accuracy printed during training is for the
    data holder's eyes and is not used to choose what is released.
    """
    n = len(session.dataset.split("train"))
    p = privacy_plan or plan(dp, num_examples=n, batch_size=cfg.batch_size, steps=cfg.steps)
    initial, _ = session.initial_prompt(cfg)  # data-independent: may follow the public seed
    weight, spent, steps_done, history = private_steps(session, initial, cfg, p, secure_mode=dp.secure_mode)
    result = TuneResult(weight, initial, origin_id(initial), history)
    return result, spend_record(p, spent, steps_done, dp.secure_mode)
