"""Mixture-of-experts layers inside a compiled step: transformers' ``batched_mm`` experts, traceable.

transformers' eager experts loop over the experts a batch hit (``nonzero``, data-dependent shapes), which
``torch.compile(fullgraph=True)`` refuses. Its experts interface (transformers 5) also has ``batched_mm``:
every (token, chosen expert) pair gathers its expert's weights and runs one batched product, all static
shapes. A compiled step traces the model with its experts switched to ``batched_mm``; the model's own setting
is left as it was outside the trace (eager steps, prefill and HF ``generate`` keep the eager experts). The two
sum the experts' outputs in a different order, so compiled and eager steps agree to rounding (token-identical
in the float64 tests), not bit for bit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

STATIC_EXPERTS = "batched_mm"


def _available() -> bool:
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError:  # pragma: no cover - transformers without the experts interface
        return False
    return STATIC_EXPERTS in ALL_EXPERTS_FUNCTIONS


def experts_configs(model: torch.nn.Module) -> list:
    """The configs the model's experts modules read their implementation from (empty: no such experts, or
    no ``batched_mm`` in this transformers)."""
    configs = {}
    for module in model.modules():
        # Modules built through transformers' ``use_experts_implementation`` carry this flag.
        config = getattr(module, "config", None)
        if hasattr(module, "_is_expert_parallel") and config is not None and not module._is_expert_parallel:
            configs[id(config)] = config
    return list(configs.values()) if configs and _available() else []


@contextlib.contextmanager
def traceable_experts(configs: list) -> Iterator[None]:
    """Within the block, ``configs`` select the ``batched_mm`` experts; restored after."""
    saved = [config._experts_implementation for config in configs]
    try:
        for config in configs:
            config._experts_implementation = STATIC_EXPERTS
        yield
    finally:
        for config, value in zip(configs, saved, strict=True):
            config._experts_implementation = value
