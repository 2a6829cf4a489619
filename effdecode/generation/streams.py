"""Per-request random streams for sampling.

Each request row ``r`` gets its own seed, derived from one base seed (drawn from torch's default generator at
the start of the call, so ``torch.manual_seed`` reproduces a call) and ``r``; a row's ``n``-th draw uses
counters ``[offset, offset + V)`` of its stream, with the offset advanced by ``V`` per draw. What a request
samples therefore depends only on the seed, its row index and its own logits: not on the batch it shares,
on the slot it runs in, or on when it was admitted (``DecodeConfig.max_slots``).

On CUDA the Triton sample kernel draws with Philox from the same seeds (``V`` counters a draw); elsewhere
:func:`draw` inverts the row's CDF at one uniform number a draw from a counter-based hash (SplitMix64's
finalizer) in torch ops, about what ``torch.multinomial`` costs.
"""

from __future__ import annotations

import torch

_GOLDEN = -0x61C8864680B583EB  # 0x9E3779B97F4A7C15 as a signed 64-bit int
_MIX1 = -0x40A7B892E31B1A47  # 0xBF58476D1CE4E5B9
_MIX2 = -0x6B2FB644ECCEEE15  # 0x94D049BB133111EB


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 ``x`` (torch shifts arithmetically)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finalizer on int64 ``x`` (wrapping arithmetic): a bijection that scrambles every bit."""
    x = (x ^ _shift_right(x, 30)) * _MIX1
    x = (x ^ _shift_right(x, 27)) * _MIX2
    return x ^ _shift_right(x, 31)


def draw_base_seed() -> int:
    """One base seed from torch's default (CPU) generator."""
    return int(torch.randint(0, 2**62, (1,)).item())


def row_seeds(base: int, requests: torch.Tensor) -> torch.Tensor:
    """int64 ``[R]`` seeds of request rows ``requests`` (int64), in ``[0, 2**62)``."""
    return mix64(requests.long() * _GOLDEN + base) & ((1 << 62) - 1)


def counter_uniforms(seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """float64 uniforms in ``(0, 1)``, one per element of ``counters`` (int64), from the streams ``seeds``
    (broadcast against ``counters``)."""
    bits = mix64(mix64(counters.long() * _GOLDEN + seeds.long()) ^ seeds.long())
    return (_shift_right(bits, 11).double() + 0.5) * 2.0**-53


def draw(scores: torch.Tensor, seeds: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """int64 ``[R]`` tokens drawn from ``softmax(scores)`` (``[R, V]`` warped scores, ``-inf`` excluded) by
    inverting each row's CDF (float64) at its stream's uniform number ``offsets[b]`` (one counter a draw).

    A uniform ``u`` picks the first token whose cumulative mass reaches ``u`` times the total, so a token of
    zero probability is never drawn.
    """
    cdf = scores.double().softmax(dim=-1).cumsum(dim=-1)
    target = counter_uniforms(seeds, offsets) * cdf[:, -1]
    tokens = torch.searchsorted(cdf, target[:, None].contiguous()).squeeze(1)
    return tokens.clamp(max=scores.shape[-1] - 1)
