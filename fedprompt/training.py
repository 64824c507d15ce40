"""Prompt tuning on one machine: a session (model + data + encoders) and the non-private training loop."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from fedprompt.data import datasets as ds_mod
from fedprompt.data.datasets import Dataset, Example
from fedprompt.errors import ConfigError
from fedprompt.models import zoo
from fedprompt.models.zoo import LoadedModel
from fedprompt.prompt import SoftPrompt, init_from_token_ids, init_from_vocab, origin_id
from fedprompt.prompted import PromptedLM
from fedprompt.runtime import Runtime
from fedprompt.task import TemplateEncoder, Verbalizer, collate
from fedprompt.tuning_settings import DEFAULT_INIT_TEXT, TuneConfig


def make_optimizer(params, cfg: TuneConfig) -> torch.optim.Optimizer:
    """Adam (the default for one holder) or plain SGD (whose FedAvg of deltas follows the average gradient
    of the holders; Adam normalises each holder's steps, which makes label-skewed holders pull apart)."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr)
    return torch.optim.Adam(params, lr=cfg.lr)


@dataclass
class TuneResult:
    weight: torch.Tensor
    initial: torch.Tensor
    origin_id: str
    history: list[dict] = field(default_factory=list)


def initial_prompt(
    loaded: LoadedModel, verbalizer: Verbalizer, cfg: TuneConfig, text: str
) -> tuple[torch.Tensor, dict]:
    """The data-independent starting prompt of ``cfg.init`` (``text`` is used by the "text" init only)."""
    emb = loaded.model.get_input_embeddings().weight
    if cfg.init == "vocab":
        return init_from_vocab(emb, cfg.prompt_length, seed=cfg.seed), {"method": "vocab", "seed": cfg.seed}
    if cfg.init == "labels":
        ids = [t for words in verbalizer.token_ids for seq in words for t in seq]
        return init_from_token_ids(emb, ids, cfg.prompt_length), {"method": "labels"}
    ids = loaded.tokenizer(text, add_special_tokens=False).input_ids
    return init_from_token_ids(emb, ids, cfg.prompt_length), {"method": "text", "text": text}


class Session:
    """A loaded frozen model, a dataset, and the encoder/verbalizer that join them."""

    def __init__(
        self,
        model: str | LoadedModel,
        dataset: str | Dataset,
        *,
        runtime: Runtime | None = None,
        max_length: int = 128,
        template: str | None = None,
        label_words: list[list[str]] | None = None,
        scoring: str | None = None,
    ) -> None:
        """``dataset``: a Dataset, a bundled name, a data file or a task file (.toml); ``template``,
        ``label_words`` and ``scoring`` override the dataset's (e.g. those an artifact records)."""
        self.runtime = runtime or Runtime.create()
        self.loaded = model if isinstance(model, LoadedModel) else zoo.load(model, device=self.runtime.device)
        self.loaded.model.to(self.runtime.device)
        self.dataset = dataset if isinstance(dataset, Dataset) else ds_mod.load(dataset)
        self.template = template or self.dataset.template
        self.label_words = label_words or self.dataset.label_words
        self.scoring = scoring or self.dataset.scoring
        self.encoder = TemplateEncoder(self.loaded.tokenizer, self.template, max_length)
        self.verbalizer = Verbalizer.build(
            self.loaded.tokenizer, self.label_words, scoring=self.scoring, label_names=self.dataset.label_names
        )
        self._encoded: dict[str, list[tuple[list[int], int]]] = {}

    @property
    def prompt_task(self):
        """The task a prompt tuned in this session is tied to (its artifact's metadata records it)."""
        from fedprompt.prompt_meta import PromptTask

        words = tuple(tuple(w) for w in self.label_words)
        return PromptTask(self.dataset.name, self.template, tuple(self.dataset.label_names), words, self.scoring)

    # -------------------------------------------------------------- prompts

    def initial_prompt(self, cfg: TuneConfig) -> tuple[torch.Tensor, dict]:
        text = (
            cfg.init_text
            or self.dataset.init_text
            or DEFAULT_INIT_TEXT.format(labels=", ".join(self.dataset.label_names))
        )
        return initial_prompt(self.loaded, self.verbalizer, cfg, text)

    def prompted(self, weight: torch.Tensor | None, *, base_dropout: bool = False) -> PromptedLM:
        prompt = SoftPrompt(weight).to(self.runtime.device) if weight is not None else None
        return PromptedLM(self.loaded.model, prompt, base_dropout=base_dropout)

    # -------------------------------------------------------------- data

    def encode_split(self, split: str) -> list[tuple[list[int], int]]:
        # a federation holder trains on the same split every round: tokenize it once
        if split not in self._encoded:
            self._encoded[split] = [(self.encoder.encode(e.text), e.label) for e in self.dataset.split(split)]
        return self._encoded[split]

    def collate(self, items: list[tuple[list[int], int]]) -> dict[str, torch.Tensor]:
        return collate([x for x, _ in items], [y for _, y in items], self.encoder.pad_id, self.runtime.device)

    # -------------------------------------------------------------- evaluation

    def evaluate(
        self, prompted: PromptedLM, examples: list[Example], *, batch_size: int = 32, desc: str = "eval"
    ) -> float:
        """Accuracy of ``prompted`` on ``examples`` (batched by length, so little padding is computed)."""
        right = self.correct(prompted, examples, batch_size=batch_size, desc=desc)
        return sum(right) / len(right)

    def correct(
        self, prompted: PromptedLM, examples: list[Example], *, batch_size: int = 32, desc: str = "eval"
    ) -> list[bool]:
        """Whether ``prompted`` classifies each of ``examples`` right, in their order: paired comparisons of two
        prompts on one test set need the examples, not only the accuracy."""
        predicted, _ = self.predict(prompted, examples, batch_size=batch_size, desc=desc)
        return [p == e.label for p, e in zip(predicted, examples, strict=True)]

    @torch.inference_mode()
    def predict(
        self, prompted: PromptedLM, examples: list[Example], *, batch_size: int = 32, desc: str = "eval"
    ) -> tuple[list[int], torch.Tensor]:
        """The predicted class of each example, in their order, and the (N, C) class scores (log-probabilities).

        Batched by length (shortest first, ties in the examples' order), so little padding is computed and the
        batches are the same on every run; padding never changes a score (masked keys, positions over real
        tokens), so the batch size changes scores only by float rounding (tests/core/test_prompted.py measures it).
        """
        if not examples:
            raise ConfigError("no examples to evaluate")
        prompted.eval()
        ids = [self.encoder.encode(e.text) for e in examples]
        order = sorted(range(len(examples)), key=lambda i: len(ids[i]))
        encoded = [(ids[i], examples[i].label) for i in order]
        scores = torch.empty(len(examples), len(self.dataset.label_names))
        for start in tqdm(range(0, len(encoded), batch_size), desc=desc, leave=False, unit="batch"):
            batch = self.collate(encoded[start : start + batch_size])
            with self.runtime.autocast():
                got = prompted.class_scores(batch, self.verbalizer)
            scores[order[start : start + batch_size]] = got.float().cpu()
        return scores.argmax(-1).tolist(), scores

    def validation_subset(self, n: int) -> list[Example]:
        val = self.dataset.split("validation")
        return val[:n] if n else []


def _cycle(loader: DataLoader) -> Iterator[dict[str, torch.Tensor]]:
    while True:
        yield from loader


def run_steps(
    session: Session,
    prompted: PromptedLM,
    optimizer: torch.optim.Optimizer,
    batches: Iterator[dict[str, torch.Tensor]],
    cfg: TuneConfig,
    *,
    desc: str = "tune",
    on_empty_batch: Callable[[], None] | None = None,
    after_step: Callable[[int], dict] | None = None,
    logit_offsets: torch.Tensor | None = None,
) -> list[dict]:
    """The training loop shared by private and non-private tuning; returns one record per eval point."""
    history = []
    val = session.validation_subset(cfg.eval_examples)
    bar = tqdm(range(1, cfg.steps + 1), desc=desc, unit="step")
    for step in bar:
        prompted.train()
        batch = next(batches)
        optimizer.zero_grad(set_to_none=True)
        if batch["labels"].numel():
            with session.runtime.autocast():
                loss = prompted.classification_loss(batch, session.verbalizer, logit_offsets=logit_offsets)
            loss.backward()
            loss_value = float(loss.detach())
        else:  # possible under Poisson sampling; the step (and its noise) still happens
            if on_empty_batch is None:
                raise RuntimeError("empty batch")
            on_empty_batch()
            loss_value = float("nan")
        optimizer.step()
        postfix = {"loss": f"{loss_value:.3f}", "batch": int(batch["labels"].numel())}
        if after_step is not None:
            postfix.update(after_step(step))
        if val and cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
            acc = session.evaluate(prompted, val, batch_size=cfg.eval_batch_size, desc="validation")
            postfix["val_acc"] = f"{acc:.3f}"
            history.append({"step": step, "loss": loss_value, "val_acc": acc, **postfix})
            tqdm.write(f"step {step}: " + " ".join(f"{k}={v}" for k, v in postfix.items()))
        bar.set_postfix(postfix)
    bar.close()
    prompted.eval()
    return history


def tune(session: Session, cfg: TuneConfig) -> TuneResult:
    """Non-private prompt tuning with Adam on shuffled mini-batches."""
    initial, _ = session.initial_prompt(cfg)
    torch.manual_seed(cfg.seed)
    prompted = session.prompted(initial, base_dropout=cfg.base_dropout)
    optimizer = make_optimizer(prompted.prompt.parameters(), cfg)
    train = session.encode_split("train")
    if len(train) < cfg.batch_size:
        raise ConfigError(f"batch_size {cfg.batch_size} is larger than the {len(train)} training examples")
    gen = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(
        train,
        batch_size=cfg.batch_size,
        shuffle=True,
        drop_last=True,
        generator=gen,
        collate_fn=session.collate,
    )
    history = run_steps(session, prompted, optimizer, _cycle(loader), cfg)
    return TuneResult(prompted.prompt.weight.detach().cpu().clone(), initial, origin_id(initial), history)
