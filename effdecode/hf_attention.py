"""effdecode's attention as a transformers ``AttentionInterface`` entry.

During an effdecode forward the model's config names ``"effdecode"`` as its attention implementation, so
every attention layer calls :func:`effdecode_attention` with the step's :class:`SlotBatch` and the slot
cache passed down through the forward's kwargs. transformers builds no mask for an implementation it does not
know, and HF's own cache is off (``use_cache=False``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from transformers import AttentionInterface

from effdecode.ops.attention import SlotBatch, slot_attention

ATTN_IMPLEMENTATION = "effdecode"
STEP_KWARG = "effdecode_step"

# Keyword arguments that model families pass to attention functions and that we honour or may ignore.
# Anything else (softcapping, attention sinks, ...) changes the math, so we refuse rather than be wrong.
_KNOWN_KWARGS = frozenset(
    {"position_ids", "use_cache", "sliding_window", "cache_position", "output_attentions"}
)


class StepContext:
    """What one forward needs beyond the model's inputs: the slot cache and the step's batch.

    Attributes
    ----------
    cache
        The slot cache; ``cache.keys[layer]``/``cache.values[layer]`` are ``[slots, kv_heads, capacity,
        head_dim]``.
    batch : SlotBatch
        Rows and lengths of this forward.
    scores : list[torch.Tensor] or None
        One float32 ``[slots, kv_heads, capacity]`` tensor per layer into which each layer's attention adds
        the mass its queries put on every key (for eviction policies), or None to skip that work.
    """

    __slots__ = ("cache", "batch", "scores")

    def __init__(self, cache, batch: SlotBatch, scores: list[torch.Tensor] | None = None) -> None:
        self.cache = cache
        self.batch = batch
        self.scores = scores


def effdecode_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention function with transformers' signature, running over effdecode's slot cache.

    Parameters
    ----------
    module : torch.nn.Module
        The attention layer (its ``layer_idx`` picks the cache layer).
    query : torch.Tensor
        ``[B, q_heads, T, head_dim]``.
    key, value : torch.Tensor
        ``[B, kv_heads, T, head_dim]``, the new tokens' entries.
    attention_mask : None
        Unused; effdecode masks from per-row lengths.

    Returns
    -------
    tuple[torch.Tensor, None]
        ``[B, T, q_heads, head_dim]`` output and no attention weights.
    """
    step: StepContext | None = kwargs.get(STEP_KWARG)
    if step is None:
        raise RuntimeError(
            "the 'effdecode' attention implementation only runs inside effdecode.generate; "
            "set model.config._attn_implementation back to 'sdpa' or 'eager' to call the model directly"
        )
    unknown = set(kwargs) - _KNOWN_KWARGS - {STEP_KWARG}
    if unknown:
        raise NotImplementedError(
            f"effdecode attention does not support the attention arguments {sorted(unknown)}"
        )
    if dropout:
        raise NotImplementedError("effdecode attention runs inference only (dropout must be 0)")
    layer = module.layer_idx
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    attend = getattr(step, "attend", None)
    if attend is not None:  # a compiled step's context (effdecode.generation.compiled) attends itself
        return attend(layer, query, key, value, scale, kwargs.get("sliding_window")), None
    out = slot_attention(
        query,
        key,
        value,
        step.cache.keys[layer],
        step.cache.values[layer],
        step.batch,
        scale,
        kwargs.get("sliding_window"),
        scores_out=step.scores[layer] if step.scores is not None else None,
    )
    return out, None


AttentionInterface.register(ATTN_IMPLEMENTATION, effdecode_attention)


def _configs(model: torch.nn.Module) -> list:
    """Every distinct config object under ``model`` (nested text configs share or copy the top one)."""
    seen: dict[int, object] = {}
    for sub in model.modules():
        config = getattr(sub, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            seen.setdefault(id(config), config)
    return list(seen.values())


@contextlib.contextmanager
def routed_through_effdecode(model: torch.nn.Module) -> Iterator[None]:
    """Within the block, the model's attention layers call :func:`effdecode_attention`."""
    configs = _configs(model)
    previous = [config._attn_implementation for config in configs]
    try:
        for config in configs:
            config._attn_implementation = ATTN_IMPLEMENTATION
        yield
    finally:
        for config, name in zip(configs, previous, strict=True):
            config._attn_implementation = name
