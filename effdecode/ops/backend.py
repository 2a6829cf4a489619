"""Choice of implementation for each op: CUDA extension, Triton, or the torch reference."""

from __future__ import annotations

import functools
import importlib.util
import os

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
    reference. The environment variable ``EFFDECODE_BACKEND`` overrides ``requested`` when set. Asking for a
    backend that cannot run here raises ``ValueError`` rather than silently taking another. ``flash_attn``
    only concerns attention (whose dispatcher tries flash-attn first); here it resolves as ``auto``.
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
        if not has_cuda_op:
            return _resolve("auto", device, has_cuda_op=False, has_triton_op=has_triton_op)
        if cuda_extension() is None or not on_cuda:
            raise ValueError("backend 'cuda' needs the built effdecode._C extension and CUDA tensors")
    if requested == "triton":
        if not has_triton_op:
            return "torch"
        if not triton_usable():
            raise ValueError("backend 'triton' needs Triton with a CUDA device, or TRITON_INTERPRET=1 on CPU")
    return requested
