"""The CUDA extension was really built wherever it should have been.

setup.py builds ``effdecode._C`` whenever nvcc is found (on PATH, else in $CUDA_HOME/bin) unless
EFFDECODE_SKIP_CUDA_BUILD=1. Under the same conditions these tests demand the module, so a run whose build
silently skipped the extension fails instead of quietly falling back to torch. No GPU is needed: the CUDA
runtime is linked statically and the module imports without a driver.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import effdecode
from effdecode.ops.backend import cuda_extension
from effdecode.ops.verify import _CUDA_DTYPE_CODES


def _nvcc() -> str | None:
    nvcc = shutil.which("nvcc")
    if nvcc is None and os.environ.get("CUDA_HOME"):
        candidate = Path(os.environ["CUDA_HOME"]) / "bin" / "nvcc"
        nvcc = str(candidate) if candidate.is_file() else None
    return nvcc


def _skip_reason() -> str | None:
    if os.environ.get("EFFDECODE_SKIP_CUDA_BUILD") == "1":
        return "EFFDECODE_SKIP_CUDA_BUILD=1: the CUDA build is skipped on purpose"
    if _nvcc() is None:
        return "no nvcc on PATH or in $CUDA_HOME/bin: the CUDA extension is only built where nvcc is present"
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")


def _run_without_device(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter that sees no CUDA device, importing this same effdecode."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    package_parent = Path(effdecode.__file__).resolve().parent.parent
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=package_parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_extension_imports_and_exposes_verify():
    from effdecode import _C

    assert callable(_C.verify_greedy)
    assert _C.cuda_runtime_version() >= 11080
    assert cuda_extension() is _C  # what the backend dispatch sees


def test_dtype_codes_agree():
    from effdecode import _C

    assert _CUDA_DTYPE_CODES == {
        torch.float32: _C.DTYPE_FLOAT32,
        torch.float16: _C.DTYPE_FLOAT16,
        torch.bfloat16: _C.DTYPE_BFLOAT16,
    }


def test_imports_and_fails_cleanly_without_a_device():
    # Importing needs no driver; a launch with no device raises RuntimeError (it never touches the fake
    # pointers) rather than crashing.
    result = _run_without_device("""
        from effdecode import _C
        assert _C.cuda_device_count() == 0
        fake = 1 << 12
        try:
            _C.verify_greedy(fake, 8, 4, fake, 2, 1, fake, fake, fake, 1, fake, fake, fake, 1, 2, 4, 0, 0)
        except RuntimeError as error:
            print("raised:", error)
        else:
            raise SystemExit("launch without a device did not raise")
    """)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "raised: verify_greedy:" in result.stdout


@pytest.mark.skipif(sys.platform != "linux" or shutil.which("ldd") is None, reason="needs Linux ldd")
def test_cuda_runtime_linked_statically():
    from effdecode import _C

    libraries = subprocess.run(["ldd", _C.__file__], capture_output=True, text=True, check=True).stdout
    assert "libcudart" not in libraries and "libcuda." not in libraries, libraries
