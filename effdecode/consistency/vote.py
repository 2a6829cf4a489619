"""Per-prompt vote results, and :func:`vote` for rows of plain ``num_return_sequences`` sampling."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from effdecode.consistency.answers import AnswerReader
from effdecode.consistency.policies import weighted_vote


@dataclass
class PromptVote:
    """The vote over one prompt's rows.

    Attributes
    ----------
    answer : hashable or None
        The (weighted) majority answer; None when no row answered.
    vote_share : float
        Its share of the votes cast.
    answers : list
        Each row's answer in row order (None: no answer, or the row was stopped / never started).
    weights : list[float]
        Each row's vote weight (1.0, or its confidence under ``consistency="confidence"``; 0 for no vote).
    rows_run : int
        Rows that started decoding.
    rows_stopped : int
        Rows a policy stopped before they finished (cancelled by the prompt's decision or low confidence),
        plus rows it never started.
    rows_finished : int
        Rows that ran to their own end (EOS, a stop criterion or ``max_new_tokens``) and were read.
    tokens_spent : int
        Tokens the prompt's rows generated.
    tokens_full : int
        Estimate of what full self-consistency (every row to its end) would have generated. In one call:
        each stopped row counts ``max(its tokens + 1, mean length of the prompt's rows that finished on
        their own)`` (``max_new_tokens`` when none did): a lower bound, since rows stopped in flight are the
        long ones. In windows (:func:`effdecode.generate_in_windows`): ``k`` x the mean length of the rows
        run. Compare against a measured full-SC run where it matters (the benchmark does).
    """

    answer: Hashable | None
    vote_share: float
    answers: list = field(default_factory=list)
    weights: list = field(default_factory=list)
    rows_run: int = 0
    rows_stopped: int = 0
    tokens_spent: int = 0
    tokens_full: int = 0
    rows_finished: int = 0

    @property
    def tokens_saved(self) -> float:
        """Share of ``tokens_full`` not spent (0 without a policy)."""
        return 1.0 - self.tokens_spent / self.tokens_full if self.tokens_full else 0.0


def vote(
    outputs: Any,
    answer: Any,
    num_return_sequences: int,
    tokenizer=None,
    prompt_width: int = 0,
    weights: Sequence[float] | None = None,
) -> list[PromptVote]:
    """Majority vote over each prompt's rows of a sampled ``generate`` output.

    Parameters
    ----------
    outputs : torch.Tensor, a generate output (``.sequences``), or a list of per-row token lists
        int64 ``[P * k, T]`` rows; a prompt's k rows are consecutive (as ``num_return_sequences`` gives them).
    answer : str, callable or (list[int], list[int])
        How to read a row's answer (see :class:`~effdecode.config.DecodeConfig` ``answer``).
    num_return_sequences : int
        Rows per prompt, ``k >= 1``.
    tokenizer : optional
        Required for a regex or callable ``answer``.
    prompt_width : int
        Columns of prompt before the new tokens (``input_ids.shape[1]``); only new tokens are read.
    weights : sequence of float, optional
        ``[P * k]`` vote weights; equal weights by default.

    Returns
    -------
    list[PromptVote]
        One per prompt.
    """
    reader = AnswerReader(answer, tokenizer)
    rows = getattr(outputs, "sequences", outputs)
    if isinstance(rows, torch.Tensor):
        rows = rows[:, prompt_width:].tolist()
    else:
        rows = [list(row)[prompt_width:] for row in rows]
    k = num_return_sequences
    if k < 1 or len(rows) % k:
        raise ValueError(f"{len(rows)} rows do not split into prompts of num_return_sequences={k}")
    if weights is not None and len(weights) != len(rows):
        raise ValueError(f"weights has {len(weights)} entries for {len(rows)} rows")
    pad = getattr(tokenizer, "pad_token_id", None)
    results = []
    for start in range(0, len(rows), k):
        group = [[t for t in row if t != pad] if pad is not None else row for row in rows[start : start + k]]
        answers = reader.read(group)
        group_weights = [1.0] * k if weights is None else [float(w) for w in weights[start : start + k]]
        best, share = weighted_vote(answers, group_weights)
        spent = sum(len(row) for row in group)
        results.append(PromptVote(best, share, answers, group_weights, k, 0, spent, spent, rows_finished=k))
    return results
