"""What :func:`effdecode.patch` records on a model: the ``generate`` / ``generate_batch`` to restore and the
patched config.

:mod:`effdecode.api` reads it (the config, transformers' own ``generate`` for fallbacks) and
:mod:`effdecode.patch` writes it; neither imports the other's module for it.
"""

from __future__ import annotations

import torch

from effdecode.config import DecodeConfig

_STATE_ATTR = "_effdecode_patch"
_MISSING = object()


class _PatchState:
    """What ``unpatch`` needs to restore, and the config the patched ``generate`` uses."""

    def __init__(
        self, previous_generate: object, config: DecodeConfig, previous_generate_batch: object = _MISSING
    ) -> None:
        # The instance attributes before patching, or _MISSING (then the class's methods show through).
        self.previous_generate = previous_generate
        self.previous_generate_batch = previous_generate_batch
        self.config = config


def _state(model: torch.nn.Module) -> _PatchState | None:
    return model.__dict__.get(_STATE_ATTR)


def patched_config(model: torch.nn.Module) -> DecodeConfig | None:
    """The DecodeConfig given to :func:`patch`, or None if ``model`` is not patched."""
    state = _state(model)
    return state.config if state is not None else None


def original_generate(model: torch.nn.Module):
    """The ``generate`` that ``model`` had before :func:`patch`, bound to it."""
    state = _state(model)
    if state is None or state.previous_generate is _MISSING:
        return type(model).generate.__get__(model)
    return state.previous_generate


def original_generate_batch(model: torch.nn.Module):
    """The ``generate_batch`` that ``model`` had before :func:`patch` (transformers'), bound to it.

    Raises
    ------
    AttributeError
        When ``model`` had none (a transformers without continuous batching).
    """
    state = _state(model)
    if state is not None and state.previous_generate_batch is not _MISSING:
        return state.previous_generate_batch
    method = getattr(type(model), "generate_batch", None)
    if method is None:
        raise AttributeError(f"{type(model).__name__} has no generate_batch of its own to fall back to")
    return method.__get__(model)
