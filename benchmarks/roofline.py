"""Memory-bandwidth roofline of one decode step, and random-weight models of real shapes.

A decode step of a dense decoder at moderate batch is bound by memory traffic: it must read every weight once
and every row's KV cache once. The byte model (what a step must read, at least):

- weights: every parameter, once per step, except the input embedding table of an untied model, of which a
  step gathers only ``batch`` rows (a tied table is read whole by the LM head anyway);
- KV: ``2 * layers * kv_heads * head_dim`` elements per cached token, per row, at the step's context length.

Activations, logits and the step's KV writes are left out (under 2% of the traffic at the shapes we run).
``roofline_fraction`` = (bytes per step / measured copy bandwidth) / measured seconds per step: 1.0 is a step
as fast as the memory system allows.
"""

from __future__ import annotations

import time

import torch

# Public Qwen2.5 configs (hidden size, layers, query / KV heads, MLP width, vocabulary, tied embeddings).
# Their parameter counts match the model cards: 0.49B / 1.54B / 7.61B (non-embedding 0.36B / 1.31B / 6.53B).
QWEN25_SHAPES: dict[str, dict] = {
    "0.5B": dict(
        hidden_size=896,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        intermediate_size=4864,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    "1.5B": dict(
        hidden_size=1536,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        intermediate_size=8960,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    "7B": dict(
        hidden_size=3584,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        intermediate_size=18944,
        vocab_size=152064,
        tie_word_embeddings=False,
    ),
    # CPU dry runs only.
    "toy": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=512,
        tie_word_embeddings=True,
    ),
}


def qwen2_config(name: str, **overrides):
    """A ``Qwen2Config`` of one of :data:`QWEN25_SHAPES`; no BOS/EOS, so generation runs its full length."""
    from transformers import Qwen2Config

    if name not in QWEN25_SHAPES:
        raise ValueError(f"unknown model shape {name!r}; expected one of {sorted(QWEN25_SHAPES)}")
    settings = dict(
        QWEN25_SHAPES[name],
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
    )
    settings.update(overrides)
    return Qwen2Config(**settings)


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def parameter_count(config) -> int:
    """Parameters of a Llama- or Qwen2-style decoder with an LM head, from its config.

    Qwen2 has biases on the q/k/v projections; Llama has them on q/k/v/o with ``attention_bias`` and on the
    MLP with ``mlp_bias``. A tied LM head shares the embedding table.
    """
    if config.model_type not in ("qwen2", "llama"):
        raise ValueError(f"parameter_count handles qwen2 and llama configs, not {config.model_type!r}")
    hidden, inter = config.hidden_size, config.intermediate_size
    q_width = config.num_attention_heads * _head_dim(config)
    kv_width = (config.num_key_value_heads or config.num_attention_heads) * _head_dim(config)
    attention = hidden * q_width + 2 * hidden * kv_width + q_width * hidden
    mlp = 3 * hidden * inter
    if config.model_type == "qwen2":
        attention += q_width + 2 * kv_width
    else:
        if getattr(config, "attention_bias", False):
            attention += q_width + 2 * kv_width + hidden
        if getattr(config, "mlp_bias", False):
            mlp += 2 * inter + hidden
    per_layer = attention + mlp + 2 * hidden  # two RMSNorm weights
    embedding = config.vocab_size * hidden
    head = 0 if config.tie_word_embeddings else config.vocab_size * hidden
    return config.num_hidden_layers * per_layer + embedding + head + hidden  # + final norm


def weight_bytes_per_step(config, batch: int, dtype_bytes: int) -> int:
    """Weight bytes one decode step of ``batch`` rows must read (see the module docstring)."""
    params = parameter_count(config)
    if not config.tie_word_embeddings:
        params -= config.vocab_size * config.hidden_size - batch * config.hidden_size
    return params * dtype_bytes


def kv_bytes_per_token(config, dtype_bytes: int) -> int:
    """KV bytes of one cached token over all layers (keys and values)."""
    kv_heads = config.num_key_value_heads or config.num_attention_heads
    return 2 * config.num_hidden_layers * kv_heads * _head_dim(config) * dtype_bytes


def kv_bytes_per_step(config, batch: int, context: float, dtype_bytes: int) -> float:
    """KV bytes one decode step reads: ``batch`` rows of ``context`` cached tokens each."""
    return batch * context * kv_bytes_per_token(config, dtype_bytes)


def mean_decode_context(prompt_len: int, new_tokens: int) -> float:
    """Mean KV length over the decode steps of a generation (prefill excluded).

    Prefill emits token 1; decode step ``s`` (1 .. new_tokens - 1) attends over ``prompt_len + s`` entries.
    """
    if new_tokens < 2:
        raise ValueError(f"new_tokens={new_tokens}: a generation with no decode step has no decode context")
    return prompt_len + new_tokens / 2


def roofline_fraction(bytes_per_step: float, bandwidth: float, seconds_per_step: float) -> float:
    """Share of the bandwidth roofline reached: (bytes / bandwidth) / measured seconds per step."""
    if bandwidth <= 0 or seconds_per_step <= 0:
        raise ValueError(f"bandwidth={bandwidth} and seconds_per_step={seconds_per_step} must be positive")
    return bytes_per_step / bandwidth / seconds_per_step


def copy_bandwidth(device: torch.device | str, nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Measured device memory bandwidth in bytes/s from a large ``copy_`` (read + write bytes counted).

    CUDA: timed with CUDA events after warm-up. CPU: wall time (use a smaller ``nbytes``).
    """
    device = torch.device(device)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    for _ in range(2):
        dst.copy_(src)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        for _ in range(repeats):
            dst.copy_(src)
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1e3
    else:
        began = time.perf_counter()
        for _ in range(repeats):
            dst.copy_(src)
        seconds = time.perf_counter() - began
    return 2 * src.numel() * src.element_size() * repeats / seconds


def build_random_model(config, dtype: torch.dtype, device: torch.device | str, seed: int = 0):
    """A causal LM of ``config`` with random weights, built on the meta device and materialised on ``device``.

    Nothing is allocated twice and nothing is downloaded: the model is created on the meta device, moved to
    uninitialised memory on ``device``, re-tied, and filled (normal(0, 0.02) matrices, unit norms, zero
    biases); the RoPE buffers are recomputed in float32, as a loaded checkpoint has them.
    """
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model = model.to(dtype=dtype).to_empty(device=device)
    model.tie_weights()
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.zero_()
            else:
                param.normal_(0.0, 0.02, generator=generator)
        for module in model.modules():
            if hasattr(module, "original_inv_freq"):
                fresh = type(module)(config=module.config)  # built on the CPU, float32
                module.inv_freq = fresh.inv_freq.to(device)
                module.original_inv_freq = fresh.original_inv_freq.to(device)
    model.eval()
    model.generation_config.pad_token_id = config.pad_token_id
    model.generation_config.eos_token_id = None
    model.generation_config.bos_token_id = None
    return model
