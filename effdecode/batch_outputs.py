"""What :func:`effdecode.generate_batch` returns per request: transformers' ``GenerationOutput`` plus stats.

transformers 5.17 and 5.24 define the same ``GenerationOutput`` (``request_id``, ``prompt_ids``,
``generated_tokens``, ``logprobs``, ``error``, ``status``, ``created_time``, ``lifespan``, ``timestamps``);
:class:`BatchRequestOutput` subclasses it, so code written for ``model.generate_batch`` reads ours unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers.generation.continuous_batching.requests import GenerationOutput, RequestStatus

from effdecode.stats import GenerationStats

__all__ = ["BatchRequestOutput", "RequestStats", "RequestStatus", "request_ids", "request_outputs"]


@dataclass
class RequestStats:
    """What one request of a :func:`effdecode.generate_batch` call cost.

    Attributes
    ----------
    new_tokens : int
        Tokens generated (EOS included).
    thinking_tokens : int
        Tokens chosen inside the thinking span (0 unless a thinking option is set).
    evicted_tokens : int
        KV entries evicted (per layer; 0 without ``kv_budget``).
    proposed_draft_tokens, accepted_draft_tokens : int
        Draft tokens proposed to / accepted by the target (0 without speculation).
    time_to_first_token_s : float or None
        Seconds from the start of the call to the request's first token (None where the engine does not
        report it).
    finish_s : float or None
        Seconds from the start of the call to the request's end.
    """

    new_tokens: int = 0
    thinking_tokens: int = 0
    evicted_tokens: int = 0
    proposed_draft_tokens: int = 0
    accepted_draft_tokens: int = 0
    time_to_first_token_s: float | None = None
    finish_s: float | None = None

    @property
    def draft_acceptance_rate(self) -> float:
        """Accepted over proposed draft tokens (0 without speculation)."""
        return self.accepted_draft_tokens / self.proposed_draft_tokens if self.proposed_draft_tokens else 0.0


@dataclass
class BatchRequestOutput(GenerationOutput):
    """transformers' ``GenerationOutput`` of one request, plus effdecode's per-request and per-call stats.

    Attributes
    ----------
    stats : RequestStats
        This request's tokens, thinking, eviction, drafts and timings.
    call_stats : GenerationStats
        The whole call's :class:`effdecode.GenerationStats` (shared by every request of the call; ``slots``
        is the number of KV slots the call decoded with where the engine reports it).
    """

    stats: RequestStats = field(default_factory=RequestStats)
    call_stats: GenerationStats | None = field(default=None, repr=False)


def request_ids(num_prompts: int, num_return_sequences: int) -> list[str]:
    """Request ids row by row, as transformers names them: ``req_<i>``, and for ``num_return_sequences`` > 1
    the copies ``req_<i>__child#<j>`` (j < n - 1) before their parent ``req_<i>``."""
    ids = []
    for prompt in range(num_prompts):
        ids.extend(f"req_{prompt}__child#{child}" for child in range(num_return_sequences - 1))
        ids.append(f"req_{prompt}")
    return ids


def _at(values: list | None, row: int, default=0):
    """``values[row]``, or ``default`` where the engine left the list empty (an option that was off)."""
    return values[row] if values is not None and row < len(values) else default


def _row_stats(stats: GenerationStats, row: int) -> RequestStats:
    return RequestStats(
        new_tokens=int(stats.new_tokens[row]),
        thinking_tokens=int(_at(stats.thinking_tokens, row)),
        evicted_tokens=int(_at(stats.evicted_tokens, row)),
        proposed_draft_tokens=int(_at(stats.proposed_draft_tokens, row)),
        accepted_draft_tokens=int(_at(stats.accepted_draft_tokens, row)),
        time_to_first_token_s=_at(getattr(stats, "first_token_s", None), row, None),
        finish_s=_at(getattr(stats, "finish_s", None), row, None),
    )


def request_outputs(
    prompts: list[list[int]],
    sequences,
    prompt_width: int,
    stats: GenerationStats,
    num_return_sequences: int,
    started: float,
) -> dict[str, BatchRequestOutput]:
    """Split one ``generate`` result into per-request outputs, in row order.

    Parameters
    ----------
    prompts : list of list of int
        The prompts as given (one per request before ``num_return_sequences``).
    sequences : torch.Tensor
        int64 ``[B, T0 + new]``, ``B = len(prompts) * num_return_sequences``: left-padded prompts, then the
        new tokens (padding after a row's end).
    prompt_width : int
        ``T0``, the padded prompt width.
    stats : GenerationStats
        The call's stats (``new_tokens[row]`` marks where each row's tokens end; EOS kept, as transformers'
        ``generate_batch`` keeps it).
    started : float
        ``time.perf_counter()`` when the call started (``created_time``; ``lifespan`` is measured from it).
    """
    rows = sequences[:, prompt_width:].tolist()
    outputs = {}
    for row, request_id in enumerate(request_ids(len(prompts), num_return_sequences)):
        row_stats = _row_stats(stats, row)
        first = row_stats.time_to_first_token_s
        finish = row_stats.finish_s if row_stats.finish_s is not None else stats.wall_time_s
        outputs[request_id] = BatchRequestOutput(
            request_id=request_id,
            prompt_ids=list(prompts[row // num_return_sequences]),
            generated_tokens=rows[row][: row_stats.new_tokens],
            status=RequestStatus.FINISHED,
            created_time=started,
            lifespan=(started + (first if first is not None else 0.0), started + finish),
            stats=row_stats,
            call_stats=stats,
        )
    return outputs
