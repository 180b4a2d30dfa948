"""Architecture rules that are easy to break without noticing."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_core_never_imports_streamlit():
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "core").rglob("*.py") if "streamlit" in imported_modules(p)]
    assert offenders == []


def test_metric_module_has_one_import_per_line():
    # evaluate's dependency scanner reads import lines literally ("import a, b" asks for a package "a,").
    for path in (ROOT / "core" / "evaluation" / "metric_modules").rglob("*.py"):
        for line in path.read_text().splitlines():
            if line.startswith("import "):
                assert "," not in line, f"{path}: {line}"
