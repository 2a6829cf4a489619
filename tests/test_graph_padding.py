"""Padding rows of the CUDA-graph steps keep the attention contract: distinct slots, nothing written.

Off CUDA the graph runner replays its static-buffer step eagerly, so this runs everywhere (CPU: the torch
reference attention).
"""

from __future__ import annotations

import pytest
import torch

import effdecode
from effdecode import DecodeConfig
from effdecode.cache import KVGeometry
from effdecode.generation.graphs import DecodeGraphs, graphs_of, unused_slots
from effdecode.generation.steps import forward_logits
from effdecode.hf_attention import routed_through_effdecode
from effdecode.ops import attention as attention_ops
from effdecode.ops.attention import SlotBatch
from tiny_models import ragged_prompts, tiny_model


def test_unused_slots():
    rows = torch.tensor([3, 0, 5], dtype=torch.int32)
    assert unused_slots(rows, 7, 3).tolist() == [1, 2, 4]
    assert unused_slots(rows, 7, 4).tolist() == [1, 2, 4, 6]
    assert unused_slots(torch.zeros(0, dtype=torch.int32), 3, 2).tolist() == [0, 1]
    assert unused_slots(rows, 7, 0).dtype == torch.int32


@pytest.mark.parametrize("num_cols", [1, 3])
def test_padding_rows_write_nothing_and_real_rows_match_eager(fresh_seed, num_cols):
    """3 real rows in bucket 4: the padding row takes an unused slot with q_len 0; no other slot changes."""
    model = tiny_model("llama", torch.float64)
    geometry = KVGeometry.from_config(model.config)
    graphs = DecodeGraphs()
    cache = graphs.cache_for(
        model, geometry, rows=6, capacity=40, dtype=torch.float64, device=torch.device("cpu")
    )
    assert cache.num_slots == 9  # bucket 8 + 1
    cache.key_buffer.copy_(torch.randn(cache.key_buffer.shape, dtype=torch.float64))
    cache.value_buffer.copy_(torch.randn(cache.value_buffer.shape, dtype=torch.float64))
    # Every slot holds entries, and the spare slot is full: a padding row writing at its length would fail.
    lens = torch.randint(5, 20, (cache.num_slots,), dtype=torch.int32)
    lens[-1] = cache.capacity
    cache.cache_lens.copy_(lens)
    rows = torch.tensor([4, 1, 6], dtype=torch.int32)
    tokens = torch.randint(0, model.config.vocab_size, (3, num_cols))
    positions = lens[rows.long()].long()[:, None] + torch.arange(num_cols)
    q_lens = torch.tensor([num_cols, 1, num_cols], dtype=torch.int32)

    eager_k, eager_v = cache.key_buffer.clone(), cache.value_buffer.clone()
    before_k, before_v = cache.key_buffer.clone(), cache.value_buffer.clone()
    batch = SlotBatch(rows, cache.cache_lens.clone(), q_lens, kv_len_bound=cache.capacity)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    original = attention_ops.slot_attention_reference

    def spy(query, key, value, k_cache, v_cache, batch, *args, **kwargs):
        seen.append((batch.rows.clone(), batch.q_lens.clone()))
        return original(query, key, value, k_cache, v_cache, batch, *args, **kwargs)

    with routed_through_effdecode(model), torch.no_grad():
        # Eager reference on a copy of the cache, real rows only.
        cache.key_buffer, cache.value_buffer = eager_k, eager_v
        cache.keys, cache.values = list(eager_k.unbind(0)), list(eager_v.unbind(0))
        want = forward_logits(model, cache, batch, tokens, positions, last_only=num_cols == 1)
        cache.key_buffer, cache.value_buffer = before_k.clone(), before_v.clone()
        cache.keys, cache.values = list(cache.key_buffer.unbind(0)), list(cache.value_buffer.unbind(0))
        attention_ops.slot_attention_reference = spy
        try:
            got = graphs.run(
                model,
                rows,
                tokens[:, 0] if num_cols == 1 else tokens,
                positions[:, 0] if num_cols == 1 else positions,
                "torch",
                q_lens=None if num_cols == 1 else q_lens,
            )
        finally:
            attention_ops.slot_attention_reference = original

    assert seen, "the step did not go through the attention op"
    for step_rows, step_q_lens in seen[-model.config.num_hidden_layers :]:
        assert step_rows.shape == (4,)
        assert step_rows.unique().numel() == 4, f"rows not distinct: {step_rows.tolist()}"
        assert step_rows[:3].tolist() == rows.tolist()
        assert step_rows[3].item() not in rows.tolist()
        assert step_q_lens[3] == 0
    if num_cols == 1:
        want = want[:, None] if want.dim() == 1 else want
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # The cache after the graph step equals the eager step's (real rows written alike, up to the rounding of
    # a 4-row against a 3-row matmul), and every other slot, the padding row's included, is bit-for-bit as
    # before.
    torch.testing.assert_close(cache.key_buffer, eager_k, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cache.value_buffer, eager_v, rtol=1e-12, atol=1e-12)
    others = [s for s in range(cache.num_slots) if s not in rows.tolist()]
    assert torch.equal(cache.key_buffer[:, others], before_k[:, others])
    assert torch.equal(cache.cache_lens, lens), "the step must not move cache lengths"


def test_generate_with_graphs_uses_distinct_rows(monkeypatch):
    """Through ``generate``: every forward of every step hands the attention op distinct rows."""
    model = tiny_model("llama", torch.float64, eos_token_id=[5, 17, 33])
    ids, mask = ragged_prompts(5, 9, seed=3)
    calls: list[torch.Tensor] = []
    original = attention_ops.slot_attention_reference

    def spy(query, key, value, k_cache, v_cache, batch, *args, **kwargs):
        calls.append(batch.rows.clone())
        return original(query, key, value, k_cache, v_cache, batch, *args, **kwargs)

    monkeypatch.setattr(attention_ops, "slot_attention_reference", spy)
    eager = effdecode.generate(model, ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    calls.clear()
    graphed = effdecode.generate(
        model,
        ids,
        attention_mask=mask,
        max_new_tokens=20,
        do_sample=False,
        decode_config=DecodeConfig(cuda_graphs=True),
    )
    assert torch.equal(eager, graphed)
    assert graphs_of(model).captures >= 1
    padded = [rows for rows in calls if rows.shape[0] in (2, 4, 8)]
    assert padded and all(rows.unique().numel() == rows.numel() for rows in calls)
