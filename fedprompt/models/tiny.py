"""Tiny random causal LMs built from a config, with a byte-level BPE tokenizer trained on a fixed text.

They need nothing beyond the package registry, build in well under a second and are deterministic,
so the tests exercise the same loading, tuning and export code as the real models do.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

# A fixed corpus: the words the templates, verbalizers and test data use, so they tokenize compactly.
_CORPUS = """
Review: Sentiment: positive negative It was great terrible good bad fine awful
The movie was wonderful, moving and funny. A dull, boring mess of a film with no heart.
Classify the sentiment of this movie review as positive or negative.
An instant classic with superb acting. Tedious, predictable and far too long.
Tweet: I love this! I hate waiting. Product review: works well, broke after a day.
News article: the government announced a new policy on trade and the economy today.
yes no true false neutral happy sad angry calm sports politics world business science
""".strip()

TINY_VOCAB_SIZE = 512
SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>"]


def build_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<|pad|>"
    )


def _llama(vocab: int, layers: int = 2) -> torch.nn.Module:
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=0,
    )
    return LlamaForCausalLM(cfg)


def _gpt2(vocab: int) -> torch.nn.Module:
    # GPT-2 keeps its dropout layers, so the DP path can be tested with dropout active.
    cfg = GPT2Config(
        vocab_size=vocab,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=512,
        resid_pdrop=0.1,
        embd_pdrop=0.1,
        attn_pdrop=0.1,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(cfg)


TINY_BUILDERS = {"tiny-llama": _llama, "tiny-gpt2": _gpt2, "tiny-llama-4l": lambda vocab: _llama(vocab, layers=4)}


def build_tiny(name: str, out: Path, seed: int = 0) -> None:
    """Write a Hugging Face model folder (safetensors + tokenizer) for the tiny model ``name``."""
    tokenizer = build_tokenizer()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = TINY_BUILDERS[name](len(tokenizer))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
