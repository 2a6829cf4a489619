"""Make ``model.generate`` run effdecode, reversibly.

What ``patch`` records lives in :mod:`effdecode.patch_state`, which :mod:`effdecode.api` reads: this module
imports the API, never the other way round.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch

from effdecode.api import generate
from effdecode.config import DecodeConfig, as_decode_config
from effdecode.generation.graphs import release_graphs
from effdecode.patch_state import (
    _MISSING,
    _STATE_ATTR,
    _PatchState,
    _state,
    patched_config,
)


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
