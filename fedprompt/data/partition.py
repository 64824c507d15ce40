"""Non-identical splits of a dataset across simulated data holders (label skew), written as holder files.

Holder h receives a share p[h, k] of the examples of label k, with each label's shares drawn from a
Dirichlet(alpha) distribution (Hsu et al. 2019): small alpha, very different label mixes. The same
shares cut the train, validation and test splits, so each holder's test split looks like its own data
and the holders' test splits together are exactly the dataset's test split.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fedprompt.cache import atomic_dir
from fedprompt.data.datasets import SPLITS, Dataset
from fedprompt.errors import ConfigError


def label_shares(num_holders: int, num_labels: int, alpha: float, seed: int = 0) -> np.ndarray:
    """A (holders × labels) matrix whose columns sum to 1."""
    if num_holders < 1 or num_labels < 1:
        raise ConfigError("need at least one holder and one label")
    if not alpha > 0:
        raise ConfigError(f"alpha must be positive, got {alpha}")
    rng = np.random.default_rng(seed)
    return rng.dirichlet([alpha] * num_holders, size=num_labels).T


def partition(ds: Dataset, num_holders: int, *, alpha: float = 1.0, seed: int = 0) -> list[list[dict]]:
    """Rows (text, label name, split) for each holder; every example goes to exactly one holder."""
    shares = label_shares(num_holders, len(ds.label_names), alpha, seed)
    rng = np.random.default_rng(seed + 1)
    holders: list[list[dict]] = [[] for _ in range(num_holders)]
    for split in SPLITS:
        examples = ds.split(split)
        for k in range(len(ds.label_names)):
            idx = [i for i, e in enumerate(examples) if e.label == k]
            rng.shuffle(idx)
            cuts = np.round(np.cumsum(shares[:, k]) * len(idx)).astype(int)
            start = 0
            for h, end in enumerate(cuts):
                for i in idx[start:end]:
                    holders[h].append({"text": examples[i].text, "label": ds.label_names[k], "split": split})
                start = end
    for h, rows in enumerate(holders):
        counts = {s: sum(r["split"] == s for r in rows) for s in ("train", "test")}
        if min(counts.values()) == 0:
            raise ConfigError(
                f"holder {h} got no {'train' if counts['train'] == 0 else 'test'} examples with alpha={alpha}, "
                f"seed={seed}; use a larger alpha or another seed"
            )
    return holders


def write_holder_files(ds: Dataset, folder: str | Path, num_holders: int, *, alpha: float, seed: int) -> list[Path]:
    """``holder-1.jsonl`` ... in ``folder`` (written atomically), loadable with ``fedprompt.data.datasets.load``."""
    folder = Path(folder)
    parts = partition(ds, num_holders, alpha=alpha, seed=seed)
    with atomic_dir(folder) as scratch:
        for h, rows in enumerate(parts, 1):
            with open(scratch / f"holder-{h}.jsonl", "w", encoding="utf-8") as fh:
                for r in rows:
                    fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    return [folder / f"holder-{h}.jsonl" for h in range(1, num_holders + 1)]


def describe(ds: Dataset, parts: list[list[dict]]) -> list[dict]:
    return [
        {
            "holder": h,
            **{s: sum(r["split"] == s for r in rows) for s in SPLITS},
            "train_labels": {n: sum(r["split"] == "train" and r["label"] == n for r in rows) for n in ds.label_names},
        }
        for h, rows in enumerate(parts, 1)
    ]
