"""KV eviction policies: which cache entries a row keeps when it is compacted to its budget.

:func:`select_keep` turns a policy's per-entry scores into the ``keep_index``/``keep_lens`` arguments of
:func:`effdecode.ops.compaction.compact_kv` (with one keep set per layer); :func:`protection_masks` builds the
entries a compaction must (sinks, recent window, prompt) or should (outside the thinking span) keep.

Policies (higher policy score = keep first):

- ``"streaming"`` (StreamingLLM, Xiao et al. 2023): recency. With the sinks and the recent window protected,
  a row keeps its first tokens (attention sinks) and its most recent ones.
- ``"h2o"`` (H2O, Zhang et al. 2023, "Heavy-Hitter Oracle"): the accumulated attention mass each entry
  received; heavy hitters stay.
- ``"snapkv"`` (SnapKV, Li et al. 2024): the attention mass max-pooled along the cache axis
  (:data:`SNAPKV_POOL` wide), so the neighbours of an important entry stay with it (attention clusters).
- ``"rkv"`` (R-KV, Cai et al. 2025, redundancy-aware KV compression for reasoning models): the SnapKV
  importance normalized to [0, 1] minus the entry's redundancy, its largest key cosine similarity with a
  newer entry; of near-duplicate keys the newest copy survives. Weighted by :data:`RKV_LAMBDA`.

Everything runs on the tensors' device, vectorised over layers, rows and heads, with no host sync.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["POLICIES", "RKV_LAMBDA", "SNAPKV_POOL", "protection_masks", "select_keep"]

POLICIES = ("streaming", "h2o", "snapkv", "rkv")

#: Width of SnapKV's max pooling along the cache axis (stride 1, centered).
SNAPKV_POOL = 7

#: R-KV's weight of importance against redundancy: score = RKV_LAMBDA * I - (1 - RKV_LAMBDA) * Rd. The R-KV
#: paper's default; redundancy dominates, importance orders the entries that are equally (non-)redundant.
RKV_LAMBDA = 0.1

# Largest float32 similarity block [chunk, C, C] that rkv materializes at once.
_RKV_CHUNK_BYTES = 512 << 20

# Sort key layout (int64, >= 0 for valid entries, -1 for invalid ones):
#   bits 61..62: tier (2 must keep, 1 prefer keep, 0 other)
#   bits 29..60: the float32 policy score mapped to an order-preserving uint32
#   bits  0..28: recency, the position relative to the newest valid entry of the (layer, row, head)
# Lexicographic (tier, score, position) order in one integer: exact (no float rounding can merge two distinct
# scores or let the recency term outweigh a score gap), and one topk selects the keep set.
_POS_BITS = 29
_SCORE_BITS = 32
_TIER_SHIFT = _POS_BITS + _SCORE_BITS


def _is_integer(t: torch.Tensor) -> bool:
    return not (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool)


def _check_budget(budget: int) -> None:
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget must be an int >= 1, got {budget!r}")


def _check_entry_tensor(name: str, t: torch.Tensor, shape: tuple[int, ...], device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape [L, R, H, C] = {list(shape)}, got {list(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, positions on {device}")


def _check_positions_lengths(positions: torch.Tensor, lengths: torch.Tensor) -> None:
    if not isinstance(positions, torch.Tensor) or positions.dim() != 4:
        shape = list(positions.shape) if isinstance(positions, torch.Tensor) else type(positions).__name__
        raise ValueError(f"positions must be an integer tensor [L, R, H, C], got {shape}")
    if not _is_integer(positions):
        raise ValueError(f"positions must be an integer tensor, got {positions.dtype}")
    num_rows = positions.shape[1]
    if not isinstance(lengths, torch.Tensor) or tuple(lengths.shape) != (num_rows,):
        shape = list(lengths.shape) if isinstance(lengths, torch.Tensor) else type(lengths).__name__
        raise ValueError(f"lengths must be an integer tensor [R] = [{num_rows}], got {shape}")
    if not _is_integer(lengths):
        raise ValueError(f"lengths must be an integer tensor, got {lengths.dtype}")
    if lengths.device != positions.device:
        raise ValueError(f"lengths is on {lengths.device}, positions on {positions.device}")


def _valid_mask(positions: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """bool ``[L, R, H, C]``: entry ``j`` of row ``r`` is held (``j < lengths[r]``)."""
    width = positions.shape[-1]
    index = torch.arange(width, device=positions.device)
    return index[None, None, None, :] < lengths.long()[None, :, None, None]


def _snapkv_pool(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Max-pool ``scores`` ``[N, C]`` along C over valid entries only; invalid outputs are -inf."""
    masked = torch.where(valid, scores, float("-inf"))  # invalid entries (and max_pool's padding) never win
    pooled = F.max_pool1d(masked[:, None, :], SNAPKV_POOL, stride=1, padding=SNAPKV_POOL // 2)[:, 0, :]
    return torch.where(valid, pooled, float("-inf"))


def _rkv_redundancy(keys: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Redundancy ``[N, C]``: max cosine of each key with a valid newer key, clamped to [0, 1].

    ``keys`` ``[N, C, D]``; the similarity is materialized in chunks of N of at most ``_RKV_CHUNK_BYTES``.
    """
    n, width, _ = keys.shape
    chunk = max(1, _RKV_CHUNK_BYTES // max(1, width * width * 4))
    out = torch.empty((n, width), dtype=torch.float32, device=keys.device)
    for start in range(0, n, chunk):
        k = keys[start : start + chunk].float()
        k = k / k.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # a zero key is similar to nothing
        sim = torch.bmm(k, k.transpose(1, 2))  # [n, C(j), C(i)]
        pos = positions[start : start + chunk]
        newer = valid[start : start + chunk, None, :] & (pos[:, None, :] > pos[:, :, None])
        # Filling with 0 folds the clamp at 0 in: no newer entry, or only dissimilar ones, means Rd = 0.
        sim.masked_fill_(~newer, 0.0)
        out[start : start + chunk] = sim.amax(dim=-1).clamp_(0.0, 1.0)
    return out


def _orderable_bits(score: torch.Tensor) -> torch.Tensor:
    """int64 in [0, 2**32), ordered like the float32 ``score`` (NaN counts as -inf, -0.0 as 0.0)."""
    score = torch.nan_to_num(score.float(), nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    bits = (score + 0.0).view(torch.int32).long()  # + 0.0 turns -0.0 into 0.0
    # IEEE floats order like sign-magnitude integers: flip the magnitude bits of negatives to make them
    # two's-complement ordered, then shift the signed range to [0, 2**32).
    bits = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return bits + (1 << 31)


def select_keep(
    policy: str,
    keys: torch.Tensor | None,
    scores: torch.Tensor | None,
    positions: torch.Tensor,
    lengths: torch.Tensor,
    must_keep: torch.Tensor,
    prefer_keep: torch.Tensor | None,
    budget: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose the cache entries each (layer, row, kv head) keeps when its row is compacted to ``budget``.

    Per (layer, row, head), over the valid entries ``j < lengths[r]``:

    1. every ``must_keep`` entry is kept first. If a row has more than ``budget`` of them, only the newest
       ``budget`` (largest position) are kept: the protection cannot be honoured, callers should size the
       budget above sinks + window (+ prompt);
    2. then the ``prefer_keep`` entries, highest policy score first;
    3. then the other entries, highest policy score first.

    Equal scores go to the newer entry (larger position); exactly ``min(budget, lengths[r])`` entries are
    kept. The selection is exact and deterministic: (tier, score, position) is packed into one int64 per
    entry (tier bits, then the float32 score's order-preserving bits, then 29 bits of recency), selected with
    ``topk`` and sorted. Preconditions (not checked, that would read the device): positions are distinct among
    a row/head's valid entries, and valid positions span less than ``2**29`` (older entries than that tie in
    recency), ``lengths[r] <= C``.

    Policy scores: ``"streaming"`` (StreamingLLM) ranks by position alone. ``"h2o"`` (H2O) uses ``scores``,
    the accumulated attention mass. ``"snapkv"`` (SnapKV) max-pools ``scores`` along the cache axis with a
    centered window of :data:`SNAPKV_POOL` (stride 1; invalid entries do not contribute). ``"rkv"`` (R-KV)
    scores ``RKV_LAMBDA * I - (1 - RKV_LAMBDA) * Rd``: ``I`` is the snapkv score over its maximum across the
    row/head's valid entries (0 when that maximum is not positive), ``Rd_j`` the largest cosine similarity
    (float32, over head_dim) of key ``j`` with the key of any valid entry of larger position, clamped to
    [0, 1] (0 for the newest entry). Rd costs ``O(C**2 * D)`` per (layer, row, head), as a batched matmul
    whose ``[chunk, C, C]`` float32 similarity is kept under 512 MiB by chunking over (layer, row, head).

    Parameters
    ----------
    policy : str
        ``"streaming"``, ``"h2o"``, ``"snapkv"`` or ``"rkv"``.
    keys : torch.Tensor or None
        Floating ``[L, R, H, C, D]``, the cached keys of the rows; needed by ``"rkv"`` only.
    scores : torch.Tensor or None
        float32 ``[L, R, H, C]``, attention mass per entry; needed by every policy but ``"streaming"``.
    positions : torch.Tensor
        Integer ``[L, R, H, C]``, RoPE position of each entry (larger = newer).
    lengths : torch.Tensor
        Integer ``[R]``, entries held per row; entries ``j >= lengths[r]`` are ignored (may hold garbage).
    must_keep : torch.Tensor
        bool ``[L, R, H, C]``, entries always kept (sinks, recent window, protected prompt).
    prefer_keep : torch.Tensor or None
        bool ``[L, R, H, C]``, entries kept before any other candidate (``None``: none).
    budget : int
        Entries each row keeps, ``>= 1``.

    Returns
    -------
    keep_index : torch.Tensor
        int32 ``[L, R, H, budget]``: per (layer, row, head) the kept cache indices, strictly increasing in the
        first ``keep_lens[r]`` entries, then zeros.
    keep_lens : torch.Tensor
        int32 ``[R]``, ``min(budget, lengths[r])``.

    Raises
    ------
    ValueError
        On an unknown policy, a budget below 1, a missing ``scores``/``keys`` the policy needs, or a tensor of
        the wrong shape, dtype or device (checked from metadata only).
    """
    _check_select_inputs(policy, keys, scores, positions, lengths, must_keep, prefer_keep, budget)
    shape = tuple(positions.shape)
    layers, num_rows, heads, width = shape
    n = layers * num_rows * heads
    lengths_c = lengths.long().clamp(0, width)
    valid = _valid_mask(positions, lengths_c).expand(shape).reshape(n, width)
    pos = positions.long().reshape(n, width)
    must = must_keep.reshape(n, width) & valid
    tier = must.long() * 2
    if prefer_keep is not None:
        tier = torch.where(~must & prefer_keep.reshape(n, width), 1, tier)
    score_bits = _policy_score_bits(policy, keys, scores, pos, valid)
    # Must-keep entries rank by recency alone (the newest of them win if they overflow the budget).
    score_bits = torch.where(must, 0, score_bits)
    keep_index = _top_entries(tier, score_bits, pos, valid, budget)
    keep_lens = lengths_c.clamp(max=budget).to(torch.int32)
    return keep_index.reshape(layers, num_rows, heads, budget), keep_lens


def _check_select_inputs(
    policy: str,
    keys: torch.Tensor | None,
    scores: torch.Tensor | None,
    positions: torch.Tensor,
    lengths: torch.Tensor,
    must_keep: torch.Tensor,
    prefer_keep: torch.Tensor | None,
    budget: int,
) -> None:
    """The ``ValueError`` checks of :func:`select_keep`, from metadata only (no device read)."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    _check_budget(budget)
    _check_positions_lengths(positions, lengths)
    shape = tuple(positions.shape)
    device = positions.device
    for name, mask in (("must_keep", must_keep), ("prefer_keep", prefer_keep)):
        if mask is None and name == "prefer_keep":
            continue
        _check_entry_tensor(name, mask, shape, device)
        if mask.dtype != torch.bool:
            raise ValueError(f"{name} must be bool, got {mask.dtype}")
    if policy != "streaming":
        if scores is None:
            raise ValueError(f"policy {policy!r} needs scores (attention mass per entry), got None")
        _check_entry_tensor("scores", scores, shape, device)
        if scores.dtype != torch.float32:
            raise ValueError(f"scores must be float32, got {scores.dtype}")
    if policy == "rkv":
        if keys is None:
            raise ValueError("policy 'rkv' needs keys (the cached keys of the rows), got None")
        if not isinstance(keys, torch.Tensor) or keys.dim() != 5 or tuple(keys.shape[:4]) != shape:
            got = list(keys.shape) if isinstance(keys, torch.Tensor) else type(keys).__name__
            raise ValueError(f"keys must have shape [L, R, H, C, D] = {list(shape)} + [D], got {got}")
        if not keys.dtype.is_floating_point:
            raise ValueError(f"keys must be a floating tensor, got {keys.dtype}")
        if keys.device != device:
            raise ValueError(f"keys is on {keys.device}, positions on {device}")


def _policy_score_bits(
    policy: str,
    keys: torch.Tensor | None,
    scores: torch.Tensor | None,
    pos: torch.Tensor,
    valid: torch.Tensor,
) -> torch.Tensor:
    """int64 ``[N, C]``: the policy's score of each entry as order-preserving bits (0 for streaming)."""
    n, width = pos.shape
    if policy == "streaming":
        return torch.zeros((n, width), dtype=torch.int64, device=pos.device)  # recency bits decide
    flat_scores = scores.reshape(n, width)
    if policy == "h2o":
        return _orderable_bits(flat_scores)
    score = _snapkv_pool(flat_scores, valid)
    if policy == "rkv":
        peak = score.amax(dim=-1, keepdim=True)  # -inf for a row without valid entries
        tiny = torch.finfo(torch.float32).tiny
        importance = torch.where(peak > 0, score / peak.clamp_min(tiny), 0.0)
        redundancy = _rkv_redundancy(keys.reshape(n, width, keys.shape[-1]), pos, valid)
        score = RKV_LAMBDA * importance - (1.0 - RKV_LAMBDA) * redundancy
    return _orderable_bits(score)


def _top_entries(
    tier: torch.Tensor, score_bits: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor, budget: int
) -> torch.Tensor:
    """int32 ``[N, budget]``: the kept indices per (layer, row, head), increasing, then zeros.

    (tier, score, recency) is packed into one int64 key per entry and the top ``budget`` keys are taken.
    """
    n, width = pos.shape
    # Recency relative to the newest valid entry, so that any absolute position fits the 29 bits.
    newest = torch.where(valid, pos, torch.iinfo(torch.int64).min).amax(dim=-1, keepdim=True)
    recency = torch.where(valid, pos - (newest - ((1 << _POS_BITS) - 1)), 0).clamp_(0, (1 << _POS_BITS) - 1)
    key = (tier << _TIER_SHIFT) | (score_bits << _POS_BITS) | recency
    key = torch.where(valid, key, -1)
    k = min(budget, width)
    top_key, top_index = torch.topk(key, k, dim=-1, sorted=False)
    # Invalid picks (rows shorter than the budget) sort to the end as `width`, then read 0.
    top_index = torch.where(top_key >= 0, top_index, width)
    top_index = torch.sort(top_index, dim=-1).values
    top_index = torch.where(top_index < width, top_index, 0)
    keep_index = torch.zeros((n, budget), dtype=torch.int32, device=pos.device)
    keep_index[:, :k] = top_index
    return keep_index


def protection_masks(
    positions: torch.Tensor,
    lengths: torch.Tensor,
    next_positions: torch.Tensor,
    prompt_lens: torch.Tensor,
    think_spans: torch.Tensor,
    sinks: int,
    window: int,
    protect_prompt: bool,
    think_only: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Entries a compaction must keep and, with ``think_only``, those it keeps before thinking entries.

    ``must_keep = valid & (position < sinks | position >= next_position - window
    | (protect_prompt & position < prompt_len))``: the attention sinks (StreamingLLM), the recent window (the
    observation window of SnapKV/R-KV) and optionally the prompt. ``prefer_keep = valid & ~(start <= position
    < end)``: with ``think_only`` only the thinking span is evicted while it can make room.

    Parameters
    ----------
    positions : torch.Tensor
        Integer ``[L, R, H, C]``, RoPE position of each entry.
    lengths : torch.Tensor
        Integer ``[R]``, entries held per row (``j >= lengths[r]`` is invalid).
    next_positions : torch.Tensor
        Integer ``[R]``, each row's next RoPE position (its newest entry sits at ``next_positions[r] - 1``).
    prompt_lens : torch.Tensor
        Integer ``[R]``, real prompt tokens (positions ``0 .. prompt_lens[r] - 1``).
    think_spans : torch.Tensor
        Integer ``[R, 2]``, ``(start, end)`` positions of the thinking span, end exclusive (``end`` large
        while the row still thinks; ``start = end = 0`` without a span).
    sinks, window : int
        First positions and most recent positions always kept, ``>= 0``.
    protect_prompt : bool
        Keep every prompt entry.
    think_only : bool
        Return ``prefer_keep`` for the entries outside the thinking span; ``None`` otherwise.

    Returns
    -------
    must_keep : torch.Tensor
        bool ``[L, R, H, C]``.
    prefer_keep : torch.Tensor or None
        bool ``[L, R, H, C]`` when ``think_only``, else ``None``.
    """
    _check_positions_lengths(positions, lengths)
    num_rows = positions.shape[1]
    device = positions.device
    for name, t, shape in (
        ("next_positions", next_positions, (num_rows,)),
        ("prompt_lens", prompt_lens, (num_rows,)),
        ("think_spans", think_spans, (num_rows, 2)),
    ):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
            got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be an integer tensor {list(shape)}, got {got}")
        if not _is_integer(t):
            raise ValueError(f"{name} must be an integer tensor, got {t.dtype}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}, positions on {device}")
    for name, value in (("sinks", sinks), ("window", window)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")

    def per_row(t: torch.Tensor) -> torch.Tensor:
        return t.long()[None, :, None, None]

    pos = positions.long()
    valid = _valid_mask(positions, lengths)
    protected = (pos < sinks) | (pos >= per_row(next_positions) - window)
    if protect_prompt:
        protected = protected | (pos < per_row(prompt_lens))
    must_keep = valid & protected
    if not think_only:
        return must_keep, None
    in_span = (pos >= per_row(think_spans[:, 0])) & (pos < per_row(think_spans[:, 1]))
    return must_keep, valid & ~in_span
