"""The data holder's policy: what it lets a coordinator run on its data and what it lets leave its machine.

A coordinator's settings can only ask. ``fedprompt client`` reads the policy from its own flags and from
``STATE/policy.toml`` (flags win), never from a message, and every request is checked against it before any
data is touched: a violation is an error reply that names the rule, and the ledger is unchanged.

What a reply to the coordinator may carry is fixed here too. Under DP it holds only numbers the coordinator
already knows (the run's ε and δ bounds, the number of local steps): no compute times, no example counts, no
per-round ε (which depends on the sampling rate, hence on the holder's n), and refusals say which rule was
broken without the holder's numbers (its budget, its spend, its dataset size). Those go to the holder's log.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from fedprompt.errors import ConfigError, FedPromptError

POLICY_FILE = "policy.toml"


class PolicyViolation(FedPromptError):
    """A request that the holder's policy refuses; ``rule`` names the policy field (or ``budget``)."""

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(f"refused by the holder's policy (rule {rule}): {message}")
        self.rule = rule


@dataclass(frozen=True)
class HolderPolicy:
    """The holder's rules. The defaults are the strict ones: DP on, evaluation off.

    - ``require_dp``: refuse every run without DP (``allow_no_dp`` in the file / ``--allow-no-dp`` opts out).
    - ``max_run_epsilon``: the most ε one run (all its rounds and evaluations together) may spend on this holder's
      data; ``None``: no cap beyond the ledger's budget.
    - ``max_delta``: the largest δ a run may use; ``None``: 1/(2n) for the holder's own n.
    - ``require_secure_aggregation``: refuse rounds whose update would reach the coordinator in the clear.
    - ``min_secure_cohort``: the fewest holders a secure round may have (with 2, each learns the other's update
      from the mean; 3 is the least that hides one update among others).
    - ``secagg_colluders``: how many holders may collude with the aggregation server without learning this
      holder's update; a secure round whose threshold does not resist that many is refused (2t > k + 1 + c).
    - ``max_evaluations_per_run``: evaluation requests answered per run; 0 turns evaluation off. Each answer is a
      noisy count of correct answers and a noisy count of examples (Gaussian, standard deviation
      ``evaluation_noise`` examples), charged to the ledger before the prompt is evaluated.
    """

    require_dp: bool = True
    max_run_epsilon: float | None = None
    max_delta: float | None = None
    require_secure_aggregation: bool = False
    min_secure_cohort: int = 3
    secagg_colluders: int = 1
    max_evaluations_per_run: int = 0
    evaluation_noise: float = 20.0

    def __post_init__(self) -> None:
        if not isinstance(self.require_dp, bool) or not isinstance(self.require_secure_aggregation, bool):
            raise ConfigError("require_dp and require_secure_aggregation are true or false")
        for name in ("max_run_epsilon", "max_delta"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be a positive number, got {value!r}")
        if self.max_delta is not None and not self.max_delta < 1:
            raise ConfigError(f"max_delta must be below 1, got {self.max_delta!r}")
        for name, least in (("min_secure_cohort", 3), ("secagg_colluders", 0), ("max_evaluations_per_run", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ConfigError(f"{name} must be an integer >= {least}, got {value!r}")
        noise = self.evaluation_noise
        if not (isinstance(noise, int | float) and math.isfinite(noise) and noise > 0):
            raise ConfigError(f"evaluation_noise must be a positive number of examples, got {noise!r}")

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(cls, state_dir: str | Path, **overrides: Any) -> HolderPolicy:
        """The policy in ``state_dir/policy.toml`` (defaults where the file is silent), then ``overrides``
        (the daemon's flags; ``None`` values are ignored)."""
        path = Path(state_dir) / POLICY_FILE
        values: dict[str, Any] = {}
        if path.exists():
            try:
                raw = tomllib.loads(path.read_text())
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
                raise FedPromptError(f"{path}: not a valid TOML file: {exc}") from exc
            values = _from_file(raw, path)
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**values)
        except (TypeError, ValueError) as exc:
            raise FedPromptError(f"holder policy ({path}): {exc}") from exc

    def resolved(self, num_examples: int) -> HolderPolicy:
        """The policy with its data-dependent default filled in (δ ceiling 1/(2n))."""
        if self.max_delta is not None:
            return self
        return replace(self, max_delta=1.0 / (2 * num_examples))

    def describe(self) -> str:
        """One line for the holder's own eyes (it may show the δ ceiling, which is derived from n)."""
        parts = ["DP required" if self.require_dp else "DP optional (allow_no_dp)"]
        parts.append(
            f"epsilon per run <= {self.max_run_epsilon:g}" if self.max_run_epsilon else "epsilon per run: budget"
        )
        parts.append(f"delta <= {self.max_delta:.3g}" if self.max_delta else "delta <= 1/(2n)")
        if self.require_secure_aggregation:
            parts.append(f"secure aggregation required (at least {self.min_secure_cohort} holders)")
        else:
            parts.append(f"secure rounds of at least {self.min_secure_cohort} holders")
        if self.max_evaluations_per_run:
            parts.append(
                f"{self.max_evaluations_per_run} DP evaluation(s) per run (noise {self.evaluation_noise:g} examples)"
            )
        else:
            parts.append("evaluation off")
        return "; ".join(parts)

    # ------------------------------------------------------------------ checks

    def check_run(self, *, dp: bool, target_epsilon: float, delta: float, secure_aggregation: bool) -> None:
        """A training (or DP-OPT) request's settings; raises :class:`PolicyViolation`. Call ``resolved`` first."""
        if not dp:
            if self.require_dp:
                raise PolicyViolation("require_dp", "this holder takes part only in runs with differential privacy")
            return
        if self.max_run_epsilon is not None and target_epsilon > self.max_run_epsilon:
            raise PolicyViolation(
                "max_run_epsilon", f"the run asks for epsilon = {target_epsilon:g}, above this holder's cap"
            )
        self.check_delta(delta)
        if self.require_secure_aggregation and not secure_aggregation:
            raise PolicyViolation(
                "require_secure_aggregation", "this holder sends its update only through secure aggregation"
            )

    def check_delta(self, delta: float) -> None:
        if self.max_delta is not None and not 0 < delta <= self.max_delta:
            raise PolicyViolation("max_delta", f"the run asks for delta = {delta:g}, above this holder's ceiling")

    def check_secure_cohort(self, num_clients: int) -> None:
        if num_clients < self.min_secure_cohort:
            raise PolicyViolation(
                "min_secure_cohort",
                f"a secure round of {num_clients} holders; this holder needs at least {self.min_secure_cohort}",
            )

    def check_evaluation(self, done_this_run: int) -> None:
        if self.max_evaluations_per_run == 0:
            raise PolicyViolation("max_evaluations_per_run", "evaluation is off on this holder")
        if done_this_run >= self.max_evaluations_per_run:
            raise PolicyViolation(
                "max_evaluations_per_run",
                f"this run already had the {self.max_evaluations_per_run} evaluation(s) this holder allows",
            )


def _from_file(raw: dict, path: Path) -> dict[str, Any]:
    known = {f.name for f in fields(HolderPolicy)} | {"allow_no_dp"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise FedPromptError(f"{path}: unknown policy setting(s) {unknown}; known: {sorted(known)}")
    values = dict(raw)
    if "allow_no_dp" in values:
        allow = values.pop("allow_no_dp")
        if not isinstance(allow, bool):
            raise FedPromptError(f"{path}: allow_no_dp must be true or false")
        values.setdefault("require_dp", not allow)
    return values
