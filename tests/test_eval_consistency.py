"""``effdecode eval --samples k --consistency ...`` and :func:`effdecode.generate_in_windows`."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

import effdecode
from effdecode import DecodeConfig
from effdecode.cli import main
from effdecode.eval_consistency import ConsistencyResult, format_table, plot
from tiny_models import ragged_prompts, tiny_model
from tiny_tokenizer import tiny_tokenizer

FAST = ["-n", "4", "--batch-size", "32", "--levels", "1", "--max-new-tokens", "300", "--threads", "1"]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_eval_votes_k_samples_and_reports_savings(capsys):
    assert main(["eval", *FAST, "--samples", "4", "--consistency", "esc", "--windows", "--json"]) == 0
    (result,) = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["policy"] == "esc (windows)" and result["samples"] == 4 and result["n"] == 4
    assert result["accuracy"] >= 0.75  # level 1 problems, one window of 4 rows usually agrees
    assert 0 < result["mean_tokens"] <= result["mean_tokens_full"]
    assert result["tokens_saved"] == pytest.approx(1 - result["mean_tokens"] / result["mean_tokens_full"])
    assert result["wall_time_s"] > 0 and result["tokens_per_s"] > 0


def test_eval_refuses_a_policy_with_one_sample():
    with pytest.raises(ValueError, match="--samples >= 2"):
        main(["eval", *FAST, "--consistency", "adaptive"])


def test_table_and_plot(tmp_path):
    rows = [ConsistencyResult("none", 16, 1.0, 4, 0.9, 0.8, 100, 100), ConsistencyResult("esc", 16, 1.0, 4)]
    table = format_table(rows)
    assert table.count("\n") == 3 and "| esc | 16 | 1 |" in table
    image = plot(rows, tmp_path / "p.png")
    assert image is None or image.stat().st_size > 0


def _windows(samples, **config):
    model = tiny_model("llama", torch.float64, seed=1, eos_token_id=list(range(100, 140)))
    ids, mask = ragged_prompts(3, 6, seed=1)
    torch.manual_seed(0)
    return effdecode.generate_in_windows(
        model, ids, mask, samples=samples, decode_config=DecodeConfig(**config), temperature=1.5,
        max_new_tokens=20, tokenizer=tiny_tokenizer(),
    )  # fmt: skip


def test_windows_never_start_rows_after_agreement():
    run = _windows(8, answer=lambda text: "A", consistency="esc", consistency_window=2)
    assert run.rounds == 1
    assert all(v.rows_run == 2 and v.rows_stopped == 6 and v.answer == "A" for v in run.votes)
    assert all(v.tokens_full >= v.tokens_spent > 0 for v in run.votes)


@pytest.mark.parametrize("policy", ["esc", "adaptive", None])
def test_windows_run_every_row_when_answers_never_agree(policy):
    fresh = itertools.count()
    run = _windows(8, answer=lambda text: next(fresh), consistency=policy, consistency_window=3)
    assert run.rounds == 3  # windows of 3, 3, 2
    assert all(v.rows_run == 8 and v.rows_stopped == 0 and v.tokens_full == v.tokens_spent for v in run.votes)
    assert [len(rows) for rows in run.sequences] == [8, 8, 8]


def test_windows_refuse_confidence():
    with pytest.raises(ValueError, match="not 'confidence'"):
        _windows(4, answer=r"(\d)", consistency="confidence")
