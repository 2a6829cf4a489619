"""Every family in effdecode.families.SUPPORTED, on its tiny random model: the checks its entry claims.

Parametrized from the registry, so the README's support table (written from the same registry) states exactly
what runs here:

- greedy: token-identical to transformers' ``generate`` at batch 1, 3 and 8 with ragged prompts; at batch 8
  with EOS ids that end rows at different steps.
- speculation: n-gram speculative greedy, and greedy with a draft model, give the same tokens as plain
  greedy (= HF's).
- eviction: a small ``kv_budget`` evicts entries and generation completes at full length.
- thinking: a thinking budget ends each row's thinking with the forced end marker.

Models are float64, except for families compared with HF's eager attention (soft-capping, sinks: SDPA cannot
run them exactly): HF's eager softmax runs in float32, where a float64 mask minimum becomes -inf and
left-padded rows turn into NaN, so HF itself cannot be the oracle in float64 there; they are compared in
float32.
"""

from __future__ import annotations

import copy
import functools
import warnings

import pytest
import torch

import effdecode
from effdecode import DecodeConfig
from effdecode.families import FALLBACK, SUPPORTED
from tiny_models import FAMILY_VOCAB, PAD, family_available, ragged_prompts, tiny_family_model

NEW = 8  # new tokens per row
WIDTH = 7  # prompt width

# The families issue 16 names run in every test session; the further standard families are marked slow
# (``-m "not slow"`` skips them for a quick run; CI runs them all).
NAMED = {
    "llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "gpt_oss", "phi3", "olmo3", "smollm3", "exaone4",
    "gemma2", "gemma3_text", "mixtral", "granite", "glm4", "seed_oss",
}  # fmt: skip
CASES = [
    pytest.param(family, check, id=f"{family}-{check}", marks=() if family in NAMED else pytest.mark.slow)
    for family in SUPPORTED
    for check in SUPPORTED[family].verified
]


# Families whose attention HF's SDPA path runs inexactly (transformers 5.17 runs Gemma 2 through SDPA and
# drops the soft-capping): their reference is HF's eager attention.
EAGER_REFERENCE = {"gemma2", "vaultgemma", "gpt_oss"}


@functools.cache
def _model(family: str):
    if not family_available(family):
        pytest.skip(f"model_type {family!r} is not in this transformers version")
    if family in EAGER_REFERENCE:  # float32: see the module docstring
        return tiny_family_model(family, torch.float32, attn_implementation="eager")
    model = tiny_family_model(family, torch.float64)
    assert model.config._attn_implementation != "eager", "eager-only family: add it to EAGER_REFERENCE"
    return model


def _repetitive(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged prompts repeating a 2-token motif, so that n-gram lookup has something to propose.

    The first rows of a batch are the same at every batch size, so a smaller batch's output predicts theirs.
    """
    ids, mask = ragged_prompts(8, WIDTH, seed=0, min_len=3, vocab=FAMILY_VOCAB)
    for row in range(8):
        length = int(mask[row].sum())
        motif = ids[row, -2:]
        ids[row, WIDTH - length :] = motif.repeat(WIDTH)[-length:]
    return ids[:batch], mask[:batch]


@functools.cache
def _hf(family: str, batch: int, eos: tuple[int, ...] = ()) -> tuple[torch.Tensor, ...]:
    """(input_ids, mask, HF greedy sequences) of a family's batch-``batch`` prompts."""
    model = _model(family)
    ids, mask = _repetitive(batch)
    kwargs = dict(max_new_tokens=NEW, do_sample=False)
    if eos:
        kwargs["eos_token_id"] = list(eos)
    return ids, mask, model.generate(ids, attention_mask=mask, **kwargs)


def _effdecode(family: str, ids, mask, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback to transformers would warn
        return effdecode.generate(
            _model(family), ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, **kwargs
        )


def _eos_ending_rows_apart(sequences: torch.Tensor) -> tuple[int, ...]:
    """Tokens that rows of an EOS-free run generate for the first time, each row at a different step."""
    chosen: dict[int, int] = {}  # token -> step
    for row in range(sequences.shape[0]):
        new = sequences[row, WIDTH:].tolist()
        for step in range(1, len(new) - 1):
            if new[step] not in new[:step] and new[step] not in chosen and step not in chosen.values():
                chosen[new[step]] = step
                break
    return tuple(sorted(chosen))


def check_greedy(family: str) -> None:
    for batch in (1, 3):
        ids, mask, expected = _hf(family, batch)
        assert torch.equal(_effdecode(family, ids, mask), expected), batch
    # Batch 8 with EOS ids that the first rows (as in the batch-3 run) generate at different steps.
    eos = _eos_ending_rows_apart(_hf(family, 3)[2])
    ids, mask, expected = _hf(family, 8, eos)
    actual = _effdecode(family, ids, mask, eos_token_id=list(eos))
    assert actual.shape == expected.shape
    assert torch.equal(actual, expected)
    new = actual[:, WIDTH:]
    lengths = {int((row != PAD).sum()) for row in new}
    assert len(lengths) >= 2, lengths  # rows really finished at different steps


def check_speculation(family: str) -> None:
    ids, mask, expected = _hf(family, 3)
    ngram = _effdecode(family, ids, mask, prompt_lookup_num_tokens=3)
    assert torch.equal(ngram, expected)
    # n-gram lookup may find nothing to propose in 8 tokens; a copy of the target as draft model always
    # proposes, and its drafts are all accepted: multi-token verify forwards run on every family.
    drafter = copy.deepcopy(_model(family))
    out = _effdecode(
        family, ids, mask, assistant_model=drafter, num_assistant_tokens=3, return_dict_in_generate=True
    )
    assert sum(out.stats.accepted_draft_tokens) > 0
    assert torch.equal(out.sequences, expected)


def check_eviction(family: str) -> None:
    ids, mask, _ = _hf(family, 3)
    config = DecodeConfig(kv_budget=10, kv_window=2, kv_sinks=1, compress_every=2, kv_policy="h2o")
    out = _effdecode(family, ids, mask, decode_config=config, return_dict_in_generate=True)
    assert out.sequences.shape == (3, WIDTH + NEW)
    assert out.stats.new_tokens == [NEW] * 3
    assert sum(out.stats.evicted_tokens) > 0


def check_thinking(family: str) -> None:
    ids, mask, plain = _hf(family, 3)
    end, budget = 5, 3
    config = DecodeConfig(thinking_budget=budget, think_start=None, think_end=[end])
    out = _effdecode(family, ids, mask, decode_config=config, return_dict_in_generate=True)
    forced = 0
    for row in range(3):
        own = plain[row, WIDTH : WIDTH + budget].tolist()
        new = out.sequences[row, WIDTH:].tolist()
        if end in own:  # the model closed the span itself, within the budget
            assert new[: own.index(end) + 1] == own[: own.index(end) + 1]
        else:  # its own thoughts, then the forced end marker right at the budget
            assert new[:budget] == own and new[budget] == end
            forced += 1
    assert forced >= 1
    assert all(0 < n <= budget + 1 for n in out.stats.thinking_tokens), out.stats.thinking_tokens


CHECK_FUNCTIONS = {
    "greedy": check_greedy,
    "speculation": check_speculation,
    "eviction": check_eviction,
    "thinking": check_thinking,
}


@pytest.mark.parametrize(("family", "check"), CASES)
def test_family(family: str, check: str) -> None:
    CHECK_FUNCTIONS[check](family)


def test_every_check_has_a_test():
    assert set(CHECK_FUNCTIONS) == {c for family in SUPPORTED.values() for c in family.verified}


@pytest.mark.parametrize("model_type", ["deepseek_v3", "qwen3_next", "falcon_h1", "lfm2"])
def test_other_caches_fall_back_with_one_warning_naming_the_reason(model_type):
    if not family_available(model_type):
        pytest.skip(f"model_type {model_type!r} is not in this transformers version")
    model = tiny_family_model(model_type, torch.float32)
    ids, mask = ragged_prompts(2, 5, seed=0, vocab=FAMILY_VOCAB)
    with pytest.warns(UserWarning) as caught:
        out = effdecode.generate(model, ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    ours = [str(w.message) for w in caught if "effdecode does not support" in str(w.message)]
    assert len(ours) == 1 and FALLBACK[model_type] in ours[0], ours
    assert torch.equal(out, model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False))


def test_unknown_family_falls_back_once_with_its_reason():
    model = tiny_family_model("llama", torch.float64)
    model.config.model_type = "not_a_family"
    ids, mask = ragged_prompts(2, 5, seed=0, vocab=FAMILY_VOCAB)
    with pytest.warns(UserWarning, match="not_a_family") as caught:
        out = effdecode.generate(model, ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    assert sum("effdecode does not support" in str(w.message) for w in caught) == 1
    assert torch.equal(out, model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False))
