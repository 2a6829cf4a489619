"""``effdecode demo`` runs both engines and reports matching outputs."""

from __future__ import annotations

import subprocess
import sys

from effdecode.cli import main


def test_demo_prints_speed_and_matching_outputs(capsys):
    status = main(
        ["demo", "--batch-sizes", "1", "3", "--new-tokens", "12", "--prompt-len", "8", "--layers", "2"]
    )
    printed = capsys.readouterr().out
    assert status == 0, printed
    rows = [line.split() for line in printed.splitlines() if line.strip()[:1].isdigit()]
    assert [row[0] for row in rows] == ["1", "3"]
    for row in rows:
        assert row[-1] == "yes" and row[-2].endswith("x") and float(row[1]) > 0 and float(row[2]) > 0


def test_python_dash_m_effdecode_shows_help():
    result = subprocess.run([sys.executable, "-m", "effdecode", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "demo" in result.stdout
