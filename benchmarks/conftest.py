"""Benchmarks run with timing on: ``pytest benchmarks --benchmark-enable``.

``--benchmark-json benchmarks/results/<device>-<date>.json`` keeps a run; the device, versions and date are
added to its ``machine_info``. ``TRITON_INTERPRET`` is set here (before any kernel import) so Triton entries
can be dry-run on a CPU-only machine; their timings mean nothing there.
"""

import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).parent))

from device_info import environment  # noqa: E402


def pytest_configure(config):
    # Untimed unless --benchmark-enable (as an addopts flag this would break pytest without the plugin).
    if hasattr(config.option, "benchmark_disable"):
        config.option.benchmark_disable = True


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["effdecode_environment"] = environment()
