"""effdecode's attention as a transformers ``AttentionInterface`` entry.

During an effdecode forward the model's config reads ``"effdecode"`` as its attention implementation (in
the decoding thread only, see :func:`routed_through_effdecode`), so every attention layer calls
:func:`effdecode_attention` with the step's :class:`SlotBatch` and the slot cache passed down through the
forward's kwargs. transformers builds no mask for an implementation it does not
know, and HF's own cache is off (``use_cache=False``).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
from transformers import AttentionInterface

from effdecode.ops.attention import SlotBatch, slot_attention

ATTN_IMPLEMENTATION = "effdecode"
STEP_KWARG = "effdecode_step"

# Keyword arguments that model families pass to attention functions and that we honour or may ignore:
# ``sliding_window`` (per layer, None on full layers), ``softcap`` (Gemma 2's logit soft-capping) and
# ``s_aux`` (gpt-oss's per-head attention sinks) change the math and are honoured. Anything else (position
# biases, sparse indices, packed-sequence metadata, ...) would change it too: refuse rather than be wrong.
_KNOWN_KWARGS = frozenset(
    {
        "position_ids",
        "use_cache",
        "sliding_window",
        "softcap",
        "s_aux",
        "cache_position",
        "output_attentions",
        "output_router_logits",  # MoE families pass it to every submodule; attention ignores it
    }
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
            "the 'effdecode' attention implementation only runs inside effdecode's own forwards; call the "
            "model outside effdecode.generate (or from another thread), with its own attn_implementation"
        )
    unknown = set(kwargs) - _KNOWN_KWARGS - {STEP_KWARG}
    if unknown:
        raise NotImplementedError(
            f"effdecode attention does not support the attention arguments {sorted(unknown)}"
        )
    if dropout:
        raise NotImplementedError("effdecode attention runs inference only (dropout must be 0)")
    layer = module.layer_idx
    # Families pass their own scale: Gemma's query_pre_attn_scalar ** -0.5, Granite's attention_multiplier.
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    softcap = kwargs.get("softcap")
    attend = getattr(step, "attend", None)
    if attend is not None:  # a compiled step's context (effdecode.generation.compiled) attends itself
        softcap = None if softcap is None else float(softcap)
        return attend(
            layer, query, key, value, scale, kwargs.get("sliding_window"), softcap, kwargs.get("s_aux")
        ), None
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
        softcap=None if softcap is None else float(softcap),
        sinks=kwargs.get("s_aux"),
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


# Routing is per thread: while a thread runs effdecode's forwards, *that thread* reads "effdecode" from the
# routed configs; every other thread (transformers' generate, a plain forward, another effdecode call) reads
# the config's own value. Nothing on the model or its config is written, so overlapping calls cannot leave
# the model changed. transformers' attention layers and mask builders read the property
# ``config._attn_implementation`` on every forward; it is wrapped once per config class that defines it.
_routes = threading.local()
_wrap_lock = threading.Lock()


def _routed_ids() -> dict[int, int]:
    routed = getattr(_routes, "configs", None)
    if routed is None:
        routed = _routes.configs = {}
    return routed


def _defining_class(config) -> type | None:
    """The class in ``config``'s MRO whose ``_attn_implementation`` is a property, or None."""
    for klass in type(config).__mro__:
        if isinstance(klass.__dict__.get("_attn_implementation"), property):
            return klass
    return None


def _wrap_property(klass: type) -> None:
    """Make ``klass._attn_implementation`` answer "effdecode" for configs routed in the reading thread."""
    original = klass.__dict__["_attn_implementation"]
    if getattr(original.fget, "_effdecode_routed", False):
        return

    def fget(config):
        routed = getattr(_routes, "configs", None)
        if routed and id(config) in routed:
            return ATTN_IMPLEMENTATION
        return original.fget(config)

    fget._effdecode_routed = True  # type: ignore[attr-defined]
    klass._attn_implementation = property(fget, original.fset, original.fdel, original.__doc__)


def routing_supported(model: torch.nn.Module) -> bool:
    """Whether every config under ``model`` reads its attention implementation through a property."""
    return all(_defining_class(config) is not None for config in _configs(model))


@contextlib.contextmanager
def routed_through_effdecode(model: torch.nn.Module) -> Iterator[None]:
    """Within the block, the model's attention layers called from this thread run :func:`effdecode_attention`.

    Other threads keep the model's own attention; calls may overlap and nest.
    """
    configs = _configs(model)
    for config in configs:
        klass = _defining_class(config)
        if klass is None:
            raise RuntimeError(
                f"{type(config).__name__}._attn_implementation is not a property; effdecode cannot route "
                "this transformers version's attention"
            )
        with _wrap_lock:
            _wrap_property(klass)
    routed = _routed_ids()
    for config in configs:
        routed[id(config)] = routed.get(id(config), 0) + 1
    try:
        yield
    finally:
        for config in configs:
            count = routed[id(config)] - 1
            if count:
                routed[id(config)] = count
            else:
                del routed[id(config)]
