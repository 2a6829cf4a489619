"""Triton slot attention against the torch reference, on fresh random inputs.

On the ``device`` fixture: Triton's interpreter on the CPU, CUDA tensors on a GPU (marked ``gpu``). The
production shapes (bf16 tensor-core products, head_dim 128, long contexts) are in ``test_gpu_shapes.py``,
which reuses :func:`check_case`.
"""

from __future__ import annotations

import pytest
import torch

from effdecode.kernels.slot_attention import _num_splits, slot_attention_triton
from effdecode.ops.attention import SlotBatch, slot_attention_reference
from tolerances import REL_ERR, TOLERANCES


def check_case(
    *,
    device: torch.device,
    dtype: torch.dtype,
    kv_heads: int,
    group: int,
    num_cols: int,
    head_dim: int,
    cache_lens: list[int],
    q_lens: list[int],
    sliding_window: int | None = None,
    num_splits: int | None = None,
    extra_slots: int = 2,
    bound_slack: int = 3,
    cache_dtype: torch.dtype | None = None,
    hf_layout: bool = True,
    ref_dtype: torch.dtype | None = None,
) -> None:
    """Build a batch over a shuffled strict subset of slots, run both implementations, compare everything.

    Inputs are drawn on the CPU (one seed, any device), then moved to ``device``, where both run. The
    reference computes in ``ref_dtype`` (default: the inputs' dtype) from the same values, so a float32
    ``ref_dtype`` checks a low-precision kernel against a more precise oracle.
    """
    bsz = len(cache_lens)
    slots = bsz + extra_slots
    q_heads = kv_heads * group
    capacity = max(c + q for c, q in zip(cache_lens, q_lens, strict=True)) + bound_slack + 5

    rows = torch.randperm(slots)[:bsz].to(torch.int32)
    all_lens = torch.randint(0, capacity, (slots,), dtype=torch.int32)  # rows not in the batch: any length
    all_lens[rows.long()] = torch.tensor(cache_lens, dtype=torch.int32)
    q_lens_t = torch.tensor(q_lens, dtype=torch.int32)
    bound = max(c + q for c, q in zip(cache_lens, q_lens, strict=True)) + bound_slack

    cache_dtype = cache_dtype or dtype
    k_cache = torch.randn(slots, kv_heads, capacity, head_dim).to(cache_dtype)
    v_cache = torch.randn(slots, kv_heads, capacity, head_dim).to(cache_dtype)
    # Entries at or past a row's cache_len are stale: make them large so that attending to one shows.
    for slot, length in zip(rows.tolist(), cache_lens, strict=True):
        k_cache[slot, :, length:] *= 50
        v_cache[slot, :, length:] *= 50

    def states(heads: int) -> torch.Tensor:
        # transformers hands over [B, T, heads, D] projections viewed as [B, heads, T, D].
        if hf_layout:
            return torch.randn(bsz, num_cols, heads, head_dim).to(dtype).transpose(1, 2)
        return torch.randn(bsz, heads, num_cols, head_dim).to(dtype)

    query, key, value = states(q_heads), states(kv_heads), states(kv_heads)
    valid = torch.arange(num_cols)[None, :] >= (num_cols - q_lens_t)[:, None]  # [B, T]
    # Padding columns are poisoned: the kernel must neither attend to nor store them.
    key[~valid[:, None, :].expand_as(key[..., 0])] = float("nan")
    value[~valid[:, None, :].expand_as(value[..., 0])] = float("nan")
    query.transpose(1, 2)[~valid] = float("nan")

    # To the device (Tensor.to keeps the transposed strides of the HF layout).
    rows, all_lens, q_lens_t = rows.to(device), all_lens.to(device), q_lens_t.to(device)
    k_cache, v_cache = k_cache.to(device), v_cache.to(device)
    query, key, value = query.to(device), key.to(device), value.to(device)
    scale = head_dim**-0.5

    def batch() -> SlotBatch:
        return SlotBatch(
            rows=rows.clone(),
            cache_lens=all_lens.clone(),
            q_lens=q_lens_t.clone(),
            kv_len_bound=bound,
            backend="triton",
            rows_are_leading_slots=rows.tolist() == list(range(bsz)),
            q_full=all(q == num_cols for q in q_lens),
        )

    ref_batch = batch()
    # The reference's padding columns read NaN queries; only its valid columns are compared.
    # Same semantics as storing key/value in the cache dtype; cast here because the reference's index_put
    # does not cast (it raises on a dtype mismatch). A wider ref_dtype holds those values exactly.
    wide = ref_dtype or cache_dtype
    ref_k, ref_v = k_cache.to(wide, copy=True), v_cache.to(wide, copy=True)
    ref_out = slot_attention_reference(
        query.to(ref_dtype or dtype),
        key.to(cache_dtype).to(wide),
        value.to(cache_dtype).to(wide),
        ref_k,
        ref_v,
        ref_batch,
        scale,
        sliding_window,
    )
    ref_k, ref_v = ref_k.to(cache_dtype), ref_v.to(cache_dtype)

    tri_batch = batch()
    tri_k, tri_v = k_cache.clone(), v_cache.clone()
    out = slot_attention_triton(
        query, key, value, tri_k, tri_v, tri_batch, scale, sliding_window, num_splits=num_splits
    )

    assert out.shape == (bsz, num_cols, q_heads, head_dim)
    assert out.dtype == dtype
    assert torch.equal(tri_batch.cache_lens, all_lens), "cache_lens was modified"
    assert torch.equal(tri_batch.rows, rows) and torch.equal(tri_batch.q_lens, q_lens_t)
    assert torch.equal(tri_k, ref_k), "key cache differs from the reference's"
    assert torch.equal(tri_v, ref_v), "value cache differs from the reference's"
    assert not torch.equal(tri_k, k_cache) or sum(q_lens) == 0, "nothing was written"

    # Compare valid columns only: the rest of both outputs is replaced by NaN, which would fail the check
    # if a valid column were mislabelled as padding.
    out, ref_out = out.cpu().float(), ref_out.cpu().float()
    got = out.masked_fill(~valid[:, :, None, None], float("nan"))
    want = ref_out.masked_fill(~valid[:, :, None, None], float("nan"))
    assert torch.isfinite(got[valid]).all()
    torch.testing.assert_close(got, want, equal_nan=True, **TOLERANCES[dtype])
    # Element-wise bounds pass small outputs (long contexts average towards 0): bound the relative error too.
    if valid.any():
        error = (out[valid] - ref_out[valid]).norm() / ref_out[valid].norm().clamp_min(1e-30)
        assert error <= REL_ERR[dtype], f"relative error {float(error):.2e} > {REL_ERR[dtype]:.0e}"
    # Documented behaviour of this implementation: padding columns are zeros.
    assert (out[~valid] == 0).all()


@pytest.mark.parametrize(
    "dtype,kv_heads,group,num_cols,head_dim,cache_lens,q_lens,window",
    [
        # decode, MHA, prefill row / single entry / length not a multiple of BLOCK_N
        (torch.float32, 2, 1, 1, 32, [0, 1, 77], [1, 1, 1], None),
        (torch.float16, 2, 1, 1, 32, [0, 1, 77], [1, 1, 1], 16),
        # speculative-style T = 5, GQA 2, ragged q_lens (full, one, in between)
        (torch.float16, 2, 2, 5, 16, [1, 70, 0], [5, 1, 3], None),
        (torch.float32, 1, 2, 5, 16, [1, 70, 0], [5, 1, 3], 7),
        # T = 16, GQA 4: M = 64 in one tile
        (torch.float16, 1, 4, 16, 32, [100, 0, 1], [16, 1, 9], None),
        (torch.float32, 2, 4, 16, 16, [100, 0, 1], [16, 1, 9], 24),
        # a group size that is not a power of 2 (flattened (t, g) tiles straddle columns); a row with q_len 0
        (torch.float16, 1, 3, 5, 16, [65, 3, 9], [2, 5, 0], None),
        # prefill: no cache, T large enough for several query tiles, ragged
        (torch.float16, 1, 2, 40, 16, [0, 0], [40, 23], None),
        (torch.float32, 2, 2, 40, 16, [0, 0], [33, 40], 9),
        # windows whose first visible key differs across a query tile by more than a key block
        (torch.float32, 1, 2, 16, 16, [130, 5], [16, 16], 10),
        (torch.float16, 1, 1, 160, 16, [0, 0], [160, 97], 20),
        # larger head dims
        (torch.float16, 1, 2, 5, 64, [67, 2], [5, 2], None),
        (torch.float16, 1, 4, 1, 128, [130, 0], [1, 1], None),
        # bf16 (products upcast under the interpreter)
        (torch.bfloat16, 1, 2, 5, 32, [45, 3], [4, 5], None),
    ],
)
def test_matches_reference(
    device, fresh_seed, dtype, kv_heads, group, num_cols, head_dim, cache_lens, q_lens, window
):
    check_case(
        device=device,
        dtype=dtype,
        kv_heads=kv_heads,
        group=group,
        num_cols=num_cols,
        head_dim=head_dim,
        cache_lens=cache_lens,
        q_lens=q_lens,
        sliding_window=window,
    )


@pytest.mark.parametrize(
    "dtype,group,num_cols,cache_lens,q_lens,window,num_splits",
    [
        # Forced splits on short contexts: rows shorter than later splits must give neutral partials.
        (torch.float32, 2, 1, [250, 3, 131], [1, 1, 1], None, 4),
        (torch.float16, 4, 5, [250, 0, 131], [5, 1, 3], None, 3),
        (torch.float32, 2, 16, [190, 1], [16, 7], 40, 4),
        (torch.float16, 1, 5, [200, 64], [3, 5], 70, 5),
    ],
)
def test_split_k(device, fresh_seed, dtype, group, num_cols, cache_lens, q_lens, window, num_splits):
    check_case(
        device=device,
        dtype=dtype,
        kv_heads=1,
        group=group,
        num_cols=num_cols,
        head_dim=16,
        cache_lens=cache_lens,
        q_lens=q_lens,
        sliding_window=window,
        num_splits=num_splits,
    )


@pytest.mark.parametrize("window", [None, 100])
def test_long_context_default_splits(device, fresh_seed, window):
    """Batch 1 at a longer context: the default plan splits the key range by itself."""
    cache_len, bound_slack = 700, 3
    assert _num_splits(device, 1, cache_len + 1 + bound_slack, 64, None)[0] > 1
    check_case(
        device=device,
        dtype=torch.float16,
        kv_heads=1,
        group=4,
        num_cols=1,
        head_dim=32,
        cache_lens=[cache_len],
        q_lens=[1],
        sliding_window=window,
        bound_slack=bound_slack,
    )


@pytest.mark.parametrize(
    "dtype,cache_dtype", [(torch.float32, torch.float16), (torch.float16, torch.float32)]
)
def test_cache_dtype_differs(device, fresh_seed, dtype, cache_dtype):
    """New entries are rounded through the cache dtype before being attended, as the reference does."""
    check_case(
        device=device,
        dtype=dtype,
        cache_dtype=cache_dtype,
        kv_heads=2,
        group=2,
        num_cols=5,
        head_dim=16,
        cache_lens=[30, 0],
        q_lens=[5, 2],
        num_splits=2,
        hf_layout=False,
    )


def test_split_plan():
    # Splits are whole key blocks, cover the bound, and none starts past it.
    for bound in (1, 63, 64, 65, 700, 32768):
        for requested in (None, 1, 3, 7, 64):
            splits, split_len = _num_splits(torch.device("cpu"), 1, bound, 64, requested)
            assert split_len % 64 == 0 and splits >= 1
            assert splits * split_len >= bound > (splits - 1) * split_len
    # Plenty of (row, head) programs: no split.
    assert _num_splits(torch.device("cpu"), 4096, 32768, 64, None)[0] == 1


def test_rejects_bad_shapes():
    batch = SlotBatch(
        rows=torch.zeros(1, dtype=torch.int32),
        cache_lens=torch.zeros(1, dtype=torch.int32),
        q_lens=torch.ones(1, dtype=torch.int32),
        kv_len_bound=1,
    )
    cache = torch.zeros(1, 2, 4, 16)
    with pytest.raises(ValueError):
        slot_attention_triton(
            torch.zeros(1, 3, 1, 16),
            torch.zeros(1, 2, 1, 16),
            torch.zeros(1, 2, 1, 16),
            cache,
            cache.clone(),
            batch,
            1.0,
        )
    # Head dims that are not a power of two are padded inside the kernel (tests/test_attention_variants.py);
    # a cache whose head dim differs from the query's is still refused.
    with pytest.raises(ValueError):
        slot_attention_triton(
            torch.zeros(1, 2, 1, 24),
            torch.zeros(1, 2, 1, 24),
            torch.zeros(1, 2, 1, 24),
            torch.zeros(1, 2, 4, 16),
            torch.zeros(1, 2, 4, 16),
            batch,
            1.0,
        )
