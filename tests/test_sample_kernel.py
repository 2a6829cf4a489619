"""The sample op: Triton kernel vs torch reference (identical tokens given the exponentials), the reference vs
transformers-exact ``warp_logits``, and the sampled frequencies of both. The kernel runs on the ``device``
fixture (Triton's interpreter on the CPU, CUDA tensors on a GPU); inputs are drawn on the CPU."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from effdecode.kernels.sampling import sample_tokens_triton
from effdecode.ops.sampling import (
    SamplingParams,
    filter_scores_reference,
    sample_tokens,
    sample_tokens_reference,
    warp_logits,
)

# (temperature, top_k, top_p, min_p) of one row: every filter alone, all combined, all off, and edge values.
MIXED_ROWS = [
    (0.0, 0, 1.0, 0.0),  # greedy
    (0.0, 5, 0.5, 0.1),  # greedy ignores the filters
    (1.0, 0, 1.0, 0.0),  # all off: plain softmax sampling
    (0.7, 0, 1.0, 0.0),  # temperature only
    (0.8, 20, 1.0, 0.0),  # top-k only
    (1.0, 0, 0.9, 0.0),  # top-p only
    (1.3, 0, 1.0, 0.05),  # min-p only
    (0.6, 40, 0.9, 0.05),  # all combined
    (0.9, 300, 0.3, 0.0),  # top-k, then a top-p that binds
    (1.2, 1, 1.0, 0.0),  # top-k = 1
    (1.0, 0, 0.0, 0.0),  # top-p = 0: the maximum only
    (1.5, 10**9, 1.0, 0.2),  # top-k >= V is off
]


def row_params(rows: list[tuple[float, int, float, float]]) -> tuple[torch.Tensor, ...]:
    """Per-row ``(temperature, top_k, top_p, min_p)`` tensors, ``[B]`` each."""
    temperature, top_k, top_p, min_p = zip(*rows, strict=True)
    return (
        torch.tensor(temperature, dtype=torch.float32),
        torch.tensor(top_k, dtype=torch.int64),
        torch.tensor(top_p, dtype=torch.float32),
        torch.tensor(min_p, dtype=torch.float32),
    )


def as_sampling_params(row: tuple[float, int, float, float]) -> SamplingParams:
    temperature, top_k, top_p, min_p = row
    return SamplingParams(temperature=temperature, top_k=top_k or None, top_p=top_p, min_p=min_p or None)


def boundary_exponentials(logits: torch.Tensor, params: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Exponentials under which the race picks the *lowest* kept score: key = s - log E = m - (s - m) / 2.

    The winner is then the token at the filters' boundary, so equal tokens mean equal thresholds.
    """
    _, scores, _ = filter_scores_reference(logits, *params)
    top = scores.amax(dim=-1, keepdim=True)
    exponentials = torch.exp(1.5 * (scores - top))
    assert (exponentials > 0).all()  # no underflow for the score ranges used here: keys stay decreasing in s
    return exponentials


def kernel(logits, params, seeds, offsets, exponentials=None, *, device, **kernel_kwargs) -> torch.Tensor:
    """``sample_tokens_triton`` on ``device`` copies of CPU inputs; the tokens back on the CPU."""

    def on(t):
        return None if t is None else t.to(device)

    tokens = sample_tokens_triton(
        on(logits), *(on(p) for p in params), on(seeds), on(offsets), on(exponentials), **kernel_kwargs
    )
    assert tokens.device.type == torch.device(device).type
    return tokens.cpu()


def assert_same_tokens(logits, params, exponentials, *, device, **kernel_kwargs) -> torch.Tensor:
    expected = sample_tokens_reference(logits, *params, exponentials=exponentials)
    actual = kernel(logits, params, None, None, exponentials, device=device, **kernel_kwargs)
    assert actual.dtype == torch.int64
    assert torch.equal(actual, expected), (actual, expected)
    return expected


# ---- exact: kernel vs reference -------------------------------------------------------------------------


@pytest.mark.parametrize("vocab", [1000, 151_936])
def test_kernel_matches_reference_on_mixed_rows(device, vocab, fresh_seed):
    logits = torch.randn(len(MIXED_ROWS), vocab) * 3
    params = row_params(MIXED_ROWS)
    assert_same_tokens(logits, params, torch.empty_like(logits).exponential_(), device=device)
    # The boundary test: identical tokens here mean identical top-k / top-p / min-p thresholds.
    edge = boundary_exponentials(logits, params)
    tokens = assert_same_tokens(logits, params, edge, device=device)
    greedy, scores, keep = filter_scores_reference(logits, *params)
    lowest_kept = torch.where(keep, scores, torch.inf).argmin(dim=-1)
    assert torch.equal(tokens[~greedy], lowest_kept[~greedy])


@pytest.mark.parametrize("rows_per_program", [1, 2, 8])
def test_kernel_tiles_of_rows_agree(device, rows_per_program, fresh_seed):
    """Row tiles (the small-vocabulary layout) and one row per program (the GPU's large-vocabulary one)."""
    rows = MIXED_ROWS * 2 + MIXED_ROWS[:3]  # 27 rows: a partial last tile
    logits = torch.randn(len(rows), 300) * 2
    params = row_params(rows)
    assert_same_tokens(
        logits,
        params,
        torch.empty_like(logits).exponential_(),
        rows_per_program=rows_per_program,
        device=device,
    )
    assert_same_tokens(
        logits,
        params,
        boundary_exponentials(logits, params),
        rows_per_program=rows_per_program,
        device=device,
    )


@pytest.mark.parametrize("num_pivots", [1, 2, 32])
def test_kernel_search_is_exact_for_any_pivot_count(device, num_pivots, fresh_seed):
    """One pivot is plain bisection on the ordered encoding; more pivots only take fewer passes."""
    logits = torch.randn(len(MIXED_ROWS), 1000) * 3
    params = row_params(MIXED_ROWS)
    assert_same_tokens(
        logits, params, boundary_exponentials(logits, params), num_pivots=num_pivots, device=device
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_matches_reference_low_precision_logits(device, dtype, fresh_seed):
    logits = (torch.randn(len(MIXED_ROWS), 1000) * 3).to(dtype)
    params = row_params(MIXED_ROWS)
    assert_same_tokens(logits, params, torch.empty(logits.shape).exponential_(), device=device)
    assert_same_tokens(logits, params, boundary_exponentials(logits, params), device=device)


def test_kernel_matches_reference_with_ties(device, fresh_seed):
    """Rounded logits tie everywhere, the top-k and top-p boundaries included; both sides keep whole ties."""
    rows = [r for r in MIXED_ROWS if r[0] > 0] * 4
    logits = (torch.randn(len(rows), 1000) * 3).round()
    params = row_params(rows)
    for _ in range(3):
        assert_same_tokens(logits, params, torch.empty_like(logits).exponential_(), device=device)
    assert_same_tokens(logits, params, boundary_exponentials(logits, params), device=device)


def test_kernel_takes_strided_rows(device, fresh_seed):
    """Last-position logits of a [B, T, V] output are a strided view; the kernel reads it in place."""
    logits = torch.randn(len(MIXED_ROWS), 3, 500)[:, -1]
    params = row_params(MIXED_ROWS)
    assert_same_tokens(logits, params, torch.empty(logits.shape).exponential_(), device=device)


def test_greedy_ties_go_to_the_lowest_index(device):
    vocab = 151_936
    logits = torch.randn(2, vocab)
    logits[0, [70_000, 150_000]] = 50.0  # tied maximum, far apart (different blocks)
    logits[1, [3, 7, 100_000]] = 50.0
    params = row_params([(0.0, 0, 1.0, 0.0), (0.0, 0, 1.0, 0.0)])
    expected = torch.tensor([70_000, 3])
    assert torch.equal(sample_tokens_reference(logits, *params), expected)
    assert torch.equal(kernel(logits, params, torch.zeros(2), torch.zeros(2), device=device), expected)


# ---- the reference's semantics ------------------------------------------------------------------------


@pytest.mark.parametrize("vocab", [1000, 151_936])
def test_reference_equals_warp_logits_row_by_row(vocab, fresh_seed):
    """On continuous logits (no ties) the kept set and the race's token equal transformers' warpers'."""
    logits = torch.randn(len(MIXED_ROWS), vocab) * 3
    params = row_params(MIXED_ROWS)
    greedy, _, keep = filter_scores_reference(logits, *params)
    for exps in (torch.empty_like(logits).exponential_(), boundary_exponentials(logits, params)):
        tokens = sample_tokens_reference(logits, *params, exponentials=exps)
        for b, row in enumerate(MIXED_ROWS):
            if greedy[b]:
                assert tokens[b] == logits[b].argmax()
                continue
            warped = warp_logits(logits[b : b + 1], as_sampling_params(row))[0]
            assert torch.equal(keep[b], torch.isfinite(warped)), row
            assert tokens[b] == (warped - exps[b].log()).argmax(), row


def test_tie_rules(device):
    logits = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, 0.0], [2.0, 1.0, 1.0, 1.0, 0.0, -1.0]])
    # top-k = 2: the 2nd largest is 3, tied with two more tokens: all three stay (as in transformers).
    _, _, keep = filter_scores_reference(logits[:1], *row_params([(1.0, 2, 1.0, 0.0)]))
    assert keep[0].tolist() == [False, True, True, False, True, False]
    # top-p = 0.6: token 0 has 45% of the mass, so each token valued 1 has 45% strictly above it (< 60%):
    # the three tied tokens stay together; the 0 and -1 (94% and 99% above) go.
    _, _, keep = filter_scores_reference(logits[1:], *row_params([(1.0, 0, 0.6, 0.0)]))
    assert keep[0].tolist() == [True, True, True, True, False, False]
    # top-p = 0 keeps the maximum and its ties.
    _, _, keep = filter_scores_reference(logits[:1], *row_params([(1.0, 0, 0.0, 0.0)]))
    assert keep[0].tolist() == [False, True, True, False, True, False]
    # The kernel keeps the same sets: 200 draws of each row find the same tokens.
    draws = 200
    batch = logits.repeat(draws, 1)
    params = row_params([(1.0, 2, 1.0, 0.0), (1.0, 0, 0.6, 0.0)] * draws)
    tokens = assert_same_tokens(batch, params, torch.empty_like(batch).exponential_(), device=device)
    assert set(tokens[0::2].tolist()) == {1, 2, 4} and set(tokens[1::2].tolist()) == {0, 1, 2, 3}


# ---- statistics -----------------------------------------------------------------------------------------

STAT_LOGITS = torch.tensor([2.0, -0.3, 1.1, 0.4, -1.6, 1.6, 0.0, -0.8, 0.8, -2.2, 0.2, -1.1])
STAT_DRAWS = 20_000
# Noise alone gives a total variation of about 0.004-0.008 at 20k draws; a temperature off by 25% moves these
# distributions by >= 0.047 and dropping their top-p by >= 0.036 (asserted below), so they fail this bound.
TV_BOUND = 0.022
STAT_CONFIGS = [
    SamplingParams(temperature=0.7),
    SamplingParams(top_p=0.8),
    SamplingParams(temperature=0.6, top_k=8, top_p=0.9, min_p=0.05),
    SamplingParams(temperature=1.4, min_p=0.1),
    SamplingParams(top_k=5),
]


def target_distribution(params: SamplingParams) -> torch.Tensor:
    return warp_logits(STAT_LOGITS[None], params).softmax(dim=-1)[0].double()


def total_variation(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * (p - q).abs().sum().item()


def stat_batch(params: SamplingParams, draws: int) -> tuple[torch.Tensor, ...]:
    rule = (params.temperature, params.top_k or 0, params.top_p or 1.0, params.min_p or 0.0)
    return (STAT_LOGITS.expand(draws, -1).contiguous(), *row_params([rule] * draws))


def check_frequencies(tokens: torch.Tensor, params: SamplingParams) -> None:
    expected = target_distribution(params)
    counts = torch.bincount(tokens, minlength=len(STAT_LOGITS)).double()
    observed = counts / len(tokens)
    assert counts[expected == 0].sum() == 0  # never a filtered-out token
    stderr = (expected * (1 - expected) / len(tokens)).sqrt()
    assert ((observed - expected).abs() <= 5 * stderr + 1e-4).all(), (observed, expected)
    assert total_variation(observed, expected) < TV_BOUND, (observed, expected)


@pytest.mark.parametrize("params", STAT_CONFIGS, ids=str)
def test_stat_bound_has_power(params):
    """The TV bound rejects a temperature off by 25% and a missing top-p."""
    expected = target_distribution(params)
    for temperature in (params.temperature * 1.25, params.temperature / 1.25):
        wrong = target_distribution(dataclasses.replace(params, temperature=temperature))
        assert total_variation(wrong, expected) > 1.5 * TV_BOUND
    if params.top_p is not None:
        assert (
            total_variation(target_distribution(dataclasses.replace(params, top_p=None)), expected)
            > 1.5 * TV_BOUND
        )


@pytest.mark.parametrize("params", STAT_CONFIGS, ids=str)
def test_reference_samples_the_warped_distribution(params, fresh_seed):
    generator = torch.Generator().manual_seed(fresh_seed)
    tokens = sample_tokens_reference(*stat_batch(params, STAT_DRAWS), generator=generator)
    check_frequencies(tokens, params)


@pytest.mark.parametrize("params", STAT_CONFIGS, ids=str)
def test_kernel_philox_samples_the_warped_distribution(device, params, fresh_seed):
    """In-kernel Philox draws: one seed per row (offset 0), rows batched 20k at a time."""
    seeds = fresh_seed * 100_003 + torch.arange(STAT_DRAWS)
    logits, *rules = stat_batch(params, STAT_DRAWS)
    tokens = kernel(logits, rules, seeds, torch.zeros(STAT_DRAWS, dtype=torch.int64), device=device)
    check_frequencies(tokens, params)


def test_kernel_philox_offsets_stream_one_seed(device, fresh_seed):
    """One seed for every row, offsets V apart (the documented way to share a seed): the same distribution."""
    params = STAT_CONFIGS[2]
    vocab = len(STAT_LOGITS)
    seeds = torch.full((STAT_DRAWS,), fresh_seed, dtype=torch.int64)
    offsets = torch.arange(STAT_DRAWS, dtype=torch.int64) * vocab
    logits, *rules = stat_batch(params, STAT_DRAWS)
    check_frequencies(kernel(logits, rules, seeds, offsets, device=device), params)


def test_kernel_seeds_and_offsets(device, fresh_seed):
    rows = 64
    logits = torch.randn(rows, 1000)
    params = row_params([(1.0, 0, 1.0, 0.0)] * rows)
    seeds = torch.randint(0, 2**62, (rows,))
    offsets = torch.randint(0, 2**40, (rows,))

    def draw(logits, seeds, offsets, **kwargs):
        return kernel(logits, params, seeds, offsets, device=device, **kwargs)

    first = draw(logits, seeds, offsets)
    assert torch.equal(first, draw(logits, seeds.clone(), offsets.clone()))
    # A row's draws depend only on its own seed and offset, not on how rows are tiled.
    assert torch.equal(first, draw(logits, seeds, offsets, rows_per_program=1))
    # Near-flat rows over 1000 tokens: a fresh draw repeats a row's token with probability about 1e-3.
    assert (first != draw(logits, seeds + 1, offsets)).sum() > rows // 2
    assert (first != draw(logits, seeds, offsets + 1000)).sum() > rows // 2
    # Rows with the same logits but their own seeds draw different tokens.
    same_logits = logits[:1].expand(rows, -1).contiguous()
    assert draw(same_logits, seeds, offsets).unique().numel() > rows // 2


def test_reference_generator_reproduces(fresh_seed):
    logits = torch.randn(len(MIXED_ROWS), 1000)
    params = row_params(MIXED_ROWS)

    def draw(seed: int) -> torch.Tensor:
        return sample_tokens_reference(logits, *params, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(draw(fresh_seed), draw(fresh_seed))
    assert not torch.equal(draw(fresh_seed), draw(fresh_seed + 1))


# ---- dispatch and validation ----------------------------------------------------------------------------


def test_sample_tokens_dispatch(device, monkeypatch, fresh_seed):
    monkeypatch.delenv("EFFDECODE_BACKEND", raising=False)
    logits = torch.randn(len(MIXED_ROWS), 500)
    params = row_params(MIXED_ROWS)
    exps = torch.empty_like(logits).exponential_()
    seeds = offsets = torch.zeros(len(MIXED_ROWS), dtype=torch.int64)
    expected = sample_tokens_reference(logits, *params, exponentials=exps)
    on = [t.to(device) for t in (logits, *params, seeds, offsets, exps)]
    for backend in ("auto", "torch", "triton", "cuda"):
        assert torch.equal(sample_tokens(*on, backend=backend).cpu(), expected)
    # Without exponentials: the kernel's Philox draws, or torch's generator on the torch backend.
    triton_tokens = sample_tokens(*on[:-1], backend="triton").cpu()
    assert torch.equal(triton_tokens, kernel(logits, params, seeds, offsets, device=device))
    torch.manual_seed(fresh_seed)
    torch_tokens = sample_tokens(logits, *params, None, None, backend="torch")
    torch.manual_seed(fresh_seed)
    assert torch.equal(torch_tokens, sample_tokens_reference(logits, *params))


def test_rejects_bad_arguments():
    logits = torch.randn(2, 10)
    params = row_params([(1.0, 0, 1.0, 0.0)] * 2)
    short = row_params([(1.0, 0, 1.0, 0.0)])
    zeros = torch.zeros(2, dtype=torch.int64)
    for fn in (sample_tokens_reference, lambda *a: sample_tokens_triton(*a, zeros, zeros)):
        with pytest.raises(ValueError):
            fn(logits[0], *params)
        with pytest.raises(ValueError):
            fn(logits, short[0], *params[1:])
    with pytest.raises(ValueError):
        sample_tokens_triton(logits, *params, None, None)  # no random source
    with pytest.raises(ValueError):
        sample_tokens_triton(logits, *params, None, None, torch.ones(2, 9))
    empty = tuple(param[:0] for param in params)
    assert sample_tokens_triton(logits[:0], *empty, None, None).shape == (0,)
