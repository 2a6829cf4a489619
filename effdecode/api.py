"""``effdecode.generate``: transformers' ``generate`` arguments, effdecode's engine."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from effdecode.config import DecodeConfig, as_decode_config
from effdecode.distributed import check_ranks_agree
from effdecode.generation.loop import run_generation
from effdecode.generation.request import Unsupported, build_request
from effdecode.patch_state import original_generate, patched_config


def generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    **generate_kwargs: Any,
):
    """Generate with effdecode's slot-cache engine; a drop-in for ``model.generate``.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A causal LM of a supported family (`effdecode.families.SUPPORTED`: Llama, Qwen2/3, Mistral, Gemma 2/3,
        gpt-oss, Phi-3, OLMo, ...); other families run transformers' `generate` after one warning.
    input_ids : torch.Tensor, optional
        int64 ``[B, T0]`` prompts, left-padded when ragged. May be omitted with ``inputs_embeds``
        ``[B, T0, H]`` (a ``generate_kwargs`` entry), which the prefill feeds instead of the ids' embeddings;
        then, as in transformers, only the new tokens are returned.
    attention_mask : torch.Tensor, optional
        ``[B, T0]`` of 0/1; inferred from ``pad_token_id`` as transformers does when omitted.
    **generate_kwargs
        Any ``generate`` argument (``max_new_tokens``, ``do_sample``, ``temperature``, ``top_k``, ``top_p``,
        ``min_p``, ``repetition_penalty``, ``eos_token_id``, ``stop_strings`` with ``tokenizer``,
        ``logits_processor``, ``stopping_criteria``, ``streamer``, ``return_dict_in_generate``, ...), plus
        ``decode_config`` (:class:`effdecode.DecodeConfig`, or a dict of its fields).

    Returns
    -------
    torch.Tensor or EffdecodeGenerateOutput
        As transformers' ``generate``: int64 ``[B, T0 + new]`` sequences (prompt as given, then new tokens,
        ``pad_token_id`` after a row finished), or with ``return_dict_in_generate=True`` a
        ``GenerateDecoderOnlyOutput`` whose ``.stats`` is a :class:`effdecode.GenerationStats`.

    Notes
    -----
    What effdecode does not support (beam search, contrastive search, ...) runs transformers' own
    ``generate`` after one warning naming the argument.
    """
    if input_ids is None:
        input_ids = generate_kwargs.pop("inputs", None)
    if input_ids is None:
        input_ids = generate_kwargs.pop("input_ids", None)
    decode_config = as_decode_config(generate_kwargs.pop("decode_config", None))
    if decode_config is None:
        decode_config = patched_config(model) or DecodeConfig()
    try:
        request = build_request(model, input_ids, attention_mask, generate_kwargs, decode_config)
    except Unsupported as reason:
        detail = f" ({reason.detail})" if reason.detail else ""
        warnings.warn(
            f"effdecode does not support `{reason.argument}`{detail}; "
            "using transformers' generate for this call",
            stacklevel=2,
        )
        if attention_mask is not None:
            generate_kwargs["attention_mask"] = attention_mask
        return original_generate(model)(input_ids, **generate_kwargs)
    # Tensor parallel: every rank must start from the same prompts and RNG state (one small all-gather).
    check_ranks_agree(model, request.input_ids, request.do_sample, max_new_tokens=request.max_new_tokens)
    output = run_generation(model, request)
    if request.embeds_only:  # transformers returns only the new tokens when given only inputs_embeds
        prompt_width = request.input_ids.shape[1]
        if isinstance(output, torch.Tensor):
            return output[:, prompt_width:]
        output.sequences = output.sequences[:, prompt_width:]
    return output
