"""Verification of draft tokens (speculative decoding): greedy, and lossless speculative sampling.

Greedy verification is also the token pick of plain greedy decoding.

Layout (the engine's right-aligned one, as in :mod:`effdecode.ops.attention`):

- ``logits`` / ``target_probs``: ``[B, T, V]``, the target model's output for the verify forward.
- ``input_ids``: int64 ``[B, T]``, the tokens fed to that forward.
- ``q_lens``: int32 ``[B]``; row ``b``'s valid columns are its last ``q_lens[b]``, from ``s = T - q_lens[b]``.
  Column ``s`` holds the row's last accepted token, columns ``s+1 .. T-1`` its ``d = q_lens[b] - 1`` drafts.

Outputs (both rules): ``num_emitted`` int32 ``[B]``; ``emitted`` int64 ``[B, T]``, left-aligned, ``-1``
after the emitted tokens; ``finished_out`` bool ``[B]``. The emitted run is cut right after its first EOS
token, which finishes the row. Finished rows emit nothing. ``T = 1`` is plain decoding.

Greedy rule: the prediction at a column is the argmax of its logits (ties: lowest index, NaN above all, as
``torch.argmax``). Draft ``i`` (column ``s+i``) is accepted iff drafts ``1..i`` all equal the prediction at
the column before them. With ``a`` drafts accepted the row emits drafts ``1..a`` and then the prediction at
``s+a`` (a correction, or the bonus token when ``a = d``): ``a + 1`` tokens, each equal to the prediction at
its column.

Sampling rule (Leviathan et al. / Chen et al. speculative sampling; the emitted tokens are distributed
exactly as sampling from the target alone): ``p_j = target_probs[b, s+j]`` is the target distribution after
drafts ``1..j``, ``q_j = draft_probs[b, s+j]`` the one draft ``j+1`` was sampled from (one-hot on the draft
in n-gram mode). For ``i = 1..d``, draft ``x_i`` is accepted iff ``u * q_{i-1}(x_i) < p_{i-1}(x_i)`` (i.e.
with probability ``min(1, p/q)``), ``u = uniforms[b, s+i-1]``. At the first rejection the row emits the
accepted drafts and a token drawn from ``normalize(max(p_{i-1} - q_{i-1}, 0))`` (from ``p_{i-1}`` where that
is all zero); if all ``d`` are accepted, a bonus token drawn from ``p_d`` (column ``T-1``). Drawing from
``r`` at column ``c`` is the exponential race ``argmax_v r[v] / E[v]``, ``E = exponentials[b, c]`` i.i.d.
``Exp(1)``: no normalization, no sort, lowest index on ties. Entries with ``r[v] = 0`` never win.

Random numbers: with ``uniforms`` and ``exponentials`` given, every implementation returns identical
results. Otherwise the torch reference draws them from a ``torch.Generator`` and the Triton kernel from
Philox inside the kernel, keyed by per-row ``seeds`` at counters from per-row ``offsets``; see
:func:`philox_offset_increment` for how callers advance ``offsets``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from effdecode.ops.backend import cuda_extension, resolve_backend

# Dtype codes of csrc/ops.h (DTypeCode).
_CUDA_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

VerifyResult = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def philox_offset_increment(num_cols: int, vocab: int) -> int:
    """Philox counters one :func:`verify_sampling` call consumes per row: ``T * (V + 1)``.

    The Triton kernel draws the race variable of column ``c``, vocabulary entry ``v`` at counter
    ``offsets[b] + c * (V + 1) + v`` and the acceptance uniform of column ``c`` at ``v = V``, all under key
    ``seeds[b]``. Calls that share a seed must therefore use disjoint counter ranges: after each call add
    this increment to ``offsets`` in place, on the device (``offsets += philox_offset_increment(T, V)``),
    which keeps the step free of host synchronization and graph-capturable. A row's counters are 64-bit, so
    a stream of ``2**64 / (T * (V + 1))`` calls never wraps. Rows with different seeds are independent
    whatever their offsets; rows sharing a seed need offsets at least one increment apart.

    Parameters
    ----------
    num_cols : int
        ``T``, the columns of the verify batch.
    vocab : int
        ``V``, the vocabulary size.

    Returns
    -------
    int
        The per-call advance of each row's offset.
    """
    return num_cols * (vocab + 1)


def _check_shapes(
    logits: torch.Tensor, input_ids: torch.Tensor, q_lens: torch.Tensor, finished: torch.Tensor
) -> None:
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, T, V], got shape {tuple(logits.shape)}")
    batch, num_cols, _ = logits.shape
    if tuple(input_ids.shape) != (batch, num_cols):
        raise ValueError(f"input_ids must be [B, T] = {(batch, num_cols)}, got {tuple(input_ids.shape)}")
    if tuple(q_lens.shape) != (batch,) or tuple(finished.shape) != (batch,):
        raise ValueError(
            f"q_lens and finished must be [B] = [{batch}], got {tuple(q_lens.shape)} and "
            f"{tuple(finished.shape)}"
        )


def verify_greedy_reference(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    q_lens: torch.Tensor,
    finished: torch.Tensor,
    eos_token_ids: torch.Tensor | Sequence[int],
) -> VerifyResult:
    """Torch reference of greedy verification, vectorized over rows (no host sync on CUDA).

    Parameters
    ----------
    logits : torch.Tensor
        ``[B, T, V]`` float32/float16/bfloat16, the target's logits for the verify forward.
    input_ids : torch.Tensor
        int64 ``[B, T]``, the tokens of that forward (right-aligned: last accepted token, then drafts).
    q_lens : torch.Tensor
        int32 ``[B]``, valid columns per row (``>= 1`` for unfinished rows; values are clamped to ``[0, T]``
        and a row with none emits nothing).
    finished : torch.Tensor
        bool ``[B]``, rows already finished; they emit nothing and stay finished.
    eos_token_ids : torch.Tensor or sequence of int
        int64 ``[E]`` (``E`` may be 0), the tokens that end a row.

    Returns
    -------
    num_emitted : torch.Tensor
        int32 ``[B]``, tokens emitted per row (``<= q_lens``; 0 for finished rows).
    emitted : torch.Tensor
        int64 ``[B, T]``, left-aligned: ``emitted[b, :num_emitted[b]]`` are the tokens, the rest ``-1``.
    finished_out : torch.Tensor
        bool ``[B]``, ``finished`` or an EOS was emitted in this step.
    """
    _check_shapes(logits, input_ids, q_lens, finished)
    num_cols = logits.shape[1]
    device = logits.device
    eos = torch.as_tensor(eos_token_ids, dtype=torch.int64, device=device)
    q = q_lens.to(device=device, dtype=torch.int64).clamp(0, num_cols)
    done = finished.to(device=device, dtype=torch.bool)
    cols = torch.arange(num_cols, device=device)

    # Left-align each row: position j reads column s + j (clamped; positions past q are masked below).
    at = (num_cols - q)[:, None] + cols
    predictions = logits.argmax(dim=-1).gather(1, at.clamp(max=num_cols - 1))  # prediction at column s+j
    drafts = input_ids.to(torch.int64).gather(1, (at + 1).clamp(max=num_cols - 1))  # draft j+1
    matches = (drafts == predictions) & (cols < (q - 1)[:, None])
    accepted = matches.to(torch.int64).cumprod(dim=1).sum(dim=1)  # leading run of matches

    # Emitted token j is the prediction at s+j, for j = 0..accepted; cut after the first EOS among them.
    is_eos = torch.isin(predictions, eos) & (cols <= accepted[:, None])
    hit_eos = is_eos.any(dim=1)
    first_eos = is_eos.to(torch.int64).argmax(dim=1)
    active = ~done & (q > 0)
    count = torch.where(hit_eos, first_eos + 1, accepted + 1) * active
    emitted = torch.where(cols < count[:, None], predictions, -1)
    return count.to(torch.int32), emitted, done | (active & hit_eos)


def _verify_greedy_cuda(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    q_lens: torch.Tensor,
    finished: torch.Tensor,
    eos_token_ids: torch.Tensor | Sequence[int],
) -> VerifyResult:
    """The ``effdecode._C`` kernel on the current stream of ``logits``' device (see csrc/verify.cu)."""
    _check_shapes(logits, input_ids, q_lens, finished)
    if logits.dtype not in _CUDA_DTYPE_CODES:
        raise TypeError(f"verify_greedy: logits dtype {logits.dtype} not supported by the CUDA kernel")
    device = logits.device
    # The kernel takes row and column strides but needs the vocab dimension contiguous.
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    input_ids = input_ids.to(device=device, dtype=torch.int64)
    q_lens = q_lens.to(device=device, dtype=torch.int32).contiguous()
    finished = finished.to(device=device, dtype=torch.bool).contiguous()
    eos = torch.as_tensor(eos_token_ids, dtype=torch.int64, device=device).contiguous()
    batch, num_cols, vocab = logits.shape

    num_emitted = torch.empty(batch, dtype=torch.int32, device=device)
    emitted = torch.empty(batch, num_cols, dtype=torch.int64, device=device)
    finished_out = torch.empty(batch, dtype=torch.bool, device=device)
    with torch.cuda.device(device):
        cuda_extension().verify_greedy(
            logits=logits.data_ptr(),
            logits_stride_b=logits.stride(0),
            logits_stride_t=logits.stride(1),
            input_ids=input_ids.data_ptr(),
            input_ids_stride_b=input_ids.stride(0),
            input_ids_stride_t=input_ids.stride(1),
            q_lens=q_lens.data_ptr(),
            finished=finished.data_ptr(),
            eos_token_ids=eos.data_ptr(),
            num_eos=eos.numel(),
            num_emitted=num_emitted.data_ptr(),
            emitted=emitted.data_ptr(),
            finished_out=finished_out.data_ptr(),
            batch=batch,
            num_cols=num_cols,
            vocab=vocab,
            dtype=_CUDA_DTYPE_CODES[logits.dtype],
            stream=torch.cuda.current_stream(device).cuda_stream,
        )
    return num_emitted, emitted, finished_out


def _verify_greedy_triton(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    q_lens: torch.Tensor,
    finished: torch.Tensor,
    eos_token_ids: torch.Tensor | Sequence[int],
) -> VerifyResult:
    """The Triton kernel of :mod:`effdecode.kernels.verify` (also runs under the CPU interpreter)."""
    from effdecode.kernels.verify import verify_greedy_triton

    _check_shapes(logits, input_ids, q_lens, finished)
    device = logits.device
    return verify_greedy_triton(
        logits,
        input_ids.to(device=device, dtype=torch.int64),
        q_lens.to(device=device, dtype=torch.int32),
        finished.to(device=device, dtype=torch.bool),
        torch.as_tensor(eos_token_ids, dtype=torch.int64, device=device),
    )


def verify_greedy(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    q_lens: torch.Tensor,
    finished: torch.Tensor,
    eos_token_ids: torch.Tensor | Sequence[int],
    backend: str = "auto",
) -> VerifyResult:
    """Greedy verification: the CUDA kernel where ``effdecode._C`` is built, else Triton on CUDA, else torch.

    Same parameters and results as :func:`verify_greedy_reference`, plus ``backend`` ("auto", "torch",
    "triton", "cuda"): ``auto`` takes the CUDA extension, then Triton (CUDA tensors), then torch. No path
    synchronizes with the host; pass ``eos_token_ids`` as a tensor on ``logits``' device to keep it that
    way.

    Parameters
    ----------
    logits : torch.Tensor
        ``[B, T, V]`` float32/float16/bfloat16.
    input_ids : torch.Tensor
        int64 ``[B, T]``.
    q_lens : torch.Tensor
        int32 ``[B]``.
    finished : torch.Tensor
        bool ``[B]``.
    eos_token_ids : torch.Tensor or sequence of int
        int64 ``[E]``.
    backend : str
        Requested implementation, resolved by :func:`effdecode.ops.backend.resolve_backend`.

    Returns
    -------
    tuple of torch.Tensor
        ``num_emitted`` int32 ``[B]``, ``emitted`` int64 ``[B, T]`` (``-1`` padded), ``finished_out``
        bool ``[B]``.
    """
    chosen = resolve_backend(backend, logits.device, has_cuda_op=True, has_triton_op=True)
    if chosen == "cuda":
        return _verify_greedy_cuda(logits, input_ids, q_lens, finished, eos_token_ids)
    if chosen == "triton":
        return _verify_greedy_triton(logits, input_ids, q_lens, finished, eos_token_ids)
    return verify_greedy_reference(logits, input_ids, q_lens, finished, eos_token_ids)


def _check_sampling_inputs(
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor | None,
    input_ids: torch.Tensor,
    q_lens: torch.Tensor,
    finished: torch.Tensor,
    uniforms: torch.Tensor | None,
    exponentials: torch.Tensor | None,
) -> None:
    _check_shapes(target_probs, input_ids, q_lens, finished)
    shape = tuple(target_probs.shape)
    # float32 only: the exact agreement of the implementations rests on the same fp32 operations.
    for name, t, want in (
        ("target_probs", target_probs, shape),
        ("draft_probs", draft_probs, shape),
        ("uniforms", uniforms, shape[:2]),
        ("exponentials", exponentials, shape),
    ):
        if t is None:
            continue
        if tuple(t.shape) != want or t.dtype != torch.float32:
            raise ValueError(f"{name} must be float32 {list(want)}, got {t.dtype} {list(t.shape)}")
        if t.device != target_probs.device:
            raise ValueError(f"{name} is on {t.device}, target_probs on {target_probs.device}")


def verify_sampling_reference(
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor | None,
    input_ids: torch.Tensor,
    q_lens: torch.Tensor,
    finished: torch.Tensor,
    eos_token_ids: torch.Tensor | Sequence[int],
    uniforms: torch.Tensor | None = None,
    exponentials: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> VerifyResult:
    """Torch reference of speculative-sampling verification, vectorized over rows (no host sync on CUDA).

    See the module docstring for the rule and the layout.

    Parameters
    ----------
    target_probs : torch.Tensor
        float32 ``[B, T, V]``, the (already warped) target distribution at each column.
    draft_probs : torch.Tensor or None
        float32 ``[B, T, V]``: ``draft_probs[b, s+j]`` is the distribution draft ``j+1`` was sampled from
        (the last column is unused). None means n-gram drafts: ``q`` is one-hot on the proposed token.
    input_ids : torch.Tensor
        int64 ``[B, T]``, the tokens of the verify forward (last accepted token, then drafts). Draft ids
        must lie in ``[0, V)``.
    q_lens : torch.Tensor
        int32 ``[B]``, valid columns per row (clamped to ``[0, T]``; a row with none emits nothing).
    finished : torch.Tensor
        bool ``[B]``, rows already finished; they emit nothing and stay finished.
    eos_token_ids : torch.Tensor or sequence of int
        int64 ``[E]`` (``E`` may be 0), the tokens that end a row.
    uniforms : torch.Tensor, optional
        float32 ``[B, T]`` in ``[0, 1)``: ``uniforms[b, s+i-1]`` decides draft ``i``. Drawn from
        ``generator`` when absent.
    exponentials : torch.Tensor, optional
        float32 ``[B, T, V]``, i.i.d. ``Exp(1)``: ``exponentials[b, c]`` drives the race of column ``c``.
        Drawn from ``generator`` when absent.
    generator : torch.Generator, optional
        Source of the random numbers not given (torch's default generator if None).

    Returns
    -------
    num_emitted : torch.Tensor
        int32 ``[B]``, tokens emitted per row (``<= q_lens``; 0 for finished rows).
    emitted : torch.Tensor
        int64 ``[B, T]``, left-aligned: ``emitted[b, :num_emitted[b]]`` are the tokens, the rest ``-1``.
    finished_out : torch.Tensor
        bool ``[B]``, ``finished`` or an EOS was emitted in this step.
    """
    _check_sampling_inputs(target_probs, draft_probs, input_ids, q_lens, finished, uniforms, exponentials)
    batch, num_cols, vocab = target_probs.shape
    device = target_probs.device
    if uniforms is None:
        uniforms = torch.rand(batch, num_cols, generator=generator, device=device)
    if exponentials is None:
        exponentials = torch.empty_like(target_probs).exponential_(generator=generator)
    eos = torch.as_tensor(eos_token_ids, dtype=torch.int64, device=device)
    q = q_lens.to(device=device, dtype=torch.int64).clamp(0, num_cols)
    done = finished.to(device=device, dtype=torch.bool)
    active = ~done & (q > 0)
    cols = torch.arange(num_cols, device=device)
    rows = torch.arange(batch, device=device)[:, None]

    # Left-aligned: position j is checked at column s + j against draft j + 1 (column s + j + 1).
    at = ((num_cols - q)[:, None] + cols).clamp(max=num_cols - 1)
    is_draft = cols < (q - 1)[:, None]
    drafts = input_ids.to(device=device, dtype=torch.int64).gather(1, (at + 1).clamp(max=num_cols - 1))
    tokens = torch.where(is_draft, drafts, 0)  # padding positions read a harmless entry
    p_tok = target_probs[rows, at, tokens]
    q_tok = draft_probs[rows, at, tokens] if draft_probs is not None else torch.ones_like(p_tok)
    accept = (uniforms.gather(1, at) * q_tok < p_tok) & is_draft
    accepted = accept.to(torch.int64).cumprod(dim=1).sum(dim=1)  # leading run of acceptances
    rejected = accepted < q - 1

    # The final token is sampled at column s + a: the recovered token after a rejection, else the bonus.
    final_col = (num_cols - q + accepted).clamp(0, num_cols - 1)
    p = target_probs[rows[:, 0], final_col]  # [B, V]
    if draft_probs is not None:
        q_dist = draft_probs[rows[:, 0], final_col]
    else:
        rejected_token = tokens.gather(1, accepted.clamp(max=num_cols - 1)[:, None])
        q_dist = torch.zeros_like(p).scatter_(1, rejected_token, 1.0)
    # where, not a product: the unused last column of draft_probs may hold anything, even inf or NaN.
    q_dist = torch.where(rejected[:, None], q_dist, 0.0)
    e = exponentials[rows[:, 0], final_col]
    r = (p - q_dist).clamp(min=0.0)
    key_r = torch.where(r > 0, r / e, -1.0)
    key_p = torch.where(p > 0, p / e, -1.0)
    final = torch.where(key_r.amax(dim=1) >= 0, key_r.argmax(dim=1), key_p.argmax(dim=1))

    # Emitted run: drafts 1..a, then the final token; cut right after the first EOS.
    run = torch.where(cols < accepted[:, None], drafts, final[:, None])
    is_eos = torch.isin(run, eos) & (cols <= accepted[:, None])
    hit_eos = is_eos.any(dim=1)
    first_eos = is_eos.to(torch.int64).argmax(dim=1)
    count = torch.where(hit_eos, first_eos + 1, accepted + 1) * active
    emitted = torch.where(cols < count[:, None], run, -1)
    return count.to(torch.int32), emitted, done | (active & hit_eos)


def verify_sampling(
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor | None,
    input_ids: torch.Tensor,
    q_lens: torch.Tensor,
    finished: torch.Tensor,
    eos_token_ids: torch.Tensor | Sequence[int],
    seeds: torch.Tensor | None,
    offsets: torch.Tensor | None,
    uniforms: torch.Tensor | None = None,
    exponentials: torch.Tensor | None = None,
    backend: str = "auto",
) -> VerifyResult:
    """Speculative-sampling verification: Triton for CUDA tensors (or when forced), else the torch reference.

    Same parameters and results as :func:`verify_sampling_reference`, with the random source replaced by
    ``seeds``/``offsets``. The Triton kernel draws the random numbers not given from Philox, keyed by
    ``seeds[b]`` at counters from ``offsets[b]``; advance ``offsets`` by :func:`philox_offset_increment`
    after each call. It never synchronizes with the host and can be captured in a CUDA graph (pass
    ``eos_token_ids`` as a tensor on the probabilities' device). The torch path draws from torch's default
    generator and ignores ``seeds``/``offsets``: both paths sample the same distribution, not the same
    tokens, unless ``uniforms`` and ``exponentials`` are given.

    Parameters
    ----------
    target_probs : torch.Tensor
        float32 ``[B, T, V]``.
    draft_probs : torch.Tensor or None
        float32 ``[B, T, V]``, or None for n-gram drafts.
    input_ids : torch.Tensor
        int64 ``[B, T]``.
    q_lens : torch.Tensor
        int32 ``[B]``.
    finished : torch.Tensor
        bool ``[B]``.
    eos_token_ids : torch.Tensor or sequence of int
        int64 ``[E]``.
    seeds : torch.Tensor or None
        int64 ``[B]``, Philox key per row (None allowed when ``uniforms`` and ``exponentials`` are given).
    offsets : torch.Tensor or None
        int64 ``[B]``, Philox counter base per row (same).
    uniforms : torch.Tensor, optional
        float32 ``[B, T]``.
    exponentials : torch.Tensor, optional
        float32 ``[B, T, V]``.
    backend : str
        Requested implementation, resolved by :func:`effdecode.ops.backend.resolve_backend` ("cuda" has no
        kernel here and falls back as "auto").

    Returns
    -------
    tuple of torch.Tensor
        ``num_emitted`` int32 ``[B]``, ``emitted`` int64 ``[B, T]`` (``-1`` padded), ``finished_out``
        bool ``[B]``.
    """
    if resolve_backend(backend, target_probs.device, has_cuda_op=False, has_triton_op=True) != "triton":
        return verify_sampling_reference(
            target_probs, draft_probs, input_ids, q_lens, finished, eos_token_ids, uniforms, exponentials
        )
    from effdecode.kernels.verify import verify_sampling_triton

    _check_sampling_inputs(target_probs, draft_probs, input_ids, q_lens, finished, uniforms, exponentials)
    device = target_probs.device
    batch = target_probs.shape[0]
    for name, t in (("seeds", seeds), ("offsets", offsets)):
        if t is not None and tuple(t.shape) != (batch,):
            raise ValueError(f"{name} must be [B] = [{batch}], got {list(t.shape)}")
    return verify_sampling_triton(
        target_probs,
        draft_probs,
        input_ids.to(device=device, dtype=torch.int64),
        q_lens.to(device=device, dtype=torch.int32),
        finished.to(device=device, dtype=torch.bool),
        torch.as_tensor(eos_token_ids, dtype=torch.int64, device=device),
        None if seeds is None else seeds.to(device=device, dtype=torch.int64),
        None if offsets is None else offsets.to(device=device, dtype=torch.int64),
        uniforms,
        exponentials,
    )
