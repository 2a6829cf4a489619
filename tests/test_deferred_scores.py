"""Deferred attention scores (``PendingScores``): a forward records, a later commit counts chosen columns.

Speculative decoding needs the attention mass of the accepted tokens only, known after the verify forward.
Checked against an explicit per-query loop, for the torch reference and Triton (CPU interpreter here), on
fresh random inputs.
"""

from __future__ import annotations

import pytest
import torch
from test_attention_scores import naive_scores

from effdecode.kernels.slot_attention import slot_attention_scores_triton, slot_attention_triton
from effdecode.ops.attention import PendingScores, SlotBatch, slot_attention


def counted_scores(query, key, k_cache, rows, cache_lens, q_lens, col_from, col_to, scale, window, scores):
    """fp64 expected scores when only row ``b``'s valid columns at offsets ``[col_from, col_to)`` count."""
    return naive_scores(
        query, key, k_cache, rows, cache_lens, q_lens, scale, window, scores, (col_from, col_to)
    )


def _inputs(dtype, kv_heads, group, num_cols, head_dim, cache_lens, q_lens):
    bsz = len(cache_lens)
    slots = bsz + 2
    capacity = max(c + q for c, q in zip(cache_lens, q_lens, strict=True)) + 4
    rows = torch.randperm(slots)[:bsz].to(torch.int32)
    all_lens = torch.randint(0, capacity, (slots,), dtype=torch.int32)
    all_lens[rows.long()] = torch.tensor(cache_lens, dtype=torch.int32)
    q_lens = torch.tensor(q_lens, dtype=torch.int32)
    k_cache = torch.randn(slots, kv_heads, capacity, head_dim).to(dtype)
    v_cache = torch.randn(slots, kv_heads, capacity, head_dim).to(dtype)
    query = torch.randn(bsz, num_cols, kv_heads * group, head_dim).to(dtype).transpose(1, 2)
    key = torch.randn(bsz, num_cols, kv_heads, head_dim).to(dtype).transpose(1, 2)
    value = torch.randn(bsz, num_cols, kv_heads, head_dim).to(dtype).transpose(1, 2)
    scores = torch.rand(slots, kv_heads, capacity).masked_fill(
        torch.rand(slots, kv_heads, capacity) < 0.3, -0.0
    )
    return rows, all_lens, q_lens, k_cache, v_cache, query, key, value, scores


CASES = [
    # dtype, kv_heads, group, num_cols, head_dim, cache_lens, q_lens, col ranges, window, num_splits
    (torch.float32, 2, 1, 1, 16, [0, 9, 40], [1, 1, 1], [(0, 1), (0, 0), (0, 1)], None, None),
    (torch.float32, 1, 4, 5, 16, [3, 70, 0], [5, 2, 4], [(0, 3), (0, 2), (1, 4)], None, None),
    (torch.float16, 2, 2, 5, 16, [130, 7, 1], [5, 5, 3], [(2, 5), (0, 1), (3, 3)], 6, None),
    (torch.float32, 1, 3, 5, 16, [200, 17], [4, 5], [(0, 2), (1, 9)], None, 3),
    (torch.float16, 1, 2, 6, 32, [150, 64, 5], [6, 3, 6], [(0, 6), (0, 3), (5, 6)], 40, 4),
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize(
    "dtype,kv_heads,group,num_cols,head_dim,cache_lens,q_lens,ranges,window,splits", CASES
)
def test_committed_columns_match_a_loop_over_those_queries(
    fresh_seed,
    backend,
    dtype,
    kv_heads,
    group,
    num_cols,
    head_dim,
    cache_lens,
    q_lens,
    ranges,
    window,
    splits,
):
    rows, lens, q_lens_t, k_cache, v_cache, query, key, value, scores = _inputs(
        dtype, kv_heads, group, num_cols, head_dim, cache_lens, q_lens
    )
    col_from = torch.tensor([r[0] for r in ranges], dtype=torch.int32)
    col_to = torch.tensor([r[1] for r in ranges], dtype=torch.int32)
    scale = head_dim**-0.5
    bound = int((lens[rows.long()] + q_lens_t).max()) + 1
    expected, touched = counted_scores(
        query, key, k_cache, rows, lens, q_lens_t, col_from, col_to, scale, window, scores
    )

    def batch(cache_lens):
        return SlotBatch(rows, cache_lens, q_lens_t, kv_len_bound=bound, backend=backend)

    kc, vc = k_cache.clone(), v_cache.clone()
    live_lens = lens.clone()
    got = scores.clone()
    if splits is not None and backend == "triton":  # the kernels directly, with a forced split-K

        def attend(kc, vc, cache_lens, lse_out=None):
            return slot_attention_triton(
                query,
                key,
                value,
                kc,
                vc,
                batch(cache_lens),
                scale,
                window,
                lse_out=lse_out,
                num_splits=splits,
            )

        lse = torch.empty(query.shape[0], num_cols, query.shape[1])
        out = attend(kc, vc, live_lens, lse)
        live_lens[rows.long()] += q_lens_t  # the engine advances the lengths before committing
        slot_attention_scores_triton(
            query, lse, kc, batch(lens.clone()), scale, window, got, col_from, col_to
        )
    else:

        def attend(kc, vc, cache_lens, scores_out=None):
            return slot_attention(
                query, key, value, kc, vc, batch(cache_lens), scale, window, scores_out=scores_out
            )

        pending = PendingScores(got)
        out = attend(kc, vc, live_lens, pending)
        live_lens[rows.long()] += q_lens_t
        pending.commit(lens.clone(), col_from, col_to)
        with pytest.raises(RuntimeError, match="before any attention call"):
            pending.commit(lens.clone(), col_from, col_to)

    plain = attend(k_cache.clone(), v_cache.clone(), lens.clone())
    valid = torch.arange(num_cols)[None, :] >= (num_cols - q_lens_t)[:, None]
    assert torch.equal(out[valid], plain[valid]), "deferring changed the output"
    assert torch.equal(got[~touched].view(torch.int32), scores[~touched].view(torch.int32)), (
        "touched an entry"
    )
    tolerance = 1e-5 if dtype == torch.float32 else 3e-3
    torch.testing.assert_close(got.double(), expected, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_committing_every_column_equals_immediate_scores(fresh_seed, backend):
    rows, lens, q_lens, k_cache, v_cache, query, key, value, scores = _inputs(
        torch.float32, 2, 2, 5, 16, [12, 0, 33], [5, 3, 1]
    )
    bound = int((lens[rows.long()] + q_lens).max())
    immediate = scores.clone()
    batch = SlotBatch(rows, lens.clone(), q_lens, kv_len_bound=bound, backend=backend)
    slot_attention(
        query, key, value, k_cache.clone(), v_cache.clone(), batch, 0.25, None, scores_out=immediate
    )
    deferred = scores.clone()
    pending = PendingScores(deferred)
    batch = SlotBatch(rows, lens.clone(), q_lens, kv_len_bound=bound, backend=backend)
    slot_attention(query, key, value, k_cache.clone(), v_cache.clone(), batch, 0.25, None, scores_out=pending)
    pending.commit(lens.clone(), torch.zeros_like(q_lens), q_lens.clone())
    torch.testing.assert_close(deferred, immediate, atol=1e-6, rtol=1e-6)
    assert not torch.equal(deferred, scores)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    "dtype,kv_heads,group,num_cols,head_dim,cache_lens,q_lens,ranges,window,splits", CASES
)
def test_compiled_triton_commit_matches_a_loop_on_gpu(
    dtype, kv_heads, group, num_cols, head_dim, cache_lens, q_lens, ranges, window, splits
):
    rows, lens, q_lens_t, k_cache, v_cache, query, key, value, scores = _inputs(
        dtype, kv_heads, group, num_cols, head_dim, cache_lens, q_lens
    )
    col_from = torch.tensor([r[0] for r in ranges], dtype=torch.int32)
    col_to = torch.tensor([r[1] for r in ranges], dtype=torch.int32)
    scale = head_dim**-0.5
    expected, _ = counted_scores(
        query, key, k_cache, rows, lens, q_lens_t, col_from, col_to, scale, window, scores
    )
    cuda = [
        t.cuda()
        for t in (rows, lens, q_lens_t, k_cache, v_cache, query, key, value, scores, col_from, col_to)
    ]
    rows, lens, q_lens_t, k_cache, v_cache, query, key, value, got, col_from, col_to = cuda
    bound = int((lens[rows.long()] + q_lens_t).max()) + 1
    pending = PendingScores(got)
    batch = SlotBatch(rows, lens.clone(), q_lens_t, kv_len_bound=bound, backend="triton")
    slot_attention(query, key, value, k_cache, v_cache, batch, scale, window, scores_out=pending)
    pending.commit(lens, col_from, col_to)
    tolerance = 1e-4 if dtype == torch.float32 else 3e-3
    torch.testing.assert_close(got.cpu().double(), expected, atol=tolerance, rtol=tolerance)


def test_bad_deferred_arguments_raise():
    q = torch.zeros(1, 2, 1, 16)
    cache = torch.zeros(1, 2, 4, 16)
    batch = SlotBatch(
        torch.zeros(1, dtype=torch.int32),
        torch.zeros(1, dtype=torch.int32),
        torch.ones(1, dtype=torch.int32),
        1,
    )
    with pytest.raises(ValueError, match="lse_out"):
        slot_attention_triton(q, q, q, cache, cache.clone(), batch, 1.0, lse_out=torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match="lse_out"):
        slot_attention_triton(
            q,
            q,
            q,
            cache,
            cache.clone(),
            batch,
            1.0,
            scores_out=torch.zeros(1, 2, 4),
            lse_out=torch.zeros(1, 1, 2),
        )
    with pytest.raises(ValueError, match="col_from and col_to"):
        slot_attention_scores_triton(q, torch.zeros(1, 1, 2), cache, batch, 1.0, None, torch.zeros(1, 2, 4),
                                     torch.zeros(1, dtype=torch.int32))  # fmt: skip
