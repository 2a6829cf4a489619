"""KV compaction: keep a subset of each slot's cache entries and pack them at the front, in place.

Layout (the slot cache of :class:`effdecode.cache.SlotKVCache`):

- ``key_buffer``/``value_buffer``: ``[layers, slots, kv_heads, capacity, head_dim]``, every layer at once.
- ``cache_lens``: int32 ``[slots]``, entries held per slot.
- ``rows``: int32 ``[R]``, the slots to compact (distinct).
- ``keep_index``: integer ``[R, kv_heads, K]`` (the same selection in every layer) or ``[layers, R, kv_heads,
  K]`` (one per layer, as attention-based eviction policies choose): for layer ``l``, row ``r`` and kv head
  ``h``, the cache indices to keep are ``keep_index[(l,) r, h, :keep_lens[r]]``; entries past ``keep_lens[r]``
  are ignored.
- ``keep_lens``: int32 ``[R]``, kept entries per row: one count for every head of a row, because a slot has a
  single ``cache_len``.

Effect, for every layer: entry ``keep_index[(l,) r, h, j]`` of slot ``rows[r]``, head ``h`` moves to index
``j``, ``j < keep_lens[r]``; then ``cache_lens[rows[r]] = keep_lens[r]``. Entries of a compacted row at or
past its new length are unspecified afterwards (they are never attended); other slots are untouched. RoPE
positions are *not* renumbered: kept keys were rotated at their original positions, and the slot's next
position (``SlotKVCache.positions``) keeps counting from where it was, so it is not touched here.

Preconditions (not checked where checking them would read device memory and sync with the host):

- ``rows`` are distinct valid slots (the in-place kernel gives each row's entries to one program; two
  programs compacting one slot would race). Checked, with a ``ValueError``, when ``rows`` is a CPU tensor:
  that costs no device read. On a GPU the check would stall the stream (a device-to-host copy) on every
  eviction, so it is the caller's: the engine draws ``rows`` from host-side arrays of distinct slots;
- ``0 <= keep_lens[r] <= min(K, cache_lens[rows[r]])``;
- ``keep_index[(l,) r, h, :keep_lens[r]]`` is strictly increasing and below ``cache_lens[rows[r]]``.

Strict increase gives ``keep_index[r, h, j] >= j``: an entry only ever moves towards the front, which is what
lets the move run in place (see :mod:`effdecode.kernels.compaction`).
"""

from __future__ import annotations

import torch

from effdecode.ops.backend import resolve_backend


def _is_integer(t: torch.Tensor) -> bool:
    return not (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool)


def check_compaction_args(
    key_buffer: torch.Tensor,
    value_buffer: torch.Tensor,
    cache_lens: torch.Tensor,
    rows: torch.Tensor,
    keep_index: torch.Tensor,
    keep_lens: torch.Tensor,
) -> None:
    """Validate shapes, dtypes and devices of a compaction call (no device reads, no host sync).

    ``rows`` held on the CPU are also checked to be distinct (free there); the other value preconditions of
    the module docstring are not checked.

    Raises
    ------
    ValueError, TypeError
        On a malformed argument, or duplicate ``rows`` on the CPU.
    """
    if key_buffer.dim() != 5:
        raise ValueError(
            f"key_buffer must be [layers, slots, kv_heads, capacity, head_dim], got {tuple(key_buffer.shape)}"
        )
    if value_buffer.shape != key_buffer.shape or value_buffer.dtype != key_buffer.dtype:
        raise ValueError(
            f"value_buffer {tuple(value_buffer.shape)}/{value_buffer.dtype} does not match key_buffer "
            f"{tuple(key_buffer.shape)}/{key_buffer.dtype}"
        )
    layers, slots, kv_heads, capacity, _ = key_buffer.shape
    if tuple(cache_lens.shape) != (slots,):
        raise ValueError(f"cache_lens must be [slots] = [{slots}], got {tuple(cache_lens.shape)}")
    if cache_lens.dtype != torch.int32:
        raise TypeError(f"cache_lens must be int32, got {cache_lens.dtype}")
    if rows.dim() != 1:
        raise ValueError(f"rows must be [R], got shape {tuple(rows.shape)}")
    num_rows = rows.shape[0]
    shared = keep_index.dim() == 3 and tuple(keep_index.shape[:2]) == (num_rows, kv_heads)
    per_layer = keep_index.dim() == 4 and tuple(keep_index.shape[:3]) == (layers, num_rows, kv_heads)
    if not (shared or per_layer):
        raise ValueError(
            f"keep_index must be [R, kv_heads, K] = [{num_rows}, {kv_heads}, K] or "
            f"[layers, R, kv_heads, K] = [{layers}, {num_rows}, {kv_heads}, K], got {tuple(keep_index.shape)}"
        )
    if keep_index.shape[-1] > capacity:
        raise ValueError(f"keep_index keeps up to {keep_index.shape[-1]} entries, capacity is {capacity}")
    if tuple(keep_lens.shape) != (num_rows,):
        raise ValueError(f"keep_lens must be [R] = [{num_rows}], got {tuple(keep_lens.shape)}")
    for name, t in (("rows", rows), ("keep_index", keep_index), ("keep_lens", keep_lens)):
        if not _is_integer(t):
            raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
    for name, t in (
        ("value_buffer", value_buffer),
        ("cache_lens", cache_lens),
        ("rows", rows),
        ("keep_index", keep_index),
        ("keep_lens", keep_lens),
    ):
        if t.device != key_buffer.device:
            raise ValueError(f"{name} is on {t.device}, key_buffer on {key_buffer.device}")
    if rows.device.type == "cpu" and num_rows > 1:
        unique, counts = torch.unique(rows, return_counts=True)
        if unique.numel() != num_rows:
            raise ValueError(f"rows must be distinct slots; repeated: {unique[counts > 1].tolist()}")


def compact_kv_reference(
    key_buffer: torch.Tensor,
    value_buffer: torch.Tensor,
    cache_lens: torch.Tensor,
    rows: torch.Tensor,
    keep_index: torch.Tensor,
    keep_lens: torch.Tensor,
) -> None:
    """Torch reference of KV compaction: gather the kept entries of all layers, then write them back.

    The gather copies before any write, so the in-place update needs no ordering argument here. Entries of a
    compacted row at indices ``j >= keep_lens[r]`` keep their old values (a "move" of ``j`` onto itself).

    Parameters
    ----------
    key_buffer, value_buffer : torch.Tensor
        ``[layers, slots, kv_heads, capacity, head_dim]``, modified in place.
    cache_lens : torch.Tensor
        int32 ``[slots]``; ``cache_lens[rows]`` is set to ``keep_lens``.
    rows : torch.Tensor
        int32 ``[R]``, distinct slots to compact.
    keep_index : torch.Tensor
        Integer ``[R, kv_heads, K]`` or ``[layers, R, kv_heads, K]``, ``K <= capacity``: strictly increasing
        kept indices per (layer,) row and head in the first ``keep_lens[r]`` entries.
    keep_lens : torch.Tensor
        int32 ``[R]``, entries kept per row, ``<= min(K, cache_lens[rows[r]])``.
    """
    check_compaction_args(key_buffer, value_buffer, cache_lens, rows, keep_index, keep_lens)
    layers = key_buffer.shape[0]
    num_rows, kv_heads, width = keep_index.shape[-3:]
    if num_rows == 0:
        return
    device = key_buffer.device
    layer_ids = torch.arange(layers, device=device)[:, None, None, None]  # [L, 1, 1, 1]
    rows_l = rows.long()[None, :, None, None]  # [1, R, 1, 1]
    heads = torch.arange(kv_heads, device=device)[None, None, :, None]  # [1, 1, H, 1]
    dst = torch.arange(width, device=device)[None, None, None, :]  # [1, 1, 1, K]
    # Ignored entries (j >= keep_lens) become j -> j, so whatever they hold is never dereferenced.
    per_layer_index = keep_index.long() if keep_index.dim() == 4 else keep_index.long()[None]
    src = torch.where(dst < keep_lens.long()[None, :, None, None], per_layer_index, dst)
    for buffer in (key_buffer, value_buffer):
        kept = buffer[layer_ids, rows_l, heads, src]  # [L, R, H, K, head_dim]
        buffer[layer_ids, rows_l, heads, dst] = kept
    cache_lens[rows.long()] = keep_lens.to(cache_lens.dtype)


def compact_kv(
    key_buffer: torch.Tensor,
    value_buffer: torch.Tensor,
    cache_lens: torch.Tensor,
    rows: torch.Tensor,
    keep_index: torch.Tensor,
    keep_lens: torch.Tensor,
    backend: str = "auto",
) -> None:
    """KV compaction in place: the Triton kernel on CUDA tensors (or when forced), the torch reference else.

    Same parameters and effect as :func:`compact_kv_reference` (see the module docstring for the
    preconditions), plus ``backend`` ("auto", "torch", "triton"; "cuda" has no kernel here and falls back like
    "auto"). Neither path synchronizes with the host.

    Parameters
    ----------
    key_buffer, value_buffer : torch.Tensor
        ``[layers, slots, kv_heads, capacity, head_dim]``, modified in place.
    cache_lens : torch.Tensor
        int32 ``[slots]``, updated at ``rows``.
    rows : torch.Tensor
        int32 ``[R]``, distinct.
    keep_index : torch.Tensor
        Integer ``[R, kv_heads, K]`` or ``[layers, R, kv_heads, K]``.
    keep_lens : torch.Tensor
        int32 ``[R]``.
    backend : str
        Requested implementation, resolved by :func:`effdecode.ops.backend.resolve_backend`.
    """
    if resolve_backend(backend, key_buffer.device, has_cuda_op=False, has_triton_op=True) == "triton":
        from effdecode.kernels.compaction import compact_kv_triton

        compact_kv_triton(key_buffer, value_buffer, cache_lens, rows, keep_index, keep_lens)
        return
    compact_kv_reference(key_buffer, value_buffer, cache_lens, rows, keep_index, keep_lens)


def keep_index_from_mask(
    keep_mask: torch.Tensor, budget: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn a per-(row, head) keep mask into the ``keep_index``/``keep_lens`` arguments of :func:`compact_kv`.

    Runs in ``O(R * H * C)`` on the device with no host sync (a cumulative sum and a scatter, no sort).

    Parameters
    ----------
    keep_mask : torch.Tensor
        bool ``[R, H, C]``: ``True`` at the cache indices to keep (``C`` at most the cache capacity; a mask
        narrower than a row's ``cache_len`` drops the entries past ``C``). Every head of a row should keep the
        same number of entries.
    budget : int, optional
        Width ``K`` of ``keep_index``, a host-side cap on the entries kept per row (typically the eviction
        budget). Defaults to ``C``, which never drops a kept entry.

    Returns
    -------
    keep_index : torch.Tensor
        int32 ``[R, H, K]``: per (row, head) the kept indices in increasing order, then zeros.
    keep_lens : torch.Tensor
        int32 ``[R]``: ``min(budget, fewest entries any head of the row keeps)``. When heads disagree (the
        mask breaks the rule above) or exceed the budget, each head keeps its *lowest* ``keep_lens[r]``
        indices.
    """
    if keep_mask.dim() != 3 or keep_mask.dtype != torch.bool:
        raise ValueError(f"keep_mask must be bool [R, H, C], got {keep_mask.dtype} {tuple(keep_mask.shape)}")
    num_rows, heads, width = keep_mask.shape
    budget = width if budget is None else budget
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    device = keep_mask.device
    # Rank of each kept index among its head's kept indices = its slot in the output. Unkept indices and
    # ranks past the budget go to an extra column that is cut off afterwards.
    rank = keep_mask.cumsum(dim=2, dtype=torch.int64) - 1
    target = torch.where(keep_mask & (rank < budget), rank, budget)
    index = torch.zeros((num_rows, heads, budget + 1), dtype=torch.int32, device=device)
    source = torch.arange(width, dtype=torch.int32, device=device).expand(num_rows, heads, width)
    index.scatter_(2, target, source)
    counts = keep_mask.sum(dim=2)  # [R, H]
    if heads == 0:
        keep_lens = torch.zeros(num_rows, dtype=torch.int32, device=device)
    else:
        keep_lens = counts.amin(dim=1).clamp(max=budget).to(torch.int32)
    return index[:, :, :budget], keep_lens


__all__ = ["check_compaction_args", "compact_kv", "compact_kv_reference", "keep_index_from_mask"]
