"""A character-level tokenizer for the arithmetic workload, built offline with ``tokenizers``.

Every character is one token; ``<think>`` and ``</think>`` are single tokens (added, non-special, so they
survive ``decode(..., skip_special_tokens=True)``); ``<pad>``, ``<eos>`` and ``<unk>`` are special tokens.
"""

from __future__ import annotations

import string
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from effdecode.workloads.problems import THINK_END, THINK_START

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, EOS, UNK)
CHARACTERS = string.digits + " \n+-*/=()?:,." + string.ascii_lowercase + string.ascii_uppercase


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The workload tokenizer: ids 0-2 are ``<pad>``, ``<eos>``, ``<unk>``, then one id per character,
    then ``<think>`` and ``</think>``; left padding.
    """
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for char in CHARACTERS:
        vocab[char] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(
        [AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS]
    )
    backend.add_tokens([AddedToken(tag, special=False, normalized=False) for tag in (THINK_START, THINK_END)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD, eos_token=EOS, unk_token=UNK, padding_side="left"
    )
    return tokenizer


def save_tokenizer(directory: str | Path) -> PreTrainedTokenizerFast:
    """Build the tokenizer and ``save_pretrained`` it (``tokenizer.json`` and its config) in ``directory``."""
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(str(directory))
    return tokenizer
