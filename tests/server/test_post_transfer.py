"""POST transfer on tiny models: the loss falls, the teacher moves toward the student, spend and lineage carry,
what cannot be bridged is refused, and the public set never holds the task's own texts."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from fedprompt import artifact
from fedprompt.data import datasets as ds_mod
from fedprompt.dp.engine import DPConfig, private_tune
from fedprompt.errors import DatasetError, ModelError
from fedprompt.models import zoo
from fedprompt.models.tiny import build_tokenizer
from fedprompt.prompt import SoftPrompt
from fedprompt.prompted import PromptedLM
from fedprompt.runtime import Runtime
from fedprompt.server.post.distill import DistillConfig, distill
from fedprompt.server.post.transfer import TransferConfig, public_examples, transfer
from fedprompt.task import TemplateEncoder, Verbalizer
from fedprompt.training import Session
from fedprompt.tuning_settings import TuneConfig
from tests.conftest import make_sentiment_rows
from tests.server.test_post_distill import trained_teacher

FP32 = Runtime(torch.device("cpu"), "fp32")
TEMPLATE = "Review: {text}\nSentiment:"


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def post_setup(tmp_path_factory):
    """A trained tiny teacher, a student distilled from it, and a DP prompt tuned on the student."""
    root = tmp_path_factory.mktemp("post")
    corpus = root / "public.txt"
    corpus.write_text("\n".join(r["text"] for r in make_sentiment_rows(600, seed=5)) + "\n")
    teacher = trained_teacher(corpus, root / "teacher")
    cfg = DistillConfig(
        keep_layers="first1,last1", corpus=str(corpus), steps=30, batch_size=4, seq_len=32, lr=3e-3,
        warmup_steps=2, checkpoint_every=30, heldout_blocks=0,
    )  # fmt: skip
    distill(teacher, cfg, root / "student", name="tiny-teacher-student", register=False, runtime=FP32)
    student = zoo.load(str(root / "student"))
    task = write_rows(root / "reviews.jsonl", make_sentiment_rows(240, seed=1))
    session = Session(student, ds_mod.load(str(task)), runtime=FP32, template=TEMPLATE)
    tune_cfg = TuneConfig(steps=10, lr=0.05, batch_size=16, eval_every=0, init="text", init_text="Is it good or bad?")
    result, spend = private_tune(session, tune_cfg, DPConfig(target_epsilon=8.0))
    meta = artifact.ArtifactMeta(
        task=session.dataset.name, template=TEMPLATE, label_names=session.dataset.label_names,
        label_words=session.label_words, base_model_id=student.model_id, base_model_sha256=student.weights_sha256,
        origin_id=result.origin_id, init={"method": "text", "text": "Is it good or bad?"}, privacy=spend,
    )  # fmt: skip
    artifact.save(root / "source", result.weight, meta)
    public = write_rows(root / "public.jsonl", make_sentiment_rows(200, seed=9))
    return {"root": root, "teacher": teacher, "student": student, "source": root / "source", "public": public}


def class_scores(loaded, weight, texts) -> torch.Tensor:
    enc = TemplateEncoder(loaded.tokenizer, TEMPLATE)
    verbalizer = Verbalizer.build(loaded.tokenizer, [[" negative"], [" positive"]])
    model = PromptedLM(loaded.model, SoftPrompt(weight))
    batch = enc.batch([ds_mod.Example(t, 0) for t in texts])
    with torch.no_grad():
        return model.class_scores(batch, verbalizer)


def test_the_transfer_moves_the_teacher_toward_the_prompted_student(post_setup):
    s = post_setup
    cfg = TransferConfig(alpha=0.5, steps=60, lr=0.02, batch_size=16, public_examples=32, eval_every=10, select="loss")
    result = transfer(str(s["source"]), s["teacher"], str(s["public"]), cfg, student=s["student"], runtime=FP32)
    history = result.report["history"]
    assert history[0]["step"] == 0 and history[-1]["step"] == 60
    assert min(r["val_loss"] for r in history[1:]) < 0.5 * history[0]["val_loss"]
    chosen = next(r for r in history if r["step"] == result.report["chosen_step"])
    assert chosen["val_loss"] == min(r["val_loss"] for r in history)  # the checkpoint is the best on validation
    # the teacher's label-word scores with the transferred prompt sit closer to the prompted student's
    source_weight, source_meta = artifact.load(s["source"])
    texts = [e.text for e in ds_mod.load(str(s["public"])).split("test")]
    student_scores = class_scores(s["student"], source_weight, texts)
    before = (class_scores(s["teacher"], _initial(s, source_meta, source_weight), texts) - student_scores).abs().mean()
    after = (class_scores(s["teacher"], result.weight, texts) - student_scores).abs().mean()
    assert after < 0.75 * before
    # a prompt for the teacher, carrying the source's privacy spend unchanged and its lineage
    meta = result.meta
    assert meta.base_model_id == "tiny-teacher" and meta.base_model_sha256 == s["teacher"].weights_sha256
    assert meta.privacy == source_meta.privacy and meta.privacy["mechanism"] == "dp-sgd"
    assert meta.lineage["source_prompt_sha256"] == source_meta.prompt_sha256
    assert meta.lineage["source_model"]["id"] == "tiny-teacher-student"
    assert meta.lineage["public"]["name"] == "public" and meta.lineage["public"]["inputs"] == 32
    assert meta.init == source_meta.init and meta.task == source_meta.task
    # the student and teacher share embeddings, so the teacher's initial prompt is the source's own initial prompt
    assert meta.origin_id == source_meta.origin_id
    out = artifact.save(s["root"] / "transferred", result.weight, meta)
    weight, loaded_meta = artifact.load(out)
    artifact.check_base_model(loaded_meta, weight, s["teacher"])


def _initial(s, meta, weight):
    from fedprompt.server.post.transfer import target_initial_prompt

    return target_initial_prompt(meta, weight, s["teacher"])


def test_checkpoints_are_chosen_by_public_accuracy_when_the_labels_match(post_setup):
    s = post_setup
    cfg = TransferConfig(steps=10, batch_size=16, public_examples=16, eval_every=5)
    result = transfer(str(s["source"]), s["teacher"], str(s["public"]), cfg, student=s["student"], runtime=FP32)
    assert result.report["select"] == "accuracy"
    best = max(result.report["history"], key=lambda r: r["val_accuracy"])
    assert result.report["chosen_step"] in {r["step"] for r in result.report["history"]}
    chosen = next(r for r in result.report["history"] if r["step"] == result.report["chosen_step"])
    assert chosen["val_accuracy"] == best["val_accuracy"]


def _other_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|pad|>"], show_progress=False)
    tok.train_from_iterator(["a completely different corpus of words for another vocabulary"] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>")


def _llama_folder(folder, tokenizer, hidden: int):
    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, pad_token_id=1, eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(1)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return zoo.load(str(folder))


def test_another_vocabulary_is_refused_and_another_width_is_bridged(post_setup, tmp_path):
    s = post_setup
    cfg = TransferConfig(steps=4, batch_size=8, public_examples=8, validation_examples=8, eval_every=2)
    other_vocab = _llama_folder(tmp_path / "other-vocab", _other_tokenizer(), 32)
    with pytest.raises(ModelError, match="different tokenizers"):
        transfer(str(s["source"]), other_vocab, str(s["public"]), cfg, student=s["student"], runtime=FP32)
    wider = _llama_folder(tmp_path / "wider", build_tokenizer(), 48)
    result = transfer(str(s["source"]), wider, str(s["public"]), cfg, student=s["student"], runtime=FP32)
    assert result.weight.shape == (20, 48)
    with pytest.raises(ModelError, match="nothing to transfer"):
        transfer(str(s["source"]), s["student"], str(s["public"]), cfg, student=s["student"], runtime=FP32)
    with pytest.raises(DatasetError, match="task's own data"):
        task_file = s["root"] / "reviews.jsonl"
        transfer(str(s["source"]), s["teacher"], str(task_file), cfg, student=s["student"], runtime=FP32)
    with pytest.raises(DatasetError, match="fewer than"):
        transfer(str(s["source"]), s["teacher"], str(s["public"]), TransferConfig(public_examples=5000),
                 student=s["student"], runtime=FP32)  # fmt: skip


@pytest.mark.slow
def test_public_sets_never_carry_the_tasks_own_texts():
    cfg = TransferConfig(public_examples=64, validation_examples=200)
    movies = ds_mod.load("vader-movies")
    train, validation, dropped = public_examples(movies, "rotten-tomatoes", cfg)
    assert dropped > 9_000  # vader-movies' snippets are rotten-tomatoes' own
    rt_test = {e.text.lower() for e in ds_mod.load("rotten-tomatoes").split("test")}
    assert not {e.text.lower() for e in train + validation} & rt_test
    train, validation, dropped = public_examples(ds_mod.load("vader-amazon"), "rotten-tomatoes", cfg)
    assert dropped <= 1 and len(train) == 64 and len(validation) == 200
