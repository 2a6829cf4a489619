"""transformers' view of the batch for user logits processors and stopping criteria.

transformers hands every ``LogitsProcessor`` and ``StoppingCriteria`` the whole batch at every step:
``input_ids`` ``[B, T]`` (a finished row keeps its place, padded with ``pad_token_id`` after its end) and
``scores`` ``[B, V]``; row ``i`` is always row ``i``, so a hook may keep per-row state (lm-eval's
``MultiTokenEOSCriteria`` does). effdecode's loop runs only the live rows (``rows``, slot indices). These
functions build the full-batch tensors around a step's live rows and map the hooks' per-row results back.
They are only called when the user gave processors or criteria, so the plain path keeps its speed.

The loop's ``sequences`` buffer is filled with ``pad_token_id`` and a row that left is never written again,
so its first ``prompt_width + step`` columns already are transformers' ``input_ids`` (finished rows padded
as transformers pads them): :func:`full_batch_ids` is a view, not a copy. Rows that left have no logits in
the step: their score rows are ``fill`` (0 by default; transformers would hold logits computed after a pad
token, which nothing uses since the row's token is replaced by the pad).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def full_batch_ids(sequences: torch.Tensor, width: int) -> torch.Tensor:
    """transformers' ``input_ids`` ``[B, width]`` from the loop's pad-filled ``sequences`` ``[B, >= width]``.

    For loops where every live row advances by the same number of tokens per step (plain decoding), so
    that column ``c`` is the same step for every row, as in transformers.
    """
    return sequences[:, :width]


def ragged_full_batch_ids(
    sequences: torch.Tensor, rows: torch.Tensor, ends: torch.Tensor, width: int, pad_token_id: int
) -> torch.Tensor:
    """``[B, width]`` ids when live rows advanced by different counts (thinking control, speculation).

    Each live row ``rows[j]`` shows the window of its tokens ending at its last token (column ``ends[j]``),
    right-aligned and left-filled with ``pad_token_id``, so suffix checks (stop strings, lm-eval's look-back)
    see each row's newest tokens in the last columns, as in transformers. Rows not in ``rows`` show their
    first ``width`` columns (their tokens, then pads).

    Parameters
    ----------
    sequences : torch.Tensor
        int64 ``[B, L]``, the loop's buffer (pad after each row's end).
    rows : torch.Tensor
        int64 ``[R]``, slots of the live rows.
    ends : torch.Tensor
        int64 ``[R]``, column of each live row's last token.
    """
    ids = sequences[:, :width].clone()
    index = ends[:, None] - (width - 1) + torch.arange(width, device=ends.device)[None, :]
    windows = sequences[rows[:, None], index.clamp(min=0)].masked_fill(index < 0, pad_token_id)
    ids[rows] = windows
    return ids


def scatter_rows(
    values: torch.Tensor, rows: torch.Tensor, batch_size: int, fill: float = 0.0
) -> torch.Tensor:
    """``[batch_size, ...]`` with ``values[j]`` at row ``rows[j]`` and ``fill`` elsewhere (no host sync)."""
    full = values.new_full((batch_size, *values.shape[1:]), fill)
    return full.index_copy_(0, rows, values)


def gather_rows(full: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``full[rows]``: the live rows' part of a full-batch result."""
    return full.index_select(0, rows)


def apply_processors(
    processors: Sequence, ids: torch.Tensor, scores: torch.Tensor, rows: torch.Tensor
) -> torch.Tensor:
    """Run user ``LogitsProcessor``s on the full batch; return the live rows' processed scores ``[R, V]``.

    Parameters
    ----------
    processors : sequence of callables ``(input_ids [B, T], scores [B, V]) -> [B, V]``
    ids : torch.Tensor
        int64 ``[B, T]``, from :func:`full_batch_ids` / :func:`ragged_full_batch_ids`.
    scores : torch.Tensor
        float ``[R, V]``, the live rows' scores so far.
    rows : torch.Tensor
        int64 ``[R]``, their slots.
    """
    if not processors:
        return scores
    full = scatter_rows(scores, rows, ids.shape[0])
    for processor in processors:
        full = processor(ids, full)
    return gather_rows(full, rows)


def criteria_hit(
    criteria: Sequence, ids: torch.Tensor, scores: torch.Tensor | None, rows: torch.Tensor
) -> torch.Tensor:
    """OR of user ``StoppingCriteria`` over the full batch, for the live rows: bool ``[R]``.

    A criterion may return a bool ``[B]`` tensor or one Python bool for the whole batch (lm-eval's
    ``MultiTokenEOSCriteria`` returns True once every row is done), as transformers accepts.
    """
    batch_size = ids.shape[0]
    full_scores = scatter_rows(scores, rows, batch_size) if scores is not None else None
    hit = torch.zeros(batch_size, dtype=torch.bool, device=ids.device)
    for criterion in criteria:
        result = criterion(ids, full_scores)
        if not isinstance(result, torch.Tensor):
            result = torch.full((batch_size,), bool(result), dtype=torch.bool, device=ids.device)
        hit |= result.to(device=ids.device, dtype=torch.bool).expand(batch_size)
    return gather_rows(hit, rows)


def live_view(state, width: int) -> torch.Tensor:
    """transformers' ``input_ids`` ``[B, width]`` for a :class:`~effdecode.generation.state.DecodeState`.

    Row ``i`` is request row ``i``. Each live row shows its last ``width`` tokens (with every row at the same
    length, plain decoding, that is exactly ``sequences[:, :width]``); rows that left show their tokens, then
    pads; with ``DecodeConfig.max_slots``, rows still waiting for a slot show their prompt, then pads. Pair it
    with ``state.requests_long`` (the live rows' request rows) for the hooks' per-row results.
    """
    return state.full_view(width)


def length_groups(state, rows: torch.Tensor, fresh: bool = False) -> list[tuple[int, torch.Tensor | None]]:
    """The rows ``rows`` (int64 ``[R]`` slots) grouped by their new-token counts: ``(width, index)`` pairs,
    ``width`` the columns of transformers' ``input_ids`` for those rows (prompt width plus their count, at
    most ``max_new_tokens``) and ``index`` their positions in ``rows`` (None: all of them).

    transformers runs every row of a batch at the same step, so a hook sees each row's whole history: the
    padded prompt and exactly its new tokens. Where live rows hold different counts (``state.ragged``: rows
    admitted after the first step, thinking control) each count gets its own view; that costs one small
    device-to-host copy of the counts, only when the user gave hooks. ``fresh``: rows just prefilled (no new
    token yet).
    """
    if fresh:
        return [(state.prompt_width, None)]
    if not state.ragged:  # every row at the same step: one view, as wide as the longest row's history
        return [(state.prompt_width + min(state.width_bound, state.max_new), None)]
    counts = state.new_tokens.index_select(0, rows).clamp(max=state.max_new).cpu().numpy()
    widths = np.unique(counts)
    if len(widths) == 1:
        return [(state.prompt_width + int(widths[0]), None)]
    device = rows.device
    return [
        (state.prompt_width + int(count), torch.as_tensor(np.flatnonzero(counts == count), device=device))
        for count in widths
    ]


def user_views_by_length(
    state, rows: torch.Tensor, requests: torch.Tensor, fresh: bool = False
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """transformers' views for user logits processors: ``(ids [B, W], request rows, index)`` per group of
    :func:`length_groups` (``requests`` int64 ``[R]``, the request rows of ``rows``)."""
    views = []
    for width, index in length_groups(state, rows, fresh):
        group = requests if index is None else requests.index_select(0, index)
        views.append((live_view(state, width), group, index))
    return views


def apply_processors_by_length(processors: Sequence, views: list, scores: torch.Tensor) -> torch.Tensor:
    """:func:`apply_processors` on each view of :func:`user_views_by_length`; ``scores`` ``[R, V]``."""
    if len(views) == 1 and views[0][2] is None:
        ids, requests, _ = views[0]
        return apply_processors(processors, ids, scores, requests)
    out = scores.clone()
    for ids, requests, index in views:
        out.index_copy_(0, index, apply_processors(processors, ids, scores.index_select(0, index), requests))
    return out
