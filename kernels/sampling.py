"""Triton sample op: temperature, top-k, top-p and min-p filtering plus sampling, without a sort.

Same contract as :func:`effdecode.ops.sampling.sample_tokens_reference`, which defines the semantics (tie
rules included); given the same exponentials the two return identical tokens.

Design
------
A program owns ``ROWS`` rows (one on a GPU for real vocabularies; many for small vocabularies and in the
interpreter) and streams their logits in ``[ROWS, BLOCK]`` tiles. Every pass over the vocabulary re-reads the
logits (L2-resident on a GPU after the first pass: 600 KB for a 151,936-token fp32 row) and recomputes
``s = logits / temperature``; nothing of size ``V`` is written.

1. **Statistics pass** (skipped when no row of the tile filters or is greedy): the maximum ``m``, its first
   index (the greedy token) and the minimum (the lower end of the searches).
2. **Top-k search** (``0 < top_k < V``): the k-th largest score ``tau_k`` is the smallest actual score ``c``
   with ``count(s > c) < k``.
3. **Top-p** (``top_p < 1``): one pass sums ``Z_k = sum(exp(s - m))`` over ``s >= tau_k``, then a search finds
   the smallest actual score ``c >= tau_k`` with ``mass(tau_k <= s <= c) > (1 - top_p) * Z_k``. This is the
   reference's rule (mass strictly above ``c`` below ``top_p * Z_k``) restated over the tail, so the fp32
   rounding scales with the tail's mass rather than the row's, which matters for ``top_p`` near 1 where the
   boundary token's own mass is tiny. Cross-block sums accumulate in fp64.
4. **Min-p** needs no pass: a token stays iff ``s - m >= log(min_p)``.
5. **Race pass**: ``argmax(s - log E)`` over the kept tokens, the exponential race ``argmax(p / E)`` with
   ``E ~ Exp(1)``, in log space (no normalisation needed).

Threshold search. Each search looks for the smallest actual score at which a monotone per-threshold sum (a
count or a mass) passes a test. It keeps a bracket ``[lo, hi]`` of scores around the answer, ``hi`` known to
pass, and each pass evaluates the sum at ``NUM_PIVOTS`` pivots spread evenly over the bracket in the
*order-preserving integer encoding* of fp32, so the bracket shrinks by ``NUM_PIVOTS + 1`` in the space of
representable floats whatever the scores' magnitudes. The same pass records, for every pivot, the largest
score at or below it and the smallest score above it, and the bracket snaps to those *actual scores*: the
search ends exactly on the boundary score (no epsilon), after at most ``ceil(32 / log2(NUM_PIVOTS + 1)) = 11``
passes with 8 pivots, and usually far fewer since it stops once the bracket holds one score. The sums run over
fixed token sets in a fixed order, so the result is a deterministic function of the row.

Cost for ``V = 151,936`` with 8 pivots, measured on random logits: top-k (k = 50) about 5-6 search passes,
top-p about 3 after top-k or 6-8 alone, so a row with every filter reads its logits about 12 times (1 + 6 + 1
+ 3 + 1) and an unfiltered row once. A search pass does ``NUM_PIVOTS`` compares and three masked reductions
per token. One program per row leaves most of a GPU idle for small batches; splitting a row over programs
would need a grid-wide reduction per pass.

Random numbers. Without explicit exponentials, ``E = -log(u)`` with ``u = (n + 0.5) / 2**23`` built from 23
bits of Philox ``randint(seeds[b], offsets[b] + v)``: ``u`` is never 0 or 1, so ``E`` is finite and positive.
Row ``b`` consumes the counters ``offsets[b] + [0, V)`` of its seed: advance ``offsets`` by ``V`` between
calls that reuse a seed.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Pivots per search pass: each pass divides the bracket by NUM_PIVOTS + 1 in fp32's ordered encoding.
_NUM_PIVOTS = 8
# A search takes at most ceil(32 / log2(num_pivots + 1)) passes on finite scores (11 with 8 pivots, 32 with
# one); this cap only stops a runaway loop on NaN logits, whose token is unspecified.
_MAX_SEARCH_PASSES = 40


@triton.jit
def _order_key(x):
    """fp32 -> int32 key with the same order (-inf smallest); ``_key_to_float`` inverts it."""
    bits = x.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _key_to_float(key):
    return (key ^ ((key >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def _load_scores(row_base, row_ok, cols, vocab, divisor):
    """``[ROWS, BLOCK]`` scaled fp32 scores; tokens past the vocabulary (or the batch) read as -inf."""
    mask = row_ok[:, None] & (cols < vocab)[None, :]
    x = tl.load(row_base + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32)
    # IEEE division, as torch's: a plain `/` is approximate (div.full.f32) on NVIDIA GPUs.
    s = tl.math.div_rn(x, tl.broadcast_to(divisor[:, None], x.shape))
    # -0.0 and +0.0 are one value to every comparison but two integer keys: fold them, so the search's
    # bracket of actual values cannot stall between the two.
    return tl.where(s == 0.0, 0.0, s)


@triton.jit
def _threshold_search(
    row_base,
    row_ok,
    vocab,
    divisor,
    m,
    floor,
    lo,
    hi,
    target,
    TAIL_MASS: tl.constexpr,
    BLOCK: tl.constexpr,
    NUM_PIVOTS: tl.constexpr,
    MAX_PASSES: tl.constexpr,
):
    """Per row, the smallest actual score ``c`` in ``[lo, hi]`` that passes, given that ``hi`` passes.

    Top-k (``TAIL_MASS`` False): ``c`` passes iff ``count(s > c) < target``. Top-p: iff the sum of
    ``exp(s - m)`` over ``floor <= s <= c`` exceeds ``target`` (fp64). Every argument but the pointers and
    ``vocab`` is ``[ROWS]``; rows starting with ``lo == hi`` take no part and return ``hi``.
    """
    pivot_idx = tl.arange(0, NUM_PIVOTS)
    fractions = (pivot_idx + 1).to(tl.int64)
    lo_key = _order_key(lo)
    hi_key = _order_key(hi)
    active = lo_key < hi_key
    any_active = tl.max(active.to(tl.int32), axis=0)
    passes = 0
    while (any_active > 0) & (passes < MAX_PASSES):
        span = hi_key.to(tl.int64) - lo_key.to(tl.int64)
        pivot_keys = lo_key.to(tl.int64)[:, None] + span[:, None] * fractions[None, :] // (NUM_PIVOTS + 1)
        pivots = _key_to_float(pivot_keys.to(tl.int32))  # [ROWS, NUM_PIVOTS], ascending
        total = tl.zeros(pivots.shape, dtype=tl.float64)
        at_or_below = tl.full(pivots.shape, float("-inf"), dtype=tl.float32)
        above = tl.full(pivots.shape, float("inf"), dtype=tl.float32)
        for start in range(0, vocab, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            s = _load_scores(row_base, row_ok, cols, vocab, divisor)
            # [ROWS, NUM_PIVOTS, BLOCK]: the reductions run over the last axis (contiguous in the interpreter,
            # where numpy then sums pairwise).
            s3 = s[:, None, :]
            gt = s3 > pivots[:, :, None]
            if TAIL_MASS:
                w = tl.where(s >= floor[:, None], tl.exp(s - m[:, None]), 0.0)
                total += tl.sum(tl.where(gt, 0.0, w[:, None, :]), axis=2).to(tl.float64)
            else:
                total += tl.sum(gt.to(tl.float32), axis=2).to(tl.float64)
            at_or_below = tl.maximum(at_or_below, tl.max(tl.where(gt, float("-inf"), s3), axis=2))
            above = tl.minimum(above, tl.min(tl.where(gt, s3, float("inf")), axis=2))
        # The sums are monotone in the pivot (non-negative terms over nested sets, one reduction order), so
        # the failing pivots are a prefix; `fails` indexes the first pivot that passes.
        if TAIL_MASS:
            fails = tl.sum((total <= target[:, None]).to(tl.int32), axis=1)
        else:
            fails = tl.sum((total >= target[:, None]).to(tl.int32), axis=1)
        # The answer is at most that pivot, hence at most the largest score at or below it (same sum), and
        # above the last failing pivot, hence at least the smallest score above that one.
        new_hi = tl.max(tl.where(pivot_idx[None, :] == fails[:, None], at_or_below, float("-inf")), axis=1)
        new_lo = tl.max(tl.where(pivot_idx[None, :] == fails[:, None] - 1, above, float("-inf")), axis=1)
        hi = tl.where(active & (fails < NUM_PIVOTS), new_hi, hi)
        lo = tl.where(active & (fails > 0), new_lo, lo)
        lo_key = _order_key(lo)
        hi_key = _order_key(hi)
        active = lo_key < hi_key
        any_active = tl.max(active.to(tl.int32), axis=0)
        passes += 1
    return hi


@triton.jit
def _sample_kernel(
    logits_ptr,
    out_ptr,
    temperature_ptr,
    top_k_ptr,
    top_p_ptr,
    log_min_p_ptr,
    seeds_ptr,
    offsets_ptr,
    exp_ptr,
    batch,
    vocab,
    stride_logits,
    stride_exp,
    HAS_EXP: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
    NUM_PIVOTS: tl.constexpr,
    MAX_PASSES: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < batch
    rows64 = rows.to(tl.int64)
    row_base = logits_ptr + rows64[:, None] * stride_logits
    # Rows past the batch read temperature 0: greedy, so no search waits on them.
    temperature = tl.load(temperature_ptr + rows, mask=row_ok, other=0.0)
    top_k = tl.load(top_k_ptr + rows, mask=row_ok, other=0)
    top_p = tl.load(top_p_ptr + rows, mask=row_ok, other=1.0)
    log_min_p = tl.load(log_min_p_ptr + rows, mask=row_ok, other=float("-inf"))

    sampled = temperature > 0.0
    divisor = tl.where(sampled, temperature, 1.0)  # greedy rows read the raw logits
    top_k_on = (top_k > 0) & (top_k < vocab) & sampled
    top_p_on = (top_p < 1.0) & sampled
    min_p_on = (log_min_p > float("-inf")) & sampled
    needs_stats = (temperature <= 0.0) | top_k_on | top_p_on | min_p_on

    # Pass 1: max (with its first index) and min of the scores. Tiles of unfiltered rows skip it.
    m = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    lowest = tl.full([ROWS], float("inf"), dtype=tl.float32)
    argmax = tl.zeros([ROWS], dtype=tl.int64)
    if tl.max(needs_stats.to(tl.int32), axis=0) > 0:
        for start in range(0, vocab, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            s = _load_scores(row_base, row_ok, cols, vocab, divisor)
            block_max = tl.max(s, axis=1)
            block_arg = tl.argmax(s, axis=1).to(tl.int64)
            # Strictly greater: an equal maximum in a later block keeps the earlier (lower) index.
            argmax = tl.where(block_max > m, start + block_arg, argmax)
            m = tl.maximum(m, block_max)
            lowest = tl.minimum(lowest, tl.min(tl.where((cols < vocab)[None, :], s, float("inf")), axis=1))

    # The shift of exp(s - m): m itself on real rows; 0 on padding rows (m = -inf), where it avoids NaNs.
    m_exp = tl.where(m > float("-inf"), m, 0.0)

    # Top-k: rows without it start (and stay) at lo == hi.
    tau = _threshold_search(
        row_base, row_ok, vocab, divisor, m_exp, m, tl.where(top_k_on, lowest, m), m, top_k.to(tl.float64),
        False, BLOCK, NUM_PIVOTS, MAX_PASSES,
    )  # fmt: skip
    tau = tl.where(top_k_on, tau, float("-inf"))

    # Top-p over the tokens top-k kept.
    if tl.max(top_p_on.to(tl.int32), axis=0) > 0:
        z = tl.zeros([ROWS], dtype=tl.float64)
        for start in range(0, vocab, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            s = _load_scores(row_base, row_ok, cols, vocab, divisor)
            z += tl.sum(tl.where(s >= tau[:, None], tl.exp(s - m_exp[:, None]), 0.0), axis=1).to(tl.float64)
        tail = (1.0 - top_p.to(tl.float64)) * z
        # top_p <= 0 keeps the maximum and its ties: start (and stay) at lo = hi = m.
        lo = tl.where(top_p_on & (top_p > 0.0), tl.maximum(tau, lowest), m)
        tau_p = _threshold_search(
            row_base, row_ok, vocab, divisor, m_exp, tau, lo, m, tail, True, BLOCK, NUM_PIVOTS, MAX_PASSES
        )
        tau = tl.where(top_p_on, tau_p, tau)

    # Race: argmax(s - log E) over the kept tokens.
    token = argmax
    if tl.max(sampled.to(tl.int32), axis=0) > 0:
        log_min_p = tl.where(min_p_on, log_min_p, float("-inf"))
        seed = tl.load(seeds_ptr + rows, mask=row_ok, other=0)
        offset = tl.load(offsets_ptr + rows, mask=row_ok, other=0)
        exp_base = exp_ptr + rows64[:, None] * stride_exp
        best = tl.full([ROWS], float("-inf"), dtype=tl.float32)
        race_token = tl.zeros([ROWS], dtype=tl.int64)
        for start in range(0, vocab, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            in_row = row_ok[:, None] & (cols < vocab)[None, :]
            s = _load_scores(row_base, row_ok, cols, vocab, divisor)
            keep = in_row & (s >= tau[:, None]) & (s - m_exp[:, None] >= log_min_p[:, None])
            if HAS_EXP:
                e = tl.load(exp_base + cols[None, :], mask=in_row, other=1.0).to(tl.float32)
            else:
                counters = offset[:, None] + cols[None, :].to(tl.int64)
                bits = tl.randint(seed[:, None] + tl.zeros_like(counters), counters)
                # 23 random bits -> u = (n + 0.5) / 2**23, exact in fp32 and never 0 or 1: E finite, positive.
                n = ((bits >> 9) & 0x7FFFFF).to(tl.float32)
                e = -tl.log((n + 0.5) * 1.1920928955078125e-07)
            key = tl.where(keep, s - tl.log(e), float("-inf"))
            block_best = tl.max(key, axis=1)
            block_arg = tl.argmax(key, axis=1).to(tl.int64)
            race_token = tl.where(block_best > best, start + block_arg, race_token)
            best = tl.maximum(best, block_best)
        token = tl.where(sampled, race_token, argmax)
    tl.store(out_ptr + rows, token, mask=row_ok)


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _launch_config(vocab: int, batch: int, rows: int | None) -> tuple[int, int, int]:
    """(BLOCK, ROWS, num_warps) for a ``[batch, vocab]`` launch.

    On a GPU a tile holds about 1024 scores (times the pivots in the search passes): one row per program for
    real vocabularies, several rows of a small one. The interpreter pays per operation rather than per
    element, so there tiles are as large as memory comfortably allows.
    """
    tile = 1 << 16 if _interpreted() else 1024
    block = max(min(triton.next_power_of_2(vocab), tile), 16)
    if rows is None:
        rows = min(max(tile // block, 1), triton.next_power_of_2(batch))
    if rows < 1 or rows & (rows - 1):
        raise ValueError(f"rows_per_program must be a power of 2, got {rows}")
    return block, rows, 8 if block * rows >= 1024 else 4


def sample_tokens_triton(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    seeds: torch.Tensor | None,
    offsets: torch.Tensor | None,
    exponentials: torch.Tensor | None = None,
    *,
    num_pivots: int = _NUM_PIVOTS,
    rows_per_program: int | None = None,
) -> torch.Tensor:
    """Filter and sample one token per row in one launch, without a sort and without a host sync.

    Same contract as :func:`effdecode.ops.sampling.sample_tokens_reference`; with ``exponentials`` given
    the tokens are identical to it.

    Parameters
    ----------
    logits : torch.Tensor
        ``[B, V]`` fp32, fp16 or bf16; computed in fp32.
    temperature, top_p, min_p : torch.Tensor
        ``[B]`` float per-row parameters (``temperature <= 0``: greedy; ``top_p = 1``, ``min_p = 0``: off).
    top_k : torch.Tensor
        ``[B]`` integer, ``0`` (or ``>= V``) is off.
    seeds, offsets : torch.Tensor or None
        ``[B]`` int64 Philox seed and counter offset per row; row ``b`` uses counters ``offsets[b] + v`` for
        ``v < V``, so advance ``offsets`` by ``V`` between calls that reuse a seed. Unused (may be None) when
        ``exponentials`` is given.
    exponentials : torch.Tensor, optional
        ``[B, V]`` Exp(1) draws to use instead of Philox.
    num_pivots : int
        Pivots per threshold-search pass (power of 2): more pivots, fewer passes, more work per pass.
    rows_per_program : int, optional
        Rows each program handles (power of 2); chosen from ``V`` by default (tests, tuning).

    Returns
    -------
    torch.Tensor
        int64 ``[B]`` tokens.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, V], got shape {tuple(logits.shape)}")
    bsz, vocab = logits.shape
    for name, param in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p), ("min_p", min_p)):
        if tuple(param.shape) != (bsz,):
            raise ValueError(f"{name} must be [B] = [{bsz}], got shape {tuple(param.shape)}")
    if num_pivots < 1 or num_pivots & (num_pivots - 1):
        raise ValueError(f"num_pivots must be a power of 2, got {num_pivots}")
    device = logits.device
    out = torch.empty(bsz, dtype=torch.int64, device=device)
    if bsz == 0:
        return out
    if vocab == 0:
        raise ValueError("cannot sample from an empty vocabulary")
    if vocab >= 2**31:
        raise ValueError(f"vocabulary of {vocab} tokens does not fit int32 indices")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    has_exp = exponentials is not None
    if has_exp:
        if tuple(exponentials.shape) != (bsz, vocab):
            raise ValueError(
                f"exponentials must be [B, V] = [{bsz}, {vocab}], got {tuple(exponentials.shape)}"
            )
        exponentials = exponentials.to(device=device, dtype=torch.float32)
        if exponentials.stride(1) != 1:
            exponentials = exponentials.contiguous()
        seeds = offsets = torch.zeros(bsz, dtype=torch.int64, device=device)
    else:
        if seeds is None or offsets is None:
            raise ValueError("seeds and offsets are required unless exponentials are given")
        if tuple(seeds.shape) != (bsz,) or tuple(offsets.shape) != (bsz,):
            raise ValueError(f"seeds and offsets must be [B] = [{bsz}]")
        seeds = seeds.to(device=device, dtype=torch.int64)
        offsets = offsets.to(device=device, dtype=torch.int64)
    temperature = temperature.to(device=device, dtype=torch.float32)
    # Clamped on the device (no sync) so any integer dtype fits the kernel's int32.
    top_k = top_k.to(device=device).clamp(0, vocab).to(torch.int32)
    top_p = top_p.to(device=device, dtype=torch.float32)
    # The reference takes the same torch.log, so the min-p boundary compares identical fp32 values.
    log_min_p = torch.log(min_p.to(device=device, dtype=torch.float32))

    block, rows_per_program, num_warps = _launch_config(vocab, bsz, rows_per_program)
    exp_arg = exponentials if has_exp else logits  # unread without HAS_EXP
    _sample_kernel[(triton.cdiv(bsz, rows_per_program),)](
        logits,
        out,
        temperature,
        top_k,
        top_p,
        log_min_p,
        seeds,
        offsets,
        exp_arg,
        bsz,
        vocab,
        logits.stride(0),
        exp_arg.stride(0),
        HAS_EXP=has_exp,
        ROWS=rows_per_program,
        BLOCK=block,
        NUM_PIVOTS=num_pivots,
        MAX_PASSES=_MAX_SEARCH_PASSES,
        num_warps=num_warps,
    )
    return out


__all__ = ["sample_tokens_triton"]
