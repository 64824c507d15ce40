"""Datasets: bundled ones are real, deterministic and disjoint; bad user files fail clearly."""

from __future__ import annotations

import json

import pytest

from fedprompt import datasets
from fedprompt.errors import DatasetError


def test_rotten_tomatoes_is_real_split_and_deterministic():
    ds = datasets.load("rotten-tomatoes")
    assert ds.label_names == ["negative", "positive"]
    assert len(ds.split("test")) == 500 and len(ds.split("validation")) == 500
    assert len(ds.split("train")) > 11_000
    texts = {s: {e.text for e in ds.split(s)} for s in datasets.SPLITS}
    assert not texts["train"] & texts["test"] and not texts["train"] & texts["validation"]
    assert not texts["validation"] & texts["test"]
    labels = [e.label for e in ds.split("test")]
    assert 0.3 < sum(labels) / len(labels) < 0.7  # both classes present in a realistic mix
    again = datasets.load("rotten-tomatoes")
    assert again.split("test") == ds.split("test") and again.sha256 == ds.sha256


def test_all_bundled_datasets_load():
    for name in datasets.BUNDLED:
        s = datasets.summary(datasets.load(name))
        assert s["train"] > 1000 and s["test"] > 100, name
        assert len(s["train_label_counts"]) == len(s["labels"]), name


def test_corrupt_cache_is_detected(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDPROMPT_CACHE", str(tmp_path))
    ds_dir = tmp_path / "datasets" / "vader-tweets"
    ds_dir.mkdir(parents=True)
    (ds_dir / "data.jsonl").write_text('{"text": "x", "label": "positive", "split": "train"}\n')
    (ds_dir / "meta.json").write_text(json.dumps({"sha256": "0" * 64, "examples": 1}))
    with pytest.raises(DatasetError, match="checksum"):
        datasets.load("vader-tweets")


def test_user_jsonl_and_csv(tmp_path, sentiment_file):
    ds = datasets.load(str(sentiment_file))
    assert ds.label_names == ["negative", "positive"]
    assert sum(len(v) for v in ds.splits.values()) == 240
    csv_path = tmp_path / "d.csv"
    csv_path.write_text(
        "text,label,split\n"
        + "\n".join(
            f"example {i},{'yes' if i % 2 else 'no'},{['train', 'train', 'validation', 'test'][i % 4]}"
            for i in range(20)
        )
    )
    ds = datasets.load(str(csv_path), label_names=["no", "yes"])
    assert len(ds.split("train")) == 10 and ds.split("test")[0].label == 1


@pytest.mark.parametrize(
    ("content", "suffix", "message"),
    [
        ("", ".jsonl", "empty"),
        ('{"text": "a"}\n', ".jsonl", "missing column"),
        ('{"text": "a", "label": "x"}\n{"text": "b", "label": "y"\n', ".jsonl", "invalid JSON"),
        ("text,label\n,pos\n", ".csv", "empty or non-text"),
        ("text,label\na,pos\n", ".txt", "unsupported file type"),
        ("text,label\na,pos\nb,neg\nc,pos\nd,maybe\n", ".csv", "unknown label"),
    ],
)
def test_bad_user_files_fail_clearly(tmp_path, content, suffix, message):
    path = tmp_path / f"data{suffix}"
    path.write_text(content)
    with pytest.raises(DatasetError, match=message) as err:
        datasets.load_file(path, label_names=["neg", "pos"])
    assert str(path) in str(err.value)


def test_unreadable_and_non_utf8_files(tmp_path):
    binary = tmp_path / "b.csv"
    binary.write_bytes(b"text,label\n\xff\xfe,1\n")
    with pytest.raises(DatasetError, match="not UTF-8"):
        datasets.load_file(binary)
    with pytest.raises(DatasetError, match="neither a bundled dataset"):
        datasets.load(str(tmp_path / "missing.csv"))
    folder = tmp_path / "dir.csv"
    folder.mkdir()
    with pytest.raises(DatasetError, match="cannot read"):
        datasets.load_file(folder)


def test_label_in_test_split_never_seen_in_train(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"text": f"t{i}", "label": "a" if i % 2 else "b", "split": "train"} for i in range(6)]
    rows.append({"text": "z", "label": "c", "split": "test"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DatasetError, match="never in train"):
        datasets.load_file(path)
