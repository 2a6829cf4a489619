"""effdecode: fast batched decoding for Hugging Face causal LMs.

``effdecode.generate(model, input_ids, ...)`` runs the slot-cache engine, ``effdecode.generate_batch(model,
prompts, ...)`` the same with continuous batching; ``effdecode.patch(model)`` makes ``model.generate`` and
``model.generate_batch`` do so until ``effdecode.unpatch(model)``.
"""

from effdecode._source_layout import register_source_kernels

register_source_kernels()

from effdecode.api import generate  # noqa: E402
from effdecode.batch_api import generate_batch  # noqa: E402
from effdecode.batch_outputs import BatchRequestOutput, RequestStats  # noqa: E402
from effdecode.config import DecodeConfig  # noqa: E402
from effdecode.consistency import PromptVote, vote  # noqa: E402
from effdecode.consistency.windows import generate_in_windows  # noqa: E402
from effdecode.generation.output import EffdecodeGenerateOutput  # noqa: E402
from effdecode.patch import patch, patched, unpatch  # noqa: E402
from effdecode.stats import GenerationStats  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "BatchRequestOutput",
    "DecodeConfig",
    "EffdecodeGenerateOutput",
    "GenerationStats",
    "RequestStats",
    "PromptVote",
    "generate",
    "generate_batch",
    "generate_in_windows",
    "patch",
    "patched",
    "unpatch",
    "vote",
]
