"""The README's support table is what scripts/support_table.py writes from the family registry."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from effdecode.families import CHECKS, FALLBACK, SUPPORTED, unsupported_reason

ROOT = Path(__file__).resolve().parent.parent


def _script():
    spec = importlib.util.spec_from_file_location("support_table", ROOT / "scripts" / "support_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_table_is_generated_from_the_registry():
    script = _script()
    readme = (ROOT / "README.md").read_text()
    assert script.render(readme) == readme, "README.md is stale: run python scripts/support_table.py"
    table = script.support_table()
    for family in SUPPORTED.values():
        assert f"`{family.model_type}`" in table
    for model_type in FALLBACK:
        assert f"`{model_type}`" in table


def test_registry_is_consistent():
    assert not set(SUPPORTED) & set(FALLBACK)
    for model_type, family in SUPPORTED.items():
        assert family.model_type == model_type
        assert set(family.verified) <= set(CHECKS)
        assert unsupported_reason(model_type) is None
    for model_type, reason in FALLBACK.items():
        assert reason in unsupported_reason(model_type)
    assert "not verified" in unsupported_reason("no_such_family")
