"""DP-OPT's generator on tiny models: the teachers' shared head, the subsampling, the budget, the CLI."""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import replace

import pytest
import torch

from fedprompt import text_prompt
from fedprompt.cli import main
from fedprompt.client.dpopt import generation as dpopt
from fedprompt.client.dpopt.text import Demo, MetaPrompt, instruction_template
from fedprompt.data import datasets
from fedprompt.data.datasets import Example
from fedprompt.dp.ledger import PrivacyLedger
from fedprompt.dp.limited_domain import dpopt_epsilon
from fedprompt.errors import ArtifactError
from fedprompt.runtime import Runtime
from fedprompt.task import Verbalizer

FP32 = Runtime.create("cpu", "fp32")
# a release threshold of 1 + 2 ln(2/delta0)/eps0 = 3.5 votes, within reach of 6 greedy teachers
TESTS_CFG = dpopt.DPOPTConfig(
    teachers=6,
    shots=2,
    candidates=2,
    max_new_tokens=4,
    min_new_tokens=1,
    temperature=0.0,
    token_epsilon=6.0,
    token_delta=1e-3,
    target_epsilon=20.0,
    teacher_batch_size=4,
    holdout_fraction=0.1,
    seed=7,
)


def _examples(n: int) -> list[Example]:
    from tests.conftest import make_sentiment_rows

    return [Example(f"{r['text']} ({i})", int(r["label"] == "positive")) for i, r in enumerate(make_sentiment_rows(n))]


def _generator(loaded, cfg=TESTS_CFG, n=540, reuse_head=True):
    words = [[" negative"], [" positive"]]
    verbalizer = Verbalizer.build(loaded.tokenizer, words)
    return dpopt.DPOPTGenerator(
        loaded,
        FP32,
        verbalizer,
        "Review: {text}\nSentiment:",
        ["negative", "positive"],
        "Classify the review.",
        _examples(n),
        cfg,
        reuse_head=reuse_head,
    )


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_gpt2"])
def test_the_cached_head_gives_the_logits_of_each_teacher_run_alone(model, request):
    loaded = request.getfixturevalue(model)
    gen = _generator(loaded)
    full = dpopt.TeacherEnsemble(loaded, FP32, gen.meta.head_ids, reuse_head=False, batch_size=3)
    gen._label(range(6))
    bodies = [
        gen.meta.body_ids([gen._demo(i) for i in group], msg)
        for group, msg in (
            ([0, 1, 2], dpopt.IMPROVE_MESSAGES[0]),
            ([3], dpopt.IMPROVE_MESSAGES[1]),
            ([], dpopt.IMPROVE_MESSAGES[2]),
            ([4, 5], dpopt.IMPROVE_MESSAGES[3]),
        )
    ]
    assert len({len(b) for b in bodies}) > 1  # the batch really is ragged
    cached = gen.ensemble.next_token_logits(bodies)
    recomputed = full.next_token_logits(bodies)
    with torch.inference_mode():
        alone = torch.stack(
            [loaded.model(input_ids=torch.tensor([gen.meta.head_ids + b])).logits[0, -1] for b in bodies]
        )
    assert torch.allclose(cached, alone, atol=1e-4), (cached - alone).abs().max()
    assert torch.allclose(recomputed, alone, atol=1e-4), (recomputed - alone).abs().max()


def test_the_cached_head_stays_right_under_bfloat16_autocast(tiny_llama):
    gen = _generator(tiny_llama)
    bf16 = Runtime.create("cpu", "bf16")
    gen._label(range(4))
    bodies = [gen.meta.body_ids([gen._demo(i)], dpopt.IMPROVE_MESSAGES[0]) for i in range(4)]
    cached = dpopt.TeacherEnsemble(tiny_llama, bf16, gen.meta.head_ids, batch_size=2).next_token_logits(bodies)
    exact = gen.ensemble.next_token_logits(bodies)  # float32
    assert cached.dtype == torch.float32
    assert (cached - exact).abs().max() < 0.05 * exact.abs().max()


def test_every_sampled_example_sits_in_exactly_one_teacher():
    draws = dpopt.Draws(3)
    sizes, teacher_load = [], Counter()
    for _ in range(400):
        groups = dpopt.sample_groups(1000, sample_rate=0.05, teachers=5, draws=draws)
        flat = [i for g in groups for i in g]
        assert len(flat) == len(set(flat))
        assert all(0 <= i < 1000 for i in flat)
        sizes.append(len(flat))
        teacher_load.update({j: len(g) for j, g in enumerate(groups)})
    mean = sum(sizes) / len(sizes)
    assert abs(mean - 50) < 2  # Poisson sampling at rate q: q * n expected, sd 6.9 / sqrt(400)
    assert max(teacher_load.values()) / min(teacher_load.values()) < 1.1  # uniform over teachers


def test_the_holdout_is_decided_per_example():
    examples = _examples(400)
    gen, hold = dpopt.split_holdout(examples, 0.25, b"key")
    assert len(gen) + len(hold) == 400 and 60 < len(hold) < 140
    # adding an example moves nobody else: the two parts stay disjoint under add/remove
    gen2, hold2 = dpopt.split_holdout([Example("A new review.", 1), *examples], 0.25, b"key")
    assert {e.text for e in hold} <= {e.text for e in hold2} and {e.text for e in gen} <= {e.text for e in gen2}
    assert len(hold2) + len(gen2) == 401
    # another key, another split
    assert dpopt.split_holdout(examples, 0.25, b"other")[1] != hold


def test_generation_stops_before_the_budget_is_passed(tiny_llama):
    # a target that a handful of releases exhausts
    cfg = replace(TESTS_CFG, target_epsilon=8.0, candidates=50, max_new_tokens=8)
    gen = _generator(tiny_llama, cfg)
    assert 0 < gen.query_limit < 20
    assert dpopt_epsilon(gen.query_limit + 1, **gen._accounting()) > cfg.target_epsilon
    _, exhausted, _ = gen.generate()
    assert exhausted and gen.queries == gen.query_limit
    assert gen.epsilon_spent() <= cfg.target_epsilon
    assert gen.epsilon_spent() == dpopt_epsilon(gen.queries, **gen._accounting())


def test_failed_releases_are_queries_too(tiny_llama):
    # eps0 so small that the noisy threshold is out of reach: every query fails and still counts
    cfg = replace(TESTS_CFG, token_epsilon=0.05, target_epsilon=50.0, candidates=3, retries_per_token=1)
    gen = _generator(tiny_llama, cfg)
    texts, exhausted, tokens = gen.generate()
    assert texts == [] and tokens == 0 and not exhausted
    assert gen.failures == gen.queries == 3 * 2  # one retry per candidate, then the candidate stops
    assert gen.epsilon_spent() == pytest.approx(dpopt_epsilon(6, **gen._accounting()))
    # with retries to spare, a candidate stops after max_failures + 1 failures: the ledger's projection holds
    gen = _generator(tiny_llama, replace(cfg, retries_per_token=10, max_failures=2))
    gen.generate()
    assert gen.queries == 3 * 3 <= gen.projected_queries()


def test_the_nonprivate_ensemble_releases_the_plurality(tiny_llama):
    gen = _generator(tiny_llama, replace(TESTS_CFG, private=False))
    assert gen.release(Counter({5: 3, 9: 2, 11: 3}), 512) in (5, 11)
    assert gen.release(Counter({9: 1}), 512) == 9
    assert math.isinf(gen.epsilon_spent())


def test_a_run_selects_a_candidate_and_accounts_generation_and_selection(tiny_llama):
    verbalizer = Verbalizer.build(tiny_llama.tokenizer, [[" negative"], [" positive"]])
    gen, holdout = dpopt.prepare(
        tiny_llama,
        FP32,
        verbalizer,
        "Review: {text}\nSentiment:",
        ["negative", "positive"],
        "Classify.",
        _examples(600),
        TESTS_CFG,
    )
    result = dpopt.finish(gen, holdout, "Review: {text}\nSentiment:")
    assert result.candidates and result.chosen in result.candidates
    assert result.generation_examples + result.holdout_examples == 600
    assert result.epsilon_selection == TESTS_CFG.target_epsilon
    assert result.epsilon == max(result.epsilon_generation, result.epsilon_selection)
    # the guarantee is the projection's (a count fixed before the run), valid under adaptive stopping; the
    # realised count's epsilon is shown to the holder and is never more
    assert result.epsilon_generation == dpopt_epsilon(gen.projected_queries(), **gen._accounting())
    assert result.epsilon_generation_realised == dpopt_epsilon(result.queries, **gen._accounting())
    assert result.epsilon_generation_realised <= result.epsilon_generation <= TESTS_CFG.target_epsilon
    assert dpopt.projected_epsilon(gen) == result.epsilon and result.queries <= gen.projected_queries()


def test_meta_prompt_sections(tiny_llama):
    meta = MetaPrompt(tiny_llama.tokenizer, "Classify.", max_demo_tokens=64)
    ok, wrong = Demo("good film", "positive", "positive"), Demo("bad film", "negative", "positive")
    body = meta.body_ids([(True, meta.demo_ids(ok)), (False, meta.demo_ids(wrong))], dpopt.IMPROVE_MESSAGES[2])
    text = tiny_llama.tokenizer.decode(meta.head_ids + body)
    assert text.index("good film") < text.index("# Student errors") < text.index("bad film")
    assert "Student Output: positive\nCorrect Output: negative" in text
    assert text.endswith("Improved Instruction:")
    assert instruction_template("Say {x}.", "Review: {text}") == "Say {{x}}.\n\nReview: {text}"
    assert instruction_template("Say {x}.", "Review: {text}").format(text="t") == "Say {x}.\n\nReview: t"


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="teachers"):
        dpopt.DPOPTConfig(teachers=0)
    with pytest.raises(ValueError, match="holdout_fraction"):
        dpopt.DPOPTConfig(holdout_fraction=1.0)
    with pytest.raises(ValueError, match="token_delta"):
        dpopt.DPOPTConfig(token_delta=0)


def test_text_prompt_artifact_round_trip_and_tamper(tmp_path):
    meta = text_prompt.TextPromptMeta(
        task="t",
        template="{text}",
        label_names=["a", "b"],
        label_words=[[" a"], [" b"]],
        writer_model_id="m",
        writer_model_sha256="0" * 64,
        initial_instruction="Classify.",
        privacy={"epsilon": 8.0, "delta": 1e-5, "accountant": dpopt.ACCOUNTANT},
    )
    text_prompt.save(tmp_path / "p", "Say whether it is a or b.", meta)
    text, loaded = text_prompt.load(tmp_path / "p")
    assert text == "Say whether it is a or b." and loaded.privacy["epsilon"] == 8.0
    (tmp_path / "p" / text_prompt.TEXT_FILE).write_text("Something else.")
    with pytest.raises(ArtifactError, match="does not match"):
        text_prompt.load(tmp_path / "p")
    with pytest.raises(ArtifactError, match="empty"):
        text_prompt.save(tmp_path / "q", "  ", meta)
    assert not (tmp_path / "q").exists()


def _cli(tmp_path, sentiment_file, *extra):
    return main(
        [
            "dpopt",
            "--model",
            "tiny-llama",
            "--dataset",
            str(sentiment_file),
            "--out",
            str(tmp_path / "prompt"),
            "--state",
            str(tmp_path / "state"),
            "--preset",
            "quick",
            "--teachers",
            "6",
            "--token-delta",
            "1e-3",
            "--target-epsilon",
            "20",
            "--candidates",
            "2",
            "--max-new-tokens",
            "4",
            "--token-epsilon",
            "6",
            "--temperature",
            "0",
            "--holdout-fraction",
            "0.1",
            "--seed",
            "3",
            "--eval-model",
            "tiny-gpt2",
            "--precision",
            "fp32",
            *extra,
        ]
    )


def test_cli_writes_the_prompt_charges_the_ledger_and_reports(tmp_path, sentiment_file, capsys):
    report = tmp_path / "report.json"
    assert _cli(tmp_path, sentiment_file, "--budget-epsilon", "20", "--report", str(report)) == 0
    out = capsys.readouterr().out
    assert "candidate 1:" in out
    text, meta = text_prompt.load(tmp_path / "prompt")
    assert text.strip() and meta.privacy["accountant"] == dpopt.ACCOUNTANT
    assert meta.privacy["epsilon"] == pytest.approx(20.0)  # the selection's epsilon: the larger of the two
    assert "accuracy" not in json.dumps(meta.settings)  # nothing measured on the holder's data ships
    releases = PrivacyLedger(tmp_path / "state").releases()
    assert [(r.mechanism, r.status) for r in releases] == [("dp-opt", "committed")]
    assert releases[0].epsilon == pytest.approx(meta.privacy["epsilon"])
    # the text prompt works on another model: fedprompt eval reads it
    capsys.readouterr()
    args = ["eval", "--prompt", str(tmp_path / "prompt"), "--model", "tiny-gpt2", "--dataset", str(sentiment_file)]
    assert main([*args, "--zero-shot", "--precision", "fp32"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["model"] == "tiny-gpt2" and 0 <= evaluated["accuracy"] <= 1
    assert evaluated["privacy"]["epsilon"] == pytest.approx(20.0)
    figures = json.loads(report.read_text())
    assert set(figures["accuracy"]) == {"tiny-llama", "tiny-gpt2"}
    assert set(figures["accuracy"]["tiny-gpt2"]) == {
        "zero_shot_template",
        "zero_shot_instruction",
        "dp_opt",
        "nonprivate_ensemble",
    }


def test_cli_refuses_past_the_budget_before_anything_is_released(tmp_path, sentiment_file, capsys):
    assert _cli(tmp_path, sentiment_file, "--budget-epsilon", "5") == 2
    assert "budget" in capsys.readouterr().err
    assert not (tmp_path / "prompt").exists()
    assert PrivacyLedger(tmp_path / "state").releases() == []


def test_bundled_tasks_carry_an_initial_instruction():
    from fedprompt import taskfile

    assert sorted(datasets.BUNDLED) == taskfile.bundled_names()  # every bundled dataset ships its task file
    for name in datasets.BUNDLED:
        assert taskfile.bundled(name).init_text
