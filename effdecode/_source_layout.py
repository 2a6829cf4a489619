"""Make ``effdecode.kernels`` importable from a source checkout.

An installed build maps ``kernels/`` to ``effdecode/kernels`` (see ``setup.py``). When Python runs from the
repository root with no install, ``effdecode/`` has no ``kernels`` subfolder, so we load ``../kernels`` under
the name ``effdecode.kernels``.
"""

import importlib.util
import sys
from pathlib import Path


def register_source_kernels() -> None:
    """Load the checkout's ``kernels/`` as ``effdecode.kernels`` if the package has no copy of its own."""
    package_dir = Path(__file__).resolve().parent
    if "effdecode.kernels" in sys.modules or (package_dir / "kernels" / "__init__.py").is_file():
        return
    source_dir = package_dir.parent / "kernels"
    init_file = source_dir / "__init__.py"
    if not init_file.is_file():
        return
    spec = importlib.util.spec_from_file_location(
        "effdecode.kernels", init_file, submodule_search_locations=[str(source_dir)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["effdecode.kernels"] = module
    spec.loader.exec_module(module)
    sys.modules["effdecode"].kernels = module
