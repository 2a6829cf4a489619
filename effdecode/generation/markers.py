"""Token-id markers (think tags, triggers, forced text): resolving them and finding them in sequences."""

from __future__ import annotations

from collections.abc import Sequence

import torch


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
