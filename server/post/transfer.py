"""POST, the provider's last step: move a prompt tuned on the student to the teacher with public inputs only.

The target prompt starts from the source prompt's *initialisation* recomputed on the teacher, and is trained
so that at the answer position (full vocabulary, temperature T = 2) the teacher with it behaves like the
student with the source prompt (Wang et al. 2025):

    L = T² · [ (1 − α) · KL( s(p_s + x) ‖ t(p_t + x) )
             +      α  · KL( softmax((s(p_s + x) − s(x)) / T) ‖ softmax((t(p_t + x) − t(x)) / T) ) ]

The first term copies the student's prompted predictions, the second only the *shift* the prompt causes.
The inputs x are public and unlabelled (under 100 by default); the checkpoint is chosen on a public
validation split (by accuracy when it carries the task's labels, else by this loss), never on private data
(POST's own code chose it on the private validation set). The result is a prompt artifact for the teacher
whose privacy spend is the source's, unchanged: the transfer reads no private data (post-processing).
"""

from __future__ import annotations

import random
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from fedprompt import artifact
from fedprompt.artifact import ArtifactMeta
from fedprompt.data import datasets as ds_mod
from fedprompt.data.datasets import Dataset, Example
from fedprompt.errors import ArtifactError, ConfigError, DatasetError, ModelError
from fedprompt.models import zoo
from fedprompt.models.student import tokenizer_sha256, vocab_size
from fedprompt.models.zoo import LoadedModel
from fedprompt.prompt import SoftPrompt, origin_id, prompt_sha256
from fedprompt.prompted import PromptedLM
from fedprompt.runtime import Runtime
from fedprompt.settings_checks import finite_numbers, non_negative_ints, positive_ints
from fedprompt.task import TemplateEncoder, Verbalizer, collate
from fedprompt.training import initial_prompt
from fedprompt.tuning_settings import TuneConfig

SELECT = ("auto", "accuracy", "loss", "last")


@dataclass
class TransferConfig:
    """Settings of one transfer. ``public_examples`` public inputs train the prompt; ``validation_examples``
    of the public set's validation split choose the checkpoint (``select``: auto = accuracy when the public
    set has the task's labels, else the transfer loss)."""

    alpha: float = 0.5
    steps: int = 200
    lr: float = 1e-3
    batch_size: int = 32
    public_examples: int = 64
    validation_examples: int = 200
    eval_every: int = 20
    temperature: float = 2.0
    max_length: int = 128
    select: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.alpha, float | int) and 0 <= self.alpha <= 1):
            raise ConfigError(f"alpha must be in [0, 1], got {self.alpha!r}")
        positive_ints(self, "steps", "batch_size", "public_examples", "max_length", "eval_every")
        non_negative_ints(self, "validation_examples")
        finite_numbers(self, "lr", "temperature", positive=True)
        if self.select not in SELECT:
            raise ConfigError(f"select must be one of {SELECT}, got {self.select!r}")


@dataclass
class TransferResult:
    weight: torch.Tensor
    meta: ArtifactMeta
    report: dict[str, Any] = field(default_factory=dict)
    # every evaluated checkpoint's prompt, by step, when asked for (benchmarks study the choice)
    checkpoints: dict[int, torch.Tensor] = field(default_factory=dict)


# ------------------------------------------------------------------ checks


def check_compatible(student: LoadedModel, teacher: LoadedModel) -> None:
    """The transfer compares next-token distributions of the two models over one vocabulary: refuse pairs
    whose tokenizers or output vocabularies differ (a hidden-size difference is bridged: the target prompt
    is initialised in the teacher's own embedding space)."""
    s_tok, t_tok = tokenizer_sha256(student.tokenizer), tokenizer_sha256(teacher.tokenizer)
    if s_tok != t_tok:
        raise ModelError(
            f"{student.model_id} and {teacher.model_id} have different tokenizers "
            f"({len(student.tokenizer)} vs {len(teacher.tokenizer)} tokens, vocabulary hashes {s_tok[:12]} / "
            f"{t_tok[:12]}); the transfer matches their next-token distributions word for word and cannot "
            "bridge two vocabularies: distil a student from this teacher (fedprompt post distill)"
        )
    if vocab_size(student.model) != vocab_size(teacher.model):
        raise ModelError(
            f"{student.model_id} predicts over {vocab_size(student.model)} tokens, {teacher.model_id} over "
            f"{vocab_size(teacher.model)}; the transfer needs one output vocabulary"
        )


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def public_examples(public: Dataset, task: str, cfg: TransferConfig) -> tuple[list[Example], list[Example], int]:
    """The public training inputs and validation examples, without any text of the task's own dataset.

    Public sets can contain a task's texts: vader-movies holds 401 of rotten-tomatoes' 500 test snippets
    (both come from the same Rotten Tomatoes corpus). Such texts are dropped, so that neither the
    transfer nor the choice of its checkpoint sees a test example.
    """
    if public.name == task:
        raise DatasetError(
            f"the public set {public.name!r} is the task's own data; POST transfers with public data only"
        )
    task_texts: set[str] = set()
    if task in ds_mod.BUNDLED:
        task_texts = {_norm(e.text) for s in ds_mod.load(task).splits.values() for e in s}
    dropped = 0

    def keep(examples: list[Example]) -> list[Example]:
        nonlocal dropped
        kept = [e for e in examples if _norm(e.text) not in task_texts]
        dropped += len(examples) - len(kept)
        return kept

    train = keep(public.split("train"))
    validation = keep(public.split("validation"))
    random.Random(cfg.seed).shuffle(train)
    if len(train) < cfg.public_examples:
        raise DatasetError(
            f"{public.name}: {len(train)} usable training inputs (after dropping {dropped} texts of {task}), "
            f"fewer than the {cfg.public_examples} asked for"
        )
    return train[: cfg.public_examples], validation[: cfg.validation_examples], dropped


def target_initial_prompt(meta: ArtifactMeta, source_weight: torch.Tensor, teacher: LoadedModel) -> torch.Tensor:
    """The source prompt's initialisation, recomputed in the teacher's embedding space."""
    init = meta.init or {}
    method = init.get("method")
    if method not in ("text", "vocab", "labels") or (method == "text" and not init.get("text")):
        raise ArtifactError(
            f"the source prompt records no reproducible initialisation ({init!r}); the transfer starts the "
            "teacher's prompt from the source prompt's initialisation"
        )
    verbalizer = Verbalizer.build(teacher.tokenizer, meta.label_words)
    cfg = TuneConfig(prompt_length=int(source_weight.shape[0]), init=method, seed=int(init.get("seed", 0)))
    weight, _ = initial_prompt(teacher, verbalizer, cfg, init.get("text", ""))
    return weight


# ------------------------------------------------------------------ the loss


def transfer_loss(
    teacher_prompted: torch.Tensor,
    teacher_plain: torch.Tensor,
    student_prompted: torch.Tensor,
    student_plain: torch.Tensor,
    alpha: float,
    temperature: float,
) -> torch.Tensor:
    """POST's transfer loss per example, for (B, V) answer-position logits (the module docstring)."""
    t = temperature
    t_log = F.log_softmax(teacher_prompted.float() / t, dim=-1)
    s_log = F.log_softmax(student_prompted.float() / t, dim=-1)
    direct = (s_log.exp() * (s_log - t_log)).sum(-1)
    s_shift = F.log_softmax((student_prompted.float() - student_plain.float()) / t, dim=-1)
    t_shift = F.log_softmax((teacher_prompted.float() - teacher_plain.float()) / t, dim=-1)
    shift = (s_shift.exp() * (s_shift - t_shift)).sum(-1)
    return t * t * ((1 - alpha) * direct + alpha * shift)


@torch.inference_mode()
def answer_logits(
    loaded: LoadedModel, weight: torch.Tensor | None, encoded: list[list[int]], pad_id: int, runtime: Runtime, bs: int
) -> torch.Tensor:
    """Full-vocabulary logits at the answer position, (N, V) float32 on the CPU."""
    prompt = SoftPrompt(weight).to(runtime.device) if weight is not None else None
    model = PromptedLM(loaded.model, prompt)
    out = []
    for i in range(0, len(encoded), bs):
        batch = collate(encoded[i : i + bs], [0] * len(encoded[i : i + bs]), pad_id, runtime.device)
        with runtime.autocast():
            out.append(model(batch["input_ids"], batch["attention_mask"], logits_to_keep=1)[:, -1].float().cpu())
    return torch.cat(out)


# ------------------------------------------------------------------ the run


def transfer(
    source: str,
    teacher: LoadedModel | str,
    public: str | Dataset,
    cfg: TransferConfig,
    *,
    student: LoadedModel | str | None = None,
    runtime: Runtime | None = None,
    keep_checkpoints: bool = False,
) -> TransferResult:
    """Transfer the prompt artifact ``source`` (tuned on a student) to ``teacher`` with the public set ``public``.

    ``keep_checkpoints`` also returns the prompt of every evaluated step (for studying the choice)."""
    runtime = runtime or Runtime.create()
    source_weight, meta = artifact.load(source)
    if student is None:
        student = meta.base_model_id
    student = student if isinstance(student, LoadedModel) else zoo.load(student, device=runtime.device)
    artifact.check_base_model(meta, source_weight, student)
    teacher = teacher if isinstance(teacher, LoadedModel) else zoo.load(teacher, device=runtime.device)
    if teacher.weights_sha256 == student.weights_sha256:
        raise ModelError(f"the prompt was tuned on {teacher.model_id} already; there is nothing to transfer")
    check_compatible(student, teacher)
    student.model.to(runtime.device)
    teacher.model.to(runtime.device)
    public = public if isinstance(public, Dataset) else ds_mod.load(public)
    train, validation, dropped = public_examples(public, meta.task, cfg)
    select = checkpoint_choice(cfg.select, public, meta.label_names, bool(validation))
    encoder = TemplateEncoder(teacher.tokenizer, meta.template, cfg.max_length)
    verbalizer = Verbalizer.build(teacher.tokenizer, meta.label_words, label_names=meta.label_names)
    if not verbalizer.single_token:
        # POST distils the teacher's next-token distribution at the answer position: a word's later tokens
        # are not in it
        raise ConfigError(
            f"POST transfers prompts of single-token label words only; {meta.label_words!r} has multi-token words "
            "on the teacher's tokenizer"
        )
    enc_train = [encoder.encode(e.text) for e in train]
    enc_val = [encoder.encode(e.text) for e in validation]
    bs = cfg.batch_size
    tqdm.write(
        f"transfer: {len(train)} public inputs, {len(validation)} validation examples ({public.name}), "
        f"{dropped} texts of {meta.task} dropped from the public set",
        file=sys.stderr,
    )
    # The student's side and the teacher's unprompted logits are constants of the loss: computed once.
    s_p = answer_logits(student, source_weight, enc_train + enc_val, encoder.pad_id, runtime, bs)
    s_0 = answer_logits(student, None, enc_train + enc_val, encoder.pad_id, runtime, bs)
    t_0 = answer_logits(teacher, None, enc_train + enc_val, encoder.pad_id, runtime, bs)
    n = len(enc_train)

    initial = target_initial_prompt(meta, source_weight, teacher)
    prompt = SoftPrompt(initial).to(runtime.device)
    model = PromptedLM(teacher.model, prompt)
    optimizer = torch.optim.Adam(prompt.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)

    def val_loss() -> float:
        if not enc_val:
            return float("nan")
        t_p = answer_logits(teacher, prompt.weight.detach(), enc_val, encoder.pad_id, runtime, bs)
        return float(transfer_loss(t_p, t_0[n:], s_p[n:], s_0[n:], cfg.alpha, cfg.temperature).mean())

    def val_accuracy() -> float | None:
        if select != "accuracy":
            return None
        scores = verbalizer.scores(answer_logits(teacher, prompt.weight.detach(), enc_val, encoder.pad_id, runtime, bs))
        return float((scores.argmax(-1) == torch.tensor([e.label for e in validation])).float().mean())

    def evaluate(step: int, train_loss: float) -> dict:
        rec = {"step": step, "train_loss": train_loss, "val_loss": val_loss(), "val_accuracy": val_accuracy()}
        history.append(rec)
        if keep_checkpoints:
            checkpoints[step] = prompt.weight.detach().cpu().clone()
        return rec

    def score(rec: dict) -> float:
        if select == "accuracy":
            return rec["val_accuracy"] - 1e-6 * rec["val_loss"]  # ties go to the lower loss
        return -rec["val_loss"] if select == "loss" else rec["step"]

    history: list[dict] = []
    checkpoints: dict[int, torch.Tensor] = {}
    started = time.monotonic()
    best = evaluate(0, float("nan"))
    best_weight = prompt.weight.detach().cpu().clone()
    order: list[int] = []
    bar = tqdm(range(1, cfg.steps + 1), desc=f"transfer to {teacher.model_id}", unit="step")
    for step in bar:
        if len(order) < bs:
            order += torch.randperm(n, generator=gen).tolist()
        idx, order = order[: min(bs, n)], order[min(bs, n) :]
        batch = collate([enc_train[i] for i in idx], [0] * len(idx), encoder.pad_id, runtime.device)
        with runtime.autocast():
            t_p = model(batch["input_ids"], batch["attention_mask"], logits_to_keep=1)[:, -1]
        loss = transfer_loss(t_p, t_0[idx].to(runtime.device), s_p[idx].to(runtime.device), s_0[idx].to(runtime.device),
                             cfg.alpha, cfg.temperature).mean()  # fmt: skip
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        postfix = {"loss": f"{float(loss.detach()):.4f}"}
        if step % cfg.eval_every == 0 or step == cfg.steps:
            rec = evaluate(step, float(loss.detach()))
            if score(rec) > score(best):
                best, best_weight = rec, prompt.weight.detach().cpu().clone()
            postfix["val_loss"] = f"{rec['val_loss']:.4f}"
            if rec["val_accuracy"] is not None:
                postfix["val_acc"] = f"{rec['val_accuracy']:.3f}"
        bar.set_postfix(postfix)
    bar.close()
    seconds = time.monotonic() - started

    report = {
        "chosen_step": best["step"],
        "select": select,
        "history": history,
        "seconds": round(seconds, 1),
        "public": {"name": public.name, "sha256": public.sha256, "inputs": n, "validation": len(enc_val),
                   "dropped_task_texts": dropped},
    }  # fmt: skip
    transfer_record = {**asdict(cfg), "select": select, "chosen_step": best["step"], "seconds": report["seconds"]}
    out_meta = transferred_meta(meta, student, teacher, initial, transfer_record, report["public"], runtime)
    if prompt_sha256(best_weight) == prompt_sha256(initial):
        report["note"] = "the untrained initialisation scored best on the public validation split"
    return TransferResult(best_weight, out_meta, report, checkpoints)


def checkpoint_choice(select: str, public: Dataset, task_labels: list[str], has_validation: bool) -> str:
    """How the transfer chooses its checkpoint (``auto``: by accuracy when the public set has the task's labels and
    a validation split, else by loss on it, else the last step); DatasetError when the public set cannot serve."""
    labels_match = list(public.label_names) == list(task_labels)
    if select == "auto":
        select = "accuracy" if labels_match and has_validation else ("loss" if has_validation else "last")
    if select == "accuracy" and not labels_match:
        raise DatasetError(
            f"{public.name} has labels {public.label_names}, the task {task_labels}: choose by --select loss"
        )
    if select in ("accuracy", "loss") and not has_validation:
        raise DatasetError(f"{public.name} has no validation examples to choose a checkpoint on")
    return select


def transferred_meta(
    meta: ArtifactMeta,
    student: LoadedModel,
    teacher: LoadedModel,
    initial: torch.Tensor,
    transfer_record: dict,
    public: dict,
    runtime: Runtime,
) -> ArtifactMeta:
    """The transferred prompt's metadata: the source's task and privacy spend (the transfer is post-processing of
    a released prompt), the teacher as its model, and its lineage back to the source prompt and the student."""
    lineage = {
        "method": "post-transfer",
        "source_prompt_sha256": meta.prompt_sha256,
        "source_model": {"id": meta.base_model_id, "weights_sha256": meta.base_model_sha256},
        "source_origin_id": meta.origin_id,
        "source_lineage": meta.lineage,
        "public": public,
    }
    student_manifest = zoo.read_manifest(zoo.registered().get(student.model_id, zoo.model_folder(student.model_id)))
    if student_manifest.get("kind") == "distilled":
        lineage["student_of"] = student_manifest.get("teacher")
    return ArtifactMeta.create(
        meta.prompt_task,
        teacher.model_id,
        teacher.weights_sha256,
        origin_id=origin_id(initial),
        init=meta.init,
        privacy=meta.privacy,  # post-processing of the released source prompt: the spend is unchanged
        training={"transfer": transfer_record, "source_training": meta.training, "precision": runtime.precision},
        lineage=lineage,
    )
