"""The flash-attn backend: argument mapping, fallbacks, and (on a GPU with flash-attn) the real kernel.

On CPU a fake ``flash_attn`` module, written from flash-attn's documented semantics of
``flash_attn_with_kvcache`` (in-place append at ``cache_seqlens``, ``cache_batch_idx``, bottom-right causal
mask, ``window_size``, GQA, zero output for a query that sees no key) and with the checks its C++ entry makes,
stands in for the package; :data:`effdecode.ops.flash_attention.ALLOW_CPU` lets CPU tensors through.
"""

from __future__ import annotations

import importlib.util
import sys
import types
import warnings

import pytest
import torch

import effdecode
from effdecode.ops import flash_attention
from effdecode.ops.attention import SlotBatch, slot_attention, slot_attention_reference
from effdecode.ops.backend import BACKEND_ENV, resolve_backend
from tiny_models import ragged_prompts, tiny_model

TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.5e-2, rtol=1.5e-2),
}


def fake_flash_attn_with_kvcache(
    q,
    k_cache,
    v_cache,
    k=None,
    v=None,
    rotary_cos=None,
    rotary_sin=None,
    cache_seqlens=None,
    cache_batch_idx=None,
    cache_leftpad=None,
    block_table=None,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    rotary_interleaved=True,
    alibi_slopes=None,
    num_splits=0,
    return_softmax_lse=False,
):
    """Pure-torch ``flash_attn_with_kvcache`` (flash-attn 2.x semantics, no paging / rotary / alibi)."""
    assert rotary_cos is None and rotary_sin is None and block_table is None and alibi_slopes is None
    assert cache_leftpad is None and softcap == 0.0 and not return_softmax_lse
    # What mha_fwd_kvcache checks.
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    assert q.dtype == k_cache.dtype == v_cache.dtype
    batch, seqlen_q, heads, head_dim = q.shape
    _, seqlen_cache, heads_k, _ = k_cache.shape
    assert v_cache.shape == k_cache.shape and heads % heads_k == 0 and head_dim <= 256
    assert k_cache.shape[-1] == head_dim
    if isinstance(cache_seqlens, int):
        cache_seqlens = torch.full((batch,), cache_seqlens, dtype=torch.int32)
    assert cache_seqlens.dtype == torch.int32 and cache_seqlens.is_contiguous()
    assert cache_seqlens.shape == (batch,)
    if cache_batch_idx is None:
        cache_batch_idx = torch.arange(batch, dtype=torch.int32)
    assert cache_batch_idx.dtype == torch.int32 and cache_batch_idx.is_contiguous()
    assert cache_batch_idx.shape == (batch,)
    new = 0
    if k is not None:
        assert v is not None and k.dtype == v.dtype == q.dtype
        assert k.stride(-1) == 1 and v.stride(-1) == 1
        new = k.shape[1]
        assert k.shape == (batch, new, heads_k, head_dim) and v.shape == k.shape
        assert seqlen_q <= seqlen_cache
        for b in range(batch):
            slot, start = int(cache_batch_idx[b]), int(cache_seqlens[b])
            assert start + new <= seqlen_cache
            k_cache[slot, start : start + new] = k[b]  # in place, through whatever view was passed
            v_cache[slot, start : start + new] = v[b]
    scale = softmax_scale if softmax_scale is not None else head_dim**-0.5
    left, right = window_size
    if causal:
        right = 0
    out = torch.zeros_like(q)
    group = heads // heads_k
    for b in range(batch):
        slot, length = int(cache_batch_idx[b]), int(cache_seqlens[b]) + new
        keys = k_cache[slot, :length].double().repeat_interleave(group, dim=1)  # [L, heads, D]
        values = v_cache[slot, :length].double().repeat_interleave(group, dim=1)
        logits = torch.einsum("thd,lhd->htl", q[b].double(), keys) * scale
        i = torch.arange(seqlen_q)[:, None] + length - seqlen_q  # bottom-right aligned
        j = torch.arange(length)[None, :]
        seen = torch.ones(seqlen_q, length, dtype=torch.bool)
        if right >= 0:
            seen &= j <= i + right
        if left >= 0:
            seen &= j >= i - left
        weights = torch.softmax(logits.masked_fill(~seen, float("-inf")), dim=-1)
        weights = torch.nan_to_num(weights, nan=0.0)  # a query that sees no key outputs zeros
        out[b] = torch.einsum("htl,lhd->thd", weights, values).to(q.dtype)
    return out


class FakeFlash(types.ModuleType):
    """A stand-in ``flash_attn`` package that records each call's arguments."""

    def __init__(self) -> None:
        super().__init__("flash_attn")
        self.calls: list[dict] = []

    def flash_attn_with_kvcache(self, q, k_cache, v_cache, **kwargs):
        self.calls.append(dict(q=q, k_cache=k_cache, v_cache=v_cache, **kwargs))
        return fake_flash_attn_with_kvcache(q, k_cache, v_cache, **kwargs)


@pytest.fixture
def fake_flash(monkeypatch):
    fake = FakeFlash()
    monkeypatch.setitem(sys.modules, "flash_attn", fake)
    monkeypatch.setattr(flash_attention, "ALLOW_CPU", True)
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    flash_attention.flash_attn_module.cache_clear()
    yield fake
    flash_attention.flash_attn_module.cache_clear()


def _problem(
    *,
    dtype: torch.dtype,
    kv_heads: int,
    group: int,
    num_cols: int,
    head_dim: int,
    cache_lens: list[int],
    q_lens: list[int],
    device: str = "cpu",
    extra_slots: int = 2,
):
    """Random caches over a shuffled strict subset of slots, queries in HF's layout, padding poisoned."""
    bsz = len(cache_lens)
    slots = bsz + extra_slots
    capacity = max(c + q for c, q in zip(cache_lens, q_lens, strict=True)) + 7
    rows = torch.randperm(slots)[:bsz].to(torch.int32)
    all_lens = torch.randint(0, capacity, (slots,), dtype=torch.int32)
    all_lens[rows.long()] = torch.tensor(cache_lens, dtype=torch.int32)
    q_lens_t = torch.tensor(q_lens, dtype=torch.int32)
    k_cache = torch.randn(slots, kv_heads, capacity, head_dim).to(dtype)
    v_cache = torch.randn(slots, kv_heads, capacity, head_dim).to(dtype)
    for slot, length in zip(rows.tolist(), cache_lens, strict=True):  # stale entries: large, so they show
        k_cache[slot, :, length:] *= 50
        v_cache[slot, :, length:] *= 50

    def states(heads: int) -> torch.Tensor:
        return torch.randn(bsz, num_cols, heads, head_dim).to(dtype).transpose(1, 2)

    query, key, value = states(kv_heads * group), states(kv_heads), states(kv_heads)
    valid = torch.arange(num_cols)[None, :] >= (num_cols - q_lens_t)[:, None]  # [B, T]
    key[~valid[:, None, :].expand_as(key[..., 0])] = float("nan")
    value[~valid[:, None, :].expand_as(value[..., 0])] = float("nan")
    query.transpose(1, 2)[~valid] = float("nan")

    def batch(backend: str) -> SlotBatch:
        return SlotBatch(
            rows=rows.to(device),
            cache_lens=all_lens.to(device),
            q_lens=q_lens_t.to(device),
            kv_len_bound=max(c + q for c, q in zip(cache_lens, q_lens, strict=True)),
            backend=backend,
            rows_are_leading_slots=rows.tolist() == list(range(bsz)),
            q_full=all(q == num_cols for q in q_lens),
        )

    tensors = [t.to(device) for t in (query, key, value, k_cache, v_cache)]
    return tensors, batch, valid.to(device), all_lens.to(device)


def _compare(out, ref_out, valid, dtype) -> None:
    got = out.float().masked_fill(~valid[:, :, None, None], float("nan"))
    want = ref_out.float().masked_fill(~valid[:, :, None, None], float("nan"))
    assert torch.isfinite(got[valid]).all()
    torch.testing.assert_close(got, want, equal_nan=True, **TOLERANCES[dtype])


CASES = [
    # decode (T = 1), GQA 7 (Qwen2.5-0.5B's 14/2), ragged cache lengths incl. an empty cache
    dict(
        dtype=torch.float32,
        kv_heads=2,
        group=7,
        num_cols=1,
        head_dim=16,
        cache_lens=[0, 1, 37],
        q_lens=[1] * 3,
    ),
    # uniform verify (T = 5, every row full): fused append
    dict(
        dtype=torch.float32,
        kv_heads=2,
        group=2,
        num_cols=5,
        head_dim=8,
        cache_lens=[3, 20, 0],
        q_lens=[5] * 3,
    ),
    # ragged verify / catch-up: a row with no new token at all
    dict(
        dtype=torch.float32,
        kv_heads=1,
        group=4,
        num_cols=5,
        head_dim=8,
        cache_lens=[1, 30, 9],
        q_lens=[5, 1, 0],
    ),
    # left-padded prefill: empty caches, ragged prompts
    dict(
        dtype=torch.float32,
        kv_heads=2,
        group=3,
        num_cols=9,
        head_dim=16,
        cache_lens=[0, 0, 0],
        q_lens=[9, 2, 5],
    ),
    # bf16, MHA
    dict(
        dtype=torch.bfloat16, kv_heads=3, group=1, num_cols=4, head_dim=16, cache_lens=[7, 2], q_lens=[4, 3]
    ),
]


@pytest.mark.parametrize("window", [None, 1, 4])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"T{c['num_cols']}-q{c['q_lens']}-{c['dtype']}")
def test_flash_path_matches_reference(fake_flash, fresh_seed, case, window):
    (query, key, value, k_cache, v_cache), batch, valid, all_lens = _problem(**case)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    ref_out = slot_attention_reference(query, key, value, ref_k, ref_v, batch("torch"), 0.3, window)

    flash_batch = batch("flash_attn")
    out = slot_attention(query, key, value, k_cache, v_cache, flash_batch, 0.3, window)

    assert len(fake_flash.calls) == 1, "the flash path did not run"
    call = fake_flash.calls[0]
    # Views of our buffers, not copies: the append must land in the slot cache.
    assert (
        call["k_cache"].data_ptr() == k_cache.data_ptr() and call["v_cache"].data_ptr() == v_cache.data_ptr()
    )
    slots, kv_heads, capacity, head_dim = k_cache.shape
    assert call["k_cache"].shape == (slots, capacity, kv_heads, head_dim)
    assert torch.equal(call["cache_batch_idx"], flash_batch.rows)
    assert call["causal"] is True and call["softmax_scale"] == 0.3
    assert call["window_size"] == ((-1, -1) if window is None else (window - 1, 0))
    starts = all_lens[flash_batch.rows.long()]
    if flash_batch.q_full:  # fused append at the rows' lengths
        assert call["k"] is not None and torch.equal(call["cache_seqlens"], starts)
    else:  # written beforehand; attention over old + new entries
        assert call.get("k") is None and torch.equal(call["cache_seqlens"], starts + flash_batch.q_lens)

    assert out.shape == ref_out.shape and out.dtype == query.dtype
    assert torch.equal(flash_batch.cache_lens, all_lens), "cache_lens was modified"
    assert torch.equal(k_cache, ref_k), "key cache differs from the reference's"
    assert torch.equal(v_cache, ref_v), "value cache differs from the reference's"
    _compare(out, ref_out, valid, case["dtype"])


@pytest.mark.parametrize("num_cols,capacity", [(6, 6), (6, 9), (3, 40)])
def test_ragged_write_plan_has_no_collisions(fresh_seed, num_cols, capacity):
    """Each row's T writes go to distinct indices (a GPU scatter with duplicates picks any writer)."""
    bsz = 16
    q_lens = torch.randint(0, num_cols + 1, (bsz,), dtype=torch.int32)
    starts = (torch.rand(bsz) * (capacity - q_lens + 1).float()).to(torch.int32)  # start + q_len <= capacity
    rows = torch.randperm(bsz + 3)[:bsz].to(torch.int32)
    cache_lens = torch.zeros(bsz + 3, dtype=torch.int32).index_put_((rows.long(),), starts)
    batch = SlotBatch(rows, cache_lens, q_lens, kv_len_bound=capacity)
    index, valid = flash_attention._ragged_write_plan(batch, num_cols, capacity)
    cols = torch.arange(num_cols)
    assert torch.equal(valid, cols[None, :] >= (num_cols - q_lens)[:, None])
    assert ((index >= 0) & (index < capacity)).all()
    for b in range(bsz):
        assert index[b].unique().numel() == num_cols
        start, q_len = int(starts[b]), int(q_lens[b])
        assert index[b][valid[b]].tolist() == list(range(start, start + q_len))
        assert not ((index[b][~valid[b]] >= start) & (index[b][~valid[b]] < start + q_len)).any()


def test_scores_out_falls_back(fake_flash, fresh_seed):
    (query, key, value, k_cache, v_cache), batch, valid, _ = _problem(**CASES[0])
    slots, kv_heads, capacity, _ = k_cache.shape
    ref_scores = torch.rand(slots, kv_heads, capacity)
    scores = ref_scores.clone()
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    ref_out = slot_attention_reference(
        query, key, value, ref_k, ref_v, batch("torch"), 0.25, scores_out=ref_scores
    )
    out = slot_attention(query, key, value, k_cache, v_cache, batch("flash_attn"), 0.25, scores_out=scores)
    assert not fake_flash.calls
    _compare(out, ref_out, valid, torch.float32)
    torch.testing.assert_close(scores, ref_scores)
    assert torch.equal(k_cache, ref_k)


@pytest.mark.parametrize("why", ["cpu", "head_dim", "cache_dtype", "not_installed"])
def test_unsupported_calls_fall_back(fake_flash, monkeypatch, fresh_seed, why):
    case = dict(CASES[1])
    if why == "head_dim":
        case["head_dim"] = 12  # flash-attn would pad (copy) the whole cache
    (query, key, value, k_cache, v_cache), batch, valid, _ = _problem(**case)
    if why == "cpu":
        monkeypatch.setattr(flash_attention, "ALLOW_CPU", False)
    if why == "cache_dtype":
        k_cache, v_cache = k_cache.double(), v_cache.double()
    if why == "not_installed":
        monkeypatch.setitem(sys.modules, "flash_attn", None)  # import raises ImportError
        flash_attention.flash_attn_module.cache_clear()
        flash_attention._warn_missing.cache_clear()
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    ref_out = slot_attention_reference(
        query, key.to(k_cache.dtype), value.to(k_cache.dtype), ref_k, ref_v, batch("torch"), 0.3
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = slot_attention(query, key, value, k_cache, v_cache, batch("flash_attn"), 0.3)
    assert not fake_flash.calls
    assert any("flash-attn is not importable" in str(w.message) for w in caught) == (why == "not_installed")
    assert torch.equal(k_cache, ref_k)
    _compare(out, ref_out, valid, torch.float32)


def test_backend_name_and_environment(fake_flash, monkeypatch, fresh_seed):
    assert effdecode.DecodeConfig(attn_backend="flash_attn").attn_backend == "flash_attn"
    cpu = torch.device("cpu")
    # Ops without a flash-attn path resolve "flash_attn" as "auto".
    for has_cuda_op in (False, True):
        assert resolve_backend(
            "flash_attn", cpu, has_cuda_op=has_cuda_op, has_triton_op=True
        ) == resolve_backend("auto", cpu, has_cuda_op=has_cuda_op, has_triton_op=True)
    # The environment variable routes attention to flash-attn whatever the config asks.
    monkeypatch.setenv(BACKEND_ENV, "flash_attn")
    (query, key, value, k_cache, v_cache), batch, _, _ = _problem(**CASES[0])
    slot_attention(query, key, value, k_cache, v_cache, batch("torch"), 0.3)
    assert len(fake_flash.calls) == 1
    # EFFDECODE_BACKEND=cuda for an op without a CUDA kernel takes the next one (used to recurse forever).
    monkeypatch.setenv(BACKEND_ENV, "cuda")
    assert resolve_backend("auto", cpu, has_cuda_op=False, has_triton_op=False) == "torch"


@pytest.mark.parametrize("speculative,graphs", [(False, False), (True, False), (False, True)])
def test_generate_through_flash_matches_torch(fake_flash, speculative, graphs):
    """Prefill (ragged), decode and (with n-gram drafts) ragged verify all go through the fake kernel.

    ``graphs``: decode steps run the CUDA-graph step (emulated eagerly on CPU): static row buffers whose
    padding rows take unused slots with ``q_len`` 0, ``kv_len_bound`` = capacity. Such a step is not
    ``q_full``, so flash-attn attends after a ragged write (its fused append would write the padding rows).
    """
    model = tiny_model("qwen2", torch.float32, seed=3)
    input_ids, mask = ragged_prompts(3, max_len=9, seed=3)
    kwargs = dict(attention_mask=mask, max_new_tokens=10, do_sample=False)
    if speculative:
        kwargs["prompt_lookup_num_tokens"] = 3
    expected = effdecode.generate(
        model, input_ids, decode_config=effdecode.DecodeConfig(attn_backend="torch"), **kwargs
    )
    assert not fake_flash.calls
    actual = effdecode.generate(
        model,
        input_ids,
        decode_config=effdecode.DecodeConfig(attn_backend="flash_attn", cuda_graphs=graphs),
        **kwargs,
    )
    assert torch.equal(actual, expected)
    layers = model.config.num_hidden_layers
    assert len(fake_flash.calls) >= layers * 10
    assert any(call.get("k") is None for call in fake_flash.calls), "no ragged call (the prefill is ragged)"
    if not speculative and not graphs:
        assert any(call.get("k") is not None for call in fake_flash.calls), "no fused-append decode call"
    if graphs:  # 3 rows run in the 4-row bucket, through the ragged path
        captured = [call for call in fake_flash.calls if call["q"].shape[0] == 4]
        assert captured, "no captured-step call"
        assert all(call.get("k") is None for call in captured), "a captured step appended padding rows"


_REAL_FLASH = torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


@pytest.mark.gpu
@pytest.mark.skipif(not _REAL_FLASH, reason="needs a CUDA device and flash-attn")
@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize(
    "case",
    CASES + [dict(CASES[0], head_dim=128, cache_lens=[4000, 1, 777])],
    ids=lambda c: f"T{c['num_cols']}-q{c['q_lens']}-d{c['head_dim']}",
)
def test_real_flash_attn_matches_reference(monkeypatch, fresh_seed, case, window):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    flash_attention.flash_attn_module.cache_clear()
    assert flash_attention.flash_attn_module() is not None, "flash_attn is installed but does not import"
    case = dict(case, dtype=torch.bfloat16 if case["dtype"] == torch.float32 else case["dtype"])
    (query, key, value, k_cache, v_cache), batch, valid, all_lens = _problem(**case, device="cuda")
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    ref_out = slot_attention_reference(query, key, value, ref_k, ref_v, batch("torch"), 0.3, window)
    flash_batch = batch("flash_attn")
    assert flash_attention.flash_supported(query, key, k_cache, v_cache, window, None)
    out = slot_attention(query, key, value, k_cache, v_cache, flash_batch, 0.3, window)
    assert torch.equal(flash_batch.cache_lens, all_lens)
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)
    _compare(out, ref_out, valid, case["dtype"])
