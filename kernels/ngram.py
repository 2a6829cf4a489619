"""Triton n-gram drafting: per row, find the most recent longest match of its suffix and copy what followed.

Follows the contract of :mod:`effdecode.ops.ngram` (see its module docstring for the rule and the layout).

Design
------
Grid ``(B,)``: one program per row, scanning the row's history from the end towards the start in blocks of
``BLOCK`` candidate *ends* ``e`` (the last position of an earlier occurrence; allowed ends are
``e <= len - 2`` for every ``n``). For each block the program computes the match length ``r[e]`` (capped at
``max_ngram``) by ``max_ngram`` comparisons ``x[e - m] == x[len - 1 - m]``; a comparison is only loaded for
ends still matching, so after the first one (which filters out all but about ``1/vocab`` of the ends) the
remaining loads are mostly masked off. Priority is "longest ``n`` first, then most recent", and blocks are
visited most recent first, so a block replaces the best match only with a strictly longer one. The scan stops
as soon as a match of length ``max_ngram`` is found (nothing can beat it) or the history is exhausted.

Cost: ``O(len * max_ngram)`` per row in the worst case (no full-length match), one pass over the history,
never ``O(len^2)``; rows whose recent text repeats itself stop after a block or two.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from effdecode.ops.ngram import _check_args

# Candidate ends per block: 8 int64 lanes per thread at 4 warps, large enough that a 32k-token history is
# only 32 sequential steps.
_BLOCK = 1024


@triton.jit
def _ngram_propose_kernel(
    tokens_ptr, lengths_ptr, rows_ptr, draft_ptr, draft_lens_ptr,
    stride_s, stride_t, min_ngram, num_draft,
    MAX_NGRAM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    slot = tl.load(rows_ptr + b).to(tl.int64)
    length = tl.load(lengths_ptr + slot).to(tl.int32)
    base = tokens_ptr + slot * stride_s
    offs = tl.arange(0, BLOCK)

    # Loop-carried scalars, created as int32 tensors so their type is the same on every iteration.
    best_n = length * 0  # longest match found so far (0: none)
    best_e = best_n - 1  # its end
    e_hi = length - 2  # highest end of the current block
    while (e_hi >= 0) & (best_n < MAX_NGRAM):
        e = e_hi - offs  # descending ends; negative ones fall out through `src >= 0` below
        run = e >= 0
        r = tl.zeros([BLOCK], dtype=tl.int32)
        for m in tl.static_range(MAX_NGRAM):
            # Suffix token len-1-m (a scalar load, served from cache after the first block). When it does not
            # exist (m >= len) no allowed end survives anyway: e <= len-2 < m makes e - m negative.
            target = tl.load(base + (length - 1 - m) * stride_t, mask=length - 1 - m >= 0, other=0)
            src = e - m
            live = run & (src >= 0)
            x = tl.load(base + src * stride_t, mask=live, other=0)
            run = live & (x == target)
            r += run.to(tl.int32)
        score = tl.where(r >= min_ngram, r, 0)
        block_n = tl.max(score, 0)
        block_e = tl.max(tl.where((score == block_n) & (score > 0), e, -1), 0)
        # Equal length: keep the earlier block's end, which is more recent.
        better = block_n > best_n
        best_e = tl.where(better, block_e, best_e)
        best_n = tl.where(better, block_n, best_n)
        e_hi -= BLOCK

    draft_len = tl.where(best_n > 0, tl.minimum(length - 1 - best_e, num_draft), 0)
    offs_d = tl.arange(0, BLOCK_D)
    take = offs_d < draft_len
    proposal = tl.load(base + (best_e + 1 + offs_d) * stride_t, mask=take, other=0).to(tl.int64)
    proposal = tl.where(take, proposal, -1)
    tl.store(draft_ptr + b.to(tl.int64) * num_draft + offs_d, proposal, mask=offs_d < num_draft)
    tl.store(draft_lens_ptr + b, draft_len)


def ngram_propose_triton(
    tokens: torch.Tensor,
    lengths: torch.Tensor,
    rows: torch.Tensor,
    max_ngram: int,
    min_ngram: int,
    num_draft: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """N-gram drafting in one Triton launch, one program per row.

    Same contract as :func:`effdecode.ops.ngram.ngram_propose_reference`.

    Parameters
    ----------
    tokens : torch.Tensor
        Integer ``[slots, L]``, any strides.
    lengths : torch.Tensor
        int32 ``[slots]``, valid history length per slot, in ``[0, L]`` (not checked).
    rows : torch.Tensor
        int32 ``[B]``, slots to propose for.
    max_ngram, min_ngram : int
        ``1 <= min_ngram <= max_ngram``; ``max_ngram`` is a compile-time constant of the kernel (one
        specialization per value).
    num_draft : int
        Most tokens proposed per row, ``>= 1``.

    Returns
    -------
    draft_tokens : torch.Tensor
        int64 ``[B, num_draft]``, ``-1`` padded.
    draft_lens : torch.Tensor
        int32 ``[B]``.
    """
    _check_args(tokens, lengths, rows, max_ngram, min_ngram, num_draft)
    batch = rows.shape[0]
    draft_tokens = torch.empty((batch, num_draft), dtype=torch.int64, device=tokens.device)
    draft_lens = torch.empty((batch,), dtype=torch.int32, device=tokens.device)
    if batch == 0:
        return draft_tokens, draft_lens
    if tokens.shape[1] == 0:  # lengths are all 0: nothing to scan (and no valid pointer to scan)
        return draft_tokens.fill_(-1), draft_lens.zero_()
    # fmt: off
    _ngram_propose_kernel[(batch,)](
        tokens, lengths, rows, draft_tokens, draft_lens,
        tokens.stride(0), tokens.stride(1), min_ngram, num_draft,
        MAX_NGRAM=max_ngram, BLOCK=_BLOCK, BLOCK_D=triton.next_power_of_2(num_draft),
        num_warps=4,
    )
    # fmt: on
    return draft_tokens, draft_lens


__all__ = ["ngram_propose_triton"]
