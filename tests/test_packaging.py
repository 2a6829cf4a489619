"""The real wheel holds every package and data file of the source tree, and no top level but effdecode.

Builds the wheel from a copy of the tree in a temporary folder (about 3 s; no CUDA build, no network:
``--no-deps --no-build-isolation``). ``EFFDECODE_SKIP_PACKAGING_TEST=<reason>`` skips it explicitly (say
why), e.g. where setuptools/wheel are not installed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Source folder -> where it lands in the wheel.
SOURCE_ROOTS = {"effdecode": "effdecode", "kernels": "effdecode/kernels"}

pytestmark = pytest.mark.skipif(
    bool(os.environ.get("EFFDECODE_SKIP_PACKAGING_TEST")),
    reason=f"EFFDECODE_SKIP_PACKAGING_TEST={os.environ.get('EFFDECODE_SKIP_PACKAGING_TEST')}",
)


def _source_files() -> dict[str, Path]:
    """Every file the install must ship, by its path inside the wheel (no caches, no built extensions)."""
    files = {}
    for source, target in SOURCE_ROOTS.items():
        for path in (ROOT / source).rglob("*"):
            if not path.is_file() or "__pycache__" in path.parts or path.suffix in (".so", ".pyc", ".pyd"):
                continue
            if path.name.startswith("_C") and path.suffix != ".py":
                continue
            files[f"{target}/{path.relative_to(ROOT / source).as_posix()}"] = path
    return files


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory) -> list[str]:
    # From a copy without build/ or *.egg-info: setuptools would reuse stale files of an earlier build.
    source = tmp_path_factory.mktemp("source") / "effdecode"
    ignore = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", "*.so", ".venv*")
    shutil.copytree(ROOT, source, ignore=ignore)
    out = tmp_path_factory.mktemp("wheel")
    env = {**os.environ, "EFFDECODE_SKIP_CUDA_BUILD": "1", "PIP_NO_INDEX": "1"}
    command = [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-w"]
    result = subprocess.run([*command, str(out)], capture_output=True, text=True, env=env, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = out.glob("effdecode-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        return archive.namelist()


def test_every_subpackage_is_in_the_wheel(wheel_names):
    packages = {
        f"{target}/{init.parent.relative_to(ROOT / source).as_posix()}".rstrip("/.")
        for source, target in SOURCE_ROOTS.items()
        for init in (ROOT / source).rglob("*.py")
        if "__pycache__" not in init.parts
    }
    assert "effdecode/compression" in packages  # the package the hand-written list once left out
    shipped = {name.rsplit("/", 1)[0] for name in wheel_names if name.endswith("/__init__.py")}
    # A folder of Python files without __init__.py is not a package: find_packages would skip it.
    assert sorted(packages - shipped) == []


def test_every_source_and_data_file_is_in_the_wheel(wheel_names):
    expected = _source_files()
    assert any(name.endswith("model.safetensors") for name in expected)
    assert any(name.endswith("tokenizer.json") for name in expected)
    assert sorted(set(expected) - set(wheel_names)) == []


def test_no_top_level_kernels_package(wheel_names):
    top_level = {name.split("/", 1)[0] for name in wheel_names}
    assert {name for name in top_level if not name.endswith(".dist-info")} == {"effdecode"}
