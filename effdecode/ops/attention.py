"""Attention over the slot KV cache, with the new keys and values appended in the same call.

Layout (the contract every implementation follows):

- ``k_cache``/``v_cache``: ``[slots, kv_heads, capacity, head_dim]``, one pair per layer.
- ``rows``: int32 ``[B]``, the slots of the rows in this forward (distinct).
- ``cache_lens``: int32 ``[slots]``, entries each slot holds *before* this call. Not modified here: the engine
  advances it once the step's tokens are accepted, so rolled-back tokens are simply never counted.
- ``q_lens``: int32 ``[B]``, valid new tokens per row, right-aligned in the ``T`` query columns: column ``t``
  of row ``b`` is valid iff ``t >= T - q_lens[b]``; it is written at cache index
  ``cache_lens[rows[b]] + t - (T - q_lens[b])`` and attends causally to all indices up to and including it.
  Columns left of the valid ones are padding: they write nothing and their output is unspecified.
- ``sliding_window``: if set, a query at cache index ``i`` only sees keys at indices ``> i - sliding_window``
  (HF's rule: the query itself and the ``sliding_window - 1`` keys before it). Cache indices are positions
  while nothing has been evicted; after a compaction the window spans the last ``sliding_window`` kept
  entries. transformers passes each layer's window per call (None on full-attention layers).
- ``softcap`` (Gemma 2): if set, each logit ``s = scale * q.k`` becomes ``softcap * tanh(s / softcap)`` before
  masking and softmax.
- ``sinks`` (gpt-oss, HF's ``s_aux``): ``[q_heads]`` learned logits, one per query head, that join every
  query's softmax denominator (``exp(sink_h)``) but attend to no value: the weights sum to less than one.
- ``scores_out`` (optional): float32 ``[slots, kv_heads, capacity]``. Every valid query column of row ``b``
  and every query head of kv head ``k``'s GQA group adds its softmax weight on key ``j`` to
  ``scores_out[rows[b], k, j]``, for each key it sees (old and new entries). It accumulates (eviction policies
  such as H2O sum attention mass over steps); entries no valid query sees are left bit-for-bit as they are.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from effdecode.ops.backend import requested_backend, resolve_backend
from effdecode.ops.flash_attention import flash_supported, flash_wanted, slot_attention_flash
from effdecode.ops.slot_batch import SlotBatch


def _write_indices(batch: SlotBatch, num_cols: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Where the new tokens go: (slots, cache indices, selected tokens).

    With every column valid, slots ``[B, 1]`` and cache indices ``[B, T]`` address the tokens as they are
    (selection None); otherwise all three are flattened over the valid tokens.
    """
    key = ("write", num_cols)
    if key not in batch.derived:
        rows = batch.rows.long()
        cols = torch.arange(num_cols, device=rows.device, dtype=torch.int32)
        start = batch.cache_lens[rows]
        if batch.q_full:
            batch.derived[key] = (rows[:, None], (start[:, None] + cols[None, :]).long(), None)
        else:
            pad = num_cols - batch.q_lens
            valid = cols[None, :] >= pad[:, None]
            cache_index = start[:, None] + cols[None, :] - pad[:, None]
            b_idx, t_idx = valid.nonzero(as_tuple=True)
            batch.derived[key] = (rows[b_idx], cache_index[b_idx, t_idx].long(), (b_idx, t_idx))
    return batch.derived[key]


def _attention_mask(batch: SlotBatch, num_cols: int, sliding_window: int | None, bound: int) -> torch.Tensor:
    """Boolean ``[B, 1, T, bound]``: which of the first ``bound`` cached keys each query column may see."""
    key = ("mask", num_cols, sliding_window, bound)
    if key not in batch.derived:
        device = batch.rows.device
        cols = torch.arange(num_cols, device=device, dtype=torch.int32)
        pad = num_cols - batch.q_lens
        start = batch.cache_lens[batch.rows.long()]
        query_index = start[:, None] + cols[None, :] - pad[:, None]  # [B, T]; < start for padding columns
        keys = torch.arange(bound, device=device, dtype=torch.int32)
        visible = keys[None, None, :] <= query_index[:, :, None]
        if sliding_window is not None:
            visible &= keys[None, None, :] > query_index[:, :, None] - sliding_window
        # Padding columns see key 0 only, so their softmax stays finite (the cache is zero-initialised).
        padding = (cols[None, :] < pad[:, None])[:, :, None]
        visible = torch.where(padding, keys[None, None, :] == 0, visible)
        batch.derived[key] = visible[:, None]
    return batch.derived[key]


def _attention_weights(
    query: torch.Tensor,
    keys: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
    softcap: float | None,
    sinks: torch.Tensor | None,
) -> torch.Tensor:
    """Softmax weights ``[B, kv_heads, group, T, L]`` of each query head on each key, in ``query.dtype``.

    ``query`` ``[B, q_heads, T, D]``, ``keys`` ``[B, kv_heads, L, D]`` (same dtype), ``mask`` boolean
    ``[B, 1, T, L]``. Soft-capping applies to the scaled logits before the mask; a head's sink logit joins its
    softmax denominator only (the weights then sum to less than one).
    """
    q_heads, kv_heads = query.shape[1], keys.shape[1]
    q = query.unflatten(1, (kv_heads, q_heads // kv_heads))  # [B, kv_heads, group, T, D]
    logits = torch.einsum("bkgtd,bknd->bkgtn", q, keys) * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    logits = logits.masked_fill(~mask[:, :, None], float("-inf"))
    if sinks is None:
        return torch.softmax(logits, dim=-1)
    sink = sinks.to(logits.dtype).view(1, kv_heads, q_heads // kv_heads, 1, 1)
    # Shift by the largest logit, the sink included, so neither exp overflows.
    top = torch.maximum(logits.amax(dim=-1, keepdim=True), sink)
    exp = torch.exp(logits - top)
    return exp / (exp.sum(dim=-1, keepdim=True) + torch.exp(sink - top))


def _accumulate_scores(
    query: torch.Tensor,
    keys: torch.Tensor,
    mask: torch.Tensor,
    batch: SlotBatch,
    scale: float,
    scores_out: torch.Tensor,
    col_from: torch.Tensor | None = None,
    col_to: torch.Tensor | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> None:
    """Add each visible key's softmax weight, summed over GQA groups and counted columns, to ``scores_out``.

    Parameters
    ----------
    query : torch.Tensor
        ``[B, q_heads, T, head_dim]``.
    keys : torch.Tensor
        ``[B, kv_heads, L, head_dim]``, the rows' cache entries (new ones included), ``L <= capacity``.
    mask : torch.Tensor
        Boolean ``[B, 1, T, L]`` from :func:`_attention_mask`.
    batch : SlotBatch
        Rows and ``q_lens`` of this forward.
    scale : float
        Softmax scale applied to ``q @ k^T``.
    scores_out : torch.Tensor
        ``[slots, kv_heads, capacity]``, updated in place.
    col_from, col_to : torch.Tensor, optional
        int ``[B]``: count only the valid columns at offsets ``[col_from[b], col_to[b])`` from the row's first
        valid one (every valid column without them).
    softcap : float, optional
        Logit soft-capping (see the module docstring).
    sinks : torch.Tensor, optional
        ``[q_heads]`` per-head sink logits (see the module docstring).
    """
    num_cols = query.shape[2]
    kv_len = keys.shape[2]
    # At least fp32 whatever the inputs: the weights are summed over many queries.
    dtype = torch.promote_types(query.dtype, torch.float32)
    weights = _attention_weights(query.to(dtype), keys.to(dtype), mask, scale, softcap, sinks)
    cols = torch.arange(num_cols, device=query.device)
    offset = cols[None, :] - (num_cols - batch.q_lens)[:, None]  # [B, T]; < 0 for padding columns
    valid = offset >= 0
    if col_from is not None:
        valid &= (offset >= col_from[:, None]) & (offset < col_to[:, None])
    # Padding and uncounted columns add nothing (padding weights may be NaN: their queries are unspecified).
    seen = mask[:, 0] & valid[:, :, None]  # [B, T, L]
    weights = weights.masked_fill(~seen[:, None, None], 0.0)
    mass = weights.sum(dim=(2, 3)).to(scores_out.dtype)  # [B, kv_heads, L]
    region = scores_out[:, :, :kv_len]
    rows = batch.rows.long()
    current = region.index_select(0, rows)
    # Keys no valid query sees keep their exact bits (x + 0.0 would turn -0.0 into +0.0).
    region.index_copy_(0, rows, torch.where(seen.any(dim=1)[:, None], current + mass, current))


class PendingScores:
    """One layer's attention scores of a forward, held back to be added to ``buffer`` for chosen columns.

    Passed as ``scores_out`` to :func:`slot_attention`, it makes the call record what the scores need (the
    query, the queries' log-sum-exp where the backend computes one, the batch) instead of accumulating them;
    :meth:`commit` then adds the weights of the columns a caller picks, e.g. only the accepted tokens of a
    speculative verify step. Commit before any other forward writes the cache.

    Parameters
    ----------
    buffer : torch.Tensor
        float32 ``[slots, kv_heads, capacity]``, the layer's score buffer.
    """

    __slots__ = ("buffer", "_record")

    def __init__(self, buffer: torch.Tensor) -> None:
        self.buffer = buffer
        self._record: tuple | None = None

    def record(
        self, query, lse, k_cache, batch: SlotBatch, scale: float, sliding_window, softcap=None, sinks=None
    ) -> None:
        """Keep one :func:`slot_attention` call's inputs to its scores (``lse`` None on the torch path)."""
        self._record = (query, lse, k_cache, batch, scale, sliding_window, softcap, sinks)

    def commit(self, cache_lens_before: torch.Tensor, col_from: torch.Tensor, col_to: torch.Tensor) -> None:
        """Add the recorded call's scores of each row's valid columns at offsets ``[col_from, col_to)``.

        ``cache_lens_before``: int32 ``[slots]``, the cache lengths the recorded call saw.
        """
        if self._record is None:
            raise RuntimeError("PendingScores.commit before any attention call recorded its scores")
        query, lse, k_cache, batch, scale, sliding_window, softcap, sinks = self._record
        self._record = None
        before = SlotBatch(batch.rows, cache_lens_before, batch.q_lens, batch.kv_len_bound, batch.backend)
        slot_attention_scores(
            query, lse, k_cache, before, scale, sliding_window, self.buffer, col_from, col_to,
            softcap=softcap, sinks=sinks,
        )  # fmt: skip


def slot_attention_scores(
    query: torch.Tensor,
    lse: torch.Tensor | None,
    k_cache: torch.Tensor,
    batch: SlotBatch,
    scale: float,
    sliding_window: int | None,
    scores_out: torch.Tensor,
    col_from: torch.Tensor | None = None,
    col_to: torch.Tensor | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> None:
    """Add the attention scores of a past slot-attention call to ``scores_out``, for chosen columns.

    Parameters
    ----------
    query : torch.Tensor
        ``[B, q_heads, T, head_dim]``, that call's query.
    lse : torch.Tensor or None
        float32 ``[B, T, q_heads]`` from the Triton path's ``lse_out`` (then the Triton scores kernel runs),
        or None (the torch reference recomputes the softmax).
    k_cache : torch.Tensor
        ``[slots, kv_heads, capacity, head_dim]`` holding that call's entries, nothing overwritten since.
    batch : SlotBatch
        That call's batch, with the cache lengths as they were *before* the call.
    scale : float
        Softmax scale.
    sliding_window : int, optional
        That call's sliding window.
    scores_out : torch.Tensor
        float32 ``[slots, kv_heads, capacity]``, accumulated as by ``slot_attention(scores_out=...)``.
    col_from, col_to : torch.Tensor, optional
        int32 ``[B]``: count only row ``b``'s valid columns at offsets ``[col_from[b], col_to[b])`` from its
        first valid column (all of them without these).
    softcap, sinks : optional
        That call's logit soft-capping and per-head sink logits ``[q_heads]``.
    """
    if lse is not None:
        from effdecode.kernels.slot_attention import slot_attention_scores_triton

        # The sinks are already in the stored log-sum-exp; only the soft-capping changes the logits.
        slot_attention_scores_triton(
            query, lse, k_cache, batch, scale, sliding_window, scores_out, col_from, col_to, softcap=softcap
        )
        return
    bound = min(batch.kv_len_bound, k_cache.shape[2])
    keys = k_cache[:, :, :bound].index_select(0, batch.rows)
    mask = _attention_mask(batch, query.shape[2], sliding_window, bound)
    _accumulate_scores(query, keys, mask, batch, scale, scores_out, col_from, col_to, softcap, sinks)


def slot_attention_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: SlotBatch,
    scale: float,
    sliding_window: int | None = None,
    scores_out: torch.Tensor | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Torch reference: append ``key``/``value`` to the slot cache, then attend.

    Parameters
    ----------
    query : torch.Tensor
        ``[B, q_heads, T, head_dim]`` (post-RoPE), as transformers hands it to an attention function.
    key, value : torch.Tensor
        ``[B, kv_heads, T, head_dim]``, the new entries; ``q_heads`` is a multiple of ``kv_heads`` (GQA).
    k_cache, v_cache : torch.Tensor
        ``[slots, kv_heads, capacity, head_dim]``, updated in place at the valid tokens' cache indices.
    batch : SlotBatch
        Rows, lengths and the host-side length bound of this forward.
    scale : float
        Softmax scale applied to ``q @ k^T``.
    sliding_window : int, optional
        Keys further back than this from a query are masked.
    scores_out : torch.Tensor, optional
        float32 ``[slots, kv_heads, capacity]``; the softmax weights of the step's valid queries are added to
        it (see the module docstring). The output does not depend on it.
    softcap : float, optional
        Logit soft-capping: ``s -> softcap * tanh(s / softcap)`` on the scaled logits (Gemma 2).
    sinks : torch.Tensor, optional
        ``[q_heads]`` per-head sink logits joining each softmax denominator (gpt-oss).

    Returns
    -------
    torch.Tensor
        ``[B, T, q_heads, head_dim]`` attention output (the layout transformers expects back).
    """
    num_cols = query.shape[2]
    slots, cache_index, selection = _write_indices(batch, num_cols)
    new_keys, new_values = key.transpose(1, 2), value.transpose(1, 2)  # [B, T, kv_heads, head_dim]
    if selection is not None:
        new_keys, new_values = new_keys[selection], new_values[selection]
    if new_keys.dtype != k_cache.dtype:
        new_keys, new_values = new_keys.to(k_cache.dtype), new_values.to(v_cache.dtype)
    k_cache[slots, :, cache_index] = new_keys
    v_cache[slots, :, cache_index] = new_values

    bound = min(batch.kv_len_bound, k_cache.shape[2])  # a loose bound may pass the capacity
    mask = _attention_mask(batch, num_cols, sliding_window, bound)
    attend = dict(scale=scale, softcap=softcap, sinks=sinks)
    row_bounds = _row_by_row(batch, bound) if scores_out is None and query.device.type == "cpu" else None
    span = _attended_span(batch, query.shape[0])
    keys = None
    if row_bounds is not None:  # lengths far apart: each row over its own keys (views, no padding)
        out = _attend_row_by_row(query, k_cache, v_cache, mask, row_bounds, **attend)
    elif span:  # the leading slots as a view, the rows' queries scattered into them: no gather
        rows = batch.rows.long()
        spread = query.new_zeros((span, *query.shape[1:])).index_copy_(0, rows, query)
        span_mask = _span_mask(batch, num_cols, sliding_window, bound, span)
        out = _attend(spread, k_cache[:span, :, :bound], v_cache[:span, :, :bound], span_mask, **attend)
        out = out.index_select(0, rows)
    else:
        keys, values = _rows_entries(k_cache, batch, bound), _rows_entries(v_cache, batch, bound)
        out = _attend(query, keys, values, mask, **attend)
    if scores_out is not None:
        # Separate from the output's computation so that the output is the same with or without scores.
        keys = (keys if keys is not None else _rows_entries(k_cache, batch, bound)).to(query.dtype)
        _accumulate_scores(query, keys, mask, batch, scale, scores_out, softcap=softcap, sinks=sinks)
    return out.transpose(1, 2)


# Attending row by row costs about as much per row as reading this many more keys per row (a call's overhead,
# measured on a CPU core); below that much padding per row one padded call is cheaper.
_ROW_BY_ROW_MIN_PADDING = 96
_ROW_BY_ROW_MAX_ROWS = 64


def _row_by_row(batch: SlotBatch, bound: int) -> list[tuple[int, int]] | None:
    """``(slot, keys)`` per row when attending row by row pays (host facts only), else None.

    One padded call reads ``rows * bound`` keys; row by row reads each row's own (host-bounded) length plus a
    call's overhead per row. Continuous batching keeps rows of very different lengths together (a refilled
    slot starts from its prompt), where the padding is most of the keys read. CPU only: on a GPU one padded
    launch costs less than a launch per row.
    """
    if batch.host_rows is None:
        return None
    key = ("row_by_row", bound)  # (decided once per forward, not per layer)
    if key not in batch.derived:
        slots, bounds = batch.host_rows
        num_rows = len(slots)
        lengths = np.minimum(bounds, bound)
        pays = num_rows <= _ROW_BY_ROW_MAX_ROWS
        pays = pays and num_rows * bound - int(lengths.sum()) >= _ROW_BY_ROW_MIN_PADDING * num_rows
        batch.derived[key] = list(zip(slots.tolist(), lengths.tolist(), strict=True)) if pays else None
    return batch.derived[key]


def _rows_entries(cache: torch.Tensor, batch: SlotBatch, bound: int) -> torch.Tensor:
    """``[B, kv_heads, bound, D]``: the first ``bound`` entries of the rows' slots of one cache (a view when
    the rows are the leading slots, else a gather)."""
    if batch.rows_are_leading_slots:
        return cache[: batch.rows.shape[0], :, :bound]
    return cache[:, :, :bound].index_select(0, batch.rows)


def _attend_row_by_row(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    mask: torch.Tensor,
    row_bounds: list[tuple[int, int]],
    scale: float,
    softcap: float | None,
    sinks: torch.Tensor | None,
) -> torch.Tensor:
    """:func:`_attend` one row at a time over its slot's first ``length`` entries (``row_bounds``: ``(slot,
    length)`` per row of ``query``), through views of the cache."""
    per_row = []
    for i, (slot, length) in enumerate(row_bounds):
        keys, values = k_cache[slot : slot + 1, :, :length], v_cache[slot : slot + 1, :, :length]
        per_row.append(
            _attend(query[i : i + 1], keys, values, mask[i : i + 1, ..., :length], scale, softcap, sinks)
        )
    return torch.cat(per_row)


def spread_rows(values: torch.Tensor, rows: torch.Tensor, span: int, fill: torch.Tensor) -> torch.Tensor:
    """``[span, ...]``: ``values[j]`` at slot ``rows[j]`` (int64 ``[B]``), ``fill`` (broadcast to one slot's
    shape) at the other slots. Pure torch ops, so a compiled step traces it too."""
    spread = fill.expand(span, *values.shape[1:]).clone()
    return spread.index_copy(0, rows, values)


def _attended_span(batch: SlotBatch, num_rows: int) -> int:
    """How many leading slots the torch path attends over instead of gathering the rows (0: gather).

    Gathering copies the rows' keys and values in every layer (about twice the traffic of reading them);
    attending over a view of the leading slots reads ``slot_span / rows`` times what the rows need. Above two
    the gather is cheaper.
    """
    span = batch.slot_span
    return span if 0 < span <= 2 * num_rows and not batch.rows_are_leading_slots else 0


def _span_mask(
    batch: SlotBatch, num_cols: int, sliding_window: int | None, bound: int, span: int
) -> torch.Tensor:
    """Boolean ``[span, 1, T, bound]``: the rows' masks at their slots; other slots see key 0 only, so their
    (discarded) softmax stays finite."""
    key = ("span_mask", num_cols, sliding_window, bound, span)
    if key not in batch.derived:
        mask = _attention_mask(batch, num_cols, sliding_window, bound)
        key_zero_only = torch.arange(bound, device=mask.device) == 0
        batch.derived[key] = spread_rows(mask, batch.rows.long(), span, key_zero_only)
    return batch.derived[key]


def _attend(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
    softcap: float | None,
    sinks: torch.Tensor | None,
) -> torch.Tensor:
    """``[B, q_heads, T, D]`` attention of ``query`` over ``keys``/``values`` ``[B, kv_heads, L, D]`` where
    ``mask`` (boolean ``[B, 1, T, L]``) allows."""
    if keys.dtype != query.dtype:
        keys, values = keys.to(query.dtype), values.to(query.dtype)
    if softcap is None and sinks is None:
        return F.scaled_dot_product_attention(
            query, keys, values, attn_mask=mask, scale=scale, enable_gqa=query.shape[1] != keys.shape[1]
        )
    # SDPA has neither: spell the softmax out
    weights = _attention_weights(query, keys, mask, scale, softcap, sinks)  # [B, kv_heads, group, T, L]
    return torch.einsum("bkgtn,bknd->bkgtd", weights, values).flatten(1, 2)


def slot_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: SlotBatch,
    scale: float,
    sliding_window: int | None = None,
    scores_out: torch.Tensor | PendingScores | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dispatch slot attention to Triton on CUDA (or when forced) and to the torch reference otherwise.

    ``"flash_attn"`` runs flash-attn's KV-cache kernel where :func:`flash_supported` holds (installed, CUDA
    fp16/bf16, no ``scores_out``, ...) and otherwise exactly what ``"auto"`` runs.
    Same parameters and result as :func:`slot_attention_reference`; ``scores_out`` may also be a
    :class:`PendingScores`, which records the scores' inputs for a later :meth:`PendingScores.commit`.
    ``softcap`` (float) and ``sinks`` (``[q_heads]`` tensor) are optional and plain, so the op fits a
    custom-op schema (``float? softcap=None, Tensor? sinks=None``).
    """
    backend = batch.derived.get("backend")
    if backend is None:  # resolved once per step, not once per layer
        backend = resolve_backend(batch.backend, query.device, has_cuda_op=False, has_triton_op=True)
        batch.derived["backend"] = backend
        batch.derived["flash"] = flash_wanted(requested_backend(batch.backend) == "flash_attn")
    flash = batch.derived.get("flash")
    pending = scores_out if isinstance(scores_out, PendingScores) else None
    if pending is not None:
        scores_out = None
    elif flash and flash_supported(query, key, k_cache, v_cache, sliding_window, scores_out, sinks=sinks):
        return slot_attention_flash(
            query, key, value, k_cache, v_cache, batch, scale, sliding_window, softcap=softcap
        )
    if backend == "triton":
        from effdecode.kernels.slot_attention import slot_attention_triton

        lse = None
        if pending is not None:
            shape = (query.shape[0], query.shape[2], query.shape[1])
            lse = torch.empty(shape, dtype=torch.float32, device=query.device)
        out = slot_attention_triton(
            query, key, value, k_cache, v_cache, batch, scale, sliding_window, scores_out=scores_out,
            lse_out=lse, softcap=softcap, sinks=sinks,
        )  # fmt: skip
    else:
        out = slot_attention_reference(
            query, key, value, k_cache, v_cache, batch, scale, sliding_window, scores_out=scores_out,
            softcap=softcap, sinks=sinks,
        )  # fmt: skip
    if pending is not None:
        pending.record(
            query, lse if backend == "triton" else None, k_cache, batch, scale, sliding_window, softcap, sinks
        )
    return out
