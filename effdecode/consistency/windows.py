"""Self-consistency in windows across calls: each round samples ``window`` more rows for the prompts still
undecided, so rows a policy makes unnecessary never start.

Inside one ``generate`` call all k rows of a prompt start together (a static batch), so a policy can only stop
rows in flight once the first ones finish; with traces of similar length that saves little. Sampling in
windows (as ESC does) saves the rows never started. With continuous batching the same happens inside one call
(:meth:`effdecode.generation.consistency.Consistency.admissible`); this is the way without it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from effdecode.api import generate
from effdecode.config import DecodeConfig
from effdecode.consistency.policies import adaptive_stops, esc_stops, weighted_vote
from effdecode.consistency.vote import PromptVote

DEFAULT_ADAPTIVE_THRESHOLD = 0.95


@dataclass
class WindowedRun:
    """What :func:`generate_in_windows` did: per prompt votes, rounds, and cost."""

    votes: list[PromptVote]
    rounds: int = 0
    wall_time_s: float = 0.0
    sequences: list[list[torch.Tensor]] = field(default_factory=list)  # per prompt, its rows' new tokens

    @property
    def tokens(self) -> int:
        return sum(vote.tokens_spent for vote in self.votes)

    @property
    def tokens_full(self) -> int:
        return sum(vote.tokens_full for vote in self.votes)


def generate_in_windows(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    samples: int,
    decode_config: DecodeConfig,
    **generate_kwargs,
) -> WindowedRun:
    """Sample up to ``samples`` rows per prompt in windows of ``decode_config.consistency_window``, stopping
    a prompt once its policy (``"esc"`` or ``"adaptive"``; None: all windows) decides.

    Parameters
    ----------
    input_ids, attention_mask : torch.Tensor
        ``[P, T0]`` left-padded prompts.
    samples : int
        Most rows per prompt (k).
    decode_config : DecodeConfig
        With ``answer``; ``consistency`` in (None, "esc", "adaptive"); ``consistency_window`` rows per round.
    **generate_kwargs
        Sampling options for :func:`effdecode.generate` (``do_sample=True`` is set); ``tokenizer=`` for text
        answers.

    Returns
    -------
    WindowedRun
        ``votes[p]``: ``rows_run`` rows started, ``rows_stopped = samples - rows_run`` never started,
        ``tokens_full`` = ``samples`` x the mean length of the rows run.
    """
    policy, window = decode_config.consistency, decode_config.consistency_window
    if policy not in (None, "esc", "adaptive"):
        raise ValueError(f"generate_in_windows runs consistency None, 'esc' or 'adaptive', not {policy!r}")
    if decode_config.answer is None:
        raise ValueError("generate_in_windows needs decode_config.answer")
    if samples < 1 or window < 1:
        raise ValueError(f"samples={samples} and consistency_window={window} must be >= 1")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    threshold = decode_config.consistency_threshold or DEFAULT_ADAPTIVE_THRESHOLD
    per_call = replace(decode_config, consistency=None, consistency_threshold=None)
    num_prompts = input_ids.shape[0]
    answers: list[list] = [[] for _ in range(num_prompts)]
    lengths: list[list[int]] = [[] for _ in range(num_prompts)]
    rows: list[list[torch.Tensor]] = [[] for _ in range(num_prompts)]
    open_prompts = np.arange(num_prompts)
    run = WindowedRun(votes=[])
    started = time.perf_counter()
    while open_prompts.size:
        size = min(window, samples - len(answers[open_prompts[0]]))
        index = torch.as_tensor(open_prompts, device=input_ids.device)
        ids, mask = _trim(input_ids.index_select(0, index), attention_mask.index_select(0, index))
        out = generate(
            model, ids, attention_mask=mask, do_sample=True, num_return_sequences=size,
            return_dict_in_generate=True, decode_config=per_call, **generate_kwargs,
        )  # fmt: skip
        run.rounds += 1
        for position, prompt in enumerate(open_prompts.tolist()):
            vote = out.stats.consistency[position]
            order = np.argsort(
                [out.stats.new_tokens[position * size + j] for j in range(size)], kind="stable"
            )
            for j in order.tolist():  # finish order within the round: shortest first
                row = position * size + j
                answers[prompt].append(vote.answers[j])
                lengths[prompt].append(min(out.stats.new_tokens[row], out.sequences.shape[1]))
                rows[prompt].append(out.sequences[row, ids.shape[1] :])
        open_prompts = np.asarray(
            [
                p
                for p in open_prompts.tolist()
                if not _decided(answers[p], policy, window, threshold, samples)
            ],
            dtype=np.int64,
        )
    run.wall_time_s = time.perf_counter() - started
    run.votes = [_prompt_vote(answers[p], lengths[p], samples) for p in range(num_prompts)]
    run.sequences = rows
    return run


def _trim(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop left-padding columns no remaining prompt needs."""
    width = int(mask.sum(dim=1).max())
    return ids[:, -width:], mask[:, -width:]


def _decided(answers: list, policy: str | None, window: int, threshold: float, samples: int) -> bool:
    if len(answers) >= samples:
        return True
    if policy == "esc":
        return esc_stops(answers, window)
    if policy == "adaptive":
        return adaptive_stops(answers, threshold)
    return False


def _prompt_vote(answers: list, lengths: list[int], samples: int) -> PromptVote:
    best, share = weighted_vote(answers)
    spent = sum(lengths)
    full = round(samples * spent / len(lengths)) if lengths else 0
    weights = [1.0 if answer is not None else 0.0 for answer in answers]
    return PromptVote(
        best, share, list(answers), weights, rows_run=len(answers), rows_stopped=samples - len(answers),
        tokens_spent=spent, tokens_full=max(full, spent), rows_finished=len(answers),
    )  # fmt: skip
