"""Every family in effdecode.families.SUPPORTED, on its tiny random model: the checks its entry claims.

Parametrized from the registry, so the README's support table (written from the same registry) states exactly
what runs here:

- greedy: token-identical to transformers' ``generate`` at batch 1, 3 and 8 with ragged prompts; at batch 8
  with EOS ids that end rows at different steps.
- speculation: n-gram speculative greedy gives the same tokens as plain greedy (= HF's).
- eviction: a small ``kv_budget`` evicts entries and generation completes at full length.
- thinking: a thinking budget ends each row's thinking with the forced end marker.

Models are float64, except for families whose HF attention is eager-only: HF's eager softmax runs in
float32, where a float64 mask minimum becomes -inf and left-padded rows turn into NaN, so HF itself cannot be
the oracle in float64 there; they are compared in float32.
"""

from __future__ import annotations

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

CASES = [(family, check) for family in SUPPORTED for check in SUPPORTED[family].verified]


@functools.cache
def _model(family: str):
    if not family_available(family):
        pytest.skip(f"model_type {family!r} is not in this transformers version")
    model = tiny_family_model(family, torch.float64)
    if model.config._attn_implementation == "eager":
        model = tiny_family_model(family, torch.float32)
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
    """Tokens first generated at different steps by different rows of an EOS-free run."""
    chosen = []
    for row, step in enumerate([1, 3, 5]):
        token = int(sequences[row, WIDTH + step])
        if token not in sequences[row, WIDTH : WIDTH + step].tolist():
            chosen.append(token)
    return tuple(sorted(set(chosen)))


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
    out = _effdecode(family, ids, mask, prompt_lookup_num_tokens=3, return_dict_in_generate=True)
    assert sum(out.stats.proposed_draft_tokens) > 0  # drafts were verified, not only plain steps
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


@pytest.mark.parametrize(("family", "check"), CASES, ids=[f"{f}-{c}" for f, c in CASES])
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
