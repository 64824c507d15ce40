"""POST distillation on tiny models: the student's make-up, its loss, checkpoints, resume, registration."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from torch.nn import functional as F

from fedprompt.data import corpora
from fedprompt.errors import DatasetError, FedPromptError
from fedprompt.models import zoo
from fedprompt.models.student import build_student, decoder_layers, parse_keep_layers, tokenizer_sha256
from fedprompt.runtime import Runtime
from fedprompt.server.post.distill import CHECKPOINT, HISTORY, DistillConfig, distill
from fedprompt.server.post.distill_loss import distillation_loss

FP32 = Runtime(torch.device("cpu"), "fp32")


@pytest.fixture
def own_cache(monkeypatch, tmp_path):
    """Registrations go to a cache of this test's own (tiny models rebuild there in well under a second)."""
    monkeypatch.setenv("FEDPROMPT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def corpus_file(tmp_path):
    from tests.conftest import make_sentiment_rows

    lines = [r["text"] + " It was a film about people and their lives." for r in make_sentiment_rows(400, seed=3)]
    path = tmp_path / "public.txt"
    path.write_text("\n".join(f"{i}: {t}" for i, t in enumerate(lines)) + "\n")
    return path


def trained_teacher(corpus_file, folder, steps: int = 150):
    """tiny-llama-4l after some plain language-model training on the corpus: a random teacher predicts a
    near-uniform distribution, which leaves a student nothing to learn from it."""
    from fedprompt.server.post.distill import batch_indices, pack

    teacher = zoo.load("tiny-llama-4l")
    model = teacher.model
    model.requires_grad_(True).train()
    blocks = pack(teacher.tokenizer, corpora.load(str(corpus_file)).train, 32)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    for step in range(1, steps + 1):
        ids = blocks[batch_indices(len(blocks), 8, step, seed=1)]
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.requires_grad_(False).eval()
    model.save_pretrained(folder)
    teacher.tokenizer.save_pretrained(folder)
    (folder / zoo.MANIFEST).write_text(json.dumps({"name": "tiny-teacher"}))
    return zoo.load(str(folder))


def test_keep_layer_specs():
    assert parse_keep_layers("first3,last3", 30) == [0, 1, 2, 27, 28, 29]
    assert parse_keep_layers("0-2, 27-29", 30) == [0, 1, 2, 27, 28, 29]
    assert parse_keep_layers("0,-1", 30) == [0, 29]
    assert parse_keep_layers("every10", 30) == [0, 10, 20, 29]
    for bad, message in [("", "empty"), ("0-40", "outside"), ("5-2", "backwards"), ("top3", "cannot read")]:
        with pytest.raises(ValueError, match=message):
            parse_keep_layers(bad, 30)
    with pytest.raises(ValueError, match="that is the teacher"):
        parse_keep_layers("first2,last2", 4)


@pytest.mark.parametrize(("name", "keep"), [("tiny-llama-4l", [0, 3]), ("tiny-gpt2", [1])])
def test_the_student_is_the_teachers_kept_layers_with_its_embeddings_and_head(name, keep):
    teacher = zoo.load(name)
    student = build_student(teacher.model, keep)
    t_prefix, t_layers = decoder_layers(teacher.model)
    s_prefix, s_layers = decoder_layers(student)
    assert t_prefix == s_prefix and len(s_layers) == len(keep)
    for new, old in enumerate(keep):
        pairs = zip(t_layers[old].state_dict().items(), s_layers[new].state_dict().items(), strict=True)
        for (n1, a), (n2, b) in pairs:
            assert n1 == n2 and torch.equal(a, b)
    assert torch.equal(student.get_input_embeddings().weight, teacher.model.get_input_embeddings().weight)
    assert torch.equal(student.get_output_embeddings().weight, teacher.model.get_output_embeddings().weight)
    # it runs, and differs from the teacher only because layers are missing
    ids = teacher.tokenizer("The movie was great.", return_tensors="pt").input_ids
    assert student(input_ids=ids).logits.shape == teacher.model(input_ids=ids).logits.shape


def test_the_fused_loss_is_posts_formula_with_its_gradient():
    torch.manual_seed(0)
    cfg = DistillConfig()
    b, length, vocab, hidden = 2, 6, 13, 5
    s_logits = torch.randn(b, length, vocab, dtype=torch.float64, requires_grad=True)
    t_logits = torch.randn(b, length, vocab, dtype=torch.float64)
    s_h = torch.randn(b, length, hidden, dtype=torch.float64, requires_grad=True)
    t_h = torch.randn(b, length, hidden, dtype=torch.float64)
    ids = torch.randint(0, vocab, (b, length))
    parts = distillation_loss(s_logits, t_logits, s_h, t_h, ids, cfg)
    t = cfg.temperature
    s_log, t_log = F.log_softmax(s_logits / t, -1), F.log_softmax(t_logits / t, -1)
    kl = (t_log.exp() * (t_log - s_log)).sum(-1).mean() * t * t
    lm = F.cross_entropy(s_logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    cos = (1 - F.cosine_similarity(s_h, t_h, dim=-1)).mean()
    reference = 5 * kl + 2 * lm + 1 * cos
    assert float(parts.total) == pytest.approx(float(reference), rel=1e-5)
    assert parts.kl == pytest.approx(float(kl), rel=1e-5) and parts.lm == pytest.approx(float(lm), rel=1e-5)
    ours = torch.autograd.grad(parts.total, (s_logits, s_h))
    theirs = torch.autograd.grad(reference, (s_logits, s_h))
    for a, b_ in zip(ours, theirs, strict=True):
        assert torch.allclose(a, b_, atol=1e-6)


def test_distillation_lowers_the_loss_and_registers_the_student(own_cache, corpus_file, tmp_path):
    teacher = trained_teacher(corpus_file, tmp_path / "teacher")
    cfg = DistillConfig(
        keep_layers="first1,last1", corpus=str(corpus_file), steps=40, batch_size=4, seq_len=32, lr=3e-3,
        warmup_steps=2, checkpoint_every=10, heldout_blocks=4,
    )  # fmt: skip
    out = tmp_path / "student"
    result = distill(teacher, cfg, out, name="tiny-student", runtime=FP32)
    history = json.loads((out / HISTORY).read_text())
    first, last = history[:5], history[-5:]
    assert sum(r["loss"] for r in last) < 0.7 * sum(r["loss"] for r in first)
    assert sum(r["kl"] for r in last) < 0.5 * sum(r["kl"] for r in first)
    m = result.manifest
    assert m["teacher"] == {"id": "tiny-teacher", "weights_sha256": teacher.weights_sha256}
    assert m["layers_kept"] == [0, 3] and m["teacher_layers"] == 4
    assert m["distillation"]["tokens"] == 40 * 4 * 32 and m["distillation"]["heldout"]["blocks"] == 4
    assert not (out / CHECKPOINT).exists()
    # an ordinary Hugging Face folder, registered by name, with the teacher's tokenizer and embeddings
    student = zoo.load("tiny-student")
    assert student.weights_sha256 == m["weights_sha256"]
    assert tokenizer_sha256(student.tokenizer) == tokenizer_sha256(teacher.tokenizer) == m["tokenizer_sha256"]
    emb = student.model.get_input_embeddings().weight
    assert torch.equal(emb, teacher.model.get_input_embeddings().weight)
    assert "tiny-student" in zoo.known_names()
    layers = decoder_layers(student.model)[1]
    assert len(layers) == 2 and not torch.equal(
        layers[0].mlp.up_proj.weight, decoder_layers(teacher.model)[1][0].mlp.up_proj.weight
    )  # trained


def test_an_interrupted_distillation_resumes_to_the_uninterrupted_result(own_cache, corpus_file, tmp_path):
    cfg = DistillConfig(
        keep_layers="0,3", corpus=str(corpus_file), steps=9, batch_size=3, seq_len=24, lr=2e-3,
        warmup_steps=2, checkpoint_every=4, heldout_blocks=0,
    )  # fmt: skip
    whole = distill("tiny-llama-4l", cfg, tmp_path / "whole", register=False, runtime=FP32)

    def interrupt(step: int, record: dict) -> None:
        if step == 6:  # a real Ctrl-C, between checkpoints
            os.kill(os.getpid(), signal.SIGINT)

    out = tmp_path / "parts"
    with pytest.raises(KeyboardInterrupt, match="--resume"):
        distill("tiny-llama-4l", cfg, out, register=False, runtime=FP32, on_step=interrupt)
    assert json.loads((out / CHECKPOINT / "state.json").read_text())["step"] == 6
    assert not (out / zoo.MANIFEST).exists()  # no half-made student
    with pytest.raises(FedPromptError, match="add --resume"):
        distill("tiny-llama-4l", cfg, out, register=False, runtime=FP32)
    with pytest.raises(FedPromptError, match="other settings"):
        distill("tiny-llama-4l", DistillConfig(**{**cfg.__dict__, "lr": 1e-3}), out, resume=True, runtime=FP32)
    resumed = distill("tiny-llama-4l", cfg, out, register=False, runtime=FP32, resume=True)
    assert resumed.manifest["weights_sha256"] == whole.manifest["weights_sha256"]
    assert json.loads((out / HISTORY).read_text()) == json.loads((tmp_path / "whole" / HISTORY).read_text())


def test_distillation_refuses_evaluation_datasets_and_bad_settings(tmp_path):
    with pytest.raises(DatasetError, match="evaluation dataset"):
        corpora.load("rotten-tomatoes")
    with pytest.raises(ValueError, match="steps"):
        DistillConfig(steps=0)
    with pytest.raises(ValueError, match="at least one"):
        DistillConfig(kl_weight=0, lm_weight=0, cos_weight=0)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(FedPromptError, match="not empty"):
        distill("tiny-llama-4l", DistillConfig(corpus="headlines"), tmp_path / "busy", runtime=FP32)


@pytest.mark.slow
def test_public_corpora_hold_no_text_of_an_evaluation_dataset():
    import re

    from fedprompt.data import datasets

    def norm(text: str) -> str:
        return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()

    evaluation = {norm(e.text) for n in datasets.BUNDLED for s in datasets.load(n).splits.values() for e in s}
    mix = corpora.load("public-mix")
    parts = sum(len(corpora.load(n).train) + len(corpora.load(n).heldout) for n in corpora.CORPORA if n != "public-mix")
    assert len(mix.train) + len(mix.heldout) == parts > 60_000
    assert not {norm(d) for d in mix.train + mix.heldout} & evaluation
    assert not set(mix.train) & set(mix.heldout)


def test_the_command_line_from_distillation_to_the_registered_transfer(own_cache, corpus_file, tmp_path, capsys):
    """fedprompt post distill -> models list -> tune --dp on the student by name -> post transfer -> eval."""
    from fedprompt.cli import main
    from tests.conftest import make_sentiment_rows

    student_dir = tmp_path / "student"
    assert main(["post", "distill", "--teacher", "tiny-llama-4l", "--keep-layers", "0,3", "--corpus", str(corpus_file),
                 "--out", str(student_dir), "--steps", "6", "--batch-size", "2", "--seq-len", "16",
                 "--name", "tiny-cli-student", "--precision", "fp32"]) == 0  # fmt: skip
    assert "registered as 'tiny-cli-student'" in capsys.readouterr().out
    assert main(["models", "list"]) == 0
    listing = capsys.readouterr().out
    teacher_sha = zoo.load("tiny-llama-4l").weights_sha256
    assert "tiny-cli-student" in listing and f"distilled from tiny-llama-4l (weights {teacher_sha[:12]})" in listing
    data = tmp_path / "reviews.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_sentiment_rows(120, seed=2)))
    public = tmp_path / "public.jsonl"
    public.write_text("".join(json.dumps(r) + "\n" for r in make_sentiment_rows(120, seed=4)))
    source = tmp_path / "source"
    assert main(["tune", "--model", "tiny-cli-student", "--dataset", str(data), "--out", str(source), "--steps", "3",
                 "--batch-size", "8", "--dp", "--target-epsilon", "8", "--state", str(tmp_path / "ledger"),
                 "--budget-epsilon", "10", "--precision", "fp32", "--eval-every", "0"]) == 0  # fmt: skip
    capsys.readouterr()
    out = tmp_path / "teacher-prompt"
    args = ["post", "transfer", "--prompt", str(source), "--teacher", "tiny-llama-4l", "--public", str(public),
            "--out", str(out), "--steps", "3", "--public-examples", "16", "--eval-every", "3", "--precision", "fp32",
            "--eval-dataset", str(data)]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "transferred to tiny-llama-4l" in printed and "teacher_zero_shot" in printed and "transferred" in printed
    assert main(args) == 2  # a second run refuses to overwrite
    assert "not empty" in capsys.readouterr().err
    assert main(["eval", "--prompt", str(out), "--dataset", str(data), "--precision", "fp32"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["privacy"]["mechanism"] == "dp-sgd" and report["examples"] == 12
    assert main(["post", "distill", "--out", str(student_dir), "--resume", "--steps", "9"]) == 2
    assert "drop --steps" in capsys.readouterr().err
