"""Turn ``generate`` arguments into a validated :class:`GenerationRequest`, or a reason to fall back.

Generation options are merged exactly as transformers does (user kwargs > ``generation_config`` >
``model.generation_config`` > global defaults), so effdecode decodes with the same settings as ``generate``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from effdecode.config import DecodeConfig
from effdecode.consistency.checks import check_consistency_call
from effdecode.distributed import placement_problem
from effdecode.families import SUPPORTED, unsupported_reason
from effdecode.generation.checks import (
    Unsupported,
    bos_prompt,
    check_model_state,
    check_processors_like_transformers,
    check_rope_scaling,
)
from effdecode.generation.thinking import ThinkingPlan, thinking_plan
from effdecode.ops.sampling import SamplingParams

# Model families verified token-for-token against transformers' generate (tests/test_families.py).
SUPPORTED_MODEL_TYPES = frozenset(SUPPORTED)

# ``generate`` arguments only transformers' own generate handles.
_UNSUPPORTED_ARGUMENTS = (
    "prefix_allowed_tokens_fn",
    "synced_gpus",
    "negative_prompt_ids",
    "negative_prompt_attention_mask",
    "custom_generate",
    "past_key_values",
)

# Generation-config fields effdecode does not implement, with the values that mean "off".
_UNSUPPORTED_CONFIG_FIELDS: dict[str, tuple] = {
    "num_beams": (None, 1),
    "num_beam_groups": (None, 1),
    "diversity_penalty": (None, 0.0),
    "penalty_alpha": (None,),
    "constraints": (None,),
    "force_words_ids": (None,),
    "dola_layers": (None,),
    "guidance_scale": (None, 1.0),
    "output_attentions": (None, False),
    "output_hidden_states": (None, False),
    "typical_p": (None, 1.0),
    "epsilon_cutoff": (None, 0.0),
    "eta_cutoff": (None, 0.0),
    "top_h": (None,),
    "no_repeat_ngram_size": (None, 0),
    "encoder_no_repeat_ngram_size": (None, 0),
    "encoder_repetition_penalty": (None, 1.0),
    "bad_words_ids": (None,),
    "sequence_bias": (None,),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,),
    "exponential_decay_length_penalty": (None,),
    "watermarking_config": (None,),
    "renormalize_logits": (None, False),
    "remove_invalid_values": (None, False),
    "token_healing": (None, False),
    "use_mtp": (None, False),
    "low_memory": (None, False),
}

# Model kwargs that mean nothing to a decoder-only forward with effdecode's own cache.
_IGNORED_MODEL_KWARGS = frozenset(
    {"use_cache", "logits_to_keep", "cache_implementation", "return_legacy_cache"}
)


@dataclass
class SpeculationPlan:
    """How rows draft tokens for speculative decoding.

    Attributes
    ----------
    num_draft : int
        Most draft tokens a row proposes per step (``prompt_lookup_num_tokens`` or ``num_assistant_tokens``).
    schedule : str
        "constant" (every row keeps ``num_draft``), "heuristic" (per row, transformers' rule: +2 after a step
        whose drafts were all accepted, -1 otherwise, within [1, num_draft]) or "adaptive" (per row, from a
        running mean of its accepted drafts).
    assistant_model : torch.nn.Module, optional
        The draft model; None drafts by n-gram lookup in each row's own history.
    max_ngram, min_ngram : int
        Longest and shortest suffix n-gram searched by the n-gram drafter.
    """

    num_draft: int
    schedule: str = "constant"
    assistant_model: torch.nn.Module | None = None
    max_ngram: int = 3
    min_ngram: int = 1


@dataclass
class GenerationRequest:
    """Everything the engine needs for one call, validated.

    Attributes
    ----------
    input_ids : torch.Tensor
        int64 ``[B, T0]``, the prompts as given (left padding kept), rows repeated for
        ``num_return_sequences``.
    prompt_lens : torch.Tensor
        int32 ``[B]``, real (unpadded) tokens per row; they are right-aligned in ``input_ids``.
    max_new_tokens : int
        Most tokens any row may generate.
    eos_blocked_until : int
        EOS ids are masked while a row has generated fewer tokens than this (``min_length`` /
        ``min_new_tokens``).
    """

    input_ids: torch.Tensor
    prompt_lens: torch.Tensor
    max_new_tokens: int
    eos_blocked_until: int
    eos_token_ids: list[int]
    pad_token_id: int | None
    do_sample: bool
    sampling: SamplingParams
    repetition_penalty: float
    logits_processors: list = field(default_factory=list)
    stopping_criteria: list = field(default_factory=list)
    streamer: Any = None
    max_time: float | None = None
    output_scores: bool = False
    output_logits: bool = False
    return_dict_in_generate: bool = False
    decode_config: DecodeConfig = field(default_factory=DecodeConfig)
    speculation: SpeculationPlan | None = None
    thinking: ThinkingPlan | None = None
    inputs_embeds: torch.Tensor | None = None  # [B, T0, H]: fed to the prefill instead of the ids' embeddings
    embeds_only: bool = False  # no input_ids given: input_ids are placeholders; return only the new tokens
    # Called from the host with the int64 request-row indices that just finished (each row once, in the step
    # it leaves; rows still running at the end too, and rows max_time left waiting or a decided prompt never
    # started) and their int64 new-token counts: one small device-to-host copy in a step where rows leave.
    on_rows_finished: Callable[[np.ndarray, np.ndarray], None] | None = None
    num_return_sequences: int = 1  # rows per prompt (consecutive in input_ids)
    tokenizer: Any = None  # generate's ``tokenizer=`` (stop strings, thinking markers, answers)

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]


def _as_id_list(value: int | Sequence[int] | torch.Tensor | None) -> list[int]:
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.flatten().tolist()]
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def check_model_supported(model: torch.nn.Module) -> None:
    """Raise :class:`Unsupported` for models whose attention effdecode has not been verified on."""
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        raise Unsupported("model", "encoder-decoder models")
    reason = unsupported_reason(getattr(config, "model_type", None))
    if reason is not None:
        raise Unsupported("model", reason)
    placement = placement_problem(model)
    if placement is not None:
        raise Unsupported("device_map", placement)


def _infer_attention_mask(
    input_ids: torch.Tensor, pad_token_id: int | None, eos_token_ids: list[int]
) -> torch.Tensor:
    """transformers' rule: mask out pad tokens only if the pad token is present and is not an EOS token."""
    if pad_token_id is None or pad_token_id in eos_token_ids or not bool((input_ids == pad_token_id).any()):
        return torch.ones_like(input_ids)
    return (input_ids != pad_token_id).long()


def _validate_prompts(input_ids: torch.Tensor, attention_mask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Check the prompt batch and return the real-token count of each row."""
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has shape "
            f"{tuple(input_ids.shape)}; they must match"
        )
    if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise ValueError("attention_mask must hold only 0 and 1")
    mask = attention_mask.bool()
    prompt_lens = mask.sum(dim=1)
    empty = (prompt_lens == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"empty prompt in rows {empty}: every row needs at least one token")
    # Left padding only: each row's real tokens must be its last ``prompt_len`` columns.
    num_cols = input_ids.shape[1]
    expected = torch.arange(num_cols, device=mask.device)[None, :] >= (num_cols - prompt_lens)[:, None]
    bad_rows = (mask != expected).any(dim=1).nonzero().flatten().tolist()
    if bad_rows:
        # transformers generates from such a batch (with a warning of its own); so do we, through it.
        raise Unsupported(
            "attention_mask",
            f"rows {bad_rows} are right-padded or have gaps; the slot cache needs each row's real tokens to "
            "end at the last column, i.e. left padding: tokenizer.padding_side = 'left'",
        )
    real = input_ids[mask]
    out_of_range = (real < 0) | (real >= vocab_size)
    if bool(out_of_range.any()):
        bad = real[out_of_range][:5].tolist()
        raise ValueError(f"token ids {bad} are outside the model's vocabulary [0, {vocab_size})")
    return prompt_lens.to(torch.int32)


def build_request(
    model: torch.nn.Module,
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    generate_kwargs: dict[str, Any],
    decode_config: DecodeConfig,
) -> GenerationRequest:
    """Validate ``generate`` arguments and resolve them into a :class:`GenerationRequest`.

    Raises
    ------
    Unsupported
        For arguments or models effdecode leaves to transformers' ``generate``.
    ValueError
        For bad input (empty prompt, mismatched mask, ids outside the vocabulary, negative lengths, ...).
    """
    kwargs = dict(generate_kwargs)
    assistant_model = kwargs.pop("assistant_model", None)
    assistant_tokenizer = kwargs.pop("assistant_tokenizer", None)
    inputs_embeds = kwargs.pop("inputs_embeds", None)
    _refuse_unsupported_arguments(kwargs)
    check_model_supported(model)
    check_model_state(model)
    input_ids, attention_mask, embeds_only = _prompt_inputs(input_ids, attention_mask, inputs_embeds)
    _check_lengths(kwargs)
    hooks = _UserHooks(
        logits_processors=list(kwargs.pop("logits_processor", None) or []),
        stopping_criteria=list(kwargs.pop("stopping_criteria", None) or []),
        streamer=kwargs.pop("streamer", None),
        tokenizer=kwargs.pop("tokenizer", None),
    )
    config, defaults = _generation_config(model, kwargs)
    if embeds_only:
        _check_embeds_only(
            config, hooks.logits_processors, hooks.stopping_criteria, hooks.streamer, assistant_model,
            defaults.min_length,
        )  # fmt: skip
    prompt = _prompt(model, config, input_ids, attention_mask)
    max_new_tokens, eos_blocked_until = _length_limits(model, config, defaults, prompt.input_ids.shape[1])
    # Before effdecode adds its own StopStringCriteria to the user's criteria.
    check_processors_like_transformers(
        model, config, prompt.input_ids, prompt.attention_mask, hooks.logits_processors,
        hooks.stopping_criteria, prompt.eos_token_ids,
    )  # fmt: skip
    _add_stop_strings(config, hooks)
    thinking = thinking_plan(decode_config, hooks.tokenizer)
    _check_decode_config(decode_config, config, hooks, prompt)
    speculation = _speculation_plan(
        model, config, assistant_model, assistant_tokenizer, hooks.tokenizer, decode_config
    )
    speculation = _drop_blocked_speculation(speculation, config, hooks, prompt)
    if embeds_only and thinking is not None:
        raise Unsupported("inputs_embeds", "without input_ids, with thinking control (it reads the prompt)")
    longest = int(prompt.prompt_lens.max()) + max_new_tokens + _lookahead(speculation, thinking)
    _check_rope(model, speculation, longest)
    input_ids, prompt_lens, inputs_embeds = _expand_returns(model, config, prompt, inputs_embeds)
    return GenerationRequest(
        input_ids=input_ids,
        prompt_lens=prompt_lens,
        max_new_tokens=max_new_tokens,
        eos_blocked_until=eos_blocked_until,
        eos_token_ids=prompt.eos_token_ids,
        pad_token_id=prompt.pad_token_id,
        do_sample=bool(config.do_sample),
        sampling=_sampling_params(config),
        repetition_penalty=float(config.repetition_penalty or 1.0),
        logits_processors=hooks.logits_processors,
        stopping_criteria=hooks.stopping_criteria,
        streamer=hooks.streamer,
        max_time=config.max_time,
        output_scores=bool(config.output_scores),
        output_logits=bool(config.output_logits),
        return_dict_in_generate=bool(config.return_dict_in_generate),
        decode_config=decode_config,
        speculation=speculation,
        thinking=thinking,
        inputs_embeds=inputs_embeds,
        embeds_only=embeds_only,
        **_consistency_inputs(config, hooks),
    )


def _check_decode_config(decode_config: DecodeConfig, config, hooks, prompt) -> None:
    """Per-call checks of the effdecode options: KV budget against the prompts, self-consistency inputs."""
    check_consistency_call(
        decode_config, config.num_return_sequences or 1, hooks.tokenizer, prompt.eos_token_ids
    )
    _check_kv_budget(decode_config, prompt.prompt_lens)


def _consistency_inputs(config, hooks) -> dict[str, Any]:
    """What self-consistency reads off the call: rows per prompt and the tokenizer."""
    return dict(num_return_sequences=config.num_return_sequences or 1, tokenizer=hooks.tokenizer)


def _refuse_unsupported_arguments(kwargs: dict[str, Any]) -> None:
    for name in _UNSUPPORTED_ARGUMENTS:
        value = kwargs.pop(name, None)
        if value is not None and value is not False:
            raise Unsupported(name)


def _check_lengths(kwargs: dict[str, Any]) -> None:
    for name in ("max_new_tokens", "max_length", "min_new_tokens", "min_length"):
        value = kwargs.get(name)
        if value is not None and value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")


def _check_rope(model: torch.nn.Module, speculation, longest: int) -> None:
    """RoPE types whose frequencies change with the sequence length stay with transformers past that."""
    check_rope_scaling(model, longest)
    if speculation is not None and speculation.assistant_model is not None:
        check_rope_scaling(speculation.assistant_model, longest, "assistant_model")


def _sampling_params(config) -> SamplingParams:
    return SamplingParams(
        temperature=float(config.temperature if config.temperature is not None else 1.0),
        top_k=config.top_k or None,
        top_p=config.top_p,
        min_p=config.min_p,
    )


@dataclass
class _UserHooks:
    """The caller's processors, criteria, streamer and tokenizer (stop strings add a criterion)."""

    logits_processors: list
    stopping_criteria: list
    streamer: Any
    tokenizer: Any


@dataclass
class _LengthDefaults:
    """Whether ``max_length``/``min_length`` were left at their defaults (transformers counts them apart)."""

    max_length: bool
    min_length: bool


@dataclass
class _Prompt:
    """The resolved prompt batch on the model's device."""

    input_ids: torch.Tensor  # int64 [B, T0], left-padded
    attention_mask: torch.Tensor  # [B, T0]
    prompt_lens: torch.Tensor  # int32 [B]
    eos_token_ids: list[int]
    pad_token_id: int | None


def _prompt_inputs(
    input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, inputs_embeds: torch.Tensor | None
) -> tuple[torch.Tensor | None, torch.Tensor | None, bool]:
    """Check the prompt arguments: ``(input_ids, attention_mask, embeds_only)``.

    With only ``inputs_embeds`` the ids are placeholders and, as transformers does, only new tokens are
    returned (``embeds_only``). ``input_ids`` None (and no embeddings): transformers generates from BOS.
    """
    embeds_only = False
    if inputs_embeds is not None:
        if not isinstance(inputs_embeds, torch.Tensor) or inputs_embeds.ndim != 3:
            raise ValueError("inputs_embeds must be a float tensor of shape [batch, prompt_len, hidden_size]")
        if input_ids is None:
            embeds_only = True
            input_ids = torch.zeros(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device)
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
        elif tuple(input_ids.shape) != tuple(inputs_embeds.shape[:2]):
            raise ValueError(
                f"input_ids has shape {tuple(input_ids.shape)} but inputs_embeds has shape "
                f"{tuple(inputs_embeds.shape)}; their first two dimensions must match"
            )
    if input_ids is not None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.is_floating_point():
            raise ValueError("input_ids must be an integer tensor of shape [batch, prompt_len]")
        if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
            raise ValueError(f"empty prompt: input_ids has shape {tuple(input_ids.shape)}")
    return input_ids, attention_mask, embeds_only


def _generation_config(model: torch.nn.Module, kwargs: dict[str, Any]):
    """transformers' resolved ``GenerationConfig`` for the call and the length defaults; refuses (as
    :class:`Unsupported`) fields and model kwargs effdecode leaves to transformers."""
    generation_config = kwargs.pop("generation_config", None)
    defaults = _LengthDefaults(
        max_length=kwargs.get("max_length") is None
        and (generation_config is None or generation_config.max_length is None)
        and model.generation_config.max_length is None,
        min_length=kwargs.get("min_length") is None
        and (generation_config is None or generation_config.min_length is None)
        and model.generation_config.min_length is None,
    )
    config, model_kwargs = model._prepare_generation_config(generation_config, **kwargs)
    for name, off_values in _UNSUPPORTED_CONFIG_FIELDS.items():
        value = getattr(config, name, None)
        if value not in off_values:
            raise Unsupported(name, f"={value!r}")
    for name, value in model_kwargs.items():
        if name not in _IGNORED_MODEL_KWARGS and value is not None:
            raise Unsupported(name)
    _warn_ignored_cache_options(config)
    return config, defaults


def _prompt(model, config, input_ids, attention_mask) -> _Prompt:
    """Ids on the model's device (BOS when none), EOS/pad ids, the mask (inferred as transformers does) and
    each row's prompt length, validated."""
    from_bos = input_ids is None
    if from_bos:  # transformers generates from a [1, 1] BOS prompt
        input_ids = bos_prompt(model, config, attention_mask)
    input_ids = input_ids.to(model.device)
    eos_token_ids = _as_id_list(config.eos_token_id)
    pad_token_id = config.pad_token_id
    if isinstance(pad_token_id, (list, tuple)):
        pad_token_id = pad_token_id[0] if pad_token_id else None
    if pad_token_id is None and eos_token_ids:
        pad_token_id = eos_token_ids[0]
    if attention_mask is None:
        attention_mask = _infer_attention_mask(input_ids, pad_token_id, eos_token_ids)
    attention_mask = attention_mask.to(model.device)
    if from_bos and not bool(attention_mask.all()):
        raise Unsupported("input_ids", "none given, and the BOS prompt is masked as padding (bos == pad)")
    vocab_size = model.get_input_embeddings().num_embeddings
    prompt_lens = _validate_prompts(input_ids, attention_mask, vocab_size)
    return _Prompt(input_ids, attention_mask, prompt_lens, eos_token_ids, pad_token_id)


def _length_limits(model, config, defaults: _LengthDefaults, prompt_width: int) -> tuple[int, int]:
    """``(max_new_tokens, eos_blocked_until)`` as transformers derives them from the length options."""
    if config.max_new_tokens is not None:
        max_new_tokens = config.max_new_tokens
    else:
        max_length = config.max_length
        if defaults.max_length:
            max_length = max_length + prompt_width
            max_positions = getattr(model.config, "max_position_embeddings", None)
            if max_positions is not None:
                max_length = min(max_length, max_positions)
        max_new_tokens = max_length - prompt_width
        if max_new_tokens <= 0:
            raise ValueError(
                f"input length is {prompt_width} but max_length is {max_length}; set max_new_tokens instead"
            )
    if config.min_new_tokens is not None:
        eos_blocked_until = config.min_new_tokens
    elif config.min_length and not defaults.min_length:
        eos_blocked_until = max(0, config.min_length - prompt_width)
    else:
        eos_blocked_until = 0
    return max_new_tokens, eos_blocked_until


def _add_stop_strings(config, hooks: _UserHooks) -> None:
    if config.stop_strings is None:
        return
    if hooks.tokenizer is None:
        raise ValueError("stop_strings needs the tokenizer: pass generate(..., tokenizer=tokenizer)")
    from transformers import StopStringCriteria

    hooks.stopping_criteria.append(
        StopStringCriteria(stop_strings=config.stop_strings, tokenizer=hooks.tokenizer)
    )


def _drop_blocked_speculation(speculation, config, hooks: _UserHooks, prompt: _Prompt):
    """``speculation``, or None (with one warning) when an option needs one token per step."""
    if speculation is None:
        return None
    blocker = _speculation_blocker(
        config, hooks.logits_processors, hooks.stopping_criteria, hooks.streamer, prompt.input_ids.shape[0],
        prompt.eos_token_ids,
    )  # fmt: skip
    if not blocker:
        return speculation
    warnings.warn(
        f"effdecode: speculative decoding is off for this call ({blocker}); decoding without drafts",
        stacklevel=4,
    )
    return None


def _expand_returns(model, config, prompt: _Prompt, inputs_embeds):
    """Rows repeated ``num_return_sequences`` times: ``(input_ids, prompt_lens, inputs_embeds)``."""
    input_ids, prompt_lens = prompt.input_ids, prompt.prompt_lens
    num_return = config.num_return_sequences or 1
    if inputs_embeds is not None:
        inputs_embeds = inputs_embeds.to(device=model.device, dtype=model.dtype)
    if num_return > 1:
        input_ids = input_ids.repeat_interleave(num_return, dim=0)
        prompt_lens = prompt_lens.repeat_interleave(num_return, dim=0)
        if inputs_embeds is not None:
            inputs_embeds = inputs_embeds.repeat_interleave(num_return, dim=0)
    return input_ids, prompt_lens, inputs_embeds


def _check_embeds_only(
    config, logits_processors, stopping_criteria, streamer, assistant_model, has_default_min_length
) -> None:
    """Without input_ids transformers' history is empty; options that read it stay with transformers."""
    reasons = {
        "max_new_tokens is not set (max_length counts differently without input_ids)": config.max_new_tokens
        is None,
        "min_length": not has_default_min_length and config.min_new_tokens is None,
        "repetition_penalty": config.repetition_penalty not in (None, 1.0),
        "logits processors": bool(logits_processors),
        "stopping criteria or stop strings": bool(stopping_criteria) or config.stop_strings is not None,
        "a streamer": streamer is not None,
        "speculative decoding": assistant_model is not None or config.prompt_lookup_num_tokens is not None,
    }
    for reason, present in reasons.items():
        if present:
            raise Unsupported("inputs_embeds", f"without input_ids, with {reason}")


def _warn_ignored_cache_options(config) -> None:
    """One warning for transformers' cache/compile options, which effdecode's own cache replaces."""
    ignored = []
    if getattr(config, "cache_implementation", None) is not None:
        ignored.append(f"cache_implementation={config.cache_implementation!r}")
    # ISSUE-12 HOOK: once DecodeConfig(compile=True) exists, map a compile_config to the compiled decode step
    # here (e.g. decode_config = dataclasses.replace(decode_config, compile=True)) instead of ignoring it.
    if getattr(config, "compile_config", None) is not None:
        ignored.append("compile_config")
    if ignored:
        warnings.warn(
            f"effdecode: {' and '.join(ignored)} ignored: effdecode decodes with its own slot KV cache "
            "(DecodeConfig(cuda_graphs=True) replays CUDA graphs)",
            stacklevel=4,
        )


def _lookahead(speculation: SpeculationPlan | None, thinking: ThinkingPlan | None) -> int:
    """Most positions a forward may hold past a row's last kept token: drafts, forced text, probes."""
    extra = 0
    if speculation is not None:
        extra += speculation.num_draft + 1
    if thinking is not None:
        extra += len(thinking.forced_ids) + len(thinking.probe_ids) + thinking.answer_tokens + 2
    return extra


def _check_kv_budget(decode_config: DecodeConfig, prompt_lens: torch.Tensor) -> None:
    """A protected prompt and the recent window must fit in the KV budget."""
    budget = decode_config.kv_budget
    if budget is None or not decode_config.kv_protect_prompt:
        return
    longest = int(prompt_lens.max())
    if longest + decode_config.kv_window > budget:
        raise ValueError(
            f"DecodeConfig.kv_budget={budget} cannot hold the protected prompt ({longest} tokens) plus "
            f"kv_window={decode_config.kv_window}; raise kv_budget or set kv_protect_prompt=False"
        )


def _speculation_plan(
    model: torch.nn.Module,
    config,
    assistant_model: torch.nn.Module | None,
    assistant_tokenizer,
    tokenizer,
    decode_config: DecodeConfig,
) -> SpeculationPlan | None:
    """The drafting plan asked for by ``assistant_model`` / ``prompt_lookup_num_tokens``, validated."""
    lookup = config.prompt_lookup_num_tokens
    if assistant_model is None and lookup is None:
        return None
    if assistant_model is not None and lookup is not None:
        raise ValueError("pass either assistant_model or prompt_lookup_num_tokens, not both")
    if assistant_model is not None:
        num_draft = config.num_assistant_tokens if config.num_assistant_tokens is not None else 20
        _check_draft_model(model, assistant_model, assistant_tokenizer, tokenizer)
    else:
        num_draft = lookup
    if not isinstance(num_draft, int) or num_draft < 1:
        raise ValueError(f"the number of draft tokens must be an integer >= 1, got {num_draft!r}")
    schedule = config.num_assistant_tokens_schedule or "constant"
    if decode_config.draft_length == "adaptive":
        schedule = "adaptive"
    if schedule not in ("constant", "heuristic", "adaptive"):
        raise ValueError(f"num_assistant_tokens_schedule={schedule!r}; expected 'constant' or 'heuristic'")
    max_ngram = config.max_matching_ngram_size or 3
    return SpeculationPlan(num_draft, schedule, assistant_model, max_ngram=max_ngram, min_ngram=1)


def _check_draft_model(model, draft, draft_tokenizer, tokenizer) -> None:
    target_vocab = model.get_output_embeddings().weight.shape[0]
    draft_vocab = draft.get_output_embeddings().weight.shape[0]
    if draft_vocab != target_vocab:
        raise ValueError(
            f"assistant_model has a vocabulary of {draft_vocab} tokens but the model has {target_vocab}; "
            "effdecode's drafts must share the target's tokenizer and vocabulary"
        )
    if (
        draft_tokenizer is not None
        and tokenizer is not None
        and draft_tokenizer.get_vocab() != tokenizer.get_vocab()
    ):
        raise ValueError(
            "assistant_tokenizer differs from tokenizer; the draft must use the target's tokenizer"
        )
    if draft.device != model.device:
        raise ValueError(f"assistant_model is on {draft.device} but the model is on {model.device}")
    if draft.dtype != model.dtype:
        raise ValueError(f"assistant_model has dtype {draft.dtype} but the model has {model.dtype}")
    check_model_state(draft, "assistant_model")
    try:
        check_model_supported(draft)
    except Unsupported as reason:
        raise ValueError(f"assistant_model is not supported by effdecode: {reason.detail}") from None


def _speculation_blocker(
    config, logits_processors: list, stopping_criteria: list, streamer, batch_size: int, eos_token_ids: list
) -> str | None:
    """Why speculation cannot run with these options (they need one token per step), or None."""
    if stopping_criteria and not eos_token_ids:
        return "stopping criteria without an EOS token keep finished rows generating, as transformers does"
    if config.repetition_penalty not in (None, 1.0):
        return "repetition_penalty depends on every earlier token"
    if logits_processors:
        return "user logits processors see one token per step"
    if config.output_scores or config.output_logits:
        return "output_scores/output_logits"
    if streamer is not None and batch_size > 1:
        return "streaming a batch"
    return None
