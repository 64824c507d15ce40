"""A data holder's side of a federation round, without Flower: charge the ledger, tune locally, evaluate.

The ClientApp (``fedprompt.client.app``) is a thin wrapper around :class:`Holder`, so everything that
touches private data or the privacy budget lives here and is tested without a SuperLink.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from fedprompt.client.policy import PolicyViolation
from fedprompt.data import datasets as ds_mod
from fedprompt.dp.accounting import epsilon
from fedprompt.dp.engine import DPConfig, PrivacyPlan, plan, private_steps, release_of
from fedprompt.dp.ledger import PrivacyLedger, Reservation
from fedprompt.errors import DatasetError, FedPromptError, ModelError
from fedprompt.models.zoo import LoadedModel
from fedprompt.protocols.rounds import LocalSettings, TaskSpec
from fedprompt.runtime import Runtime
from fedprompt.taskfile import Task
from fedprompt.training import Session, make_optimizer, run_steps
from fedprompt.tuning_settings import TuneConfig

# Under DP the number of examples a holder reports is this constant: the true count is a function of the
# private data (adding one person changes it), and FedAvg weights must not depend on it.
DP_NUM_EXAMPLES = 1

log = logging.getLogger("fedprompt.client")


@dataclass
class RoundOutcome:
    weight: torch.Tensor
    delta: torch.Tensor
    num_examples: int
    metrics: dict[str, float | int | str] = field(default_factory=dict)
    # under DP, the round's open reservation: the caller marks it ``sent`` just before the update leaves, or
    # drops it if it never will (a stop in between leaves it reserved, and the next start cancels it)
    reservation: Reservation | None = None

    def sent(self) -> None:
        if self.reservation is not None:
            self.reservation.sent()

    def dropped(self) -> None:
        if self.reservation is not None:
            self.reservation.close(failed=True)


@functools.lru_cache(maxsize=16)
def _run_plan(
    target_epsilon: float, delta: float, accountant: str, max_grad_norm: float, n: int, batch_size: int, steps: int
) -> PrivacyPlan:
    # noise calibration is a root search over the accountant: once per run, not once per round
    dp = DPConfig(target_epsilon=target_epsilon, delta=delta, accountant=accountant, max_grad_norm=max_grad_norm)
    return plan(dp, num_examples=n, batch_size=batch_size, steps=steps)


class Holder:
    """One data holder: its data, its privacy ledger, and the frozen model the federation tunes a prompt for."""

    def __init__(
        self,
        *,
        data: str,
        state_dir: str | Path,
        name: str = "",
        model: LoadedModel | str,
        task: TaskSpec,
        runtime: Runtime | None = None,
        max_length: int = 128,
        local_task: Task | None = None,
    ) -> None:
        """``local_task``: the holder's own task file (its data's columns; the labels it agreed to train)."""
        self.name = name or Path(str(data)).stem
        self.task = task
        self.ledger = PrivacyLedger(state_dir)
        if self.ledger.budget() is None:
            raise FedPromptError(f"{self.ledger.path}: no privacy budget set; start the client with --budget-epsilon")
        if local_task is not None:
            if list(local_task.labels) != list(task.label_names):
                raise DatasetError(
                    f"the coordinator's task has the labels {list(task.label_names)}; this holder's task file "
                    f"{local_task.source} lists {list(local_task.labels)}"
                )
            dataset = ds_mod.load_task(local_task, data)
        else:
            dataset = ds_mod.load(data, label_names=list(task.label_names))
        if list(dataset.label_names) != list(task.label_names):
            raise DatasetError(f"{data}: labels {dataset.label_names} differ from the task's {list(task.label_names)}")
        self.session = Session(
            model,
            dataset,
            runtime=runtime,
            max_length=max_length,
            template=task.template,
            label_words=[list(w) for w in task.label_words],
            scoring=task.scoring,
        )
        if self.session.loaded.weights_sha256 != task.model_sha256:
            raise ModelError(
                f"the coordinator's task is for {task.model} with weights {task.model_sha256[:12]}; this holder "
                f"has {self.session.loaded.model_id} with weights {self.session.loaded.weights_sha256[:12]}"
            )
        self.num_train = len(dataset.split("train"))
        # Two options of the local optimisation that benchmarks/federation_settings.py measures; no federation
        # setting turns them on (neither beat the default there: README "The federation, measured"). Offsets
        # from the holder's label counts would need a DP estimate of those counts, charged to the ledger.
        self.logit_offsets: torch.Tensor | None = None
        self.keep_optimizer_state = False  # each round's Adam starts from the state the last one ended with
        self._optimizer_states: dict[str, dict] = {}

    # ------------------------------------------------------------------ privacy

    def privacy_plan(self, s: LocalSettings) -> PrivacyPlan:
        """This round's share of the run: the noise is calibrated so that all ``num_rounds`` rounds together
        reach ``target_epsilon`` on this holder's data; the plan covers this round's steps only."""
        n = self.num_train
        if s.batch_size > n:  # the reason goes to the coordinator: it must not say n
            raise DatasetError(f"the batch size {s.batch_size} exceeds this holder's training set")
        delta = s.delta or 1.0 / (2 * n)
        full = _run_plan(
            s.target_epsilon, delta, s.accountant, s.max_grad_norm, n, s.batch_size, s.num_rounds * s.local_steps
        )
        sigma, q = full.noise_multiplier, full.sample_rate
        eps_round = epsilon(s.accountant, [(sigma, q, s.local_steps)], delta=delta)
        return PrivacyPlan(sigma, q, s.local_steps, delta, eps_round, s.accountant, s.max_grad_norm, n)

    # ------------------------------------------------------------------ a round

    def release(self, *, run_id: str, round: int, run_cap: float | None = None, **release):
        """The ledger's release context (``PrivacyLedger.release``) for one request of a run: refused past the
        budget (BudgetExceededError) or, with ``run_cap``, when the run's releases composed with this one would
        pass the holder's cap per run (PolicyViolation); both before any data is read."""
        self.check_run_cap(run_id, release, run_cap)
        return self.ledger.release(task=self.task.name, run_id=run_id, round=round, **release)

    def reserve(self, *, run_id: str, round: int, run_cap: float | None = None, **release) -> Reservation:
        """As :meth:`release`, but the reservation stays open for the caller to send (``sent``) or drop."""
        self.check_run_cap(run_id, release, run_cap)
        return self.ledger.open(task=self.task.name, run_id=run_id, round=round, **release)

    def check_run_cap(self, run_id: str, release: dict, run_cap: float | None) -> None:
        """Refuse (PolicyViolation) a release that would bring the run's composed spend above ``run_cap``."""
        if run_cap is None:
            return
        projected = self.ledger.run_epsilon(run_id, release["delta"], adding=release)
        if projected > run_cap:
            log.warning("run %s would spend epsilon %.3f here, above the cap %g", run_id, projected, run_cap)
            raise PolicyViolation("max_run_epsilon", "this request would bring the run's spend above the cap")

    def train_round(
        self, global_weight: torch.Tensor, s: LocalSettings, *, run_cap: float | None = None
    ) -> RoundOutcome:
        """Tune from the global prompt for ``s.local_steps`` steps; under DP, charge the ledger first.

        Raises :class:`~fedprompt.errors.BudgetExceededError` (or a PolicyViolation for ``run_cap``) before
        touching the data when the round would pass the holder's budget.

        Under DP the reply's metrics hold only what the coordinator already knows: the run's ε bound (its target:
        this holder's examples are (target ε, δ)-DP with respect to everything the run releases), δ when the
        coordinator set it, and the number of steps. The actual spend depends on the holder's sampling rate,
        hence on its n: it goes to the holder's log and ledger only.
        """
        self.check_prompt(global_weight)
        cfg = TuneConfig(
            prompt_length=global_weight.shape[0],
            steps=s.local_steps,
            lr=s.lr,
            batch_size=s.batch_size,
            max_length=s.max_length,
            eval_every=0,
            optimizer=s.optimizer,
        )
        start = global_weight.detach().to(torch.float32).clone()
        desc = f"{self.name} round {s.server_round}/{s.num_rounds}"
        started = time.perf_counter()
        reservation = None
        if not s.dp:
            weight = self._plain_steps(start, cfg, desc)
            metrics: dict = {"dp": 0}
            num_examples = self.num_train
        else:
            p = self.privacy_plan(s)
            # the spend is recorded here and the reservation stays open until the update leaves (RoundOutcome.sent):
            # a failure, or a stop, before that cancels it, nothing having left this process
            reservation = self.reserve(run_id=s.run_id, round=s.server_round, run_cap=run_cap, **release_of(p))
            try:
                weight, spent, steps_done, _ = private_steps(
                    self.session,
                    start,
                    cfg,
                    p,
                    secure_mode=s.secure_mode,
                    desc=desc,
                    logit_offsets=self.logit_offsets,
                    optimizer_state=self._optimizer_state(s.run_id) if self.keep_optimizer_state else None,
                )
                reservation.settle(steps=steps_done, epsilon=spent)
                if not torch.isfinite(weight).all():
                    raise FedPromptError("local training produced a non-finite prompt; nothing is sent")
            except BaseException:
                reservation.close(failed=True)
                raise
            run_spend = self.ledger.run_epsilon(s.run_id, p.delta)
            print(
                f"{self.name} round {s.server_round}/{s.num_rounds}: epsilon {spent:.3f} this round, "
                f"{run_spend:.3f} this run (target {s.target_epsilon:g}, delta {p.delta:.3g}); "
                f"ledger total {self.ledger.spent().epsilon:.3f}",
                flush=True,
            )
            metrics = {"dp": 1, "epsilon": s.target_epsilon}
            if s.delta:
                metrics["delta"] = s.delta
            num_examples = DP_NUM_EXAMPLES
        if not s.dp and not torch.isfinite(weight).all():  # under DP, checked before the reservation closes
            raise FedPromptError("local training produced a non-finite prompt; nothing is sent")
        metrics["steps"] = s.local_steps
        if not s.dp:
            # compute time, for the overhead benchmark; under DP it would be an unaccounted release (it
            # depends on the lengths of the sampled private examples)
            metrics["train_seconds"] = time.perf_counter() - started
        return RoundOutcome(weight, weight - start, num_examples, metrics, reservation)

    def _optimizer_state(self, run_id: str) -> dict:
        # one run's state only: a new run starts afresh, and a finished run's state is not kept
        if run_id not in self._optimizer_states:
            self._optimizer_states = {run_id: {}}
        return self._optimizer_states[run_id]

    def _plain_steps(self, start: torch.Tensor, cfg: TuneConfig, desc: str) -> torch.Tensor:
        prompted = self.session.prompted(start)
        optimizer = make_optimizer(prompted.prompt.parameters(), cfg)
        train = self.session.encode_split("train")
        loader = DataLoader(train, batch_size=cfg.batch_size, shuffle=True, collate_fn=self.session.collate)

        def batches():
            while True:
                yield from loader

        run_steps(self.session, prompted, optimizer, batches(), cfg, desc=desc)
        return prompted.prompt.weight.detach().cpu().clone()

    def evaluate(self, weight: torch.Tensor, split: str = "test") -> tuple[float, int]:
        """Accuracy of the global prompt on this holder's ``split`` and the number of examples (for the holder)."""
        correct, total = self.evaluate_counts(weight, split)
        return correct / total, total

    def evaluate_counts(self, weight: torch.Tensor, split: str = "test") -> tuple[int, int]:
        """How many of this holder's ``split`` examples the prompt gets right, and how many there are."""
        self.check_prompt(weight)
        examples = self.session.dataset.split(split)
        if not examples:
            raise DatasetError(f"{self.name} has no {split} examples to evaluate on")
        prompted = self.session.prompted(weight.to(torch.float32))
        acc = self.session.evaluate(prompted, examples, desc=f"{self.name} eval")
        return round(acc * len(examples)), len(examples)

    def check_prompt(self, weight: torch.Tensor) -> None:
        hidden = self.session.loaded.hidden_size
        if weight.dim() != 2 or weight.shape[1] != hidden or weight.shape[0] < 1:
            raise FedPromptError(f"the global prompt has shape {tuple(weight.shape)}; expected (n, {hidden})")
        if not torch.isfinite(weight).all():
            raise FedPromptError("the global prompt holds NaN or infinite values")
