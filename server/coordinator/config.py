"""The federation's run settings as the ServerApp reads them from Flower's run config (flat scalars)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from fedprompt import taskfile
from fedprompt.errors import ConfigError
from fedprompt.protocols import methods
from fedprompt.protocols.rounds import LocalSettings, TaskSpec, TrainingSettings
from fedprompt.settings_checks import setting
from fedprompt.taskfile import Task
from fedprompt.tuning_settings import DEFAULT_INIT_TEXT, TuneConfig


@dataclass(frozen=True, kw_only=True)
class FederationConfig(TrainingSettings):
    """Every setting of a federation run, in one place: the holders' training settings it extends
    (:class:`TrainingSettings`, sent to every holder each round), the coordinator's own, and the task. The
    coordinator's flags (``setting(..., flag=...)``) and the Flower App's run config
    (``fedprompt/flower_app/pyproject.toml``, written by ``flower_app.py``) are derived from these fields."""

    checkpoint_dir: str
    task: str = setting(
        "rotten-tomatoes", flag="a task file (.toml; fedprompt task init DATA writes one) or a bundled task"
    )
    # A bundled task's name, or the name of a task given in full by these (the coordinator fills them in from a
    # task file: fedprompt server --task FILE): its template, labels and label words (JSON lists), the instruction
    # the prompt starts from and how label words are scored. Each one given overrides the bundled task's.
    template: str = ""
    label_names: str = ""
    label_words: str = ""
    init_text: str = ""
    scoring: str = ""
    model: str = setting("smollm2-135m", flag="the frozen model every holder runs (a zoo name; holders must allow it)")
    prompt_length: int = setting(TuneConfig.prompt_length, flag="virtual tokens of the soft prompt")
    strategy: str = setting("fedavg", flag="the coordinator's merge: fedavg or fedadam")
    server_lr: float = setting(
        0.0, flag="the strategy's step on the mean update (0: its default: 1.0 for fedavg, 0.01 for fedadam)"
    )
    fraction_train: float = setting(1.0, flag="fraction of the available holders sampled each round")
    min_train_nodes: int = setting(2, flag="holders that must train in a round for it to count")
    min_available_nodes: int = setting(2, flag="holders that must be connected before the first round starts")
    wait_for_nodes_s: float = 600.0
    round_timeout_s: float = setting(1800.0, flag="seconds a round waits for the holders' replies")
    # ask the holders to evaluate each round's prompt; a holder answers only if its policy allows evaluations
    # (off by default), each answer a DP release (noisy counts) charged to its ledger
    evaluate: bool = False
    # the coordinator's own evaluation data (a dataset name or file it holds, e.g. a public test set): each
    # round's prompt is evaluated here on its server_eval_split, every eval_every rounds and after the last
    server_eval: str = ""
    server_eval_split: str = "test"
    eval_every: int = 1
    # client-level DP on the coordinator (off by default: noise on the sum of a handful of holders
    # swamps the signal; see ClientLevelDP)
    client_dp: bool = False
    client_clip_norm: float = 1.0
    client_noise_multiplier: float = 1.0
    client_delta: float = 1e-3
    # the aggregation server (HOST:PORT) and the certificate folder with the coordinator's client certificate:
    # every round's global prompt is stored there as a version (fedprompt prompts list)
    aggregator: str = ""
    aggregator_certs: str = ""
    # the aggregation server that runs the secure rounds (secure_aggregation, a training setting; default:
    # aggregator). A round's protocol lives in the memory of one server process, which the holders call
    # themselves: with several registry replicas behind one address, this names the single one the holders reach
    secure_rounds: str = ""
    # each update value is clipped to [-secagg_clip_range, secagg_clip_range] before quantisation
    secagg_clip_range: float = 1.0
    # "prompt-tuning" (rounds of DP soft-prompt tuning) or "dpopt" (every holder writes DP text candidates,
    # every holder scores them with noise, the best sum wins); dpopt_settings: JSON overrides of the preset
    method: str = setting("prompt-tuning", flag=f"the federated method: {' or '.join(methods.METHODS)}")
    dpopt_preset: str = setting("cpu", flag="DP-OPT's settings preset")
    dpopt_settings: str = setting("", flag="JSON overrides of the DP-OPT preset")

    def __post_init__(self) -> None:
        from fedprompt.server.coordinator.strategies import STRATEGIES  # torch: not needed to list the flags

        super().__post_init__()
        if not self.checkpoint_dir or not Path(self.checkpoint_dir).is_absolute():
            raise ConfigError(f"checkpoint_dir must be an absolute path, got {self.checkpoint_dir!r}")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if not 0 < self.fraction_train <= 1:
            raise ConfigError(f"fraction_train must be in (0, 1], got {self.fraction_train}")
        if self.min_train_nodes < 1 or self.min_available_nodes < self.min_train_nodes:
            raise ConfigError("need 1 <= min_train_nodes <= min_available_nodes")
        if not 0 < self.delta < 1:
            raise ConfigError(f"delta must be in (0, 1), got {self.delta!r}")
        if self.eval_every < 1:
            raise ConfigError(f"eval_every must be a positive number of rounds, got {self.eval_every}")
        if self.server_eval_split not in ("train", "validation", "test"):
            raise ConfigError(f"server_eval_split must be train, validation or test, got {self.server_eval_split!r}")
        if self.prompt_length < 1:
            raise ConfigError(f"prompt_length must be positive, got {self.prompt_length}")
        for name in ("wait_for_nodes_s", "round_timeout_s"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ConfigError(f"{name} must be a positive number of seconds")
        if bool(self.aggregator) != bool(self.aggregator_certs):
            raise ConfigError(
                "aggregator and aggregator_certs go together (the address and the coordinator's certificate)"
            )
        if self.secure_rounds and not self.secure_aggregation:
            raise ConfigError("secure_rounds names where secure rounds run: it needs secure_aggregation")
        if self.secure_aggregation and not self.aggregator:
            raise ConfigError("secure_aggregation needs the aggregation server: set aggregator and aggregator_certs")
        if self.secure_aggregation and self.min_train_nodes < 2:
            raise ConfigError("secure aggregation needs min_train_nodes >= 2: the sum of one update is that update")
        if self.secure_aggregation and self.client_dp:
            raise ConfigError(
                "client_dp clips each holder's update on the coordinator, which secure aggregation hides from it"
            )
        if not (math.isfinite(self.secagg_clip_range) and self.secagg_clip_range > 0):
            raise ConfigError(f"secagg_clip_range must be positive, got {self.secagg_clip_range}")
        self.task_definition()  # a bad task fails here, before any process starts
        self.coordinator_side().check(self)
        self.local_settings(run_id="check", server_round=1)  # validates the holders' settings up front

    def coordinator_side(self):
        """The coordinator's side of the run's federated method (a ``protocols.methods.CoordinatorSide``)."""
        return methods.load(methods.method(self.method).coordinator)

    @classmethod
    def from_run_config(cls, run_config: dict) -> FederationConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(run_config) - known)
        if unknown:
            raise ConfigError(f"unknown run config key(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**run_config)

    def to_run_config(self) -> dict:
        return asdict(self)

    def local_settings(self, *, run_id: str, server_round: int) -> LocalSettings:
        shared = {f.name: getattr(self, f.name) for f in fields(TrainingSettings)}
        return LocalSettings(run_id=run_id, server_round=server_round, **shared)

    def task_definition(self) -> Task:
        """The task every holder trains on: a bundled task, with whatever the run config gives in its place."""
        bundled = self.task in taskfile.bundled_names()
        if not bundled and not (self.template and self.label_names):
            raise ConfigError(
                f"task {self.task!r} is not bundled ({', '.join(taskfile.bundled_names())}): give a task file "
                "(fedprompt server --task FILE.toml; fedprompt task init DATA.csv writes one)"
            )
        base = taskfile.bundled(self.task) if bundled else None
        try:
            names = tuple(json.loads(self.label_names)) if self.label_names else base.labels
            words = tuple(tuple(w) for w in json.loads(self.label_words)) if self.label_words else None
        except (json.JSONDecodeError, TypeError) as exc:
            raise ConfigError(f"label_names and label_words are JSON lists ({exc})") from exc
        if words is None:
            words = base.words if base is not None and names == base.labels else tuple((f" {n}",) for n in names)
        return Task(
            name=self.task,
            labels=names,
            words=words,
            template=self.template or base.template,
            init_text=self.init_text or (base.init_text if base else None),
            scoring=self.scoring or (base.scoring if base else "sum"),
            source=f"the federation's task {self.task!r}",
        )

    def task_spec(self, model_sha256: str) -> TaskSpec:
        t = self.task_definition()
        init_text = t.init_text or DEFAULT_INIT_TEXT.format(labels=", ".join(t.labels))
        return TaskSpec(t.name, t.template, t.labels, t.words, init_text, self.model, model_sha256, t.scoring)

    @staticmethod
    def task_fields(task: Task) -> dict[str, str]:
        """The run config that gives ``task`` in full (what the coordinator sends for a task file)."""
        return {
            "task": task.name,
            "template": task.template,
            "label_names": json.dumps(list(task.labels)),
            "label_words": json.dumps(task.label_words),
            "init_text": task.init_text or "",
            "scoring": task.scoring,
        }
