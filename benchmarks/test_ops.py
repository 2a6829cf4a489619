"""Microbenchmarks, one per op: torch reference vs our Triton / CUDA kernels vs the best peers installed.

Run on a GPU: ``pytest benchmarks/test_ops.py --benchmark-enable --benchmark-group-by=group
--benchmark-json benchmarks/results/<device>-<date>.json``. Every entry records achieved GB/s and, on a known
GPU, the share of HBM peak in ``extra_info``. On a CPU-only machine the shapes shrink and the run is a dry run
of the harness (Triton through its interpreter): those timings mean nothing.

Before timing, every entry checks the op's output against its torch reference on the same inputs (exact for
tokens, indices and moved cache entries; a relative-error bound for attention), so a fast wrong kernel fails
here rather than posting a figure. Peers are checked where their output means the same (flash-attn's
attention); FlashInfer's chain sampler draws its own random numbers and is timed only.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from device_info import bandwidth_report

from effdecode.ops.attention import SlotBatch, slot_attention_reference
from effdecode.ops.backend import cuda_extension
from effdecode.ops.verify import verify_greedy, verify_greedy_reference

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
HALF = torch.bfloat16 if ON_GPU else torch.float32


# ||out - ref|| / ||ref|| bound for attention outputs: bf16 operands on the GPU, float32 on the CPU.
ATTENTION_REL_ERR = 1e-2 if ON_GPU else 1e-5


def _assert_rel_close(got: torch.Tensor, want: torch.Tensor, bound: float, what: str) -> None:
    got, want = got.float(), want.float()
    assert torch.isfinite(got).all(), f"{what}: non-finite output"
    error = float((got - want).norm() / want.norm().clamp_min(1e-30))
    assert error <= bound, f"{what}: relative error {error:.2e} > {bound:.0e} against the torch reference"


def _assert_equal(got, want, what: str) -> None:
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w), f"{what}: differs from the torch reference"


def _sync() -> None:
    if ON_GPU:
        torch.cuda.synchronize()


def _run(benchmark, fn, bytes_moved: int, **info) -> None:
    def call():
        fn()
        _sync()

    benchmark.pedantic(call, rounds=20 if ON_GPU else 1, warmup_rounds=3 if ON_GPU else 0, iterations=1)
    benchmark.extra_info.update(info)
    if benchmark.stats is not None:
        benchmark.extra_info.update(bandwidth_report(bytes_moved, benchmark.stats.stats.median))


# ---------------------------------------------------------------------------------------------- attention
# Decode at batch 64, 4k context, Qwen2.5-7B heads (28 query, 4 KV, dim 128) on a GPU; tiny on CPU.
ATTN = (
    dict(batch=64, context=4096, q_heads=28, kv_heads=4, head_dim=128)
    if ON_GPU
    else dict(batch=2, context=64, q_heads=4, kv_heads=2, head_dim=32)
)


@pytest.fixture(scope="module")
def decode_problem():
    b, ctx, hq, hkv, d = (ATTN[k] for k in ("batch", "context", "q_heads", "kv_heads", "head_dim"))
    torch.manual_seed(0)
    k_cache = torch.randn(b, hkv, ctx + 16, d, device=DEVICE, dtype=HALF)
    v_cache = torch.randn_like(k_cache)
    query = torch.randn(b, hq, 1, d, device=DEVICE, dtype=HALF)
    key = torch.randn(b, hkv, 1, d, device=DEVICE, dtype=HALF)
    value = torch.randn_like(key)
    cache_lens = torch.full((b,), ctx - 1, dtype=torch.int32, device=DEVICE)
    rows = torch.arange(b, dtype=torch.int32, device=DEVICE)
    q_lens = torch.ones(b, dtype=torch.int32, device=DEVICE)
    kv_bytes = 2 * b * hkv * ctx * d * k_cache.element_size()
    return dict(
        query=query,
        key=key,
        value=value,
        k_cache=k_cache,
        v_cache=v_cache,
        rows=rows,
        cache_lens=cache_lens,
        q_lens=q_lens,
        kv_bytes=kv_bytes,
        scale=d**-0.5,
        context=ctx,
    )


def _batch(p, **flags) -> SlotBatch:
    return SlotBatch(p["rows"], p["cache_lens"], p["q_lens"], kv_len_bound=p["context"], **flags)


@pytest.mark.benchmark(group="attention-decode")
@pytest.mark.parametrize("impl", ["torch", "triton", "triton+scores", "flash_attn"])
def test_decode_attention(benchmark, decode_problem, impl):
    """Decode attention; "triton+scores" also emits per-key attention mass (target: <= 1.15x flash-attn)."""
    p = decode_problem
    args = (p["query"], p["key"], p["value"], p["k_cache"], p["v_cache"])
    if impl == "torch":
        fn = lambda: slot_attention_reference(*args, _batch(p), p["scale"])  # noqa: E731
    elif impl.startswith("triton"):
        from effdecode.kernels.slot_attention import slot_attention_triton

        scores = None
        if impl == "triton+scores":
            slots, kv_heads, capacity = p["k_cache"].shape[:3]
            scores = torch.zeros(slots, kv_heads, capacity, device=DEVICE, dtype=torch.float32)
        fn = lambda: slot_attention_triton(*args, _batch(p), p["scale"], None, scores)  # noqa: E731
    else:
        if not ON_GPU or importlib.util.find_spec("flash_attn") is None:
            pytest.skip("flash-attn is not installed (or no GPU)")
        from flash_attn import flash_attn_with_kvcache

        k_flash = p["k_cache"].transpose(1, 2).contiguous()  # flash-attn wants [batch, seq, heads, dim]
        v_flash = p["v_cache"].transpose(1, 2).contiguous()
        q_flash = p["query"].transpose(1, 2).contiguous()
        k_new, v_new = p["key"].transpose(1, 2).contiguous(), p["value"].transpose(1, 2).contiguous()
        fn = lambda: flash_attn_with_kvcache(  # noqa: E731
            q_flash, k_flash, v_flash, k_new, v_new, cache_seqlens=p["cache_lens"], causal=True
        )
    _check_decode_attention(p, impl, fn)
    _run(benchmark, fn, p["kv_bytes"], impl=impl, **ATTN)


def _check_decode_attention(p, impl: str, fn) -> None:
    """One call of ``fn`` (on cache copies) against the reference; with scores, the scores too."""
    ref_k, ref_v = p["k_cache"].clone(), p["v_cache"].clone()
    slots, kv_heads, capacity = ref_k.shape[:3]
    ref_scores = torch.zeros(slots, kv_heads, capacity, device=DEVICE)
    args = (p["query"], p["key"], p["value"])
    want = slot_attention_reference(*args, ref_k, ref_v, _batch(p), p["scale"], None, ref_scores)
    if impl == "torch":
        return
    if impl == "flash_attn":
        got = fn()  # its own cache copies, [b, 1, q_heads, d] like ours
        _assert_rel_close(got, want, ATTENTION_REL_ERR, impl)
        return
    from effdecode.kernels.slot_attention import slot_attention_triton

    k, v = p["k_cache"].clone(), p["v_cache"].clone()
    scores = torch.zeros_like(ref_scores) if impl == "triton+scores" else None
    got = slot_attention_triton(*args, k, v, _batch(p), p["scale"], None, scores)
    _assert_rel_close(got, want, ATTENTION_REL_ERR, impl)
    assert torch.equal(k, ref_k) and torch.equal(v, ref_v), f"{impl}: cache append differs"
    if scores is not None:
        _assert_rel_close(scores, ref_scores, ATTENTION_REL_ERR, f"{impl} scores")


# ------------------------------------------------------------------------------------------------- verify
VERIFY = dict(batch=64, draft=5, vocab=151_936) if ON_GPU else dict(batch=4, draft=3, vocab=1000)


@pytest.fixture(scope="module")
def verify_problem():
    b, k, v = VERIFY["batch"], VERIFY["draft"], VERIFY["vocab"]
    torch.manual_seed(0)
    logits = torch.randn(b, k + 1, v, device=DEVICE, dtype=HALF)
    input_ids = logits.argmax(-1).roll(1, dims=1)  # drafts mostly accepted: the worst case reads all logits
    q_lens = torch.full((b,), k + 1, dtype=torch.int32, device=DEVICE)
    finished = torch.zeros(b, dtype=torch.bool, device=DEVICE)
    eos = torch.tensor([2], device=DEVICE)
    return dict(
        logits=logits,
        input_ids=input_ids,
        q_lens=q_lens,
        finished=finished,
        eos=eos,
        logit_bytes=logits.numel() * logits.element_size(),
    )


@pytest.mark.benchmark(group="verify-greedy")
@pytest.mark.parametrize("impl", ["torch", "cuda", "flashinfer"])
def test_verify_greedy(benchmark, verify_problem, impl):
    p = verify_problem
    args = (p["logits"], p["input_ids"], p["q_lens"], p["finished"], p["eos"])
    if impl in ("torch", "cuda"):
        if impl == "cuda" and (not ON_GPU or cuda_extension() is None):
            pytest.skip("needs a GPU and the built effdecode._C")
        fn = lambda: verify_greedy(*args, backend=impl)  # noqa: E731
        _assert_equal(fn(), verify_greedy_reference(*args), f"verify_greedy[{impl}]")
    else:
        if not ON_GPU or importlib.util.find_spec("flashinfer") is None:
            pytest.skip("FlashInfer is not installed (or no GPU)")
        from flashinfer.sampling import chain_speculative_sampling

        b, k, v = VERIFY["batch"], VERIFY["draft"], VERIFY["vocab"]
        target = torch.softmax(p["logits"].float(), -1)
        draft_probs = torch.zeros(b, k, v, device=DEVICE)
        draft_ids = p["input_ids"][:, 1:].contiguous()
        draft_probs.scatter_(2, draft_ids[..., None], 1.0)
        fn = lambda: chain_speculative_sampling(draft_probs, draft_ids, target)  # noqa: E731
    _run(benchmark, fn, p["logit_bytes"], impl=impl, **VERIFY)


# --------------------------------------------------------------------------------------------- compaction
# Keep 1024 of 4096 entries (a 25% budget) per (row, kv head) of a 28-layer, 4-KV-head cache, 16 rows.
COMPACT = (
    dict(layers=28, rows=16, kv_heads=4, context=4096, keep=1024, head_dim=128)
    if ON_GPU
    else dict(layers=2, rows=2, kv_heads=2, context=64, keep=16, head_dim=16)
)


@pytest.mark.benchmark(group="kv-compaction")
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_kv_compaction(benchmark, impl):
    from effdecode.ops.compaction import compact_kv

    c = COMPACT
    shape = (c["layers"], c["rows"], c["kv_heads"], c["context"], c["head_dim"])
    keys = torch.randn(shape, device=DEVICE, dtype=HALF)
    values = torch.randn_like(keys)
    rows = torch.arange(c["rows"], dtype=torch.int32, device=DEVICE)
    scores = torch.rand(c["rows"], c["kv_heads"], c["context"], device=DEVICE)
    keep_index = scores.topk(c["keep"], dim=-1).indices.sort(dim=-1).values.to(torch.int32)
    keep_lens = torch.full((c["rows"],), c["keep"], dtype=torch.int32, device=DEVICE)
    cache_lens = torch.full((c["rows"],), c["context"], dtype=torch.int32, device=DEVICE)

    def compact():
        cache_lens.fill_(c["context"])  # each call compacts from the full cache again
        compact_kv(keys, values, cache_lens, rows, keep_index, keep_lens, backend=impl)

    # Correctness first: one compaction against gathering the kept entries.
    src = keep_index.long()[None, :, :, :, None].expand(c["layers"], -1, -1, -1, c["head_dim"])
    want_k, want_v = keys.gather(3, src), values.gather(3, src)
    compact()
    assert torch.equal(keys[:, :, :, : c["keep"]], want_k), f"compaction[{impl}]: keys"
    assert torch.equal(values[:, :, :, : c["keep"]], want_v), f"compaction[{impl}]: values"
    assert torch.equal(cache_lens, keep_lens), f"compaction[{impl}]: lengths"

    # Read + write of every kept entry, keys and values, all layers (the index reads are noise).
    moved = 2 * 2 * c["layers"] * c["rows"] * c["kv_heads"] * c["keep"] * c["head_dim"] * keys.element_size()
    _run(benchmark, compact, moved, impl=impl, **c)


# ------------------------------------------------------------------------------------------ n-gram propose
NGRAM = (
    dict(batch=64, history=8192, max_ngram=4, min_ngram=1, num_draft=5)
    if ON_GPU
    else dict(batch=4, history=256, max_ngram=3, min_ngram=1, num_draft=4)
)


@pytest.mark.benchmark(group="ngram-propose")
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_ngram_propose(benchmark, impl):
    from effdecode.ops.ngram import ngram_propose

    n = NGRAM
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 32_000, (n["batch"], n["history"]), generator=generator).to(DEVICE)
    lengths = torch.full((n["batch"],), n["history"], dtype=torch.int32, device=DEVICE)
    rows = torch.arange(n["batch"], dtype=torch.int32, device=DEVICE)
    args = (tokens, lengths, rows, n["max_ngram"], n["min_ngram"], n["num_draft"])
    _assert_equal(ngram_propose(*args, backend=impl), ngram_propose(*args, backend="torch"), f"ngram[{impl}]")
    # Random tokens rarely repeat: the worst case, a full scan of every history.
    _run(
        benchmark,
        lambda: ngram_propose(*args, backend=impl),
        tokens.numel() * tokens.element_size(),
        impl=impl,
        **n,
    )


@pytest.mark.benchmark(group="verify-sampling")
@pytest.mark.parametrize("impl", ["torch", "triton", "flashinfer"])
def test_verify_sampling(benchmark, verify_problem, impl):
    """Rejection sampling with per-row lengths and masks vs FlashInfer's fixed-length chain sampler."""
    from effdecode.ops.verify import verify_sampling, verify_sampling_reference

    p = verify_problem
    b, k = VERIFY["batch"], VERIFY["draft"]
    target = torch.softmax(p["logits"].float(), -1)
    draft = torch.softmax(torch.randn_like(target), -1)
    seeds = torch.arange(b, device=DEVICE, dtype=torch.int64)
    offsets = torch.zeros(b, device=DEVICE, dtype=torch.int64)
    prob_bytes = 2 * target.numel() * target.element_size()
    if impl == "flashinfer":
        if not ON_GPU or importlib.util.find_spec("flashinfer") is None:
            pytest.skip("FlashInfer is not installed (or no GPU)")
        from flashinfer.sampling import chain_speculative_sampling

        draft_ids = p["input_ids"][:, 1:].contiguous()
        fn = lambda: chain_speculative_sampling(draft[:, :k].contiguous(), draft_ids, target)  # noqa: E731
    else:
        args = (target, draft, p["input_ids"], p["q_lens"], p["finished"], p["eos"], seeds, offsets)
        fn = lambda: verify_sampling(*args, backend=impl)  # noqa: E731
        # Given the random numbers, every backend must emit the reference's tokens.
        uniforms = torch.rand(target.shape[:2], device=DEVICE)
        exps = torch.empty_like(target).exponential_()
        _assert_equal(
            verify_sampling(*args, uniforms=uniforms, exponentials=exps, backend=impl),
            verify_sampling_reference(*args[:6], uniforms=uniforms, exponentials=exps),
            f"verify_sampling[{impl}]",
        )
    _run(benchmark, fn, prob_bytes, impl=impl, **VERIFY)
