"""The draft model's KV cache obeys the target's KV budget: allocated for the limit, compacted with streaming
eviction, rolled back exactly; greedy output stays plain greedy token for token."""

from __future__ import annotations

import copy

import pytest
import torch
from test_speculative import repetitive_prompts

import effdecode
from effdecode import DecodeConfig
from effdecode.cache import KVGeometry
from effdecode.compression.kv_compressor import KVCompressor
from effdecode.generation import drafters
from effdecode.generation.drafters import DraftSchedule, ModelDrafter
from tiny_models import tiny_model

SMALL = dict(kv_budget=24, kv_window=8, kv_sinks=2, compress_every=8)
LIMIT = SMALL["kv_budget"] + SMALL["compress_every"]
NUM_DRAFT = 3
NEW = 72


def _generate(model, ids, mask, config, **kwargs):
    return effdecode.generate(
        model,
        ids,
        attention_mask=mask,
        max_new_tokens=NEW,
        do_sample=False,
        return_dict_in_generate=True,
        decode_config=config,
        **kwargs,
    )


def _draft(kind: str, model: torch.nn.Module) -> torch.nn.Module:
    """A weak draft (another random model) or a perfect one (a copy of the target)."""
    return tiny_model("llama", torch.float64, seed=1) if kind == "weak" else copy.deepcopy(model)


class DraftRecorder:
    """Watches the draft cache during a ``generate`` call.

    Records every draft forward's largest entry count after its writes (``peak``), and after every rollback
    each slot's consumed tokens, entry count and layer-0 keys (``snapshots``).
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.drafter: ModelDrafter | None = None
        self.peak = 0
        self.snapshots: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        forward, rollback = drafters.forward_logits, ModelDrafter.rollback

        def recording_forward(model, cache, batch, *args, **kwargs):
            if self.drafter is not None and cache is self.drafter.cache:
                after = batch.cache_lens[batch.rows.long()] + batch.q_lens
                self.peak = max(self.peak, int(after.max()))
            return forward(model, cache, batch, *args, **kwargs)

        def recording_rollback(drafter, rows, kept_lens):
            self.drafter = drafter
            rollback(drafter, rows, kept_lens)
            cache = drafter.cache
            self.snapshots.append((drafter.fed.clone(), cache.cache_lens.clone(), cache.keys[0].clone()))

        monkeypatch.setattr(drafters, "forward_logits", recording_forward)
        monkeypatch.setattr(ModelDrafter, "rollback", recording_rollback)

    def check_entries(self, draft: torch.nn.Module, ids, mask, sequences: torch.Tensor) -> None:
        """Every held entry is the layer-0 key of the row's token at some position below ``fed``, in position
        order without repeats, the newest being ``fed - 1``: no rejected draft, no stale entry stays."""
        width = ids.shape[1]
        for row in range(ids.shape[0]):
            prompt_len = int(mask[row].sum())
            tokens = torch.cat([ids[row, width - prompt_len :], sequences[row, width:]])
            with torch.inference_mode():
                cached = draft(input_ids=tokens[None], use_cache=True).past_key_values
            reference = cached.layers[0].keys[0].transpose(0, 1).flatten(1)  # [positions, kv_heads * D]
            for fed, lens, keys in self.snapshots:
                held = int(lens[row])
                assert 0 < held <= LIMIT
                entries = keys[row, :, :held].transpose(0, 1).flatten(1)  # [held, kv_heads * D]
                distance, position = (entries[:, None] - reference[None]).abs().amax(dim=2).min(dim=1)
                assert float(distance.max()) < 1e-9, (row, held)
                assert bool((position.diff() > 0).all()), (row, position.tolist())
                assert int(position[-1]) == int(fed[row]) - 1, (row, position.tolist(), int(fed[row]))


def _config() -> DecodeConfig:
    return DecodeConfig(kv_policy="streaming", **SMALL)


@pytest.mark.parametrize("kind", ["weak", "perfect"])
def test_greedy_with_an_evicting_draft_equals_plain_greedy(kind, monkeypatch):
    model = tiny_model("llama", torch.float64)
    ids, mask = repetitive_prompts(3, 12, seed=3)
    plain = _generate(model, ids, mask, _config())
    draft = _draft(kind, model)
    recorder = DraftRecorder(monkeypatch)
    out = _generate(model, ids, mask, _config(), assistant_model=draft, num_assistant_tokens=NUM_DRAFT)
    assert torch.equal(out.sequences, plain.sequences)
    assert out.stats.evicted_tokens == plain.stats.evicted_tokens
    assert min(out.stats.evicted_tokens) > NEW // 2  # several times the budget went through the cache
    # The draft cache holds at most the limit, and reached it (it was compacted, not just large enough).
    assert recorder.peak == LIMIT
    needed = 12 + NEW + NUM_DRAFT + 1  # the draft cache's capacity without eviction
    assert recorder.drafter.cache.capacity == KVCompressor.capacity_for(_config(), 12, needed) == LIMIT
    recorder.check_entries(draft, ids, mask, out.sequences)


def test_draft_cache_is_allocated_for_the_kv_limit():
    model = tiny_model("llama", torch.float64)
    draft = tiny_model("llama", torch.float64, seed=1)
    ids, mask = repetitive_prompts(3, 12, seed=3)
    kwargs = dict(assistant_model=draft, num_assistant_tokens=NUM_DRAFT)
    evicting = _generate(model, ids, mask, _config(), **kwargs)
    keeping = _generate(model, ids, mask, DecodeConfig(), **kwargs)
    target_only = _generate(model, ids, mask, _config())
    geometry = KVGeometry.from_config(draft.config)
    per_slot = geometry.bytes_per_token(torch.float64)
    full_capacity = 12 + NEW + NUM_DRAFT + 1
    # The draft cache (limit entries per row) and its entry positions (int32 per layer and kv head).
    draft_bytes = 3 * LIMIT * (per_slot + geometry.num_layers * geometry.kv_heads * 4)
    assert evicting.stats.kv_peak_bytes == target_only.stats.kv_peak_bytes + draft_bytes
    draft_saved = 3 * (full_capacity - LIMIT) * per_slot
    assert keeping.stats.kv_peak_bytes - evicting.stats.kv_peak_bytes >= draft_saved
    assert torch.equal(evicting.sequences, target_only.sequences)


def _paused_unless(drafting_rows: int, every: int):
    """``DraftSchedule.wanted`` for which rows ``>= drafting_rows`` draft only every ``every`` steps."""

    def wanted(self, rows):
        self.steps += 1
        return torch.where((rows < drafting_rows) | (self.steps % every == 0), self.lengths[rows], 0)

    return wanted


@pytest.mark.parametrize("pause", ["forced", "schedule"])
def test_rows_that_paused_drafting_for_long_resume_with_identical_output(pause, monkeypatch):
    """A paused row lacks more tokens than a compacted cache has room for: it catches up on the most recent
    ones, and its drafts are still verified to plain greedy."""
    model = tiny_model("llama", torch.float64)
    ids, mask = repetitive_prompts(3, 12, seed=4)
    plain = _generate(model, ids, mask, _config())
    if pause == "forced":  # row 0 drafts every step, rows 1-2 every 21 steps: 20+ tokens behind each time
        draft = copy.deepcopy(model)
        monkeypatch.setattr(DraftSchedule, "wanted", _paused_unless(1, 21))
    else:  # every row pauses after each probe; failed probes double the wait (8, 16, 32 steps)
        draft = tiny_model("llama", torch.float64, seed=1)
        monkeypatch.setattr(DraftSchedule, "PAUSE_BELOW", 100.0)
    recorder = DraftRecorder(monkeypatch)
    out = _generate(model, ids, mask, _config(), assistant_model=draft, num_assistant_tokens=NUM_DRAFT)
    assert torch.equal(out.sequences, plain.sequences)
    assert out.stats.evicted_tokens == plain.stats.evicted_tokens
    assert recorder.peak <= LIMIT
    recorder.check_entries(draft, ids, mask, out.sequences)
    if pause == "forced":
        # Drafting resumed after each pause, from a cache that skipped what did not fit: still useful.
        assert all(proposed > 0 for proposed in out.stats.proposed_draft_tokens)
        assert sum(out.stats.accepted_draft_tokens[1:]) > 0


def test_a_perfect_draft_stays_useful_after_compaction():
    model = tiny_model("llama", torch.float64)
    ids, mask = repetitive_prompts(3, 12, seed=3)
    out = _generate(
        model, ids, mask, _config(), assistant_model=copy.deepcopy(model), num_assistant_tokens=NUM_DRAFT
    )
    stats = out.stats
    assert sum(stats.accepted_draft_tokens) > 0
    # Most tokens come after the first compaction (the prompt and ~20 tokens fill the budget): a draft cache
    # that stopped helping there would leave about one token per target forward.
    per_forward = torch.tensor(stats.new_tokens) / torch.tensor(stats.target_row_forwards)
    assert float(per_forward.min()) > 1.5, per_forward
