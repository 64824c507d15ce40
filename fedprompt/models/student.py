"""A student model cut out of a teacher (POST): the teacher's tokenizer, embeddings and LM head, and a subset
of its decoder layers. Both the provider (distillation, transfer) and the data holders (who tune prompts
on the student like on any other model) rely on the identity checks here.
"""

from __future__ import annotations

import copy
import hashlib
import re

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from fedprompt.errors import ConfigError, ModelError


def decoder_layers(model: PreTrainedModel) -> tuple[str, torch.nn.ModuleList]:
    """The state-dict prefix and the ModuleList of a causal LM's decoder layers."""
    for prefix in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        module = model
        try:
            for part in prefix.split("."):
                module = getattr(module, part)
        except AttributeError:
            continue
        if isinstance(module, torch.nn.ModuleList):
            return prefix, module
    raise ModelError(
        f"cannot find the decoder layers of a {type(model).__name__}; POST supports Llama/Gemma/GPT-2-style"
    )


def parse_keep_layers(spec: str, num_layers: int) -> list[int]:
    """``"first3,last3"``, ``"0-2,27-29"``, ``"0,10,20,29"``, ``"every5"`` (every fifth, plus the last)
    -> sorted distinct layer indices. Negative indices count from the end (``-1`` is the last layer)."""
    if not spec or not spec.strip():
        raise ConfigError("keep-layers is empty; e.g. first3,last3 or 0-2,27-29")
    keep: set[int] = set()

    def index(token: str) -> int:
        i = int(token)
        i = i + num_layers if i < 0 else i
        if not 0 <= i < num_layers:
            raise ConfigError(f"keep-layers {spec!r}: layer {token} is outside 0..{num_layers - 1}")
        return i

    for item in spec.replace(" ", "").split(","):
        if m := re.fullmatch(r"first(\d+)", item):
            keep.update(range(min(int(m[1]), num_layers)))
        elif m := re.fullmatch(r"last(\d+)", item):
            keep.update(range(max(0, num_layers - int(m[1])), num_layers))
        elif m := re.fullmatch(r"every(\d+)", item):
            step = int(m[1])
            if step < 1:
                raise ConfigError(f"keep-layers {spec!r}: every needs a positive step")
            keep.update(range(0, num_layers, step))
            keep.add(num_layers - 1)
        elif m := re.fullmatch(r"(-?\d+)-(-?\d+)", item):
            lo, hi = index(m[1]), index(m[2])
            if lo > hi:
                raise ConfigError(f"keep-layers {spec!r}: range {item} runs backwards")
            keep.update(range(lo, hi + 1))
        elif re.fullmatch(r"-?\d+", item):
            keep.add(index(item))
        else:
            raise ConfigError(f"keep-layers {spec!r}: cannot read {item!r}; use first3,last3 / 0-2,27-29 / every5")
    if not keep:
        raise ConfigError(f"keep-layers {spec!r} keeps no layer")
    if len(keep) == num_layers:
        raise ConfigError(f"keep-layers {spec!r} keeps all {num_layers} layers: that is the teacher, not a student")
    return sorted(keep)


def build_student(teacher: PreTrainedModel, keep: list[int]) -> PreTrainedModel:
    """A new float32 model with the teacher's config but only the ``keep`` decoder layers, whose weights
    (and the embeddings, final norm and LM head) are copied from the teacher."""
    prefix, layers = decoder_layers(teacher)
    n = len(layers)
    if not keep or any(not 0 <= i < n for i in keep) or sorted(set(keep)) != list(keep):
        raise ConfigError(f"keep must be sorted distinct layer indices in 0..{n - 1}, got {keep}")
    cfg = copy.deepcopy(teacher.config)
    cfg.num_hidden_layers = len(keep)
    # per-layer settings (Gemma 3's sliding/full attention pattern) follow the layers they belong to
    if isinstance(getattr(cfg, "layer_types", None), list) and len(cfg.layer_types) == n:
        cfg.layer_types = [cfg.layer_types[i] for i in keep]
    # built on the CPU (not the meta device): non-persistent buffers such as rotary frequencies are not in
    # the state dict and must be computed by the constructor
    student = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    new_index = {old: new for new, old in enumerate(keep)}
    layer_key = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.*)$")
    state = {}
    for key, tensor in teacher.state_dict().items():
        if m := layer_key.match(key):
            old = int(m[1])
            if old in new_index:
                state[f"{prefix}.{new_index[old]}.{m[2]}"] = tensor.detach().to("cpu", torch.float32).clone()
        else:
            state[key] = tensor.detach().to("cpu", torch.float32).clone()
    student.load_state_dict(state, strict=True)
    student.tie_weights()
    student.requires_grad_(False)
    student.eval()
    return student


def embedding_parameters(model: PreTrainedModel) -> list[torch.nn.Parameter]:
    """The input embeddings, the LM head and any position embeddings: what a student shares with its
    teacher and never trains (the prompt lives in the input-embedding space both models read)."""
    params = [model.get_input_embeddings().weight]
    head = model.get_output_embeddings()
    if head is not None:
        params.append(head.weight)
    for name, module in model.named_modules():
        if name.endswith(("wpe", "embed_positions")) and hasattr(module, "weight"):
            params.append(module.weight)
    unique: dict[int, torch.nn.Parameter] = {id(p): p for p in params}
    return list(unique.values())


def tokenizer_sha256(tokenizer: PreTrainedTokenizerBase) -> str:
    """The identity of a vocabulary: token strings with their ids, and the special tokens. Two models whose
    tokenizers agree here give logits over the same vocabulary, which the transfer's KL needs."""
    digest = hashlib.sha256()
    for token, idx in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        digest.update(f"{idx}\t{token}\n".encode())
    specials = {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}
    digest.update(repr(specials).encode())
    return digest.hexdigest()


def vocab_size(model: PreTrainedModel) -> int:
    return int(model.get_output_embeddings().weight.shape[0])
