"""Tolerances of the kernel tests, per dtype, stated once.

``TOLERANCES[dtype]`` is for an op's output in ``dtype`` against the torch reference computed from the same
inputs: float32 arithmetic lands far under 1e-4 (the Triton dots run with ``input_precision="ieee"``); fp16
outputs carry their rounding (2^-11) plus the order of summation; bf16 (2^-8 rounding, and on a GPU bf16
operands of the P.V product) gets the widest bound. Exact ops (tokens, indices, moved cache entries) are
compared with ``torch.equal``, never with a tolerance.
"""

from __future__ import annotations

import torch

TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.5e-2, rtol=1.5e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, **kwargs) -> None:
    """``torch.testing.assert_close`` with ``dtype``'s tolerances, on the CPU in float32 (or float64)."""
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    torch.testing.assert_close(
        actual.detach().to("cpu", wide), expected.detach().to("cpu", wide), **TOLERANCES[dtype], **kwargs
    )


# Bound on ``||out - ref|| / ||ref||`` over a whole output: element-wise bounds alone let small outputs pass
# (attention over long contexts averages towards 0). bf16: 2^-9 rounding of the output and the P.V operands.
REL_ERR: dict[torch.dtype, float] = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1e-2,
}
