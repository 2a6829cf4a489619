"""Kernels at production shapes on a GPU: bf16/fp16, head_dim 64-256, GQA 1-7, contexts to 32k, vocab 152k.

Every test here is marked ``gpu`` and skipped without CUDA: these shapes would take hours in Triton's CPU
interpreter, and on the CPU the interpreter upcasts bf16 products, so the bf16 tensor-core P.V product of the
attention kernel is only exercised here. The same checks as the CPU tests, reused from their modules, with
references computed on the GPU (in float32 where the kernel computes in bf16/fp16). Tolerances:
``tests/tolerances.py``.

Offsets past 2^31 elements: every kernel computes row/slot/layer offsets in int64 (``.to(tl.int64)`` on the
index before it meets a stride); ``test_offsets_beyond_2_31_elements_*`` put the rows they use past that
mark.
"""

from __future__ import annotations

import pytest
import torch
from test_attention_scores import check_case as check_scores_case
from test_compaction import _check_result, _clone_state, _per_layer_setup, _setup
from test_sample_kernel import MIXED_ROWS, assert_same_tokens, boundary_exponentials, row_params
from test_triton_slot_attention import check_case as check_attention_case

from effdecode.ops.attention import SlotBatch, slot_attention_reference
from tolerances import REL_ERR

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="production shapes run on a GPU only (hours in the CPU interpreter); the same checks run on "
        "the CPU at small shapes in the kernel test modules",
    ),
]
CUDA = torch.device("cuda")
CONTEXTS = [1, 100, 4096, 32768]  # keys each row attends to, one row per context in one batch
PRECISE = torch.float32  # the reference's dtype for bf16/fp16 kernels


# ---------------------------------------------------------------------------------------------- attention


@pytest.mark.parametrize("group", [1, 4, 6, 7])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_attention_production(fresh_seed, dtype, head_dim, group):
    """Decode (q_len 1) over contexts 1, 100, 4k and 32k in one batch; the default plan splits the keys."""
    check_attention_case(
        device=CUDA,
        dtype=dtype,
        kv_heads=2,
        group=group,
        num_cols=1,
        head_dim=head_dim,
        cache_lens=[c - 1 for c in CONTEXTS],
        q_lens=[1] * len(CONTEXTS),
        ref_dtype=PRECISE,
    )


@pytest.mark.parametrize("num_splits", [None, 7, 64])
@pytest.mark.parametrize("group", [6, 7])
def test_verify_attention_q_len_5(fresh_seed, group, num_splits):
    """Speculative verify at q_len 5 with ragged drafts over long contexts, default and forced split-K."""
    check_attention_case(
        device=CUDA,
        dtype=torch.bfloat16,
        kv_heads=4,
        group=group,
        num_cols=5,
        head_dim=128,
        cache_lens=[0, 99, 4091, 32763],
        q_lens=[5, 3, 1, 5],
        num_splits=num_splits,
        ref_dtype=PRECISE,
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cache_lens", [[0, 0], [1000, 0]], ids=["prefill", "chunked"])
def test_prefill_512(fresh_seed, dtype, cache_lens):
    """Prefill of 512 columns (one row left-padded), from empty caches and after a 1000-entry chunk."""
    check_attention_case(
        device=CUDA,
        dtype=dtype,
        kv_heads=4,
        group=7,
        num_cols=512,
        head_dim=128,
        cache_lens=cache_lens,
        q_lens=[512, 300],
        ref_dtype=PRECISE,
    )


@pytest.mark.parametrize("window", [128, 4096])
def test_sliding_window_long_context(fresh_seed, window):
    check_attention_case(
        device=CUDA,
        dtype=torch.bfloat16,
        kv_heads=2,
        group=6,
        num_cols=5,
        head_dim=128,
        cache_lens=[32763, 5000],
        q_lens=[5, 2],
        sliding_window=window,
        ref_dtype=PRECISE,
    )


@pytest.mark.parametrize("from_logits", [True, False], ids=["logits", "recompute"])
@pytest.mark.parametrize("num_cols,q_lens", [(1, [1, 1, 1]), (5, [5, 2, 4])])
def test_scores_production(fresh_seed, from_logits, num_cols, q_lens):
    """Score emission (eviction policies) in bf16 at head_dim 128, GQA 7, over 4k and 32k contexts."""
    check_scores_case(
        device=CUDA,
        dtype=torch.bfloat16,
        kv_heads=2,
        group=7,
        num_cols=num_cols,
        head_dim=128,
        cache_lens=[4000, 32000, 0],
        q_lens=q_lens,
        from_logits=from_logits,
    )


# ------------------------------------------------------------------------------------------------ sampler


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sampler_vocab_152k(fresh_seed, dtype):
    """Every filter combination over Qwen's 151,936 tokens, 8 rows per rule; boundary draws pin thresholds."""
    rows = MIXED_ROWS * 8
    logits = (torch.randn(len(rows), 151_936) * 3).to(dtype)
    params = row_params(rows)
    assert_same_tokens(logits, params, torch.empty(logits.shape).exponential_(), device=CUDA)
    assert_same_tokens(logits, params, boundary_exponentials(logits.float(), params), device=CUDA)


# --------------------------------------------------------------------------------------------- compaction


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_compaction_28_layers(fresh_seed, dtype):
    """A Qwen2.5-7B-like cache: 28 layers, 4 KV heads, head_dim 128, 2k entries, 12 of 16 slots compacted."""
    cache, rows, keep_index, keep_lens = _setup(28, 16, 4, 2048, 128, dtype, num_rows=12, device=CUDA)
    before = _clone_state(cache)
    from effdecode.ops.compaction import compact_kv

    compact_kv(cache.key_buffer, cache.value_buffer, cache.cache_lens, rows, keep_index, keep_lens)
    _check_result(
        before, [cache.key_buffer, cache.value_buffer, cache.cache_lens], rows, keep_index, keep_lens
    )


def test_compaction_per_layer_selection_28_layers(fresh_seed):
    from effdecode.kernels.compaction import compact_kv_triton
    from effdecode.ops.compaction import compact_kv_reference

    cache, rows, keep_index, keep_lens = _per_layer_setup(
        28, 6, 4, 512, 128, torch.bfloat16, num_rows=4, device=CUDA
    )
    reference = _clone_state(cache)
    compact_kv_reference(*reference, rows, keep_index, keep_lens)
    compact_kv_triton(cache.key_buffer, cache.value_buffer, cache.cache_lens, rows, keep_index, keep_lens)
    for got, want in zip((cache.key_buffer, cache.value_buffer), reference[:2], strict=True):
        for r, slot in enumerate(rows.tolist()):
            count = int(keep_lens[r])
            assert torch.equal(got[:, slot, :, :count], want[:, slot, :, :count])
    assert torch.equal(cache.cache_lens, reference[2])


# --------------------------------------------------------------------------------- offsets past 2^31


def _free_gib() -> float:
    return torch.cuda.mem_get_info()[0] / 2**30


def test_offsets_beyond_2_31_elements_attention(fresh_seed):
    """A bf16 cache of 2.3e9 elements per buffer; the rows attended live past element 2^31."""
    if _free_gib() < 24:
        pytest.skip("needs 24 GiB of free GPU memory")
    slots, kv_heads, capacity, head_dim, group = 35, 8, 65536, 128, 4
    assert slots * kv_heads * capacity * head_dim > 2**31
    k_cache = torch.empty(slots, kv_heads, capacity, head_dim, device=CUDA, dtype=torch.bfloat16)
    v_cache = torch.empty_like(k_cache)
    rows = torch.tensor([34, 0, 33], dtype=torch.int32, device=CUDA)
    lens = [3000, 70, 40000]
    cache_lens = torch.zeros(slots, dtype=torch.int32, device=CUDA)
    cache_lens[rows.long()] = torch.tensor(lens, dtype=torch.int32, device=CUDA)
    for slot in rows.tolist():
        k_cache[slot].normal_()
        v_cache[slot].normal_()
    q_lens = torch.tensor([5, 5, 2], dtype=torch.int32, device=CUDA)
    query = torch.randn(3, 5, kv_heads * group, head_dim, device=CUDA, dtype=torch.bfloat16).transpose(1, 2)
    key = torch.randn(3, 5, kv_heads, head_dim, device=CUDA, dtype=torch.bfloat16).transpose(1, 2)
    value = torch.randn_like(key)
    bound = max(lens) + 5
    # Reference: the three rows' slots copied into a small cache (offsets far below 2^31), in float32.
    small_k = k_cache[rows.long(), :, :bound].float()
    small_v = v_cache[rows.long(), :, :bound].float()
    small = SlotBatch(
        torch.arange(3, dtype=torch.int32, device=CUDA), cache_lens[rows.long()], q_lens, kv_len_bound=bound
    )
    want = slot_attention_reference(
        query.float(), key.float(), value.float(), small_k, small_v, small, head_dim**-0.5
    )
    from effdecode.kernels.slot_attention import slot_attention_triton

    batch = SlotBatch(rows, cache_lens, q_lens, kv_len_bound=bound, backend="triton")
    got = slot_attention_triton(query, key, value, k_cache, v_cache, batch, head_dim**-0.5)
    valid = torch.arange(5, device=CUDA)[None, :] >= (5 - q_lens)[:, None]
    error = (got.float()[valid] - want[valid]).norm() / want[valid].norm()
    assert error <= REL_ERR[torch.bfloat16], float(error)
    # The new entries landed in the far slots, where the reference put them.
    for i, slot in enumerate(rows.tolist()):
        end = lens[i] + int(q_lens[i])
        assert torch.equal(k_cache[slot, :, lens[i] : end].float(), small_k[i, :, lens[i] : end])
        assert torch.equal(v_cache[slot, :, lens[i] : end].float(), small_v[i, :, lens[i] : end])


def test_offsets_beyond_2_31_elements_compaction(fresh_seed):
    """28 layers x 5 slots x 8 heads x 16k x 128 (2.3e9 elements per buffer); the last slots compacted."""
    if _free_gib() < 24:
        pytest.skip("needs 24 GiB of free GPU memory")
    from effdecode.kernels.compaction import compact_kv_triton

    layers, slots, kv_heads, capacity, head_dim = 28, 5, 8, 16384, 128
    assert layers * slots * kv_heads * capacity * head_dim > 2**31
    shape = (layers, slots, kv_heads, capacity, head_dim)
    keys = torch.empty(shape, device=CUDA, dtype=torch.bfloat16)
    values = torch.empty_like(keys)
    rows = torch.tensor([4, 3], dtype=torch.int32, device=CUDA)
    keys[:, 3:].normal_()
    values[:, 3:].normal_()
    cache_lens = torch.full((slots,), capacity, dtype=torch.int32, device=CUDA)
    keep = 4000
    keep_index = torch.rand(2, kv_heads, capacity, device=CUDA).topk(keep, dim=-1).indices.sort().values
    keep_index = keep_index.to(torch.int32)
    keep_lens = torch.full((2,), keep, dtype=torch.int32, device=CUDA)
    old_k, old_v = keys[:, 3:].clone(), values[:, 3:].clone()
    compact_kv_triton(keys, values, cache_lens, rows, keep_index, keep_lens)
    for r, slot in enumerate(rows.tolist()):
        src = keep_index[r].long()[None, :, :, None].expand(layers, kv_heads, keep, head_dim)
        assert torch.equal(keys[:, slot, :, :keep], old_k[:, slot - 3].gather(2, src))
        assert torch.equal(values[:, slot, :, :keep], old_v[:, slot - 3].gather(2, src))
    assert cache_lens.tolist() == [capacity] * 3 + [keep] * 2


def test_offsets_beyond_2_31_elements_sampler_and_verify(fresh_seed):
    """Logits of 2.2e9 elements: the last rows' tokens are those of the same rows sampled on their own."""
    if _free_gib() < 24:
        pytest.skip("needs 24 GiB of free GPU memory")
    from effdecode.kernels.sampling import sample_tokens_triton
    from effdecode.ops.verify import verify_greedy, verify_greedy_reference

    vocab = 151_936
    rows = 2**31 // vocab + 4
    logits = torch.randn(rows, vocab, device=CUDA)
    params = [p.to(CUDA) for p in row_params([(1.0, 50, 0.9, 0.0)] * rows)]
    seeds = torch.arange(rows, device=CUDA, dtype=torch.int64)
    offsets = torch.zeros(rows, device=CUDA, dtype=torch.int64)
    tokens = sample_tokens_triton(logits, *params, seeds, offsets)
    tail = slice(rows - 8, rows)
    alone = sample_tokens_triton(
        logits[tail].contiguous(), *(p[tail] for p in params), seeds[tail], offsets[tail]
    )
    assert torch.equal(tokens[tail], alone)
    del logits, tokens

    # Greedy verify over [B, 5, V] bf16 logits past 2^31 elements, every backend.
    batch = 2**31 // (5 * vocab) + 4
    logits = torch.randn(batch, 5, vocab, device=CUDA, dtype=torch.bfloat16)
    input_ids = torch.randint(0, vocab, (batch, 5), device=CUDA)
    input_ids[-4:, 1:] = logits[-4:, :-1].argmax(-1)  # the last rows accept their drafts
    q_lens = torch.full((batch,), 5, dtype=torch.int32, device=CUDA)
    finished = torch.zeros(batch, dtype=torch.bool, device=CUDA)
    eos = torch.tensor([-5], device=CUDA)
    tail = slice(batch - 8, batch)
    want = verify_greedy_reference(logits[tail], input_ids[tail], q_lens[tail], finished[tail], eos)
    assert want[0][-4:].tolist() == [5] * 4
    from effdecode.ops.backend import cuda_extension

    for backend in ("triton", "cuda") if cuda_extension() is not None else ("triton",):
        got = verify_greedy(logits, input_ids, q_lens, finished, eos, backend=backend)
        for g, w in zip(got, want, strict=True):
            assert torch.equal(g[tail], w), backend


# ------------------------------------------------------------------- end to end: graphs vs eager, 28 layers


def test_graphs_match_eager_28_layer_bf16():
    """A 28-layer bf16 random model (GQA 6, head_dim 128): CUDA-graph decode gives eager's tokens.

    Same arithmetic on both paths, so tokens must be identical: 8 rows (a bucket: no padding row changes a
    matmul's shape), no EOS (no row leaves), and a capacity of at most 256 keys, where eager's tight
    ``kv_len_bound`` and the graphs' capacity bound give the same split-K plan (one split). On this model
    bf16 and fp32 pick different tokens in ~6% of positions, so any arithmetic difference would show.
    """
    import effdecode
    from effdecode import DecodeConfig
    from effdecode.generation.graphs import graphs_of
    from tiny_models import ragged_prompts, tiny_model

    model = tiny_model(
        "qwen3",
        torch.float32,
        seed=1,
        num_hidden_layers=28,
        hidden_size=256,
        intermediate_size=512,
        num_attention_heads=12,
        num_key_value_heads=2,
        head_dim=128,
    )
    model = model.to(CUDA, torch.bfloat16)
    ids, mask = ragged_prompts(8, 48, seed=5, min_len=48)
    ids, mask = ids.to(CUDA), mask.to(CUDA)

    def run(graphs: bool) -> torch.Tensor:
        return effdecode.generate(
            model,
            ids,
            attention_mask=mask,
            max_new_tokens=64,
            do_sample=False,
            decode_config=DecodeConfig(cuda_graphs=graphs),
        )

    eager = run(False)
    replayed = run(True)
    runner = graphs_of(model)
    assert runner.broken is None, runner.broken
    assert any(step.graph is not None for step in runner.steps.values())
    mismatch = (eager != replayed).any(dim=0).nonzero()
    assert torch.equal(eager, replayed), f"first differing column {mismatch[:1].tolist()}"
