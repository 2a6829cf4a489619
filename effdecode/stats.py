"""What one ``generate`` call cost."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class GenerationStats:
    """Cost counters of one effdecode ``generate`` call, attached to its output as ``.stats``.

    Attributes
    ----------
    target_forwards : int
        Forward passes of the target model, prefill included.
    new_tokens : list[int]
        Tokens generated per row (EOS included, padding excluded).
    kv_peak_tokens : int
        Most KV entries one row held in the cache.
    kv_peak_bytes : int
        Bytes of the KV cache buffers allocated for the call (all layers, keys and values).
    wall_time_s : float
        Wall-clock time of the call, prefill and compilation included.
    compile_time_s : float
        Part of ``wall_time_s`` spent compiling steps (``DecodeConfig(compile=True)``; 0 once every step the
        call used was compiled by an earlier call).
    draft_forwards : int
        Forward passes of the draft model (speculative decoding with ``assistant_model``), prefill included.
    proposed_draft_tokens, accepted_draft_tokens : list[int]
        Draft tokens proposed to / accepted by the target, per row (speculative decoding; empty otherwise).
    target_row_forwards : list[int]
        Target forwards each row took part in (prefill included); a row leaves once it finishes.
    evicted_tokens : list[int]
        KV entries evicted per row (per layer; 0 without ``kv_budget``).
    thinking_tokens : list[int]
        Tokens each row chose inside its thinking span (forced and probe tokens excluded; empty unless a
        thinking option is set).
    early_exits : list[int]
        Confident early-exit probes per row (0 or 1; empty without ``early_exit``).
    first_token_s : list[float]
        Per row: seconds from the start of the call until its first token was chosen (time to first token;
        with ``max_slots`` a row admitted later waits for its slot first).
    finish_s : list[float]
        Per row: seconds from the start of the call until the row finished (left the batch).
    slots : int
        KV slots the call used (``DecodeConfig.max_slots``, resolved; the batch size without it).
    consistency : list[PromptVote]
        Per prompt (``DecodeConfig(answer=...)``): the voted answer, its vote share, rows run and stopped,
        tokens spent and the estimate of what full self-consistency would have spent
        (:class:`effdecode.consistency.PromptVote`); empty without ``answer``.
    """

    target_forwards: int = 0
    new_tokens: list[int] = field(default_factory=list)
    kv_peak_tokens: int = 0
    kv_peak_bytes: int = 0
    wall_time_s: float = 0.0
    compile_time_s: float = 0.0
    draft_forwards: int = 0
    proposed_draft_tokens: list[int] = field(default_factory=list)
    accepted_draft_tokens: list[int] = field(default_factory=list)
    target_row_forwards: list[int] = field(default_factory=list)
    evicted_tokens: list[int] = field(default_factory=list)
    thinking_tokens: list[int] = field(default_factory=list)
    early_exits: list[int] = field(default_factory=list)
    first_token_s: list[float] = field(default_factory=list)
    finish_s: list[float] = field(default_factory=list)
    slots: int = 0
    consistency: list = field(default_factory=list)

    @property
    def tokens_per_target_forward(self) -> float:
        """Mean tokens a row gains per target forward it joins (1 without speculation, up to k + 1)."""
        forwards = sum(self.target_row_forwards)
        return self.total_new_tokens / forwards if forwards else 0.0

    @property
    def draft_acceptance_rate(self) -> float:
        """Accepted over proposed draft tokens, all rows together (0 without speculation)."""
        proposed = sum(self.proposed_draft_tokens)
        return sum(self.accepted_draft_tokens) / proposed if proposed else 0.0

    @property
    def total_new_tokens(self) -> int:
        return sum(self.new_tokens)

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second of wall time over all rows, compilation excluded."""
        seconds = self.wall_time_s - self.compile_time_s
        return self.total_new_tokens / seconds if seconds > 0 else 0.0
