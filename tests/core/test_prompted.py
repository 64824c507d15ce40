"""The prompted model: frozen base, padding-invariant answers, both precisions, LM loss."""

from __future__ import annotations

import pytest
import torch

from fedprompt.data.datasets import Example
from fedprompt.prompt import SoftPrompt, init_from_token_ids, init_from_vocab, origin_id
from fedprompt.prompted import PromptedLM
from fedprompt.runtime import Runtime
from fedprompt.task import TemplateEncoder, Verbalizer

TEXTS = ["great", "The movie was dull and boring and far too long.", "superb acting, moving", "bad"]


def _setup(loaded, n=5, seed=0):
    emb = loaded.model.get_input_embeddings().weight
    prompt = SoftPrompt(init_from_vocab(emb, n, seed=seed))
    enc = TemplateEncoder(loaded.tokenizer, "Review: {text}\nSentiment:")
    verb = Verbalizer.build(loaded.tokenizer, [[" negative"], [" positive"]])
    return PromptedLM(loaded.model, prompt), enc, verb


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_gpt2"])
def test_left_padding_does_not_change_answers(model, request):
    loaded = request.getfixturevalue(model)
    prompted, enc, verb = _setup(loaded)
    examples = [Example(t, i % 2) for i, t in enumerate(TEXTS)]
    batch = enc.batch(examples)
    assert (batch["attention_mask"] == 0).any(), "the batch must actually contain padding"
    with torch.no_grad():
        together = prompted.class_scores(batch, verb)
        alone = torch.cat([prompted.class_scores(enc.batch([e]), verb) for e in examples])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_base_model_stays_frozen_and_only_the_prompt_trains(tiny_gpt2):
    prompted, enc, verb = _setup(tiny_gpt2)
    before = {k: v.clone() for k, v in tiny_gpt2.model.state_dict().items()}
    prompt_before = prompted.prompt.weight.detach().clone()
    prompted.train()
    assert not tiny_gpt2.model.training, "the frozen model must stay in eval mode (no dropout) by default"
    opt = torch.optim.Adam(prompted.prompt.parameters(), lr=0.1)
    batch = enc.batch([Example(t, i % 2) for i, t in enumerate(TEXTS)])
    prompted.classification_loss(batch, verb).backward()
    opt.step()
    assert all(not p.requires_grad for p in tiny_gpt2.model.parameters())
    for k, v in tiny_gpt2.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not torch.equal(prompted.prompt.weight.detach(), prompt_before)


def test_dropout_is_active_only_when_asked(tiny_gpt2):
    emb = tiny_gpt2.model.get_input_embeddings().weight
    prompted = PromptedLM(tiny_gpt2.model, SoftPrompt(init_from_vocab(emb, 3)), base_dropout=True)
    prompted.train()
    assert tiny_gpt2.model.training
    prompted.eval()
    assert not tiny_gpt2.model.training


def test_bf16_autocast_matches_fp32(tiny_llama):
    prompted, enc, verb = _setup(tiny_llama)
    batch = enc.batch([Example(t, 0) for t in TEXTS])
    with torch.no_grad():
        fp32 = prompted.class_scores(batch, verb)
        with Runtime(torch.device("cpu"), "bf16").autocast():
            bf16 = prompted.class_scores(batch, verb)
    assert bf16.dtype == torch.float32  # scores are always float32, whatever the autocast
    torch.testing.assert_close(bf16, fp32, atol=0.05, rtol=0.05)
    # and the prompt's gradient flows in float32 under autocast
    with Runtime(torch.device("cpu"), "bf16").autocast():
        loss = prompted.classification_loss(batch, verb)
    loss.backward()
    assert prompted.prompt.weight.grad.dtype == torch.float32
    assert torch.isfinite(prompted.prompt.weight.grad).all()


def test_lm_loss_per_example(tiny_llama):
    prompted, _, _ = _setup(tiny_llama)
    tok = tiny_llama.tokenizer
    ids = [tok("The movie was great").input_ids, tok("bad").input_ids]
    width = max(map(len, ids))
    input_ids = torch.tensor([[1] * (width - len(x)) + x for x in ids])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
    labels = input_ids.masked_fill(mask == 0, -100)
    per = prompted.lm_loss(input_ids, mask, labels, reduction="none")
    assert per.shape == (2,) and torch.isfinite(per).all()
    single = prompted.lm_loss(
        input_ids[:1, width - len(ids[0]) :],
        mask[:1, width - len(ids[0]) :],
        labels[:1, width - len(ids[0]) :],
        reduction="none",
    )
    torch.testing.assert_close(per[:1], single, atol=1e-5, rtol=1e-5)


def test_initialisations(tiny_llama):
    emb = tiny_llama.model.get_input_embeddings().weight
    v = init_from_vocab(emb, 7, seed=3)
    assert v.shape == (7, emb.shape[1])
    assert all(any(torch.equal(row, e) for e in emb[:5000]) for row in v)
    t = init_from_token_ids(emb, [5, 6, 7], 7)
    assert torch.equal(t[3], emb[5]) and torch.equal(t[6], emb[5])
    assert origin_id(v) == origin_id(v.clone()) != origin_id(t)
    with pytest.raises(ValueError):
        SoftPrompt(torch.zeros(3))


def test_verbalizer_refuses_the_same_word_for_two_labels_naming_both(tiny_llama):
    same = r"' positive' of label 'great' and ' positive' of label 'good' are the same tokens"
    with pytest.raises(ValueError, match=same):
        Verbalizer.build(tiny_llama.tokenizer, [[" positive"], [" positive"]], label_names=["good", "great"])


def test_single_token_scores_are_the_next_token_log_probabilities(tiny_llama):
    """The first-token path is kept only where it is exact: each class's one-token word's log-probability."""
    tok = tiny_llama.tokenizer
    verb = Verbalizer.build(tok, [[" good"], [" bad"]])
    assert verb.single_token
    batch = TemplateEncoder(tok, "Review: {text}\nSentiment:").batch([Example("a fine film", 0), Example("dull", 1)])
    prompted = PromptedLM(tiny_llama.model, None)
    logits = prompted(batch["input_ids"], batch["attention_mask"])[:, -1].float()
    ids = [tok(" good", add_special_tokens=False).input_ids[0], tok(" bad", add_special_tokens=False).input_ids[0]]
    torch.testing.assert_close(prompted.class_scores(batch, verb), logits.log_softmax(-1)[:, ids])


def test_mean_scoring_divides_each_words_log_probability_by_its_length(tiny_llama):
    tok = tiny_llama.tokenizer
    words = [[" nprhealth"], [" good"]]
    batch = TemplateEncoder(tok, "Tweet: {text}\nSource:").batch([Example("I love this", 0)])
    prompted = PromptedLM(tiny_llama.model, None)
    total = prompted.class_scores(batch, Verbalizer.build(tok, words))
    mean = prompted.class_scores(batch, Verbalizer.build(tok, words, scoring="mean"))
    n = len(tok(" nprhealth", add_special_tokens=False).input_ids)
    assert n > 1
    torch.testing.assert_close(mean, total / torch.tensor([n, 1.0]))


def test_template_truncates_the_text_not_the_template(tiny_llama):
    enc = TemplateEncoder(tiny_llama.tokenizer, "Review: {text}\nSentiment:", max_length=24)
    ids = enc.encode("great movie " * 100)
    assert len(ids) <= 24
    assert tiny_llama.tokenizer.decode(ids).endswith("\nSentiment:")


def test_logit_offsets_shift_the_class_scores_inside_the_loss(tiny_llama):
    from fedprompt.task import Verbalizer, collate

    tok = tiny_llama.tokenizer
    verbalizer = Verbalizer.build(tok, [[" good"], [" bad"]])
    batch = collate([tok("a fine film").input_ids, tok("dull").input_ids], [0, 1], tok.pad_token_id or 0, "cpu")
    prompted = PromptedLM(tiny_llama.model, None)
    offsets = torch.tensor([0.7, -1.3])
    scores = prompted.class_scores(batch, verbalizer)
    expected = torch.nn.functional.cross_entropy(scores + offsets, batch["labels"])
    assert prompted.classification_loss(batch, verbalizer, logit_offsets=offsets) == pytest.approx(float(expected))
    assert prompted.classification_loss(batch, verbalizer) != pytest.approx(float(expected))
