"""Triton kernels of effdecode, installed as ``effdecode.kernels``.

Importing this package does not import Triton; each kernel module does, so the torch paths work where Triton
is absent. Keep this file free of side effects: in a source checkout Python may also see it as a top-level
``kernels`` package, the name Hugging Face's own kernel hub package uses.
"""

import importlib.util


def triton_available() -> bool:
    """Whether Triton can be imported here."""
    return importlib.util.find_spec("triton") is not None
