"""POST, the provider's first step: distil a small student from the large model on public text.

The student keeps the teacher's tokenizer, embeddings and LM head (frozen, so a prompt lives in the same
input space on both) and a subset of its decoder layers, and is trained to imitate the teacher:

    loss = kl_weight · T² · KL(teacher_T ‖ student_T)     next-token distributions at temperature T (= 2)
         + lm_weight · cross-entropy of the next token     (the corpus itself)
         + cos_weight · (1 − cos(student_h, teacher_h))    final hidden states

with the weights of POST (5, 2, 1; Wang et al. 2025, after DistilBERT). Only public text is read
(:mod:`fedprompt.data.corpora`). The run checkpoints every N steps and on Ctrl-C/SIGTERM (between steps, never
mid-update), and ``resume`` continues to the same result as an uninterrupted run: the batch of step s is a
function of the seed and s alone, and the optimiser, learning-rate schedule and RNG states are restored.

Layout of ``out``::

    config.json, model.safetensors, tokenizer files   the student, an ordinary Hugging Face folder
    fedprompt-model.json                               written last: teacher id + hash, layers, budget
    distill-history.json                               per-step losses
    checkpoint/                                        while running (removed when done)
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from fedprompt.cache import atomic_dir, write_json_atomic
from fedprompt.data import corpora
from fedprompt.errors import ConfigError, FedPromptError
from fedprompt.models import zoo
from fedprompt.models.student import (
    build_student,
    decoder_layers,
    embedding_parameters,
    parse_keep_layers,
    tokenizer_sha256,
)
from fedprompt.models.zoo import LoadedModel
from fedprompt.runtime import Runtime
from fedprompt.server.post.distill_loss import distillation_loss, forward_with_hidden, heldout_losses
from fedprompt.settings_checks import finite_numbers, non_negative_ints, positive_ints

CHECKPOINT = "checkpoint"
STATE = "state.json"
HISTORY = "distill-history.json"  # the per-step losses


@dataclass
class DistillConfig:
    """Settings of one distillation run; the defaults are POST's loss weights and learning rate."""

    keep_layers: str = "first3,last3"
    corpus: str = "public-mix"
    steps: int = 400
    batch_size: int = 8
    seq_len: int = 128
    lr: float = 1e-3  # measured: 300 steps at 1e-3 reached a held-out KL of 2.44, at 2.5e-4 3.05 (README, POST)
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1  # cosine decay to this fraction of lr
    temperature: float = 2.0
    kl_weight: float = 5.0
    lm_weight: float = 2.0
    cos_weight: float = 1.0
    checkpoint_every: int = 50
    heldout_blocks: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        positive_ints(self, "steps", "batch_size", "seq_len", "checkpoint_every")
        if self.seq_len < 2:
            raise ConfigError(f"seq_len must be at least 2 (next-token targets), got {self.seq_len}")
        non_negative_ints(self, "warmup_steps", "heldout_blocks")
        finite_numbers(self, "lr", "temperature", positive=True)
        finite_numbers(self, "kl_weight", "lm_weight", "cos_weight", positive=False)
        if self.kl_weight + self.lm_weight + self.cos_weight == 0:
            raise ConfigError("at least one of kl_weight, lm_weight, cos_weight must be positive")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")

    def lr_at(self, step: int) -> float:
        """Linear warm-up, then cosine decay to ``min_lr_ratio · lr`` at the last step (``step`` from 1)."""
        if step <= self.warmup_steps:
            return self.lr * step / max(1, self.warmup_steps)
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# ------------------------------------------------------------------ data


def pack(tokenizer, docs: list[str], seq_len: int) -> torch.Tensor:
    """The documents as one token stream (EOS between documents) cut into (N, seq_len) blocks."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise FedPromptError("the teacher's tokenizer has no end-of-sequence token to separate documents")
    stream: list[int] = []
    for start in range(0, len(docs), 1024):
        for ids in tokenizer(docs[start : start + 1024], add_special_tokens=False).input_ids:
            stream.extend(ids)
            stream.append(eos)
    n = len(stream) // seq_len
    if n == 0:
        raise FedPromptError(f"the corpus has {len(stream)} tokens, fewer than one block of {seq_len}")
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


def batch_indices(num_blocks: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """The blocks of step ``step`` (from 1): a fixed function of (seed, step), whatever ran before.

    Epoch e visits the blocks in the order of a permutation seeded by (seed, e); steps walk through the
    concatenation of those orders, so a resumed run draws exactly the batches an uninterrupted one would."""
    first = (step - 1) * batch_size
    out = []
    while len(out) < batch_size:
        epoch, offset = divmod(first + len(out), num_blocks)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(num_blocks, generator=gen)
        out.extend(order[offset : offset + batch_size - len(out)].tolist())
    return torch.tensor(out, dtype=torch.long)


# ------------------------------------------------------------------ loss


# ------------------------------------------------------------------ checkpoints


def _trainable(student) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in student.named_parameters() if p.requires_grad}


def _save_checkpoint(out: Path, student, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Trainable weights, Adam's moments and the RNG state as safetensors (no pickle), ``state.json`` last;
    the folder is replaced atomically, so a kill at any moment leaves the previous checkpoint intact."""
    params = _trainable(student)
    tensors = {f"param.{n}": p.detach().cpu().contiguous() for n, p in params.items()}
    for n, p in params.items():
        st = optimizer.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in st:
                tensors[f"adam.{key}.{n}"] = st[key].detach().cpu().contiguous()
        if "step" in st:
            tensors[f"adam.step.{n}"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1).cpu()
    tensors["rng.cpu"] = torch.get_rng_state()
    with atomic_dir(out / CHECKPOINT) as scratch:
        save_file(tensors, str(scratch / "train.safetensors"))
        write_json_atomic(scratch / STATE, state)


def _load_checkpoint(out: Path, student, optimizer: torch.optim.Optimizer) -> dict:
    folder = out / CHECKPOINT
    state = json.loads((folder / STATE).read_text())
    tensors = load_file(str(folder / "train.safetensors"))
    params = _trainable(student)
    missing = [n for n in params if f"param.{n}" not in tensors]
    if missing:
        raise FedPromptError(f"{folder}: the checkpoint lacks {len(missing)} trainable tensor(s), e.g. {missing[0]}")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[f"param.{n}"].to(p.device))
            if f"adam.exp_avg.{n}" in tensors:
                optimizer.state[p] = {
                    "step": tensors[f"adam.step.{n}"].reshape(()).clone(),
                    "exp_avg": tensors[f"adam.exp_avg.{n}"].to(p.device),
                    "exp_avg_sq": tensors[f"adam.exp_avg_sq.{n}"].to(p.device),
                }
    torch.set_rng_state(tensors["rng.cpu"])
    return state


class _StopRequest:
    """Ctrl-C / SIGTERM set a flag that the loop reads between steps, so a checkpoint never holds a
    half-applied update."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# ------------------------------------------------------------------ the run


@dataclass
class DistillResult:
    folder: Path
    name: str
    manifest: dict


def _fingerprint(cfg: DistillConfig, teacher: LoadedModel, corpus: corpora.Corpus, keep: list[int]) -> dict:
    return {
        "config": asdict(cfg),
        "teacher": {"id": teacher.model_id, "weights_sha256": teacher.weights_sha256},
        "corpus_sha256": corpus.sha256,
        "layers_kept": keep,
    }


def distill(
    teacher: LoadedModel | str,
    cfg: DistillConfig,
    out: str | Path,
    *,
    name: str | None = None,
    runtime: Runtime | None = None,
    resume: bool = False,
    register: bool = True,
    on_step: Callable[[int, dict], None] | None = None,
) -> DistillResult:
    """Distil a student of ``teacher`` into ``out`` (see the module docstring); register it in the zoo.

    ``resume`` continues from ``out/checkpoint``; without it ``out`` must be empty or absent.
    """
    runtime = runtime or Runtime.create()
    out = Path(out)
    _check_out(out, resume)
    teacher = teacher if isinstance(teacher, LoadedModel) else zoo.load(teacher, device=runtime.device)
    teacher.model.to(runtime.device).eval()
    keep = parse_keep_layers(cfg.keep_layers, len(decoder_layers(teacher.model)[1]))
    corpus = corpora.load(cfg.corpus)
    name = name or f"{teacher.model_id}-student-{len(keep)}l"
    blocks = pack(teacher.tokenizer, corpus.train, cfg.seq_len)
    heldout = pack(teacher.tokenizer, corpus.heldout, cfg.seq_len)[: cfg.heldout_blocks] if cfg.heldout_blocks else None

    student = build_student(teacher.model, keep).to(runtime.device)
    frozen = {id(p) for p in embedding_parameters(student)}
    for p in student.parameters():
        p.requires_grad_(id(p) not in frozen)
    params = list(_trainable(student).values())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    fingerprint = _fingerprint(cfg, teacher, corpus, keep)
    state = {"step": 0, "tokens": 0, "seconds": 0.0, "history": [], "fingerprint": fingerprint, "name": name}
    if resume:
        saved = _load_checkpoint(out, student, optimizer)
        if saved["fingerprint"] != fingerprint:
            changed = sorted(k for k in fingerprint if saved["fingerprint"].get(k) != fingerprint[k])
            raise FedPromptError(
                f"{out}: the checkpoint was made with other settings ({', '.join(changed)}); not resuming"
            )
        state = saved
        name = state["name"]
    else:
        out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed)

    bar = tqdm(total=cfg.steps, initial=state["step"], desc=f"distil {name}", unit="step")
    started = time.monotonic() - state["seconds"]
    window = (time.monotonic(), state["tokens"])
    with _StopRequest() as stop:
        for step in range(state["step"] + 1, cfg.steps + 1):
            student.train()
            ids = blocks[batch_indices(len(blocks), cfg.batch_size, step, cfg.seed)].to(runtime.device)
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr_at(step)
            with runtime.autocast():
                with torch.no_grad():
                    t_logits, t_h = forward_with_hidden(teacher.model, ids)
                s_logits, s_h = forward_with_hidden(student, ids)
                parts = distillation_loss(s_logits, t_logits, s_h, t_h, ids, cfg)
            optimizer.zero_grad(set_to_none=True)
            parts.total.backward()
            optimizer.step()
            del t_logits, s_logits, t_h, s_h
            state["step"], state["tokens"] = step, state["tokens"] + ids.numel()
            state["seconds"] = time.monotonic() - started
            record = {
                "step": step,
                "loss": float(parts.total.detach()),
                "kl": parts.kl,
                "lm": parts.lm,
                "cos": parts.cos,
            }
            state["history"].append(record)
            now = time.monotonic()
            tok_s = (state["tokens"] - window[1]) / max(1e-9, now - window[0])
            bar.set_postfix(
                loss=f"{record['loss']:.3f}", kl=f"{parts.kl:.3f}", lm=f"{parts.lm:.3f}", tok_s=f"{tok_s:.0f}"
            )
            bar.update()
            if on_step is not None:
                on_step(step, record)
            if step % cfg.checkpoint_every == 0 or stop.requested:
                _save_checkpoint(out, student, optimizer, state)
            if stop.requested and step < cfg.steps:
                bar.close()
                raise KeyboardInterrupt(f"distillation stopped after step {step}; continue with --resume")
    bar.close()
    student.eval()
    report = heldout_losses(teacher.model, student, heldout, cfg, runtime) if heldout is not None else {}
    manifest = _manifest(name, teacher, keep, corpus, cfg, state, runtime, report)
    write_json_atomic(out / HISTORY, state["history"])
    _write_student(out, student, teacher, manifest)
    if register:
        zoo.register(out, name)
    return DistillResult(out, name, json.loads((out / zoo.MANIFEST).read_text()))


def _check_out(out: Path, resume: bool) -> None:
    """``out`` is a new or empty folder, or (``resume``) one that holds a checkpoint."""
    if out.exists() and not out.is_dir():
        raise FedPromptError(f"{out} is a file; --out must name a folder")
    has_ckpt = (out / CHECKPOINT / STATE).exists()
    if resume and not has_ckpt:
        raise FedPromptError(f"{out} holds no checkpoint to resume from")
    if not resume and out.exists() and any(out.iterdir()):
        hint = " (it holds a checkpoint: add --resume)" if has_ckpt else ""
        raise FedPromptError(f"{out} exists and is not empty{hint}")


def _manifest(name: str, teacher: LoadedModel, keep: list[int], corpus, cfg: DistillConfig, state: dict,
              runtime: Runtime, heldout: dict) -> dict:  # fmt: skip
    """The student's model manifest (``fedprompt-model.json``): its teacher, layers, corpus and distillation."""
    return {
        "name": name,
        "kind": "distilled",
        "source": "distilled by fedprompt post distill",
        "teacher": state["fingerprint"]["teacher"],
        "tokenizer_sha256": tokenizer_sha256(teacher.tokenizer),
        "layers_kept": keep,
        "teacher_layers": len(decoder_layers(teacher.model)[1]),
        "corpus": {"name": corpus.name, "sha256": corpus.sha256, "description": corpus.description},
        "distillation": {
            **asdict(cfg),
            "steps_done": state["step"],
            "tokens": state["tokens"],
            "seconds": round(state["seconds"], 1),
            "precision": runtime.precision,
            "device": runtime.device.type,
            "final_losses": state["history"][-1] if state["history"] else None,
            "heldout": heldout,
        },
    }


def _write_student(out: Path, student, teacher: LoadedModel, manifest: dict) -> None:
    """The student's files go into ``out`` next to the checkpoint, the manifest last: a folder without a
    manifest is an unfinished student, never loaded by name."""
    scratch = out / ".student-partial"
    shutil.rmtree(scratch, ignore_errors=True)
    student.requires_grad_(False)
    cpu = student.to("cpu")
    manifest["weights_sha256"] = zoo.state_dict_sha256(cpu)
    cpu.save_pretrained(scratch)
    teacher.tokenizer.save_pretrained(scratch)
    for f in scratch.iterdir():
        os.replace(f, out / f.name)
    scratch.rmdir()
    write_json_atomic(out / zoo.MANIFEST, manifest)
    shutil.rmtree(out / CHECKPOINT, ignore_errors=True)
