"""effdecode: fast batched decoding for Hugging Face causal LMs.

``effdecode.generate(model, input_ids, ...)`` runs the slot-cache engine; ``effdecode.patch(model)`` makes
``model.generate`` do so until ``effdecode.unpatch(model)``.
"""

from effdecode._source_layout import register_source_kernels

register_source_kernels()

__version__ = "0.1.0"
