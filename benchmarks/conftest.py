"""Benchmarks run with timing on: ``pytest benchmarks --benchmark-enable``.

``TRITON_INTERPRET`` is set here too (before any kernel import) so that Triton entries can be dry-run on a
CPU-only machine; their timings mean nothing there.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
