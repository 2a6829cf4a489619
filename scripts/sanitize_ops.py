"""Every op's GPU kernels once, at small shapes, each checked against its torch reference.

Meant to run under ``compute-sanitizer`` (``scripts/gpu_check.sh sanitize``): small shapes and a small
vocabulary keep the instrumented run within its time limit, while covering every kernel path (split-K,
scores, ragged verify columns, per-layer compaction, Philox sampling, n-gram scan). Exits non-zero if a
result differs from the reference; the sanitizer reports bad accesses and races on its own.

    usage: python scripts/sanitize_ops.py [--cpu]    (PYTHONPATH at the repository root)

``--cpu`` runs the same checks through Triton's interpreter (``TRITON_INTERPRET=1`` is then set before any
kernel import): the CPU test suite runs the script that way, so it cannot rot between GPU sessions.
"""

# ruff: noqa: E402  (TRITON_INTERPRET is set before the kernel imports)
from __future__ import annotations

import os
import sys

import torch

ON_CPU = "--cpu" in sys.argv[1:]
if ON_CPU:
    os.environ["TRITON_INTERPRET"] = "1"

from effdecode.kernels.compaction import compact_kv_triton
from effdecode.kernels.ngram import ngram_propose_triton
from effdecode.kernels.sampling import sample_tokens_triton
from effdecode.kernels.slot_attention import slot_attention_triton
from effdecode.ops.attention import SlotBatch, slot_attention_reference
from effdecode.ops.backend import cuda_extension
from effdecode.ops.compaction import compact_kv_reference
from effdecode.ops.ngram import ngram_propose_reference
from effdecode.ops.sampling import sample_tokens_reference
from effdecode.ops.verify import verify_greedy, verify_greedy_reference, verify_sampling

DEVICE = torch.device("cpu" if ON_CPU else "cuda")
VOCAB = 1000


def attention(dtype: torch.dtype, num_cols: int, num_splits: int | None, scores: bool) -> None:
    slots, kv_heads, group, capacity, head_dim = 5, 2, 3, 300, 64
    rows = torch.tensor([3, 0, 4], dtype=torch.int32, device=DEVICE)
    cache_lens = torch.tensor([7, 0, 0, 250, 40], dtype=torch.int32, device=DEVICE)
    q_lens = torch.tensor([num_cols, 1, num_cols], dtype=torch.int32, device=DEVICE)
    k_cache = torch.randn(slots, kv_heads, capacity, head_dim, device=DEVICE, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    query = torch.randn(3, kv_heads * group, num_cols, head_dim, device=DEVICE, dtype=dtype)
    key = torch.randn(3, kv_heads, num_cols, head_dim, device=DEVICE, dtype=dtype)
    value = torch.randn_like(key)
    bound = 250 + num_cols
    score_ref = torch.zeros(slots, kv_heads, capacity, device=DEVICE) if scores else None
    score_tri = torch.zeros(slots, kv_heads, capacity, device=DEVICE) if scores else None
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    want = slot_attention_reference(
        query, key, value, ref_k, ref_v, SlotBatch(rows, cache_lens, q_lens, bound), 0.125, None, score_ref
    )
    got = slot_attention_triton(
        query, key, value, k_cache, v_cache, SlotBatch(rows, cache_lens, q_lens, bound), 0.125, None,
        score_tri, num_splits=num_splits,
    )  # fmt: skip
    valid = torch.arange(num_cols, device=DEVICE)[None, :] >= (num_cols - q_lens)[:, None]
    torch.testing.assert_close(got[valid].float(), want[valid].float(), atol=2e-2, rtol=2e-2)
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)
    if scores:
        torch.testing.assert_close(score_tri, score_ref, atol=2e-2, rtol=2e-2)


def compaction() -> None:
    layers, slots, kv_heads, capacity, head_dim = 3, 4, 2, 200, 64
    keys = torch.randn(layers, slots, kv_heads, capacity, head_dim, device=DEVICE, dtype=torch.bfloat16)
    values = torch.randn_like(keys)
    cache_lens = torch.full((slots,), capacity, dtype=torch.int32, device=DEVICE)
    rows = torch.tensor([2, 0], dtype=torch.int32, device=DEVICE)
    keep_index = torch.rand(layers, 2, kv_heads, capacity, device=DEVICE).topk(90, dim=-1).indices
    keep_index = keep_index.sort(dim=-1).values.to(torch.int32)
    keep_lens = torch.tensor([90, 60], dtype=torch.int32, device=DEVICE)
    ref = [keys.clone(), values.clone(), cache_lens.clone()]
    compact_kv_reference(*ref, rows, keep_index, keep_lens)
    compact_kv_triton(keys, values, cache_lens, rows, keep_index, keep_lens)
    for r, slot in enumerate(rows.tolist()):
        count = int(keep_lens[r])
        assert torch.equal(keys[:, slot, :, :count], ref[0][:, slot, :, :count])
        assert torch.equal(values[:, slot, :, :count], ref[1][:, slot, :, :count])
    assert torch.equal(cache_lens, ref[2])


def sampling() -> None:
    rows = 16
    logits = torch.randn(rows, VOCAB, device=DEVICE) * 3
    temperature = torch.tensor([0.0, 1.0, 0.7, 1.3] * 4, device=DEVICE)
    top_k = torch.tensor([0, 0, 20, 5] * 4, device=DEVICE)
    top_p = torch.tensor([1.0, 0.9, 1.0, 0.5] * 4, device=DEVICE)
    min_p = torch.tensor([0.0, 0.0, 0.05, 0.0] * 4, device=DEVICE)
    exps = torch.empty_like(logits).exponential_()
    params = (temperature, top_k, top_p, min_p)
    want = sample_tokens_reference(logits, *params, exponentials=exps)
    assert torch.equal(sample_tokens_triton(logits, *params, None, None, exps), want)
    seeds = torch.arange(rows, device=DEVICE, dtype=torch.int64)
    offsets = torch.zeros(rows, device=DEVICE, dtype=torch.int64)
    first = sample_tokens_triton(logits, *params, seeds, offsets)
    assert torch.equal(first, sample_tokens_triton(logits, *params, seeds, offsets))


def verify() -> None:
    batch, num_cols = 6, 5
    logits = torch.randn(batch, num_cols, VOCAB, device=DEVICE, dtype=torch.bfloat16)
    input_ids = torch.randint(0, VOCAB, (batch, num_cols), device=DEVICE)
    input_ids[:3, 1:] = logits[:3, :-1].argmax(-1)  # rows that accept their drafts
    q_lens = torch.tensor([5, 3, 1, 5, 2, 0], dtype=torch.int32, device=DEVICE)
    finished = torch.tensor([False] * 5 + [True], device=DEVICE)
    eos = torch.tensor([7], device=DEVICE)
    want = verify_greedy_reference(logits, input_ids, q_lens, finished, eos)
    built = not ON_CPU and cuda_extension() is not None
    for backend in ("triton", "cuda") if built else ("triton",):
        for got, expected in zip(
            verify_greedy(logits, input_ids, q_lens, finished, eos, backend=backend), want, strict=True
        ):
            assert torch.equal(got, expected), backend
    target = torch.softmax(logits.float(), -1)
    draft = torch.softmax(torch.randn_like(target), -1)
    seeds = torch.arange(batch, device=DEVICE, dtype=torch.int64)
    offsets = torch.zeros(batch, device=DEVICE, dtype=torch.int64)
    args = (target, draft, input_ids, q_lens, finished, eos, seeds, offsets)
    first = verify_sampling(*args, backend="triton")
    assert all(
        torch.equal(a, b) for a, b in zip(first, verify_sampling(*args, backend="triton"), strict=True)
    )


def ngram() -> None:
    tokens = torch.randint(0, 4, (6, 1500), device=DEVICE)
    lengths = torch.tensor([0, 1, 2, 700, 1500, 1499], dtype=torch.int32, device=DEVICE)
    rows = torch.tensor([5, 0, 3, 4, 1, 2, 3], dtype=torch.int32, device=DEVICE)
    got = ngram_propose_triton(tokens, lengths, rows, 4, 1, 5)
    want = ngram_propose_reference(tokens, lengths, rows, 4, 1, 5)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def main() -> int:
    if not ON_CPU and not torch.cuda.is_available():
        print("sanitize_ops: needs a CUDA device (or --cpu)", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    checks = {
        "attention bf16 decode, 4 splits, scores": lambda: attention(torch.bfloat16, 1, 4, True),
        "attention fp16 verify q_len 5": lambda: attention(torch.float16, 5, None, False),
        "attention bf16 verify q_len 5, 3 splits, scores": lambda: attention(torch.bfloat16, 5, 3, True),
        "compaction per layer": compaction,
        "sampling": sampling,
        "verify greedy + sampling": verify,
        "ngram": ngram,
    }
    failed = 0
    for name, check in checks.items():
        try:
            check()
            if not ON_CPU:
                torch.cuda.synchronize()
            print(f"ok      {name}")
        except Exception as error:  # report every op, then fail
            failed += 1
            print(f"FAILED  {name}: {type(error).__name__}: {error}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
