"""The batch-level draft gate: drafting pauses while measured drafting steps give fewer tokens per second
than plain steps, and never when drafts land (fake clock, no real timing)."""

from __future__ import annotations

import pytest

from effdecode.generation import drafters


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _simulate(monkeypatch, steps: int, draft_seconds: float, draft_tokens_per_row: float) -> list[bool]:
    """Run ``steps`` steps of 8 rows; a plain step takes 1 s and gives 1 token per row. Returns, per step,
    whether the gate let it draft."""
    monkeypatch.undo()  # the suite-wide fixture keeps the gate open; this test needs the real property
    clock = _Clock()
    monkeypatch.setattr(drafters.time, "perf_counter", clock)
    gate = drafters.DraftGate()
    drafted = []
    rows = 8
    for _ in range(steps):
        drafting = gate.open
        drafted.append(drafting)
        clock.now += draft_seconds if drafting else 1.0
        gate.record(drafting, int(rows * (draft_tokens_per_row if drafting else 1.0)), rows)
    return drafted


def test_drafting_that_loses_pauses_for_the_batch(monkeypatch):
    # Drafting steps take 2 s for 1.25 tokens per row: 5 tokens/s against 8 for plain steps.
    drafted = _simulate(monkeypatch, 400, draft_seconds=2.0, draft_tokens_per_row=1.25)
    assert drafted[:4] == [True] * 4  # it drafts until it has measured both kinds of step
    assert not all(drafted)
    assert sum(drafted) < 0.25 * len(drafted)  # pauses double up to LAST_PAUSE
    assert any(drafted[200:])  # and it keeps probing


def test_drafting_that_pays_is_never_paused(monkeypatch):
    # Low gain per row but faster than plain steps: keeps drafting after timing plain steps.
    fast = _simulate(monkeypatch, 300, draft_seconds=1.0, draft_tokens_per_row=1.25)
    assert sum(fast) > 0.9 * len(fast)
    # Drafts that nearly always land (>= 1.5 tokens per row and step) are never second-guessed.
    landing = _simulate(monkeypatch, 300, draft_seconds=3.0, draft_tokens_per_row=4.0)
    assert all(landing)


@pytest.mark.parametrize("pause", [drafters.DraftGate.FIRST_PAUSE])
def test_a_lost_check_closes_for_the_first_pause(monkeypatch, pause):
    drafted = _simulate(monkeypatch, 120, draft_seconds=2.0, draft_tokens_per_row=1.25)
    # After the first losing comparison, the gate stays closed for FIRST_PAUSE steps in a row.
    longest_closed = max(len(run) for run in "".join("d" if d else "." for d in drafted).split("d"))
    assert longest_closed >= pause
