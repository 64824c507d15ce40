"""One's own data, first class: a user CSV (own column names, multi-token labels that share their first token)
through `fedprompt task init`, `tune`, `eval` and a real federation, with the scores stock PEFT gives."""

from __future__ import annotations

import csv
import json
import random

import pytest
import torch
from conftest import wait_for
from peft import PeftModel

from fedprompt import artifact, taskfile
from fedprompt.cli import main
from fedprompt.dp.ledger import PrivacyLedger
from fedprompt.local_federation import HolderSpec, LocalFederation
from fedprompt.models import zoo

# Three outlets, two of which share their first token on the tiny tokenizer (" "); every name is several tokens
OUTLETS = ("nprhealth", "nytimeshealth", "goodnews")
WORDS = {
    "nprhealth": ["wonderful", "moving", "funny", "superb", "classic", "great"],
    "nytimeshealth": ["dull", "boring", "tedious", "predictable", "terrible", "awful"],
    "goodnews": ["government", "policy", "trade", "economy", "politics", "business"],
}


def write_tweets(path, n: int = 150, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "tweet", "outlet"])
        for i in range(n):
            outlet = OUTLETS[i % 3]
            w.writerow([i, f"It was {' and '.join(rng.sample(WORDS[outlet], 3))} today.", outlet])


@pytest.fixture
def tweets(tmp_path):
    path = tmp_path / "tweets.csv"
    write_tweets(path)
    return path


RUNTIME = ["--device", "cpu", "--precision", "fp32"]


def _init(tweets, out, capsys) -> str:
    args = ["task", "init", str(tweets), "--out", str(out), "--model", "tiny-llama", "--text-column", "tweet",
            "--label-column", "outlet", "--examples", "15", *RUNTIME]  # fmt: skip
    assert main(args) == 0
    return capsys.readouterr().err


def test_task_init_proposes_words_and_the_best_template_and_explains_shared_first_tokens(tweets, tmp_path, capsys):
    out = tmp_path / "tweets.task.toml"
    err = _init(tweets, out, capsys)
    task = taskfile.read(out)
    assert task.labels == tuple(sorted(OUTLETS)) and task.words == tuple((f" {n}",) for n in sorted(OUTLETS))
    assert (task.text_column, task.label_column, task.data) == ("tweet", "outlet", str(tweets.resolve()))
    # every candidate was measured on validation and the best one was kept
    text = out.read_text()
    measured = [line for line in text.splitlines() if line.startswith("#  ") and "%" in line]
    assert len(measured) >= 7
    best = max(measured, key=lambda line: float(line.split("%")[0].strip("# ")))
    assert repr(task.template) in best
    # the words' tokens are shown, and the shared first token is explained, not refused
    assert "' nprhealth' -> 8 token(s)" in err
    assert "'nprhealth', 'nytimeshealth' share their first token ' ': fine" in err
    # a second init does not overwrite without --force
    assert main(["task", "init", str(tweets), "--out", str(out), "--model", "tiny-llama"]) == 2
    assert "exists" in capsys.readouterr().err


def test_task_check_names_both_labels_of_a_collision_and_init_writes_nothing_on_bad_columns(tweets, tmp_path, capsys):
    out = tmp_path / "t.toml"
    _init(tweets, out, capsys)
    bad = out.read_text().replace('words = [" nytimeshealth"]', 'words = [" nprhealth"]')
    (tmp_path / "bad.toml").write_text(bad)
    assert main(["task", "check", str(tmp_path / "bad.toml"), "--model", "tiny-llama", "--examples", "0"]) == 2
    err = capsys.readouterr().err
    assert "label 'nytimeshealth' (word ' nprhealth') and label 'nprhealth' (word ' nprhealth')" in err
    assert main(["task", "init", str(tweets), "--out", str(tmp_path / "none.toml"), "--model", "tiny-llama"]) == 2
    assert "missing column(s) text, label; found id, tweet, outlet" in capsys.readouterr().err
    assert not (tmp_path / "none.toml").exists()


def test_tune_and_eval_use_the_task_and_peft_gives_the_same_scores(tweets, tmp_path, capsys):
    task_file, prompt = tmp_path / "t.toml", tmp_path / "prompt"
    _init(tweets, task_file, capsys)
    tune = ["tune", "--task", str(task_file), "--model", "tiny-llama", "--out", str(prompt), "--steps", "4",
            "--eval-every", "0", "--prompt-length", "4", "--batch-size", "8", "--lr", "0.05", "--dp",
            "--target-epsilon", "4", "--budget-epsilon", "5", "--state", str(tmp_path / "state"), *RUNTIME]  # fmt: skip
    assert main(tune) == 0
    weight, meta = artifact.load(prompt)
    task = taskfile.read(task_file)
    assert (meta.label_words, meta.template, meta.scoring) == (task.label_words, task.template, "sum")
    assert "fedprompt models path tiny-llama" in (prompt / "README.md").read_text()
    assert [r.status for r in PrivacyLedger(tmp_path / "state").releases()] == ["committed"]
    capsys.readouterr()

    # the artifact names a task that is not bundled: eval asks for the data instead of guessing
    assert main(["eval", "--prompt", str(prompt), *RUNTIME]) == 2
    assert "give the data to evaluate on (--data FILE)" in capsys.readouterr().err
    preds = tmp_path / "predictions.csv"
    args = ["eval", "--prompt", str(prompt), "--task", str(task_file), "--predictions", str(preds), *RUNTIME]
    assert main([*args, "--batch-size", "32"]) == 0
    report = json.loads(capsys.readouterr().out)
    matrix = report["confusion"]["matrix"]
    n = report["examples"]
    assert sum(map(sum, matrix)) == n and report["accuracy"] == pytest.approx(sum(matrix[i][i] for i in range(3)) / n)
    assert set(report["per_class"]) == set(OUTLETS)
    rows = list(csv.DictReader(open(preds, encoding="utf-8")))
    assert len(rows) == n and sum(int(r["correct"]) for r in rows) == sum(matrix[i][i] for i in range(3))
    # one accuracy whatever the batch size (fp32): the same predictions one by one
    assert main([*args, "--batch-size", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["confusion"] == report["confusion"]

    # stock PEFT on the artifact, one label word at a time appended to the text: the scores written for the test
    # examples
    loaded = zoo.load("tiny-llama")
    peft_model = PeftModel.from_pretrained(loaded.model, str(prompt)).eval()
    tok = loaded.tokenizer
    for row in rows[:4]:
        text_ids = tok(task.template.format(text=row["text"])).input_ids
        for label, (word,) in zip(task.labels, task.words, strict=True):
            seq = tok(word, add_special_tokens=False).input_ids
            ids = torch.tensor([text_ids + seq])
            with torch.no_grad():
                logp = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].log_softmax(-1)
            at = weight.shape[0] + len(text_ids) - 1
            expected = float(sum(logp[at + j, t] for j, t in enumerate(seq)))
            assert float(row[f"score:{label}"]) == pytest.approx(expected, abs=1e-3)


@pytest.mark.integration
def test_a_federation_on_the_task_file(tweets, tmp_path, capsys):
    task_file = tmp_path / "t.toml"
    _init(tweets, task_file, capsys)
    holders = []
    for i in range(1, 3):
        path = tmp_path / f"holder-{i}.csv"
        write_tweets(path, n=90, seed=i)
        holders.append(HolderSpec(f"holder-{i}", path, 20.0))
    with LocalFederation(tmp_path / "fed", holders) as fed:
        fed.start_server(
            "--model", "tiny-llama", "--task", str(task_file), "--num-rounds", "1", "--local-steps", "2",
            "--batch-size", "8", "--min-available-nodes", "2", "--min-train-nodes", "2", "--round-timeout-s", "90",
        )  # fmt: skip
        for h in holders:
            fed.start_holder(h, "--task", str(task_file))
        wait_for(lambda: "connected to" in fed.tail("holder-1", 200), 120, "holder-1 connected", fed.logs)
        history = fed.wait(300)
    assert [r["round"] for r in history] == [0, 1] and set(history[1]["holders"]) == {"holder-1", "holder-2"}
    _, meta = artifact.load(fed.checkpoints / "round-0001")
    assert meta.label_words == taskfile.read(task_file).label_words and meta.task == "tweets"
    server_log = (fed.logs / "server.log").read_text()
    assert "task tweets: labels goodnews, nprhealth, nytimeshealth" in server_log
    assert "holders online" in server_log
    holder_log = fed.tail("holder-1", 200)
    assert "round 1/1: epsilon" in holder_log  # each round's epsilon, on the holder


@pytest.mark.integration
def test_a_holder_pointed_at_the_wrong_port_says_it_cannot_reach_the_coordinator(sentiment_file, tmp_path):
    from fedprompt import flower_procs as fp

    holder = HolderSpec("h", sentiment_file, 5.0)
    with LocalFederation(tmp_path / "fed", [holder]) as fed:
        fed.start_holder(holder, superlink=f"127.0.0.1:{fp.free_port()}")
        wait_for(lambda: "cannot reach the coordinator" in fed.tail("h", 100), 90, "the holder's message", fed.logs)


def test_the_coordinator_refuses_a_bad_task_before_it_starts_anything(tweets, tmp_path, capsys):
    base = ["server", "--certs", str(tmp_path / "certs"), "--state", str(tmp_path / "coord"), "--model", "tiny-llama"]
    assert main([*base, "--task", "health-tweets"]) == 2
    err = capsys.readouterr().err
    assert "task 'health-tweets' is not bundled" in err and "fedprompt task init DATA.csv" in err
    same = tmp_path / "same.toml"
    same.write_text(
        'name = "t"\ntemplate = "{text}\\nSource:"\n[[labels]]\nname = "a"\nwords = [" x"]\n'
        '[[labels]]\nname = "b"\nwords = [" x"]\n'
    )
    assert main([*base, "--task", str(same)]) == 2
    assert "' x' of label 'b' and ' x' of label 'a' are the same tokens" in capsys.readouterr().err
    assert main([*base, "--set", "template=Tweet: {text}\\nSource:"]) == 2  # the shell's \n: two characters
    assert "keeps backslashes" in capsys.readouterr().err
    assert not (tmp_path / "coord").exists()  # nothing was started or written
