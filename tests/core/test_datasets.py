"""Datasets: bundled ones are real, deterministic and disjoint; bad user files fail clearly."""

from __future__ import annotations

import json

import pytest

from fedprompt.data import datasets, files
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
        files.load_file(path, label_names=["neg", "pos"])
    assert str(path) in str(err.value)


def test_unreadable_and_non_utf8_files(tmp_path):
    binary = tmp_path / "b.csv"
    binary.write_bytes(b"text,label\n\xff\xfe,1\n")
    with pytest.raises(DatasetError, match="not UTF-8"):
        files.load_file(binary)
    with pytest.raises(DatasetError, match="neither a bundled dataset"):
        datasets.load(str(tmp_path / "missing.csv"))
    folder = tmp_path / "dir.csv"
    folder.mkdir()
    with pytest.raises(DatasetError, match="cannot read"):
        files.load_file(folder)


def test_label_in_test_split_never_seen_in_train(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"text": f"t{i}", "label": "a" if i % 2 else "b", "split": "train"} for i in range(6)]
    rows.append({"text": "z", "label": "c", "split": "test"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DatasetError, match="never in train"):
        files.load_file(path)


def _rows(n: int, labels=("a", "b")) -> list[dict]:
    return [{"text": f"example number {i}", "label": labels[i % len(labels)]} for i in range(n)]


def test_a_label_that_falls_only_into_the_held_out_splits_is_refused(tmp_path):
    rows = [*_rows(60), {"text": "the one rare example", "label": "rare"}]
    path = tmp_path / "rare.jsonl"
    for seed_rows in range(40):  # without a split column the held-out parts are a seeded shuffle: find one
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        try:
            ds = files.load_file(path)
        except DatasetError as exc:
            assert "'rare'" in str(exc) and "held-out" in str(exc) and str(path) in str(exc)
            return
        assert "rare" in [ds.label_names[e.label] for e in ds.split("train")]
        rows.insert(0, {"text": f"padding {seed_rows}", "label": "a"})
    pytest.fail("the rare label never fell into a held-out split")


def test_one_field_size_limit_for_csv_and_jsonl(tmp_path):
    big = "x" * (files.MAX_FIELD_CHARS + 1)
    jsonl = tmp_path / "big.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in _rows(30)) + json.dumps({"text": big, "label": "a"}) + "\n")
    with pytest.raises(DatasetError, match=r"big\.jsonl:31: field 'text' has 131,073 characters"):
        files.load_file(jsonl)
    huge = tmp_path / "huge.jsonl"  # a 50 MB line is refused before it is parsed
    huge.write_text(json.dumps({"text": "y" * 50_000_000, "label": "a"}) + "\n")
    with pytest.raises(DatasetError, match="a line of 50,000,"):
        files.load_file(huge)
    csv = tmp_path / "big.csv"
    csv.write_text("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in _rows(30)) + f"{big},a\n")
    with pytest.raises(DatasetError, match=r"big\.csv"):
        files.load_file(csv)


@pytest.mark.parametrize("label", [{"name": "a"}, ["a"], None, True, 1.5])
def test_labels_that_are_not_strings_name_the_file(tmp_path, label):
    path = tmp_path / "odd.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _rows(30)) + json.dumps({"text": "t", "label": label}) + "\n")
    with pytest.raises(DatasetError, match=r"odd\.jsonl: example 31 has"):
        files.load_file(path)


def test_datasets_split_refuses_a_folder_with_files_in_it(tmp_path, capsys):
    from fedprompt.cli import main

    source = tmp_path / "data.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in _rows(200)))
    args = ["datasets", "split", "--dataset", str(source), "--holders", "2", "--out", str(tmp_path)]
    assert main(args) == 2
    assert "not empty" in capsys.readouterr().err
    assert source.exists()  # the source CSV next to it used to be deleted
    assert main([*args[:-1], str(tmp_path / "split")]) == 0
    assert sorted(p.name for p in (tmp_path / "split").iterdir()) == ["holder-1.jsonl", "holder-2.jsonl"]
