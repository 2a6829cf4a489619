"""Options that only effdecode knows about (everything else is a regular ``generate`` argument)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import torch

from effdecode.consistency.checks import check_consistency_fields
from effdecode.ops.backend import BACKENDS

# CUDA graphs replay decode steps by default on CUDA once a GPU run (scripts/gpu_check.sh,
# tests/test_cuda_graphs.py) has shown the captured steps equal the eager ones; until then they are opt-in.
GRAPHS_BY_DEFAULT = False
KV_POLICIES = ("streaming", "h2o", "snapkv", "rkv")
EARLY_EXIT_MODES = ("deer",)
CONFIDENCE_MODES = ("mean", "geometric")

# A think string is given as text (tokenized with generate's ``tokenizer``) or as token ids.
ThinkMarker = str | Sequence[int] | None


@dataclass
class DecodeConfig:
    """effdecode-only decoding options.

    Given to :func:`effdecode.patch` (``config=``) or per call as
    ``model.generate(..., decode_config=DecodeConfig(...))``; a per-call config replaces the patched one.
    Wherever a DecodeConfig is taken, a dict of its fields is too (``decode_config={"kv_budget": 256}``).

    Parameters
    ----------
    attn_backend : str
        Attention implementation over the slot cache: ``"auto"`` (Triton on CUDA, the torch reference
        elsewhere), ``"torch"``, ``"triton"``, ``"cuda"`` (the compiled extension where it has the op,
        else Triton) or ``"flash_attn"`` (flash-attn's ``flash_attn_with_kvcache`` where it is installed and
        the call allows it: CUDA fp16/bf16, no attention scores for eviction; else as ``"auto"``; other ops
        run as ``"auto"``). The environment variable ``EFFDECODE_BACKEND`` overrides it for every op.
        A backend that cannot run here (``"cuda"`` on a CPU, ``"triton"`` without a GPU, ``"flash_attn"``
        not installed) gives one ``RuntimeWarning`` naming it and what runs instead.
    draft_length : str, optional
        ``"adaptive"``: in speculative decoding each row's draft length follows its own acceptance history
        (overrides ``num_assistant_tokens_schedule``). None follows the generate arguments.
    cuda_graphs : bool, optional
        Replay decode steps from CUDA graphs captured per row-count bucket (1, 2, 4, ... 256) and kept on the
        model across calls (``unpatch`` frees them). None: the default, off until the capture has been
        checked on a GPU (``GRAPHS_BY_DEFAULT``; the issue asks for on-by-default on CUDA). Steps that emit
        attention scores, prefill, draft-model and DEER probe forwards run eagerly.
    compile : bool
        Run the steady-state steps (decode, q_len 1; speculative verify, q_len 1 + k) as
        ``torch.compile(fullgraph=True, dynamic=False)`` functions over static buffers, one per (row bucket,
        q_len), kept on the model across calls (``unpatch`` frees them); on CUDA the compiled step is what the
        step's CUDA graph captures. The first step of each bucket compiles (seconds to a minute), reported as
        ``stats.compile_time_s`` and left out of ``stats.tokens_per_s``. Greedy plain decoding also takes the
        token choice into the compiled step. Steps that emit attention scores and prefill run eagerly.
    kv_budget : int, optional
        KV entries a row keeps per layer after a compaction; None keeps everything. A row holds at most
        ``kv_budget + compress_every`` entries (the cache is allocated for that; only a prompt longer than
        that is held whole until the first compaction right after prefill).
    kv_policy : str
        Which entries a compaction keeps besides the protected ones: ``"streaming"`` (attention sinks and the
        most recent entries), ``"h2o"`` (attention mass accumulated over every step), ``"snapkv"`` (attention
        of the last ``kv_window`` queries, max-pooled along the keys, per head) or ``"rkv"`` (that importance
        combined with key redundancy: keys with a near-duplicate newer key go first).
    kv_window : int
        Most recent entries a compaction always keeps (and the observation window of snapkv / rkv; with 0
        they count no decode query's attention: snapkv then keeps a row's newest entries, rkv ranks by key
        redundancy alone, and neither depends on what the other rows of the batch attended).
    kv_sinks : int
        First entries of a row always kept (attention sinks).
    compress_every : int
        A row is compacted back to ``kv_budget`` once it holds ``kv_budget + compress_every`` entries.
    kv_protect_prompt : bool
        Never evict prompt entries (they count toward the budget, which must then exceed the prompt).
    kv_think_only : bool
        Evict only entries inside the thinking span (``think_start``..``think_end``); other generated
        entries are evicted only when the thinking span alone cannot make room.
    thinking_budget : int, optional
        Thinking tokens a row may generate; then effdecode forces ``think_end_prefix`` + ``think_end`` and
        the row goes on to its answer.
    think_start, think_end : str or list[int], optional
        Markers of the thinking span, as text (tokenized with the ``tokenizer`` given to generate) or token
        ids. A row thinks from its open ``think_start`` (in the prompt or generated), or from its first new
        token when ``think_start`` is None. ``think_end`` is required by ``thinking_budget`` and
        ``early_exit``.
    think_end_prefix : str or list[int], optional
        Forced before ``think_end`` when the thinking budget runs out.
    early_exit : str, optional
        ``"deer"``: at thought boundaries probe a trial answer and end thinking when it is confident.
    early_exit_triggers : list of (str or list[int])
        Thought boundaries: after a row generates one of these, it probes.
    early_exit_probe : str or list[int]
        Appended for the trial answer; must contain ``think_end`` (it becomes the row's own text when the
        probe is confident).
    early_exit_replace_trigger : bool
        The probe replaces the trigger instead of following it (as the DEER paper does): a confident probe's
        text takes the trigger's place; otherwise the trigger is fed again and the row goes on. Appending
        (the default) leaves e.g. "Wait" right before ``think_end``, a context a model may never have seen.
    early_exit_answer_tokens : int
        Answer tokens decoded greedily per probe.
    early_exit_threshold : float
        Confidence at or above which thinking ends.
    early_exit_confidence : str
        ``"mean"`` of the answer tokens' max probabilities, or their ``"geometric"`` mean.
    max_slots : int or "auto", optional
        Continuous batching: at most this many rows hold KV slots at once. When there are more prompts, the
        first ``max_slots`` are decoded and each waiting prompt is admitted (in order, prefilled together
        with the others admitted in the same step) into a slot as soon as a row finishes. The result is
        the same tensor as without it. ``"auto"`` sizes the slot count from free memory and the per-row KV
        bytes (a row costs ``kv_budget + compress_every`` entries with ``kv_budget``); see
        :func:`effdecode.generation.slots.auto_slots`. None: every row gets a slot.
    answer : str, callable or (list[int], list[int]), optional
        How a finished row's answer is read (self-consistency, :mod:`effdecode.consistency`): a regex with
        exactly one group searched in the row's decoded new text (last match; needs ``tokenizer=``), a
        callable ``text -> hashable or None`` on that text (needs ``tokenizer=``), or token-id markers
        ``(start_ids, end_ids)`` (the ids after the last ``start_ids``, up to ``end_ids`` or the row's end).
        With ``num_return_sequences=k`` the answers of each prompt's k rows are voted: ``stats.consistency``.
    consistency : str, optional
        Stop a prompt's k rows early: ``"esc"`` (Early-Stopping Self-Consistency: the prompt stops once a
        window of ``consistency_window`` answers, in the order rows finish, all agree), ``"adaptive"``
        (Adaptive-Consistency, Beta criterion: stop once the posterior probability that the leading answer
        beats the runner-up is >= ``consistency_threshold``) or ``"confidence"`` (DeepConf-style: a row
        whose mean token log-probability over its last ``consistency_tokens`` tokens falls below a threshold
        calibrated on the prompt's first ``consistency_warmup`` finished rows stops; votes are weighted by
        confidence). Needs ``answer`` and ``num_return_sequences >= 2``.
    consistency_window : int
        ``"esc"``: answers per window (>= 1).
    consistency_threshold : float, optional
        ``"adaptive"``: posterior probability in (0.5, 1) (default 0.95); ``"confidence"``: the share of
        the warm-up rows' lowest window confidences a row must beat, in (0, 1] (default 0.9: the threshold
        is their 10th percentile, DeepConf-high).
    consistency_warmup : int
        ``"confidence"``: finished rows per prompt that calibrate its threshold (>= 1).
    consistency_tokens : int
        ``"confidence"``: tokens of the sliding window whose mean log-probability is a row's confidence.
    """

    attn_backend: str = "auto"
    draft_length: str | None = None
    cuda_graphs: bool | None = None
    compile: bool = False
    kv_budget: int | None = None
    kv_policy: str = "streaming"
    kv_window: int = 32
    kv_sinks: int = 4
    compress_every: int = 64
    kv_protect_prompt: bool = True
    kv_think_only: bool = False
    thinking_budget: int | None = None
    think_start: ThinkMarker = "<think>"
    think_end: ThinkMarker = "</think>"
    think_end_prefix: ThinkMarker = None
    early_exit: str | None = None
    early_exit_triggers: list = field(default_factory=lambda: ["Wait", "\n\n"])
    early_exit_probe: ThinkMarker = "\n</think>\n\nThe final answer is "
    early_exit_answer_tokens: int = 4
    early_exit_replace_trigger: bool = False
    early_exit_threshold: float = 0.95
    early_exit_confidence: str = "mean"
    max_slots: int | Literal["auto"] | None = None
    answer: Any = None
    consistency: str | None = None
    consistency_window: int = 4
    consistency_threshold: float | None = None
    consistency_warmup: int = 4
    consistency_tokens: int = 32

    def __post_init__(self) -> None:
        if self.attn_backend not in BACKENDS:
            raise ValueError(f"DecodeConfig.attn_backend={self.attn_backend!r}; expected one of {BACKENDS}")
        if self.max_slots is not None and self.max_slots != "auto":
            if isinstance(self.max_slots, bool) or not isinstance(self.max_slots, int) or self.max_slots < 1:
                raise ValueError(
                    f"DecodeConfig.max_slots={self.max_slots!r}; expected None, 'auto' or an int >= 1"
                )
        if not isinstance(self.compile, bool):
            raise ValueError(f"DecodeConfig.compile={self.compile!r}; expected True or False")
        if self.draft_length not in (None, "adaptive"):
            raise ValueError(f"DecodeConfig.draft_length={self.draft_length!r}; expected None or 'adaptive'")
        if self.kv_policy not in KV_POLICIES:
            raise ValueError(f"DecodeConfig.kv_policy={self.kv_policy!r}; expected one of {KV_POLICIES}")
        for name in ("kv_window", "kv_sinks"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"DecodeConfig.{name}={getattr(self, name)!r}; expected an int >= 0")
        if not isinstance(self.compress_every, int) or self.compress_every < 1:
            raise ValueError(f"DecodeConfig.compress_every={self.compress_every!r}; expected an int >= 1")
        if self.kv_budget is not None:
            if not isinstance(self.kv_budget, int) or self.kv_budget < 1:
                raise ValueError(f"DecodeConfig.kv_budget={self.kv_budget!r}; expected None or an int >= 1")
            if self.kv_budget < self.kv_sinks + self.kv_window:
                raise ValueError(
                    f"DecodeConfig.kv_budget={self.kv_budget} is smaller than kv_sinks + kv_window = "
                    f"{self.kv_sinks} + {self.kv_window}: the always-kept entries would not fit"
                )
        if self.thinking_budget is not None and (
            not isinstance(self.thinking_budget, int) or self.thinking_budget < 0
        ):
            raise ValueError(
                f"DecodeConfig.thinking_budget={self.thinking_budget!r}; expected None or an int >= 0"
            )
        if self.early_exit not in (None, *EARLY_EXIT_MODES):
            raise ValueError(
                f"DecodeConfig.early_exit={self.early_exit!r}; expected None or one of {EARLY_EXIT_MODES}"
            )
        if self.early_exit_confidence not in CONFIDENCE_MODES:
            raise ValueError(
                f"DecodeConfig.early_exit_confidence={self.early_exit_confidence!r}; "
                f"expected one of {CONFIDENCE_MODES}"
            )
        if not 0.0 <= self.early_exit_threshold <= 1.0:
            raise ValueError(
                f"DecodeConfig.early_exit_threshold={self.early_exit_threshold!r}; expected a value in [0, 1]"
            )
        if not isinstance(self.early_exit_answer_tokens, int) or self.early_exit_answer_tokens < 1:
            raise ValueError(
                f"DecodeConfig.early_exit_answer_tokens={self.early_exit_answer_tokens!r}; "
                "expected an int >= 1"
            )
        if (self.thinking_budget is not None or self.early_exit is not None) and self.think_end is None:
            raise ValueError("DecodeConfig.think_end is required by thinking_budget and early_exit")
        if self.early_exit is not None and not self.early_exit_triggers:
            raise ValueError("DecodeConfig.early_exit_triggers is empty: early_exit would never probe")
        check_consistency_fields(self)

    def graphs_on(self, device: torch.device) -> bool:
        """Whether decode steps on ``device`` replay CUDA graphs (emulated eagerly off CUDA if forced on)."""
        if self.cuda_graphs is None:
            return GRAPHS_BY_DEFAULT and device.type == "cuda"
        return bool(self.cuda_graphs)

    @property
    def compresses(self) -> bool:
        """Whether KV eviction is on."""
        return self.kv_budget is not None


def as_decode_config(value: Any, name: str = "decode_config") -> DecodeConfig | None:
    """``value`` as a :class:`DecodeConfig`: itself, one built from a dict of its fields, or None for None.

    Raises
    ------
    ValueError
        For a dict key that is not a DecodeConfig field (or a bad field value).
    TypeError
        For anything else than a DecodeConfig, a mapping or None.
    """
    if value is None or isinstance(value, DecodeConfig):
        return value
    if isinstance(value, Mapping):
        known = {f.name for f in fields(DecodeConfig)}
        unknown = sorted(str(key) for key in value if key not in known)
        if unknown:
            raise ValueError(
                f"{name} has unknown field(s) {unknown}; DecodeConfig's fields are {sorted(known)}"
            )
        return DecodeConfig(**value)
    raise TypeError(
        f"{name} must be an effdecode.DecodeConfig or a dict of its fields, got {type(value).__name__}"
    )
