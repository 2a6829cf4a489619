"""Choice of implementation for each op: CUDA extension, Triton, or the torch reference."""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings

import torch

BACKENDS = ("auto", "torch", "triton", "cuda", "flash_attn")
BACKEND_ENV = "EFFDECODE_BACKEND"


@functools.cache
def triton_usable() -> bool:
    """Triton is importable and can run kernels here (a CUDA device, or its CPU interpreter)."""
    if importlib.util.find_spec("triton") is None:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def cuda_extension():
    """The compiled ``effdecode._C`` module, or None where it was not built."""
    try:
        from effdecode import _C
    except ImportError:
        return None
    return _C


def check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
    return name


def requested_backend(requested: str) -> str:
    """``requested``, or the environment variable ``EFFDECODE_BACKEND`` where set; validated."""
    return check_backend(os.environ.get(BACKEND_ENV, requested) or "auto")


def resolve_backend(requested: str, device: torch.device, *, has_cuda_op: bool, has_triton_op: bool) -> str:
    """Pick the implementation of one op for tensors on ``device``.

    ``auto`` takes the CUDA extension (built, tensors on CUDA), then Triton (CUDA tensors), then the torch
    reference. The environment variable ``EFFDECODE_BACKEND`` overrides ``requested`` when set.

    One rule for a backend that cannot run here (``"cuda"`` without the built extension or off CUDA,
    ``"triton"`` without Triton or without a CUDA device and ``TRITON_INTERPRET=1``, ``"flash_attn"`` without
    flash-attn): a ``RuntimeWarning`` naming the backend, why, and what runs instead (once per process and
    case), then that runs. ``flash_attn`` only concerns attention (whose dispatcher tries flash-attn first);
    here it resolves as ``auto``.
    """
    requested = requested_backend(requested)
    return _resolve(requested, device, has_cuda_op=has_cuda_op, has_triton_op=has_triton_op)


def _resolve(requested: str, device: torch.device, *, has_cuda_op: bool, has_triton_op: bool) -> str:
    if requested == "flash_attn":
        requested = "auto"
    on_cuda = device.type == "cuda"
    if requested == "auto":
        if on_cuda and has_cuda_op and cuda_extension() is not None:
            return "cuda"
        if on_cuda and has_triton_op and triton_usable():
            return "triton"
        return "torch"
    if requested == "cuda":
        if cuda_extension() is None or not on_cuda:
            instead = _resolve("auto", device, has_cuda_op=False, has_triton_op=has_triton_op)
            why = "the effdecode._C extension is not built" if cuda_extension() is None else "not on CUDA"
            warn_backend_fallback("cuda", why, instead)
            return instead
        if not has_cuda_op:  # the extension runs here but has no kernel for this op: the next best
            return _resolve("auto", device, has_cuda_op=False, has_triton_op=has_triton_op)
    if requested == "triton":
        if not has_triton_op:
            return "torch"
        if not triton_usable():
            why = (
                "Triton is not installed"
                if importlib.util.find_spec("triton") is None
                else "no CUDA device (set TRITON_INTERPRET=1 to run Triton's CPU interpreter)"
            )
            warn_backend_fallback("triton", why, "torch")
            return "torch"
    return requested


@functools.cache
def warn_backend_fallback(requested: str, why: str, instead: str) -> None:
    """The one warning for a backend that cannot run here: what was asked, why not, what runs instead."""
    warnings.warn(
        f"effdecode: backend {requested!r} cannot run here ({why}); using {instead!r} instead",
        RuntimeWarning,
        stacklevel=5,
    )
