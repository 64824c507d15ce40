"""Shared fixtures: an isolated cache, tiny models, a small learnable dataset file."""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# One cache for the whole run (tiny models build in well under a second; registry downloads are reused
# between runs of the suite on one machine), kept apart from the user's own cache.
os.environ.setdefault("FEDPROMPT_CACHE", str(ROOT / ".test-cache"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

POSITIVE = ["great", "wonderful", "superb", "moving", "funny", "good", "fine", "happy"]
NEGATIVE = ["awful", "terrible", "dull", "boring", "bad", "tedious", "sad", "angry"]


def make_sentiment_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        words = rng.sample(POSITIVE if label else NEGATIVE, 3)
        rows.append({"text": f"The movie was {' and '.join(words)}.", "label": "positive" if label else "negative"})
    return rows


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # a test that asks for the PostgreSQL server (tests/pg.py) needs one, whatever its module says
    for item in items:
        if "postgres_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.postgres)


@pytest.fixture
def sentiment_file(tmp_path: Path) -> Path:
    path = tmp_path / "reviews.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in make_sentiment_rows(240)))
    return path


@pytest.fixture(scope="session")
def tiny_llama():
    from fedprompt.models import zoo

    return zoo.load("tiny-llama")


@pytest.fixture(scope="session")
def tiny_gpt2():
    from fedprompt.models import zoo

    return zoo.load("tiny-gpt2")


def round_config(model, **settings) -> dict:
    """A train/evaluate request's config as the ServerApp sends it: the task on ``model`` and the local settings
    (a 2-round run of 2 local steps of batch 8 at the holder's own delta ceiling unless ``settings`` say otherwise)."""
    from fedprompt.protocols.rounds import LocalSettings, TaskSpec

    task = TaskSpec(
        "reviews",
        "{text}\nAnswer:",
        ("negative", "positive"),
        ((" negative",), (" positive",)),
        "Classify.",
        model.model_id,
        model.weights_sha256,
    )
    base = {"run_id": "r", "server_round": 1, "num_rounds": 2, "local_steps": 2, "batch_size": 8, "delta": 0.0}
    base.update(settings)
    return {**task.to_config(), **LocalSettings(**base).to_config()}


def wait_for(predicate, timeout: float, what: str, logs: Path, *, poll: float = 0.5) -> None:
    """Poll ``predicate`` until it holds; on a timeout fail with the tail of every log under ``logs``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(poll)
    dump = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(logs.glob("*.log")))
    raise AssertionError(f"timed out waiting for {what}\n{dump}")


@pytest.fixture
def as_serverapp(monkeypatch):
    """Messages are made inside a run's process, whose identity Flower sets; set it as a ServerApp's would be."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 1), ("_node_id", 1), ("_task_id", 0)):
        monkeypatch.setattr(TaskIdentity, attr, value, raising=False)
