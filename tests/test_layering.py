"""Dependencies point one way: flows → reports → privacy → synth. `synth` (the base package) imports none of the
packages above it, at module level or inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ABOVE = {"synth": {"privacy", "reports", "flows"}, "privacy": {"reports", "flows"}, "reports": {"flows"}}


def imported_packages(path: Path) -> set[str]:
    """Top-level package names a module imports anywhere (absolute imports, `import x` and `from x import y`)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
            "import_module", "__import__"
        ) and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            names.add(node.args[0].value.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(ABOVE))
def test_a_package_imports_nothing_above_it(package: str):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files
    leaks = {str(f.relative_to(ROOT)): sorted(imported_packages(f) & ABOVE[package]) for f in files}
    assert {f: above for f, above in leaks.items() if above} == {}


def test_the_check_sees_imports_inside_functions(tmp_path: Path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from privacy.dp import make_strategy\n    import flows.cli\n"
                      "    importlib.import_module('reports.report')\n")
    assert imported_packages(module) == {"privacy", "flows", "reports"}
