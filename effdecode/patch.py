"""Make ``model.generate`` run effdecode, reversibly."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch

from effdecode.config import DecodeConfig, as_decode_config
from effdecode.generation.graphs import release_graphs

_STATE_ATTR = "_effdecode_patch"
_MISSING = object()


class _PatchState:
    """What ``unpatch`` needs to restore, and the config the patched ``generate`` uses."""

    def __init__(self, previous_generate: object, config: DecodeConfig) -> None:
        self.previous_generate = previous_generate  # the instance attribute before patching, or _MISSING
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


def patch(model: torch.nn.Module, config: DecodeConfig | dict | None = None) -> torch.nn.Module:
    """Make ``model.generate`` run effdecode; returns ``model``.

    ``config`` is a :class:`DecodeConfig` or a dict of its fields. Patching again only replaces the config.
    :func:`unpatch` restores the original exactly.
    """
    config = as_decode_config(config, "config")
    state = _state(model)
    if state is not None:
        state.config = config or DecodeConfig()
        return model
    from effdecode.api import generate

    previous = model.__dict__.get("generate", _MISSING)

    @functools.wraps(type(model).generate)
    def effdecode_generate(*args, **kwargs):
        return generate(model, *args, **kwargs)

    object.__setattr__(model, _STATE_ATTR, _PatchState(previous, config or DecodeConfig()))
    object.__setattr__(model, "generate", effdecode_generate)
    return model


def unpatch(model: torch.nn.Module) -> torch.nn.Module:
    """Restore the ``generate`` that ``model`` had before :func:`patch`; a no-op if it is not patched."""
    state = _state(model)
    if state is None:
        return model
    if state.previous_generate is _MISSING:
        del model.__dict__["generate"]
    else:
        object.__setattr__(model, "generate", state.previous_generate)
    del model.__dict__[_STATE_ATTR]
    release_graphs(model)
    return model


@contextlib.contextmanager
def patched(model: torch.nn.Module, config: DecodeConfig | dict | None = None) -> Iterator[torch.nn.Module]:
    """``with effdecode.patched(model):`` — ``model.generate`` runs effdecode inside the block.

    ``config``: a :class:`DecodeConfig` or a dict of its fields.
    """
    config = as_decode_config(config, "config")  # before patching: a bad config leaves the model as it was
    already = _state(model) is not None
    previous_config = patched_config(model)
    patch(model, config)
    try:
        yield model
    finally:
        if already:
            patch(model, previous_config)
        else:
            unpatch(model)
