"""KV compaction: torch reference vs a naive loop, Triton kernel vs reference on the ``device`` fixture (the
CPU interpreter, or CUDA tensors on a GPU)."""

from __future__ import annotations

import pytest
import torch

from effdecode.cache import KVGeometry, SlotKVCache
from effdecode.kernels.compaction import compact_kv_triton
from effdecode.ops.compaction import (
    check_compaction_args,
    compact_kv,
    compact_kv_reference,
    keep_index_from_mask,
)

IMPLS = {"reference": compact_kv_reference, "triton": compact_kv_triton}


def _naive_compact(key_buffer, value_buffer, cache_lens, rows, keep_index, keep_lens) -> None:
    """The contract entry by entry, reading from a copy taken before any write."""
    old_k, old_v = key_buffer.clone(), value_buffer.clone()
    for r, slot in enumerate(rows.tolist()):
        count = int(keep_lens[r])
        for h in range(key_buffer.shape[2]):
            for j in range(count):
                src = int(keep_index[r, h, j])
                key_buffer[:, slot, h, j] = old_k[:, slot, h, src]
                value_buffer[:, slot, h, j] = old_v[:, slot, h, src]
        cache_lens[slot] = count


def _random_cache(
    layers: int,
    slots: int,
    kv_heads: int,
    capacity: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> SlotKVCache:
    """A cache on ``device`` filled from CPU draws (so one seed gives the same cache on any device)."""
    device = torch.device(device)
    cache = SlotKVCache(KVGeometry(layers, kv_heads, head_dim), slots, capacity, dtype, device)
    cache.key_buffer.copy_(torch.randn(cache.key_buffer.shape))
    cache.value_buffer.copy_(torch.randn(cache.value_buffer.shape))
    cache.cache_lens.copy_(torch.randint(0, capacity + 1, (slots,), dtype=torch.int32))
    cache.positions.copy_(cache.cache_lens.long() + torch.randint(0, 50, (slots,)))  # evicted before
    return cache


def _random_keep_mask(cache_lens: list[int], kv_heads: int, width: int, kinds: list[str]) -> torch.Tensor:
    """bool ``[R, kv_heads, width]``: per row a keep set of one kind, the same count for every head."""
    mask = torch.zeros(len(cache_lens), kv_heads, width, dtype=torch.bool)
    for r, (length, kind) in enumerate(zip(cache_lens, kinds, strict=True)):
        if length == 0 or kind == "none":
            continue
        budget = {
            "random": int(torch.randint(1, length + 1, ())),
            "prefix": int(torch.randint(1, length + 1, ())),
            "all": length,
            "one": 1,
        }[kind]
        for h in range(kv_heads):
            if kind == "prefix":
                mask[r, h, :budget] = True
            else:
                mask[r, h, torch.randperm(length)[:budget]] = True
    return mask


def _setup(layers, slots, kv_heads, capacity, head_dim, dtype, num_rows, kinds=None, device=None):
    device = device or torch.device("cpu")
    cache = _random_cache(layers, slots, kv_heads, capacity, head_dim, dtype, device)
    rows = torch.randperm(slots)[:num_rows].to(torch.int32)
    all_kinds = ["random", "prefix", "all", "one", "none"]
    kinds = kinds or [all_kinds[int(i)] for i in torch.randint(0, len(all_kinds), (num_rows,))]
    lens = cache.cache_lens[rows.to(device).long()].tolist()
    mask = _random_keep_mask(lens, kv_heads, capacity, kinds).to(device)
    keep_index, keep_lens = keep_index_from_mask(mask)
    return cache, rows.to(device), keep_index, keep_lens


def _clone_state(cache: SlotKVCache) -> list[torch.Tensor]:
    return [cache.key_buffer.clone(), cache.value_buffer.clone(), cache.cache_lens.clone()]


def _check_result(before, after, rows, keep_index, keep_lens) -> None:
    """Kept prefixes exact, lengths updated, slots not compacted bit-identical."""
    old_k, old_v, old_lens = before
    new_k, new_v, new_lens = after
    compacted = set(rows.tolist())
    for slot in range(old_k.shape[1]):
        if slot not in compacted:
            assert torch.equal(new_k[:, slot], old_k[:, slot]) and torch.equal(new_v[:, slot], old_v[:, slot])
            assert new_lens[slot] == old_lens[slot]
    for r, slot in enumerate(rows.tolist()):
        count = int(keep_lens[r])
        assert int(new_lens[slot]) == count
        for h in range(old_k.shape[2]):
            src = keep_index[r, h, :count].long()
            assert torch.equal(new_k[:, slot, h, :count], old_k[:, slot, h, src])
            assert torch.equal(new_v[:, slot, h, :count], old_v[:, slot, h, src])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_reference_matches_naive_loop(fresh_seed, dtype):
    cache, rows, keep_index, keep_lens = _setup(3, 7, 2, 24, 8, dtype, num_rows=5)
    before = _clone_state(cache)
    naive = _clone_state(cache)
    _naive_compact(*naive, rows, keep_index, keep_lens)
    compact_kv_reference(cache.key_buffer, cache.value_buffer, cache.cache_lens, rows, keep_index, keep_lens)
    after = [cache.key_buffer, cache.value_buffer, cache.cache_lens]
    _check_result(before, after, rows, keep_index, keep_lens)
    # Kept prefixes and lengths as the naive loop; the reference leaves the tails as they were.
    for got, want in zip(after, naive, strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize(
    "layers,kv_heads,capacity,head_dim,dtype",
    [
        (2, 2, 40, 16, torch.float32),
        (3, 4, 64, 32, torch.float16),
        (2, 1, 300, 32, torch.float32),  # several chunks per program
        (3, 2, 50, 24, torch.float16),  # head_dim not a power of two
    ],
)
def test_triton_matches_reference(device, fresh_seed, layers, kv_heads, capacity, head_dim, dtype):
    cache, rows, keep_index, keep_lens = _setup(
        layers, 8, kv_heads, capacity, head_dim, dtype, num_rows=6, device=device
    )
    before = _clone_state(cache)
    positions = cache.positions.clone()
    ref = _clone_state(cache)
    compact_kv_reference(*ref, rows, keep_index, keep_lens)
    compact_kv_triton(cache.key_buffer, cache.value_buffer, cache.cache_lens, rows, keep_index, keep_lens)
    after = [cache.key_buffer, cache.value_buffer, cache.cache_lens]
    _check_result(before, after, rows, keep_index, keep_lens)
    assert torch.equal(cache.cache_lens, ref[2])
    assert torch.equal(cache.positions, positions)
    # The per-layer views see the compacted entries.
    assert torch.equal(cache.keys[layers - 1], cache.key_buffer[layers - 1])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["prefix", "all", "one", "none"])
def test_special_keep_sets(device, fresh_seed, impl, kind):
    cache, rows, keep_index, keep_lens = _setup(
        2, 5, 2, 33, 16, torch.float16, num_rows=3, kinds=[kind] * 3, device=device
    )
    before = _clone_state(cache)
    IMPLS[impl](cache.key_buffer, cache.value_buffer, cache.cache_lens, rows, keep_index, keep_lens)
    after = [cache.key_buffer, cache.value_buffer, cache.cache_lens]
    _check_result(before, after, rows, keep_index, keep_lens)
    if kind in ("prefix", "all", "none"):
        # Nothing moves: the buffers are bit-identical, only lengths change (and not for "all").
        assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])
    if kind == "all":
        assert torch.equal(after[2], before[2])


def test_keep_index_beyond_lens_is_ignored(device, fresh_seed):
    """Entries past keep_lens may hold anything, even out-of-range indices; int64 indices work too."""
    cache, rows, keep_index, keep_lens = _setup(
        2, 6, 2, 40, 16, torch.float32, num_rows=4, kinds=["random"] * 4, device=device
    )
    poisoned = keep_index.long().clone()
    cols = torch.arange(poisoned.shape[2], device=device)
    poisoned[(cols[None, :] >= keep_lens[:, None].long())[:, None, :].expand_as(poisoned)] = 10**9
    ref = _clone_state(cache)
    compact_kv_reference(*ref, rows, poisoned, keep_lens)
    got = _clone_state(cache)
    compact_kv_triton(*got, rows, poisoned, keep_lens)
    _check_result(_clone_state(cache), got, rows, keep_index, keep_lens)
    _check_result(_clone_state(cache), ref, rows, keep_index, keep_lens)


def test_dispatch(device, fresh_seed):
    cache, rows, keep_index, keep_lens = _setup(2, 5, 2, 20, 16, torch.float32, num_rows=3, device=device)
    results = []
    for backend in ("auto", "torch", "triton"):
        state = _clone_state(cache)
        compact_kv(*state, rows, keep_index, keep_lens, backend=backend)
        results.append(state)
    for state in results[1:]:
        _check_result(_clone_state(cache), state, rows, keep_index, keep_lens)
        assert torch.equal(state[2], results[0][2])


def test_argument_checks():
    cache = _random_cache(2, 3, 2, 10, 8, torch.float32)
    k, v, lens = cache.key_buffer, cache.value_buffer, cache.cache_lens
    rows = torch.tensor([1], dtype=torch.int32)
    index = torch.zeros(1, 2, 4, dtype=torch.int32)
    keep = torch.ones(1, dtype=torch.int32)
    for impl in (compact_kv, *IMPLS.values()):
        with pytest.raises(ValueError, match="key_buffer"):
            impl(k[0], v[0], lens, rows, index, keep)
        with pytest.raises(ValueError, match="value_buffer"):
            impl(k, v.half(), lens, rows, index, keep)
        with pytest.raises(ValueError, match="keep_index"):
            impl(k, v, lens, rows, index[:, :1], keep)
        with pytest.raises(ValueError, match="capacity"):
            impl(k, v, lens, rows, torch.zeros(1, 2, 11, dtype=torch.int32), keep)
        with pytest.raises(ValueError, match="keep_lens"):
            impl(k, v, lens, rows, index, keep.repeat(2))
        with pytest.raises(TypeError, match="keep_index"):
            impl(k, v, lens, rows, index.float(), keep)
        with pytest.raises(TypeError, match="cache_lens"):
            impl(k, v, lens.long(), rows, index, keep)


def test_empty_rows(device):
    cache = _random_cache(2, 3, 2, 10, 8, torch.float32, device)
    before = _clone_state(cache)
    for impl in IMPLS.values():
        impl(
            cache.key_buffer,
            cache.value_buffer,
            cache.cache_lens,
            torch.zeros(0, dtype=torch.int32, device=device),
            torch.zeros(0, 2, 5, dtype=torch.int32, device=device),
            torch.zeros(0, dtype=torch.int32, device=device),
        )
    for got, want in zip((cache.key_buffer, cache.value_buffer, cache.cache_lens), before, strict=True):
        assert torch.equal(got, want)


def test_keep_index_from_mask_matches_nonzero(fresh_seed):
    rows, heads, width = 4, 3, 37
    counts = torch.randint(0, width + 1, (rows,))
    mask = torch.zeros(rows, heads, width, dtype=torch.bool)
    for r in range(rows):
        for h in range(heads):
            mask[r, h, torch.randperm(width)[: int(counts[r])]] = True
    keep_index, keep_lens = keep_index_from_mask(mask)
    assert keep_index.shape == (rows, heads, width) and keep_index.dtype == torch.int32
    assert keep_lens.dtype == torch.int32 and keep_lens.tolist() == counts.tolist()
    for r in range(rows):
        for h in range(heads):
            want = mask[r, h].nonzero().flatten()
            assert torch.equal(keep_index[r, h, : int(counts[r])].long(), want)


def test_keep_index_from_mask_budget_and_disagreeing_heads():
    mask = torch.zeros(2, 2, 10, dtype=torch.bool)
    mask[0, 0, [1, 4, 6, 9]] = True
    mask[0, 1, [0, 2, 3, 8]] = True
    mask[1, 0, [2, 5, 7]] = True  # heads disagree: the row keeps min(3, 2) = 2
    mask[1, 1, [3, 9]] = True
    keep_index, keep_lens = keep_index_from_mask(mask, budget=3)
    assert keep_index.shape == (2, 2, 3)
    assert keep_lens.tolist() == [3, 2]  # row 0 capped by the budget
    assert keep_index[0].tolist() == [[1, 4, 6], [0, 2, 3]]
    assert keep_index[1, 0, :2].tolist() == [2, 5] and keep_index[1, 1, :2].tolist() == [3, 9]

    empty_index, empty_lens = keep_index_from_mask(torch.zeros(2, 2, 10, dtype=torch.bool))
    assert empty_lens.tolist() == [0, 0] and empty_index.shape == (2, 2, 10)
    zero_index, zero_lens = keep_index_from_mask(mask, budget=0)
    assert zero_index.shape == (2, 2, 0) and zero_lens.tolist() == [0, 0]
    with pytest.raises(ValueError, match="keep_mask"):
        keep_index_from_mask(mask.int())


def _per_layer_setup(layers, slots, kv_heads, capacity, head_dim, dtype, num_rows, device=None):
    """A cache and a different random selection per layer (same count per row across layers and heads)."""
    device = device or torch.device("cpu")
    cache = _random_cache(layers, slots, kv_heads, capacity, head_dim, dtype, device)
    rows = torch.randperm(slots)[:num_rows].to(torch.int32)
    lens = cache.cache_lens.cpu()[rows.long()].tolist()
    counts = [int(torch.randint(0, n + 1, ())) for n in lens]
    index = torch.zeros(layers, num_rows, kv_heads, capacity, dtype=torch.int32)
    for layer in range(layers):
        for r, (length, count) in enumerate(zip(lens, counts, strict=True)):
            for h in range(kv_heads):
                index[layer, r, h, :count] = torch.randperm(length)[:count].sort().values.to(torch.int32)
    return cache, rows.to(device), index.to(device), torch.tensor(counts, dtype=torch.int32, device=device)


@pytest.mark.parametrize("impl", IMPLS)
def test_per_layer_selection(device, fresh_seed, impl):
    layers = 3
    cache, rows, keep_index, keep_lens = _per_layer_setup(
        layers, 6, 2, 40, 16, torch.float32, num_rows=4, device=device
    )
    old_k, old_v = cache.key_buffer.clone(), cache.value_buffer.clone()
    old_lens = cache.cache_lens.clone()
    IMPLS[impl](cache.key_buffer, cache.value_buffer, cache.cache_lens, rows, keep_index, keep_lens)
    for layer in range(layers):
        for r, slot in enumerate(rows.tolist()):
            count = int(keep_lens[r])
            for h in range(2):
                src = keep_index[layer, r, h, :count].long()
                assert torch.equal(cache.key_buffer[layer, slot, h, :count], old_k[layer, slot, h, src])
                assert torch.equal(cache.value_buffer[layer, slot, h, :count], old_v[layer, slot, h, src])
    others = [s for s in range(6) if s not in set(rows.tolist())]
    assert torch.equal(cache.key_buffer[:, others], old_k[:, others])
    assert torch.equal(cache.cache_lens[rows.long()], keep_lens)
    assert torch.equal(cache.cache_lens[others], old_lens[others])


def test_per_layer_index_needs_every_layer():
    cache, rows, keep_index, keep_lens = _per_layer_setup(3, 6, 2, 40, 16, torch.float32, num_rows=4)
    with pytest.raises(ValueError, match="layers, R, kv_heads, K"):
        compact_kv_reference(
            cache.key_buffer, cache.value_buffer, cache.cache_lens, rows, keep_index[:2], keep_lens
        )


@pytest.mark.parametrize("impl", [compact_kv, *IMPLS.values()])
def test_duplicate_rows_are_rejected(impl):
    """Two programs compacting one slot would race: rows on the CPU are checked before any work."""
    cache = _random_cache(2, 4, 2, 10, 8, torch.float32)
    before = _clone_state(cache)
    rows = torch.tensor([2, 0, 2], dtype=torch.int32)
    index = torch.arange(3, dtype=torch.int32).expand(3, 2, 3).contiguous()
    keep = torch.full((3,), 2, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"distinct slots; repeated: \[2\]"):
        impl(cache.key_buffer, cache.value_buffer, cache.cache_lens, rows, index, keep)
    for got, want in zip((cache.key_buffer, cache.value_buffer, cache.cache_lens), before, strict=True):
        assert torch.equal(got, want)
    # The same arguments with distinct rows pass the check (and run, through the reference).
    distinct = (cache.key_buffer, cache.value_buffer, cache.cache_lens, rows[:2], index[:2], keep[:2])
    check_compaction_args(*distinct)
    compact_kv_reference(*distinct)
    assert cache.cache_lens[[2, 0]].tolist() == [2, 2]
