"""Validation of the self-consistency fields of :class:`~effdecode.config.DecodeConfig` (before any work)."""

from __future__ import annotations

import re
from typing import Any

POLICIES = ("esc", "adaptive", "confidence")


def answer_kind(answer: Any) -> str | None:
    """``"regex"``, ``"callable"``, ``"markers"`` or None for no answer; ValueError for anything else."""
    if answer is None:
        return None
    if isinstance(answer, (str, re.Pattern)):
        pattern = re.compile(answer) if isinstance(answer, str) else answer
        if pattern.groups != 1:
            raise ValueError(
                f"DecodeConfig.answer={pattern.pattern!r} has {pattern.groups} groups; the regex needs "
                "exactly one group: the answer (e.g. r'Answer: (\\d+)')"
            )
        return "regex"
    if callable(answer):
        return "callable"
    if isinstance(answer, (tuple, list)) and len(answer) == 2 and all(_is_ids(part) for part in answer):
        if not answer[0]:
            raise ValueError("DecodeConfig.answer markers: the start marker (token ids) is empty")
        return "markers"
    raise ValueError(
        f"DecodeConfig.answer={answer!r}; expected a regex with one group, a callable on the decoded text or "
        "token-id markers (start_ids, end_ids)"
    )


def _is_ids(part: Any) -> bool:
    return isinstance(part, (tuple, list)) and all(isinstance(i, int) and i >= 0 for i in part)


def check_consistency_fields(config) -> None:
    """Raise ValueError for bad ``answer`` / ``consistency*`` fields of a DecodeConfig."""
    kind = answer_kind(config.answer)
    policy = config.consistency
    if policy not in (None, *POLICIES):
        raise ValueError(f"DecodeConfig.consistency={policy!r}; expected None or one of {POLICIES}")
    if policy is not None and kind is None:
        raise ValueError(
            f"DecodeConfig.consistency={policy!r} needs DecodeConfig.answer (how to read answers)"
        )
    for name in ("consistency_window", "consistency_warmup", "consistency_tokens"):
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"DecodeConfig.{name}={value!r}; expected an int >= 1")
    threshold = config.consistency_threshold
    if threshold is None:
        return
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool):
        raise ValueError(f"DecodeConfig.consistency_threshold={threshold!r}; expected a float")
    if policy == "adaptive" and not 0.5 < threshold < 1.0:
        raise ValueError(
            f"DecodeConfig.consistency_threshold={threshold!r}; 'adaptive' needs a value in (0.5, 1)"
        )
    if policy == "confidence" and not 0.0 < threshold <= 1.0:
        raise ValueError(
            f"DecodeConfig.consistency_threshold={threshold!r}; 'confidence' needs a value in (0, 1]"
        )
    if policy in (None, "esc"):
        raise ValueError(
            f"DecodeConfig.consistency_threshold is set but consistency={policy!r} does not use it"
        )


def check_consistency_call(config, num_return_sequences: int, tokenizer, eos_token_ids) -> None:
    """Per-call checks: k >= 2 with a policy, a tokenizer for text answers, an EOS id for rows to finish."""
    if config.answer is None:
        return
    if config.consistency is not None and num_return_sequences < 2:
        raise ValueError(
            f"DecodeConfig.consistency={config.consistency!r} needs num_return_sequences >= 2 (got "
            f"{num_return_sequences}): a policy decides among each prompt's k rows"
        )
    kind = answer_kind(config.answer)
    if kind in ("regex", "callable") and tokenizer is None:
        raise ValueError(
            f"DecodeConfig.answer is a {kind} on decoded text: pass tokenizer= to generate to decode rows"
        )
    if config.consistency is not None and not eos_token_ids:
        raise ValueError("DecodeConfig.consistency needs an EOS token id (answers are read when rows finish)")
