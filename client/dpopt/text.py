"""DP-OPT's texts: the backward meta-prompt each teacher reads, and an instruction put to work on examples.

A teacher's input is token ids built from pieces tokenized separately and joined: the shared head (the
task of improving an instruction, and the current instruction), then its own demonstrations (examples the
student model got right, then those it got wrong), then the request to improve and the text released so
far. Joining ids rather than re-tokenizing the joined text means the head is the same ids for every
teacher, so its keys and values can be computed once (see ``dpopt.TeacherEnsemble``), and it means the
cached and uncached computations see exactly the same input.

The wording follows DP-OPT's code (Hong et al., ICLR 2024, ``utils/template.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from fedprompt.models.zoo import LoadedModel
from fedprompt.prompted import PromptedLM
from fedprompt.runtime import Runtime
from fedprompt.task import TemplateEncoder, Verbalizer, collate

META_INSTRUCTION = (
    "A student is completing a task that requires producing a text output from a text input. The student "
    "receives an instruction that describes how to produce the output given each input. The student has made "
    "some errors. Your task is to improve the instruction such that the student can fix the errors."
)
IMPROVE_MESSAGES = (
    "Clarify the instruction by adding few words or a short sentence. Be concise.",
    "Improve the instruction by providing examples on how to solve the task. Be concise.",
    "Shorten the instruction by removing superfluous words or sentences.",
    "Rewrite the instruction by providing detailed information to avoid ambiguity. Be concise.",
)
ANSWER_START = "Improved Instruction:"


def instruction_template(instruction: str, task_template: str) -> str:
    """The evaluation template: the instruction above the task's own template (braces kept literal)."""
    if not instruction.strip():
        return task_template
    escaped = instruction.strip().replace("{", "{{").replace("}", "}}")
    return f"{escaped}\n\n{task_template}"


@dataclass(frozen=True)
class Demo:
    """One private example as a teacher sees it: its text, its label word and the student's answer."""

    text: str
    label_word: str
    predicted_word: str

    @property
    def correct(self) -> bool:
        return self.label_word == self.predicted_word


class MetaPrompt:
    """Token ids of the backward meta-prompt, piece by piece.

    With a chat template (instruction-tuned models) the task goes into a user turn and the answer starts
    the assistant turn; without one the text is plain, as in DP-OPT's code for Vicuna.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        instruction: str,
        *,
        use_chat_template: bool | None = None,
        max_demo_tokens: int = 64,
    ) -> None:
        self.tokenizer = tokenizer
        self.max_demo_tokens = max_demo_tokens
        chat = tokenizer.chat_template is not None if use_chat_template is None else use_chat_template
        head = f"{META_INSTRUCTION}\n\nThis was the instruction.\n\nInstruction: {instruction.strip()}\n\n"
        marker = "\x00BODY\x00"
        if chat:
            rendered = tokenizer.apply_chat_template(
                [{"role": "user", "content": head + marker}], tokenize=False, add_generation_prompt=True
            )
            before, after = rendered.split(marker)
        else:
            before, after = head, "\n"
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None and not chat else []
        self.head_ids: list[int] = bos + self._ids(before)
        self.tail_ids = {
            m: self._ids(f"\n\nImprove the instruction to fix the student errors. {m}") for m in IMPROVE_MESSAGES
        }
        self.answer_ids = self._ids(after + ANSWER_START)
        self._successes = self._ids("# Student successes\n")
        self._errors = self._ids("\n\n# Student errors\n")
        self._none = self._ids("(none)")
        self._separator = self._ids("\n\n")

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def demo_ids(self, demo: Demo) -> list[int]:
        text_ids = self._ids(demo.text)[: self.max_demo_tokens]
        text = self.tokenizer.decode(text_ids)
        if demo.correct:
            return self._ids(f"Input: {text}\nCorrect Output: {demo.label_word}")
        return self._ids(f"Input: {text}\nStudent Output: {demo.predicted_word}\nCorrect Output: {demo.label_word}")

    def body_ids(self, demo_ids: Sequence[tuple[bool, list[int]]], message: str) -> list[int]:
        """A teacher's own part: its demonstrations (``(correct, ids)`` pairs), the request, the answer cue."""
        out = list(self._successes)
        for wanted, header in ((True, None), (False, self._errors)):
            if header is not None:
                out += header
            section = [ids for correct, ids in demo_ids if correct == wanted]
            if not section:
                out += self._none
            for i, ids in enumerate(section):
                out += (self._separator if i else []) + ids
        return out + self.tail_ids[message] + self.answer_ids

    def stop_ids(self) -> set[int]:
        """Tokens that end an instruction: end of sequence or turn, and any token holding a line break."""
        stops = {t for t in (self.tokenizer.eos_token_id, self.tokenizer.pad_token_id) if t is not None}
        for name in ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|endoftext|>"):
            tid = self.tokenizer.convert_tokens_to_ids(name)
            if isinstance(tid, int) and tid != self.tokenizer.unk_token_id:
                stops.add(tid)
        size = len(self.tokenizer)
        pieces = self.tokenizer.batch_decode([[t] for t in range(size)])
        return stops | {t for t, piece in enumerate(pieces) if "\n" in piece}


@torch.inference_mode()
def predict(
    loaded: LoadedModel,
    runtime: Runtime,
    verbalizer: Verbalizer,
    template: str,
    texts: Sequence[str],
    *,
    batch_size: int = 32,
    max_length: int = 256,
    desc: str | None = None,
) -> list[int]:
    """The class the model gives each text under ``template`` (batched by length)."""
    encoder = TemplateEncoder(loaded.tokenizer, template, max_length)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    lm = PromptedLM(loaded.model, None)
    out = [0] * len(texts)
    steps = range(0, len(order), batch_size)
    for s in tqdm(steps, desc=desc, leave=False, unit="batch", disable=desc is None):
        idx = order[s : s + batch_size]
        batch = collate([encoder.encode(texts[i]) for i in idx], [0] * len(idx), encoder.pad_id, runtime.device)
        with runtime.autocast():
            classes = lm.class_scores(batch, verbalizer).argmax(-1).tolist()
        for i, c in zip(idx, classes, strict=True):
            out[i] = c
    return out


def correct_count(
    loaded: LoadedModel,
    runtime: Runtime,
    verbalizer: Verbalizer,
    template: str,
    examples: Sequence,
    **kw,
) -> int:
    """How many of ``examples`` (with ``.text`` and ``.label``) the model gets right under ``template``."""
    predicted = predict(loaded, runtime, verbalizer, template, [e.text for e in examples], **kw)
    return sum(int(p == e.label) for p, e in zip(predicted, examples, strict=True))
