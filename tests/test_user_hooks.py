"""generation/user_hooks.py: processors and criteria get transformers' full-batch view, results mapped."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import LogitsProcessor, StoppingCriteria, StoppingCriteriaList

from effdecode.generation.user_hooks import (
    apply_processors,
    criteria_hit,
    full_batch_ids,
    gather_rows,
    ragged_full_batch_ids,
    scatter_rows,
)
from tiny_models import ragged_prompts, tiny_model

PAD = 0


class _Recorder(StoppingCriteria):
    """Records the ids transformers hands a criterion at every step; never stops anything."""

    def __init__(self) -> None:
        self.seen: list[torch.Tensor] = []

    def __call__(self, input_ids, scores, **kwargs):
        self.seen.append(input_ids.clone())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def test_full_batch_ids_of_the_pad_filled_buffer_are_what_transformers_passes():
    """The loop's buffer (pad-filled; rows that left are never written) is transformers' input_ids."""
    model = tiny_model("llama", torch.float64, seed=2)
    input_ids, mask = ragged_prompts(4, 6, seed=2, min_len=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        probe = model.generate(input_ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
        eos = int(probe[2, input_ids.shape[1] + 1])  # row 2 finishes after 2 tokens (others may too)
        recorder = _Recorder()
        out = model.generate(
            input_ids,
            attention_mask=mask,
            max_new_tokens=8,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=PAD,
            stopping_criteria=StoppingCriteriaList([recorder]),
        )
    prompt_width = input_ids.shape[1]
    assert bool((out[2, prompt_width + 2 :] == PAD).all())  # a finished row, padded
    buffer = torch.full((4, prompt_width + 8 + 3), PAD)  # the loop's buffer has slack columns
    buffer[:, : out.shape[1]] = out
    for step, seen in enumerate(recorder.seen, start=1):
        assert torch.equal(full_batch_ids(buffer, prompt_width + step), seen)


def test_criteria_see_the_whole_batch_and_answer_for_the_live_rows():
    calls = []

    def stop_rows_0_and_3(input_ids, scores):
        calls.append((input_ids.shape, None if scores is None else scores.shape))
        return torch.tensor([True, False, False, True])

    ids = torch.arange(4 * 5).view(4, 5)
    scores = torch.randn(2, 11)
    scores3 = torch.randn(3, 11)
    assert criteria_hit([stop_rows_0_and_3], ids, scores, torch.tensor([0, 3])).tolist() == [True, True]
    assert criteria_hit([stop_rows_0_and_3], ids, scores, torch.tensor([2, 1])).tolist() == [False, False]
    assert calls == [((4, 5), (4, 11))] * 2
    # A Python bool (the whole batch is done) applies to every live row; criteria are OR-ed.
    assert criteria_hit([lambda i, s: True], ids, None, torch.tensor([1])).tolist() == [True]
    both = [lambda i, s: torch.tensor([False, True, False, False]), stop_rows_0_and_3]
    assert criteria_hit(both, ids, scores3, torch.tensor([1, 2, 3])).tolist() == [True, False, True]


def test_a_stateful_criterion_tracks_its_rows_as_rows_leave():
    """The issue's case: a criterion that stops row 0 after 3 new tokens stops row 0, whoever is live."""

    class StopRowAfter(StoppingCriteria):
        def __init__(self, row: int, count: int, prompt_width: int) -> None:
            self.row, self.count, self.prompt_width = row, count, prompt_width

        def __call__(self, input_ids, scores, **kwargs):
            done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
            done[self.row] = input_ids.shape[1] - self.prompt_width >= self.count
            return done

    criterion = StopRowAfter(row=0, count=3, prompt_width=2)
    buffer = torch.full((4, 10), PAD)
    rows = torch.tensor([0, 1, 2, 3])
    stopped = []
    for step in range(1, 6):
        hit = criteria_hit([criterion], full_batch_ids(buffer, 2 + step), torch.randn(len(rows), 7), rows)
        stopped += rows[hit].tolist()
        rows = rows[~hit]
        if step == 1:
            rows = rows[rows != 1]  # row 1 leaves (EOS) before row 0 is stopped
    assert stopped == [0]


def test_processors_see_full_scores_and_row_i_stays_row_i():
    class AddRowIndex(LogitsProcessor):
        def __call__(self, input_ids, scores):
            assert input_ids.shape[0] == scores.shape[0] == 5
            return scores + torch.arange(5, dtype=scores.dtype)[:, None]

    rows = torch.tensor([4, 1, 3])
    scores = torch.zeros(3, 6)
    out = apply_processors([AddRowIndex(), AddRowIndex()], torch.zeros(5, 2, dtype=torch.long), scores, rows)
    assert out[:, 0].tolist() == [8.0, 2.0, 6.0]
    assert apply_processors([], None, scores, rows) is scores


def test_scatter_and_gather_round_trip():
    values = torch.randn(3, 4)
    rows = torch.tensor([2, 0, 4])
    full = scatter_rows(values, rows, 5, fill=-1.0)
    assert torch.equal(gather_rows(full, rows), values)
    assert bool((full[[1, 3]] == -1.0).all())


def test_ragged_ids_right_align_each_live_rows_newest_tokens():
    sequences = torch.tensor(
        [
            [1, 2, 3, 4, 5, 0],  # live, last token at column 4
            [1, 2, 7, 0, 0, 0],  # left earlier
            [1, 2, 3, 8, 9, 6],  # live, last token at column 5
        ]
    )
    ids = ragged_full_batch_ids(sequences, torch.tensor([0, 2]), torch.tensor([4, 5]), 4, PAD)
    assert ids.tolist() == [[2, 3, 4, 5], [1, 2, 7, 0], [3, 8, 9, 6]]
    ids = ragged_full_batch_ids(sequences, torch.tensor([0]), torch.tensor([1]), 4, PAD)
    assert ids[0].tolist() == [0, 0, 1, 2]


def test_lm_eval_multi_token_criterion_runs_on_a_shrinking_batch():
    utils_hf = pytest.importorskip(
        "lm_eval.models.utils_hf", reason="lm_eval not installed (integrations extra)"
    )
    from effdecode.workloads import load_reasoner

    _, tokenizer = load_reasoner("target")
    prompt_width = 3
    texts = ["abc c1 r", "abc xy", "abc xy", "abc c1 r"]
    encoded = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    width = max(map(len, encoded))
    ids = torch.tensor([[PAD] * (width - len(e)) + e for e in encoded])  # right-aligned ends
    criteria = utils_hf.stop_sequences_criteria(tokenizer, ["c1 r"], prompt_width, 4)
    live = torch.tensor([0, 2, 3])  # row 1 already left
    hit = criteria_hit(criteria, ids, torch.zeros(3, 5), live)
    assert criteria[0].done_tracker == [True, False, False, True]  # per row, row i is row i
    assert hit.tolist() == [False, False, False]  # not every row is done: the criterion says False
