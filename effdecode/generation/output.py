"""The ``generate`` output type: transformers' own, with effdecode's cost counters added."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers.generation.utils import GenerateDecoderOnlyOutput

from effdecode.stats import GenerationStats


@dataclass
class EffdecodeGenerateOutput(GenerateDecoderOnlyOutput):
    """:class:`transformers.generation.utils.GenerateDecoderOnlyOutput` plus ``stats``.

    Attributes
    ----------
    stats : GenerationStats
        What the call cost (forwards, tokens per row, KV peak, wall time).
    """

    stats: GenerationStats | None = None


def as_normal_tensors(tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Copies of per-step tensors collected under ``torch.inference_mode`` that callers may modify freely.

    transformers returns ``scores``/``logits`` as ordinary tensors (``scores[0].add_(1)`` works); inference
    tensors refuse in-place updates outside inference mode. One copy per step, made once after decoding.

    Parameters
    ----------
    tensors : sequence of torch.Tensor
        ``[B, V]`` float32 per step.

    Returns
    -------
    tuple of torch.Tensor
        The same values as ordinary tensors, one per step.
    """
    with torch.inference_mode(False):
        return tuple(t.clone() if t.is_inference() else t for t in tensors)
