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
    batch: int, max_len: int, seed: int = 0, min_len: int = 1, vocab: int = VOCAB
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded random prompts of lengths in [min_len, max_len]; returns (input_ids, attention_mask)."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (batch,), generator=generator)
    lengths[0] = max_len  # the widest row fixes the width
    input_ids = torch.full((batch, max_len), PAD, dtype=torch.long)
    mask = torch.zeros(batch, max_len, dtype=torch.long)
    for row, length in enumerate(lengths.tolist()):
        input_ids[row, max_len - length :] = torch.randint(1, vocab, (length,), generator=generator)
        mask[row, max_len - length :] = 1
    return input_ids, mask


# --- Every family of effdecode.families.SUPPORTED, built through transformers' auto classes ---

FAMILY_VOCAB = 128

# Settings of every family's tiny model, where its config has the field: 2 layers, one sliding-window layer
# (window 4, shorter than prompt + new tokens, so the window matters) and one full layer, small MoE blocks.
_FAMILY_COMMON = dict(
    vocab_size=FAMILY_VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    initializer_range=0.25,
    pad_token_id=PAD,
    eos_token_id=None,
    bos_token_id=None,
    tie_word_embeddings=False,
    sliding_window=4,
    layer_types=["sliding_attention", "full_attention"],
    moe_intermediate_size=32,
    num_experts=4,
    num_local_experts=4,
    num_experts_per_tok=2,
    shared_expert_intermediate_size=32,
    first_k_dense_replace=1,
    n_routed_experts=4,
    n_shared_experts=1,
)

# Per family: what differs from _FAMILY_COMMON (None drops a common setting), chosen so each family's
# attention feature really changes the result.
FAMILY_OVERRIDES: dict[str, dict] = {
    "llama": dict(sliding_window=None, layer_types=None),
    "mistral": dict(layer_types=None),
    "qwen2": dict(use_sliding_window=True, max_window_layers=1, layer_types=None),
    "qwen3": dict(layer_types=None, sliding_window=None),
    "qwen3_moe": dict(layer_types=None, sliding_window=None, decoder_sparse_step=1, mlp_only_layers=[]),
    "gpt_oss": dict(head_dim=16),
    "phi3": dict(layer_types=None, partial_rotary_factor=0.5),
    "smollm3": dict(layer_types=None, sliding_window=None, no_rope_layers=[1, 0]),
    "gemma2": dict(attn_logit_softcapping=2.0, query_pre_attn_scalar=32),
    "gemma3_text": dict(query_pre_attn_scalar=32),
    "mixtral": dict(layer_types=None),
    "granite": dict(attention_multiplier=0.1, embedding_multiplier=2.0, residual_multiplier=0.5),
    "glm4": dict(partial_rotary_factor=0.5),
    "granitemoe": dict(attention_multiplier=0.1),
    "vaultgemma": dict(attn_logit_softcapping=2.0, query_pre_attn_scalar=32),
    "starcoder2": dict(layer_types=None),
    "qwen2_moe": dict(layer_types=None, sliding_window=None),
    "helium": dict(head_dim=8),  # its o_proj assumes heads * head_dim == hidden_size
    # Families that fall back (other caches): only HF runs them.
    "deepseek_v3": dict(
        num_key_value_heads=4,
        head_dim=8,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
        kv_lora_rank=16,
        q_lora_rank=16,
        n_group=1,
        topk_group=1,
    ),
    "qwen3_next": dict(
        layer_types=["linear_attention", "full_attention"],
        sliding_window=None,
        linear_num_value_heads=2,
        linear_num_key_heads=2,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
    ),
    "falcon_h1": dict(
        layer_types=None,
        sliding_window=None,
        mamba_d_ssm=32,
        mamba_n_heads=4,
        mamba_d_head=8,
        mamba_d_state=8,
        mamba_n_groups=1,
        mamba_chunk_size=8,
    ),
    "lfm2": dict(layer_types=["conv", "full_attention"], sliding_window=None, block_ff_dim=64),
}


def family_config(model_type: str, **overrides):
    """The tiny config of ``model_type`` (its transformers config class, only the fields it has)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config_cls = CONFIG_MAPPING[model_type]
    defaults = config_cls()
    settings = {k: v for k, v in _FAMILY_COMMON.items() if hasattr(defaults, k)}
    settings.update(FAMILY_OVERRIDES.get(model_type, {}))
    settings.update(overrides)
    settings = {k: v for k, v in settings.items() if v is not None or k in ("eos_token_id", "bos_token_id")}
    config = config_cls(**settings)
    # The grouped-mm experts kernels take no float64 on CPU; the eager loop is exact.
    config._experts_implementation = "eager"
    return config


def family_available(model_type: str) -> bool:
    """Whether the installed transformers knows ``model_type``."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return model_type in CONFIG_MAPPING


def tiny_family_model(
    model_type: str,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    attn_implementation: str | None = None,
    **overrides,
):
    """A tiny random model of any registered family, with non-trivial attention sinks where it has them."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    extra = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    config = family_config(model_type, **overrides)
    model = AutoModelForCausalLM.from_config(config, **extra).to(dtype).eval()
    for name, param in model.named_parameters():
        if name.endswith(".sinks"):  # gpt-oss: large enough that ignoring them changes the tokens
            with torch.no_grad():
                param.copy_(torch.randn(param.shape, dtype=param.dtype) * 2.0)
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = None
    return model
