"""Logit warpers and token sampling: the torch reference.

The warpers follow transformers' semantics exactly (same masks, same tie handling), so effdecode samples
from the same distribution as ``generate``. They are applied in transformers' order: temperature, top-k,
top-p, min-p.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_NEG_INF = float("-inf")


@dataclass(frozen=True)
class SamplingParams:
    """Sampling options of one ``generate`` call (HF's names and defaults)."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None

    def is_identity(self) -> bool:
        return (
            self.temperature == 1.0
            and not self.top_k
            and (self.top_p is None or self.top_p >= 1.0)
            and self.min_p is None
        )


def apply_temperature(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    return scores if temperature == 1.0 else scores / temperature


def apply_top_k(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the ``top_k`` highest scores per row (ties with the k-th kept too), mask the rest."""
    top_k = min(max(top_k, 1), scores.shape[-1])
    kth_best = torch.topk(scores, top_k, dim=-1).values[..., -1:]
    return scores.masked_fill(scores < kth_best, _NEG_INF)


def apply_top_p(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filter: drop the least likely tokens whose cumulative mass stays within ``1 - top_p``."""
    sorted_scores, order = torch.sort(scores, descending=False, dim=-1)
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative <= (1 - top_p)
    drop_sorted[..., -1:] = False  # the most likely token always stays
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return scores.masked_fill(drop, _NEG_INF)


def apply_min_p(scores: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens whose probability is below ``min_p`` times the most likely token's."""
    probs = scores.softmax(dim=-1)
    threshold = min_p * probs.amax(dim=-1, keepdim=True)
    # The most likely token is never below the threshold (min_p <= 1), so at least one token stays.
    return scores.masked_fill(probs < threshold, _NEG_INF)


def warp_logits(scores: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Apply temperature, top-k, top-p and min-p (HF's order) to ``[B, V]`` float scores."""
    scores = apply_temperature(scores, params.temperature)
    if params.top_k:
        scores = apply_top_k(scores, params.top_k)
    if params.top_p is not None and params.top_p < 1.0:
        scores = apply_top_p(scores, params.top_p)
    if params.min_p is not None:
        scores = apply_min_p(scores, params.min_p)
    return scores


def sample_from_scores(scores: torch.Tensor) -> torch.Tensor:
    """Draw one token per row from ``softmax(scores)`` with torch's global generator.

    Parameters
    ----------
    scores : torch.Tensor
        ``[B, V]`` float warped scores (``-inf`` for excluded tokens).

    Returns
    -------
    torch.Tensor
        int64 ``[B]`` sampled tokens.
    """
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1).squeeze(1)
