"""What model families need of slot attention beyond plain causal GQA.

Logit soft-capping (Gemma 2), per-head attention sinks (gpt-oss), per-call sliding windows, scales other than
``1/sqrt(head_dim)`` and head dims that are not a power of two: the torch reference against a naive dense
implementation written from the definitions (float64), the Triton kernel (interpreter on CPU) against the
reference, and the dispatch and flash-attn paths' handling of the new arguments.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import masking_utils

import effdecode.ops.flash_attention as fa
from effdecode.kernels.slot_attention import slot_attention_scores_triton, slot_attention_triton
from effdecode.ops.attention import (
    PendingScores,
    SlotBatch,
    _attention_mask,
    slot_attention,
    slot_attention_reference,
    slot_attention_scores,
)


def _case(
    *,
    dtype=torch.float64,
    kv_heads=2,
    group=2,
    head_dim=16,
    cache_lens=(5, 0, 9),
    q_lens=(3, 1, 2),
    seed=0,
):
    """Random inputs over a shuffled subset of slots; padding columns of query/key/value hold NaN."""
    gen = torch.Generator().manual_seed(seed)
    bsz, num_cols = len(cache_lens), max(q_lens)
    slots, q_heads = bsz + 2, kv_heads * group
    capacity = max(c + q for c, q in zip(cache_lens, q_lens, strict=True)) + 4
    rows = torch.randperm(slots, generator=gen)[:bsz].to(torch.int32)
    all_lens = torch.randint(0, capacity, (slots,), generator=gen, dtype=torch.int32)
    all_lens[rows.long()] = torch.tensor(cache_lens, dtype=torch.int32)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    k_cache, v_cache = rand(slots, kv_heads, capacity, head_dim), rand(slots, kv_heads, capacity, head_dim)
    query = rand(bsz, num_cols, q_heads, head_dim).transpose(1, 2)  # HF hands over a transposed view
    key, value = rand(bsz, kv_heads, num_cols, head_dim), rand(bsz, kv_heads, num_cols, head_dim)
    q_lens_t = torch.tensor(q_lens, dtype=torch.int32)
    valid = torch.arange(num_cols)[None, :] >= (num_cols - q_lens_t)[:, None]
    key[~valid[:, None, :].expand_as(key[..., 0])] = float("nan")
    value[~valid[:, None, :].expand_as(value[..., 0])] = float("nan")
    query.transpose(1, 2)[~valid] = float("nan")
    bound = max(c + q for c, q in zip(cache_lens, q_lens, strict=True)) + 2

    def batch(backend="torch"):
        return SlotBatch(rows.clone(), all_lens.clone(), q_lens_t.clone(), bound, backend)

    sinks = rand(q_heads) * 2
    return dict(query=query, key=key, value=value, k_cache=k_cache, v_cache=v_cache, batch=batch, valid=valid,
                sinks=sinks)  # fmt: skip


def _naive(c, scale, window=None, softcap=None, sinks=None):
    """Per row, query head and valid column, straight from the definitions: (output, scores)."""
    query, key, value, valid = c["query"], c["key"], c["value"], c["valid"]
    batch = c["batch"]()
    bsz, q_heads, num_cols, head_dim = query.shape
    kv_heads = key.shape[1]
    group = q_heads // kv_heads
    out = torch.zeros(bsz, num_cols, q_heads, head_dim, dtype=torch.float64)
    scores = torch.zeros(c["k_cache"].shape[:3], dtype=torch.float64)
    for b in range(bsz):
        slot, start = int(batch.rows[b]), int(batch.cache_lens[batch.rows[b]])
        new = valid[b].nonzero().flatten()
        keys = torch.cat([c["k_cache"][slot, :, :start], key[b][:, new]], dim=1).double()  # [Hk, L, D]
        values = torch.cat([c["v_cache"][slot, :, :start], value[b][:, new]], dim=1).double()
        for n, t in enumerate(new.tolist()):
            i = start + n  # this query's cache index
            for h in range(q_heads):
                kv = h // group
                terms = []
                for j in range(i + 1):
                    if window is not None and not j > i - window:
                        continue
                    s = scale * float(query[b, h, t].double() @ keys[kv, j])
                    if softcap is not None:
                        s = softcap * math.tanh(s / softcap)
                    terms.append((j, s))
                denominator = sum(math.exp(s) for _, s in terms)
                if sinks is not None:
                    denominator += math.exp(float(sinks[h]))
                for j, s in terms:
                    weight = math.exp(s) / denominator
                    out[b, t, h] += weight * values[kv, j]
                    scores[slot, kv, j] += weight
    return out, scores


VARIANTS = {
    "softcap": dict(softcap=1.5),
    "sinks": dict(sinks=True),
    "window": dict(window=3),
    "softcap+window+sinks": dict(softcap=2.0, window=2, sinks=True),
    "scale": dict(scale=0.05),
}


def _args(c, variant):
    spec = VARIANTS[variant]
    sinks = c["sinks"] if spec.get("sinks") else None
    scale = spec.get("scale", c["query"].shape[-1] ** -0.5)
    return scale, spec.get("window"), spec.get("softcap"), sinks


@pytest.mark.parametrize("head_dim", [16, 80, 8])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_reference_matches_naive_definition(variant, head_dim):
    c = _case(head_dim=head_dim, seed=head_dim)
    scale, window, softcap, sinks = _args(c, variant)
    expected, expected_scores = _naive(c, scale, window, softcap, sinks)
    scores = torch.zeros(c["k_cache"].shape[:3], dtype=torch.float32)
    out = slot_attention_reference(
        c["query"], c["key"], c["value"], c["k_cache"], c["v_cache"], c["batch"](), scale, window,
        scores_out=scores, softcap=softcap, sinks=sinks,
    )  # fmt: skip
    valid = c["valid"]
    torch.testing.assert_close(out[valid], expected[valid], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(scores.double(), expected_scores, rtol=1e-5, atol=1e-6)
    if sinks is not None:  # the sink takes its share: no query's weights sum to one
        assert float(expected_scores.sum()) < valid.sum().item() * c["query"].shape[1] - 1e-3


@pytest.mark.parametrize("window", [1, 2, 5])
def test_sliding_window_is_hfs_rule(window):
    """A query at index i sees key j iff HF's causal mask and sliding-window overlay both allow it."""
    batch = SlotBatch(
        rows=torch.tensor([0], dtype=torch.int32),
        cache_lens=torch.tensor([6], dtype=torch.int32),
        q_lens=torch.tensor([4], dtype=torch.int32),
        kv_len_bound=10,
    )
    mask = _attention_mask(batch, 4, window, 10)[0, 0]  # [T, L]
    overlay = masking_utils.sliding_window_overlay(window)
    for t in range(4):
        i = 6 + t
        for j in range(10):
            assert bool(mask[t, j]) == (j <= i and bool(overlay(0, 0, i, j))), (window, i, j)


# --- Triton kernel (interpreter) against the reference ------------------------------------------------------


def _compare_triton(c, scale, window, softcap, sinks, **kwargs):
    ref_cache = (c["k_cache"].clone(), c["v_cache"].clone())
    tri_cache = (c["k_cache"].clone(), c["v_cache"].clone())
    ref_scores = torch.zeros(c["k_cache"].shape[:3], dtype=torch.float32)
    tri_scores = ref_scores.clone()
    ref = slot_attention_reference(
        c["query"], c["key"], c["value"], *ref_cache, c["batch"](), scale, window, scores_out=ref_scores,
        softcap=softcap, sinks=sinks,
    )  # fmt: skip
    out = slot_attention_triton(
        c["query"], c["key"], c["value"], *tri_cache, c["batch"]("triton"), scale, window,
        scores_out=tri_scores, softcap=softcap, sinks=sinks, **kwargs,
    )  # fmt: skip
    valid = c["valid"]
    torch.testing.assert_close(out[valid], ref[valid], rtol=2e-5, atol=2e-5)
    assert torch.isfinite(out[valid]).all()
    torch.testing.assert_close(tri_scores, ref_scores, rtol=2e-5, atol=2e-5)
    assert torch.equal(tri_cache[0], ref_cache[0]) and torch.equal(tri_cache[1], ref_cache[1])


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_triton_matches_reference(variant):
    c = _case(dtype=torch.float32, seed=3)
    _compare_triton(c, *_args(c, variant))


@pytest.mark.parametrize("variant", ["softcap", "sinks", "softcap+window+sinks"])
@pytest.mark.parametrize("from_logits", [True, False])
def test_triton_split_k_and_score_paths(variant, from_logits):
    c = _case(dtype=torch.float32, cache_lens=(40, 3, 70), q_lens=(2, 1, 3), seed=5)
    _compare_triton(c, *_args(c, variant), num_splits=3, scores_from_logits=from_logits)


@pytest.mark.parametrize("head_dim", [80, 96, 8, 24])
def test_triton_head_dims_that_are_not_powers_of_two(head_dim):
    c = _case(dtype=torch.float32, head_dim=head_dim, cache_lens=(30, 4), q_lens=(2, 3), seed=head_dim)
    _compare_triton(c, head_dim**-0.5, None, None, None)
    _compare_triton(c, head_dim**-0.5, 4, 3.0, c["sinks"], num_splits=2)


def test_triton_deferred_scores_with_softcap_and_sinks():
    """lse_out + slot_attention_scores_triton (speculative verify) add what the torch recomputation adds."""
    c = _case(dtype=torch.float32, seed=7)
    scale, window, softcap, sinks = _args(c, "softcap+window+sinks")
    before = c["batch"]()
    lse = torch.empty(c["query"].shape[0], c["query"].shape[2], c["query"].shape[1])
    k_cache, v_cache = c["k_cache"].clone(), c["v_cache"].clone()
    slot_attention_triton(
        c["query"], c["key"], c["value"], k_cache, v_cache, c["batch"]("triton"), scale, window, lse_out=lse,
        softcap=softcap, sinks=sinks,
    )  # fmt: skip
    col_from = torch.tensor([1, 0, 0], dtype=torch.int32)
    col_to = torch.tensor([3, 1, 1], dtype=torch.int32)
    tri = torch.zeros(k_cache.shape[:3])
    ref = torch.zeros(k_cache.shape[:3])
    slot_attention_scores_triton(
        c["query"], lse, k_cache, before, scale, window, tri, col_from, col_to, softcap=softcap
    )
    slot_attention_scores(
        c["query"], None, k_cache, before, scale, window, ref, col_from, col_to, softcap=softcap, sinks=sinks
    )
    assert ref.abs().sum() > 0
    torch.testing.assert_close(tri, ref, rtol=2e-5, atol=2e-5)


def test_triton_rejects_bad_variant_arguments():
    c = _case(dtype=torch.float32)
    args = (c["query"], c["key"], c["value"], c["k_cache"], c["v_cache"], c["batch"]("triton"), 0.25)
    with pytest.raises(ValueError, match="softcap"):
        slot_attention_triton(*args, softcap=0.0)
    with pytest.raises(ValueError, match="sinks"):
        slot_attention_triton(*args, sinks=torch.zeros(3))


# --- dispatch and flash-attn ------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_dispatch_and_pending_scores_carry_softcap_and_sinks(backend):
    c = _case(dtype=torch.float32, seed=11)
    scale, window, softcap, sinks = _args(c, "softcap+window+sinks")
    direct = torch.zeros(c["k_cache"].shape[:3])
    expected = slot_attention_reference(
        c["query"], c["key"], c["value"], c["k_cache"].clone(), c["v_cache"].clone(), c["batch"](), scale,
        window, scores_out=direct, softcap=softcap, sinks=sinks,
    )  # fmt: skip
    k_cache, v_cache = c["k_cache"].clone(), c["v_cache"].clone()
    pending = PendingScores(torch.zeros(c["k_cache"].shape[:3]))
    out = slot_attention(
        c["query"], c["key"], c["value"], k_cache, v_cache, c["batch"](backend), scale, window,
        scores_out=pending, softcap=softcap, sinks=sinks,
    )  # fmt: skip
    valid = c["valid"]
    torch.testing.assert_close(out[valid], expected[valid], rtol=2e-5, atol=2e-5)
    everything = torch.tensor([0, 0, 0], dtype=torch.int32), torch.tensor([9, 9, 9], dtype=torch.int32)
    pending.commit(c["batch"]().cache_lens, *everything)
    torch.testing.assert_close(pending.buffer, direct, rtol=2e-5, atol=2e-5)


class _RecordingFlash:
    """Stands in for flash_attn: records the keyword arguments and answers with zeros."""

    def __init__(self):
        self.calls = []

    def flash_attn_with_kvcache(self, q, k_cache, v_cache, **kwargs):
        self.calls.append(kwargs)
        return torch.zeros_like(q)


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_flash_path_passes_softcap_only_when_set(monkeypatch, softcap):
    fake = _RecordingFlash()
    monkeypatch.setattr(fa, "flash_attn_module", lambda: fake)
    c = _case(dtype=torch.float32)
    fa.slot_attention_flash(
        c["query"],
        c["key"],
        c["value"],
        c["k_cache"],
        c["v_cache"],
        c["batch"](),
        0.25,
        None,
        softcap=softcap,
    )
    assert ("softcap" in fake.calls[0]) == (softcap is not None)
    if softcap is not None:
        assert fake.calls[0]["softcap"] == softcap


def test_flash_does_not_take_sinks(monkeypatch):
    monkeypatch.setattr(fa, "ALLOW_CPU", True)
    c = _case(dtype=torch.float32)
    args = (c["query"], c["key"], c["k_cache"], c["v_cache"], None, None)
    assert fa.flash_supported(*args)
    assert not fa.flash_supported(*args, sinks=c["sinks"])
