"""effdecode's ops as torch custom ops, so that ``torch.compile(fullgraph=True)`` traces through a step.

Dynamo cannot trace the slot-attention dispatcher itself (it chooses the implementation from Python-side
facts, locates valid tokens with ``nonzero``, launches Triton kernels), so a compiled step calls these ops
instead:

- ``effdecode::slot_attention`` (:func:`torch.library.custom_op`): KV append fused with attention, optionally
  adding the attention scores to a buffer. It mutates the cache (and scores) buffers, declared through
  ``mutates_args`` so functionalization keeps the writes in place. Its implementation is the eager dispatcher
  of :mod:`effdecode.ops.attention` (torch reference on CPU, Triton where it runs), which inductor calls as an
  opaque kernel. ``register_fake`` gives dynamo the output's shape.
- ``effdecode::slot_attention_triton`` (:func:`torch.library.triton_op`, CUDA): the same through the Triton
  kernels launched with :func:`torch.library.wrap_triton`, so that inductor sees the kernels themselves,
  schedules them with its own and a CUDA graph captures them. Only where ``triton_op`` exists (torch >= 2.6).

The schema carries the optional attention features a model family may need (``window`` for a sliding
window, ``softcap`` for logit soft-capping, ``sinks`` for per-head attention sinks): today's implementation
supports the sliding window and refuses the others rather than be wrong.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator

import torch

from effdecode.ops.attention import SlotBatch, slot_attention

_NAMESPACE = "effdecode"
_HAS_TRITON_OP = hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")


def _extra_attention_args(softcap: float, sinks: torch.Tensor | None) -> dict:
    """Keyword arguments for :func:`slot_attention` beyond today's; refuse features it does not have."""
    extra = {}
    if softcap:
        extra["softcap"] = softcap
    if sinks is not None:
        extra["sinks"] = sinks
    if extra:
        accepted = inspect.signature(slot_attention).parameters
        missing = sorted(name for name in extra if name not in accepted)
        if missing:
            raise NotImplementedError(f"effdecode slot attention does not support {missing} yet")
    return extra


def _batch(rows, cache_lens, q_lens, kv_len_bound: int, q_full: bool, backend: str) -> SlotBatch:
    return SlotBatch(rows, cache_lens, q_lens, kv_len_bound=kv_len_bound, backend=backend, q_full=q_full)


@torch.library.custom_op(f"{_NAMESPACE}::slot_attention", mutates_args=("k_cache", "v_cache", "scores_out"))
def slot_attention_op(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    rows: torch.Tensor,
    cache_lens: torch.Tensor,
    q_lens: torch.Tensor,
    kv_len_bound: int,
    scale: float,
    window: int = -1,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
    scores_out: torch.Tensor | None = None,
    q_full: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Append the step's keys/values to the slot cache and attend (see :mod:`effdecode.ops.attention`).

    Parameters
    ----------
    query : torch.Tensor
        ``[B, q_heads, T, head_dim]``.
    key, value : torch.Tensor
        ``[B, kv_heads, T, head_dim]``, right-aligned per ``q_lens``.
    k_cache, v_cache : torch.Tensor
        ``[slots, kv_heads, capacity, head_dim]`` (one layer), written at the new tokens' indices.
    rows : torch.Tensor
        int32 ``[B]`` slots; ``cache_lens`` int32 ``[slots]``; ``q_lens`` int32 ``[B]``.
    kv_len_bound : int
        Upper bound of ``max(cache_lens[rows] + q_lens)`` (a compiled step passes the capacity).
    scale : float
        Softmax scale.
    window : int
        Sliding window (``-1``: none).
    softcap : float
        Logit soft-capping (``0``: none). Not supported yet.
    sinks : torch.Tensor, optional
        Per-head attention sinks. Not supported yet.
    scores_out : torch.Tensor, optional
        float32 ``[slots, kv_heads, capacity]``, accumulates the attention mass per key (eviction).
    q_full : bool
        Every row has ``T`` valid tokens.
    backend : str
        Requested implementation (``DecodeConfig.attn_backend``).

    Returns
    -------
    torch.Tensor
        ``[B, T, q_heads, head_dim]``.
    """
    extra = _extra_attention_args(softcap, sinks)
    batch = _batch(rows, cache_lens, q_lens, kv_len_bound, q_full, backend)
    sliding_window = window if window > 0 else None
    out = slot_attention(
        query, key, value, k_cache, v_cache, batch, scale, sliding_window, scores_out=scores_out, **extra
    )
    return out if out.is_contiguous() else out.contiguous()  # a custom op's output may not alias anything


@slot_attention_op.register_fake
def _(query, key, value, k_cache, v_cache, rows, cache_lens, q_lens, kv_len_bound, scale, window=-1,
      softcap=0.0, sinks=None, scores_out=None, q_full=False, backend="auto"):  # fmt: skip
    batch, q_heads, num_cols, head_dim = query.shape
    return query.new_empty((batch, num_cols, q_heads, head_dim))


# The kernels that kernels/slot_attention.py launches (helpers called from inside kernels are not wrapped).
_LAUNCHED_KERNELS = ("_slot_attention_kernel", "_merge_splits_kernel", "_emit_scores_kernel")


@contextlib.contextmanager
def _traceable_kernels() -> Iterator[None]:
    """Within the block, the slot-attention module launches its kernels through ``wrap_triton``.

    ``wrap_triton(kernel)[grid](...)`` runs the kernel when called eagerly and becomes a traceable launch
    under ``triton_op`` tracing, so the launcher is shared with the eager path unchanged. Under Triton's CPU
    interpreter the kernels are not ``JITFunction`` objects and ``wrap_triton`` refuses them: they then
    launch as they are (eager calls work; tracing needs a GPU).
    """
    from effdecode.kernels import slot_attention as module

    saved = {
        name: getattr(module, name) for name in _LAUNCHED_KERNELS if _wrappable(getattr(module, name, None))
    }
    try:
        for name, kernel in saved.items():
            setattr(module, name, torch.library.wrap_triton(kernel))
        yield
    finally:
        for name, kernel in saved.items():
            setattr(module, name, kernel)


def _wrappable(kernel) -> bool:
    try:
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.jit import JITFunction
    except ImportError:  # pragma: no cover - triton missing
        return False
    return isinstance(kernel, (JITFunction, Autotuner))


if _HAS_TRITON_OP:

    @torch.library.triton_op(
        f"{_NAMESPACE}::slot_attention_triton", mutates_args=("k_cache", "v_cache", "scores_out")
    )
    def slot_attention_triton_op(
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        rows: torch.Tensor,
        cache_lens: torch.Tensor,
        q_lens: torch.Tensor,
        kv_len_bound: int,
        scale: float,
        window: int = -1,
        softcap: float = 0.0,
        sinks: torch.Tensor | None = None,
        scores_out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """:func:`slot_attention_op` through the Triton kernels, visible to inductor (same parameters)."""
        from effdecode.kernels.slot_attention import slot_attention_triton

        extra = _extra_attention_args(softcap, sinks)
        batch = _batch(rows, cache_lens, q_lens, kv_len_bound, False, "triton")
        with _traceable_kernels():
            return slot_attention_triton(
                query, key, value, k_cache, v_cache, batch, scale, window if window > 0 else None,
                scores_out=scores_out, **extra,
            )  # fmt: skip

else:  # pragma: no cover - torch < 2.6
    slot_attention_triton_op = None


def attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    rows: torch.Tensor,
    cache_lens: torch.Tensor,
    q_lens: torch.Tensor,
    kv_len_bound: int,
    scale: float,
    sliding_window: int | None,
    scores_out: torch.Tensor | None,
    q_full: bool,
    backend: str,
    resolved: str,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Call the custom op a compiled step should use for an implementation ``resolved`` on the host.

    ``resolved`` is the backend :func:`effdecode.ops.backend.resolve_backend` picked for the step; Triton on
    CUDA goes through ``effdecode::slot_attention_triton``, everything else through the opaque op.
    """
    window = sliding_window if sliding_window is not None else -1
    softcap = softcap or 0.0
    if resolved == "triton" and query.is_cuda and slot_attention_triton_op is not None:
        return slot_attention_triton_op(
            query, key, value, k_cache, v_cache, rows, cache_lens, q_lens, kv_len_bound, scale, window,
            softcap, sinks, scores_out=scores_out,
        )  # fmt: skip
    return slot_attention_op(
        query, key, value, k_cache, v_cache, rows, cache_lens, q_lens, kv_len_bound, scale, window,
        softcap, sinks, scores_out=scores_out, q_full=q_full, backend=backend,
    )  # fmt: skip
