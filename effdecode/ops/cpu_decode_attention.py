"""Decode attention over each row's own cache length on the CPU: a C++ kernel, compiled at first use.

``effdecode::cpu_decode_attention`` is what a compiled CPU step's attention layers call for a plain decode
step (one query column per row; logit softcap, sliding window and attention sinks included): row ``b``
attends to the first ``lens[b]`` entries of slot ``rows[b]`` (its last ``window`` of them, with a window),
read in place. The inline attention it replaces reads the step's
whole KV bucket for every row; at decode sizes a CPU's attention is bound by the bytes it reads, and with
rows of different lengths (continuous batching, rows that finished at different steps) the bucket is up to
twice what the rows hold. The kernel is ``cpu_decode_attention.cpp`` next to this module, built by
inductor's C++ code cache (the compiler torch.compile already needs on a CPU), and called through ctypes.
Where it cannot be built, :func:`kernel_available` is False and compiled steps keep the inline attention.
"""

from __future__ import annotations

import ctypes
import warnings
from pathlib import Path

import torch

_SOURCE = Path(__file__).with_name("cpu_decode_attention.cpp")
_SYMBOLS = {torch.float32: "effdecode_decode_attention_f32", torch.float64: "effdecode_decode_attention_f64"}
DTYPES = tuple(_SYMBOLS)  # what the kernel reads and writes
# query, key_cache, value_cache, rows, lens, out; batch, kv_heads, group, dim, slot and head strides;
# scale, softcap; window; sinks; threads
_ARGUMENT_TYPES = (
    [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 6 + [ctypes.c_double] * 2
    + [ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
)  # fmt: skip
_library: ctypes.CDLL | None = None
_build_error: str | None = None


def kernel_available() -> bool:
    """Whether the C++ kernel is built (it is built on the first call; a failure is warned about once)."""
    global _library, _build_error
    if _library is None and _build_error is None:
        try:
            from torch._inductor.codecache import CppCodeCache

            library = CppCodeCache.load(_SOURCE.read_text())
            for symbol in _SYMBOLS.values():  # typed: plain ints and floats pass without ctypes wrappers
                getattr(library, symbol).argtypes = _ARGUMENT_TYPES
            _library = library
        except Exception as error:  # no compiler, headers or OpenMP: compiled steps attend inline
            _build_error = f"{type(error).__name__}: {error}"
            warnings.warn(
                f"effdecode: the CPU decode-attention kernel could not be built ({_build_error}); compiled "
                "CPU steps attend over their whole KV bucket instead",
                stacklevel=2,
            )
    return _library is not None


def supports(query: torch.Tensor, key_cache: torch.Tensor) -> bool:
    """Whether the kernel handles these tensors: on the CPU, float32 or float64, cache and query alike."""
    return (
        query.device.type == "cpu"
        and key_cache.device.type == "cpu"
        and query.dtype in _SYMBOLS
        and key_cache.dtype == query.dtype
    )


# Registered through ``torch.library.Library`` rather than ``custom_op``: the op runs once per layer and step,
# and ``custom_op``'s Python wrapping cost about 20 us a call on the CPU, twice the kernel's own overhead.
_LIBRARY = torch.library.Library("effdecode", "FRAGMENT")
_LIBRARY.define(
    "cpu_decode_attention(Tensor query, Tensor key_cache, Tensor value_cache, Tensor rows, Tensor lens, "
    "float scale, float softcap=0., int window=0, Tensor? sinks=None) -> Tensor"
)


def _run_kernel(query, key_cache, value_cache, rows, lens, scale, softcap=0.0, window=0, sinks=None):
    """The op's CPU implementation (inputs as :func:`cpu_decode_attention` checks them)."""
    if not kernel_available():
        raise RuntimeError(f"the CPU decode-attention kernel is not built: {_build_error}")
    query = query.contiguous()
    out = torch.empty_like(query)
    batch, kv_heads, group, head_dim = query.shape
    kernel = getattr(_library, _SYMBOLS[query.dtype])
    kernel(
        query.data_ptr(), key_cache.data_ptr(), value_cache.data_ptr(), rows.data_ptr(), lens.data_ptr(),
        out.data_ptr(), batch, kv_heads, group, head_dim, key_cache.stride(0), key_cache.stride(1), scale,
        softcap, window, sinks.data_ptr() if sinks is not None else None, torch.get_num_threads(),
    )  # fmt: skip
    return out


def _fake(query, key_cache, value_cache, rows, lens, scale, softcap=0.0, window=0, sinks=None):
    _check(query, key_cache, value_cache, rows, lens, sinks)  # at trace time: a step's inputs are fixed
    return torch.empty_like(query, memory_format=torch.contiguous_format)


_LIBRARY.impl("cpu_decode_attention", _run_kernel, "CPU")
torch.library.register_fake("effdecode::cpu_decode_attention", _fake, lib=_LIBRARY)


def cpu_decode_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    rows: torch.Tensor,
    lens: torch.Tensor,
    scale: float,
    softcap: float = 0.0,
    window: int = 0,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of one query column per row over the first ``lens[b]`` entries of slot ``rows[b]``.

    Checks its inputs, then calls ``torch.ops.effdecode.cpu_decode_attention`` (which a compiled step calls
    directly: its inputs were checked when it was traced).

    Parameters
    ----------
    query : torch.Tensor
        ``[B, kv_heads, group, D]``: each row's query heads, grouped by the key-value head they read
        (query head ``h * group + g`` reads key-value head ``h``).
    key_cache, value_cache : torch.Tensor
        ``[slots, kv_heads, capacity, D]``, one layer of the slot cache (the last two dimensions contiguous).
    rows : torch.Tensor
        int32 ``[B]``, each row's slot.
    lens : torch.Tensor
        int32 ``[B]``, the entries each row attends to (0: the row's output is zeros).
    scale : float
        Softmax scale of the query-key products.
    softcap : float
        If > 0, the scaled logits are capped: ``softcap * tanh(logit / softcap)``.
    window : int
        If > 0, a sliding window: a row attends to its last ``window`` entries only.
    sinks : torch.Tensor, optional
        ``[kv_heads * group]``, the query's dtype: a logit per query head joining its softmax with no value
        behind it (attention sinks).

    Returns
    -------
    torch.Tensor
        ``[B, kv_heads, group, D]``, the query's dtype.
    """
    _check(query, key_cache, value_cache, rows, lens, sinks)
    return torch.ops.effdecode.cpu_decode_attention(
        query, key_cache, value_cache, rows, lens, scale, softcap, window, sinks
    )


def _check(query, key_cache, value_cache, rows, lens, sinks=None) -> None:
    """ValueError naming what the kernel cannot read."""
    if not supports(query, key_cache) or value_cache.dtype != query.dtype or value_cache.device.type != "cpu":
        raise ValueError(
            "cpu_decode_attention takes float32 or float64 CPU tensors of one dtype; got query "
            f"{query.dtype} on {query.device}, caches {key_cache.dtype}/{value_cache.dtype} on "
            f"{key_cache.device}"
        )
    if query.dim() != 4 or key_cache.dim() != 4 or key_cache.shape != value_cache.shape:
        raise ValueError(
            f"expected query [B, kv_heads, group, D] and caches [slots, kv_heads, capacity, D]; got "
            f"{tuple(query.shape)}, {tuple(key_cache.shape)} and {tuple(value_cache.shape)}"
        )
    batch, kv_heads, _, head_dim = query.shape
    if key_cache.shape[1] != kv_heads or key_cache.shape[3] != head_dim:
        raise ValueError(f"query {tuple(query.shape)} does not match the cache {tuple(key_cache.shape)}")
    for cache in (key_cache, value_cache):
        if cache.stride(3) != 1 or cache.stride(2) != head_dim or cache.stride() != key_cache.stride():
            raise ValueError("the caches' entries must be contiguous rows of D values, laid out alike")
    if rows.shape != (batch,) or lens.shape != (batch,):
        raise ValueError(
            f"rows and lens must be [B] = [{batch}]; got {tuple(rows.shape)} and {tuple(lens.shape)}"
        )
    int32 = rows.dtype == lens.dtype == torch.int32
    if not int32 or not (rows.is_contiguous() and lens.is_contiguous()):
        raise ValueError(f"rows and lens must be contiguous int32; got {rows.dtype} and {lens.dtype}")
    heads = kv_heads * query.shape[2]
    if sinks is not None and (
        sinks.shape != (heads,) or sinks.dtype != query.dtype or not sinks.is_contiguous()
    ):
        raise ValueError(
            f"sinks must be contiguous [{heads}] of {query.dtype}; got {tuple(sinks.shape)} {sinks.dtype}"
        )


def cpu_decode_attention_reference(
    query, key_cache, value_cache, rows, lens, scale: float, softcap: float = 0.0, window: int = 0, sinks=None
) -> torch.Tensor:
    """The torch reference of :func:`cpu_decode_attention` (row by row; for tests)."""
    out = torch.zeros_like(query)
    kv_heads, group = query.shape[1], query.shape[2]
    for b, (slot, length) in enumerate(zip(rows.tolist(), lens.tolist(), strict=True)):
        if length <= 0:
            continue
        first = length - window if 0 < window < length else 0
        keys, values = (
            key_cache[slot, :, first:length],
            value_cache[slot, :, first:length],
        )  # [kv_heads, L, D]
        logits = query[b] @ keys.transpose(-1, -2) * scale  # [kv_heads, group, L]
        if softcap > 0:
            logits = softcap * torch.tanh(logits / softcap)
        if sinks is not None:
            logits = torch.cat([logits, sinks.view(kv_heads, group, 1)], dim=-1)
        weights = torch.softmax(logits, dim=-1)[..., : length - first]
        out[b] = weights @ values
    return out
