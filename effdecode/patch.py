"""Make ``model.generate`` and ``model.generate_batch`` run effdecode, reversibly.

What ``patch`` records lives in :mod:`effdecode.patch_state`, which :mod:`effdecode.api` reads: this module
imports the API, never the other way round.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch

from effdecode.api import generate
from effdecode.batch_api import generate_batch
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
    """Make ``model.generate`` and ``model.generate_batch`` run effdecode; returns ``model``.

    ``model.generate_batch`` is :func:`effdecode.generate_batch` (continuous batching) and takes transformers'
    own arguments too (``continuous_batching_config``, ``record_timestamps``, ...). ``config`` is a
    :class:`DecodeConfig` or a dict of its fields. Patching again only replaces the config.
    :func:`unpatch` restores the original exactly.
    """
    config = as_decode_config(config, "config")
    state = _state(model)
    if state is not None:
        state.config = config or DecodeConfig()
        return model
    previous = model.__dict__.get("generate", _MISSING)
    previous_batch = model.__dict__.get("generate_batch", _MISSING)

    @functools.wraps(type(model).generate)
    def effdecode_generate(*args, **kwargs):
        return generate(model, *args, **kwargs)

    def effdecode_generate_batch(
        inputs,
        generation_config=None,
        continuous_batching_config=None,
        record_timestamps=False,
        progress_bar=False,
        persistent_manager=False,
        warmup=True,
        **kwargs,
    ):  # transformers' own signature, positions included
        return generate_batch(
            model,
            inputs,
            generation_config,
            progress_bar=progress_bar,
            continuous_batching_config=continuous_batching_config,
            record_timestamps=record_timestamps,
            persistent_manager=persistent_manager,
            warmup=warmup,
            **kwargs,
        )

    hf_batch = getattr(type(model), "generate_batch", None)
    if hf_batch is not None:
        effdecode_generate_batch = functools.wraps(hf_batch)(effdecode_generate_batch)
    effdecode_generate_batch.__doc__ = generate_batch.__doc__
    state = _PatchState(previous, config or DecodeConfig(), previous_batch)
    object.__setattr__(model, _STATE_ATTR, state)
    object.__setattr__(model, "generate", effdecode_generate)
    object.__setattr__(model, "generate_batch", effdecode_generate_batch)
    return model


def unpatch(model: torch.nn.Module) -> torch.nn.Module:
    """Restore the ``generate`` and ``generate_batch`` that ``model`` had before :func:`patch`; a no-op if it
    is not patched."""
    state = _state(model)
    if state is None:
        return model
    for name, previous in (
        ("generate", state.previous_generate),
        ("generate_batch", state.previous_generate_batch),
    ):
        if previous is _MISSING:
            del model.__dict__[name]
        else:
            object.__setattr__(model, name, previous)
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
