"""KV eviction end to end: memory, throughput and the cost of the eviction itself.

Run on a GPU: ``pytest benchmarks/test_e2e_compression.py --benchmark-enable --benchmark-group-by=param``.

- ``test_long_generation``: long generations (8k new tokens on a GPU), ``kv_budget=1024`` per policy vs the
  full cache, same batch: tokens/s and ``kv_peak_bytes`` (``extra_info``).
- ``test_largest_batch_in_fixed_memory``: the most rows whose KV cache fits a fixed byte budget, full cache vs
  budget 1024 (16k-token generations on a GPU); throughput at that batch is what eviction buys (issue #5
  goal: >= 10x full KV at 16k tokens).
- ``test_eviction_share_of_decode``: time in :meth:`KVCompressor.compact` over the call's wall time at
  ``compress_every=64`` (target <= 5%).

The model is a random Llama (speed and memory do not depend on what it says; accuracy vs budget is measured
on the trained reasoner by ``effdecode eval --sweep``). On CPU every size is a toy dry run.
"""

from __future__ import annotations

import time

import pytest
import torch

import effdecode
from effdecode import DecodeConfig
from effdecode.cache import KVGeometry
from effdecode.compression.kv_compressor import KVCompressor
from effdecode.demo import build_demo_model, demo_prompts

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
PROMPT_LEN = 128 if ON_GPU else 16
LONG_NEW = 8192 if ON_GPU else 160
BUDGET = 1024 if ON_GPU else 48
COMPRESS_EVERY = 64 if ON_GPU else 16
POLICIES = ["full", "streaming", "h2o", "snapkv", "rkv"]


@pytest.fixture(scope="module")
def model():
    return build_demo_model(
        num_layers=8 if ON_GPU else 2,
        hidden_size=512 if ON_GPU else 64,
        dtype=torch.bfloat16 if ON_GPU else torch.float32,
        device=DEVICE,
    )


def _config(policy: str) -> DecodeConfig:
    if policy == "full":
        return DecodeConfig()
    return DecodeConfig(
        kv_budget=BUDGET, kv_policy=policy, compress_every=COMPRESS_EVERY, kv_window=32 if ON_GPU else 8
    )


def _run(model, batch_size: int, new_tokens: int, config: DecodeConfig):
    input_ids, mask = demo_prompts(batch_size, PROMPT_LEN, model.config.vocab_size, device=DEVICE)
    out = effdecode.generate(
        model,
        input_ids,
        attention_mask=mask,
        max_new_tokens=new_tokens,
        do_sample=False,
        return_dict_in_generate=True,
        decode_config=config,
    )
    if ON_GPU:
        torch.cuda.synchronize()
    return out.stats


@pytest.mark.parametrize("policy", POLICIES)
def test_long_generation(benchmark, model, policy):
    batch_size = 8 if ON_GPU else 2
    stats = benchmark.pedantic(lambda: _run(model, batch_size, LONG_NEW, _config(policy)), rounds=1)
    benchmark.extra_info.update(
        policy=policy,
        batch_size=batch_size,
        new_tokens=stats.total_new_tokens,
        tokens_per_s=stats.tokens_per_s,
        kv_peak_bytes=stats.kv_peak_bytes,
        kv_peak_tokens=stats.kv_peak_tokens,
    )
    assert stats.kv_peak_tokens <= (BUDGET + COMPRESS_EVERY if policy != "full" else PROMPT_LEN + LONG_NEW)


@pytest.mark.parametrize("policy", ["full", "rkv"])
def test_largest_batch_in_fixed_memory(benchmark, model, policy):
    new_tokens = 16384 if ON_GPU else 256
    memory = (8 << 30) if ON_GPU else (4 << 20)  # bytes of KV cache allowed
    geometry = KVGeometry.from_config(model.config)
    per_token = geometry.bytes_per_token(model.dtype)
    config = _config(policy)
    held = PROMPT_LEN + new_tokens
    if config.compresses:
        held = KVCompressor.capacity_for(config, PROMPT_LEN, held)
    batch_size = max(1, min(256, memory // (held * per_token)))
    stats = benchmark.pedantic(lambda: _run(model, batch_size, new_tokens, config), rounds=1)
    benchmark.extra_info.update(
        policy=policy,
        batch_size=int(batch_size),
        tokens_per_s=stats.tokens_per_s,
        kv_peak_bytes=stats.kv_peak_bytes,
    )


@pytest.mark.parametrize("policy", ["streaming", "h2o", "snapkv", "rkv"])
def test_eviction_share_of_decode(benchmark, model, policy, monkeypatch):
    spent = []
    compact = KVCompressor.compact

    def timed(self, rows):
        if rows.size == 0:  # nothing due this step
            return compact(self, rows)
        if ON_GPU:
            torch.cuda.synchronize()
        started = time.perf_counter()
        compact(self, rows)
        if ON_GPU:
            torch.cuda.synchronize()
        spent.append(time.perf_counter() - started)

    monkeypatch.setattr(KVCompressor, "compact", timed)
    batch_size = 16 if ON_GPU else 2
    new_tokens = 2048 if ON_GPU else 128

    def run():
        spent.clear()
        return _run(model, batch_size, new_tokens, _config(policy))

    stats = benchmark.pedantic(run, rounds=1)
    share = sum(spent) / stats.wall_time_s
    benchmark.extra_info.update(
        policy=policy, compactions=len(spent), eviction_s=sum(spent), eviction_share=share
    )
    assert spent, "no compaction ran"
