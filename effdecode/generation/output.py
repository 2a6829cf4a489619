"""The ``generate`` output type: transformers' own, with effdecode's cost counters added."""

from __future__ import annotations

from dataclasses import dataclass

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
