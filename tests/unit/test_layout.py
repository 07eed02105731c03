"""The architecture, checked: which package may import which (DESIGN.md's parts)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


# (package folder, top-level modules it must never import, why)
RULES = [
    (
        "rules",
        {"egress", "ratelimit", "asyncio", "socket", "redis"},
        "pure policy: no I/O, no egress",
    ),
    ("rules/stores", {"egress", "ratelimit"}, "stores do I/O but know nothing of egress"),
    ("ratelimit", {"rules", "egress"}, "rules and ratelimit meet only in egress/policy.py"),
    ("egress/proto", {"asyncio", "socket"}, "sans-I/O parsing: bytes in, events out"),
]


@pytest.mark.parametrize(("folder", "forbidden", "why"), RULES, ids=[r[0] for r in RULES])
def test_package_boundaries(folder: str, forbidden: set[str], why: str) -> None:
    files = sorted((ROOT / folder).rglob("*.py"))
    if folder == "rules":  # the stores are the one part of rules that does I/O
        files = [path for path in files if "stores" not in path.relative_to(ROOT).parts]
    assert files
    for path in files:
        wrong = _imports(path) & forbidden
        assert not wrong, f"{path.relative_to(ROOT)} imports {sorted(wrong)}: {why}"


def test_only_limits_joins_rules_and_ratelimit() -> None:
    """An app's limits (rules) meet the buckets (ratelimit) in one module; the shaper and
    the test fakes aside, nothing else needs both."""
    both = [
        path.relative_to(ROOT).as_posix()
        for path in sorted((ROOT / "egress").rglob("*.py"))
        if {"rules", "ratelimit"} <= _imports(path)
    ]
    assert both == ["egress/limits.py"]


def test_the_sandbox_shim_is_standard_library_only() -> None:
    """egress/sandbox is injected into app interpreters and copied into images on its own:
    every absolute import is a standard-library module, everything else is relative."""
    files = sorted((ROOT / "egress" / "sandbox").rglob("*.py"))
    assert len(files) >= 8
    for path in files:
        outside = {name for name in _imports(path) if name not in sys.stdlib_module_names}
        assert not outside, f"{path.relative_to(ROOT)} imports {sorted(outside)}"
        tree = ast.parse(path.read_text(), str(path))
        own = [
            node.module
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
            if node.module.startswith("egress")
        ]
        assert not own, f"{path.relative_to(ROOT)} imports {own} absolutely: use relative imports"
