"""``scripts/gpu_check.sh`` without a GPU: syntax, dry runs of every stage, budgets, and results written under
``$OUT`` as each step ends (a call killed at its limit must still return what finished)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
STAGES = ["quick", "bench", "tests", "sanitize"]
EIGHT_MINUTES = 480

pytestmark = pytest.mark.skipif(
    shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and coreutils"
)


def _run(out: Path, *args: str, budget: int | None = None, wait: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(out)}
    if budget is not None:
        env["GPU_CHECK_BUDGET_S"] = str(budget)
    return subprocess.run(
        ["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=wait
    )


def _tree_state() -> set[str]:
    """Files of the repository that differ from git's index (new, modified), to spot stray outputs."""
    listed = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT, capture_output=True, text=True
    )
    return set(listed.stdout.splitlines()) if listed.returncode == 0 else set()


def test_syntax():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


@pytest.mark.parametrize("stage", STAGES)
def test_dry_run_fits_the_budget_and_writes_only_under_out(tmp_path, stage):
    before = _tree_state()
    result = _run(tmp_path, "--dry-run", stage)
    assert result.returncode == 0, result.stdout + result.stderr
    assert _tree_state() == before, "the dry run wrote into the repository"
    files = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    assert files == [f"{stage}.json"]
    summary = json.loads((tmp_path / f"{stage}.json").read_text())
    steps = summary["steps"]
    assert summary["dry_run"] is True and summary["stage"] == stage
    assert steps and all(step["status"] == "dry-run" for step in steps), steps
    total = sum(step["limit_s"] for step in steps)
    assert total == summary["limits_total_s"] <= summary["budget_s"] < EIGHT_MINUTES
    # Every step's limit is stated in the table at the top of the script, with the stage's sum.
    header = SCRIPT.read_text().split("set -uo pipefail")[0]
    row = re.search(rf"^# \| {stage} +\|(.*?)(?=^# \| \w+ +\||^# On a warm)", header, re.S | re.M)
    assert row, f"no row for {stage} in the table"
    assert f"sum {total}" in row.group(1), f"the table's sum for {stage} is not {total}"
    assert "never run on a GPU yet" in row.group(1) or re.search(r"\d+ ?s|\d+ ?min", row.group(1))


def test_unknown_stage_is_refused(tmp_path):
    result = _run(tmp_path, "--dry-run", "everything")
    assert result.returncode == 2 and "usage" in result.stderr


def test_steps_are_limited_and_recorded_as_they_end(tmp_path):
    """A hanging step is cut at its limit, a failing one recorded; a step past the stage budget is skipped."""
    result = _run(tmp_path, "selftest", budget=20)
    assert result.returncode == 1
    summary = json.loads((tmp_path / "selftest.json").read_text())
    got = {step["name"]: (step["status"], step["rc"]) for step in summary["steps"]}
    assert got == {
        "fast": ("ok", 0),
        "hangs": ("timed out", 124),
        "fails": ("failed", 1),
        "late": ("skipped: stage budget spent", None),
    }
    hangs = next(step for step in summary["steps"] if step["name"] == "hangs")
    assert hangs["seconds"] <= 5
    log = (tmp_path / "selftest.log").read_text()
    assert "-- fast: ok" in log and "-- hangs: timed out" in log


def test_a_killed_run_keeps_what_finished(tmp_path):
    """Killed (SIGKILL, as at the end of a lent machine's call) during a step: earlier steps are on disk."""
    env = {**os.environ, "OUT": str(tmp_path), "GPU_CHECK_BUDGET_S": "100"}
    proc = subprocess.Popen(
        ["bash", str(SCRIPT), "selftest"], cwd=ROOT, env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        summary_path = tmp_path / "selftest.json"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not summary_path.exists():
            time.sleep(0.1)
        time.sleep(0.5)  # inside "hangs" (3 s)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    summary = json.loads(summary_path.read_text())
    assert [step["name"] for step in summary["steps"]][:1] == ["fast"]
    assert summary["steps"][0]["status"] == "ok"
    assert "-- fast: ok" in (tmp_path / "selftest.log").read_text()


def test_sanitize_ops_runs_on_the_cpu():
    """The script the sanitizer stage runs works (through the interpreter here), so it cannot rot unseen."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        ["python", str(ROOT / "scripts" / "sanitize_ops.py"), "--cpu"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("ok ") >= 7 and "FAILED" not in result.stdout
