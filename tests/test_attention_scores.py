"""Attention-score emission (``scores_out``): torch reference vs a naive loop, Triton vs the reference.

Triton tests run on the ``device`` fixture (the CPU interpreter, or CUDA tensors on a GPU; see conftest.py);
every test draws fresh random inputs.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from effdecode.hf_attention import StepContext, effdecode_attention
from effdecode.kernels.slot_attention import _scores_from_logits, slot_attention_triton
from effdecode.ops.attention import SlotBatch, slot_attention, slot_attention_reference
from tolerances import REL_ERR, TOLERANCES


def naive_scores(query, key, k_cache, rows, cache_lens, q_lens, scale, window, scores, col_range=None):
    """Per row, valid token and query head: explicit softmax over the visible keys, added key by key, fp64.

    With ``col_range`` (``col_from``, ``col_to``, int ``[B]``) only row ``b``'s valid columns at offsets
    ``[col_from[b], col_to[b])`` count. Returns the expected scores (fp64) and the boolean
    ``[slots, kv_heads, capacity]`` mask of the entries added to.
    """
    k_cache = k_cache.clone().double()
    expected = scores.clone().double()
    touched = torch.zeros(scores.shape, dtype=torch.bool)
    batch, q_heads, num_cols, _ = query.shape
    group = q_heads // key.shape[1]
    for b in range(batch):
        slot, start = int(rows[b]), int(cache_lens[rows[b]])
        pad = num_cols - int(q_lens[b])
        for t in range(pad, num_cols):
            k_cache[slot, :, start + t - pad] = key[b, :, t].double()
        counted = range(pad, num_cols)
        if col_range is not None:
            counted = range(pad + int(col_range[0][b]), min(pad + int(col_range[1][b]), num_cols))
        for t in counted:
            index = start + t - pad
            lo = 0 if window is None else max(0, index - window + 1)
            for h in range(q_heads):
                logits = (k_cache[slot, h // group, lo : index + 1] @ query[b, h, t].double()) * scale
                weights = torch.exp(logits - logits.max())
                weights = weights / weights.sum()
                for j in range(lo, index + 1):
                    expected[slot, h // group, j] += weights[j - lo]
                    touched[slot, h // group, j] = True
    return expected, touched


@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("num_cols", [1, 4])
@pytest.mark.parametrize("window", [None, 3])
def test_reference_scores_match_naive_loop(fresh_seed, group, num_cols, window):
    slots, kv_heads, capacity, head_dim, batch = 6, 2, 24, 8, 4
    rows = torch.randperm(slots)[:batch].to(torch.int32)
    cache_lens = torch.randint(0, 12, (slots,), dtype=torch.int32)
    q_lens = torch.randint(0, num_cols + 1, (batch,), dtype=torch.int32)
    q_lens[0] = num_cols
    query = torch.randn(batch, kv_heads * group, num_cols, head_dim, dtype=torch.float64)
    key = torch.randn(batch, kv_heads, num_cols, head_dim, dtype=torch.float64)
    value = torch.randn(batch, kv_heads, num_cols, head_dim, dtype=torch.float64)
    k_cache = torch.randn(slots, kv_heads, capacity, head_dim, dtype=torch.float64)
    v_cache = torch.randn(slots, kv_heads, capacity, head_dim, dtype=torch.float64)
    scores = torch.randn(slots, kv_heads, capacity).masked_fill(
        torch.rand(slots, kv_heads, capacity) < 0.25, -0.0
    )
    scale = 1 / math.sqrt(head_dim)
    expected, touched = naive_scores(query, key, k_cache, rows, cache_lens, q_lens, scale, window, scores)

    bound = int((cache_lens[rows.long()] + q_lens).max()) + 2

    def run(scores_out):
        meta = SlotBatch(rows, cache_lens.clone(), q_lens, kv_len_bound=bound)
        kc, vc = k_cache.clone(), v_cache.clone()
        return slot_attention_reference(query, key, value, kc, vc, meta, scale, window, scores_out=scores_out)

    got = scores.clone()
    out = run(got)
    assert torch.equal(out, run(None)), "scores_out changed the attention output"
    untouched_bits = got[~touched].view(torch.int32)
    assert torch.equal(untouched_bits, scores[~touched].view(torch.int32)), (
        "an entry no query sees was modified"
    )
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-6)


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
    window: int | None = None,
    num_splits: int | None = None,
    from_logits: bool | None = None,
    capacity_slack: int = 5,
    bound_slack: int = 3,
    strided_scores: bool = False,
) -> None:
    """Run the reference and Triton with and without ``scores_out`` on one batch; compare everything.

    Inputs are drawn on the CPU, then both run on ``device``; results are compared on the CPU.
    """
    bsz = len(cache_lens)
    slots = bsz + 2
    q_heads = kv_heads * group
    longest = max(c + q for c, q in zip(cache_lens, q_lens, strict=True))
    bound = longest + bound_slack
    capacity = bound + capacity_slack

    rows = torch.randperm(slots)[:bsz].to(torch.int32)  # a shuffled strict subset of the slots
    all_lens = torch.randint(0, capacity, (slots,), dtype=torch.int32)
    all_lens[rows.long()] = torch.tensor(cache_lens, dtype=torch.int32)
    q_lens_t = torch.tensor(q_lens, dtype=torch.int32)

    k_cache = torch.randn(slots, kv_heads, capacity, head_dim).to(dtype)
    v_cache = torch.randn(slots, kv_heads, capacity, head_dim).to(dtype)
    for slot, length in zip(rows.tolist(), cache_lens, strict=True):
        k_cache[slot, :, length:] *= 50  # stale entries: attending to (or scoring) one would show
    query = torch.randn(bsz, num_cols, q_heads, head_dim).to(dtype).transpose(1, 2)
    key = torch.randn(bsz, num_cols, kv_heads, head_dim).to(dtype).transpose(1, 2)
    value = torch.randn(bsz, num_cols, kv_heads, head_dim).to(dtype).transpose(1, 2)
    valid = torch.arange(num_cols)[None, :] >= (num_cols - q_lens_t)[:, None]  # [B, T]
    # Padding columns are poisoned: they must add no score.
    query.transpose(1, 2)[~valid] = float("nan")
    key.transpose(1, 2)[~valid] = float("nan")
    value.transpose(1, 2)[~valid] = float("nan")

    if strided_scores:
        scores = torch.randn(slots, capacity, kv_heads).transpose(1, 2)
    else:
        scores = torch.randn(slots, kv_heads, capacity)
    # Some -0.0: adding 0.0 to an entry no query sees would turn it into +0.0.
    scores.masked_fill_(torch.rand(scores.shape) < 0.25, -0.0)
    touched = torch.zeros(scores.shape, dtype=torch.bool)
    for slot, start, length in zip(rows.tolist(), cache_lens, q_lens, strict=True):
        if length:
            touched[slot, :, 0 if window is None else max(0, start - window + 1) : start + length] = True
    scale = head_dim**-0.5
    rows, all_lens, q_lens_t = rows.to(device), all_lens.to(device), q_lens_t.to(device)
    k_cache, v_cache, scores = k_cache.to(device), v_cache.to(device), scores.to(device)
    query, key, value = query.to(device), key.to(device), value.to(device)

    def batch() -> SlotBatch:
        return SlotBatch(
            rows=rows.clone(),
            cache_lens=all_lens.clone(),
            q_lens=q_lens_t.clone(),
            kv_len_bound=bound,
            backend="triton",
        )

    def triton_run(scores_out):
        kc, vc = k_cache.clone(), v_cache.clone()
        out = slot_attention_triton(
            query,
            key,
            value,
            kc,
            vc,
            batch(),
            scale,
            window,
            scores_out=scores_out,
            num_splits=num_splits,
            scores_from_logits=from_logits,
        )
        return out, kc, vc

    ref_scores = scores.clone()
    slot_attention_reference(
        query, key, value, k_cache.clone(), v_cache.clone(), batch(), scale, window, scores_out=ref_scores
    )
    tri_scores = scores.clone()
    out, kc, vc = triton_run(tri_scores)
    plain_out, plain_kc, plain_vc = triton_run(None)

    assert torch.equal(out, plain_out), "scores_out changed the attention output"
    assert torch.equal(kc, plain_kc) and torch.equal(vc, plain_vc)
    scores, ref_scores, tri_scores = scores.cpu(), ref_scores.cpu(), tri_scores.cpu()
    rows, q_lens_t = rows.cpu(), q_lens_t.cpu()
    for name, got in (("reference", ref_scores), ("triton", tri_scores)):
        untouched_bits = got[~touched].view(torch.int32)
        assert torch.equal(untouched_bits, scores[~touched].view(torch.int32)), f"{name}: modified an entry"
        # Sum invariant: each valid query's weights sum to 1.
        added = (got - scores)[rows.long()].double().sum(dim=2)  # [B, kv_heads]
        want = (group * q_lens_t.double())[:, None].expand_as(added)
        torch.testing.assert_close(added, want, atol=1e-3 * max(1, group * num_cols), rtol=0)
    torch.testing.assert_close(tri_scores, ref_scores, **TOLERANCES[dtype])
    # Weights over long contexts are tiny: bound the relative error of the added mass as a whole too.
    added_tri, added_ref = (tri_scores - scores).double(), (ref_scores - scores).double()
    error = float((added_tri - added_ref).norm() / added_ref.norm().clamp_min(1e-30))
    assert error <= REL_ERR[dtype], f"relative error of the added scores {error:.2e}"


CASES = [
    # decode, MHA; a prefill row, a single entry, a length off the block size; window on/off
    (torch.float32, 2, 1, 1, 32, [0, 1, 77], [1, 1, 1], None, None),
    (torch.float16, 2, 1, 1, 32, [0, 1, 77], [1, 1, 1], 16, None),
    # T = 5 with ragged q_lens, GQA 2 and 4
    (torch.float16, 2, 2, 5, 16, [1, 70, 0], [5, 1, 3], None, None),
    (torch.float32, 1, 2, 5, 16, [1, 70, 0], [5, 1, 3], 7, None),
    (torch.float32, 2, 4, 5, 16, [100, 0, 1], [5, 1, 2], None, None),
    (torch.float16, 1, 4, 5, 16, [100, 0, 1], [5, 1, 2], 24, None),
    # forced split-K, rows shorter than later splits' starts
    (torch.float32, 1, 2, 1, 16, [250, 3, 131], [1, 1, 1], None, 4),
    (torch.float16, 2, 4, 5, 16, [250, 0, 131], [5, 1, 3], None, 3),
    (torch.float32, 1, 4, 5, 16, [190, 1], [5, 2], 40, 4),
    (torch.float16, 1, 1, 5, 16, [200, 64], [3, 5], 70, 5),
    # a row with q_len 0; a group size that is not a power of 2
    (torch.float32, 1, 3, 5, 16, [65, 3, 9], [2, 5, 0], None, 2),
    # several query tiles per (row, kv head), windows narrower than a key block
    (torch.float32, 1, 2, 16, 16, [130, 5], [16, 16], 10, None),
    (torch.float16, 1, 2, 40, 16, [0, 0], [40, 23], None, 2),
    (torch.float32, 1, 1, 40, 16, [0, 30], [40, 17], 2, None),
    (torch.bfloat16, 1, 2, 5, 32, [45, 3], [4, 5], None, None),
]


@pytest.mark.parametrize("from_logits", [True, False], ids=["logits", "recompute"])
@pytest.mark.parametrize("dtype,kv_heads,group,num_cols,head_dim,cache_lens,q_lens,window,num_splits", CASES)
def test_triton_scores_match_reference(
    device,
    fresh_seed,
    from_logits,
    dtype,
    kv_heads,
    group,
    num_cols,
    head_dim,
    cache_lens,
    q_lens,
    window,
    num_splits,
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
        window=window,
        num_splits=num_splits,
        from_logits=from_logits,
    )


@pytest.mark.parametrize("from_logits", [None, True, False])
def test_full_cache_and_strided_scores(device, fresh_seed, from_logits):
    """A row filling the cache to its last entry; ``scores_out`` a transposed view; default path choice."""
    check_case(
        device=device,
        dtype=torch.float16,
        kv_heads=2,
        group=2,
        num_cols=5,
        head_dim=16,
        cache_lens=[91, 7],
        q_lens=[5, 3],
        num_splits=2,
        from_logits=from_logits,
        capacity_slack=0,
        bound_slack=0,
        strided_scores=True,
    )


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sum_invariant_random_batches(device, fresh_seed, backend):
    """Each valid query's weights sum to 1: per (row, kv head) the added mass is ``group * q_len``."""
    slots, kv_heads, head_dim, num_cols, capacity = 7, 2, 16, 5, 160
    for _ in range(2):
        group = [1, 2, 4][int(torch.randint(3, ()))]
        window = [None, 1, 9][int(torch.randint(3, ()))]
        bsz = int(torch.randint(1, slots + 1, ()))
        rows = torch.randperm(slots)[:bsz].to(torch.int32)
        cache_lens = torch.randint(0, capacity - num_cols, (slots,), dtype=torch.int32)
        q_lens = torch.randint(0, num_cols + 1, (bsz,), dtype=torch.int32)
        query = torch.randn(bsz, kv_heads * group, num_cols, head_dim) * 3  # peaked softmaxes too
        key = torch.randn(bsz, kv_heads, num_cols, head_dim)
        value = torch.randn(bsz, kv_heads, num_cols, head_dim)
        k_cache = torch.randn(slots, kv_heads, capacity, head_dim)
        v_cache = torch.randn(slots, kv_heads, capacity, head_dim)
        batch = SlotBatch(
            rows.to(device), cache_lens.to(device), q_lens.to(device), kv_len_bound=capacity, backend=backend
        )
        before = torch.randn(slots, kv_heads, capacity)
        scores = before.to(device, copy=True)
        query, key, value = query.to(device), key.to(device), value.to(device)
        k_cache, v_cache = k_cache.to(device), v_cache.to(device)
        slot_attention(query, key, value, k_cache, v_cache, batch, head_dim**-0.5, window, scores_out=scores)
        scores = scores.cpu()
        added = (scores - before).double().sum(dim=2)  # [slots, kv_heads]
        want = torch.zeros(slots, kv_heads, dtype=torch.float64)
        want[rows.long()] = group * q_lens.double()[:, None]
        torch.testing.assert_close(added, want, atol=1e-4, rtol=0)
        others = torch.ones(slots, dtype=torch.bool)
        others[rows.long()] = False
        assert torch.equal(scores[others], before[others])


def test_path_choice():
    # Decode and short speculative steps read stored logits; prefill and huge buffers recompute q @ k^T.
    assert _scores_from_logits(4, 128, 2, 1 << 20)
    assert _scores_from_logits(20, 128, 2, 1 << 20)
    assert not _scores_from_logits(2048 * 4, 128, 2, 1 << 20)
    assert not _scores_from_logits(4, 128, 2, 1 << 40)


def test_rejects_bad_scores_out():
    batch = SlotBatch(
        rows=torch.zeros(1, dtype=torch.int32),
        cache_lens=torch.zeros(1, dtype=torch.int32),
        q_lens=torch.ones(1, dtype=torch.int32),
        kv_len_bound=1,
    )
    q, kv = torch.zeros(1, 2, 1, 16), torch.zeros(1, 2, 1, 16)
    cache = torch.zeros(1, 2, 4, 16)
    for bad in (torch.zeros(1, 2, 4, dtype=torch.float16), torch.zeros(1, 2, 5), torch.zeros(2, 2, 4)):
        with pytest.raises(ValueError):
            slot_attention_triton(q, kv, kv, cache, cache.clone(), batch, 1.0, scores_out=bad)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_step_context_routes_scores(device, fresh_seed, backend):
    """``effdecode_attention`` adds into ``step.scores[layer]`` and leaves the other layers alone."""
    layers, slots, kv_heads, capacity, head_dim = 2, 3, 1, 32, 16
    cache = SimpleNamespace(
        keys=[torch.randn(slots, kv_heads, capacity, head_dim, device=device) for _ in range(layers)],
        values=[torch.randn(slots, kv_heads, capacity, head_dim, device=device) for _ in range(layers)],
    )
    batch = SlotBatch(
        rows=torch.tensor([2, 0], dtype=torch.int32, device=device),
        cache_lens=torch.tensor([4, 9, 0], dtype=torch.int32, device=device),
        q_lens=torch.tensor([3, 1], dtype=torch.int32, device=device),
        kv_len_bound=8,
        backend=backend,
    )
    scores = [torch.zeros(slots, kv_heads, capacity, device=device) for _ in range(layers)]
    step = StepContext(cache, batch, scores)
    query = torch.randn(2, 2, 3, head_dim, device=device)
    key, value = torch.randn(2, 1, 3, head_dim, device=device), torch.randn(2, 1, 3, head_dim, device=device)
    out, _ = effdecode_attention(SimpleNamespace(layer_idx=1), query, key, value, None, effdecode_step=step)
    assert out.shape == (2, 3, 2, head_dim)
    assert torch.equal(scores[0], torch.zeros_like(scores[0]))
    torch.testing.assert_close(scores[1].sum(dim=(1, 2)).cpu(), torch.tensor([1 * 2.0, 0.0, 3 * 2.0]))
    assert StepContext(cache, batch).scores is None
