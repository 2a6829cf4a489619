"""N-gram (prompt-lookup) drafting: propose the tokens that followed the last occurrence of a row's suffix.

Layout:

- ``tokens``: integer ``[slots, L]``, each slot's history (prompt then generated tokens), left-aligned; only
  the first ``lengths[slot]`` entries are meaningful, the rest are never read.
- ``lengths``: int32 ``[slots]``, history length per slot (``0 <= lengths[s] <= L``).
- ``rows``: int32 ``[B]``, the slots to propose for.

Rule, per row with history ``x`` of length ``len``: for ``n`` from ``max_ngram`` down to ``min_ngram``, take
the suffix ``x[len-n : len]`` and look for its most recent earlier occurrence, the largest start ``i`` with
``x[i : i+n] == x[len-n : len]`` and ``i + n <= len - 1`` (so the suffix itself never counts and at least one
token follows the occurrence). The first (largest) ``n`` with an occurrence wins and the proposal is
``x[i+n : min(i+n+num_draft, len)]``. A row with no occurrence at any ``n`` (or with ``len < min_ngram + 1``)
proposes nothing.

Both implementations index occurrences by their *end* ``e = i + n - 1``: the condition ``i + n <= len - 1`` is
``e <= len - 2`` whatever ``n`` is, and an occurrence of length ``n`` ending at ``e`` exists iff the run of
equal tokens ``x[e-m] == x[len-1-m]``, ``m = 0, 1, ...``, is at least ``n`` long. One pass of ``max_ngram``
comparisons per position thus answers every ``n`` at once.
"""

from __future__ import annotations

import torch

from effdecode.ops.backend import resolve_backend


def _check_args(
    tokens: torch.Tensor,
    lengths: torch.Tensor,
    rows: torch.Tensor,
    max_ngram: int,
    min_ngram: int,
    num_draft: int,
) -> None:
    """Shapes, dtypes and sizes only: nothing here reads device memory (no host sync)."""
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [slots, L], got shape {tuple(tokens.shape)}")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise TypeError(f"tokens must be an integer tensor, got {tokens.dtype}")
    if tuple(lengths.shape) != (tokens.shape[0],):
        raise ValueError(f"lengths must be [slots] = [{tokens.shape[0]}], got {tuple(lengths.shape)}")
    if rows.dim() != 1:
        raise ValueError(f"rows must be [B], got shape {tuple(rows.shape)}")
    for name, t in (("lengths", lengths), ("rows", rows)):
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
        if t.device != tokens.device:
            raise ValueError(f"{name} is on {t.device}, tokens on {tokens.device}")
    if not 1 <= min_ngram <= max_ngram:
        raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram=}, {max_ngram=}")
    if num_draft < 1:
        raise ValueError(f"num_draft must be >= 1, got {num_draft}")


def ngram_propose_reference(
    tokens: torch.Tensor,
    lengths: torch.Tensor,
    rows: torch.Tensor,
    max_ngram: int,
    min_ngram: int,
    num_draft: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of n-gram drafting, vectorized over rows and positions (no host sync).

    Costs ``O(B * L * max_ngram)`` work and ``O(B * L)`` memory: it compares every position, where the Triton
    kernel stops at the most recent longest match.

    Parameters
    ----------
    tokens : torch.Tensor
        Integer ``[slots, L]``, histories, left-aligned; entries at or past ``lengths[slot]`` are ignored.
    lengths : torch.Tensor
        int32 ``[slots]``, valid history length per slot; must lie in ``[0, L]`` (not checked: that would
        need a host sync).
    rows : torch.Tensor
        int32 ``[B]``, the slots to propose for (repeats allowed).
    max_ngram, min_ngram : int
        Suffix lengths tried, longest first; ``1 <= min_ngram <= max_ngram``.
    num_draft : int
        Most tokens proposed per row, ``>= 1``.

    Returns
    -------
    draft_tokens : torch.Tensor
        int64 ``[B, num_draft]``, left-aligned proposals, ``-1`` after the first ``draft_lens[b]``.
    draft_lens : torch.Tensor
        int32 ``[B]``, tokens proposed per row (0: no match).
    """
    _check_args(tokens, lengths, rows, max_ngram, min_ngram, num_draft)
    device = tokens.device
    batch, hist_len = rows.shape[0], tokens.shape[1]
    if batch == 0 or hist_len == 0:
        return (
            torch.full((batch, num_draft), -1, dtype=torch.int64, device=device),
            torch.zeros(batch, dtype=torch.int32, device=device),
        )
    rows_l = rows.long()
    hist = tokens.index_select(0, rows_l).long()  # [B, L]
    lens = lengths.to(device=device).long().index_select(0, rows_l)  # [B]
    pos = torch.arange(hist_len, device=device)

    # run[b, e]: the occurrence ending at e still matches the suffix after m + 1 comparisons; starts with the
    # positions allowed as ends at all (e <= len - 2: a token follows, and it is not the suffix itself).
    run = pos[None, :] <= (lens - 2)[:, None]
    best_end = torch.full((batch,), -1, dtype=torch.int64, device=device)
    for m in range(max_ngram):
        # Suffix token len-1-m. Clamping only matters when len-1-m < 0, i.e. m >= len: then every allowed end
        # e <= len-2 < m is masked by the e >= m condition below, so the clamped value is never used.
        target = hist.gather(1, (lens - 1 - m).clamp(min=0)[:, None])  # [B, 1]
        equal = torch.zeros_like(run)
        equal[:, m:] = hist[:, : hist_len - m] == target  # x[e - m] == x[len-1-m]; e < m has no x[e-m]
        run &= equal
        n = m + 1
        if n >= min_ngram:
            end = torch.where(run, pos, -1).amax(dim=1)  # most recent occurrence of the n-suffix
            # Longer suffixes come later in this loop, so a match at a larger n overrides a smaller one.
            best_end = torch.where(end >= 0, end, best_end)

    found = best_end >= 0
    draft_lens = torch.where(found, (lens - 1 - best_end).clamp(max=num_draft), 0)
    cols = torch.arange(num_draft, device=device)
    src = (best_end[:, None] + 1 + cols).clamp(0, hist_len - 1)
    draft_tokens = torch.where(cols < draft_lens[:, None], hist.gather(1, src), -1)
    return draft_tokens, draft_lens.to(torch.int32)


def ngram_propose(
    tokens: torch.Tensor,
    lengths: torch.Tensor,
    rows: torch.Tensor,
    max_ngram: int,
    min_ngram: int,
    num_draft: int,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """N-gram drafting: the Triton kernel on CUDA tensors (or when forced), the torch reference otherwise.

    Same parameters and results as :func:`ngram_propose_reference`, plus ``backend`` ("auto", "torch",
    "triton"; "cuda" has no kernel here and falls back like "auto"). Neither path synchronizes with the host.

    Parameters
    ----------
    tokens : torch.Tensor
        Integer ``[slots, L]``.
    lengths : torch.Tensor
        int32 ``[slots]``, in ``[0, L]``.
    rows : torch.Tensor
        int32 ``[B]``.
    max_ngram, min_ngram : int
        ``1 <= min_ngram <= max_ngram``.
    num_draft : int
        ``>= 1``.
    backend : str
        Requested implementation, resolved by :func:`effdecode.ops.backend.resolve_backend`.

    Returns
    -------
    tuple of torch.Tensor
        ``draft_tokens`` int64 ``[B, num_draft]`` (``-1`` padded) and ``draft_lens`` int32 ``[B]``.
    """
    if resolve_backend(backend, tokens.device, has_cuda_op=False, has_triton_op=True) == "triton":
        from effdecode.kernels.ngram import ngram_propose_triton

        return ngram_propose_triton(tokens, lengths, rows, max_ngram, min_ngram, num_draft)
    return ngram_propose_reference(tokens, lengths, rows, max_ngram, min_ngram, num_draft)


__all__ = ["ngram_propose", "ngram_propose_reference"]
