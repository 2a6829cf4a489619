"""Tiny random causal LMs of each supported family, built from configs (nothing is downloaded)."""

from __future__ import annotations

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
}

VOCAB = 320
PAD = 0


def tiny_model(family: str = "llama", dtype: torch.dtype = torch.float32, seed: int = 0, **overrides):
    """A 2-layer GQA model with peaked logits, so greedy choices are not decided by rounding noise."""
    config_cls, model_cls = FAMILIES[family]
    settings = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        initializer_range=0.25,
        pad_token_id=PAD,
        eos_token_id=None,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    settings.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**settings)).to(dtype).eval()
    model.generation_config.pad_token_id = settings["pad_token_id"]
    model.generation_config.eos_token_id = settings["eos_token_id"]
    return model


def ragged_prompts(
    batch: int, max_len: int, seed: int = 0, min_len: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded random prompts of lengths in [min_len, max_len]; returns (input_ids, attention_mask)."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (batch,), generator=generator)
    lengths[0] = max_len  # the widest row fixes the width
    input_ids = torch.full((batch, max_len), PAD, dtype=torch.long)
    mask = torch.zeros(batch, max_len, dtype=torch.long)
    for row, length in enumerate(lengths.tolist()):
        input_ids[row, max_len - length :] = torch.randint(1, VOCAB, (length,), generator=generator)
        mask[row, max_len - length :] = 1
    return input_ids, mask
