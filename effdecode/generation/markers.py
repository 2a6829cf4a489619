"""Token-id markers (think tags, triggers, forced text): resolving them and finding them in sequences."""

from __future__ import annotations

from collections.abc import Sequence

import torch

OPEN_END = 1 << 62  # the span end of a row still thinking


def resolve_marker(marker: str | Sequence[int] | None, tokenizer, name: str) -> list[int] | None:
    """Token ids of a marker given as text (encoded without special tokens) or as ids; None stays None.

    Raises
    ------
    ValueError
        Text without a tokenizer, or a marker that encodes to no token.
    """
    if marker is None:
        return None
    if isinstance(marker, str):
        if tokenizer is None:
            raise ValueError(
                f"DecodeConfig.{name}={marker!r} is text and needs the tokenizer: "
                "pass generate(..., tokenizer=tokenizer) or give token ids"
            )
        ids = tokenizer.encode(marker, add_special_tokens=False)
    else:
        ids = [int(token) for token in marker]
    if not ids:
        raise ValueError(f"DecodeConfig.{name}={marker!r} encodes to no token")
    return list(ids)


def last_occurrence(tokens: list[int], marker: list[int]) -> int:
    """Index just past the last occurrence of ``marker`` in ``tokens``, or -1 (host lists, used once)."""
    width = len(marker)
    for end in range(len(tokens), width - 1, -1):
        if tokens[end - width : end] == marker:
            return end
    return -1


def ends_with(
    sequences: torch.Tensor, rows: torch.Tensor, ends: torch.Tensor, marker: torch.Tensor
) -> torch.Tensor:
    """bool ``[B]``: row ``rows[b]`` of ``sequences`` has ``marker`` ending at column ``ends[b]`` (inclusive).

    Parameters
    ----------
    sequences : torch.Tensor
        int64 ``[slots, W]``.
    rows : torch.Tensor
        int64 ``[B]``.
    ends : torch.Tensor
        int64 ``[B]``, column of each row's last token.
    marker : torch.Tensor
        int64 ``[M]``.
    """
    width = marker.shape[0]
    columns = ends[:, None] - (width - 1) + torch.arange(width, device=ends.device)[None, :]
    window = sequences[rows[:, None], columns.clamp(min=0)]
    return ((window == marker[None, :]) & (columns >= 0)).all(dim=1)


def first_marker_end(
    sequences: torch.Tensor,
    rows: torch.Tensor,
    ends: torch.Tensor,
    emitted: torch.Tensor,
    num_emitted: torch.Tensor,
    marker: torch.Tensor,
) -> torch.Tensor:
    """int64 ``[B]``: the first emitted column at which ``marker`` ends, or ``T`` where it ends at none.

    Row ``b`` is ``sequences[rows[b], : ends[b] + 1]`` followed by its first ``num_emitted[b]`` tokens of
    ``emitted`` ``[B, T]``; a marker may start in the sequence and end in the emitted tokens.
    """
    width = marker.shape[0]
    num_cols = emitted.shape[1]
    if width > 1:
        before = ends[:, None] - (width - 2) + torch.arange(width - 1, device=ends.device)[None, :]
        tail = sequences[rows[:, None], before.clamp(min=0)].masked_fill(before < 0, -1)
        joined = torch.cat([tail, emitted], dim=1)  # [B, width - 1 + T]
    else:
        joined = emitted
    windows = joined.unfold(1, width, 1)  # [B, T, width]: window j ends at emitted column j
    present = torch.arange(num_cols, device=emitted.device)[None, :] < num_emitted[:, None]
    hit = (windows == marker[None, None, :]).all(dim=2) & present
    return torch.where(hit.any(dim=1), hit.long().argmax(dim=1), num_cols)
