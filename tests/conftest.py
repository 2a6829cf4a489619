"""Test setup: Triton runs through its CPU interpreter when no GPU is present; the kernel tests' ``device``.

``TRITON_INTERPRET`` must be set before any Triton kernel module is imported, hence here, at collection.

Kernel tests take the ``device`` fixture: the CPU (Triton's interpreter) on a machine without CUDA, the GPU
(marked ``gpu``, so ``-m gpu`` selects them) where torch sees one. The interpreter cannot run on CUDA tensors
and a GPU build of Triton cannot run on CPU tensors, so each machine runs the one device it can.
Production shapes that only make sense on a GPU live in ``test_gpu_shapes.py`` (skipped on the CPU).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

ON_GPU = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
# The one device the kernel tests run on here (see the module docstring).
KERNEL_DEVICE = "cuda" if ON_GPU else "cpu"


def pytest_configure(config):
    # Benchmarks run once, untimed, unless --benchmark-enable is given. Set here rather than as an addopts
    # flag, which would make pytest exit with a usage error where pytest-benchmark is not installed.
    if hasattr(config.option, "benchmark_disable"):
        config.option.benchmark_disable = True


@pytest.fixture(
    params=[pytest.param(KERNEL_DEVICE, marks=(pytest.mark.gpu,) if ON_GPU else ())], ids=lambda d: d
)
def device(request) -> torch.device:
    """Where kernel tests build their tensors: ``cuda`` where available (marked ``gpu``), else ``cpu``."""
    return torch.device(request.param)


@pytest.fixture
def fresh_seed() -> int:
    """A new seed per run, printed on failure, so kernels meet fresh random inputs every time."""
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    print(f"seed={seed}")
    return seed


@pytest.fixture(autouse=True)
def _draft_gate_open(monkeypatch):
    """Keep the wall-clock draft gate open in tests: it only changes speed, and on a loaded test machine its
    timings would make "speculation really ran" assertions flaky. ``test_draft_gate.py`` tests the gate itself
    with a fake clock."""
    from effdecode.generation import drafters

    monkeypatch.setattr(drafters.DraftGate, "open", property(lambda self: True))
