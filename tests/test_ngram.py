"""N-gram drafting: torch reference vs a plain per-row loop; Triton vs the reference on the ``device``
fixture (the CPU interpreter, or CUDA tensors on a GPU)."""

from __future__ import annotations

import random
import time

import pytest
import torch

from effdecode.kernels.ngram import ngram_propose_triton
from effdecode.ops.ngram import ngram_propose, ngram_propose_reference

# (max_ngram, min_ngram, num_draft)
CONFIGS = [(3, 1, 5), (4, 2, 3), (1, 1, 1), (5, 3, 8), (2, 2, 16)]


def _loop_propose(
    tokens: torch.Tensor,
    lengths: torch.Tensor,
    rows: torch.Tensor,
    max_ngram: int,
    min_ngram: int,
    num_draft: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rule spelled out row by row, on Python lists: obviously correct, and slow."""
    drafts, draft_lens = [], []
    for slot in rows.tolist():
        length = int(lengths[slot])
        x = tokens[slot, :length].tolist()
        proposal: list[int] = []
        for n in range(max_ngram, min_ngram - 1, -1):
            if length < n + 1:
                continue
            suffix = x[length - n :]
            # Most recent earlier occurrence: largest start i with i + n <= length - 1.
            hits = [i for i in range(length - n) if x[i : i + n] == suffix]
            if hits:
                i = max(hits)
                proposal = x[i + n : min(i + n + num_draft, length)]
                break
        draft_lens.append(len(proposal))
        drafts.append(proposal + [-1] * (num_draft - len(proposal)))
    return (
        torch.tensor(drafts, dtype=torch.int64).reshape(len(drafts), num_draft),
        torch.tensor(draft_lens, dtype=torch.int32),
    )


def _random_histories(
    slots: int, width: int, vocab: int, max_ngram: int, gen: random.Random
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random histories ``[slots, width]`` with copies of each suffix planted earlier, at several lengths.

    Lengths cover the edge cases (0, 1, 2, ``width``) and random ones. Stale tokens past a length are random
    too, so an implementation reading them would show.
    """
    seeded = torch.Generator().manual_seed(gen.getrandbits(63))
    tokens = torch.randint(0, vocab, (slots, width), generator=seeded)
    lengths = [min(width, v) for v in (0, 1, 2, width)] + [gen.randint(0, width) for _ in range(slots - 4)]
    gen.shuffle(lengths)
    for slot, length in enumerate(lengths):
        # Plant copies of the last k tokens (k up to max_ngram + 1) at random earlier, non-overlapping places:
        # matches at several n then exist, the longer ones not always the most recent.
        for _ in range(gen.randint(0, 3)):
            k = gen.randint(1, max_ngram + 1)
            if length < 2 * k + 1:
                continue
            start = gen.randint(0, length - 2 * k)
            tokens[slot, start : start + k] = tokens[slot, length - k : length].clone()
    return tokens, torch.tensor(lengths, dtype=torch.int32)


def _random_rows(slots: int, gen: random.Random) -> torch.Tensor:
    """A shuffled subset of the slots, with one slot repeated (allowed: proposals only read)."""
    rows = list(range(slots))
    gen.shuffle(rows)
    rows = rows[: max(1, slots - 2)]
    rows.append(rows[0])
    return torch.tensor(rows, dtype=torch.int32)


@pytest.mark.parametrize("max_ngram,min_ngram,num_draft", CONFIGS)
@pytest.mark.parametrize("vocab", [3, 40])
def test_reference_matches_loop(fresh_seed, max_ngram, min_ngram, num_draft, vocab):
    gen = random.Random(fresh_seed)
    tokens, lengths = _random_histories(10, 60, vocab, max_ngram, gen)
    rows = _random_rows(10, gen)
    got = ngram_propose_reference(tokens, lengths, rows, max_ngram, min_ngram, num_draft)
    want = _loop_propose(tokens, lengths, rows, max_ngram, min_ngram, num_draft)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert got[0].dtype == torch.int64 and got[1].dtype == torch.int32


@pytest.mark.parametrize("max_ngram,min_ngram,num_draft", CONFIGS)
@pytest.mark.parametrize("vocab", [3, 40])
def test_triton_matches_reference(device, fresh_seed, max_ngram, min_ngram, num_draft, vocab):
    gen = random.Random(fresh_seed)
    # Wider than one scan block, so the kernel walks several blocks and carries its best match across them.
    tokens, lengths = _random_histories(8, 2100, vocab, max_ngram, gen)
    rows = _random_rows(8, gen)
    got = _on_device(ngram_propose_triton, device, tokens, lengths, rows, max_ngram, min_ngram, num_draft)
    want = ngram_propose_reference(tokens, lengths, rows, max_ngram, min_ngram, num_draft)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert got[0].dtype == torch.int64 and got[1].dtype == torch.int32


IMPLS = {"reference": ngram_propose_reference, "triton": ngram_propose_triton}


def _on_device(fn, device, tokens, lengths, rows, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """``fn`` on ``device`` copies of the CPU inputs; the results back on the CPU."""
    drafts, draft_lens = fn(tokens.to(device), lengths.to(device), rows.to(device), *args, **kwargs)
    assert drafts.device.type == draft_lens.device.type == torch.device(device).type
    return drafts.cpu(), draft_lens.cpu()


def _propose(impl: str, device, history: list[int], max_ngram: int, min_ngram: int, num_draft: int):
    """Proposal of one hand-written history, checked against the loop as well."""
    tokens = torch.tensor([history], dtype=torch.int64)
    lengths = torch.tensor([len(history)], dtype=torch.int32)
    rows = torch.tensor([0], dtype=torch.int32)
    got = _on_device(IMPLS[impl], device, tokens, lengths, rows, max_ngram, min_ngram, num_draft)
    torch.testing.assert_close(
        got, _loop_propose(tokens, lengths, rows, max_ngram, min_ngram, num_draft), rtol=0, atol=0
    )
    return got[0][0, : int(got[1][0])].tolist()


@pytest.mark.parametrize("impl", IMPLS)
def test_hand_written_cases(device, impl):
    # Longest suffix wins over a more recent shorter one: (1 2 3) at 0 beats (2 3) at 5.
    assert _propose(impl, device, [1, 2, 3, 10, 9, 2, 3, 11, 7, 1, 2, 3], 3, 1, 2) == [10, 9]
    # Among equal lengths the most recent wins.
    assert _propose(impl, device, [4, 5, 20, 4, 5, 21, 4, 5], 2, 1, 3) == [21, 4, 5]
    # Proposal clipped at the end of the history: (6 7) at 1, followed by only 6 7.
    assert _propose(impl, device, [5, 6, 7, 6, 7], 2, 1, 4) == [6, 7]
    # A run of one token: the suffix may overlap its occurrence; most recent start is len - n - 1.
    assert _propose(impl, device, [9, 9, 9, 9, 9], 3, 1, 4) == [9]
    # No match at any n.
    assert _propose(impl, device, list(range(50)), 4, 1, 4) == []
    # min_ngram excludes the only (short) match.
    assert _propose(impl, device, [1, 2, 8, 3, 2], 3, 2, 4) == []
    assert _propose(impl, device, [1, 2, 8, 3, 2], 3, 1, 4) == [8, 3, 2]


@pytest.mark.parametrize("impl", IMPLS)
def test_short_histories(device, impl):
    # len < n + 1 for every n: nothing, even though the tokens repeat.
    for history in ([], [7], [7, 7]):
        assert _propose(impl, device, history, 3, 2, 4) == []
    # len == n + 1 exactly: the suffix's only earlier start is 0.
    assert _propose(impl, device, [7, 7], 1, 1, 4) == [7]
    assert _propose(impl, device, [7, 7, 7], 2, 1, 4) == [7]
    # Too short for n = 3, long enough for n = 2.
    assert _propose(impl, device, [3, 4, 3, 4], 3, 1, 4) == [3, 4]


@pytest.mark.parametrize("impl", IMPLS)
def test_rows_of_different_lengths(device, impl):
    width = 30
    histories = [[1, 2, 3, 4, 1, 2], [5, 6, 5], [8], list(range(100, 130)), [2, 2, 3, 2, 2]]
    tokens = torch.randint(0, 5, (len(histories), width))  # stale tokens past each length
    for slot, history in enumerate(histories):
        tokens[slot, : len(history)] = torch.tensor(history)
    lengths = torch.tensor([len(h) for h in histories], dtype=torch.int32)
    rows = torch.tensor([4, 2, 0, 3, 1], dtype=torch.int32)
    drafts, draft_lens = _on_device(IMPLS[impl], device, tokens, lengths, rows, 2, 1, 3)
    assert draft_lens.tolist() == [3, 0, 3, 0, 2]
    assert drafts.tolist() == [[3, 2, 2], [-1] * 3, [3, 4, 1], [-1] * 3, [6, 5, -1]]


def test_long_history_triton(device, fresh_seed):
    """5000 tokens: a full scan to a match near the start, an early exit near the end, and no match."""
    gen = torch.Generator().manual_seed(fresh_seed)
    width, max_ngram = 5000, 4
    tokens = torch.randperm(10**6, generator=gen)[: 3 * width].reshape(3, width)  # distinct: no match
    lengths = torch.tensor([width, width - 7, width], dtype=torch.int32)
    # Row 0: its 4-suffix occurs at 3 only, its 1-suffix also near the end (which must lose).
    tokens[0, 3:7] = tokens[0, width - 4 :]
    tokens[0, width - 20] = tokens[0, width - 1]
    # Row 1: its 4-suffix occurs right before it, so the scan stops in the first block.
    end = width - 7
    tokens[1, end - 9 : end - 5] = tokens[1, end - 4 : end]
    rows = torch.tensor([0, 1, 2], dtype=torch.int32)

    start = time.perf_counter()
    got = _on_device(ngram_propose_triton, device, tokens, lengths, rows, max_ngram, 1, 5)
    elapsed = time.perf_counter() - start
    torch.testing.assert_close(
        got, ngram_propose_reference(tokens, lengths, rows, max_ngram, 1, 5), rtol=0, atol=0
    )
    assert got[1].tolist() == [5, 5, 0]
    assert got[0][0].tolist() == tokens[0, 7:12].tolist()
    assert got[0][1].tolist() == tokens[1, end - 5 : end].tolist()
    assert elapsed < 20, f"interpreted kernel took {elapsed:.1f} s on 5000 tokens"


def test_strided_tokens_and_dispatch(device, fresh_seed):
    gen = random.Random(fresh_seed)
    tokens, lengths = _random_histories(6, 50, 4, 3, gen)
    strided = tokens.t().contiguous().t()  # same values, column-major strides
    rows = _random_rows(6, gen)
    want = ngram_propose_reference(tokens, lengths, rows, 3, 1, 4)
    for got in (
        _on_device(ngram_propose_triton, device, strided, lengths, rows, 3, 1, 4),
        _on_device(ngram_propose, device, tokens, lengths, rows, 3, 1, 4, backend="triton"),
        _on_device(ngram_propose, device, tokens, lengths, rows, 3, 1, 4, backend="torch"),
        _on_device(ngram_propose, device, tokens, lengths, rows, 3, 1, 4),  # auto: Triton on CUDA
    ):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_batch(device, impl):
    tokens = torch.zeros(3, 8, dtype=torch.int64)
    lengths = torch.full((3,), 8, dtype=torch.int32)
    empty = torch.zeros(0, dtype=torch.int32)
    drafts, draft_lens = _on_device(IMPLS[impl], device, tokens, lengths, empty, 3, 1, 4)
    assert drafts.shape == (0, 4) and draft_lens.shape == (0,)


def test_argument_checks():
    tokens = torch.zeros(2, 8, dtype=torch.int64)
    lengths = torch.zeros(2, dtype=torch.int32)
    rows = torch.zeros(1, dtype=torch.int32)
    with pytest.raises(ValueError, match="min_ngram"):
        ngram_propose(tokens, lengths, rows, 2, 3, 4)
    with pytest.raises(ValueError, match="min_ngram"):
        ngram_propose(tokens, lengths, rows, 2, 0, 4)
    with pytest.raises(ValueError, match="num_draft"):
        ngram_propose(tokens, lengths, rows, 2, 1, 0)
    with pytest.raises(ValueError, match="lengths"):
        ngram_propose(tokens, lengths[:1], rows, 2, 1, 4)
    with pytest.raises(TypeError, match="tokens"):
        ngram_propose(tokens.float(), lengths, rows, 2, 1, 4)
    with pytest.raises(ValueError, match="tokens"):
        ngram_propose(tokens[0], lengths, rows, 2, 1, 4)
