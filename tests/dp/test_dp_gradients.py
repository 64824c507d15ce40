"""Per-example prompt gradients are exact; clipping and noise do what DP-SGD promises."""

from __future__ import annotations

import math

import pytest
import torch
from opacus import GradSampleModule
from peft import PromptTuningConfig, TaskType, get_peft_model

from fedprompt.data.datasets import Example
from fedprompt.dp.engine import DPConfig, make_private, plan
from fedprompt.dp.grad_sample import max_abs_difference, reference_per_example_grads
from fedprompt.models import zoo
from fedprompt.prompt import SoftPrompt, init_from_vocab
from fedprompt.prompted import PromptedLM
from fedprompt.runtime import Runtime
from fedprompt.task import TemplateEncoder, Verbalizer
from fedprompt.training import Session, run_steps
from fedprompt.tuning_settings import TuneConfig

TEXTS = ["great", "The movie was dull and boring and far too long.", "superb acting, moving", "bad", "fine film"]


def _float64(name: str):
    loaded = zoo.load(name)
    loaded.model.double()
    # Llama's eager attention takes its softmax in float32 (1e-8 differences between a padded and an
    # unpadded row); SDPA stays in float64, so any difference left is the gradient computation's own.
    loaded.model.set_attn_implementation("sdpa")
    return loaded


# single-token words, and multi-token words sharing a first token (their later tokens ride in each example's row)
WORDS = {"single": [[" negative"], [" positive"]], "multi": [[" nprhealth"], [" nytimeshealth", " nyt"]]}


@pytest.mark.parametrize("words", ["single", "multi"])
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_per_example_gradients_equal_separate_backward_passes(name, words):
    loaded = _float64(name)
    emb = loaded.model.get_input_embeddings().weight
    prompted = PromptedLM(loaded.model, SoftPrompt(init_from_vocab(emb, 5)).double())
    enc = TemplateEncoder(loaded.tokenizer, "Review: {text}\nSentiment:")
    verb = Verbalizer.build(loaded.tokenizer, WORDS[words])
    assert verb.single_token == (words == "single")
    examples = [Example(t, i % 2) for i, t in enumerate(TEXTS)]
    batch = enc.batch(examples)  # left-padded: examples of different lengths in one batch

    prompted.train()  # Opacus captures activations in training mode only (the base stays in eval)
    gsm = GradSampleModule(prompted, loss_reduction="sum")
    prompted.classification_loss(batch, verb, reduction="sum").backward()
    fast = prompted.prompt.weight.grad_sample
    gsm.remove_hooks()

    reference = reference_per_example_grads(
        prompted.prompt.weight,
        lambda i: prompted.classification_loss(enc.batch([examples[i]]), verb, reduction="sum"),
        len(examples),
    )
    assert fast.shape == (len(examples), 5, emb.shape[1])
    assert fast.dtype == torch.float64
    assert max_abs_difference(fast, reference) < 1e-10
    # the per-example gradients differ between examples (a batch gradient copied B times would not)
    assert (reference[0] - reference[1]).abs().max() > 1e-6


def test_the_check_catches_stock_peft_with_opacus():
    """PEFT builds the prompt once and repeats it: Opacus then sees one 'example' for the whole batch."""
    loaded = _float64("tiny-llama")
    peft_model = get_peft_model(
        loaded.model, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=5)
    ).double()
    weight = peft_model.prompt_encoder["default"].embedding.weight
    label_ids = [loaded.tokenizer(" negative").input_ids[0], loaded.tokenizer(" positive").input_ids[0]]
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, 500, (4, 9), generator=gen)
    labels = torch.tensor([0, 1, 1, 0])

    def loss(ids, y):
        logits = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -1, label_ids]
        return torch.nn.functional.cross_entropy(logits, y, reduction="sum")

    peft_model.train()
    gsm = GradSampleModule(peft_model, loss_reduction="sum")
    loss(input_ids, labels).backward()
    claimed = weight.grad_sample
    gsm.remove_hooks()
    reference = reference_per_example_grads(weight, lambda i: loss(input_ids[i : i + 1], labels[i : i + 1]), 4)
    assert claimed is not None  # Opacus happily produced "per-sample" gradients...
    assert max_abs_difference(claimed, reference) > 1e-3  # ...which are not per example
    # what Opacus got is the batch gradient: clipping it bounds the batch, not each example
    torch.testing.assert_close(claimed.sum(0), reference.sum(0))


def _private_session(tiny, sentiment_file, **kw):
    session = Session(tiny, str(sentiment_file), runtime=Runtime.create("cpu", "fp32"))
    train = session.encode_split("train")
    cfg = TuneConfig(prompt_length=4, batch_size=8, steps=40, eval_every=0, **kw)
    initial, _ = session.initial_prompt(cfg)
    prompted = session.prompted(initial)
    return session, train, cfg, prompted


def test_each_examples_contribution_is_clipped(tiny_llama, sentiment_file):
    session, train, _cfg, prompted = _private_session(tiny_llama, sentiment_file)
    items = train[:8]
    batch = session.collate(items)
    reference = reference_per_example_grads(
        prompted.prompt.weight,
        lambda i: prompted.classification_loss(session.collate([items[i]]), session.verbalizer, reduction="sum"),
        len(items),
    )
    norms = reference.flatten(1).norm(dim=1)
    clip = float(norms.median())  # half of the examples get clipped
    p = plan(DPConfig(noise_multiplier=1.0, max_grad_norm=clip), num_examples=len(train), batch_size=8, steps=1)
    sgd = torch.optim.SGD(prompted.prompt.parameters(), lr=1.0)
    private = make_private(session, prompted, sgd, train, p, batch_size=8, steps=1, loss_reduction="sum")
    prompted.classification_loss(batch, session.verbalizer, reduction="sum").backward()
    private.optimizer.clip_and_accumulate()
    summed = prompted.prompt.weight.summed_grad
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    expected = (factors[:, None, None] * reference).sum(0)
    torch.testing.assert_close(summed, expected, atol=1e-5, rtol=1e-4)
    assert (norms > clip).sum() >= 3 and (norms < clip).sum() >= 3
    clipped = factors[:, None] * reference.flatten(1)
    assert (clipped.norm(dim=1) <= clip * (1 + 1e-5)).all()
    private.module.remove_hooks()


@pytest.mark.parametrize("secure_mode", [False, True])
def test_noise_has_standard_deviation_sigma_times_c(tiny_llama, sentiment_file, secure_mode):
    session, train, _cfg, prompted = _private_session(tiny_llama, sentiment_file)
    sigma, clip = 2.0, 0.5
    p = plan(DPConfig(noise_multiplier=sigma, max_grad_norm=clip), num_examples=len(train), batch_size=8, steps=30)
    sgd = torch.optim.SGD(prompted.prompt.parameters(), lr=1.0)
    torch.manual_seed(0)
    private = make_private(
        session, prompted, sgd, train, p, batch_size=8, steps=30, secure_mode=secure_mode, loss_reduction="sum"
    )
    noises = []
    for _ in range(30):
        batch = next(private.batches)
        private.optimizer.zero_grad()
        if batch["labels"].numel():
            prompted.classification_loss(batch, session.verbalizer, reduction="sum").backward()
        else:
            private.on_empty_batch()
        private.optimizer.pre_step()
        w = prompted.prompt.weight
        noises.append((w.grad - w.summed_grad).flatten())
    noise = torch.cat(noises).double()
    n = noise.numel()  # 30 steps x 4 x 32 = 3840 draws
    std = float(noise.std())
    # the sample std of n Gaussian draws has relative standard error 1/sqrt(2n) ~ 1.1 %: allow 5 of them
    assert abs(std / (sigma * clip) - 1) < 5 / math.sqrt(2 * n)
    assert abs(float(noise.mean())) < 5 * sigma * clip / math.sqrt(n)
    kurtosis = float(((noise - noise.mean()) ** 4).mean() / noise.var() ** 2)
    assert abs(kurtosis - 3) < 0.5  # Gaussian, not uniform (1.8) or Laplace (6)
    assert private.engine.accountant.history == [(sigma, p.sample_rate, 30)]  # every step accounted
    private.module.remove_hooks()


def test_an_empty_poisson_batch_still_adds_noise_and_counts(tiny_llama, sentiment_file):
    session, train, cfg, prompted = _private_session(tiny_llama, sentiment_file, lr=0.1)
    p = plan(DPConfig(noise_multiplier=1.0), num_examples=len(train), batch_size=8, steps=3)
    adam = torch.optim.Adam(prompted.prompt.parameters(), lr=0.1)
    private = make_private(session, prompted, adam, train, p, batch_size=8, steps=3)
    before = prompted.prompt.weight.detach().clone()
    empty = iter([session.collate([])] * 3)
    cfg.steps = 3
    run_steps(session, prompted, private.optimizer, empty, cfg, on_empty_batch=private.on_empty_batch)
    assert not torch.equal(prompted.prompt.weight.detach(), before)
    assert private.engine.accountant.history == [(1.0, p.sample_rate, 3)]
    private.module.remove_hooks()


def test_private_tuning_runs_with_dropout_in_bf16(tiny_gpt2, sentiment_file):
    from fedprompt.dp.engine import private_tune

    session = Session(tiny_gpt2, str(sentiment_file), runtime=Runtime.create("cpu", "bf16"))
    cfg = TuneConfig(prompt_length=4, batch_size=8, steps=5, eval_every=0, base_dropout=True)
    result, spend = private_tune(session, cfg, DPConfig(target_epsilon=3.0, delta=1e-3))
    assert torch.isfinite(result.weight).all() and not torch.equal(result.weight, result.initial)
    assert 2.9 < spend["epsilon"] <= 3.0 and spend["steps"] == 5 and spend["accountant"] == "rdp"


def test_noise_cannot_be_replayed_from_a_public_seed(tiny_llama, sentiment_file):
    """torch's default generator starts from a fixed seed: noise that followed it could be subtracted."""
    grads = []
    for _ in range(2):
        torch.manual_seed(0)  # whatever public seed the caller set
        session, train, _cfg, prompted = _private_session(tiny_llama, sentiment_file)
        p = plan(DPConfig(noise_multiplier=1.0), num_examples=len(train), batch_size=8, steps=1)
        private = make_private(
            session, prompted, torch.optim.SGD(prompted.prompt.parameters(), lr=1.0), train, p, batch_size=8, steps=1
        )
        private.on_empty_batch()
        private.optimizer.pre_step()
        grads.append(prompted.prompt.weight.grad.clone())
        private.module.remove_hooks()
    assert not torch.allclose(grads[0], grads[1])


@pytest.mark.parametrize("secure_mode", [False, True])
def test_an_empty_first_poisson_batch_takes_its_noisy_step(tiny_llama, tmp_path, monkeypatch, secure_mode):
    """Opacus 1.6's own loader raised TypeError when the very first Poisson batch was empty (11 of 40 runs at
    n = 2, q = 0.5); the first batch here is made empty on purpose, in both modes."""
    import json

    from conftest import make_sentiment_rows

    from fedprompt.dp import engine
    from fedprompt.dp.engine import private_tune

    rows = make_sentiment_rows(20)
    split = ["train", "train"] + ["validation", "test"] * 9
    path = tmp_path / "two.jsonl"
    path.write_text("".join(json.dumps({**r, "split": s}) + "\n" for r, s in zip(rows, split, strict=True)))
    name = "SecurePoissonSampler" if secure_mode else "UniformWithReplacementSampler"
    base = getattr(engine, name)

    sizes = []

    class EmptyFirst(base):
        def __iter__(self):
            yield []
            sizes.append(0)
            for batch in super().__iter__():
                sizes.append(len(batch))
                yield batch

    monkeypatch.setattr(engine, name, EmptyFirst)
    session = Session(tiny_llama, str(path), runtime=Runtime.create("cpu", "fp32"), max_length=32)
    cfg = TuneConfig(prompt_length=2, steps=3, batch_size=1, eval_every=0)
    result, spend = private_tune(session, cfg, DPConfig(target_epsilon=8.0, secure_mode=secure_mode))
    assert sizes[0] == 0 and spend["steps"] == 3  # the empty batch was a step, and accounted
    assert not torch.equal(result.weight, result.initial)
