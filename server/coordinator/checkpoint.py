"""The coordinator's checkpoints: the global prompt after every round, and what a restart needs to go on.

Layout of a checkpoint folder::

    round-0003/                  the global prompt after round 3, a prompt artifact (PEFT-loadable)
    strategy-0003.safetensors    the server optimiser's state (FedAdam moments) after round 3
    state.json                   the commit point: last completed round, history, run fingerprint

Each file is written atomically and ``state.json`` last, so a coordinator killed at any moment restarts
from the last round whose three parts are all on disk.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fedprompt import artifact
from fedprompt.artifact import ArtifactMeta
from fedprompt.cache import write_json_atomic
from fedprompt.errors import FedPromptError

STATE_FILE = "state.json"


@dataclass
class Checkpoint:
    round: int
    weight: torch.Tensor
    meta: ArtifactMeta
    strategy_state: dict[str, torch.Tensor]
    history: list[dict] = field(default_factory=list)


def round_dir(folder: Path, rnd: int) -> Path:
    """Round ``rnd``'s prompt artifact in a checkpoint folder (a stock PEFT folder plus fedprompt.json)."""
    return folder / f"round-{rnd:04d}"


def _strategy_file(folder: Path, rnd: int) -> Path:
    return folder / f"strategy-{rnd:04d}.safetensors"


def save(folder: str | Path, ckpt: Checkpoint, fingerprint: dict) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    prompt_dir = round_dir(folder, ckpt.round)
    artifact.save(prompt_dir, ckpt.weight, ckpt.meta)
    strategy = _strategy_file(folder, ckpt.round)
    tmp = strategy.with_name(f".{strategy.name}.tmp")
    save_file({k: v.contiguous() for k, v in ckpt.strategy_state.items()}, str(tmp))
    os.replace(tmp, strategy)
    write_json_atomic(
        folder / STATE_FILE,
        {
            "round": ckpt.round,
            "prompt": prompt_dir.name,
            "strategy_state": strategy.name,
            "fingerprint": fingerprint,
            "history": ckpt.history,
        },
    )
    return prompt_dir


def latest(folder: str | Path, fingerprint: dict) -> Checkpoint | None:
    """The last completed round in ``folder``, or None when it holds none. A checkpoint of another run
    (another task, model, prompt shape or strategy) is refused rather than silently continued."""
    folder = Path(folder)
    path = folder / STATE_FILE
    if not path.exists():
        return None
    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise FedPromptError(f"{path}: unreadable checkpoint state ({exc})") from exc
    if state.get("fingerprint") != fingerprint:
        diff = {
            k: (state.get("fingerprint", {}).get(k), v)
            for k, v in fingerprint.items()
            if state.get("fingerprint", {}).get(k) != v
        }
        raise FedPromptError(
            f"{folder} holds checkpoints of another federation (differs in {diff}); "
            "choose another checkpoint folder or remove this one"
        )
    weight, meta = artifact.load(folder / state["prompt"])
    strategy_state = load_file(str(folder / state["strategy_state"]))
    return Checkpoint(state["round"], weight, meta, strategy_state, state.get("history", []))
