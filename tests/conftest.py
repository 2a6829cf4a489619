"""Test setup: Triton runs through its CPU interpreter when no GPU is present.

``TRITON_INTERPRET`` must be set before any Triton kernel module is imported, hence here, at collection.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def fresh_seed() -> int:
    """A new seed per run, printed on failure, so kernels meet fresh random inputs every time."""
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    print(f"seed={seed}")
    return seed
