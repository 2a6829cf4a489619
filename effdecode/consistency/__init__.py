"""Self-consistency: answers of sampled rows, votes, and policies that stop a prompt's rows early.

:class:`~effdecode.config.DecodeConfig` ``answer=`` / ``consistency=`` turn it on inside ``generate``
(:mod:`effdecode.generation.consistency` is the loop's participant); :func:`vote` votes the rows of plain
``num_return_sequences`` sampling after the fact.
"""

from effdecode.consistency.answers import AnswerReader
from effdecode.consistency.policies import (
    adaptive_stops,
    beta_majority_probability,
    confidence_threshold,
    esc_stops,
    weighted_vote,
)
from effdecode.consistency.vote import PromptVote, vote

__all__ = [
    "AnswerReader",
    "PromptVote",
    "adaptive_stops",
    "beta_majority_probability",
    "confidence_threshold",
    "esc_stops",
    "vote",
    "weighted_vote",
]
