"""What the coordinator tells a data holder each round: the task, the model, and the local training settings.

Plain data shared by the ClientApp and the ServerApp. It travels as a flat dict of scalars (Flower's
ConfigRecord); lists go as JSON strings.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

from fedprompt.dp.accounting import DEFAULT_ACCOUNTANT, check_accountant
from fedprompt.errors import ConfigError
from fedprompt.settings_checks import finite_numbers, positive_ints, setting
from fedprompt.tuning_settings import OPTIMIZERS, TuneConfig


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


@dataclass(frozen=True, kw_only=True)
class TrainingSettings:
    """What every holder trains with in a run: the part of the federation's settings
    (:class:`~fedprompt.server.coordinator.config.FederationConfig`, which extends this class) that each round's
    request carries. Under DP, ``target_epsilon`` is the holder's spend for the whole federation (``num_rounds``
    rounds of ``local_steps`` steps); each round charges its share."""

    num_rounds: int = setting(5, flag="federated rounds")
    local_steps: int = setting(10, flag="DP steps each holder takes per round")
    lr: float = setting(TuneConfig.lr, flag="the holders' local learning rate")
    optimizer: str = setting(TuneConfig.optimizer, flag=f"the holders' local optimiser: {' or '.join(OPTIMIZERS)}")
    batch_size: int = setting(16, flag="expected batch size of each holder's Poisson sampling")
    max_length: int = TuneConfig.max_length
    dp: bool = True
    target_epsilon: float = setting(8.0, flag="each holder's epsilon for the whole run")
    # public: every holder's examples are (target_epsilon, delta)-DP; a holder refuses a delta above its own
    # ceiling (default 1/(2n) of its data; 0 asks for that ceiling, which the federation never does: a delta of
    # 1/(2n) per holder would tell the coordinator each n)
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: str = DEFAULT_ACCOUNTANT
    secure_mode: bool = False
    # keep the update on the holder and hand it to the round's secure aggregation instead of replying with it
    secure_aggregation: bool = False

    def __post_init__(self) -> None:
        positive_ints(self, "num_rounds", "local_steps", "batch_size", "max_length")
        finite_numbers(self, "lr", "target_epsilon", "max_grad_norm", positive=True)
        if not 0 <= self.delta < 1:
            raise ConfigError(f"delta must be in [0, 1), got {self.delta!r}")
        check_accountant(self.accountant)
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")


@dataclass(frozen=True, kw_only=True)
class LocalSettings(TrainingSettings):
    """Local training of one round on a holder: the run's training settings and the round's identity."""

    run_id: str
    server_round: int

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.server_round, bool) or not isinstance(self.server_round, int) or self.server_round < 0:
            raise ConfigError(f"server_round must be a round number >= 0, got {self.server_round!r}")
        if self.server_round > self.num_rounds:
            raise ConfigError(f"round {self.server_round} is past the run's {self.num_rounds} rounds")

    def to_config(self) -> dict:
        return asdict(self)

    @classmethod
    def from_config(cls, config: dict) -> LocalSettings:
        return cls(**{f.name: config[f.name] for f in fields(cls) if f.name in config})
