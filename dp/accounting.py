"""Privacy accountants, chosen by name, and noise calibration (thin layer over Opacus's accountants).

The default accountant is ``rdp`` (Renyi DP of the subsampled Gaussian, Mironov et al.), which
composes cheaply across every release in a data holder's ledger; ``prv`` (Gopi et al., numerical
composition of privacy loss random variables) gives tighter epsilons at some cost per evaluation.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

from fedprompt.errors import ConfigError

if TYPE_CHECKING:
    from opacus.accountants import IAccountant

ACCOUNTANTS = ("rdp", "prv")
DEFAULT_ACCOUNTANT = "rdp"

# Opacus's RDP orders (1.1 ... 63) and larger ones. The conversion to (epsilon, delta) is valid at every order, so
# more orders never loosen a bound; Opacus's own range ends at 63, where strong noise or few steps put the best
# order (it warns "Optimal order is the largest alpha" and reports a looser epsilon).
RDP_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [80, 96, 128, 192, 256, 512, 1024]


def _orders(accountant: str) -> dict:
    return {"alphas": RDP_ORDERS} if accountant == "rdp" else {}


def check_accountant(name: str) -> str:
    if name not in ACCOUNTANTS:
        raise ConfigError(f"accountant must be one of {ACCOUNTANTS}, got {name!r}")
    return name


def make_accountant(name: str, history: Iterable[tuple[float, float, int]] = ()) -> IAccountant:
    """An Opacus accountant named ``name`` with ``history`` of (noise_multiplier, sample_rate, steps)."""
    # opacus (and torch with it) loads here, not at import: processes that only read a ledger's records or
    # build the command line (the aggregation server, health checks) stay small
    from opacus.accountants import create_accountant

    acc = create_accountant(check_accountant(name))
    acc.history = [(float(s), float(q), int(t)) for s, q, t in history]
    return acc


def epsilon(accountant: str, history: Iterable[tuple[float, float, int]], *, delta: float) -> float:
    """Epsilon of composing every (noise_multiplier, sample_rate, steps) in ``history`` at ``delta``."""
    # T steps of one (sigma, q) then T' more of it are T + T' steps of it, exactly, for every accountant here:
    # a ledger's many rounds of one run are composed as one entry instead of one per round
    merged: dict[tuple[float, float], int] = {}
    for s, q, t in history:
        if t > 0:
            merged[(float(s), float(q))] = merged.get((float(s), float(q)), 0) + int(t)
    if not merged:
        return 0.0
    if any(s <= 0 for s, _ in merged):
        return math.inf
    hist = [(s, q, t) for (s, q), t in merged.items()]
    return float(make_accountant(accountant, hist).get_epsilon(delta, **_orders(accountant)))


def calibrate_noise(*, target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    """The smallest noise multiplier (to Opacus's tolerance) whose spend stays within ``target_epsilon``."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=check_accountant(accountant),
            **_orders(accountant),
        )
    )
