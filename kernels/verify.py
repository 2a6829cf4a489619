"""Triton kernels of draft verification: greedy, and speculative (rejection) sampling.

Both follow the right-aligned layout and the outputs of :mod:`effdecode.ops.verify` (see its module
docstring); that module holds the torch references and the dispatch.

Greedy
------
One program per row walks the row's valid columns left to right. At each column it streams the vocabulary
in blocks and keeps a running argmax (``torch.argmax`` order: the first NaN wins, else the largest value,
ties to the lowest index), stores the prediction, and stops at the first rejected draft, at the bonus column
or at an EOS token, so the columns after a rejection are never read. This is the fallback for CUDA tensors
where the ``effdecode._C`` extension is not built.

Sampling
--------
The acceptance test of every draft reads one probability per distribution: ``p(x_i)`` and ``q(x_i)`` at the
draft token, gathered for all ``T`` columns at once (vectorized over a ``BLOCK_T`` tile, no loop). The
first rejection is found with a min-reduction, so only one column per row ever needs the whole vocabulary:
the one where the final token (the recovered token after a rejection, or the bonus token) is sampled, and
none at all when an accepted draft is an EOS.

That column is sampled with the exponential race ``argmax_v r[v] / E[v]`` (``E ~ Exp(1)``), which needs
neither normalization nor a sort and so streams: ``r = max(p - q, 0)`` after a rejection (``q`` = one-hot
on the draft in n-gram mode), ``r = p`` for the bonus. Two races run side by side over the same loads, one
on ``r`` and one on ``p``, so that the fallback "``p == q``: sample from ``p``" costs no second pass.

Grid ``(B, num_chunks)``: program ``(b, k)`` repeats row ``b``'s (cheap) acceptance scan and races over the
``k``-th vocabulary chunk. With one chunk it finishes the row itself; with several (small batches on a large
GPU, where ``B`` programs would leave most SMs idle) each writes its two partial winners and a second
kernel, one program per row, merges them (largest key, ties to the lowest index, as ``torch.argmax``) and
writes the outputs.

Keys are ``r / E`` rounded to nearest (``tl.math.div_rn``; plain ``/`` is an approximate division on NVIDIA
GPUs), the acceptance test is ``u * q < p``, and the reference computes the very same IEEE operations, so
with caller-provided uniforms and exponentials both give identical tokens.

Random numbers, when not given, come from Philox (``tl.rand``) keyed by the row's ``seed``; the counter of
column ``c`` and vocabulary entry ``v`` is ``offset + c * (V + 1) + v``, and the acceptance uniform of
column ``c`` uses ``v = V``. One call thus consumes ``T * (V + 1)`` counters per row
(:func:`effdecode.ops.verify.philox_offset_increment`); the caller advances ``offsets`` by that much
between calls, on the device, so nothing synchronizes with the host and the launch can be graph-captured.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

# Index sentinel of the argmax reductions: larger than any vocabulary index.
_NO_INDEX = tl.constexpr(2**31 - 1)
# Fewest vocabulary entries a chunk of the sampling race is given: below this the partials' round trip
# costs more than the extra parallelism gains.
_MIN_CHUNK = 4096
_MAX_CHUNKS = 64


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _block_v(vocab: int) -> int:
    # The interpreter pays per operation, not per element: wide blocks make it several times faster.
    return min(triton.next_power_of_2(vocab), 8192 if _interpreted() else 1024)


def _small_block(n: int) -> int:
    return max(triton.next_power_of_2(max(n, 1)), 2)


# --------------------------------------------------------------------------------------------------------
# Greedy
# --------------------------------------------------------------------------------------------------------


@triton.jit
def _column_argmax(column_ptr, stride_v, vocab, BLOCK_V: tl.constexpr):
    """Index of the ``torch.argmax`` winner of one column of logits (any float dtype, compared in fp32)."""
    offs = tl.arange(0, BLOCK_V)
    best_val = tl.full((), float("-inf"), tl.float32)
    best_idx = tl.full((), _NO_INDEX, tl.int32)
    best_nan = best_idx < 0  # False, as a tensor so the loop carries a fixed type
    for v0 in range(0, vocab, BLOCK_V):
        idx = v0 + offs
        ok = idx < vocab
        x = tl.load(column_ptr + idx.to(tl.int64) * stride_v, mask=ok, other=float("-inf")).to(tl.float32)
        is_nan = x != x
        nan_idx = tl.min(tl.where(is_nan & ok, idx, _NO_INDEX), 0)
        m = tl.max(tl.where(is_nan, float("-inf"), x), 0)
        # `ok` matters when the whole block is -inf: the masked lanes hold -inf too.
        m_idx = tl.min(tl.where((x == m) & ok, idx, _NO_INDEX), 0)
        block_nan = nan_idx != _NO_INDEX
        take_nan = block_nan & ~best_nan
        # Earlier blocks win ties (strict >); the first block is always taken, even when it is all -inf.
        take_num = ~best_nan & ~block_nan & ((m > best_val) | (best_idx == _NO_INDEX))
        best_idx = tl.where(take_nan, nan_idx, tl.where(take_num, m_idx, best_idx))
        best_val = tl.where(take_num, m, best_val)
        best_nan = best_nan | take_nan
    return best_idx


@triton.jit
def _is_eos(token, eos_ptr, num_eos, BLOCK_E: tl.constexpr):
    """Whether the scalar ``token`` is one of the ``num_eos`` ids at ``eos_ptr``."""
    offs_e = tl.arange(0, BLOCK_E)
    eos = tl.load(eos_ptr + offs_e, mask=offs_e < num_eos, other=-1)
    return tl.sum(((eos == token) & (offs_e < num_eos)).to(tl.int32), 0) > 0


@triton.jit
def _verify_greedy_kernel(
    logits_ptr, ids_ptr, q_lens_ptr, finished_ptr, eos_ptr, num_emitted_ptr, emitted_ptr, finished_out_ptr,
    num_cols, vocab, num_eos,
    sl_b, sl_t, sl_v, si_b, si_t,
    BLOCK_V: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    q_len = tl.minimum(tl.maximum(tl.load(q_lens_ptr + b).to(tl.int32), 0), num_cols)
    was_finished = tl.load(finished_ptr + b) != 0
    start = num_cols - q_len  # column of the last accepted token
    num_drafts = q_len - 1
    row_logits = logits_ptr + b * sl_b
    row_ids = ids_ptr + b * si_b
    row_out = emitted_ptr + b * num_cols

    count = q_len * 0
    hit_eos = was_finished & ~was_finished
    go = ~was_finished & (q_len > 0)
    j = q_len * 0
    while go:
        col = start + j
        prediction = _column_argmax(row_logits + col.to(tl.int64) * sl_t, sl_v, vocab, BLOCK_V).to(tl.int64)
        tl.store(row_out + j, prediction)
        count = j + 1
        hit_eos = _is_eos(prediction, eos_ptr, num_eos, BLOCK_E)
        has_next = j < num_drafts
        next_draft = tl.load(row_ids + (col + 1).to(tl.int64) * si_t, mask=has_next, other=-1)
        go = has_next & ~hit_eos & (next_draft == prediction)
        j += 1

    offs_t = tl.arange(0, BLOCK_T)
    unused = (offs_t >= count) & (offs_t < num_cols)
    tl.store(row_out + offs_t, tl.full((BLOCK_T,), -1, tl.int64), mask=unused)
    tl.store(num_emitted_ptr + b, count)
    tl.store(finished_out_ptr + b, was_finished | hit_eos)


def _empty_outputs(
    batch: int, num_cols: int, vocab: int, device: torch.device, op: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Uninitialised ``num_emitted`` [B] int32, ``emitted`` [B, T] int64 and ``finished_out`` [B] bool."""
    if batch and vocab == 0:
        raise ValueError(f"{op}: empty vocabulary")
    return (
        torch.empty(batch, dtype=torch.int32, device=device),
        torch.empty(batch, num_cols, dtype=torch.int64, device=device),
        torch.empty(batch, dtype=torch.bool, device=device),
    )


def verify_greedy_triton(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    q_lens: torch.Tensor,
    finished: torch.Tensor,
    eos_token_ids: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy verification in one Triton launch, one program per row.

    Same contract as :func:`effdecode.ops.verify.verify_greedy_reference` (shapes checked there).

    Parameters
    ----------
    logits : torch.Tensor
        ``[B, T, V]`` float32/float16/bfloat16, any strides.
    input_ids : torch.Tensor
        int64 ``[B, T]``, any strides.
    q_lens : torch.Tensor
        int32 ``[B]``.
    finished : torch.Tensor
        bool ``[B]``.
    eos_token_ids : torch.Tensor
        int64 ``[E]`` on ``logits``' device.

    Returns
    -------
    tuple of torch.Tensor
        ``num_emitted`` int32 ``[B]``, ``emitted`` int64 ``[B, T]`` (``-1`` padded), ``finished_out``
        bool ``[B]``.
    """
    batch, num_cols, vocab = logits.shape
    device = logits.device
    num_emitted, emitted, finished_out = _empty_outputs(batch, num_cols, vocab, device, "verify_greedy")
    if batch == 0:
        return num_emitted, emitted, finished_out
    block_v = _block_v(vocab)
    _verify_greedy_kernel[(batch,)](
        logits, input_ids, q_lens, finished, eos_token_ids, num_emitted, emitted, finished_out,
        num_cols, vocab, eos_token_ids.numel(),
        *logits.stride(), *input_ids.stride(),
        BLOCK_V=block_v, BLOCK_T=_small_block(num_cols), BLOCK_E=_small_block(eos_token_ids.numel()),
        num_warps=4 if block_v >= 512 else 2,
    )  # fmt: skip
    return num_emitted, emitted, finished_out


# --------------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------------


@triton.jit
def _scan_drafts(
    target_ptr, draft_ptr, ids_ptr, unif_ptr, eos_ptr, seed, offset, b, start, num_drafts, vocab, num_eos,
    st_b, st_t, st_v, sd_b, sd_t, sd_v, si_b, si_t, su_b, su_t,
    HAS_DRAFT_PROBS: tl.constexpr, HAS_UNIFORMS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    """Acceptance test of all drafts of row ``b`` at once.

    Returns ``(accepted, first_eos, drafts)``: the number of leading accepted drafts, the left-aligned
    position of the first EOS among them (``BLOCK_T`` if none) and the ``[BLOCK_T]`` draft tokens
    (``drafts[j]`` is draft ``j + 1``, at column ``start + j + 1``).
    """
    j = tl.arange(0, BLOCK_T)
    is_draft = j < num_drafts
    col = (start + j).to(tl.int64)  # the column whose distribution draft j + 1 is checked against
    drafts = tl.load(ids_ptr + b * si_b + (col + 1) * si_t, mask=is_draft, other=0)
    # Out-of-vocabulary ids are never read; they count as rejected (p = 0) instead of faulting.
    in_vocab = is_draft & (drafts >= 0) & (drafts < vocab)
    p_tok = tl.load(target_ptr + b * st_b + col * st_t + drafts * st_v, mask=in_vocab, other=0.0)
    if HAS_DRAFT_PROBS:
        q_tok = tl.load(draft_ptr + b * sd_b + col * sd_t + drafts * sd_v, mask=in_vocab, other=1.0)
    else:
        q_tok = tl.full((BLOCK_T,), 1.0, tl.float32)  # n-gram: the draft is certain under q
    if HAS_UNIFORMS:
        u = tl.load(unif_ptr + b * su_b + col * su_t, mask=is_draft, other=1.0)
    else:
        u = tl.rand(seed, offset + col * (vocab + 1) + vocab)
    # u < p / q without a division (and without trouble at q = 0). The fp32 product u * q is rounded exactly
    # as the reference rounds it, so both decide identically.
    rejected = is_draft & ~(u * q_tok < p_tok)
    accepted = tl.min(tl.where(rejected, j, num_drafts), 0)

    offs_e = tl.arange(0, BLOCK_E)
    eos = tl.load(eos_ptr + offs_e, mask=offs_e < num_eos, other=-1)
    eos_match = (drafts[:, None] == eos[None, :]) & (offs_e < num_eos)[None, :]
    is_eos = (tl.sum(eos_match.to(tl.int32), 1) > 0) & (j < accepted)
    first_eos = tl.min(tl.where(is_eos, j, BLOCK_T), 0)
    return accepted, first_eos, drafts


@triton.jit
def _race_chunk(
    target_ptr, draft_ptr, exp_ptr, seed, offset, b, col, rejected, rejected_token, lo, hi, vocab,
    st_b, st_t, st_v, sd_b, sd_t, sd_v, se_b, se_t, se_v,
    HAS_DRAFT_PROBS: tl.constexpr, HAS_EXPONENTIALS: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    """Exponential races over vocabulary entries ``[lo, hi)`` of column ``col``.

    Race ``r`` samples ``max(p - q, 0)`` (``q = 0`` unless ``rejected``; in n-gram mode ``q`` is one-hot on
    ``rejected_token``, ``-1`` for none), race ``p`` samples ``p``. Keys of zero-probability entries are
    ``-1``, below every real key, so a race whose best key is ``>= 0`` saw some mass. Returns
    ``(key_r, idx_r, key_p, idx_p)``, ``idx = _NO_INDEX`` while the key is ``-1``.
    """
    offs = tl.arange(0, BLOCK_V)
    col64 = col.to(tl.int64)
    p_row = target_ptr + b * st_b + col64 * st_t
    q_row = draft_ptr + b * sd_b + col64 * sd_t
    e_row = exp_ptr + b * se_b + col64 * se_t
    key_r = tl.full((), -1.0, tl.float32)
    key_p = tl.full((), -1.0, tl.float32)
    idx_r = tl.full((), _NO_INDEX, tl.int32)
    idx_p = tl.full((), _NO_INDEX, tl.int32)
    for v0 in range(lo, hi, BLOCK_V):
        idx = v0 + offs
        ok = idx < hi
        idx64 = idx.to(tl.int64)
        p = tl.load(p_row + idx64 * st_v, mask=ok, other=0.0)
        if HAS_DRAFT_PROBS:
            # where, not `ok & rejected`: the 3.9 interpreter mistypes a block combined with a scalar bool.
            q = tl.load(q_row + idx64 * sd_v, mask=tl.where(rejected, ok, False), other=0.0)
        else:
            q = tl.where(idx == rejected_token, 1.0, 0.0)
        if HAS_EXPONENTIALS:
            e = tl.load(e_row + idx64 * se_v, mask=ok, other=1.0)
        else:
            # -log(u), u in [0, 1): u = 0 gives E = inf, key 0, i.e. that entry just cannot win; the
            # alternative -log(1 - u) would give E = 0 and force an arbitrary entry to win instead.
            e = -tl.log(tl.rand(seed, offset + col64 * (vocab + 1) + idx64))
        r = tl.maximum(p - q, 0.0)
        kr = tl.where(r > 0.0, tl.math.div_rn(r, e), -1.0)
        kp = tl.where(p > 0.0, tl.math.div_rn(p, e), -1.0)
        # Block winners (lowest index among equal keys), then merged strictly so earlier blocks win ties.
        mr = tl.max(kr, 0)
        ir = tl.min(tl.where(kr == mr, idx, _NO_INDEX), 0)
        mp = tl.max(kp, 0)
        ip = tl.min(tl.where(kp == mp, idx, _NO_INDEX), 0)
        take_r = mr > key_r
        take_p = mp > key_p
        idx_r = tl.where(take_r, ir, idx_r)
        key_r = tl.where(take_r, mr, key_r)
        idx_p = tl.where(take_p, ip, idx_p)
        key_p = tl.where(take_p, mp, key_p)
    return key_r, idx_r, key_p, idx_p


@triton.jit
def _finish_row(
    num_emitted_ptr, emitted_ptr, finished_out_ptr, eos_ptr, b, num_cols, num_eos, active, was_finished,
    accepted, first_eos, drafts, key_r, idx_r, idx_p,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    """Pick the final token from the races, apply the EOS cut and write row ``b``'s outputs."""
    final = tl.where(key_r >= 0.0, idx_r, idx_p)
    final = tl.where(final == _NO_INDEX, 0, final).to(tl.int64)  # all-zero p: index 0, as torch.argmax
    eos_in_drafts = first_eos < BLOCK_T
    final_is_eos = _is_eos(final, eos_ptr, num_eos, BLOCK_E)
    count = tl.where(eos_in_drafts, first_eos + 1, accepted + 1)
    count = tl.where(active, count, 0)
    j = tl.arange(0, BLOCK_T)
    tokens = tl.where(j < accepted, drafts, final)
    tokens = tl.where(j < count, tokens, -1)
    tl.store(emitted_ptr + b * num_cols + j, tokens, mask=j < num_cols)
    tl.store(num_emitted_ptr + b, count.to(tl.int32))
    tl.store(finished_out_ptr + b, was_finished | (active & (eos_in_drafts | final_is_eos)))


@triton.jit
def _verify_sampling_kernel(
    target_ptr, draft_ptr, ids_ptr, q_lens_ptr, finished_ptr, eos_ptr, unif_ptr, exp_ptr, seeds_ptr,
    offsets_ptr, num_emitted_ptr, emitted_ptr, finished_out_ptr, part_key_ptr, part_idx_ptr,
    num_cols, vocab, num_eos, chunk_len, num_chunks,
    st_b, st_t, st_v, sd_b, sd_t, sd_v, si_b, si_t, su_b, su_t, se_b, se_t, se_v,
    HAS_DRAFT_PROBS: tl.constexpr, HAS_UNIFORMS: tl.constexpr, HAS_EXPONENTIALS: tl.constexpr,
    SPLIT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    q_len = tl.minimum(tl.maximum(tl.load(q_lens_ptr + b).to(tl.int32), 0), num_cols)
    was_finished = tl.load(finished_ptr + b) != 0
    active = ~was_finished & (q_len > 0)
    start = num_cols - q_len
    num_drafts = q_len - 1
    if HAS_UNIFORMS and HAS_EXPONENTIALS:
        seed = b * 0
        offset = b * 0
    else:
        seed = tl.load(seeds_ptr + b)
        offset = tl.load(offsets_ptr + b)

    accepted, first_eos, drafts = _scan_drafts(
        target_ptr, draft_ptr, ids_ptr, unif_ptr, eos_ptr, seed, offset, b, start, num_drafts, vocab, num_eos,
        st_b, st_t, st_v, sd_b, sd_t, sd_v, si_b, si_t, su_b, su_t,
        HAS_DRAFT_PROBS, HAS_UNIFORMS, BLOCK_T, BLOCK_E,
    )  # fmt: skip
    rejected = accepted < num_drafts
    # The rejected draft's token (n-gram mode subtracts its one-hot q); the bonus column has none.
    rejected_token = tl.sum(tl.where(tl.arange(0, BLOCK_T) == accepted, drafts, 0), 0)
    rejected_token = tl.where(rejected, rejected_token, -1)
    # Only live rows whose accepted drafts hold no EOS sample; the others skip the vocabulary entirely.
    need_sample = active & (first_eos == BLOCK_T)
    lo = chunk * chunk_len
    hi = tl.where(need_sample, tl.minimum(lo + chunk_len, vocab), lo)
    key_r, idx_r, key_p, idx_p = _race_chunk(
        target_ptr, draft_ptr, exp_ptr, seed, offset, b, start + accepted, rejected, rejected_token, lo, hi,
        vocab, st_b, st_t, st_v, sd_b, sd_t, sd_v, se_b, se_t, se_v,
        HAS_DRAFT_PROBS, HAS_EXPONENTIALS, BLOCK_V,
    )  # fmt: skip
    if SPLIT:
        part = (b * num_chunks + chunk) * 2
        tl.store(part_key_ptr + part, key_r)
        tl.store(part_key_ptr + part + 1, key_p)
        tl.store(part_idx_ptr + part, idx_r)
        tl.store(part_idx_ptr + part + 1, idx_p)
    else:
        _finish_row(
            num_emitted_ptr, emitted_ptr, finished_out_ptr, eos_ptr, b, num_cols, num_eos, active,
            was_finished, accepted, first_eos, drafts, key_r, idx_r, idx_p, BLOCK_T, BLOCK_E,
        )  # fmt: skip


@triton.jit
def _merge_races_kernel(
    target_ptr, draft_ptr, ids_ptr, q_lens_ptr, finished_ptr, eos_ptr, unif_ptr, seeds_ptr, offsets_ptr,
    num_emitted_ptr, emitted_ptr, finished_out_ptr, part_key_ptr, part_idx_ptr,
    num_cols, vocab, num_eos, num_chunks,
    st_b, st_t, st_v, sd_b, sd_t, sd_v, si_b, si_t, su_b, su_t,
    HAS_DRAFT_PROBS: tl.constexpr, HAS_UNIFORMS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    q_len = tl.minimum(tl.maximum(tl.load(q_lens_ptr + b).to(tl.int32), 0), num_cols)
    was_finished = tl.load(finished_ptr + b) != 0
    active = ~was_finished & (q_len > 0)
    if HAS_UNIFORMS:
        seed = b * 0
        offset = b * 0
    else:
        seed = tl.load(seeds_ptr + b)
        offset = tl.load(offsets_ptr + b)
    # Recomputing the scan (T gathers, same Philox counters) is cheaper than a round trip through memory.
    accepted, first_eos, drafts = _scan_drafts(
        target_ptr, draft_ptr, ids_ptr, unif_ptr, eos_ptr, seed, offset, b, num_cols - q_len, q_len - 1,
        vocab, num_eos, st_b, st_t, st_v, sd_b, sd_t, sd_v, si_b, si_t, su_b, su_t,
        HAS_DRAFT_PROBS, HAS_UNIFORMS, BLOCK_T, BLOCK_E,
    )  # fmt: skip
    c = tl.arange(0, BLOCK_C)
    ok = c < num_chunks
    part = (b * num_chunks + c) * 2
    kr = tl.load(part_key_ptr + part, mask=ok, other=-1.0)
    kp = tl.load(part_key_ptr + part + 1, mask=ok, other=-1.0)
    ir = tl.load(part_idx_ptr + part, mask=ok, other=_NO_INDEX)
    ip = tl.load(part_idx_ptr + part + 1, mask=ok, other=_NO_INDEX)
    # Chunks are in index order, so the lowest index among equal keys is the lowest chunk's winner.
    key_r = tl.max(kr, 0)
    idx_r = tl.min(tl.where(kr == key_r, ir, _NO_INDEX), 0)
    key_p = tl.max(kp, 0)
    idx_p = tl.min(tl.where(kp == key_p, ip, _NO_INDEX), 0)
    _finish_row(
        num_emitted_ptr, emitted_ptr, finished_out_ptr, eos_ptr, b, num_cols, num_eos, active, was_finished,
        accepted, first_eos, drafts, key_r, idx_r, idx_p, BLOCK_T, BLOCK_E,
    )  # fmt: skip


def _num_chunks(
    device: torch.device, batch: int, vocab: int, block_v: int, requested: int | None
) -> tuple[int, int]:
    """(chunks, entries per chunk): about two waves of programs on the GPU, chunks of >= _MIN_CHUNK."""
    if requested is None:
        if device.type != "cuda" or _interpreted():
            requested = 1  # the interpreter runs programs one after the other: splitting only adds work
        else:
            sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
            requested = min(triton.cdiv(2 * sms, max(batch, 1)), triton.cdiv(vocab, _MIN_CHUNK), _MAX_CHUNKS)
    requested = max(1, requested)
    chunk_len = triton.cdiv(triton.cdiv(vocab, requested), block_v) * block_v
    return triton.cdiv(vocab, chunk_len), chunk_len


def verify_sampling_triton(
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor | None,
    input_ids: torch.Tensor,
    q_lens: torch.Tensor,
    finished: torch.Tensor,
    eos_token_ids: torch.Tensor,
    seeds: torch.Tensor | None,
    offsets: torch.Tensor | None,
    uniforms: torch.Tensor | None = None,
    exponentials: torch.Tensor | None = None,
    *,
    num_chunks: int | None = None,
    block_v: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Speculative-sampling verification in Triton (one or two launches, no host synchronization).

    Same contract as :func:`effdecode.ops.verify.verify_sampling_reference` (shapes and dtypes are checked
    there); random numbers not given come from Philox with per-row ``seeds`` and ``offsets``.

    Parameters
    ----------
    target_probs : torch.Tensor
        float32 ``[B, T, V]``, any strides.
    draft_probs : torch.Tensor or None
        float32 ``[B, T, V]``, or None for n-gram (deterministic) drafts.
    input_ids : torch.Tensor
        int64 ``[B, T]``.
    q_lens : torch.Tensor
        int32 ``[B]``.
    finished : torch.Tensor
        bool ``[B]``.
    eos_token_ids : torch.Tensor
        int64 ``[E]`` on the probabilities' device.
    seeds, offsets : torch.Tensor or None
        int64 ``[B]``, Philox key and counter base per row; may be None only when both ``uniforms`` and
        ``exponentials`` are given.
    uniforms : torch.Tensor, optional
        float32 ``[B, T]``, acceptance uniforms per column.
    exponentials : torch.Tensor, optional
        float32 ``[B, T, V]``, ``Exp(1)`` samples of the race per column.
    num_chunks : int, optional
        Force the number of vocabulary chunks (tests, tuning); the effective number may be lower so that no
        chunk is empty. Default: one under the interpreter, else enough for about two waves of programs.
    block_v : int, optional
        Vocabulary entries per block (a power of two); default 1024 on GPUs.

    Returns
    -------
    tuple of torch.Tensor
        ``num_emitted`` int32 ``[B]``, ``emitted`` int64 ``[B, T]`` (``-1`` padded), ``finished_out``
        bool ``[B]``.
    """
    batch, num_cols, vocab = target_probs.shape
    device = target_probs.device
    num_emitted, emitted, finished_out = _empty_outputs(batch, num_cols, vocab, device, "verify_sampling")
    if batch == 0:
        return num_emitted, emitted, finished_out
    has_u, has_e = uniforms is not None, exponentials is not None
    if not (has_u and has_e) and (seeds is None or offsets is None):
        raise ValueError("verify_sampling: seeds and offsets are needed without uniforms and exponentials")
    block_v = block_v or _block_v(vocab)
    chunks, chunk_len = _num_chunks(device, batch, vocab, block_v, num_chunks)

    # Absent operands get a harmless stand-in pointer; their loads are compiled out by the constexpr flags.
    draft = draft_probs if draft_probs is not None else target_probs
    unif = uniforms if has_u else target_probs
    exps = exponentials if has_e else target_probs
    seeds = seeds if seeds is not None else q_lens
    offsets = offsets if offsets is not None else q_lens
    sd = draft.stride() if draft_probs is not None else (0, 0, 0)
    su = uniforms.stride() if has_u else (0, 0)
    se = exponentials.stride() if has_e else (0, 0, 0)
    if chunks > 1:
        part_key = torch.empty(batch * chunks * 2, dtype=torch.float32, device=device)
        part_idx = torch.empty(batch * chunks * 2, dtype=torch.int32, device=device)
    else:
        part_key = part_idx = num_emitted  # unused
    block_t, block_e = _small_block(num_cols), _small_block(eos_token_ids.numel())
    flags = dict(
        HAS_DRAFT_PROBS=draft_probs is not None, HAS_UNIFORMS=has_u, BLOCK_T=block_t, BLOCK_E=block_e
    )
    _verify_sampling_kernel[(batch, chunks)](
        target_probs, draft, input_ids, q_lens, finished, eos_token_ids, unif, exps, seeds, offsets,
        num_emitted, emitted, finished_out, part_key, part_idx,
        num_cols, vocab, eos_token_ids.numel(), chunk_len, chunks,
        *target_probs.stride(), *sd, *input_ids.stride(), *su, *se,
        HAS_EXPONENTIALS=has_e, SPLIT=chunks > 1, BLOCK_V=block_v, **flags,
        num_warps=4 if block_v >= 512 else 2,
    )  # fmt: skip
    if chunks > 1:
        _merge_races_kernel[(batch,)](
            target_probs, draft, input_ids, q_lens, finished, eos_token_ids, unif, seeds, offsets,
            num_emitted, emitted, finished_out, part_key, part_idx,
            num_cols, vocab, eos_token_ids.numel(), chunks,
            *target_probs.stride(), *sd, *input_ids.stride(), *su,
            BLOCK_C=_small_block(chunks), **flags,
            num_warps=1,
        )  # fmt: skip
    return num_emitted, emitted, finished_out


__all__ = ["verify_greedy_triton", "verify_sampling_triton"]
