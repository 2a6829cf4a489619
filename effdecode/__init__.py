"""effdecode: fast batched decoding for Hugging Face causal LMs.

``effdecode.generate(model, input_ids, ...)`` runs the slot-cache engine; ``effdecode.patch(model)`` makes
``model.generate`` do so until ``effdecode.unpatch(model)``.
"""

from effdecode._source_layout import register_source_kernels

register_source_kernels()

from effdecode.api import generate  # noqa: E402
from effdecode.config import DecodeConfig  # noqa: E402
from effdecode.consistency import PromptVote, vote  # noqa: E402
from effdecode.consistency.windows import generate_in_windows  # noqa: E402
from effdecode.generation.output import EffdecodeGenerateOutput  # noqa: E402
from effdecode.patch import patch, patched, unpatch  # noqa: E402
from effdecode.stats import GenerationStats  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "DecodeConfig",
    "EffdecodeGenerateOutput",
    "GenerationStats",
    "PromptVote",
    "generate",
    "generate_in_windows",
    "patch",
    "patched",
    "unpatch",
    "vote",
]
