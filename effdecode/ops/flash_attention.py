"""Slot attention through flash-attn's ``flash_attn_with_kvcache`` (``attn_backend="flash_attn"``).

How our layout (see :mod:`effdecode.ops.attention`) maps onto flash-attn 2's KV-cache kernel:

- Caches ``[slots, kv_heads, capacity, head_dim]`` go in as the views ``cache.transpose(1, 2)``, i.e.
  ``[slots, capacity, kv_heads, head_dim]``. flash-attn reads batch, row and head strides separately and only
  needs the last dimension contiguous, so nothing is copied and its in-place append lands in our buffers.
- ``cache_batch_idx=rows`` picks each row's slot (rows are distinct, as flash-attn requires for appends).
- ``causal=True`` aligns the mask to the bottom right: with ``seqlen_k`` keys, query column ``t`` of ``T``
  sees keys ``j <= seqlen_k - T + t``. With ``seqlen_k = cache_lens[row] + q_lens[b]`` that is exactly our
  right-aligned rule (a valid column's cache index is ``cache_lens[row] + t - (T - q_lens[b])``).
- ``window_size=(sliding_window - 1, 0)``: from query index ``i`` a key ``j`` is seen iff
  ``i - (sliding_window - 1) <= j <= i``, i.e. ``j > i - sliding_window`` (HF's rule, as in the reference).
- ``softcap``: flash-attn (>= 2.6) applies ``softcap * tanh(s / softcap)`` to the scaled logits, as HF's
  Gemma 2 does; passed only when set, so older flash-attn builds keep working for everything else.

Two cases, both one kernel launch for the attention:

- Every column valid (``batch.q_full``: decode steps, draft steps, unpadded prefill): flash-attn appends the
  new K/V at ``cache_seqlens = cache_lens[rows]`` and attends, fused.
- Ragged rows (left-padded prefill, verify of ragged drafts, draft catch-up): the valid entries are written
  with torch ops first (no host sync), then flash-attn attends with ``k=None`` and
  ``cache_seqlens = cache_lens[rows] + q_lens``. A padding column then sees only keys before the row's first
  new token, or none (flash-attn returns zeros for an empty row); the contract leaves its output unspecified.

Prefill does not use ``flash_attn_varlen_func``: it attends only among the packed new tokens, which is exact
only for rows with empty caches, a fact the op cannot learn without a host sync (nothing in
:class:`SlotBatch` says so), and it would cost a pack of the queries and an unpack of the output. The
KV-cache kernel covers prefill, ragged or not, exactly, at the price of computing the padding columns (as
the Triton kernel does too).

Not handled here (the dispatcher falls back to Triton / the torch reference): ``scores_out`` (flash-attn does
not expose attention weights), attention sinks (gpt-oss; flash-attn 2 has no sink term), CPU tensors,
dtypes other than fp16/bf16, a cache dtype different from the query's, head dims that are not a multiple of
8 or exceed 256, more query columns than the cache capacity.
"""

from __future__ import annotations

import functools
import importlib
import warnings
from types import ModuleType
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from effdecode.ops.slot_batch import SlotBatch

#: Test hook: accept CPU tensors of any floating dtype (a fake ``flash_attn`` module then runs them). The
#: real flash-attn only takes CUDA fp16/bf16, so this stays False outside tests.
ALLOW_CPU = False

_HALF_DTYPES = (torch.float16, torch.bfloat16)


@functools.cache
def flash_attn_module() -> ModuleType | None:
    """The importable ``flash_attn`` package with ``flash_attn_with_kvcache``, or None.

    Cached (a failed import is not retried per layer); tests that swap the module call ``cache_clear``.
    """
    try:
        module = importlib.import_module("flash_attn")
    except Exception:  # ImportError, or an OSError / RuntimeError from a build for another torch
        return None
    return module if hasattr(module, "flash_attn_with_kvcache") else None


@functools.cache
def _warn_missing() -> None:
    warnings.warn(
        "attn_backend='flash_attn' but flash-attn is not importable here; attention runs as with 'auto'",
        RuntimeWarning,
        stacklevel=4,
    )


def flash_wanted(flash_requested: bool) -> bool:
    """Whether this step should try flash-attn: requested and importable (warns once if not importable)."""
    if not flash_requested:
        return False
    if flash_attn_module() is None:
        _warn_missing()
        return False
    return True


def flash_supported(
    query: torch.Tensor,
    key: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    sliding_window: int | None,
    scores_out: torch.Tensor | None,
    sinks: torch.Tensor | None = None,
) -> bool:
    """Whether :func:`slot_attention_flash` can run this call (host-side facts only, no sync).

    Parameters
    ----------
    query : torch.Tensor
        ``[B, q_heads, T, head_dim]``.
    key : torch.Tensor
        ``[B, kv_heads, T, head_dim]``.
    k_cache, v_cache : torch.Tensor
        ``[slots, kv_heads, capacity, head_dim]``.
    sliding_window : int, optional
        The layer's window, if any.
    scores_out : torch.Tensor, optional
        Requested attention mass; flash-attn cannot produce it.
    sinks : torch.Tensor, optional
        Per-head sink logits; flash-attn 2 has no such term.
    """
    if scores_out is not None or sinks is not None:
        return False
    if not ALLOW_CPU and (query.device.type != "cuda" or query.dtype not in _HALF_DTYPES):
        return False
    if not query.dtype == key.dtype == k_cache.dtype == v_cache.dtype:
        return False
    head_dim = query.shape[-1]
    if head_dim % 8 or head_dim > 256:  # other sizes make flash-attn pad (copy) the whole cache
        return False
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        return False
    if query.shape[2] > k_cache.shape[2]:
        return False
    return sliding_window is None or sliding_window >= 1


def _row_starts(batch: SlotBatch) -> torch.Tensor:
    """int32 ``[B]`` (contiguous): entries each row's slot holds before the step; shared by every layer."""
    key = ("flash", "starts")
    if key not in batch.derived:
        batch.derived[key] = batch.cache_lens.index_select(0, batch.rows).to(torch.int32).contiguous()
    return batch.derived[key]


def _ragged_write_plan(batch: SlotBatch, num_cols: int, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cache index of every query column, and which columns are valid: (int64 ``[B, T]``, bool ``[B, T]``).

    A valid column goes to its slot index. A padding column re-stores the entry already at an index no other
    column writes: ``T`` indices on from the row's last new entry, wrapped at the capacity onto entries before
    the row's ``cache_len`` (``T <= capacity``). So all columns scatter at once, without a host sync, and
    the padding writes leave the cache bit-for-bit as it was.
    """
    key = ("flash", "write", num_cols, capacity)
    if key not in batch.derived:
        starts = _row_starts(batch)
        cols = torch.arange(num_cols, device=starts.device, dtype=torch.int32)
        pad = num_cols - batch.q_lens
        valid = cols[None, :] >= pad[:, None]
        index = starts[:, None] + cols[None, :] - pad[:, None]
        index = torch.where(valid, index, torch.remainder(index + num_cols, capacity))
        batch.derived[key] = (index.long(), valid)
    return batch.derived[key]


def _write_ragged(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: SlotBatch,
) -> None:
    """Store the valid new entries of ``key``/``value`` ``[B, kv_heads, T, head_dim]`` in the slot cache."""
    index, valid = _ragged_write_plan(batch, key.shape[2], k_cache.shape[2])
    slots = batch.rows.long()[:, None]  # [B, 1], broadcast against index [B, T]
    keep = valid[:, :, None, None]
    for new, cache in ((key, k_cache), (value, v_cache)):
        old = cache[slots, :, index]  # [B, T, kv_heads, head_dim]
        cache[slots, :, index] = torch.where(keep, new.transpose(1, 2).to(cache.dtype), old)


def slot_attention_flash(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: SlotBatch,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Append ``key``/``value`` to the slot cache and attend, through ``flash_attn_with_kvcache``.

    Same contract as :func:`effdecode.ops.attention.slot_attention_reference` without ``scores_out``; call
    only where :func:`flash_supported` holds.

    Parameters
    ----------
    query : torch.Tensor
        ``[B, q_heads, T, head_dim]`` (post-RoPE), last dim contiguous (HF's transposed view is fine).
    key, value : torch.Tensor
        ``[B, kv_heads, T, head_dim]``, the new entries.
    k_cache, v_cache : torch.Tensor
        ``[slots, kv_heads, capacity, head_dim]``, updated in place at the valid tokens' cache indices.
    batch : SlotBatch
        Rows, lengths and host-side facts of this forward (``q_full`` picks the fused append).
    scale : float
        Softmax scale applied to ``q @ k^T``.
    sliding_window : int, optional
        Keys further back than this from a query are masked.
    softcap : float, optional
        Logit soft-capping (needs flash-attn >= 2.6).

    Returns
    -------
    torch.Tensor
        ``[B, T, q_heads, head_dim]`` attention output.
    """
    flash = flash_attn_module()
    if flash is None:
        raise ValueError("slot_attention_flash needs the flash_attn package (flash_attn_with_kvcache)")
    rows = batch.rows if batch.rows.dtype == torch.int32 else batch.rows.to(torch.int32)
    starts = _row_starts(batch)
    common = dict(
        cache_batch_idx=rows.contiguous(),
        softmax_scale=scale,
        causal=True,
        window_size=(-1, -1) if sliding_window is None else (sliding_window - 1, 0),
    )
    if softcap is not None:
        common["softcap"] = float(softcap)
    q = query.transpose(1, 2)  # [B, T, q_heads, head_dim], a view
    k_view, v_view = k_cache.transpose(1, 2), v_cache.transpose(1, 2)  # [slots, capacity, kv_heads, D]
    if batch.q_full:
        return flash.flash_attn_with_kvcache(
            q, k_view, v_view, k=key.transpose(1, 2), v=value.transpose(1, 2), cache_seqlens=starts, **common
        )
    _write_ragged(key, value, k_cache, v_cache, batch)
    seqlens_key = ("flash", "seqlens")
    if seqlens_key not in batch.derived:
        batch.derived[seqlens_key] = (starts + batch.q_lens).to(torch.int32).contiguous()
    return flash.flash_attn_with_kvcache(
        q, k_view, v_view, cache_seqlens=batch.derived[seqlens_key], **common
    )
