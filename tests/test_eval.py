"""``effdecode eval``: held-out accuracy and cost figures, JSON output, sweeps that survive failures."""

from __future__ import annotations

import json

import pytest
import torch

from effdecode.cli import main
from effdecode.eval import METRICS, EvalOptions, SweepGrid, run_eval, run_sweep, thinking_token_count
from effdecode.workloads import load_reasoner


@pytest.fixture(autouse=True)
def one_thread():
    """One CPU thread: tiny models decode fastest so, and a busy CI machine does not stall them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


FAST = ["-n", "8", "--batch-size", "8", "--levels", "1", "2", "--max-new-tokens", "300"]


def _run_json(capsys, *flags: str) -> dict:
    assert main(["eval", *FAST, "--json", *flags]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_eval_json_has_every_field(capsys):
    result = _run_json(capsys)
    for name in METRICS:
        assert isinstance(result[name], int | float), (name, result[name])
    assert result["n"] == 8 and result["accuracy"] >= 0.75
    assert 0 < result["mean_thinking_tokens"] < result["mean_new_tokens"]
    assert result["kv_peak_tokens"] > result["mean_new_tokens"]
    assert result["tokens_per_s"] > 0 and result["tokens_per_target_forward"] == pytest.approx(1.0)
    assert result["draft_acceptance_rate"] == 0.0 and result["error"] is None


@pytest.mark.parametrize("flag", [["--draft"], ["--prompt-lookup", "3"]])
def test_eval_speculative_reports_acceptance(capsys, flag):
    result = _run_json(capsys, *flag)
    assert result["accuracy"] >= 0.75
    assert 0 < result["draft_acceptance_rate"] <= 1 and result["tokens_per_target_forward"] > 1


def test_eval_prints_a_report(capsys):
    assert main(["eval", "-n", "2", "--batch-size", "2", "--levels", "1", "--show", "1"]) == 0
    printed = capsys.readouterr().out
    for label in ("accuracy", "mean new tokens", "mean thinking tokens", "tokens/s", "peak KV"):
        assert label in printed
    assert "draft acceptance rate" in printed and "tokens per target forward" in printed
    assert "Answer:" in printed


def test_sweep_records_failures_and_goes_on(tmp_path):
    model, tokenizer = load_reasoner("target")
    base = EvalOptions(n=2, batch_size=2, levels=(1,), max_new_tokens=120)
    grid = SweepGrid(
        kv_budgets=(8,), kv_policies=("streaming",), thinking_budgets=(), early_exit_thresholds=()
    )
    rows = run_sweep(model, tokenizer, base, grid, tmp_path, log=lambda *_: None)
    assert [row["family"] for row in rows] == ["baseline", "kv"]
    assert rows[0]["error"] is None and rows[0]["accuracy"] is not None
    assert "kv_budget" in rows[1]["error"] and rows[1]["accuracy"] is None  # budget 8 < sinks + window
    assert {path.name for path in tmp_path.iterdir()} == {"sweep.md", "sweep.json", "sweep.png"}
    assert "ValueError" in (tmp_path / "sweep.md").read_text()


def test_thinking_token_count():
    assert thinking_token_count([5, 6, 7, 9, 1], think_end_id=7) == 2
    assert thinking_token_count([5, 6], think_end_id=7) == 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(n=0), "n="),
        (dict(levels=(7,)), "out of range"),
        (dict(draft="draft", prompt_lookup=3), "either"),
        (dict(batch_size=0), "batch_size"),
    ],
)
def test_eval_options_reject_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EvalOptions(**kwargs)


def test_eval_runs_through_generate_batch_with_slots_and_a_progress_bar(capsys, monkeypatch):
    import effdecode

    calls = []
    real = effdecode.generate_batch

    def spy(model, prompts, **kwargs):
        calls.append((len(prompts), kwargs["decode_config"].max_slots, kwargs["progress_bar"]))
        return real(model, prompts, **kwargs)

    monkeypatch.setattr(effdecode, "generate_batch", spy)
    result = _run_json(capsys, "--slots", "3")
    assert calls == [(1, 3, False), (8, 3, True)]  # the warm-up call, then every problem in one call
    assert result["accuracy"] >= 0.75 and result["error"] is None


def test_eval_progress_bar_on_stderr_and_off_with_no_progress(capsys):
    assert main(["eval", *FAST, "--json"]) == 0
    assert "Solving 8 requests" in capsys.readouterr().err
    assert main(["eval", *FAST, "--json", "--no-progress"]) == 0
    assert "Solving" not in capsys.readouterr().err


def test_eval_completions_do_not_depend_on_the_slot_count():
    model, tokenizer = load_reasoner("target")
    results = [
        run_eval(model, tokenizer, EvalOptions(n=6, levels=(1, 2), max_new_tokens=300, slots=slots))
        for slots in (2, "auto")
    ]
    assert results[0].completions == results[1].completions
    assert results[0].accuracy == results[1].accuracy >= 0.5
