"""Triton slot attention: append the step's keys/values to the slot cache and attend, in one launch.

Follows the layout contract of :mod:`effdecode.ops.attention` (see its module docstring).

Design
------
Main kernel, grid ``(num_splits, B * kv_heads, m_tiles)``. One program owns one (row, kv head), every query
head of that head's GQA group and a tile of query columns, flattened as ``m = t * group + g`` into the M
dimension of the tile (``BLOCK_M`` >= 16 so ``tl.dot`` applies), and one contiguous range of keys (its split).
Each K/V tile is thus loaded once per GQA group. Keys below the slot's ``cache_len`` come from the cache; the
step's new keys are taken from the ``key``/``value`` inputs, never read back from the cache, so the stores of
the new entries (done by the split-0 programs, each for the columns its tile owns) cannot race with reads.

With one split the main kernel normalises and writes the output itself. With several (flash-decoding /
split-K, chosen when ``B * kv_heads`` programs would leave the GPU idle at long contexts) every program writes
a normalised partial output and its log-sum-exp (base 2), and a reduce kernel, one program per
(row, column, query head), merges the splits. Programs whose split lies outside a row's visible key range
write ``lse = -inf``, the neutral element of the merge.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634
# Fewest keys a split is given: below this the partials' write and merge cost more than the parallelism gains.
_MIN_SPLIT_LEN = 256
_MAX_SPLITS = 64


@triton.jit
def _attend_block(
    q, k, v, offs_n, q_idx, col_valid, key_ok, m_i, l_i, acc, qk_scale, window,
    HAS_WINDOW: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    """One online-softmax step of a [BLOCK_M] query tile against a [BLOCK_N] key tile."""
    s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
    visible = col_valid[:, None] & key_ok[None, :] & (offs_n[None, :] <= q_idx[:, None])
    if HAS_WINDOW:
        visible = visible & (offs_n[None, :] > q_idx[:, None] - window)
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # Rows with nothing visible so far keep m = -inf; shift by 0 instead so exp2 gives 0, not NaN.
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_shift)
    p = tl.math.exp2(s - m_shift[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v, input_precision="ieee")
    return m_new, l_i, acc


@triton.jit
def _slot_attention_kernel(
    q_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, out_ptr, part_o_ptr, part_lse_ptr,
    rows_ptr, cache_lens_ptr, q_lens_ptr,
    qk_scale, window, num_cols, capacity, split_len, num_splits,
    sq_b, sq_h, sq_t, sq_d,
    sk_b, sk_h, sk_t, sk_d,
    sv_b, sv_h, sv_t, sv_d,
    skc_s, skc_h, skc_n, skc_d,
    svc_s, svc_h, svc_n, svc_d,
    KV_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr, SPLIT: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_m = tl.program_id(2)
    b = pid_bh // KV_HEADS
    h = (pid_bh % KV_HEADS).to(tl.int64)
    q_heads = KV_HEADS * GROUP

    slot = tl.load(rows_ptr + b).to(tl.int64)
    cache_len = tl.load(cache_lens_ptr + slot).to(tl.int32)
    q_len = tl.load(q_lens_ptr + b).to(tl.int32)
    pad = num_cols - q_len

    # Query tile: m = t * GROUP + g over the flattened (column, head-in-group) pairs.
    tile_start = pid_m * BLOCK_M
    offs_m = tile_start + tl.arange(0, BLOCK_M)
    t = offs_m // GROUP
    g = offs_m % GROUP
    row_ok = t < num_cols
    col_valid = row_ok & (t >= pad)
    q_idx = cache_len + t - pad  # cache index of each query column (meaningless for padding columns)
    offs_d = tl.arange(0, HEAD_DIM)
    b64 = b.to(tl.int64)
    hq = h * GROUP + g
    q_ptrs = q_ptr + b64 * sq_b + hq[:, None] * sq_h + t[:, None] * sq_t + offs_d[None, :] * sq_d
    q = tl.load(q_ptrs, mask=col_valid[:, None], other=0.0).to(DOT_DTYPE)

    # Key range this program covers: the tile's visible keys intersected with its split.
    t_first = tile_start // GROUP
    t_last = tl.minimum((tile_start + BLOCK_M - 1) // GROUP, num_cols - 1)
    hi = cache_len + t_last - pad + 1
    hi = tl.where(t_last >= pad, hi, 0)  # an all-padding tile attends to nothing
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(cache_len + tl.maximum(t_first, pad) - pad - window + 1, 0)
    split_lo = pid_s * split_len
    start = tl.maximum((lo // BLOCK_N) * BLOCK_N, split_lo)  # stays aligned: split_len % BLOCK_N == 0
    end = tl.minimum(hi, split_lo + split_len)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    kc_base = kc_ptr + slot * skc_s + h * skc_h
    vc_base = vc_ptr + slot * svc_s + h * svc_h
    # Old entries, read from the cache.
    cache_end = tl.minimum(end, cache_len)
    for n0 in range(start, cache_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        key_ok = offs_n < cache_end
        kv_mask = key_ok[:, None]
        k = tl.load(kc_base + offs_n[:, None] * skc_n + offs_d[None, :] * skc_d, mask=kv_mask, other=0.0)
        v = tl.load(vc_base + offs_n[:, None] * svc_n + offs_d[None, :] * svc_d, mask=kv_mask, other=0.0)
        m_i, l_i, acc = _attend_block(
            q, k.to(DOT_DTYPE), v.to(DOT_DTYPE), offs_n, q_idx, col_valid, key_ok, m_i, l_i, acc, qk_scale,
            window, HAS_WINDOW, DOT_DTYPE,
        )
    # This step's entries, from the inputs (rounded through the cache dtype, as the cache will hold them).
    k_base = k_ptr + b64 * sk_b + h * sk_h
    v_base = v_ptr + b64 * sv_b + h * sv_h
    for n0 in range(tl.maximum(start, cache_len), end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        key_ok = offs_n < end
        col = offs_n - cache_len + pad
        k = tl.load(k_base + col[:, None] * sk_t + offs_d[None, :] * sk_d, mask=key_ok[:, None], other=0.0)
        v = tl.load(v_base + col[:, None] * sv_t + offs_d[None, :] * sv_d, mask=key_ok[:, None], other=0.0)
        k = k.to(kc_ptr.dtype.element_ty).to(DOT_DTYPE)
        v = v.to(vc_ptr.dtype.element_ty).to(DOT_DTYPE)
        m_i, l_i, acc = _attend_block(
            q, k, v, offs_n, q_idx, col_valid, key_ok, m_i, l_i, acc, qk_scale, window, HAS_WINDOW, DOT_DTYPE,
        )

    # Append the new entries: split 0 stores the columns whose g = 0 pair lies in this tile, so each entry has
    # one writer. Indices past the capacity are dropped rather than written out of bounds.
    w_lo = tl.maximum((tile_start + GROUP - 1) // GROUP, pad)
    w_hi = tl.minimum((tile_start + BLOCK_M + GROUP - 1) // GROUP, num_cols)
    w_hi = tl.where(pid_s == 0, w_hi, w_lo)
    for c0 in range(w_lo, w_hi, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        dst = cache_len + cols - pad
        ok = (cols < w_hi) & (dst < capacity)
        k = tl.load(k_base + cols[:, None] * sk_t + offs_d[None, :] * sk_d, mask=ok[:, None])
        v = tl.load(v_base + cols[:, None] * sv_t + offs_d[None, :] * sv_d, mask=ok[:, None])
        tl.store(kc_base + dst[:, None] * skc_n + offs_d[None, :] * skc_d, k.to(kc_ptr.dtype.element_ty),
                 mask=ok[:, None])
        tl.store(vc_base + dst[:, None] * svc_n + offs_d[None, :] * svc_d, v.to(vc_ptr.dtype.element_ty),
                 mask=ok[:, None])

    # Padding columns and rows with no visible key in this split end with l = 0: output 0, lse = -inf.
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    o = acc / l_safe[:, None]
    # Output rows are (b, t, hq) of a contiguous [B, T, Hq] array.
    out_row = (b64 * num_cols + t) * q_heads + hq
    if SPLIT:
        part_row = out_row * num_splits + pid_s
        lse = tl.where(l_i > 0.0, m_i + tl.math.log2(l_safe), float("-inf"))
        tl.store(part_lse_ptr + part_row, lse, mask=row_ok)
        tl.store(part_o_ptr + part_row[:, None] * HEAD_DIM + offs_d[None, :], o,
                 mask=row_ok[:, None] & (l_i > 0.0)[:, None])
    else:
        tl.store(out_ptr + out_row[:, None] * HEAD_DIM + offs_d[None, :], o.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None])


@triton.jit
def _merge_splits_kernel(
    out_ptr, part_o_ptr, part_lse_ptr, num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    lse = tl.load(part_lse_ptr + row * num_splits + offs_s, mask=offs_s < num_splits, other=float("-inf"))
    live = lse > float("-inf")
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # padding column: every split empty, the output is 0
    w = tl.math.exp2(lse - m)
    o = tl.load(part_o_ptr + (row * num_splits + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
                mask=live[:, None], other=0.0)
    total = tl.sum(w, 0)
    total = tl.where(total > 0.0, total, 1.0)
    res = tl.sum(o * w[:, None], 0) / total
    tl.store(out_ptr + row * HEAD_DIM + offs_d, res.to(out_ptr.dtype.element_ty))


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _tile_config(dot_dtype: torch.dtype, head_dim: int, rows: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for ``rows = group * T`` query rows of one (row, kv head).

    Sized to keep clear of register spills in sm_80/sm_90 builds: fp32 operands and heads wider than 128 get
    smaller tiles. BLOCK_M >= 16 for ``tl.dot``; more rows are tiled over the grid's third axis.
    """
    wide = dot_dtype == torch.float32 or head_dim > 128
    max_block_m = 16 if dot_dtype == torch.float32 else 32 if head_dim > 128 else 64
    block_m = min(max(triton.next_power_of_2(rows), 16), max_block_m)
    block_n = 32 if wide else 64
    num_warps = 8 if block_m * head_dim > 4096 or (wide and head_dim >= 128) else 4
    return block_m, block_n, num_warps


def _num_splits(
    device: torch.device, programs: int, kv_len_bound: int, block_n: int, requested: int | None
) -> tuple[int, int]:
    """(splits, keys per split): enough programs for about two waves, each split at least _MIN_SPLIT_LEN."""
    bound = max(kv_len_bound, 1)
    if requested is None:
        sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device()) \
            if device.type == "cuda" else 8
        wanted = triton.cdiv(2 * sms, max(programs, 1))
        requested = min(wanted, triton.cdiv(bound, _MIN_SPLIT_LEN), _MAX_SPLITS)
    requested = max(1, requested)
    split_len = triton.cdiv(triton.cdiv(bound, requested), block_n) * block_n
    return triton.cdiv(bound, split_len), split_len


def slot_attention_triton(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch,
    scale: float,
    sliding_window: int | None = None,
    *,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Append ``key``/``value`` to the slot cache and attend over it, fused in one Triton launch.

    Same contract as :func:`effdecode.ops.attention.slot_attention_reference`.

    Parameters
    ----------
    query : torch.Tensor
        ``[B, q_heads, T, head_dim]``, any strides (transformers hands a transposed view).
    key, value : torch.Tensor
        ``[B, kv_heads, T, head_dim]``, the step's new entries, right-aligned per ``batch.q_lens``;
        ``q_heads % kv_heads == 0``.
    k_cache, v_cache : torch.Tensor
        ``[slots, kv_heads, capacity, head_dim]``; the valid new entries are written at
        ``cache_lens[rows[b]] + t - (T - q_lens[b])``. Nothing else is modified.
    batch : SlotBatch
        ``rows`` [B], ``cache_lens`` [slots] (read only), ``q_lens`` [B], and ``kv_len_bound``, a host-side
        upper bound of ``max(cache_lens[rows] + q_lens)`` that sizes the split-K grid without a device sync.
    scale : float
        Softmax scale applied to ``q @ k^T``.
    sliding_window : int, optional
        A query at cache index ``i`` sees only keys at indices ``> i - sliding_window``.
    num_splits : int, optional
        Force the number of key-range splits (tests, tuning); by default chosen from the grid size and
        ``batch.kv_len_bound``. The effective number may be lower so that no split is empty by construction.

    Returns
    -------
    torch.Tensor
        ``[B, T, q_heads, head_dim]`` in ``query.dtype``; padding columns hold zeros.
    """
    bsz, q_heads, num_cols, head_dim = query.shape
    kv_heads = key.shape[1]
    if key.shape != (bsz, kv_heads, num_cols, head_dim) or value.shape != key.shape:
        raise ValueError(f"key/value shape {tuple(key.shape)}/{tuple(value.shape)} does not match query "
                         f"{tuple(query.shape)}")
    if q_heads % kv_heads:
        raise ValueError(f"q_heads={q_heads} is not a multiple of kv_heads={kv_heads}")
    if k_cache.shape[1:] != v_cache.shape[1:] or k_cache.shape[1] != kv_heads or k_cache.shape[3] != head_dim:
        raise ValueError(f"cache shapes {tuple(k_cache.shape)}/{tuple(v_cache.shape)} do not fit kv_heads="
                         f"{kv_heads}, head_dim={head_dim}")
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of 2 >= 16, got {head_dim}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be positive, got {sliding_window}")
    out = torch.empty((bsz, num_cols, q_heads, head_dim), dtype=query.dtype, device=query.device)
    if out.numel() == 0:
        return out

    group = q_heads // kv_heads
    # The interpreter's dot is wrong on bf16: take the products in fp32 there (GPUs keep bf16 tensor cores).
    dot_dtype = query.dtype
    if dot_dtype == torch.bfloat16 and _interpreted():
        dot_dtype = torch.float32
    block_m, block_n, num_warps = _tile_config(dot_dtype, head_dim, group * num_cols)
    m_tiles = triton.cdiv(group * num_cols, block_m)
    splits, split_len = _num_splits(query.device, bsz * kv_heads * m_tiles, batch.kv_len_bound, block_n,
                                    num_splits)
    dot_dtype = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[dot_dtype]

    if splits > 1:
        part_o = torch.empty((bsz * num_cols * q_heads * splits, head_dim), dtype=torch.float32,
                             device=query.device)
        part_lse = torch.empty((bsz * num_cols * q_heads * splits,), dtype=torch.float32, device=query.device)
    else:
        part_o = part_lse = out  # unused
    _slot_attention_kernel[(splits, bsz * kv_heads, m_tiles)](
        query, key, value, k_cache, v_cache, out, part_o, part_lse,
        batch.rows, batch.cache_lens, batch.q_lens,
        float(scale) * _LOG2E, sliding_window or 0, num_cols, k_cache.shape[2], split_len, splits,
        *query.stride(), *key.stride(), *value.stride(), *k_cache.stride(), *v_cache.stride(),
        KV_HEADS=kv_heads, GROUP=group, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
        HAS_WINDOW=sliding_window is not None, SPLIT=splits > 1, DOT_DTYPE=dot_dtype,
        num_warps=num_warps, num_stages=2,
    )
    if splits > 1:
        _merge_splits_kernel[(bsz * num_cols * q_heads,)](
            out, part_o, part_lse, splits,
            HEAD_DIM=head_dim, BLOCK_S=max(triton.next_power_of_2(splits), 2),
            num_warps=4 if head_dim >= 128 else 2,
        )
    return out


__all__ = ["slot_attention_triton"]
