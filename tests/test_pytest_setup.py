"""pytest runs without pytest-benchmark, and benchmarks stay untimed by default where it is installed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _pytest(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_pytest_runs_without_the_benchmark_plugin():
    """``-p no:benchmark`` unloads pytest-benchmark, as on a machine without it: the run must still pass."""
    result = _pytest("-p", "no:benchmark", "tests/test_roofline_math.py")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert " passed" in result.stdout


def test_benchmarks_are_disabled_by_default(request):
    """Where the plugin is installed, the conftest turns timing off unless --benchmark-enable is given."""
    pytest.importorskip("pytest_benchmark")
    if request.config.getoption("benchmark_enable"):
        pytest.skip("timing was asked for on the command line")
    assert request.config.option.benchmark_disable
    session = request.config._benchmarksession
    assert session.disabled
