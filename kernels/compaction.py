"""Triton KV compaction: pack each compacted slot's kept entries at the front of its cache, in place.

Follows the contract of :mod:`effdecode.ops.compaction` (see its module docstring for the layout and the
preconditions).

Design
------
Grid ``(R * kv_heads, layers)``: one program owns one (layer, row, kv head), reading that layer's
selection (or the shared one through a zero layer stride), so every layer is compacted in
a single launch, and no two programs touch the same cache entries. A program walks the destinations ``j``
in ascending chunks of ``BLOCK_J``: it loads the chunk's source indices ``s_j = keep_index[r, h, j]``,
gathers the K and V rows at ``s_j`` (``head_dim`` contiguous elements each), then stores them at ``j``.

Why in place is safe: indices are strictly increasing, so ``s_j >= j``. Entry ``x`` is read by at most one
destination ``j`` (``s_j = x``, ``j <= x``) and overwritten only by destination ``x``. So a write never
precedes the read of the same entry provided (a) within a chunk every read happens before any write, and (b)
a chunk's writes wait for the reads of earlier chunks. Within one program the K/V tile sits in registers of
*several* warps between its load and its store, and warps run independently, so (a) needs a CTA barrier
between the loads and the stores of each chunk (``tl.debug_barrier``, i.e. ``bar.sync``, which also orders
global memory accesses among the CTA's threads); the same barrier gives (b), since every earlier chunk's
loads precede it in program order. The reverse hazard cannot occur: chunk ``c`` writes below
``(c + 1) * BLOCK_J`` and later chunks only read at or above it, so hoisting later loads earlier (software
pipelining) stays correct. Destinations whose source is themselves (``s_j == j``, e.g. a kept prefix such as
attention sinks) are masked out of both the load and the store: they move no bytes.

Bytes moved (what bounds the kernel; the target is >= 80% of HBM bandwidth on GPU): with
``M = sum_{r, h} #{j < keep_lens[r] : s_j != j}`` moved entries per layer,

    layers * M * head_dim * itemsize * 4      (K and V, each read once and written once)
  + layers * R * kv_heads * K_read * 4        (int32 source indices, re-read per layer, mostly from L2)

where ``K_read`` is ``keep_lens[r]`` rounded up to ``BLOCK_J``. A compaction that keeps a prefix moves
(almost) nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from effdecode.ops.compaction import check_compaction_args

# Elements of one K (or V) chunk tile: 16 KiB at 16-bit, 32 KiB at fp32, i.e. 32-64 values per thread for
# the K and V tiles together at 4 warps, without spilling; many programs per SM keep enough loads in flight.
_TILE_ELEMS = 8192


@triton.jit
def _compact_kv_kernel(
    k_ptr, v_ptr, cache_lens_ptr, rows_ptr, keep_index_ptr, keep_lens_ptr, head_dim,
    sk_l, sk_s, sk_h, sk_n, sk_d,
    sv_l, sv_s, sv_h, sv_n, sv_d,
    si_l, si_r, si_h, si_k,
    KV_HEADS: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    layer = tl.program_id(1).to(tl.int64)
    r = pid // KV_HEADS
    h = (pid % KV_HEADS).to(tl.int64)

    slot = tl.load(rows_ptr + r).to(tl.int64)
    keep_len = tl.load(keep_lens_ptr + r).to(tl.int32)
    k_base = k_ptr + layer * sk_l + slot * sk_s + h * sk_h
    v_base = v_ptr + layer * sv_l + slot * sv_s + h * sv_h
    idx_base = keep_index_ptr + layer * si_l + r.to(tl.int64) * si_r + h * si_h
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim

    for j0 in range(0, keep_len, BLOCK_J):
        dst = j0 + tl.arange(0, BLOCK_J)
        in_range = dst < keep_len
        # int64 entry indices: with "any strides" an entry stride may be large (a capacity-major layout), and
        # index * stride must not wrap at 2^31 elements.
        src = tl.load(idx_base + dst * si_k, mask=in_range, other=0).to(tl.int64)
        dst = dst.to(tl.int64)
        move = in_range & (src != dst)
        tile_ok = move[:, None] & d_ok[None, :]
        k = tl.load(k_base + src[:, None] * sk_n + offs_d[None, :] * sk_d, mask=tile_ok)
        v = tl.load(v_base + src[:, None] * sv_n + offs_d[None, :] * sv_d, mask=tile_ok)
        # Every warp's reads of this chunk (and of the earlier ones) complete before any warp writes.
        tl.debug_barrier()
        tl.store(k_base + dst[:, None] * sk_n + offs_d[None, :] * sk_d, k, mask=tile_ok)
        tl.store(v_base + dst[:, None] * sv_n + offs_d[None, :] * sv_d, v, mask=tile_ok)

    # One program per row publishes the new length; no program of this launch reads cache_lens.
    tl.store(cache_lens_ptr + slot, keep_len, mask=(layer == 0) & (h == 0))


def compact_kv_triton(
    key_buffer: torch.Tensor,
    value_buffer: torch.Tensor,
    cache_lens: torch.Tensor,
    rows: torch.Tensor,
    keep_index: torch.Tensor,
    keep_lens: torch.Tensor,
) -> None:
    """Compact the slots ``rows`` of every layer in one Triton launch (in place).

    Same contract as :func:`effdecode.ops.compaction.compact_kv_reference`, except that entries of a
    compacted row at or past its new length are left as they were rather than "moved onto themselves" (both
    leave them unchanged; the contract leaves them unspecified).

    Parameters
    ----------
    key_buffer, value_buffer : torch.Tensor
        ``[layers, slots, kv_heads, capacity, head_dim]``, any strides; modified in place.
    cache_lens : torch.Tensor
        int32 ``[slots]``; ``cache_lens[rows]`` is set to ``keep_lens`` by the same launch.
    rows : torch.Tensor
        int32 ``[R]``, distinct slots.
    keep_index : torch.Tensor
        int32 or int64 ``[R, kv_heads, K]`` (every layer alike) or ``[layers, R, kv_heads, K]``, strictly
        increasing in the first ``keep_lens[r]`` entries.
    keep_lens : torch.Tensor
        int32 ``[R]``, ``<= min(K, cache_lens[rows[r]])``.
    """
    check_compaction_args(key_buffer, value_buffer, cache_lens, rows, keep_index, keep_lens)
    layers, _, kv_heads, _, head_dim = key_buffer.shape
    num_rows = rows.shape[0]
    if num_rows == 0 or kv_heads == 0:
        return
    if layers == 0 or head_dim == 0:  # nothing to move; the lengths still change
        cache_lens[rows.long()] = keep_lens.to(cache_lens.dtype)
        return
    block_d = triton.next_power_of_2(head_dim)
    elems = _TILE_ELEMS if key_buffer.element_size() <= 2 else _TILE_ELEMS // 2
    block_j = max(16, min(256, elems // block_d))
    # A shared selection is read with layer stride 0.
    index_strides = keep_index.stride() if keep_index.dim() == 4 else (0, *keep_index.stride())
    # fmt: off
    _compact_kv_kernel[(num_rows * kv_heads, layers)](
        key_buffer, value_buffer, cache_lens, rows, keep_index, keep_lens, head_dim,
        *key_buffer.stride(), *value_buffer.stride(), *index_strides,
        KV_HEADS=kv_heads, BLOCK_J=block_j, BLOCK_D=block_d,
        num_warps=4,
    )
    # fmt: on


__all__ = ["compact_kv_triton"]
