"""DP-OPT (Hong et al., ICLR 2024): a private text prompt written by an ensemble of in-context learners.

The local model first answers every private training example under the initial instruction (the
"student", DLN-1's forward pass; an example's answer depends on that example alone). Each new candidate
instruction is then written one token at a time: for every token a fresh Poisson subsample of the private
examples is drawn, every sampled example joins one of J teachers chosen uniformly at random, each teacher
reads the backward meta-prompt built from its own examples and samples one next token, and the votes are
released by the limited-domain mechanism (``fedprompt.dp.limited_domain``). A failed release is retried a
bounded number of times; every try is a query and is accounted. Generation stops before the next query
would pass the target epsilon. Finally one candidate is chosen on a holdout disjoint from the generation
examples with the exponential mechanism.

Why each example joins a uniformly random teacher rather than the next of J fixed slices of the sample
(DP-OPT's code): with slices, one added example shifts every later slice, so many teachers' votes change
and the release's sensitivity of 2 no longer holds. With independent assignment it changes exactly one
teacher's input.

The holdout is chosen per example by a keyed hash of the example itself, so adding or removing one example
never moves another one between the two parts: the parts are disjoint under the add/remove relation, and
the whole run is max(epsilon of generation, epsilon of selection)-DP at the generation's delta.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
from tqdm.auto import tqdm

from fedprompt.client.dpopt.teachers import TeacherEnsemble
from fedprompt.client.dpopt.text import IMPROVE_MESSAGES, Demo, MetaPrompt, correct_count, instruction_template, predict
from fedprompt.data.datasets import Example
from fedprompt.dp.limited_domain import LimitedDomain, dpopt_epsilon, max_queries, select_candidate
from fedprompt.errors import ConfigError
from fedprompt.models.zoo import LoadedModel
from fedprompt.protocols.dpopt_settings import DPOPTConfig
from fedprompt.runtime import Runtime
from fedprompt.task import Verbalizer

ACCOUNTANT = "dpopt-rdp"  # limited domain as an eps0-DP release, Poisson-subsampled RDP, Balle et al. conversion


@dataclass
class DPOPTResult:
    candidates: list[str]
    chosen: str | None
    chosen_index: int | None
    queries: int
    failures: int
    tokens: int
    budget_exhausted: bool
    sample_rate: float
    delta: float
    epsilon_generation: float  # the guarantee: the projection's (see finish)
    epsilon_selection: float
    generation_examples: int
    holdout_examples: int
    seconds: float
    settings: dict = field(default_factory=dict)
    epsilon_generation_realised: float = math.nan  # the ε of the queries made: for the holder's eyes only

    @property
    def epsilon(self) -> float:
        return max(self.epsilon_generation, self.epsilon_selection)


# ------------------------------------------------------------------ randomness and data


class Draws:
    """The run's randomness: the OS CSPRNG unless a seed is given (tests)."""

    def __init__(self, seed: int | None) -> None:
        if seed is None:
            from fedprompt.dp.secure_rng import urandom_uniform

            self.py: random.Random = random.SystemRandom()
            self.uniform: Callable[[int], np.ndarray] = lambda n: 1.0 - urandom_uniform(n)  # [0, 1)
            torch_seed = int.from_bytes(os.urandom(8), "little") >> 1
        else:
            self.py = random.Random(seed)
            np_rng = np.random.default_rng(seed)
            self.uniform = np_rng.random
            torch_seed = seed
        self.torch = torch.Generator().manual_seed(torch_seed)


def sample_groups(n: int, *, sample_rate: float, teachers: int, draws: Draws) -> list[list[int]]:
    """A Poisson subsample of ``range(n)``, each sampled index in one teacher chosen uniformly at random."""
    chosen = np.flatnonzero(draws.uniform(n) < sample_rate)
    which = np.minimum((draws.uniform(len(chosen)) * teachers).astype(np.int64), teachers - 1)
    return [chosen[which == j].tolist() for j in range(teachers)]


def split_holdout(examples: Sequence[Example], fraction: float, key: bytes) -> tuple[list[Example], list[Example]]:
    """(generation, holdout): each example's side is a keyed hash of the example itself."""
    gen, hold = [], []
    for e in examples:
        digest = hmac.new(key, f"{e.label}\x00{e.text}".encode(), hashlib.sha256).digest()
        (hold if int.from_bytes(digest[:8], "big") < fraction * 2**64 else gen).append(e)
    return gen, hold


# ------------------------------------------------------------------ generation


class DPOPTGenerator:
    """Writes candidate instructions from ``examples`` (the generation part of a holder's data)."""

    def __init__(
        self,
        loaded: LoadedModel,
        runtime: Runtime,
        verbalizer: Verbalizer,
        task_template: str,
        label_words: Sequence[str],
        instruction: str,
        examples: Sequence[Example],
        cfg: DPOPTConfig,
        *,
        reuse_head: bool = True,
    ) -> None:
        if len(examples) < cfg.teachers:
            raise ConfigError(f"{len(examples)} generation examples cannot feed {cfg.teachers} teachers")
        self.loaded, self.runtime, self.verbalizer, self.cfg = loaded, runtime, verbalizer, cfg
        self.examples = list(examples)
        self.label_words = [w.strip() for w in label_words]
        self.student_template = instruction_template(instruction, task_template)
        self.sample_rate = min(1.0, cfg.teachers * cfg.shots / len(self.examples))
        self.delta = cfg.delta if cfg.delta is not None else 1.0 / (2 * len(self.examples))
        self.query_limit = (
            max_queries(cfg.target_epsilon, **self._accounting()) if cfg.private else cfg.candidates * 10**6
        )
        if cfg.private and self.query_limit == 0:  # before any model work
            raise ConfigError(
                f"not one token release fits in target epsilon {cfg.target_epsilon:g} at token epsilon "
                f"{cfg.token_epsilon:g}, sample rate {self.sample_rate:.4f} and delta {self.delta:.3g}"
            )
        self.meta = MetaPrompt(loaded.tokenizer, instruction, max_demo_tokens=cfg.max_demo_tokens)
        self.ensemble = TeacherEnsemble(
            loaded, runtime, self.meta.head_ids, reuse_head=reuse_head, batch_size=cfg.teacher_batch_size
        )
        self.draws = Draws(cfg.seed)
        self.stop_ids = sorted(self.meta.stop_ids())
        self._predictions = np.full(len(self.examples), -1, dtype=np.int64)
        self._demo_ids: dict[int, tuple[bool, list[int]]] = {}
        self.queries = 0
        self.failures = 0
        self.mechanism: LimitedDomain | None = None

    def _accounting(self) -> dict:
        return {
            "sample_rate": self.sample_rate,
            "eps0": self.cfg.token_epsilon,
            "delta0": self.cfg.token_delta,
            "delta": self.delta,
        }

    def epsilon_spent(self, queries: int | None = None) -> float:
        if not self.cfg.private:
            return math.inf
        return dpopt_epsilon(self.queries if queries is None else queries, **self._accounting())

    def projected_queries(self) -> int:
        """An upper bound on the queries this run can make (what the ledger reserves)."""
        # a candidate releases at most max_new_tokens tokens (a stop token included) and fails at most
        # max_failures + 1 times (the failure that ends it)
        per_candidate = self.cfg.max_new_tokens + self.cfg.max_failures + 1
        return min(self.query_limit, self.cfg.candidates * per_candidate)

    # -------------------------------------------------------------- one query

    def _label(self, indices: Sequence[int]) -> None:
        missing = [i for i in indices if self._predictions[i] < 0]
        if missing:
            texts = [self.examples[i].text for i in missing]
            predicted = predict(self.loaded, self.runtime, self.verbalizer, self.student_template, texts)
            self._predictions[missing] = predicted

    def _demo(self, i: int) -> tuple[bool, list[int]]:
        if i not in self._demo_ids:
            e = self.examples[i]
            demo = Demo(e.text, self.label_words[e.label], self.label_words[int(self._predictions[i])])
            self._demo_ids[i] = (demo.correct, self.meta.demo_ids(demo))
        return self._demo_ids[i]

    @torch.inference_mode()
    def votes(self, generated: Sequence[int]) -> Counter:
        """One query's teacher votes: a fresh subsample, one token sampled by each teacher."""
        groups = sample_groups(
            len(self.examples), sample_rate=self.sample_rate, teachers=self.cfg.teachers, draws=self.draws
        )
        self._label([i for g in groups for i in g])
        bodies = []
        for g in groups:
            message = IMPROVE_MESSAGES[self.draws.py.randrange(len(IMPROVE_MESSAGES))]
            bodies.append(self.meta.body_ids([self._demo(i) for i in g], message) + list(generated))
        logits = self.ensemble.next_token_logits(bodies).cpu()
        if len(generated) < self.cfg.min_new_tokens:
            logits[:, self.stop_ids] = -math.inf
        if self.cfg.temperature == 0:
            tokens = logits.argmax(-1)
        else:
            probs = torch.softmax(logits / self.cfg.temperature, dim=-1)
            tokens = torch.multinomial(probs, 1, generator=self.draws.torch).squeeze(1)
        return Counter(tokens.tolist())

    def release(self, votes: Counter, vocab_size: int) -> int | None:
        if not self.cfg.private:
            top = max(votes.values())
            return self.draws.py.choice(sorted(t for t, c in votes.items() if c == top))
        if self.mechanism is None:
            self.mechanism = LimitedDomain(
                self.cfg.token_epsilon, self.cfg.token_delta, vocab_size=vocab_size, k_bar=self.cfg.k_bar
            )
        return self.mechanism.release(votes, self.draws.py)

    # -------------------------------------------------------------- candidates

    def candidate(self, progress: tqdm | None = None) -> tuple[list[int], bool]:
        """One candidate's token ids, and whether the budget ran out while writing it."""
        generated: list[int] = []
        failures, retries = 0, self.cfg.retries_per_token
        vocab = len(self.loaded.tokenizer)
        while len(generated) < self.cfg.max_new_tokens:
            if self.queries >= self.query_limit:
                return generated, True
            token = self.release(self.votes(generated), vocab)
            self.queries += 1
            if progress is not None:
                progress.update(1)
                eps = self.epsilon_spent() if self.cfg.private else float("nan")
                progress.set_postfix(tokens=len(generated), epsilon=f"{eps:.2f}", failed=self.failures)
            if token is None:
                self.failures += 1
                failures += 1
                if retries > 0 and failures <= self.cfg.max_failures:
                    retries -= 1
                    continue
                break
            retries = self.cfg.retries_per_token
            if token in self.stop_ids:
                break
            generated.append(token)
        return generated, False

    def generate(self, on_candidate: Callable[[int, str], None] | None = None) -> tuple[list[str], bool, int]:
        """Up to K non-empty candidates; (texts, budget exhausted, tokens released)."""
        texts, tokens, exhausted = [], 0, False
        total = self.projected_queries()
        with tqdm(total=total, desc="DP-OPT queries" if self.cfg.private else "ensemble queries", unit="q") as bar:
            for k in range(self.cfg.candidates):
                ids, exhausted = self.candidate(bar)
                tokens += len(ids)
                text = self.loaded.tokenizer.decode(ids, skip_special_tokens=True).strip()
                if text:
                    texts.append(text)
                    if on_candidate is not None:
                        on_candidate(k, text)
                if exhausted:
                    break
        return texts, exhausted, tokens


# ------------------------------------------------------------------ the whole run


def score_candidates(
    loaded: LoadedModel,
    runtime: Runtime,
    verbalizer: Verbalizer,
    task_template: str,
    candidates: Sequence[str],
    examples: Sequence[Example],
) -> list[int]:
    """Correct answers of each candidate on ``examples`` (private: release only through a mechanism)."""
    return [
        correct_count(loaded, runtime, verbalizer, instruction_template(c, task_template), examples)
        for c in tqdm(candidates, desc="scoring candidates", unit="cand", leave=False)
    ]


def prepare(
    loaded: LoadedModel,
    runtime: Runtime,
    verbalizer: Verbalizer,
    task_template: str,
    label_words: Sequence[str],
    instruction: str,
    train: Sequence[Example],
    cfg: DPOPTConfig,
    *,
    holdout_key: bytes | None = None,
) -> tuple[DPOPTGenerator, list[Example]]:
    """Split ``train`` into generation examples and a holdout, and set up the generator on the former."""
    key = holdout_key or (cfg.seed.to_bytes(8, "big") if cfg.seed is not None else os.urandom(32))
    gen_part, holdout = split_holdout(train, cfg.holdout_fraction, key)
    if not holdout:
        raise ConfigError(f"holdout_fraction {cfg.holdout_fraction:g} of {len(train)} examples left no holdout")
    gen = DPOPTGenerator(loaded, runtime, verbalizer, task_template, label_words, instruction, gen_part, cfg)
    return gen, holdout


def projected_epsilon(gen: DPOPTGenerator) -> float:
    """The most this run can spend: what a ledger reserves before it starts."""
    cfg = gen.cfg
    return max(gen.epsilon_spent(gen.projected_queries()), cfg.selection_epsilon or cfg.target_epsilon)


def finish(
    gen: DPOPTGenerator,
    holdout: Sequence[Example],
    task_template: str,
    *,
    on_candidate: Callable[[int, str], None] | None = None,
) -> DPOPTResult:
    """Generate the candidates and select one on the holdout (see the module doc)."""
    started = time.perf_counter()
    cfg = gen.cfg
    candidates, exhausted, tokens = gen.generate(on_candidate)
    eps_sel = 0.0
    chosen_index = None
    if candidates:
        correct = score_candidates(gen.loaded, gen.runtime, gen.verbalizer, task_template, candidates, holdout)
        if cfg.private:
            eps_sel = cfg.selection_epsilon or cfg.target_epsilon
            chosen_index = select_candidate(correct, eps_sel, gen.draws.py)
        else:
            chosen_index = max(range(len(correct)), key=correct.__getitem__)
    return DPOPTResult(
        candidates=candidates,
        chosen=candidates[chosen_index] if chosen_index is not None else None,
        chosen_index=chosen_index,
        queries=gen.queries,
        failures=gen.failures,
        tokens=tokens,
        budget_exhausted=exhausted,
        sample_rate=gen.sample_rate,
        delta=gen.delta,
        # The number of queries a run makes depends on its outputs (failures, stop tokens) and the RDP order is
        # chosen after the fact, so the ε of the realised count is not a guarantee without a privacy filter; the
        # projection, a count fixed before the run (the ledger's reservation), is.
        epsilon_generation=gen.epsilon_spent(gen.projected_queries()) if cfg.private else math.inf,
        epsilon_generation_realised=gen.epsilon_spent() if cfg.private else math.inf,
        epsilon_selection=eps_sel if cfg.private else math.inf,
        generation_examples=len(gen.examples),
        holdout_examples=len(holdout),
        seconds=time.perf_counter() - started,
        settings=asdict(replace(cfg, seed=None)),
    )
