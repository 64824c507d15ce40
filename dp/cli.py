"""Command-line pieces of the DP side: ``tune --dp`` and ``fedprompt budget``."""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from fedprompt.dp.accounting import ACCOUNTANTS, DEFAULT_ACCOUNTANT
from fedprompt.dp.ledger import LEDGER_FILE, PrivacyLedger, Reservation, default_state_dir
from fedprompt.dp.spend import Budget
from fedprompt.errors import ConfigError, FedPromptError

if TYPE_CHECKING:  # torch and opacus load when a command trains, not to build the command line
    from fedprompt.dp.engine import DPConfig
    from fedprompt.training import Session, TuneResult
    from fedprompt.tuning_settings import TuneConfig


def add_dp_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("differential privacy (DP-SGD, Opacus)")
    g.add_argument("--dp", action="store_true", help="tune with DP-SGD and charge the privacy ledger")
    g.add_argument("--target-epsilon", type=float, default=None, help="calibrate the noise to reach this epsilon")
    g.add_argument("--noise-multiplier", type=float, default=None, help="fixed noise multiplier instead")
    g.add_argument("--delta", type=float, default=None, help="default: 1/(2n) for n training examples")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="per-example clipping norm C")
    g.add_argument(
        "--accountant",
        default=DEFAULT_ACCOUNTANT,
        choices=ACCOUNTANTS,
        help="privacy accountant: rdp (Renyi DP, the default) or prv (privacy loss random variables; tighter)",
    )
    g.add_argument(
        "--secure-mode",
        action="store_true",
        help="draw Poisson sampling and noise from the OS CSPRNG (slower, for production)",
    )
    add_state_arguments(g)


def add_state_arguments(g: argparse._ActionsContainer) -> None:
    g.add_argument("--state", default=None, help=f"state folder holding the privacy ledger ({default_state_dir()})")
    g.add_argument(
        "--budget-epsilon",
        type=float,
        default=None,
        help="set the holder's total epsilon budget (first use of a ledger needs it)",
    )
    g.add_argument(
        "--budget-delta",
        type=float,
        default=None,
        help="the holder's total delta (default when setting a budget: this run's delta)",
    )


def open_ledger(args: argparse.Namespace, default_delta: float | None, *, raise_budget: bool = False) -> PrivacyLedger:
    """The holder's ledger in ``--state``. With ``--budget-epsilon``: a missing ledger is created with that budget;
    an existing one keeps its budget unless the flags lower it (or ``raise_budget``: ``fedprompt budget set``,
    the one deliberate way to raise it). Without: the ledger must exist. Reservations left by jobs that died
    before releasing anything are cancelled, and said so."""
    state = Path(args.state or default_state_dir()).expanduser()
    if args.budget_epsilon is not None and not (state / LEDGER_FILE).exists():
        delta = args.budget_delta or default_delta
        if delta is None:
            raise FedPromptError("--budget-delta is needed to set a budget on a new ledger")
        return PrivacyLedger.create(state, Budget(args.budget_epsilon, delta))
    ledger = PrivacyLedger(state)
    if args.budget_epsilon is not None:
        current = ledger.budget()
        wanted = Budget(args.budget_epsilon, args.budget_delta or (current.delta if current else default_delta))
        higher = current is not None and (wanted.epsilon > current.epsilon or wanted.delta > current.delta)
        if higher and not raise_budget:
            raise FedPromptError(
                f"{ledger.path} has the budget epsilon = {current.epsilon:g}, delta = {current.delta:g}; "
                f"--budget-epsilon {wanted.epsilon:g} (delta {wanted.delta:g}) would raise it. Raise a budget only "
                f"on purpose: fedprompt budget set --budget-epsilon {wanted.epsilon:g} --state {state}"
            )
        if current != wanted:
            ledger.set_budget(wanted)
    for r in ledger.cancel_stale():
        print(
            f"ledger {ledger.path}: cancelled reservation {r.id} ({r.task}, run {r.run_id}, round {r.round}, "
            f"epsilon {r.epsilon:.3f}): its job stopped before releasing anything",
            file=sys.stderr,
        )
    return ledger


_DP_ONLY = ("target_epsilon", "noise_multiplier", "delta", "secure_mode", "budget_epsilon", "budget_delta")


def dp_config_from_args(args: argparse.Namespace) -> DPConfig | None:
    """The run's DPConfig, or None without --dp. DP settings without --dp are an error, never ignored:
    a forgotten flag must not silently produce a non-private prompt."""
    if not args.dp:
        given = [f"--{name.replace('_', '-')}" for name in _DP_ONLY if getattr(args, name) not in (None, False)]
        if given:
            raise ConfigError(f"{', '.join(given)} only make sense with --dp; add --dp (or drop them)")
        return None
    from fedprompt.dp.engine import DPConfig

    return DPConfig(
        target_epsilon=args.target_epsilon,
        noise_multiplier=args.noise_multiplier,
        delta=args.delta,
        max_grad_norm=args.max_grad_norm,
        accountant=args.accountant,
        secure_mode=args.secure_mode,
    )


@contextlib.contextmanager
def private_tuning(
    session: Session, cfg: TuneConfig, dp: DPConfig, args: argparse.Namespace
) -> Iterator[tuple[TuneResult, dict, Reservation]]:
    """Private tuning charged to the holder's ledger. The body gets (result, spend, reservation) and must call
    ``reservation.leaving()`` just before anything of the result leaves (the artifact is written): a stop
    before that (an error, Ctrl-C, or a kill, cancelled at the next start) charges nothing."""
    from fedprompt.dp.engine import plan, private_tune, release_of

    n = len(session.dataset.split("train"))
    p = plan(dp, num_examples=n, batch_size=cfg.batch_size, steps=cfg.steps)
    print(
        f"privacy plan: noise_multiplier = {p.noise_multiplier:.4f}, sample_rate = {p.sample_rate:.5f}, "
        f"{p.steps} steps, epsilon = {p.epsilon:.3f} at delta = {p.delta:.3g} ({p.accountant})"
    )
    ledger = open_ledger(args, p.delta)
    with ledger.release(task=session.dataset.name, run_id=uuid.uuid4().hex, **release_of(p)) as release:
        result, spend = private_tune(session, cfg, dp, privacy_plan=p)
        release.settle(steps=spend["steps"], epsilon=spend["epsilon"])  # recorded; committed once it leaves
        yield result, spend, release
    total = ledger.spent()  # printed for the holder, never written into the released artifact
    print(f"ledger {ledger.path}: total spend epsilon = {total.epsilon:.3f} (delta = {total.delta:g}; {total.method})")


def cmd_budget(args: argparse.Namespace) -> int:
    if args.action == "restore":
        state = Path(args.state or default_state_dir()).expanduser()
        ledger = PrivacyLedger.restore(args.path, state)
        print(f"restored {args.path} as {ledger.path}")
        return 0
    ledger = open_ledger(args, None, raise_budget=args.action == "set")
    if args.action == "backup":
        print(ledger.backup(args.path))
        return 0
    budget = ledger.budget()
    if budget is None:
        print(f"{ledger.path}: no budget set yet")
        return 0
    releases = ledger.releases(cancelled=True)
    counted = [r for r in releases if r.status != "cancelled"]
    total = ledger.spent()
    print(f"ledger: {ledger.path}")
    print(f"budget: epsilon = {budget.epsilon:g}, delta = {budget.delta:g}")
    for task in sorted({r.task for r in counted}):
        s = ledger.spent(task)
        print(f"  task {task:24} epsilon = {s.epsilon:8.3f}  ({s.releases} release(s); {s.method})")
    print(
        f"total: epsilon = {total.epsilon:.3f}, left = {max(0.0, budget.epsilon - total.epsilon):.3f}  ({total.method})"
    )
    if releases:
        print("releases (each epsilon at the delta the release was made with):")
        head = f"  {'id':>4}  {'when (UTC)':19}  {'task':18} {'run':20} {'round':>5}  {'mechanism':16} {'epsilon':>8}"
        print(f"{head}  status")
        for r in releases:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r.created_at))
            print(
                f"  {r.id:>4}  {when:19}  {r.task[:18]:18} {r.run_id[:20]:20} {r.round:>5}  {r.mechanism[:16]:16} "
                f"{r.epsilon:8.3f}  {STATUS_WORDS.get(r.status, r.status)}"
            )
    pending = [r for r in releases if r.status in ("reserved", "releasing")]
    if pending:
        print(f"{len(pending)} release(s) not yet settled are counted as spent")
    return 0


STATUS_WORDS = {
    "reserved": "reserved (job running; nothing released yet)",
    "releasing": "released, not yet settled (counted)",
    "committed": "released",
    "cancelled": "cancelled (the job stopped before releasing anything; not counted)",
}


def add_budget_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("budget", help="show or set a data holder's privacy budget; back up or restore the ledger")
    p.add_argument(
        "action",
        choices=["show", "set", "backup", "restore"],
        help="show: the budget, spend and releases; set: set (or raise) the budget from --budget-epsilon/"
        "--budget-delta; backup: copy the ledger to PATH; restore: restore a backup at PATH into --state",
    )
    p.add_argument("path", nargs="?", help="backup: destination file; restore: the backup to restore")
    add_state_arguments(p)
    p.set_defaults(func=cmd_budget)
