"""Triton slot attention: append the step's keys/values to the slot cache and attend, in one main launch.

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

Attention scores (optional ``scores_out``)
-----------------------------------------
Eviction policies want, per (slot, kv head, key), the softmax weight summed over the step's valid queries and
the GQA group's heads. A weight ``2^(s - lse)`` needs its query's final log-sum-exp, known only at the end of
the main kernel (one split) or after the merge (split-K); and the sum over queries cannot be taken earlier,
since each query has its own normaliser. So the final ``lse`` (base 2) of every query is written (by the main
kernel with one split, by the merge kernel otherwise), and a scores kernel follows, grid
``(key blocks, B * kv_heads)``: it turns a key block's logits into weights and sums them over the row's valid
(column, head) pairs in registers. Each (slot, kv head, key) belongs to exactly one scores program, which does
a plain read-modify-write of ``scores_out``: no atomics, deterministic. It gets the logits in one of two ways:

- stored by the main kernel (fp32 ``[B * kv_heads, group * T, kv_len_bound]``): ``8 * group * T`` bytes of
  traffic per (key, kv head), against the ``4 * head_dim`` bytes of fp16 K and V the main kernel reads, e.g.
  about 6% more for decode with group 4 and head_dim 128;
- recomputed as ``q @ k^T`` from the cache (which by then holds the step's entries too): one more read of K
  (up to 50% more traffic for memory-bound decode), but no buffer, so prefills and huge batches use this one.

:func:`_scores_from_logits` picks the cheaper. The main kernel's arithmetic does not change with scores (the
extra work is stores only), so the output is bit-for-bit that of a call without ``scores_out``.
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
# Largest logits buffer the scores path allocates; beyond it the scores kernel recomputes q @ k^T instead.
_MAX_LOGITS_BYTES = 128 << 20


@triton.jit
def _logits(q, k, qk_scale, cap_in, cap_out, HAS_SOFTCAP: tl.constexpr):
    """Base-2 logits of a query tile against a key tile.

    Plain: ``q.k * qk_scale`` (``qk_scale = scale * log2(e)``). Soft-capped (Gemma 2):
    ``cap_out * tanh(q.k * cap_in)`` with ``cap_in = scale / softcap`` and ``cap_out = softcap * log2(e)``.
    """
    s = tl.dot(q, tl.trans(k), input_precision="ieee")
    if HAS_SOFTCAP:
        x = s * cap_in
        # tanh(|x|) = (1 - e) / (1 + e) with e = exp(-2|x|) in (0, 1]: no overflow for any x.
        e = tl.math.exp2(-2.8853900817779268 * tl.abs(x))  # exp(-2|x|), 2 * log2(e) spelled out
        t = (1.0 - e) / (1.0 + e)
        s = cap_out * tl.where(x < 0.0, -t, t)
    else:
        s = s * qk_scale
    return s


@triton.jit
def _attend_block(
    q, k, v, offs_n, q_idx, col_valid, key_ok, m_i, l_i, acc, qk_scale, cap_in, cap_out, window, lg_row,
    lg_width,
    HAS_WINDOW: tl.constexpr, DOT_DTYPE: tl.constexpr, STORE_LOGITS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
):  # fmt: skip
    """One online-softmax step of a [BLOCK_M] query tile against a [BLOCK_N] key tile.

    With ``STORE_LOGITS`` the tile's logits also go to ``lg_row[m] + n`` (for ``n < lg_width``).
    """
    s = _logits(q, k, qk_scale, cap_in, cap_out, HAS_SOFTCAP)
    if STORE_LOGITS:
        lg_mask = col_valid[:, None] & key_ok[None, :] & (offs_n[None, :] < lg_width)
        tl.store(lg_row[:, None] + offs_n[None, :], s, mask=lg_mask)
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
    q_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, out_ptr, part_o_ptr, part_lse_ptr, lse_ptr, logits_ptr,
    rows_ptr, cache_lens_ptr, q_lens_ptr, sinks_ptr,
    qk_scale, cap_in, cap_out, window, num_cols, capacity, split_len, num_splits, logits_width,
    sq_b, sq_h, sq_t, sq_d,
    sk_b, sk_h, sk_t, sk_d,
    sv_b, sv_h, sv_t, sv_d,
    skc_s, skc_h, skc_n, skc_d,
    svc_s, svc_h, svc_n, svc_d,
    KV_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr, SPLIT: tl.constexpr,
    DOT_DTYPE: tl.constexpr, STORE_LSE: tl.constexpr, STORE_LOGITS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr,
):  # fmt: skip
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
    # Head dims that are not a power of two are padded to BLOCK_D with zeros (they add nothing to q.k or p.v).
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    b64 = b.to(tl.int64)
    hq = h * GROUP + g
    q_ptrs = q_ptr + b64 * sq_b + hq[:, None] * sq_h + t[:, None] * sq_t + offs_d[None, :] * sq_d
    q = tl.load(q_ptrs, mask=col_valid[:, None] & d_ok[None, :], other=0.0).to(DOT_DTYPE)

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

    # Logits rows (scores path): [B * kv_heads, GROUP * num_cols, logits_width], row m of this (row, kv head).
    lg_row = logits_ptr + (pid_bh.to(tl.int64) * (GROUP * num_cols) + offs_m) * logits_width

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_SINKS:
        # A head's sink is one more logit in its softmax denominator with no value: start the running max and
        # sum from it (exp2(sink - sink) = 1). Split 0 alone holds it, so the merge counts it once.
        has_sink = col_valid & ((offs_m * 0 + pid_s) == 0)  # a tensor: the interpreter masks with no scalar
        sink = tl.load(sinks_ptr + hq, mask=has_sink, other=0.0).to(tl.float32) * 1.4426950408889634
        m_i = tl.where(has_sink, sink, m_i)
        l_i = tl.where(has_sink, 1.0, l_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    kc_base = kc_ptr + slot * skc_s + h * skc_h
    vc_base = vc_ptr + slot * svc_s + h * svc_h
    # Old entries, read from the cache.
    cache_end = tl.minimum(end, cache_len)
    for n0 in range(start, cache_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        key_ok = offs_n < cache_end
        kv_mask = key_ok[:, None] & d_ok[None, :]
        k = tl.load(kc_base + offs_n[:, None] * skc_n + offs_d[None, :] * skc_d, mask=kv_mask, other=0.0)
        v = tl.load(vc_base + offs_n[:, None] * svc_n + offs_d[None, :] * svc_d, mask=kv_mask, other=0.0)
        # fmt: off
        m_i, l_i, acc = _attend_block(
            q, k.to(DOT_DTYPE), v.to(DOT_DTYPE), offs_n, q_idx, col_valid, key_ok, m_i, l_i, acc, qk_scale,
            cap_in, cap_out, window, lg_row, logits_width, HAS_WINDOW, DOT_DTYPE, STORE_LOGITS, HAS_SOFTCAP,
        )
        # fmt: on
    # This step's entries, from the inputs (rounded through the cache dtype, as the cache will hold them).
    k_base = k_ptr + b64 * sk_b + h * sk_h
    v_base = v_ptr + b64 * sv_b + h * sv_h
    for n0 in range(tl.maximum(start, cache_len), end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        key_ok = offs_n < end
        col = offs_n - cache_len + pad
        new_mask = key_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + col[:, None] * sk_t + offs_d[None, :] * sk_d, mask=new_mask, other=0.0)
        v = tl.load(v_base + col[:, None] * sv_t + offs_d[None, :] * sv_d, mask=new_mask, other=0.0)
        k = k.to(kc_ptr.dtype.element_ty).to(DOT_DTYPE)
        v = v.to(vc_ptr.dtype.element_ty).to(DOT_DTYPE)
        # fmt: off
        m_i, l_i, acc = _attend_block(
            q, k, v, offs_n, q_idx, col_valid, key_ok, m_i, l_i, acc, qk_scale, cap_in, cap_out, window,
            lg_row, logits_width, HAS_WINDOW, DOT_DTYPE, STORE_LOGITS, HAS_SOFTCAP,
        )
        # fmt: on

    # Append the new entries: split 0 stores the columns whose g = 0 pair lies in this tile, so each entry has
    # one writer. Indices past the capacity are dropped rather than written out of bounds.
    w_lo = tl.maximum((tile_start + GROUP - 1) // GROUP, pad)
    w_hi = tl.minimum((tile_start + BLOCK_M + GROUP - 1) // GROUP, num_cols)
    w_hi = tl.where(pid_s == 0, w_hi, w_lo)
    for c0 in range(w_lo, w_hi, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        dst = cache_len + cols - pad
        ok = (cols < w_hi) & (dst < capacity)
        ok_d = ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + cols[:, None] * sk_t + offs_d[None, :] * sk_d, mask=ok_d)
        v = tl.load(v_base + cols[:, None] * sv_t + offs_d[None, :] * sv_d, mask=ok_d)
        tl.store(
            kc_base + dst[:, None] * skc_n + offs_d[None, :] * skc_d,
            k.to(kc_ptr.dtype.element_ty),
            mask=ok_d,
        )
        tl.store(
            vc_base + dst[:, None] * svc_n + offs_d[None, :] * svc_d,
            v.to(vc_ptr.dtype.element_ty),
            mask=ok_d,
        )

    # Padding columns and rows with no visible key in this split end with l = 0: output 0, lse = -inf.
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    o = acc / l_safe[:, None]
    # Output rows are (b, t, hq) of a contiguous [B, T, Hq] array.
    out_row = (b64 * num_cols + t) * q_heads + hq
    if SPLIT:
        part_row = out_row * num_splits + pid_s
        lse = tl.where(l_i > 0.0, m_i + tl.math.log2(l_safe), float("-inf"))
        tl.store(part_lse_ptr + part_row, lse, mask=row_ok)
        tl.store(
            part_o_ptr + part_row[:, None] * HEAD_DIM + offs_d[None, :],
            o,
            mask=row_ok[:, None] & (l_i > 0.0)[:, None] & d_ok[None, :],
        )
    else:
        tl.store(
            out_ptr + out_row[:, None] * HEAD_DIM + offs_d[None, :],
            o.to(out_ptr.dtype.element_ty),
            mask=row_ok[:, None] & d_ok[None, :],
        )
        if STORE_LSE:
            # One split: this lse is final; the scores kernel normalises with it.
            lse = tl.where(l_i > 0.0, m_i + tl.math.log2(l_safe), float("-inf"))
            tl.store(lse_ptr + out_row, lse, mask=row_ok)


@triton.jit
def _merge_splits_kernel(
    out_ptr, part_o_ptr, part_lse_ptr, lse_ptr, num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, STORE_LSE: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    lse = tl.load(part_lse_ptr + row * num_splits + offs_s, mask=offs_s < num_splits, other=float("-inf"))
    live = lse > float("-inf")
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # padding column: every split empty, the output is 0
    w = tl.math.exp2(lse - m)
    o = tl.load(
        part_o_ptr + (row * num_splits + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
        mask=live[:, None] & d_ok[None, :],
        other=0.0,
    )
    total = tl.sum(w, 0)
    total_safe = tl.where(total > 0.0, total, 1.0)
    res = tl.sum(o * w[:, None], 0) / total_safe
    if STORE_LSE:
        # The final normaliser, for the scores kernel; -inf for padding columns.
        tl.store(lse_ptr + row, tl.where(total > 0.0, m + tl.math.log2(total_safe), float("-inf")))
    tl.store(out_ptr + row * HEAD_DIM + offs_d, res.to(out_ptr.dtype.element_ty), mask=d_ok)


@triton.jit
def _emit_scores_kernel(
    q_ptr, kc_ptr, lse_ptr, logits_ptr, scores_ptr,
    rows_ptr, cache_lens_ptr, q_lens_ptr, col_from_ptr, col_to_ptr,
    qk_scale, cap_in, cap_out, window, num_cols, capacity, logits_width,
    sq_b, sq_h, sq_t, sq_d,
    skc_s, skc_h, skc_n, skc_d,
    ss_s, ss_h, ss_n,
    KV_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr, FROM_LOGITS: tl.constexpr,
    DOT_DTYPE: tl.constexpr, HAS_COL_RANGE: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
):  # fmt: skip
    """Add ``2^(s - lse)`` summed over a (row, kv head)'s counted (column, head) pairs to a block of keys.

    The counted columns are the valid ones, or with ``HAS_COL_RANGE`` the valid columns at offsets
    ``[col_from[b], col_to[b])`` from the row's first valid column.
    """
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // KV_HEADS
    h = (pid_bh % KV_HEADS).to(tl.int64)
    q_heads = KV_HEADS * GROUP

    slot = tl.load(rows_ptr + b).to(tl.int64)
    cache_len = tl.load(cache_lens_ptr + slot).to(tl.int32)
    q_len = tl.load(q_lens_ptr + b).to(tl.int32)
    pad = num_cols - q_len
    c_lo = pad  # counted columns: [c_lo, c_hi)
    c_hi = num_cols
    if HAS_COL_RANGE:
        c_lo = pad + tl.maximum(tl.load(col_from_ptr + b).to(tl.int32), 0)
        c_hi = tl.minimum(pad + tl.load(col_to_ptr + b).to(tl.int32), num_cols)

    # Keys some counted query sees: [lo, cache_len + c_hi - pad), the first query's window to the last query;
    # those past the capacity have no score entry. Only these are written: every other entry keeps its bits.
    kv_end = tl.where(c_hi > c_lo, tl.minimum(cache_len + c_hi - pad, capacity), 0)
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(cache_len + c_lo - pad - window + 1, 0)
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    key_ok = (offs_n >= lo) & (offs_n < kv_end)

    # Columns that see some key of the block: causality bounds them below, the window above.
    t_lo = tl.maximum(n0 - cache_len + pad, c_lo)
    t_hi = c_hi
    if HAS_WINDOW:
        t_hi = tl.minimum(n0 + BLOCK_N - 1 + window - cache_len + pad, c_hi)
    t_hi = tl.where((n0 < kv_end) & (n0 + BLOCK_N > lo), t_hi, t_lo)  # block outside the keys: no work

    b64 = b.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    if not FROM_LOGITS:
        # The cache holds the step's entries by now (written by the main kernel, rounded as it attended them).
        kc_base = kc_ptr + slot * skc_s + h * skc_h
        k = tl.load(
            kc_base + offs_n[:, None] * skc_n + offs_d[None, :] * skc_d,
            mask=key_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        k = k.to(DOT_DTYPE)
    lg_base = logits_ptr + pid_bh.to(tl.int64) * (GROUP * num_cols) * logits_width
    mass = tl.zeros([BLOCK_N], dtype=tl.float32)
    for m0 in range(t_lo * GROUP, t_hi * GROUP, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)  # m = t * GROUP + g, as in the main kernel
        t = offs_m // GROUP
        g = offs_m % GROUP
        col_valid = (t < c_hi) & (t >= c_lo)
        q_idx = cache_len + t - pad
        visible = col_valid[:, None] & key_ok[None, :] & (offs_n[None, :] <= q_idx[:, None])
        if HAS_WINDOW:
            visible = visible & (offs_n[None, :] > q_idx[:, None] - window)
        hq = h * GROUP + g
        lse = tl.load(lse_ptr + (b64 * num_cols + t) * q_heads + hq, mask=col_valid, other=0.0)
        if FROM_LOGITS:
            # Only visible logits were necessarily stored; the rest of the buffer is never read.
            lg_mask = visible & (offs_n[None, :] < logits_width)
            lg_ptrs = lg_base + offs_m[:, None].to(tl.int64) * logits_width + offs_n[None, :]
            s = tl.load(lg_ptrs, mask=lg_mask, other=0.0)
        else:
            q_ptrs = q_ptr + b64 * sq_b + hq[:, None] * sq_h + t[:, None] * sq_t + offs_d[None, :] * sq_d
            q = tl.load(q_ptrs, mask=col_valid[:, None] & d_ok[None, :], other=0.0).to(DOT_DTYPE)
            s = _logits(q, k, qk_scale, cap_in, cap_out, HAS_SOFTCAP)
        mass += tl.sum(tl.where(visible, tl.math.exp2(s - lse[:, None]), 0.0), 0)

    # This program alone owns these (slot, kv head, key) entries: a plain read-modify-write, no atomics.
    sc_ptrs = scores_ptr + slot * ss_s + h * ss_h + offs_n * ss_n
    tl.store(sc_ptrs, tl.load(sc_ptrs, mask=key_ok, other=0.0) + mass, mask=key_ok)


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
        sms = (
            _sm_count(device.index if device.index is not None else torch.cuda.current_device())
            if device.type == "cuda"
            else 8
        )
        wanted = triton.cdiv(2 * sms, max(programs, 1))
        requested = min(wanted, triton.cdiv(bound, _MIN_SPLIT_LEN), _MAX_SPLITS)
    requested = max(1, requested)
    split_len = triton.cdiv(triton.cdiv(bound, requested), block_n) * block_n
    return triton.cdiv(bound, split_len), split_len


def _scores_from_logits(rows_m: int, head_dim: int, cache_itemsize: int, logits_bytes: int) -> bool:
    """Whether the scores kernel should read stored logits rather than recompute ``q @ k^T``.

    Storing then reading fp32 logits moves ``8 * rows_m`` bytes per (key, kv head); recomputing them reads the
    key again (``head_dim * cache_itemsize`` bytes). Big buffers (long prefills, huge batches) recompute.
    """
    return 8 * rows_m <= head_dim * cache_itemsize and logits_bytes <= _MAX_LOGITS_BYTES


def slot_attention_triton(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch,
    scale: float,
    sliding_window: int | None = None,
    scores_out: torch.Tensor | None = None,
    *,
    lse_out: torch.Tensor | None = None,
    num_splits: int | None = None,
    scores_from_logits: bool | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Append ``key``/``value`` to the slot cache and attend over it, fused in one Triton launch.

    Same contract as :func:`effdecode.ops.attention.slot_attention_reference`. With split-K a merge kernel
    follows; with ``scores_out`` a scores kernel follows (see the module docstring).

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
    scores_out : torch.Tensor, optional
        float32 ``[slots, kv_heads, capacity]``, any strides. For every key a valid query sees, the softmax
        weights of the valid (column, query head) pairs of its row and GQA group are added to
        ``scores_out[rows[b], kv_head, key]``; no other entry is touched. Deterministic.
    lse_out : torch.Tensor, optional
        float32 ``[B, T, q_heads]``, contiguous: receives every query's log-sum-exp (base 2) of its logits
        ``q . k * scale * log2(e)``, so that :func:`slot_attention_scores_triton` can add the step's scores
        later, for the columns a caller picks (speculative decoding counts only accepted tokens). Not with
        ``scores_out``.
    num_splits : int, optional
        Force the number of key-range splits (tests, tuning); by default chosen from the grid size and
        ``batch.kv_len_bound``. The effective number may be lower so that no split is empty by construction.
    scores_from_logits : bool, optional
        Force how the scores kernel gets the logits: stored by the main kernel (True) or recomputed (False);
        by default the cheaper one in memory traffic (tests, tuning).
    softcap : float, optional
        Logit soft-capping: ``s -> softcap * tanh(s / softcap)`` on the scaled logits (Gemma 2).
    sinks : torch.Tensor, optional
        ``[q_heads]`` per-head sink logits joining each softmax denominator (gpt-oss); ``lse_out`` includes
        them.

    Returns
    -------
    torch.Tensor
        ``[B, T, q_heads, head_dim]`` in ``query.dtype``; padding columns hold zeros.
    """
    bsz, q_heads, num_cols, head_dim = query.shape
    kv_heads = key.shape[1]
    if key.shape != (bsz, kv_heads, num_cols, head_dim) or value.shape != key.shape:
        raise ValueError(
            f"key/value shape {tuple(key.shape)}/{tuple(value.shape)} does not match query "
            f"{tuple(query.shape)}"
        )
    if q_heads % kv_heads:
        raise ValueError(f"q_heads={q_heads} is not a multiple of kv_heads={kv_heads}")
    if k_cache.shape[1:] != v_cache.shape[1:] or k_cache.shape[1] != kv_heads or k_cache.shape[3] != head_dim:
        raise ValueError(
            f"cache shapes {tuple(k_cache.shape)}/{tuple(v_cache.shape)} do not fit kv_heads="
            f"{kv_heads}, head_dim={head_dim}"
        )
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be positive, got {sliding_window}")
    _check_softcap(softcap)
    if sinks is not None and (sinks.shape != (q_heads,) or sinks.device != query.device):
        raise ValueError(
            f"sinks must be a [{q_heads}] tensor (one logit per query head) on {query.device}, got "
            f"{tuple(sinks.shape)} on {sinks.device}"
        )
    if scores_out is not None and (
        scores_out.shape != k_cache.shape[:3]
        or scores_out.dtype != torch.float32
        or scores_out.device != k_cache.device
    ):
        raise ValueError(
            f"scores_out must be float32 {tuple(k_cache.shape[:3])} on {k_cache.device}, got "
            f"{scores_out.dtype} {tuple(scores_out.shape)} on {scores_out.device}"
        )
    if lse_out is not None and (
        scores_out is not None
        or lse_out.shape != (bsz, num_cols, q_heads)
        or lse_out.dtype != torch.float32
        or not lse_out.is_contiguous()
    ):
        raise ValueError(
            f"lse_out must be a contiguous float32 {(bsz, num_cols, q_heads)} tensor, without scores_out; "
            f"got {lse_out.dtype} {tuple(lse_out.shape)}"
        )
    out = torch.empty((bsz, num_cols, q_heads, head_dim), dtype=query.dtype, device=query.device)
    if out.numel() == 0:
        return out

    group = q_heads // kv_heads
    # The interpreter's dot is wrong on bf16: take the products in fp32 there (GPUs keep bf16 tensor cores).
    dot_dtype = query.dtype
    if dot_dtype == torch.bfloat16 and _interpreted():
        dot_dtype = torch.float32
    block_d = _block_d(head_dim)
    block_m, block_n, num_warps = _tile_config(dot_dtype, block_d, group * num_cols)
    m_tiles = triton.cdiv(group * num_cols, block_m)
    splits, split_len = _num_splits(
        query.device, bsz * kv_heads * m_tiles, batch.kv_len_bound, block_n, num_splits
    )
    dot_dtype = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[dot_dtype]

    device = query.device
    if splits > 1:
        part_o = torch.empty(
            (bsz * num_cols * q_heads * splits, head_dim), dtype=torch.float32, device=device
        )
        part_lse = torch.empty((bsz * num_cols * q_heads * splits,), dtype=torch.float32, device=device)
    else:
        part_o = part_lse = out  # unused
    lse = logits = out  # unused unless scores are wanted
    logits_width = max(batch.kv_len_bound, 1)
    from_logits = False
    if lse_out is not None:
        lse = lse_out
    if scores_out is not None:
        lse = torch.empty((bsz * num_cols * q_heads,), dtype=torch.float32, device=device)
        rows_m = group * num_cols
        logits_shape = (bsz * kv_heads, rows_m, logits_width)
        from_logits = scores_from_logits
        if from_logits is None:
            logits_bytes = 4 * bsz * kv_heads * rows_m * logits_width
            from_logits = _scores_from_logits(rows_m, head_dim, k_cache.element_size(), logits_bytes)
        if from_logits:
            logits = torch.empty(logits_shape, dtype=torch.float32, device=device)
    has_window = sliding_window is not None
    want_lse = scores_out is not None or lse_out is not None
    cap_in, cap_out = _softcap_factors(scale, softcap)
    # fmt: off
    _slot_attention_kernel[(splits, bsz * kv_heads, m_tiles)](
        query, key, value, k_cache, v_cache, out, part_o, part_lse, lse, logits,
        batch.rows, batch.cache_lens, batch.q_lens, sinks if sinks is not None else batch.q_lens,
        float(scale) * _LOG2E, cap_in, cap_out, sliding_window or 0, num_cols, k_cache.shape[2], split_len,
        splits, logits_width,
        *query.stride(), *key.stride(), *value.stride(), *k_cache.stride(), *v_cache.stride(),
        KV_HEADS=kv_heads, GROUP=group, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n,
        HAS_WINDOW=has_window, SPLIT=splits > 1, DOT_DTYPE=dot_dtype,
        STORE_LSE=want_lse and splits == 1, STORE_LOGITS=from_logits,
        HAS_SOFTCAP=softcap is not None, HAS_SINKS=sinks is not None,
        num_warps=num_warps, num_stages=2,
    )
    if splits > 1:
        _merge_splits_kernel[(bsz * num_cols * q_heads,)](
            out, part_o, part_lse, lse, splits,
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=max(triton.next_power_of_2(splits), 2),
            STORE_LSE=want_lse,
            num_warps=4 if head_dim >= 128 else 2,
        )
    # fmt: on
    if scores_out is not None:
        _launch_scores(
            query, k_cache, lse, logits, scores_out, batch, scale, sliding_window, None, None, from_logits,
            logits_width, block_m, block_n, dot_dtype, softcap,
        )  # fmt: skip
    return out


def _block_d(head_dim: int) -> int:
    """Head-dim tile: the next power of two (>= 16 for ``tl.dot``); the padding lanes are masked."""
    return max(16, triton.next_power_of_2(head_dim))


def _check_softcap(softcap: float | None) -> None:
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be positive, got {softcap}")


def _softcap_factors(scale: float, softcap: float | None) -> tuple[float, float]:
    """(cap_in, cap_out) of :func:`_logits`' soft-capped path (unused without soft-capping)."""
    if softcap is None:
        return 1.0, 1.0
    return float(scale) / float(softcap), float(softcap) * _LOG2E


def _launch_scores(
    query, k_cache, lse, logits, scores_out, batch, scale, sliding_window, col_from, col_to, from_logits,
    logits_width, block_m, block_n, dot_dtype, softcap=None,
) -> None:  # fmt: skip
    """Run :func:`_emit_scores_kernel` over the keys ``batch`` may see."""
    bsz, q_heads, num_cols, head_dim = query.shape
    kv_heads = k_cache.shape[1]
    key_blocks = triton.cdiv(min(batch.kv_len_bound, k_cache.shape[2]), block_n)
    if key_blocks == 0 or bsz == 0:
        return
    has_range = col_from is not None
    cap_in, cap_out = _softcap_factors(scale, softcap)
    # fmt: off
    _emit_scores_kernel[(key_blocks, bsz * kv_heads)](
        query, k_cache, lse, logits, scores_out,
        batch.rows, batch.cache_lens, batch.q_lens,
        col_from if has_range else batch.q_lens, col_to if has_range else batch.q_lens,
        float(scale) * _LOG2E, cap_in, cap_out, sliding_window or 0, num_cols, k_cache.shape[2], logits_width,
        *query.stride(), *k_cache.stride(), *scores_out.stride(),
        KV_HEADS=kv_heads, GROUP=q_heads // kv_heads, HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim),
        BLOCK_M=block_m, BLOCK_N=block_n,
        HAS_WINDOW=sliding_window is not None, FROM_LOGITS=from_logits, DOT_DTYPE=dot_dtype,
        HAS_COL_RANGE=has_range, HAS_SOFTCAP=softcap is not None,
        num_warps=4,
    )
    # fmt: on


def slot_attention_scores_triton(
    query: torch.Tensor,
    lse: torch.Tensor,
    k_cache: torch.Tensor,
    batch,
    scale: float,
    sliding_window: int | None,
    scores_out: torch.Tensor,
    col_from: torch.Tensor | None = None,
    col_to: torch.Tensor | None = None,
    softcap: float | None = None,
) -> None:
    """Add a past :func:`slot_attention_triton` call's attention scores to ``scores_out``, for chosen columns.

    Parameters
    ----------
    query : torch.Tensor
        ``[B, q_heads, T, head_dim]``, the query of that call.
    lse : torch.Tensor
        float32 ``[B, T, q_heads]``, what that call wrote to ``lse_out``.
    k_cache : torch.Tensor
        ``[slots, kv_heads, capacity, head_dim]``, holding that call's entries (nothing overwritten since).
    batch : SlotBatch
        That call's rows, ``q_lens``, ``kv_len_bound``, and its ``cache_lens`` as they were *before* it.
    scale : float
        Softmax scale of that call.
    sliding_window : int, optional
        That call's window.
    scores_out : torch.Tensor
        float32 ``[slots, kv_heads, capacity]``, accumulated in place as by ``slot_attention_triton``.
    col_from, col_to : torch.Tensor, optional
        int32 ``[B]``: only the valid columns at offsets ``[col_from[b], col_to[b])`` from row ``b``'s first
        valid column are counted (all valid columns without them).
    softcap : float, optional
        That call's logit soft-capping (its sinks, if any, are already in ``lse``).
    """
    bsz, q_heads, num_cols, head_dim = query.shape
    _check_softcap(softcap)
    if lse.shape != (bsz, num_cols, q_heads) or lse.dtype != torch.float32:
        raise ValueError(
            f"lse must be float32 {(bsz, num_cols, q_heads)}, got {lse.dtype} {tuple(lse.shape)}"
        )
    if (col_from is None) != (col_to is None):
        raise ValueError("col_from and col_to go together")
    if scores_out.shape != k_cache.shape[:3] or scores_out.dtype != torch.float32:
        raise ValueError(
            f"scores_out must be float32 {tuple(k_cache.shape[:3])}, got {scores_out.dtype} "
            f"{tuple(scores_out.shape)}"
        )
    dot_dtype = query.dtype
    if dot_dtype == torch.bfloat16 and _interpreted():
        dot_dtype = torch.float32
    group = q_heads // k_cache.shape[1]
    block_m, block_n, _ = _tile_config(dot_dtype, _block_d(head_dim), group * num_cols)
    dot_dtype = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[dot_dtype]
    _launch_scores(
        query, k_cache, lse, lse, scores_out, batch, scale, sliding_window, col_from, col_to, False, 1,
        block_m, block_n, dot_dtype, softcap,
    )  # fmt: skip


__all__ = ["slot_attention_scores_triton", "slot_attention_triton"]
