"""KV eviction policies: select_keep and protection_masks against plain per-(layer, row, head) loops."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import requires_cuda

import effdecode.compression.policies as policies
from effdecode.compression import RKV_LAMBDA, SNAPKV_POOL, protection_masks, select_keep

L, R, H, C, D = 2, 3, 2, 24, 8
BUDGET = 10
# The contract's constants, written out so that the reference does not follow a change in the module.
REF_POOL, REF_LAMBDA = 7, 0.1


# ---------------------------------------------------------------------------------------------- references


def _ref_policy_scores(policy, keys, scores, positions, length):
    """Policy score of entries 0..length-1 of one (layer, row, head), as Python floats, from the rule."""
    pos = [int(p) for p in positions[:length]]
    if policy == "streaming" or length == 0:
        return [float(p) for p in pos]
    raw = [float(s) for s in scores[:length]]
    if policy == "h2o":
        return raw
    half = REF_POOL // 2
    pooled = [max(raw[max(0, j - half) : min(length, j + half + 1)]) for j in range(length)]
    if policy == "snapkv":
        return pooled
    peak = max(pooled)
    importance = [p / peak if peak > 0 else 0.0 for p in pooled]
    vecs = [[float(x) for x in keys[j]] for j in range(length)]
    norms = [math.sqrt(sum(x * x for x in v)) for v in vecs]
    out = []
    for j in range(length):
        red = 0.0
        for i in range(length):
            if pos[i] > pos[j] and norms[i] > 0 and norms[j] > 0:
                cos = sum(a * b for a, b in zip(vecs[j], vecs[i], strict=True)) / (norms[j] * norms[i])
                red = max(red, min(1.0, cos))
        out.append(REF_LAMBDA * importance[j] - (1 - REF_LAMBDA) * red)
    return out


def _ref_select_keep(policy, keys, scores, positions, lengths, must_keep, prefer_keep, budget):
    """The selection rule, literally: sort the valid entries by (tier, score, position) descending."""
    layers, rows, heads, _ = positions.shape
    keep_index = torch.zeros((layers, rows, heads, budget), dtype=torch.int32)
    for layer in range(layers):
        for r in range(rows):
            length = int(lengths[r])
            for h in range(heads):
                score = _ref_policy_scores(
                    policy,
                    None if keys is None else keys[layer, r, h],
                    None if scores is None else scores[layer, r, h],
                    positions[layer, r, h],
                    length,
                )
                cands = []
                for j in range(length):
                    pos = int(positions[layer, r, h, j])
                    if must_keep[layer, r, h, j]:
                        cands.append((2, 0.0, pos, j))  # must keep: the newest win
                    elif prefer_keep is not None and prefer_keep[layer, r, h, j]:
                        cands.append((1, score[j], pos, j))
                    else:
                        cands.append((0, score[j], pos, j))
                kept = sorted(j for *_, j in sorted(cands, reverse=True)[:budget])
                keep_index[layer, r, h, : len(kept)] = torch.tensor(kept, dtype=torch.int32)
    keep_lens = torch.tensor([min(budget, int(n)) for n in lengths], dtype=torch.int32)
    return keep_index, keep_lens


def _ref_protection(positions, lengths, next_positions, prompt_lens, spans, sinks, window, protect, think):
    must = torch.zeros(positions.shape, dtype=torch.bool)
    prefer = torch.zeros(positions.shape, dtype=torch.bool)
    for index in torch.cartesian_prod(*(torch.arange(n) for n in positions.shape)).tolist():
        layer, r, h, j = index
        if j >= int(lengths[r]):
            continue
        pos = int(positions[layer, r, h, j])
        must[layer, r, h, j] = (
            pos < sinks or pos >= int(next_positions[r]) - window or (protect and pos < int(prompt_lens[r]))
        )
        prefer[layer, r, h, j] = not (int(spans[r, 0]) <= pos < int(spans[r, 1]))
    return must, (prefer if think else None)


# ---------------------------------------------------------------------------------------------- inputs


def _random_inputs(seed, lengths=(24, 17, 6), integer_scores=True, must_p=0.15, prefer_p=0.3):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths, dtype=torch.int32)
    # Distinct positions per (layer, row, head), not in cache order, with gaps (earlier evictions).
    positions = torch.stack([torch.randperm(3 * C, generator=g)[:C] for _ in range(L * R * H)])
    positions = positions.reshape(L, R, H, C) + 1000
    if integer_scores:  # many exact ties: pins the tie rule
        scores = torch.randint(0, 4, (L, R, H, C), generator=g).float()
    else:
        scores = torch.rand((L, R, H, C), generator=g)
    keys = torch.randn((L, R, H, C, D), generator=g)
    must = torch.rand((L, R, H, C), generator=g) < must_p
    prefer = torch.rand((L, R, H, C), generator=g) < prefer_p
    # Garbage past each row's length: huge scores, duplicated keys, protection bits; none may matter.
    invalid = torch.arange(C)[None, None, None, :] >= lengths.long()[None, :, None, None]
    scores = torch.where(invalid, torch.full_like(scores, 1e6), scores)
    keys = torch.where(invalid[..., None], keys[:, :, :, :1], keys)
    must = must | invalid
    return keys, scores, positions, lengths, must, prefer


def _check_invariants(keep_index, keep_lens, lengths, budget, shape):
    assert keep_index.dtype == torch.int32 and keep_lens.dtype == torch.int32
    assert tuple(keep_index.shape) == (*shape[:3], budget)
    assert keep_lens.tolist() == [min(budget, int(n)) for n in lengths]
    for layer in range(shape[0]):
        for r in range(shape[1]):
            n = int(keep_lens[r])
            for h in range(shape[2]):
                row = keep_index[layer, r, h].tolist()
                assert all(row[i] < row[i + 1] for i in range(n - 1)), row
                assert all(0 <= j < int(lengths[r]) for j in row[:n]), row
                assert all(j == 0 for j in row[n:]), row


# ---------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("policy", ["streaming", "h2o", "snapkv", "rkv"])
@pytest.mark.parametrize("seed", [0, 1, "fresh"])
@pytest.mark.parametrize(
    "case",
    [
        dict(),
        dict(integer_scores=False),
        dict(lengths=(24, 0, 9), prefer_p=0.0),
        dict(lengths=(13, 24, 10), must_p=0.0),
        dict(lengths=(24, 20, 3), must_p=0.6),  # must-keep overflows the budget: the newest of them
    ],
)
def test_select_keep_matches_reference(policy, seed, case, fresh_seed):
    seed = fresh_seed if seed == "fresh" else 100 * seed + 7
    keys, scores, positions, lengths, must, prefer = _random_inputs(seed, **case)
    prefer_arg = None if case.get("prefer_p") == 0.0 else prefer
    args = (keys, None if policy == "streaming" else scores, positions, lengths, must, prefer_arg, BUDGET)
    got_index, got_lens = select_keep(policy, *args)
    want_index, want_lens = _ref_select_keep(policy, *args)
    _check_invariants(got_index, got_lens, lengths, BUDGET, positions.shape)
    assert torch.equal(got_lens, want_lens)
    assert torch.equal(got_index, want_index)


def test_documented_constants():
    assert (SNAPKV_POOL, RKV_LAMBDA) == (REF_POOL, REF_LAMBDA)


def test_ties_go_to_the_newer_entry():
    positions = torch.tensor([5, 9, 2, 7, 3, 8])[None, None, None]  # newer = larger position
    scores = torch.ones((1, 1, 1, 6))
    none = torch.zeros((1, 1, 1, 6), dtype=torch.bool)
    index, _ = select_keep("h2o", None, scores, positions, torch.tensor([6]), none, None, 3)
    assert index.flatten().tolist() == [1, 3, 5]  # positions 9, 7, 8


def test_streaming_keeps_sinks_and_recent():
    length, sinks, window, budget = 20, 2, 3, 8
    positions = torch.arange(C).expand(1, 2, H, C).contiguous()
    lengths = torch.tensor([length, 5])
    must, prefer = protection_masks(
        positions,
        lengths,
        next_positions=lengths.long(),
        prompt_lens=torch.tensor([4, 4]),
        think_spans=torch.zeros((2, 2), dtype=torch.int64),
        sinks=sinks,
        window=window,
        protect_prompt=False,
        think_only=False,
    )
    index, lens = select_keep("streaming", None, None, positions, lengths, must, prefer, budget)
    want = [0, 1, *range(length - (budget - sinks), length)]
    assert lens.tolist() == [budget, 5]
    for h in range(H):
        assert index[0, 0, h].tolist() == want
        assert index[0, 1, h].tolist() == [0, 1, 2, 3, 4, 0, 0, 0]


def test_h2o_keeps_the_heaviest():
    g = torch.Generator().manual_seed(11)
    scores = torch.rand((1, 1, H, C), generator=g)
    positions = torch.arange(C).expand(1, 1, H, C)
    none = torch.zeros((1, 1, H, C), dtype=torch.bool)
    index, _ = select_keep("h2o", None, scores, positions, torch.tensor([C]), none, None, BUDGET)
    for h in range(H):
        heaviest = sorted(torch.topk(scores[0, 0, h], BUDGET).indices.tolist())
        assert index[0, 0, h].tolist() == heaviest


def test_snapkv_pools_neighbours():
    # One spike: SnapKV keeps its pooling window around it, H2O only the spike and then the newest.
    scores = torch.zeros((1, 1, 1, C))
    scores[..., 10] = 5.0
    positions = torch.arange(C)[None, None, None]
    none = torch.zeros((1, 1, 1, C), dtype=torch.bool)
    index, _ = select_keep("snapkv", None, scores, positions, torch.tensor([C]), none, None, SNAPKV_POOL)
    half = SNAPKV_POOL // 2
    assert index.flatten().tolist() == list(range(10 - half, 10 + half + 1))
    index, _ = select_keep("h2o", None, scores, positions, torch.tensor([C]), none, None, 3)
    assert index.flatten().tolist() == [10, C - 2, C - 1]


def test_rkv_drops_the_older_duplicate():
    # Orthonormal keys except entry 4, a copy of entry 1: equal importance everywhere, so the older copy (1)
    # is the one redundant entry; its newer copy (4) and every unique key survive.
    width = 6
    keys = torch.zeros((1, 1, 1, width, D))
    for j, axis in enumerate([0, 1, 2, 3, 1, 4]):
        keys[0, 0, 0, j, axis] = 1.0 + j  # scale does not matter to a cosine
    scores = torch.ones((1, 1, 1, width))
    positions = torch.arange(width)[None, None, None]
    none = torch.zeros((1, 1, 1, width), dtype=torch.bool)
    index, _ = select_keep("rkv", keys, scores, positions, torch.tensor([width]), none, None, width - 1)
    assert index.flatten().tolist() == [0, 2, 3, 4, 5]
    # Without redundancy the same scores evict the oldest entry instead (recency breaks the tie).
    index, _ = select_keep("snapkv", None, scores, positions, torch.tensor([width]), none, None, width - 1)
    assert index.flatten().tolist() == [1, 2, 3, 4, 5]


def test_rkv_random_keys_with_duplicates():
    g = torch.Generator().manual_seed(5)
    keys = torch.randn((1, 1, 1, C, D), generator=g)
    keys[0, 0, 0, 20] = keys[0, 0, 0, 3] * 2.0  # 3 has a newer near-copy
    scores = torch.ones((1, 1, 1, C))
    positions = torch.arange(C)[None, None, None]
    none = torch.zeros((1, 1, 1, C), dtype=torch.bool)
    index, _ = select_keep("rkv", keys, scores, positions, torch.tensor([C]), none, None, C - 1)
    assert 3 not in index.flatten().tolist()


def test_rkv_chunking_matches(monkeypatch):
    keys, scores, positions, lengths, must, prefer = _random_inputs(3, integer_scores=False)
    want = select_keep("rkv", keys, scores, positions, lengths, must, prefer, BUDGET)
    monkeypatch.setattr(policies, "_RKV_CHUNK_BYTES", 5 * C * C * 4)  # 5 (layer, row, head) per chunk
    got = select_keep("rkv", keys, scores, positions, lengths, must, prefer, BUDGET)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_budget_wider_than_cache():
    keys, scores, positions, lengths, must, prefer = _random_inputs(4)
    index, lens = select_keep("h2o", keys, scores, positions, lengths, must, prefer, C + 5)
    _check_invariants(index, lens, lengths, C + 5, positions.shape)
    assert lens.tolist() == lengths.tolist()
    assert index[0, 0, 0, :C].tolist() == list(range(C))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("protect, think", [(False, False), (True, False), (True, True), (False, True)])
def test_protection_masks_match_reference(seed, protect, think):
    g = torch.Generator().manual_seed(seed)
    positions = torch.stack([torch.randperm(3 * C, generator=g)[:C] for _ in range(L * R * H)])
    positions = positions.reshape(L, R, H, C)
    lengths = torch.tensor([24, 11, 0])
    next_positions = torch.tensor([3 * C, 50, 10], dtype=torch.int64)
    prompt_lens = torch.tensor([10, 5, 0])
    spans = torch.tensor([[12, 40], [6, 1 << 40], [0, 0]], dtype=torch.int64)  # done / thinking / none
    args = (positions, lengths, next_positions, prompt_lens, spans, 3, 6, protect, think)
    must, prefer = protection_masks(*args)
    want_must, want_prefer = _ref_protection(*args)
    assert must.dtype == torch.bool and torch.equal(must, want_must)
    if think:
        assert prefer is not None and prefer.dtype == torch.bool and torch.equal(prefer, want_prefer)
    else:
        assert prefer is None


def test_argument_validation():
    keys, scores, positions, lengths, must, prefer = _random_inputs(0)
    ok = dict(
        keys=keys, scores=scores, positions=positions, lengths=lengths, must_keep=must, prefer_keep=prefer
    )
    bad = [
        ("policy", dict(policy="lru")),
        ("budget", dict(budget=0)),
        ("budget", dict(budget=2.5)),
        ("scores", dict(policy="h2o", scores=None)),
        ("scores", dict(scores=scores.double())),
        ("scores", dict(scores=scores[..., :-1])),
        ("keys", dict(policy="rkv", keys=None)),
        ("keys", dict(policy="rkv", keys=keys[..., :-1, :])),
        ("keys", dict(policy="rkv", keys=keys.long())),
        ("positions", dict(positions=positions.float())),
        ("positions", dict(positions=positions[0])),
        ("lengths", dict(lengths=lengths[:2])),
        ("lengths", dict(lengths=lengths.float())),
        ("must_keep", dict(must_keep=must.int())),
        ("must_keep", dict(must_keep=must[:, :, :1])),
        ("prefer_keep", dict(prefer_keep=prefer.float())),
    ]
    for name, change in bad:
        kwargs = {"policy": "snapkv", **ok, "budget": BUDGET, **change}
        with pytest.raises(ValueError, match=name):
            select_keep(**kwargs)
    # streaming needs neither scores nor keys
    select_keep("streaming", None, None, positions, lengths, must, None, BUDGET)

    rows = torch.tensor([1, 2, 3])
    good = dict(
        positions=positions,
        lengths=lengths,
        next_positions=rows,
        prompt_lens=rows,
        think_spans=torch.zeros((R, 2), dtype=torch.int64),
        sinks=2,
        window=4,
        protect_prompt=True,
        think_only=True,
    )
    for name, change in [
        ("next_positions", dict(next_positions=rows[:2])),
        ("prompt_lens", dict(prompt_lens=rows.float())),
        ("think_spans", dict(think_spans=torch.zeros((R, 3), dtype=torch.int64))),
        ("sinks", dict(sinks=-1)),
        ("window", dict(window=None)),
        ("lengths", dict(lengths=lengths[None])),
    ]:
        with pytest.raises(ValueError, match=name):
            protection_masks(**{**good, **change})


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("policy", ["streaming", "h2o", "snapkv", "rkv"])
def test_cuda_matches_cpu(policy, monkeypatch):
    """Same selection on CUDA as on the CPU at a realistic size (rkv: up to float rounding of the cosines)."""
    layers, rows, heads, width, head_dim, budget = 4, 6, 8, 1024, 128, 384
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([1024, 1000, 700, 385, 384, 100])
    positions = (torch.arange(width) * 3 + 17).expand(layers, rows, heads, width).contiguous()
    scores = torch.rand((layers, rows, heads, width), generator=g)
    keys = torch.randn((layers, rows, heads, width, head_dim), generator=g).half()
    must, prefer = protection_masks(
        positions,
        lengths,
        next_positions=positions[0, :, 0, -1] + 1,
        prompt_lens=torch.full((rows,), 40),
        think_spans=torch.tensor([[120, 1 << 40]] * rows),
        sinks=4,
        window=32,
        protect_prompt=True,
        think_only=True,
    )
    args = (keys, scores, positions, lengths, must, prefer, budget)
    want_index, want_lens = select_keep(policy, *args)
    monkeypatch.setattr(policies, "_RKV_CHUNK_BYTES", 16 << 20)  # several chunks on the GPU
    got_index, got_lens = select_keep(policy, *(a.cuda() for a in args[:-1]), budget)
    assert got_index.is_cuda and torch.equal(got_lens.cpu(), want_lens)
    if policy != "rkv":
        assert torch.equal(got_index.cpu(), want_index)
    else:  # a near-tie at the budget boundary may flip between CPU and GPU matmuls
        assert (got_index.cpu() == want_index).float().mean() > 0.99
