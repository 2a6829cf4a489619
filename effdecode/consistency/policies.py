"""Stop rules of self-consistency over one prompt's rows, on host data (answers in the order rows finished).

- ESC (Li et al., 2024, "Escape Sky-high Cost: Early-stopping Self-Consistency for Multi-step Reasoning"):
  answers come in windows of ``w``; once a whole window agrees, the prompt stops.
- Adaptive-Consistency (Aggarwal et al., 2023, "Let's Sample Step by Step: Adaptive-Consistency for
  Efficient Reasoning and Coding with LLMs"), its Beta criterion: with ``v1`` votes for the leading answer
  and ``v2`` for the runner-up, the leader's share ``p ~ Beta(v1 + 1, v2 + 1)`` (uniform prior over the two);
  stop once ``P(p > 1/2) >= threshold``. For integer parameters that is a binomial tail, computed exactly:
  ``P(p > 1/2) = P(Binomial(v1 + v2 + 1, 1/2) <= v1)``.
- Confidence (Fu et al., 2025, "Deep Think with Confidence", DeepConf-online): the threshold a running trace
  confidence must stay above is a percentile of the warm-up traces' lowest confidences.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Sequence
from math import comb

import numpy as np


def esc_stops(answers: Sequence[Hashable | None], window: int) -> bool:
    """Whether ESC stops after ``answers`` (in finish order): the window just completed all agrees.

    Only a window that the last answer completes is judged (``len(answers)`` a multiple of ``window``); a
    missing answer (None) never agrees.
    """
    count = len(answers)
    if count == 0 or count % window:
        return False
    last = answers[count - window :]
    return last[0] is not None and all(answer == last[0] for answer in last)


def beta_majority_probability(leader_votes: int, runner_up_votes: int) -> float:
    """``P(p > 1/2)`` for ``p ~ Beta(leader_votes + 1, runner_up_votes + 1)`` (exact binomial tail)."""
    n = leader_votes + runner_up_votes + 1
    return sum(comb(n, j) for j in range(leader_votes + 1)) / 2**n


def adaptive_stops(answers: Sequence[Hashable | None], threshold: float) -> bool:
    """Whether Adaptive-Consistency (Beta criterion) stops after ``answers``; missing answers do not vote."""
    counts = Counter(answer for answer in answers if answer is not None).most_common(2)
    if not counts:
        return False
    leader = counts[0][1]
    runner_up = counts[1][1] if len(counts) > 1 else 0
    return beta_majority_probability(leader, runner_up) >= threshold


def confidence_threshold(lowest: Sequence[float], keep: float) -> float:
    """The bar of DeepConf-online: the ``1 - keep`` quantile of the warm-up rows' lowest window confidences
    (``keep = 0.9`` lets a row as confident as 90% of the warm-up rows' worst stretches go on)."""
    values = np.asarray([value for value in lowest if np.isfinite(value)], dtype=np.float64)
    if values.size == 0:
        return float("-inf")
    return float(np.quantile(values, 1.0 - keep))


def weighted_vote(
    answers: Sequence[Hashable | None], weights: Sequence[float] | None = None
) -> tuple[Hashable | None, float]:
    """``(answer, share)``: the answer with the most (weighted) votes and its share of the votes cast.

    Missing answers (None) do not vote; ties go to the answer that reached the tie first (finish order).
    ``(None, 0.0)`` when nobody answered.
    """
    totals: dict = {}
    for index, answer in enumerate(answers):
        if answer is not None:
            totals[answer] = totals.get(answer, 0.0) + (1.0 if weights is None else float(weights[index]))
    if not totals:
        return None, 0.0
    best = max(totals, key=totals.get)  # max keeps the first of equal keys: the earliest answer
    total = sum(totals.values())
    return best, totals[best] / total if total > 0 else 0.0
