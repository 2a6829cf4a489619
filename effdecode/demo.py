"""Demo models and a side-by-side run of transformers' ``generate`` and effdecode.

Used by ``effdecode demo`` and by the end-to-end benchmark. The demo's default model is the shipped arithmetic
reasoner (:func:`effdecode.workloads.load_reasoner`, with :func:`reasoner_prompts`); ``build_demo_model`` is
a random Llama built from a config (nothing is downloaded), initialised with a wide weight spread so its
greedy choices are clear-cut and the two engines' outputs can be compared token for token.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

import effdecode


def build_demo_model(
    num_layers: int = 4,
    hidden_size: int = 128,
    vocab_size: int = 1024,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> torch.nn.Module:
    """A random ``LlamaForCausalLM`` (GQA, 4 query heads of 32, 2 KV heads) ready for ``generate``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        initializer_range=0.2,
        pad_token_id=0,
        eos_token_id=None,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    model.generation_config.pad_token_id = 0
    return model


def demo_prompts(
    batch_size: int, prompt_len: int, vocab_size: int, device: str | torch.device = "cpu", seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded random prompts with lengths between ``prompt_len // 2`` and ``prompt_len``."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(1, prompt_len // 2), prompt_len + 1, (batch_size,), generator=generator)
    lengths[0] = prompt_len
    columns = torch.arange(prompt_len)
    mask = (columns[None, :] >= (prompt_len - lengths)[:, None]).long()
    input_ids = torch.randint(1, vocab_size, (batch_size, prompt_len), generator=generator) * mask
    return input_ids.to(device), mask.to(device)


@dataclass
class SideBySide:
    """Timings of one ``generate`` call per engine on the same inputs."""

    batch_size: int
    new_tokens: int
    hf_seconds: float
    effdecode_seconds: float
    outputs_match: bool

    @property
    def hf_tokens_per_s(self) -> float:
        return self.new_tokens / self.hf_seconds

    @property
    def effdecode_tokens_per_s(self) -> float:
        return self.new_tokens / self.effdecode_seconds

    @property
    def speedup(self) -> float:
        return self.hf_seconds / self.effdecode_seconds


def _timed(fn) -> tuple[object, float]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - started


def run_side_by_side(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    decode_config=None,
    **generate_kwargs,
) -> SideBySide:
    """Run HF ``generate`` and :func:`effdecode.generate` once each (after a short warm-up) and compare.

    ``new_tokens`` counts generated tokens before each row's end (EOS included), the same for both engines
    when their outputs match. ``decode_config`` goes to effdecode only; time it spends compiling steps
    (``DecodeConfig(compile=True)``) is not counted.
    """
    warmup = dict(generate_kwargs, max_new_tokens=2)
    model.generate(input_ids, attention_mask=attention_mask, **warmup)
    effdecode.generate(model, input_ids, attention_mask=attention_mask, decode_config=decode_config, **warmup)
    expected, hf_seconds = _timed(
        lambda: model.generate(input_ids, attention_mask=attention_mask, **generate_kwargs)
    )
    actual, effdecode_seconds = _timed(
        lambda: effdecode.generate(
            model,
            input_ids,
            attention_mask=attention_mask,
            return_dict_in_generate=True,
            decode_config=decode_config,
            **generate_kwargs,
        )
    )
    effdecode_seconds -= actual.stats.compile_time_s
    return SideBySide(
        batch_size=input_ids.shape[0],
        new_tokens=actual.stats.total_new_tokens,
        hf_seconds=hf_seconds,
        effdecode_seconds=effdecode_seconds,
        outputs_match=bool(torch.equal(actual.sequences, expected)),
    )


def reasoner_prompts(
    tokenizer, batch_size: int, seed: int = 0, levels=(1, 2, 3, 4), device: str | torch.device = "cpu"
) -> tuple[list, torch.Tensor, torch.Tensor]:
    """Held-out arithmetic problems (levels in turn) and their left-padded prompts for the reasoner.

    Returns
    -------
    problems : list of effdecode.workloads.Problem
    input_ids, attention_mask : torch.Tensor
        ``[batch_size, T]``.
    """
    from effdecode.workloads import generate_problems

    problems = generate_problems(batch_size, levels=levels, seed=seed, split="test")
    encoded = tokenizer(
        [p.prompt for p in problems], return_tensors="pt", padding=True, add_special_tokens=False
    )
    return problems, encoded["input_ids"].to(device), encoded["attention_mask"].to(device)
