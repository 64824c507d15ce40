"""The settings of prompt tuning, without torch: what the command lines and the federation's settings are built
from before any model loads."""

from __future__ import annotations

from dataclasses import dataclass

from fedprompt.errors import ConfigError
from fedprompt.settings_checks import finite_numbers, positive_ints

INIT_METHODS = ("vocab", "text", "labels")
# For user data; bundled datasets carry their own. The wording matters: on rotten-tomatoes validation the
# untuned prompt from "Classify the sentiment of this review as positive or negative." scored 77.0 %, from
# "Read the text and answer with one word: negative, positive." 45.4 % (zero-shot: 79.6 %).
DEFAULT_INIT_TEXT = "Classify this text as one of: {labels}."


OPTIMIZERS = ("adam", "sgd")


@dataclass
class TuneConfig:
    """Settings of one prompt-tuning run (private or not)."""

    prompt_length: int = 20
    steps: int = 300
    lr: float = 3e-3
    batch_size: int = 32
    init: str = "text"
    init_text: str | None = None
    max_length: int = 128
    eval_every: int = 50
    eval_examples: int = 200
    eval_batch_size: int = 32
    seed: int = 0
    base_dropout: bool = False
    optimizer: str = "adam"

    def __post_init__(self) -> None:
        positive_ints(self, "prompt_length", "steps", "batch_size", "max_length", "eval_batch_size")
        finite_numbers(self, "lr", positive=True)
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.init not in INIT_METHODS:
            raise ConfigError(f"init must be one of {INIT_METHODS}, got {self.init!r}")
        if self.eval_every < 0 or self.eval_examples < 0:
            raise ConfigError(f"eval_every and eval_examples must be >= 0, got {self.eval_every}, {self.eval_examples}")
