"""Build script for effdecode.

Pure Python (torch + Triton paths) everywhere. Where ``nvcc`` is found (on ``PATH``, else in
``$CUDA_HOME/bin``), ``csrc/*.cu`` and ``csrc/bindings.cpp`` are compiled into the pybind11 module
``effdecode._C``; see ``_cuda_extensions``. Set ``EFFDECODE_SKIP_CUDA_BUILD=1`` to skip it.

The extension needs no CUDA-enabled torch and no torch headers: kernels take raw device pointers and a
stream handle. nvcc compiles the ``.cu`` files to objects (in parallel); setuptools compiles the bindings
and links everything, with the CUDA runtime linked statically, so ``import effdecode._C`` works on machines
without a GPU or driver. Extra nvcc flags can be passed through nvcc's own ``NVCC_APPEND_FLAGS``.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CompileError

# Packages are found, not listed: every folder under ``effdecode/`` with an ``__init__.py``.
# ``kernels/`` holds the Triton kernels; it is installed as ``effdecode.kernels`` and never as a top-level
# package, because Hugging Face ships its own ``kernels`` package that transformers imports.
_ROOT = str(Path(__file__).resolve().parent)
PACKAGES = [
    *find_packages(where=_ROOT, include=["effdecode", "effdecode.*"]),
    *("effdecode." + name for name in find_packages(where=_ROOT, include=["kernels", "kernels.*"])),
]
PACKAGE_DIR = {"effdecode.kernels": "kernels"}
# The shipped reasoner models of the arithmetic workload (weights, configs, tokenizer), loaded offline.
PACKAGE_DATA = {
    "effdecode.workloads": ["models/*/*.json", "models/*/*.safetensors"],
    "effdecode.ops": ["*.cpp"],  # C++ kernels built at first use (cpu_decode_attention)
}

SKIP_ENV = "EFFDECODE_SKIP_CUDA_BUILD"
CSRC = "csrc"
# SASS for Ampere (sm_80) and Hopper (sm_90a), plus compute_80 PTX that the driver JIT-compiles on newer
# GPUs (Blackwell, ...) instead of failing there with "no kernel image".
# fmt: off
GENCODE = [
    "-gencode", "arch=compute_80,code=sm_80",
    "-gencode", "arch=compute_90a,code=sm_90a",
    "-gencode", "arch=compute_80,code=compute_80",
]
# fmt: on
NVCC_FLAGS = [
    "-std=c++17",
    "-O3",
    "-lineinfo",  # source lines for profilers; no runtime cost
    "-Xcompiler",
    "-fPIC",
    "-Xcompiler",
    "-fvisibility=hidden",
    "-I" + CSRC,
]
# Sources safe to build with --use_fast_math. Not verify.cu: its argmax must match torch.argmax bit for bit,
# and the implied -ftz would flush subnormal logits to zero and turn distinct values into ties.
FAST_MATH_SOURCES: frozenset[str] = frozenset()


def find_nvcc() -> str | None:
    """``nvcc`` from ``PATH``, else ``$CUDA_HOME/bin/nvcc``; None where neither exists."""
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        return nvcc
    cuda_home = os.environ.get("CUDA_HOME")
    if cuda_home:
        candidate = Path(cuda_home) / "bin" / "nvcc"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def cudart_static_dir(nvcc: str) -> str:
    """The directory holding ``libcudart_static.a`` for this ``nvcc``.

    Asked of nvcc itself (the ``-L`` directories of its ``LIBRARIES`` setting, printed by ``--dryrun``), since
    ``nvcc`` on ``PATH`` may be a wrapper script far from the toolkit; ``CUDA_HOME`` and the directory above
    ``bin/`` are the fallbacks.
    """
    dryrun = subprocess.run(
        [nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
        capture_output=True,
        text=True,
        check=False,
    )
    candidates = []
    for line in (dryrun.stdout + dryrun.stderr).splitlines():
        if line.startswith("#$ LIBRARIES="):
            candidates += [arg[2:] for arg in shlex.split(line.split("=", 1)[1]) if arg.startswith("-L")]
    roots = [os.environ.get("CUDA_HOME", ""), str(Path(nvcc).resolve().parent.parent)]
    for root in filter(None, roots):
        candidates += [f"{root}/lib64", f"{root}/lib", *map(str, Path(root).glob("targets/*/lib"))]
    for directory in candidates:
        if (Path(directory) / "libcudart_static.a").is_file():
            return os.path.normpath(directory)
    raise CompileError(f"libcudart_static.a not found for {nvcc} (looked in {candidates}); set CUDA_HOME")


def _is_stale(target: Path, sources: list[str]) -> bool:
    return not target.exists() or any(os.path.getmtime(s) > target.stat().st_mtime for s in sources)


class BuildExtWithNvcc(build_ext):
    """``build_ext`` that first compiles an extension's ``cuda_sources`` with nvcc, then links them in.

    The ``.cu`` files compile in parallel (``-j``/``--parallel``, default: one job per core), each nvcc
    building its architectures on the cores left over. nvcc's output is shown; a failure stops the build.
    """

    def build_extension(self, ext) -> None:
        cuda_sources = getattr(ext, "cuda_sources", [])
        if cuda_sources:
            objects = self._nvcc_compile(ext.nvcc, cuda_sources, ext.depends)
            ext.extra_objects = [*(o for o in ext.extra_objects if o not in objects), *objects]
            library_dir = cudart_static_dir(ext.nvcc)
            if library_dir not in ext.library_dirs:
                ext.library_dirs.append(library_dir)
        super().build_extension(ext)

    def _nvcc_compile(self, nvcc: str, sources: list[str], depends: list[str]) -> list[str]:
        out_dir = Path(self.build_temp) / "nvcc"
        out_dir.mkdir(parents=True, exist_ok=True)
        headers = [d for d in depends if not d.endswith(".cu")]
        objects = [str(out_dir / (Path(src).stem + ".o")) for src in sources]
        jobs = [
            (src, obj)
            for src, obj in zip(sources, objects, strict=True)
            if self.force or _is_stale(Path(obj), [src, *headers])
        ]
        if not jobs:
            return objects
        cores = os.cpu_count() or 1
        workers = max(1, min(len(jobs), self.parallel if isinstance(self.parallel, int) else cores))
        threads = max(1, min(len(GENCODE) // 2, cores // workers))  # nvcc --threads: archs in parallel

        def compile_one(job: tuple[str, str]) -> None:
            src, obj = job
            fast_math = ["--use_fast_math"] if Path(src).name in FAST_MATH_SOURCES else []
            command = [nvcc, "-c", src, "-o", obj, *NVCC_FLAGS, *fast_math, *GENCODE]
            command += ["--threads", str(threads)]
            print(shlex.join(command), flush=True)
            started = time.monotonic()
            result = subprocess.run(command, capture_output=True, text=True, check=False)
            output = (result.stdout + result.stderr).strip()
            if result.returncode != 0:
                raise CompileError(f"nvcc failed on {src} (exit {result.returncode}):\n{output}")
            if output:  # warnings
                print(output, file=sys.stderr, flush=True)
            print(f"nvcc: {src} built in {time.monotonic() - started:.1f}s", flush=True)

        with ThreadPoolExecutor(max_workers=workers) as pool:
            # list() re-raises the first failure; the pool still waits for the other jobs.
            list(pool.map(compile_one, jobs))
        return objects


def _warn_stale_inplace_build() -> None:
    """An in-place ``_C`` left by an earlier editable build would still be imported; say so."""
    stale = Path(__file__).resolve().parent / "effdecode" / ("_C" + sysconfig.get_config_var("EXT_SUFFIX"))
    if stale.exists():
        print(
            f"effdecode: CUDA build skipped, but {stale} from an earlier build remains and will still be "
            "imported by editable installs and source-tree runs; delete it to drop the CUDA backend.",
            file=sys.stderr,
        )


def _cuda_extensions() -> list:
    """``effdecode._C`` where nvcc is available and the build is not skipped, else nothing."""
    nvcc = None if os.environ.get(SKIP_ENV) == "1" else find_nvcc()
    if nvcc is None:
        _warn_stale_inplace_build()
        return []
    from pybind11.setup_helpers import Pybind11Extension  # a build requirement, needed only here

    csrc = Path(__file__).resolve().parent / CSRC
    headers = sorted(f"{CSRC}/{p.name}" for pattern in ("*.h", "*.cuh") for p in csrc.glob(pattern))
    cuda_sources = sorted(f"{CSRC}/{p.name}" for p in csrc.glob("*.cu"))
    extension = Pybind11Extension(
        "effdecode._C",
        sources=[f"{CSRC}/bindings.cpp"],
        include_dirs=[CSRC],
        cxx_std=17,
        depends=[*cuda_sources, *headers],  # relink when a kernel or header changes
        libraries=["cudart_static", "rt", "pthread", "dl"],  # what nvcc's default -cudart static links
        # Keep the static runtime's symbols private, so they never resolve against torch's libcudart.so.
        extra_link_args=["-Wl,--exclude-libs,ALL"],
    )
    extension.cuda_sources = cuda_sources
    extension.nvcc = nvcc
    return [extension]


setup(
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    package_data=PACKAGE_DATA,
    ext_modules=_cuda_extensions(),
    cmdclass={"build_ext": BuildExtWithNvcc},
)
