"""Greedy verification of draft tokens (speculative decoding), also the token pick of plain greedy decoding.

Layout (the engine's right-aligned one, as in :mod:`effdecode.ops.attention`):

- ``logits``: ``[B, T, V]``, the target model's output for the verify forward.
- ``input_ids``: int64 ``[B, T]``, the tokens fed to that forward.
- ``q_lens``: int32 ``[B]``; row ``b``'s valid columns are its last ``q_lens[b]``, from ``s = T - q_lens[b]``.
  Column ``s`` holds the row's last accepted token, columns ``s+1 .. T-1`` its ``d = q_lens[b] - 1`` drafts.

Rule: the prediction at a column is the argmax of its logits (ties: lowest index, NaN above all, as
``torch.argmax``). Draft ``i`` (column ``s+i``) is accepted iff drafts ``1..i`` all equal the prediction at
the column before them. With ``a`` drafts accepted the row emits drafts ``1..a`` and then the prediction at
``s+a`` (a correction, or the bonus token when ``a = d``): ``a + 1`` tokens, each equal to the prediction at
its column. The run is cut right after its first EOS token, which finishes the row. Finished rows emit
nothing. ``T = 1`` is plain greedy decoding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from effdecode.ops.backend import cuda_extension, resolve_backend

# Dtype codes of csrc/ops.h (DTypeCode).
_CUDA_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

VerifyResult = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _check_shapes(logits: torch.Tensor, input_ids: torch.Tensor, q_lens: torch.Tensor,
                  finished: torch.Tensor) -> None:
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, T, V], got shape {tuple(logits.shape)}")
    batch, num_cols, _ = logits.shape
    if tuple(input_ids.shape) != (batch, num_cols):
        raise ValueError(f"input_ids must be [B, T] = {(batch, num_cols)}, got {tuple(input_ids.shape)}")
    if tuple(q_lens.shape) != (batch,) or tuple(finished.shape) != (batch,):
        raise ValueError(f"q_lens and finished must be [B] = [{batch}], got {tuple(q_lens.shape)} and "
                         f"{tuple(finished.shape)}")


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


def verify_greedy(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    q_lens: torch.Tensor,
    finished: torch.Tensor,
    eos_token_ids: torch.Tensor | Sequence[int],
    backend: str = "auto",
) -> VerifyResult:
    """Greedy verification: the CUDA kernel for CUDA tensors where ``effdecode._C`` is built, else torch.

    Same parameters and results as :func:`verify_greedy_reference`, plus ``backend`` ("auto", "torch",
    "cuda"; "triton" has no kernel here and means torch). Neither path synchronizes with the host; pass
    ``eos_token_ids`` as a tensor on ``logits``' device to keep it that way.

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
    if resolve_backend(backend, logits.device, has_cuda_op=True, has_triton_op=False) == "cuda":
        return _verify_greedy_cuda(logits, input_ids, q_lens, finished, eos_token_ids)
    return verify_greedy_reference(logits, input_ids, q_lens, finished, eos_token_ids)
