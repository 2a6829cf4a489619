"""``effdecode.generate_batch``: transformers' ``generate_batch`` contract, effdecode's engine.

The prompts are left-padded into one request and decoded by the one loop with ``DecodeConfig.max_slots`` KV
slots: waiting prompts are admitted as rows finish (continuous batching), with every effdecode option
(speculation, KV eviction, thinking budgets, early exit). Each request's output is its own: what
:func:`effdecode.generate` gives for that prompt alone.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
import warnings
from collections.abc import Sequence
from numbers import Integral
from typing import Any

import numpy as np
import torch

from effdecode.batch_options import TRANSFORMERS_ARGUMENTS, BatchOptions, pop_batch_options, warn_ignored
from effdecode.batch_outputs import BatchRequestOutput, request_outputs
from effdecode.batch_progress import ProgressBar
from effdecode.config import DecodeConfig, as_decode_config
from effdecode.distributed import check_ranks_agree
from effdecode.generation.loop import run_generation
from effdecode.generation.request import Unsupported, build_request
from effdecode.patch_state import original_generate_batch, patched_config

# The slot count when neither the call nor the DecodeConfig names one.
DEFAULT_SLOTS = "auto"


def generate_batch(
    model: torch.nn.Module,
    inputs: Sequence[Sequence[int]],
    generation_config=None,
    decode_config: DecodeConfig | dict | None = None,
    progress_bar: bool = False,
    **generate_kwargs: Any,
) -> dict[str, BatchRequestOutput]:
    """Generate for many prompts with continuous batching; a drop-in for ``model.generate_batch``.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A causal LM of a supported family (others run transformers' own ``generate_batch`` after one
        warning).
    inputs : list of list of int
        The prompts, token ids without padding (any length each).
    generation_config : transformers.GenerationConfig, optional
        As for ``generate``; ``generate_kwargs`` override its fields.
    decode_config : effdecode.DecodeConfig or dict, optional
        effdecode's options (the patched config when None). Its ``max_slots`` is the number of requests
        decoded at once (KV slots); None means ``"auto"`` here (as many as fit in free memory).
    progress_bar : bool
        Show a tqdm bar of finished requests and tokens/s.
    **generate_kwargs
        Any ``generate`` argument (``max_new_tokens``, ``do_sample``, ``assistant_model``,
        ``prompt_lookup_num_tokens``, ``stopping_criteria``, ...), and transformers' ``generate_batch``
        arguments: ``continuous_batching_config`` (``max_requests_per_batch`` sets ``max_slots``, ``seed`` the
        sampling seed), ``record_timestamps``, ``persistent_manager``, ``warmup`` (see
        :mod:`effdecode.batch_options`; what has no meaning here is named in one warning).

    Returns
    -------
    dict of str to BatchRequestOutput
        ``"req_0"``, ``"req_1"``, ... in prompt order: transformers' ``GenerationOutput`` (``request_id``,
        ``prompt_ids``, ``generated_tokens`` with EOS kept and no padding, ``status`` FINISHED, ``lifespan``)
        plus ``stats`` (:class:`effdecode.RequestStats`) and ``call_stats``.

    Raises
    ------
    ValueError
        Before any work, for an empty list, an empty prompt, ids that are not ints or outside the
        vocabulary, a prompt longer than the model's positions, ``max_slots`` < 1.
    """
    hf_arguments = {name: generate_kwargs[name] for name in TRANSFORMERS_ARGUMENTS if name in generate_kwargs}
    options = pop_batch_options(generate_kwargs)
    prompts = check_prompts(model, inputs)
    config = _slot_config(model, decode_config, options)
    input_ids, attention_mask = left_pad(prompts, _pad_id(model, generation_config), model.device)
    kwargs = dict(generate_kwargs, generation_config=generation_config, return_dict_in_generate=True)
    try:
        request = build_request(model, input_ids, attention_mask, kwargs, config)
    except Unsupported as reason:
        fallback_kwargs = dict(generate_kwargs, **hf_arguments, progress_bar=progress_bar)
        return _fallback(model, reason, prompts, generation_config, fallback_kwargs)
    warn_ignored(options)
    check_ranks_agree(model, request.input_ids, request.do_sample, max_new_tokens=request.max_new_tokens)
    num_return = request.batch_size // len(prompts)
    started = time.perf_counter()
    with ProgressBar(request.batch_size, progress_bar) as bar, _seeded(options.seed, model.device):
        request.on_rows_finished = bar.rows_finished
        output = run_generation(model, request)
        bar.finish(output.stats.total_new_tokens, output.stats.wall_time_s)
    return request_outputs(prompts, output.sequences, input_ids.shape[1], output.stats, num_return, started)


def check_prompts(model: torch.nn.Module, inputs: Sequence[Sequence[int]]) -> list[list[int]]:
    """The prompts as lists of ints, checked: a ``ValueError`` naming the first problem.

    Parameters
    ----------
    inputs : sequence of sequences of int
        Lists, tuples, 1-D integer tensors or arrays.
    """
    if isinstance(inputs, torch.Tensor) or not isinstance(inputs, Sequence) or isinstance(inputs, str):
        raise ValueError(f"inputs must be a list of prompts (lists of ids), got {type(inputs).__name__}")
    if len(inputs) == 0:
        raise ValueError("inputs is empty: generate_batch needs at least one prompt")
    vocab_size = model.get_input_embeddings().num_embeddings
    max_positions = getattr(model.config, "max_position_embeddings", None)
    prompts = []
    for index, prompt in enumerate(inputs):
        ids = _as_ids(prompt, index)
        if not ids:
            raise ValueError(f"inputs[{index}] is an empty prompt: every prompt needs at least one token")
        bad = [token for token in ids if not 0 <= token < vocab_size]
        if bad:
            raise ValueError(
                f"inputs[{index}] has token ids {bad[:5]} outside the model's vocabulary [0, {vocab_size})"
            )
        if max_positions is not None and len(ids) > max_positions:
            raise ValueError(
                f"inputs[{index}] has {len(ids)} tokens, more than the model's max_position_embeddings="
                f"{max_positions}"
            )
        prompts.append(ids)
    return prompts


def _as_ids(prompt: Any, index: int) -> list[int]:
    if isinstance(prompt, torch.Tensor):
        if prompt.ndim != 1 or prompt.is_floating_point() or prompt.dtype == torch.bool:
            raise ValueError(
                f"inputs[{index}] must be a 1-D integer tensor, got {prompt.dtype} {list(prompt.shape)}"
            )
        return [int(token) for token in prompt.tolist()]
    if isinstance(prompt, (str, bytes)) or not isinstance(prompt, (Sequence, np.ndarray)):
        raise ValueError(f"inputs[{index}] must be a list of token ids, got {type(prompt).__name__}")
    ids = list(prompt)
    not_ints = [token for token in ids if isinstance(token, bool) or not isinstance(token, Integral)]
    if not_ints:
        raise ValueError(f"inputs[{index}] holds non-integer token ids {not_ints[:5]!r}")
    return [int(token) for token in ids]


def left_pad(
    prompts: list[list[int]], pad_id: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, int64 ``[B, T0]``: prompts right-aligned, ``pad_id`` before them."""
    width = max(len(ids) for ids in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        mask[row, width - len(ids) :] = 1
    return input_ids.to(device), mask.to(device)


def _pad_id(model: torch.nn.Module, generation_config) -> int:
    """A pad id for the prompt columns (masked out, so any valid id does)."""
    for config in (generation_config, model.generation_config):
        pad = getattr(config, "pad_token_id", None) if config is not None else None
        if isinstance(pad, int) and pad >= 0:
            return pad
    return 0


def _slot_config(model: torch.nn.Module, decode_config, options: BatchOptions) -> DecodeConfig:
    """The call's DecodeConfig and slot count: ``max_requests_per_batch``, else the config's, else auto."""
    config = as_decode_config(decode_config) or patched_config(model) or DecodeConfig()
    slots = options.max_slots or config.max_slots or DEFAULT_SLOTS
    return dataclasses.replace(config, max_slots=slots)


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device):
    """Seed torch's generators for the call (``continuous_batching_config.seed``), restoring them after."""
    if seed is None:
        yield
        return
    devices = [device] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _fallback(model, reason: Unsupported, prompts, generation_config, kwargs: dict[str, Any]):
    """transformers' own ``generate_batch`` for what effdecode leaves to transformers (one warning).

    transformers reads only ``max_new_tokens`` from its keyword arguments, so the other ``generate``
    arguments that are ``GenerationConfig`` fields go into a copy of the generation config.
    """
    detail = f" ({reason.detail})" if reason.detail else ""
    warnings.warn(
        f"effdecode does not support `{reason.argument}`{detail}; using transformers' generate_batch "
        "for this call",
        stacklevel=3,
    )
    own = {name: kwargs.pop(name) for name in (*TRANSFORMERS_ARGUMENTS, "progress_bar") if name in kwargs}
    max_new_tokens = kwargs.pop("max_new_tokens", None)
    config = copy.deepcopy(generation_config if generation_config is not None else model.generation_config)
    config.update(**kwargs)
    return original_generate_batch(model)(
        inputs=prompts, generation_config=config, max_new_tokens=max_new_tokens, **own
    )
