"""Which model families effdecode runs, and why the others fall back to transformers' ``generate``.

One registry serves three readers: the engine's support check (:func:`unsupported_reason`), the family tests
(``tests/test_families.py`` is parametrized by :data:`SUPPORTED` and runs every check a family's ``verified``
names) and the README's support table (``scripts/support_table.py`` writes it from :data:`SUPPORTED` and
:data:`FALLBACK`; a test keeps the README equal to the script's output).

A family is supported when its attention goes through transformers' attention interface as standard softmax
attention over one K and one V per layer (with per-layer sliding windows, logit soft-capping, attention sinks
or any scale), and its tiny random model passes the checks in ``verified``.
"""

from __future__ import annotations

from dataclasses import dataclass

#: The checks a family can be verified on, in the README table's column order.
CHECKS = ("greedy", "speculation", "eviction", "thinking")

CHECK_TITLES = {
    "greedy": "greedy = HF",
    "speculation": "speculation",
    "eviction": "eviction",
    "thinking": "thinking control",
}


@dataclass(frozen=True)
class Family:
    """A model family effdecode runs.

    Attributes
    ----------
    model_type : str
        ``config.model_type``.
    name : str
        Human name, with example checkpoints.
    attention : str
        What its attention needs beyond plain causal GQA ("" when nothing).
    verified : tuple[str, ...]
        The :data:`CHECKS` its tiny model passes in ``tests/test_families.py``.
    """

    model_type: str
    name: str
    attention: str = ""
    verified: tuple[str, ...] = CHECKS


SUPPORTED: dict[str, Family] = {
    f.model_type: f
    for f in (
        # The families reasoning users run.
        Family("llama", "Llama 3 (DeepSeek-R1-Distill-Llama)"),
        Family("mistral", "Mistral", "sliding window"),
        Family("qwen2", "Qwen2 / Qwen2.5 (DeepSeek-R1-Distill-Qwen, QwQ)", "sliding window on some layers"),
        Family("qwen3", "Qwen3", "q/k norm"),
        Family("qwen3_moe", "Qwen3-MoE (Qwen3-30B-A3B)", "q/k norm; MoE"),
        Family("gpt_oss", "gpt-oss", "attention sinks; alternating sliding windows; MoE"),
        Family("phi3", "Phi-3 / Phi-4 (Phi-4-reasoning)", "partial rotary; sliding window"),
        Family("olmo3", "OLMo 3 (OLMo-3-Think)", "q/k norm; alternating sliding windows"),
        Family("smollm3", "SmolLM3", "no RoPE on some layers"),
        Family("exaone4", "EXAONE 4", "q/k norm; alternating sliding windows"),
        Family("gemma2", "Gemma 2", "logit soft-capping; alternating sliding windows; query_pre_attn_scalar"),
        Family("gemma3_text", "Gemma 3 (text)", "per-layer sliding windows; query_pre_attn_scalar; q/k norm"),
        Family("mixtral", "Mixtral", "MoE; sliding window"),
        Family("granite", "Granite 3", "attention_multiplier as scale"),
        Family("glm4", "GLM-4", "partial rotary"),
        Family("seed_oss", "Seed-OSS", ""),
        # More standard families.
        Family("qwen2_moe", "Qwen2-MoE", "MoE"),
        Family("olmo", "OLMo", ""),
        Family("olmo2", "OLMo 2", "q/k norm"),
        Family("olmoe", "OLMoE", "q/k norm; MoE"),
        Family("gemma", "Gemma", "query_pre_attn_scalar"),
        Family("cohere", "Command-R (Cohere)", "parallel residual"),
        Family("cohere2", "Command-R7B (Cohere2)", "alternating sliding windows"),
        Family("starcoder2", "StarCoder2", "sliding window"),
        Family("helium", "Helium", ""),
        Family("ministral", "Ministral", "alternating sliding windows"),
        Family("hunyuan_v1_dense", "Hunyuan (dense)", "q/k norm"),
        Family("hunyuan_v1_moe", "Hunyuan (MoE)", "q/k norm; MoE"),
        Family("ernie4_5", "ERNIE 4.5", ""),
        Family("glm", "GLM", "partial rotary"),
        Family("glm4_moe", "GLM-4.5 (MoE)", "partial rotary; MoE"),
        Family("granitemoe", "Granite MoE", "attention_multiplier as scale; MoE"),
        Family("phi", "Phi-2", "partial rotary"),
        Family("vaultgemma", "VaultGemma", "logit soft-capping"),
    )
}

#: Families that keep falling back to transformers' ``generate``, and why.
FALLBACK: dict[str, str] = {
    "deepseek_v2": "multi-head latent attention: K and V head dims differ",
    "deepseek_v3": "multi-head latent attention: K and V head dims differ",
    "minicpm3": "multi-head latent attention: K and V head dims differ",
    "longcat_flash": "multi-head latent attention: K and V head dims differ",
    "deepseek_v32": "sparse attention over selected indices",
    "glm_moe_dsa": "sparse attention over selected indices",
    "qwen3_next": "hybrid linear-attention layers (their state is not a K/V cache)",
    "qwen3_5": "hybrid linear-attention layers (their state is not a K/V cache)",
    "qwen3_5_moe": "hybrid linear-attention layers (their state is not a K/V cache)",
    "kimi_linear": "hybrid linear-attention layers (their state is not a K/V cache)",
    "minimax": "hybrid linear-attention layers (their state is not a K/V cache)",
    "olmo_hybrid": "hybrid linear-attention layers (their state is not a K/V cache)",
    "falcon_h1": "hybrid Mamba layers (their state is not a K/V cache)",
    "jamba": "hybrid Mamba layers (their state is not a K/V cache)",
    "bamba": "hybrid Mamba layers (their state is not a K/V cache)",
    "zamba": "hybrid Mamba layers (their state is not a K/V cache)",
    "zamba2": "hybrid Mamba layers (their state is not a K/V cache)",
    "nemotron_h": "hybrid Mamba layers (their state is not a K/V cache)",
    "granitemoehybrid": "hybrid Mamba layers (their state is not a K/V cache)",
    "lfm2": "hybrid short-convolution layers (their state is not a K/V cache)",
    "lfm2_moe": "hybrid short-convolution layers (their state is not a K/V cache)",
    "recurrent_gemma": "recurrent layers (their state is not a K/V cache)",
    "llama4": "chunked attention and a vision wrapper",
    "llama4_text": "chunked attention",
    "diffllama": "differential attention (two softmaxes per head)",
    "stablelm": "its layers do not pass the forward's keyword arguments down to attention",
    "nemotron": "its layers do not pass the forward's keyword arguments down to attention",
}


def unsupported_reason(model_type: str | None) -> str | None:
    """Why effdecode leaves a model of this type to transformers, or None when it runs it."""
    if model_type in SUPPORTED:
        return None
    if model_type in FALLBACK:
        return f"model_type {model_type!r}: {FALLBACK[model_type]}"
    return f"model_type {model_type!r} is not verified with effdecode (see the README's support table)"


__all__ = ["CHECKS", "CHECK_TITLES", "FALLBACK", "SUPPORTED", "Family", "unsupported_reason"]
