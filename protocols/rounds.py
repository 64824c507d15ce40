"""What the coordinator tells a data holder each round: the task, the model, and the local training settings.

Plain data shared by the ClientApp and the ServerApp. It travels as a flat dict of scalars (Flower's
ConfigRecord); lists go as JSON strings.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

from fedprompt.dp.accounting import DEFAULT_ACCOUNTANT, check_accountant
from fedprompt.errors import ConfigError
from fedprompt.settings_checks import finite_numbers, positive_ints
from fedprompt.training import OPTIMIZERS


@dataclass(frozen=True)
class TaskSpec:
    """A classification task every holder trains on: the template and verbalizer the prompt is tied to."""

    name: str
    template: str
    label_names: tuple[str, ...]
    label_words: tuple[tuple[str, ...], ...]
    init_text: str
    model: str
    model_sha256: str
    scoring: str = "sum"

    def __post_init__(self) -> None:
        if "{text}" not in self.template:
            raise ConfigError(f"template must contain '{{text}}', got {self.template!r}")
        if len(self.label_names) < 2 or len(self.label_words) != len(self.label_names):
            raise ConfigError("a task needs at least 2 labels and one list of label words per label")

    def to_config(self) -> dict[str, str]:
        d = asdict(self)
        d["label_names"] = json.dumps(list(self.label_names))
        d["label_words"] = json.dumps([list(w) for w in self.label_words])
        return {f"task_{k}": v for k, v in d.items()}

    @classmethod
    def from_config(cls, config: dict) -> TaskSpec:
        d = {f.name: config[f"task_{f.name}"] for f in fields(cls)}
        d["label_names"] = tuple(json.loads(d["label_names"]))
        d["label_words"] = tuple(tuple(w) for w in json.loads(d["label_words"]))
        return cls(**d)


@dataclass(frozen=True)
class LocalSettings:
    """Local training of one round on a holder. Under DP, ``target_epsilon`` is the holder's spend for the
    whole federation (``num_rounds`` rounds of ``local_steps`` steps); each round charges its share."""

    run_id: str
    server_round: int
    num_rounds: int
    local_steps: int = 10
    lr: float = 3e-3
    optimizer: str = "adam"
    batch_size: int = 16
    max_length: int = 128
    dp: bool = True
    target_epsilon: float = 8.0
    delta: float = 0.0  # 0: 1/(2n) for the holder's n training examples
    max_grad_norm: float = 1.0
    accountant: str = DEFAULT_ACCOUNTANT
    secure_mode: bool = False
    # keep the update on the holder and hand it to the round's secure aggregation instead of replying with it
    secure_aggregation: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.server_round, bool) or not isinstance(self.server_round, int) or self.server_round < 0:
            raise ConfigError(f"server_round must be a round number >= 0, got {self.server_round!r}")
        positive_ints(self, "num_rounds", "local_steps", "batch_size", "max_length")
        if self.server_round > self.num_rounds:
            raise ConfigError(f"round {self.server_round} is past the run's {self.num_rounds} rounds")
        finite_numbers(self, "lr", "target_epsilon", "max_grad_norm", positive=True)
        if not 0 <= self.delta < 1:
            raise ConfigError(f"delta must be in [0, 1), got {self.delta!r}")
        check_accountant(self.accountant)
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")

    def to_config(self) -> dict:
        return asdict(self)

    @classmethod
    def from_config(cls, config: dict) -> LocalSettings:
        return cls(**{f.name: config[f.name] for f in fields(cls) if f.name in config})
