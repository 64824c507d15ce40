"""Non-private tuning and the command line, end to end on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_sentiment_rows

from fedprompt.cli import main
from fedprompt.runtime import Runtime
from fedprompt.training import Session, tune
from fedprompt.tuning_settings import TuneConfig


def _session(tiny_llama, sentiment_file):
    return Session(tiny_llama, str(sentiment_file), runtime=Runtime.create("cpu", "fp32"))


def test_tuning_lowers_the_training_loss(tiny_llama, tmp_path):
    # A random tiny model cannot read sentiment, but a prompt can learn the 90/10 label prior,
    # which takes the loss well below the ~0.69 of an uninformed prompt.
    rows = make_sentiment_rows(200)
    for i, r in enumerate(rows):
        r["label"] = "positive" if i % 10 else "negative"
    path = tmp_path / "skewed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = _session(tiny_llama, path)
    cfg = TuneConfig(prompt_length=16, steps=60, lr=0.2, batch_size=16, eval_every=0, init="vocab")
    batch = s.collate(s.encode_split("train")[:64])
    initial, _ = s.initial_prompt(cfg)
    with torch.no_grad():
        before = float(s.prompted(initial).classification_loss(batch, s.verbalizer))
    result = tune(s, cfg)
    with torch.no_grad():
        after = float(s.prompted(result.weight).classification_loss(batch, s.verbalizer))
    assert after < before - 0.07, (before, after)
    assert torch.equal(result.initial, initial)


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="prompt_length"):
        TuneConfig(prompt_length=0)
    with pytest.raises(ValueError, match="lr"):
        TuneConfig(lr=float("nan"))
    with pytest.raises(ValueError, match="init"):
        TuneConfig(init="zeros")


def test_cli_tune_then_eval(tmp_path, sentiment_file, capsys):
    out = tmp_path / "prompt"
    args = [
        "tune",
        "--model",
        "tiny-llama",
        "--dataset",
        str(sentiment_file),
        "--out",
        str(out),
        "--steps",
        "3",
        "--eval-every",
        "0",
        "--prompt-length",
        "4",
        "--batch-size",
        "8",
        "--precision",
        "fp32",
        "--device",
        "cpu",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    for line in ("zero_shot", "initial_prompt", "tuned_prompt"):
        assert line in printed
    meta = json.loads((out / "fedprompt.json").read_text())
    assert meta["privacy"] is None and meta["base_model_id"] == "tiny-llama"
    assert set(meta["training"]["test_accuracy"]) == {"zero_shot", "initial_prompt", "tuned_prompt"}

    # a second run into the same folder is refused and changes nothing
    before = (out / "adapter_model.safetensors").read_bytes()
    assert main(args) == 2
    assert "not empty" in capsys.readouterr().err
    assert (out / "adapter_model.safetensors").read_bytes() == before

    assert (
        main(
            [
                "eval",
                "--prompt",
                str(out),
                "--dataset",
                str(sentiment_file),
                "--zero-shot",
                "--device",
                "cpu",
                "--precision",
                "fp32",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["accuracy"] == meta["training"]["test_accuracy"]["tuned_prompt"]
    assert report["zero_shot_accuracy"] == meta["training"]["test_accuracy"]["zero_shot"]


def test_cli_reports_user_errors_without_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("body,label\nx,1\n")
    assert main(["tune", "--model", "tiny-llama", "--dataset", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "missing column" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
    assert main(["eval", "--prompt", str(tmp_path)]) == 2
    assert "not a prompt artifact" in capsys.readouterr().err
    assert main(["tune", "--model", "tiny-llama", "--dataset", str(bad), "--out", str(bad)]) == 2
    assert "is a file" in capsys.readouterr().err
    assert bad.read_text() == "body,label\nx,1\n"


def test_cli_models_list(capsys):
    assert main(["models", "list"]) == 0
    assert "smollm2-135m" in capsys.readouterr().out


def test_the_cli_shows_a_bug_as_a_traceback_and_a_user_error_in_one_line(monkeypatch, capsys, tmp_path):
    from fedprompt import cli
    from fedprompt.cli import models as model_commands

    def bug(args):
        raise ValueError("an internal invariant broke")

    # build_parser binds it when main() builds the parser
    monkeypatch.setattr(model_commands, "cmd_datasets", bug)
    with pytest.raises(ValueError, match="internal invariant"):
        cli.main(["datasets", "list"])
    assert cli.main(["tune", "--out", str(tmp_path / "x"), "--steps", "0"]) == 2  # a user's setting: one line
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err


def test_every_flag_of_every_command_has_a_help_text():
    import argparse

    from fedprompt.cli import build_parser

    def missing(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from missing(sub, [*path, name])
            elif not isinstance(action, argparse._HelpAction) and not action.help:
                yield " ".join(path), action.option_strings or [action.dest]

    assert list(missing(build_parser(), ["fedprompt"])) == []
