"""The ``generate`` output type: transformers' own, with effdecode's cost counters and a lazy cache."""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from transformers.generation.utils import GenerateDecoderOnlyOutput

from effdecode.cache import SlotKVCache
from effdecode.stats import GenerationStats


def build_hf_cache(
    slot_cache: SlotKVCache,
    slots: torch.Tensor,
    prompt_lens: torch.Tensor,
    new_tokens: torch.Tensor,
    prompt_width: int,
    width: int,
    model_config: Any = None,
):
    """The transformers ``DynamicCache`` that ``generate`` would return, from effdecode's slot cache.

    transformers' cache after ``generate`` holds one column per column of the returned sequences but the
    last (whose token was never fed): ``[B, kv_heads, width, head_dim]`` per layer, left padding included.
    Row ``b``'s entries are put in the columns of the tokens they belong to: its prompt's real tokens from
    column ``prompt_width - prompt_lens[b]`` and its generated tokens after them, up to (not including) its
    last generated token.

    Parameters
    ----------
    slot_cache : SlotKVCache
        The call's cache; slot ``slots[b]`` holds row ``b``'s ``cache_lens`` entries (keys after RoPE).
    slots : torch.Tensor
        int ``[B]``: the slot of each returned row.
    prompt_lens, new_tokens : torch.Tensor
        int ``[B]``: real prompt tokens and generated tokens of each row.
    prompt_width : int
        Columns of the prompt (``T0``).
    width : int
        Columns of the cache: the returned sequences' length minus one.
    model_config : transformers.PretrainedConfig, optional
        Gives the cache its layer types (sliding-window layers keep what transformers' would).

    Returns
    -------
    transformers.DynamicCache
        Columns with no entry (left padding; the pad tokens transformers keeps feeding to a finished row)
        are zeros, so a continuation must mask them (``attention_mask`` 0 there), as it masks the padding.

    Notes
    -----
    With KV eviction a row holds only its kept entries (``cache_lens[b]`` of them, fewer than its tokens):
    they are put in order in the columns just before the row's last token, the earlier columns stay zero,
    and their RoPE phases are those of their original positions.
    """
    from transformers import DynamicCache

    device = slot_cache.device
    slots = slots.to(device=device, dtype=torch.long)
    lens = slot_cache.cache_lens.index_select(0, slots).long()
    new_tokens = new_tokens.to(device).long()
    end = prompt_width + new_tokens - 1  # column after the row's last cached token
    count = torch.minimum(lens, prompt_lens.to(device).long() + new_tokens - 1).clamp(min=0)
    count = torch.minimum(count, end.clamp(min=0))
    columns = torch.arange(width, device=device)[None, :]
    source = columns - (end - count)[:, None]  # entry index of each column
    valid = (source >= 0) & (source < count[:, None])
    index = source.clamp(0, slot_cache.capacity - 1)
    geometry = slot_cache.geometry
    gather_index = index[:, None, :, None].expand(-1, geometry.kv_heads, -1, geometry.head_dim)
    keep = valid[:, None, :, None]
    try:
        cache = DynamicCache(config=model_config) if model_config is not None else DynamicCache()
    except TypeError:  # an older signature
        cache = DynamicCache()
    for layer in range(geometry.num_layers):
        keys = slot_cache.keys[layer].index_select(0, slots).gather(2, gather_index)
        values = slot_cache.values[layer].index_select(0, slots).gather(2, gather_index)
        cache.update(keys.masked_fill(~keep, 0), values.masked_fill(~keep, 0), layer)
    return cache


class LazyHFCache:
    """What :func:`build_hf_cache` needs, kept until the output's ``past_key_values`` is first read.

    ``persistent``: the slot cache outlives the call (the CUDA-graph cache kept on the model, which the next
    call overwrites), so the cache is built at once instead.
    """

    def __init__(
        self,
        slot_cache: SlotKVCache,
        slots: torch.Tensor,
        prompt_lens: torch.Tensor,
        new_tokens: torch.Tensor,
        prompt_width: int,
        width: int,
        model_config: Any = None,
        persistent: bool = False,
    ) -> None:
        self._args = (slot_cache, slots.clone(), prompt_lens.clone(), new_tokens.clone(), prompt_width, width)
        self._model_config = model_config
        self._built = self.build() if persistent else None

    def build(self):
        if getattr(self, "_built", None) is None:
            self._built = build_hf_cache(*self._args, model_config=self._model_config)
            self._args = None  # the slot cache can go
        return self._built


# transformers >= 5.2x names the output's cache ``cache`` (``past_key_values`` stays as an alias property).
CACHE_FIELD = "cache" if "cache" in {f.name for f in fields(GenerateDecoderOnlyOutput)} else "past_key_values"


@dataclass
class EffdecodeGenerateOutput(GenerateDecoderOnlyOutput):
    """:class:`transformers.generation.utils.GenerateDecoderOnlyOutput` plus ``stats``.

    Attributes
    ----------
    stats : GenerationStats
        What the call cost (forwards, tokens per row, KV peak, wall time).
    past_key_values : transformers.DynamicCache
        (``cache`` in newer transformers, which keeps ``past_key_values`` as an alias.) As transformers
        returns it: each row's KV for the returned sequences but their last column (left
        padding included), so ``model.generate(torch.cat([sequences, more], 1), past_key_values=...)``
        continues a conversation. Built from effdecode's slot cache on first access (reading it through
        the attribute or ``out["past_key_values"]``), so a caller who never reads it pays nothing but
        keeping the slot cache alive with the output. Columns without an entry (padding, and the pad tokens
        transformers feeds a finished row) are zeros: mask them in the continuation's ``attention_mask``.
        With KV eviction it holds each row's kept entries only (see :func:`build_hf_cache`).
    """

    stats: GenerationStats | None = None

    def attach_cache(self, lazy: LazyHFCache | None) -> EffdecodeGenerateOutput:
        """Give the output its cache, built from ``lazy`` on first access; returns self."""
        self.__dict__["_lazy_cache"] = lazy
        return self

    def __getitem__(self, key):
        if key in ("past_key_values", "cache"):
            return getattr(self, CACHE_FIELD)
        return super().__getitem__(key)


def _get_cache(self: EffdecodeGenerateOutput):
    lazy = self.__dict__.get("_lazy_cache")
    if lazy is not None:
        self.__dict__["_lazy_cache"] = None
        setattr(self, CACHE_FIELD, lazy.build())
    return self.__dict__.get("_cache_value")


def _set_cache(self: EffdecodeGenerateOutput, value) -> None:
    self.__dict__["_cache_value"] = value
    if value is not None:  # the mapping view (keys(), to_tuple()) as transformers' outputs have it
        collections.OrderedDict.__setitem__(self, CACHE_FIELD, value)


# Set after the dataclass is built: its __init__ still takes the field (now through the setter).
setattr(
    EffdecodeGenerateOutput,
    CACHE_FIELD,
    property(_get_cache, _set_cache, doc="transformers' cache; see the class docstring"),
)


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
