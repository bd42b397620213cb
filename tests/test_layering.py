"""The house's rules, checked on the source: imports point down, the CLI is the top layer,
commands only parse-call-print, and no library function grows past 80 lines (issue #14)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = [p for d in ("difffeat", "heads", "tasks") for p in sorted((ROOT / d).rglob("*.py"))]
CORE = [p for p in LIBRARY if p.parts[-2:-1] != ("cli",) and "difffeat" in p.relative_to(ROOT).parts[:1]
        and "explore" not in p.relative_to(ROOT).parts and p.name != "__main__.py"]


def imported(path: Path) -> set[str]:
    """Every module ``path`` imports (absolute, relative ones resolved against difffeat)."""
    tree = ast.parse(path.read_text(), str(path))
    pkg = ["difffeat"] + list(path.relative_to(ROOT).parts[1:-1]) if path.parts[-2] != "difffeat" else ["difffeat"]
    if path.relative_to(ROOT).parts[0] in ("heads", "tasks"):
        pkg = ["difffeat", path.relative_to(ROOT).parts[0]]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - node.level + 1]
                names.add(".".join(base + ([node.module] if node.module else [])))
            else:
                names.add(node.module or "")
    return names


def _uses(names: set[str], prefix: str) -> bool:
    return any(n == prefix or n.startswith(prefix + ".") for n in names)


@pytest.mark.parametrize("path", [p for p in LIBRARY if p.relative_to(ROOT).parts[0] in ("heads", "tasks")],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_tasks_and_heads_import_no_click_and_no_cli(path: Path) -> None:
    names = imported(path)
    assert not _uses(names, "click"), f"{path.name} imports click: commands belong in difffeat/cli/"
    assert not _uses(names, "difffeat.cli"), f"{path.name} imports the CLI, the top layer"


@pytest.mark.parametrize("path", CORE, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_core_imports_no_heads_tasks_or_cli(path: Path) -> None:
    names = imported(path)
    for upper in ("difffeat.heads", "difffeat.tasks", "difffeat.cli", "click"):
        assert not _uses(names, upper), f"{path.relative_to(ROOT)} imports {upper}"


def _functions(path: Path) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    tree = ast.parse(path.read_text(), str(path))
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def _is_command(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    return any("command" in ast.unparse(d) for d in fn.decorator_list)


def _body_lines(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines of the body without the docstring."""
    body = fn.body[1:] if fn.body and isinstance(fn.body[0], ast.Expr) and isinstance(
        getattr(fn.body[0], "value", None), ast.Constant) and isinstance(fn.body[0].value.value, str) else fn.body
    return (body[-1].end_lineno or 0) - body[0].lineno + 1 if body else 0


@pytest.mark.parametrize("path", sorted((ROOT / "difffeat" / "cli").glob("*.py")), ids=lambda p: p.name)
def test_commands_only_parse_call_and_print(path: Path) -> None:
    long = [f"{fn.name} ({_body_lines(fn)})" for fn in _functions(path) if _is_command(fn) and _body_lines(fn) > 25]
    assert not long, f"commands over 25 lines in {path.name}: {', '.join(long)}"


def test_no_library_function_is_over_80_lines() -> None:
    long = [f"{p.relative_to(ROOT)}::{fn.name} ({_body_lines(fn)})" for p in LIBRARY for fn in _functions(p)
            if _body_lines(fn) > 80]
    assert not long, "functions over 80 lines: " + ", ".join(long)
