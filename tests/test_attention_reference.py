"""The slot-attention torch reference (the spec) against a naive per-row, per-token loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from effdecode.ops.attention import SlotBatch, slot_attention_reference


def naive_slot_attention(query, key, value, k_cache, v_cache, rows, cache_lens, q_lens, scale, window):
    """Token by token: append, then softmax over the visible prefix. Returns output and the new caches."""
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    batch, q_heads, num_cols, head_dim = query.shape
    group = q_heads // key.shape[1]
    out = torch.full((batch, num_cols, q_heads, head_dim), float("nan"), dtype=query.dtype)
    for b in range(batch):
        slot, start = int(rows[b]), int(cache_lens[rows[b]])
        pad = num_cols - int(q_lens[b])
        for t in range(pad, num_cols):
            k_cache[slot, :, start + t - pad] = key[b, :, t]
            v_cache[slot, :, start + t - pad] = value[b, :, t]
        for t in range(pad, num_cols):
            index = start + t - pad
            lo = 0 if window is None else max(0, index - window + 1)
            for h in range(q_heads):
                keys = k_cache[slot, h // group, lo : index + 1]
                values = v_cache[slot, h // group, lo : index + 1]
                weights = torch.softmax((keys @ query[b, h, t]) * scale, dim=0)
                out[b, t, h] = weights @ values
    return out, k_cache, v_cache


@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("num_cols", [1, 4])
@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("q_full", [False, True])
@pytest.mark.parametrize("span", [0, 6])
def test_reference_matches_naive_loop(group, num_cols, window, q_full, span, fresh_seed):
    slots, kv_heads, capacity, head_dim = 6, 2, 24, 8
    batch = 4
    rows = torch.randperm(slots)[:batch].to(torch.int32)
    cache_lens = torch.randint(0, 12, (slots,), dtype=torch.int32)
    q_lens = (
        torch.full((batch,), num_cols, dtype=torch.int32)
        if q_full
        else torch.randint(1, num_cols + 1, (batch,), dtype=torch.int32)
    )
    query = torch.randn(batch, kv_heads * group, num_cols, head_dim, dtype=torch.float64)
    key = torch.randn(batch, kv_heads, num_cols, head_dim, dtype=torch.float64)
    value = torch.randn(batch, kv_heads, num_cols, head_dim, dtype=torch.float64)
    k_cache = torch.randn(slots, kv_heads, capacity, head_dim, dtype=torch.float64)
    v_cache = torch.randn(slots, kv_heads, capacity, head_dim, dtype=torch.float64)
    scale = 1 / math.sqrt(head_dim)
    expected, k_expected, v_expected = naive_slot_attention(
        query, key, value, k_cache, v_cache, rows, cache_lens, q_lens, scale, window
    )
    bound = int((cache_lens[rows.long()] + q_lens).max()) + 2  # a loose bound is allowed
    # span 6: the rows (4 of 6 slots) read through a view of the leading slots instead of a gather
    meta = SlotBatch(rows, cache_lens.clone(), q_lens, kv_len_bound=bound, q_full=q_full, slot_span=span)
    actual = slot_attention_reference(query, key, value, k_cache, v_cache, meta, scale, window)
    valid = torch.arange(num_cols)[None, :] >= (num_cols - q_lens)[:, None]
    torch.testing.assert_close(actual[valid], expected[valid])
    torch.testing.assert_close(k_cache, k_expected, rtol=0, atol=0)
    torch.testing.assert_close(v_cache, v_expected, rtol=0, atol=0)
    assert torch.equal(meta.cache_lens, cache_lens)  # lengths are the engine's to advance


def test_leading_slot_rows_use_the_same_math():
    torch.manual_seed(0)
    batch, kv_heads, head_dim = 3, 2, 8
    cache_lens = torch.tensor([5, 2, 7, 9], dtype=torch.int32)
    query = torch.randn(batch, 4, 1, head_dim, dtype=torch.float64)
    key = torch.randn(batch, kv_heads, 1, head_dim, dtype=torch.float64)
    value = torch.randn(batch, kv_heads, 1, head_dim, dtype=torch.float64)
    k_cache = torch.randn(4, kv_heads, 16, head_dim, dtype=torch.float64)
    v_cache = torch.randn(4, kv_heads, 16, head_dim, dtype=torch.float64)
    rows = torch.arange(batch, dtype=torch.int32)
    ones = torch.ones(batch, dtype=torch.int32)
    outputs = []
    for leading in (False, True):
        k, v = k_cache.clone(), v_cache.clone()
        meta = SlotBatch(
            rows, cache_lens, ones, kv_len_bound=8, rows_are_leading_slots=leading, q_full=leading
        )
        outputs.append((slot_attention_reference(query, key, value, k, v, meta, 0.3), k, v))
    for first, second in zip(*outputs, strict=True):
        torch.testing.assert_close(first, second, rtol=0, atol=0)


def _random_step(variant: str, num_cols: int, capacity: int, max_len: int) -> dict:
    """A random step of 5 rows in 7 slots (any order), ragged query widths, and the variant's extra
    arguments: everything ``slot_attention_reference`` takes but the batch description."""
    slots, kv_heads, head_dim, batch = 7, 2, 8, 5
    extra = {
        "plain": {},
        "window": {"sliding_window": 4},
        "softcap": {"softcap": 2.0},
        "sinks": {"sinks": torch.randn(kv_heads * 2, dtype=torch.float64)},
    }[variant]
    return dict(
        rows=torch.randperm(slots)[:batch].to(torch.int32),
        cache_lens=torch.randint(0, max_len, (slots,), dtype=torch.int32),
        q_lens=torch.randint(1, num_cols + 1, (batch,), dtype=torch.int32),
        query=torch.randn(batch, kv_heads * 2, num_cols, head_dim, dtype=torch.float64),
        key=torch.randn(batch, kv_heads, num_cols, head_dim, dtype=torch.float64),
        value=torch.randn(batch, kv_heads, num_cols, head_dim, dtype=torch.float64),
        k_cache=torch.randn(slots, kv_heads, capacity, head_dim, dtype=torch.float64),
        v_cache=torch.randn(slots, kv_heads, capacity, head_dim, dtype=torch.float64),
        extra=extra,
    )


def _valid_columns(step: dict) -> torch.Tensor:
    num_cols = step["query"].shape[2]
    return torch.arange(num_cols)[None, :] >= (num_cols - step["q_lens"])[:, None]


@pytest.mark.parametrize("variant", ["plain", "window", "softcap", "sinks"])
@pytest.mark.parametrize("num_cols", [1, 3])
def test_slot_span_view_gives_the_gathers_outputs_and_scores(variant, num_cols, fresh_seed):
    """Reading the leading slots through a view (rows scattered into them, in any order, some slots unused)
    gives what gathering the rows gives: outputs, cache writes and attention scores."""
    step = _random_step(variant, num_cols, capacity=20, max_len=14)
    rows, cache_lens, q_lens = step["rows"], step["cache_lens"], step["q_lens"]
    bound = int((cache_lens[rows.long()] + q_lens).max())
    results = []
    for slot_span in (0, int(rows.max()) + 1):
        k, v = step["k_cache"].clone(), step["v_cache"].clone()
        scores = torch.zeros(*k.shape[:3], dtype=torch.float32)
        meta = SlotBatch(rows, cache_lens, q_lens, kv_len_bound=bound, slot_span=slot_span)
        out = slot_attention_reference(
            step["query"], step["key"], step["value"], k, v, meta, 0.35, scores_out=scores, **step["extra"]
        )
        results.append((out, k, v, scores))
    valid = _valid_columns(step)
    gathered, viewed = results
    torch.testing.assert_close(viewed[0][valid], gathered[0][valid])
    for first, second in zip(gathered[1:], viewed[1:], strict=True):
        torch.testing.assert_close(second, first, rtol=0, atol=0)


@pytest.mark.parametrize("variant", ["plain", "window", "softcap", "sinks"])
@pytest.mark.parametrize("num_cols", [1, 3])
def test_row_by_row_attention_gives_the_padded_calls_outputs(variant, num_cols, monkeypatch, fresh_seed):
    """With host-side per-row bounds (loose ones included) the torch path may attend row by row over each
    row's own length: the outputs and cache writes are the padded call's."""
    from effdecode.ops import attention as attention_module

    monkeypatch.setattr(attention_module, "_ROW_BY_ROW_MIN_PADDING", 0)  # (the tiny shapes pad little)
    step = _random_step(variant, num_cols, capacity=40, max_len=30)
    rows, cache_lens, q_lens = step["rows"], step["cache_lens"], step["q_lens"]
    after = (cache_lens[rows.long()] + q_lens).numpy().astype(np.int64)
    loose = after + np.random.default_rng(0).integers(0, 3, len(after))  # host bounds may be loose
    bound = int(loose.max())
    results = []
    for host_rows in (None, (rows.numpy().astype(np.int64), loose)):
        k, v = step["k_cache"].clone(), step["v_cache"].clone()
        meta = SlotBatch(rows, cache_lens, q_lens, kv_len_bound=bound, host_rows=host_rows)
        assert (attention_module._row_by_row(meta, bound) is None) == (host_rows is None)
        out = slot_attention_reference(
            step["query"], step["key"], step["value"], k, v, meta, 0.35, **step["extra"]
        )
        results.append((out, k, v))
    valid = _valid_columns(step)
    (padded, k1, v1), (row_by_row, k2, v2) = results
    torch.testing.assert_close(row_by_row[valid], padded[valid])
    assert torch.equal(k1, k2) and torch.equal(v1, v2)
