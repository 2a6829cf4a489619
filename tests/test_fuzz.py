"""Seeded differential fuzz: effdecode against transformers' generate, speculative against plain decoding.

Cases come from :mod:`effdecode.testing.fuzz_cases` (``scripts/fuzz.py`` runs the same generator for
longer). Test ids name the case's seed, mode and checks, so ``-k "fuzz and hf"`` selects the cases that
compare with transformers.
"""

from __future__ import annotations

import pytest
import torch

from effdecode.generation import logits as logits_module
from effdecode.testing.fuzz_cases import MODES, make_case, run_case

# Four cases per mode, about 60 s on a 2-core CI machine.
SEEDS = [(1000 + i, MODES[i % len(MODES)]) for i in range(4 * len(MODES))]
CASES = [make_case(seed, mode) for seed, mode in SEEDS]


def _case_id(case) -> str:
    return f"{case.seed}-{case.mode}-{case.family}-{'+'.join(case.checks)}"


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_fuzz_case(case):
    failures, notes = run_case(case)
    assert not failures, (case.to_json(), [(f.check, f.detail) for f in failures], notes)


def test_cases_are_a_pure_function_of_the_seed_and_cover_every_mode_and_check():
    assert [c.to_json() for c in CASES] == [make_case(seed, mode).to_json() for seed, mode in SEEDS]
    assert {c.mode for c in CASES} == set(MODES)
    drawn = {check for seed in range(200) for check in make_case(seed).checks}
    assert {"hf", "plain", "no_eviction", "reproducible"} <= drawn
    families = {make_case(seed).family for seed in range(200)}
    assert families == {"llama", "mistral", "qwen2", "qwen3"}


def test_the_fuzz_reports_a_wrong_token(monkeypatch):
    # The harness must be able to fail: shift one row's greedy choice and the "hf" check catches it.
    case = next(c for c in (make_case(s, "plain") for s in range(50)) if c.checks == ["hf"])
    original = logits_module.LogitsPipeline.choose

    def off_by_one(self, scores, rows):
        tokens = original(self, scores, rows)
        return torch.where(rows == rows[0], (tokens + 1) % scores.shape[-1], tokens)

    monkeypatch.setattr(logits_module.LogitsPipeline, "choose", off_by_one)
    failures, _ = run_case(case)
    assert [f.check for f in failures] == ["hf"]


@pytest.mark.parametrize("seed", [36001912, 38000245, 38002081])
def test_snapkv_rows_without_an_observation_window_evict_as_alone(seed):
    """Fuzz finds of 2026-12-01 (the first predates continuous batching), all with snapkv and ``kv_window=0``:
    ngram speculation + DEER differed from plain decoding (36001912), and rows decoded together differed
    from rows decoded one at a time, with DEER (38000245) and without (38002081). With no observation window
    a row's window never opens before its compaction, so the scores that other rows' forwards gave it were
    never zeroed, and it was compacted on them. Fixed: such a row's scores are zeroed at compaction
    (``KVCompressor.window_open``)."""
    case = make_case(seed)
    assert case.decode["kv_policy"] == "snapkv" and case.decode["kv_window"] == 0
    failures, _ = run_case(case)
    assert failures == []
