"""Prompt artifacts: stock PEFT loads them and gives identical logits; misuse is refused."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import save_file

from fedprompt import artifact
from fedprompt.data.datasets import Example
from fedprompt.errors import ArtifactError
from fedprompt.models import zoo
from fedprompt.prompt import SoftPrompt, init_from_vocab, origin_id
from fedprompt.prompted import PromptedLM
from fedprompt.task import TemplateEncoder, Verbalizer


def _meta(loaded, weight, privacy=None):
    return artifact.ArtifactMeta(
        task="t",
        template="Review: {text}\nSentiment:",
        label_names=["negative", "positive"],
        label_words=[[" negative"], [" positive"]],
        base_model_id=loaded.model_id,
        base_model_sha256=loaded.weights_sha256,
        origin_id=origin_id(weight),
        init={"method": "vocab"},
        privacy=privacy,
    )


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2"])
def test_stock_peft_loads_the_prompt_with_identical_logits(model, tmp_path):
    loaded = zoo.load(model)  # a fresh copy: PEFT wraps the model it is given
    emb = loaded.model.get_input_embeddings().weight
    # a "tuned" prompt: far from any vocabulary row, so a silently ignored prompt would show
    noise = torch.randn(6, emb.shape[1], generator=torch.Generator().manual_seed(0))
    weight = init_from_vocab(emb, 6, seed=1) + 0.5 * noise
    folder = artifact.save(tmp_path / "prompt", weight, _meta(loaded, weight))

    ours = PromptedLM(loaded.model, SoftPrompt(artifact.load(folder)[0]))
    peft_model = PeftModel.from_pretrained(loaded.model, str(folder))
    peft_model.eval()
    tok = loaded.tokenizer
    for text in ["Review: a great film\nSentiment:", "Review: dull\nSentiment:"]:
        ids = tok(text, return_tensors="pt")
        with torch.no_grad():
            expected = ours(ids.input_ids, ids.attention_mask, logits_to_keep=0)
            got = peft_model(input_ids=ids.input_ids, attention_mask=ids.attention_mask).logits
            plain = loaded.model(**ids).logits
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        # the prompt really changes the answer (else the comparison would prove nothing)
        assert (expected[:, -1] - plain[:, -1]).abs().max() > 1e-3


def test_roundtrip_and_provenance(tiny_llama, tmp_path):
    emb = tiny_llama.model.get_input_embeddings().weight
    w = init_from_vocab(emb, 4)
    priv = {"epsilon": 8.0, "delta": 1e-5, "accountant": "rdp", "mechanism": "dp-sgd"}
    folder = artifact.save(tmp_path / "a", w, _meta(tiny_llama, w, priv))
    got, meta = artifact.load(folder)
    assert torch.equal(got, w)
    assert meta.privacy == priv and meta.base_model_sha256 == tiny_llama.weights_sha256
    artifact.check_base_model(meta, got, tiny_llama)


def test_loading_onto_another_base_model_is_refused(tiny_llama, tiny_gpt2, tmp_path):
    emb = tiny_llama.model.get_input_embeddings().weight
    w = init_from_vocab(emb, 4)
    folder = artifact.save(tmp_path / "a", w, _meta(tiny_llama, w))
    got, meta = artifact.load(folder)
    with pytest.raises(ArtifactError, match="tuned on tiny-llama"):
        artifact.check_base_model(meta, got, tiny_gpt2)


def test_tampered_or_incomplete_artifacts_are_refused(tiny_llama, tmp_path):
    emb = tiny_llama.model.get_input_embeddings().weight
    w = init_from_vocab(emb, 4)
    folder = artifact.save(tmp_path / "a", w, _meta(tiny_llama, w))
    save_file({"prompt_embeddings": w + 1}, str(folder / artifact.WEIGHTS_FILE))
    with pytest.raises(ArtifactError, match="do not match the hash"):
        artifact.load(folder)
    save_file({"prompt_embeddings": w * float("nan")}, str(folder / artifact.WEIGHTS_FILE))
    with pytest.raises(ArtifactError, match="finite"):
        artifact.load(folder)
    (folder / artifact.META_FILE).unlink()
    with pytest.raises(ArtifactError, match="missing"):
        artifact.load(folder)


def test_privacy_record_must_name_its_accountant(tiny_llama):
    w = torch.zeros(2, 32)
    with pytest.raises(ArtifactError, match="accountant"):
        _meta(tiny_llama, w, {"epsilon": 1.0, "delta": 1e-5})


def test_a_failed_save_leaves_the_previous_artifact(tiny_llama, tmp_path, monkeypatch):
    emb = tiny_llama.model.get_input_embeddings().weight
    w = init_from_vocab(emb, 4)
    folder = artifact.save(tmp_path / "a", w, _meta(tiny_llama, w))
    before = json.loads((folder / artifact.META_FILE).read_text())

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(artifact, "save_file", boom)
    with pytest.raises(OSError):
        artifact.save(folder, w + 1, _meta(tiny_llama, w + 1))
    assert json.loads((folder / artifact.META_FILE).read_text()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["a"]


def test_unreadable_artifacts_are_one_line_errors_naming_the_file(tiny_llama, tmp_path):
    emb = tiny_llama.model.get_input_embeddings().weight
    w = init_from_vocab(emb, 4)
    folder = artifact.save(tmp_path / "a", w, _meta(tiny_llama, w))
    (folder / artifact.WEIGHTS_FILE).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(ArtifactError, match=r"adapter_model\.safetensors: not a readable safetensors file"):
        artifact.load(folder)
    folder = artifact.save(tmp_path / "b", w, _meta(tiny_llama, w))
    (folder / artifact.META_FILE).write_bytes(b'{"task": "\xff\xfe"}')
    with pytest.raises(ArtifactError, match=r"fedprompt\.json: malformed \(UnicodeDecodeError"):
        artifact.load(folder)


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2"])
def test_stock_peft_gives_fedprompts_scores_for_multi_token_label_words(model, tmp_path):
    """fedprompt scores every word of a class in one packed row; stock PEFT, one word at a time appended to the
    text, must give the same log-probabilities (words sharing their first token, of different lengths)."""
    loaded = zoo.load(model)
    emb = loaded.model.get_input_embeddings().weight
    noise = torch.randn(5, emb.shape[1], generator=torch.Generator().manual_seed(2))
    weight = init_from_vocab(emb, 5, seed=3) + 0.5 * noise
    folder = artifact.save(tmp_path / "prompt", weight, _meta(loaded, weight))
    words = [[" nprhealth"], [" nytimeshealth", " nyt"], [" good"]]
    verb = Verbalizer.build(loaded.tokenizer, words, label_names=["npr", "nyt", "good"])
    assert not verb.single_token
    enc = TemplateEncoder(loaded.tokenizer, "Tweet: {text}\nSource:")
    examples = [Example("I love this", 0), Example("the government announced a new policy on trade", 1)]
    with torch.no_grad():
        ours = PromptedLM(loaded.model, SoftPrompt(artifact.load(folder)[0])).class_scores(enc.batch(examples), verb)
    peft_model = PeftModel.from_pretrained(loaded.model, str(folder)).eval()
    for row, example in zip(ours, examples, strict=True):
        text_ids = enc.encode(example.text)
        expected = []
        for class_words in verb.token_ids:
            per_word = []
            for seq in class_words:
                ids = torch.tensor([text_ids + list(seq)])
                with torch.no_grad():
                    logp = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].log_softmax(-1)
                # PEFT's logits include its virtual tokens; word token j is predicted at the position before it
                at = 5 + len(text_ids) - 1
                per_word.append(sum(logp[at + j, t] for j, t in enumerate(seq)))
            expected.append(torch.logsumexp(torch.stack(per_word), 0))
        torch.testing.assert_close(row, torch.stack(expected), atol=1e-4, rtol=1e-5)
