"""Pre-flight checks of a ``generate`` call: run, fall back to transformers, or refuse, before any work.

Each check mirrors what transformers' ``generate`` would do with the same call, so effdecode never fails
where transformers runs and never runs where transformers raises.
"""

from __future__ import annotations

import copy

import torch


class Unsupported(Exception):
    """An argument effdecode does not handle; ``generate`` falls back to transformers for the call."""

    def __init__(self, argument: str, detail: str = "") -> None:
        super().__init__(argument)
        self.argument = argument
        self.detail = detail


def check_model_state(model: torch.nn.Module, role: str = "model") -> None:
    """Refuse models whose weights are not loaded; fall back for attention dropout in training mode.

    Raises
    ------
    ValueError
        The weights are on the meta device (created without weights).
    Unsupported
        Weights offloaded by accelerate (transformers' generate loads them layer by layer), or attention
        dropout active in training mode (effdecode's attention is inference-only).
    """
    if model.device.type == "meta":
        if getattr(model, "hf_device_map", None):
            raise Unsupported(role, "weights offloaded to the meta device by an accelerate device map")
        raise ValueError(
            f"the {role}'s weights are on the meta device (it was created without weights, e.g. under "
            "init_empty_weights or with device='meta'); load them (from_pretrained, or to_empty + "
            "load_state_dict) before generate"
        )
    from effdecode.hf_attention import routing_supported

    if not routing_supported(model):
        raise Unsupported(role, "its config's attention implementation cannot be routed per thread")
    if model.training:
        for module in model.modules():
            dropout = getattr(module, "attention_dropout", 0.0)
            if module.training and isinstance(dropout, (int, float)) and dropout > 0:
                raise Unsupported(
                    f"{role}.train()",
                    f"attention dropout {dropout} is active in training mode; call {role}.eval() to decode "
                    "with effdecode",
                )


def bos_prompt(
    model: torch.nn.Module, generation_config, attention_mask: torch.Tensor | None
) -> torch.Tensor:
    """The ``[1, 1]`` prompt transformers builds when ``generate`` gets no ``input_ids``: the BOS token.

    Raises
    ------
    ValueError
        No ``bos_token_id`` (transformers' message).
    Unsupported
        An ``attention_mask`` without ``input_ids`` (transformers takes the batch size from it).
    """
    if attention_mask is not None:
        raise Unsupported("attention_mask", "given without input_ids")
    bos = generation_config.bos_token_id
    if isinstance(bos, (list, tuple)):
        bos = bos[0] if bos else None
    if bos is None:
        raise ValueError("`bos_token_id` has to be defined when no `input_ids` are provided.")
    return torch.full((1, 1), int(bos), dtype=torch.long, device=model.device)


def check_processors_like_transformers(
    model: torch.nn.Module,
    generation_config,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    logits_processors: list,
    stopping_criteria: list,
    eos_token_ids: list[int],
) -> None:
    """Build the processors transformers' ``generate`` would build, so their argument checks run up front.

    transformers validates ``temperature``, ``top_k``, ``top_p``, ``min_p``, ``repetition_penalty``, ... in
    the constructors of its processors and warpers; building them here raises the same ``ValueError`` before
    any forward. A user processor or criterion of a type ``generate`` also builds from the config replaces
    transformers' own one; effdecode would apply both, so such calls fall back.

    Raises
    ------
    ValueError
        Whatever transformers raises for these settings.
    Unsupported
        A user processor/criterion that would replace one of transformers' own.
    """
    from transformers.generation.stopping_criteria import (
        EosTokenCriteria,
        MaxLengthCriteria,
        MaxTimeCriteria,
        StopStringCriteria,
    )

    # generate sets the EOS tensor before building processors; the min-length ones need it (on a copy here).
    config = copy.copy(generation_config)
    config._eos_token_tensor = (
        torch.tensor(eos_token_ids, dtype=torch.long, device=input_ids.device) if eos_token_ids else None
    )
    built = model._get_logits_processor(
        generation_config=config,
        input_ids_seq_length=input_ids.shape[1],
        encoder_input_ids=input_ids,
        logits_processor=None,
        device=input_ids.device,
        model_kwargs={"attention_mask": attention_mask},
    )
    own_types = {type(processor) for processor in built}
    for processor in logits_processors:
        if type(processor) in own_types:
            raise Unsupported(
                "logits_processor", f"a {type(processor).__name__} replaces the one generate builds"
            )
    own_criteria = {MaxLengthCriteria}
    if generation_config.max_time is not None:
        own_criteria.add(MaxTimeCriteria)
    if generation_config.stop_strings is not None:
        own_criteria.add(StopStringCriteria)
    if generation_config.eos_token_id is not None:
        own_criteria.add(EosTokenCriteria)
    for criterion in stopping_criteria:
        if type(criterion) in own_criteria:
            raise Unsupported(
                "stopping_criteria", f"a {type(criterion).__name__} replaces the one generate builds"
            )


def _rope_types(config) -> list[tuple[str, dict]]:
    """``(rope_type, parameters)`` of every RoPE set of ``config`` (one, or one per layer type)."""
    params = getattr(config, "rope_parameters", None)
    if params is None:
        params = getattr(config, "rope_scaling", None)
    if not isinstance(params, dict):
        return []
    if "rope_type" in params or "type" in params:
        return [(str(params.get("rope_type", params.get("type"))), params)]
    return [
        (str(sub.get("rope_type", sub.get("type"))), sub)
        for sub in params.values()
        if isinstance(sub, dict) and ("rope_type" in sub or "type" in sub)
    ]


def check_rope_scaling(model: torch.nn.Module, longest_position: int, role: str = "model") -> None:
    """Fall back for RoPE whose frequencies would change within this call.

    ``dynamic`` RoPE recomputes its frequencies from the longest position in each forward once positions
    pass ``max_position_embeddings``, and ``longrope`` switches to its long factors past
    ``original_max_position_embeddings``. Which positions a forward holds differs between transformers'
    loop (every row, every step) and effdecode's (only running rows, drafts, probes), so above those limits
    the outputs would differ. Below them both keep the original frequencies and agree exactly.

    Parameters
    ----------
    longest_position : int
        An upper bound of ``max(position_ids) + 1`` over every forward of the call.

    Raises
    ------
    Unsupported
        When ``longest_position`` reaches the limit of a dynamic or longrope RoPE.
    """
    config = model.config
    for rope_type, params in _rope_types(config):
        if "dynamic" in rope_type:
            limit = config.max_position_embeddings
            # At the limit itself a frequency set grown by an earlier call is not reset: stay strictly below.
            if longest_position >= limit:
                raise Unsupported(
                    "rope_scaling",
                    f"{role} uses '{rope_type}' RoPE, whose frequencies change past max_position_embeddings="
                    f"{limit}; this call reaches position {longest_position}",
                )
        elif rope_type == "longrope":
            limit = params.get("original_max_position_embeddings") or getattr(
                config, "original_max_position_embeddings", config.max_position_embeddings
            )
            if longest_position > limit:
                raise Unsupported(
                    "rope_scaling",
                    f"{role} uses 'longrope' RoPE, which switches to its long factors past "
                    f"original_max_position_embeddings={limit}; this call reaches position "
                    f"{longest_position}",
                )
