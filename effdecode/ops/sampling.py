"""Logit warpers and token sampling: the torch reference, and the batched sample op.

The warpers follow transformers' semantics exactly (same masks, same tie handling), so effdecode samples
from the same distribution as ``generate``. They are applied in transformers' order: temperature, top-k,
top-p, min-p.

:func:`sample_tokens` applies the same filters with per-row parameters and samples by the exponential race;
:func:`sample_tokens_reference` is its torch reference and defines its exact semantics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from effdecode.ops.backend import resolve_backend

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


def _check_sample_args(logits: torch.Tensor, params: dict[str, torch.Tensor]) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, V], got shape {tuple(logits.shape)}")
    batch = logits.shape[0]
    for name, param in params.items():
        if tuple(param.shape) != (batch,):
            raise ValueError(f"{name} must be [B] = [{batch}], got shape {tuple(param.shape)}")


def sample_tokens_reference(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    exponentials: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Filter each row with its own temperature, top-k, top-p and min-p, then sample one token (torch).

    Semantics, per row with scores ``s = logits / temperature`` in fp32 and ``m = max(s)``:

    * ``temperature <= 0``: greedy, the argmax of the raw logits, ties to the lowest index. The other
      parameters are ignored.
    * top-k (``0 < top_k < V``; ``0`` or ``>= V`` is off): keep ``s >= tau_k``, the k-th largest score. Every
      token tied with the k-th is kept, as in transformers.
    * top-p (``top_p < 1``; ``1`` is off): with ``w = exp(s - m)`` over the tokens top-k kept and
      ``Z = sum(w)``, keep a token iff the mass of the tokens with a *strictly* larger score is below
      ``top_p * Z``. All tokens tied at the boundary are therefore kept together (transformers keeps whichever
      of them its sort puts last); with no ties this is exactly transformers' rule (drop a token when the
      ascending cumulative probability up to it is ``<= 1 - top_p``). ``top_p = 0`` keeps the maximum and
      its ties.
    * min-p (``min_p > 0``; ``0`` is off): keep ``s - m >= log(min_p)``, i.e. ``p >= min_p * p_max``, which
      the top-k/top-p filters do not change since they always keep the maximum.
    * Sampling: ``argmax(s - log(E))`` over the kept tokens (ties to the lowest index), the exponential race
      ``argmax(p / E)`` with ``E ~ Exp(1)``, which draws from ``softmax`` of the kept scores.

    On continuous logits (no ties) this equals :func:`warp_logits` with the row's parameters followed by the
    same race. The masses are summed in float64 here; the Triton kernel sums in fp32, so the two can only
    disagree on a token whose top-p fate is decided within fp32 rounding of the mass, and only if that token
    also wins the race.

    Parameters
    ----------
    logits : torch.Tensor
        ``[B, V]`` fp32, fp16 or bf16.
    temperature, top_p, min_p : torch.Tensor
        ``[B]`` float.
    top_k : torch.Tensor
        ``[B]`` integer.
    exponentials : torch.Tensor, optional
        ``[B, V]`` Exp(1) draws for the race; drawn from ``generator`` when absent.
    generator : torch.Generator, optional
        Source of the draws when ``exponentials`` is absent (torch's default generator if None).

    Returns
    -------
    torch.Tensor
        int64 ``[B]`` tokens.
    """
    _check_sample_args(logits, dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p))
    greedy, scores, keep = filter_scores_reference(logits, temperature, top_k, top_p, min_p)
    if exponentials is None:
        exponentials = torch.empty_like(scores).exponential_(generator=generator)
    elif tuple(exponentials.shape) != tuple(scores.shape):
        raise ValueError(
            f"exponentials must be [B, V] = {list(scores.shape)}, got {tuple(exponentials.shape)}"
        )
    race = torch.where(
        keep, scores - exponentials.to(device=scores.device, dtype=torch.float32).log(), _NEG_INF
    )
    # Greedy rows' scores are the raw logits (divided by 1).
    return torch.where(greedy, scores.argmax(dim=-1), race.argmax(dim=-1))


def filter_scores_reference(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The filtering step of :func:`sample_tokens_reference`: which tokens each row may sample.

    Parameters
    ----------
    logits : torch.Tensor
        ``[B, V]`` fp32, fp16 or bf16.
    temperature, top_k, top_p, min_p : torch.Tensor
        ``[B]`` per-row parameters, as in :func:`sample_tokens_reference`.

    Returns
    -------
    greedy : torch.Tensor
        bool ``[B]``, the rows with ``temperature <= 0``.
    scores : torch.Tensor
        fp32 ``[B, V]`` ``logits / temperature`` (the raw logits on greedy rows).
    keep : torch.Tensor
        bool ``[B, V]``, the tokens the filters keep (meaningless on greedy rows).
    """
    _check_sample_args(logits, dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p))
    device = logits.device
    vocab = logits.shape[1]
    temperature = temperature.to(device=device, dtype=torch.float32)
    greedy = temperature <= 0
    scores = logits.float() / torch.where(greedy, 1.0, temperature)[:, None]
    # A sort is fine in the reference: it makes the k-th value and the mass above each token direct reads.
    ordered = scores.sort(dim=-1, descending=True).values
    top = ordered[:, :1]

    k = top_k.to(device=device, dtype=torch.int64)
    k_on = (k > 0) & (k < vocab)
    kth = ordered.gather(1, (k.clamp(1, vocab) - 1)[:, None])
    tau = torch.where(k_on[:, None], kth, _NEG_INF)

    p = top_p.to(device=device, dtype=torch.float32)
    weights = torch.where(ordered >= tau, (ordered - top).exp(), 0.0).double()
    cumulative = weights.cumsum(dim=-1)
    mass_before = torch.cat([torch.zeros_like(cumulative[:, :1]), cumulative[:, :-1]], dim=-1)
    target = p.double()[:, None] * cumulative[:, -1:]
    # The mass before a sorted position bounds the mass strictly above its value, with equality at the first
    # of a run of ties, so the last position whose mass-before is under the target holds the boundary value.
    last_kept = ((mass_before < target).sum(dim=-1, keepdim=True) - 1).clamp(min=0)
    tau = torch.where((p < 1.0)[:, None], ordered.gather(1, last_kept), tau)

    # min-p as p >= min_p * p_max, i.e. s - m >= log(min_p); the kernel compares the same fp32 values.
    log_min_p = torch.log(min_p.to(device=device, dtype=torch.float32))
    keep = (scores >= tau) & (scores - top >= log_min_p[:, None])
    return greedy, scores, keep


def sample_tokens(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    seeds: torch.Tensor | None,
    offsets: torch.Tensor | None,
    exponentials: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Filter and sample one token per row: Triton on CUDA (or when forced), the torch reference otherwise.

    Semantics of :func:`sample_tokens_reference`. With ``exponentials`` every backend returns the same tokens.

    Parameters
    ----------
    logits : torch.Tensor
        ``[B, V]`` fp32, fp16 or bf16.
    temperature, top_p, min_p : torch.Tensor
        ``[B]`` float per-row parameters (``temperature <= 0``: greedy; ``top_p = 1``, ``min_p = 0``: off).
    top_k : torch.Tensor
        ``[B]`` integer (``0``: off).
    seeds, offsets : torch.Tensor or None
        ``[B]`` int64 Philox seed and counter offset per row, for the Triton kernel's in-kernel draws: row
        ``b`` consumes counters ``offsets[b] + v`` for ``v < V``, so a caller reusing a seed advances its
        offset by ``V`` per call. The torch backend ignores them and draws from torch's default generator.
    exponentials : torch.Tensor, optional
        ``[B, V]`` Exp(1) draws to use instead of random ones.
    backend : str
        ``auto``, ``torch``, ``triton`` or ``cuda`` (no CUDA op: resolves as ``auto``).

    Returns
    -------
    torch.Tensor
        int64 ``[B]`` tokens.
    """
    chosen = resolve_backend(backend, logits.device, has_cuda_op=False, has_triton_op=True)
    if chosen == "triton":
        from effdecode.kernels.sampling import sample_tokens_triton

        return sample_tokens_triton(logits, temperature, top_k, top_p, min_p, seeds, offsets, exponentials)
    return sample_tokens_reference(logits, temperature, top_k, top_p, min_p, exponentials)
