"""KV eviction in the engine, thinking budgets and DEER early exit, end to end on tiny models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_speculative import repetitive_prompts

import effdecode
from effdecode import DecodeConfig
from effdecode.cache import KVGeometry, SlotKVCache
from effdecode.compression.kv_compressor import KVCompressor
from tiny_models import ragged_prompts, tiny_model

POLICIES = ["streaming", "h2o", "snapkv", "rkv"]
SMALL = dict(kv_budget=24, kv_window=8, kv_sinks=2, compress_every=8)


def _generate(model, ids, mask, new, config=None, **kwargs):
    return effdecode.generate(
        model,
        ids,
        attention_mask=mask,
        max_new_tokens=new,
        do_sample=False,
        return_dict_in_generate=True,
        decode_config=config or DecodeConfig(),
        **kwargs,
    )


@pytest.mark.parametrize("policy", POLICIES)
def test_budget_above_the_sequence_changes_nothing(policy):
    model = tiny_model("qwen2", torch.float64)
    ids, mask = ragged_prompts(3, 10, seed=2)
    plain = _generate(model, ids, mask, 30)
    roomy = _generate(model, ids, mask, 30, DecodeConfig(kv_budget=64, kv_policy=policy))
    assert torch.equal(plain.sequences, roomy.sequences)
    assert roomy.stats.evicted_tokens == [0, 0, 0]


def _streaming_schedule(prompt_len: int, new_tokens: int, cfg: DecodeConfig):
    """The rule written out: per fed token, the cache positions it sees; and the entries evicted."""
    limit = cfg.kv_budget + cfg.compress_every
    cache = list(range(prompt_len))
    visible, evicted = {}, 0
    for position in range(prompt_len, prompt_len + new_tokens - 1):  # the last chosen token is never fed
        if len(cache) >= limit:
            must = [
                p
                for p in cache
                if p < cfg.kv_sinks
                or p >= position - cfg.kv_window
                or (cfg.kv_protect_prompt and p < prompt_len)
            ]
            others = [p for p in cache if p not in must]
            room = cfg.kv_budget - len(must)
            kept = sorted(must + others[len(others) - room :])
            evicted += len(cache) - len(kept)
            cache = kept
        cache.append(position)
        visible[position] = list(cache)
    return visible, evicted


@pytest.mark.parametrize("protect_prompt,prompt_width", [(True, 12), (False, 12), (False, 40)])
def test_streaming_eviction_matches_attention_over_the_kept_entries(protect_prompt, prompt_width):
    """Each generated token is the argmax of a full forward masked to exactly the entries the rule keeps."""
    model = tiny_model("llama", torch.float64, attn_implementation="eager")
    # A 40-token prompt is longer than the limit (32): held whole by prefill, compacted before the first step.
    ids, mask = ragged_prompts(3, prompt_width, seed=5, min_len=4)
    cfg = DecodeConfig(kv_policy="streaming", kv_protect_prompt=protect_prompt, **SMALL)
    out = _generate(model, ids, mask, 50, cfg)
    width = ids.shape[1]
    for row in range(3):
        prompt_len = int(mask[row].sum())
        new = out.stats.new_tokens[row]
        tokens = torch.cat([ids[row, width - prompt_len :], out.sequences[row, width : width + new]])
        visible, evicted = _streaming_schedule(prompt_len, new, cfg)
        assert out.stats.evicted_tokens[row] == evicted > 0
        total = prompt_len + new
        allowed = torch.tril(torch.ones(total, total, dtype=torch.bool))
        for position, seen in visible.items():
            allowed[position] = False
            allowed[position, seen] = True
        additive = torch.zeros(1, 1, total, total, dtype=torch.float64)
        additive.masked_fill_(~allowed, torch.finfo(torch.float64).min)
        with torch.no_grad():
            logits = model(tokens[None], attention_mask=additive).logits[0]
        want = logits[prompt_len - 1 : total - 1].argmax(dim=-1)
        assert torch.equal(want, tokens[prompt_len:])
    assert out.stats.kv_peak_tokens == max(cfg.kv_budget + cfg.compress_every, int(mask.sum(dim=1).max()))


@pytest.mark.parametrize("policy", POLICIES)
def test_every_row_keeps_its_budget(policy):
    model = tiny_model("mistral", torch.float32)
    ids, mask = ragged_prompts(4, 10, seed=7, min_len=3)
    cfg = DecodeConfig(kv_policy=policy, **SMALL)
    seen_lens = []
    original = KVCompressor.compact

    def recording(self, rows):
        original(self, rows)
        seen_lens.append(self.cache.cache_lens.clone())

    KVCompressor.compact = recording
    try:
        out = _generate(model, ids, mask, 48, cfg)
    finally:
        KVCompressor.compact = original
    limit = cfg.kv_budget + cfg.compress_every
    assert out.stats.kv_peak_tokens == limit
    assert seen_lens and max(int(lens.max()) for lens in seen_lens) <= limit
    # Rows of different lengths evict by their own schedule: (entries ever held - final) is a multiple of
    # compress_every per compaction.
    for row, evicted in enumerate(out.stats.evicted_tokens):
        held = int(mask[row].sum()) + out.stats.new_tokens[row] - 1
        _, want = _streaming_schedule(int(mask[row].sum()), out.stats.new_tokens[row], cfg)
        assert evicted == want, (row, held)
    # The cache is allocated for the limit, not for the whole sequence.
    geometry = KVGeometry.from_config(model.config)
    assert out.stats.kv_peak_bytes < 4 * (10 + 48) * geometry.bytes_per_token(torch.float32)


@pytest.mark.parametrize("drafter", ["ngram", "perfect", "weak"])
@pytest.mark.parametrize("policy", POLICIES)
def test_speculation_keeps_the_eviction_schedule(drafter, policy):
    # Score-based policies count only the kept tokens' attention (rejected drafts' queries add nothing), so
    # they select the same entries as plain decoding.
    model = tiny_model("llama", torch.float64)
    ids, mask = repetitive_prompts(3, 12, seed=3)
    cfg = DecodeConfig(kv_policy=policy, **SMALL)
    plain = _generate(model, ids, mask, 44, cfg)
    kwargs = {
        "ngram": dict(prompt_lookup_num_tokens=3),
        "perfect": dict(assistant_model=model),
        "weak": dict(assistant_model=tiny_model("llama", torch.float64, seed=1)),
    }[drafter]
    spec = _generate(model, ids, mask, 44, cfg, **kwargs)
    assert torch.equal(plain.sequences, spec.sequences)
    assert spec.stats.evicted_tokens == plain.stats.evicted_tokens
    assert spec.stats.kv_peak_tokens <= cfg.kv_budget + cfg.compress_every
    assert (
        sum(spec.stats.proposed_draft_tokens) > sum(spec.stats.accepted_draft_tokens) or drafter == "perfect"
    )
    if drafter == "perfect":
        assert sum(spec.stats.accepted_draft_tokens) > 0


def _triton_schedule_case(policy: str, device: str, new_tokens: int, draft: bool):
    model = tiny_model("llama", torch.float32).to(device)
    ids, mask = repetitive_prompts(2, 12, seed=5)
    ids, mask = ids.to(device), mask.to(device)
    cfg = DecodeConfig(kv_policy=policy, attn_backend="triton", kv_protect_prompt=False, **SMALL)
    kwargs = (
        dict(assistant_model=tiny_model("llama", torch.float32, seed=1).to(device))
        if draft
        else dict(prompt_lookup_num_tokens=3)
    )
    plain = _generate(model, ids, mask, new_tokens, cfg)
    spec = _generate(model, ids, mask, new_tokens, cfg, **kwargs)
    assert sum(spec.stats.evicted_tokens) > 0
    assert sum(spec.stats.proposed_draft_tokens) > sum(spec.stats.accepted_draft_tokens)
    return plain, spec


def test_speculation_keeps_the_eviction_schedule_with_triton_attention():
    # The Triton kernels (interpreted here: kept small) record the verify forward's log-sum-exp, then score
    # the kept tokens only.
    plain, spec = _triton_schedule_case("h2o", "cpu", 24, draft=False)
    assert torch.equal(plain.sequences, spec.sequences)
    assert spec.stats.evicted_tokens == plain.stats.evicted_tokens


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("policy", ["h2o", "snapkv", "rkv"])
def test_speculation_keeps_the_eviction_schedule_with_triton_attention_on_gpu(policy):
    plain, spec = _triton_schedule_case(policy, "cuda", 60, draft=True)
    assert torch.equal(plain.sequences, spec.sequences)
    assert spec.stats.evicted_tokens == plain.stats.evicted_tokens


def test_compaction_protects_prompt_sinks_window_and_prefers_outside_thinking():
    geometry = KVGeometry(num_layers=2, kv_heads=2, head_dim=4)
    cache = SlotKVCache(geometry, 2, 40, torch.float32, torch.device("cpu"))
    cache.key_buffer.normal_()
    prompt_lens = torch.tensor([5, 3], dtype=torch.int32)
    spans = torch.tensor([[5, 20], [3, 1 << 62]])  # row 0 stopped thinking at 20, row 1 still thinks
    cfg = DecodeConfig(kv_budget=16, kv_window=4, kv_sinks=2, compress_every=8, kv_think_only=True)
    compressor = KVCompressor(cfg, cache, prompt_lens, lambda: spans)
    compressor.advance(np.array([0, 1]), np.array([19, 21]))  # both rows at the limit (24)
    cache.cache_lens.copy_(torch.tensor([24, 24], dtype=torch.int32))
    cache.positions.copy_(torch.tensor([24, 24]))
    compressor.compact(compressor.due(np.array([0, 1])))
    kept = compressor.entry_positions[:, :, :, :16]
    assert cache.cache_lens.tolist() == [16, 16] and compressor.evicted.tolist() == [8, 8]
    row0 = set(kept[0, 0, 0].tolist())
    # Prompt 0-4, answer 20-23 (outside the span, also the window), then the newest thinking entries.
    assert row0 == set(range(5)) | set(range(20, 24)) | set(range(13, 20))
    row1 = set(kept[0, 1, 0].tolist())
    assert row1 == set(range(3)) | set(range(11, 24))
    assert torch.equal(kept[0], kept[1])  # streaming: every layer and head alike


def test_thinking_budget_forces_the_end_and_the_answer_continues():
    model = tiny_model("llama", torch.float64)
    ids, mask = ragged_prompts(3, 10, seed=1)
    budget, forced = 5, [5, 6, 7]
    cfg = DecodeConfig(thinking_budget=budget, think_start=None, think_end=[7], think_end_prefix=[5, 6])
    out = _generate(model, ids, mask, 30, cfg)
    width = ids.shape[1]
    assert out.stats.thinking_tokens == [budget] * 3
    for row in range(3):
        new = out.sequences[row, width:]
        assert new[budget : budget + 3].tolist() == forced
        # The answer is what the model writes after that text, as if it had been the prompt.
        prefix = torch.cat([ids[row, width - int(mask[row].sum()) :], new[: budget + 3]])[None]
        cont = effdecode.generate(model, prefix, max_new_tokens=30 - budget - 3, do_sample=False)
        assert torch.equal(cont[0, prefix.shape[1] :], new[budget + 3 :])


def test_thinking_starts_at_an_open_think_tag_in_the_prompt_and_stops_at_the_end_tag():
    model = tiny_model("llama", torch.float64)
    ids, mask = ragged_prompts(2, 8, seed=4, min_len=8)
    plain = _generate(model, ids, mask, 12)
    seen = set(plain.sequences[1].tolist())
    start = next(t for t in range(1, 300) if t not in seen and t != 7)
    ids[0, -1] = start  # row 0 opens a span; row 1 never does
    cfg = DecodeConfig(thinking_budget=3, think_start=[start], think_end=[7])
    out = _generate(model, ids, mask, 12, cfg)
    assert out.stats.thinking_tokens == [3, 0]
    assert out.sequences[0, 8 + 3].item() == 7
    assert torch.equal(out.sequences[1], plain.sequences[1])


def _rigged(scale: float):
    """A model whose distributions are sharp (scale >> 1) or nearly uniform (scale << 1); argmax unchanged."""
    model = tiny_model("llama", torch.float64)
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    return model


def _deer_config(triggers, replace: bool = False, **kv) -> DecodeConfig:
    return DecodeConfig(
        early_exit="deer",
        think_start=None,
        think_end=[7],
        early_exit_triggers=triggers,
        early_exit_probe=[5, 7, 6],
        early_exit_answer_tokens=2,
        early_exit_threshold=0.9,
        early_exit_replace_trigger=replace,
        **kv,
    )


def test_early_exit_ends_thinking_when_the_probe_is_confident():
    model = _rigged(50.0)
    ids, mask = ragged_prompts(3, 10, seed=1)
    plain = _generate(model, ids, mask, 30)
    width = ids.shape[1]
    trigger = plain.sequences[0, width + 2].item()  # row 0's third token
    out = _generate(model, ids, mask, 30, _deer_config([[trigger]]))
    assert out.stats.early_exits[0] == 1
    new = out.sequences[0, width:]
    cut = int((plain.sequences[0, width:] == trigger).nonzero()[0]) + 1
    assert torch.equal(new[:cut], plain.sequences[0, width : width + cut])
    assert new[cut : cut + 3].tolist() == [5, 7, 6]
    assert out.stats.thinking_tokens[0] == cut
    prefix = torch.cat([ids[0, width - int(mask[0].sum()) :], new[: cut + 3]])[None]
    cont = effdecode.generate(model, prefix, max_new_tokens=30 - cut - 3, do_sample=False)
    assert torch.equal(cont[0, prefix.shape[1] :], new[cut + 3 :])
    for row in (1, 2):  # rows without the trigger decode exactly as without early exit
        if trigger not in plain.sequences[row, width:].tolist():
            assert torch.equal(out.sequences[row], plain.sequences[row])
            assert out.stats.early_exits[row] == 0


def test_early_exit_never_fires_when_the_probe_is_unconfident():
    model = _rigged(1e-3)
    ids, mask = ragged_prompts(3, 10, seed=1)
    plain = _generate(model, ids, mask, 30)
    width = ids.shape[1]
    triggers = [[plain.sequences[row, width + 1].item()] for row in range(3)]
    out = _generate(model, ids, mask, 30, _deer_config(triggers))
    assert out.stats.early_exits == [0, 0, 0]
    assert torch.equal(out.sequences, plain.sequences)  # every probe rolled back exactly
    assert max(out.stats.target_row_forwards) > 30  # the probes did run
    assert out.stats.thinking_tokens == _thinking_tokens(plain.sequences[:, width:])


def _thinking_tokens(new: torch.Tensor, end: int = 7) -> list[int]:
    """Thinking tokens of rows that think from their first new token until ``end`` (included)."""
    rows = new.tolist()
    return [row.index(end) + 1 if end in row else len(row) for row in rows]


@pytest.mark.parametrize("replace", [False, True])
def test_a_probe_rolled_back_at_the_budget_forces_the_end(replace):
    # Row 0's trigger is its 4th token, its budget's last: the probe rolls back, and the row is forced at once
    # (appended probe) or right after its trigger is fed again (replacing probe), never a 5th thinking token.
    model = _rigged(1e-3)
    ids, mask = ragged_prompts(3, 10, seed=1)
    plain = _generate(model, ids, mask, 20)
    width = ids.shape[1]
    trigger = plain.sequences[0, width + 3].item()
    cfg = _replace_config([[trigger]]) if replace else _deer_config([[trigger]])
    cfg.thinking_budget = 4
    cfg.think_end_prefix = [5, 6]
    out = _generate(model, ids, mask, 20, cfg)
    assert out.stats.early_exits == [0, 0, 0]
    new = out.sequences[0, width:]
    assert torch.equal(new[:4], plain.sequences[0, width : width + 4])
    assert new[4:7].tolist() == [5, 6, 7]
    assert out.stats.thinking_tokens[0] == 4


def test_early_exit_with_eviction_keeps_the_budget():
    model = _rigged(1e-3)
    ids, mask = ragged_prompts(2, 10, seed=1)
    plain = _generate(model, ids, mask, 40, DecodeConfig(kv_policy="h2o", **SMALL))
    width = ids.shape[1]
    triggers = [[plain.sequences[0, width + k].item()] for k in (3, 11, 19)]
    cfg = _deer_config(triggers)
    for name, value in SMALL.items():
        setattr(cfg, name, value)
    cfg.kv_policy = "h2o"
    out = _generate(model, ids, mask, 40, cfg)
    assert torch.equal(out.sequences, plain.sequences)
    assert out.stats.evicted_tokens == plain.stats.evicted_tokens


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(kv_budget=8, kv_sinks=4, kv_window=8), "kv_sinks \\+ kv_window"),
        (dict(kv_budget=64, kv_policy="lru"), "kv_policy"),
        (dict(compress_every=0), "compress_every"),
        (dict(early_exit="deer", early_exit_triggers=[]), "early_exit_triggers"),
        (dict(early_exit="sometimes"), "early_exit"),
        (dict(thinking_budget=-1), "thinking_budget"),
    ],
)
def test_bad_config_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DecodeConfig(**kwargs)


def test_bad_call_raises():
    model = tiny_model("llama")
    ids, mask = ragged_prompts(2, 10, seed=1)
    with pytest.raises(ValueError, match="tokenizer"):
        _generate(model, ids, mask, 4, DecodeConfig(thinking_budget=8))
    with pytest.raises(ValueError, match="protected prompt"):
        _generate(model, ids, mask, 4, DecodeConfig(kv_budget=12, kv_window=4))
    with pytest.raises(ValueError, match="think_end"):
        _generate(
            model,
            ids,
            mask,
            4,
            DecodeConfig(
                early_exit="deer",
                think_start=None,
                think_end=[7],
                early_exit_probe=[5],
                early_exit_triggers=[[3]],
            ),
        )


def _replace_config(triggers):
    cfg = _deer_config(triggers)
    cfg.early_exit_replace_trigger = True
    return cfg


def test_replacing_probe_takes_the_triggers_place_when_confident():
    model = _rigged(50.0)
    ids, mask = ragged_prompts(3, 10, seed=1)
    plain = _generate(model, ids, mask, 30)
    width = ids.shape[1]
    trigger = plain.sequences[0, width + 2 : width + 4].tolist()  # a two-token trigger: row 0's tokens 3-4
    out = _generate(model, ids, mask, 30, _replace_config([trigger]))
    assert out.stats.early_exits[0] == 1
    new = out.sequences[0, width:]
    assert torch.equal(new[:2], plain.sequences[0, width : width + 2])  # the trigger itself is gone
    assert new[2:5].tolist() == [5, 7, 6]
    assert out.stats.thinking_tokens[0] == 2
    prefix = torch.cat([ids[0, width - int(mask[0].sum()) :], new[:5]])[None]
    cont = effdecode.generate(model, prefix, max_new_tokens=30 - 5, do_sample=False)
    assert torch.equal(cont[0, prefix.shape[1] :], new[5:])


@pytest.mark.parametrize("kv", [False, True])
def test_replacing_probe_rolls_back_exactly_when_unconfident(kv):
    model = _rigged(1e-3)
    ids, mask = ragged_prompts(3, 10, seed=1)
    base = DecodeConfig(kv_policy="h2o", **SMALL) if kv else DecodeConfig()
    plain = _generate(model, ids, mask, 40, base)
    width = ids.shape[1]
    triggers = [plain.sequences[row, width + 1 : width + 3].tolist() for row in range(3)]
    cfg = _replace_config(triggers + [[plain.sequences[0, width + 20].item()]])
    if kv:
        for name, value in SMALL.items():
            setattr(cfg, name, value)
        cfg.kv_policy = "h2o"
    out = _generate(model, ids, mask, 40, cfg)
    assert out.stats.early_exits == [0, 0, 0]
    assert torch.equal(out.sequences, plain.sequences)  # the trigger was fed again, nothing else changed
    assert out.stats.thinking_tokens == _thinking_tokens(plain.sequences[:, width:])
    assert out.stats.evicted_tokens == plain.stats.evicted_tokens
    assert max(out.stats.target_row_forwards) > 40
