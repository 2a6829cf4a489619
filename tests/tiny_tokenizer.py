"""A character-level tokenizer over the tiny models' vocabulary, built offline with ``tokenizers``."""

from __future__ import annotations

import string

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from tiny_models import PAD, VOCAB


def tiny_tokenizer(vocab_size: int = VOCAB) -> PreTrainedTokenizerFast:
    """Token 0 is ``<pad>``; every other token is one character (ASCII letters and digits first)."""
    characters = list(string.ascii_letters + string.digits)
    characters += [chr(0x100 + i) for i in range(vocab_size - 1 - len(characters))]
    vocab = {"<pad>": PAD, **{char: i + 1 for i, char in enumerate(characters)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>")
    tokenizer.padding_side = "left"
    return tokenizer
