"""The code stays readable in pieces: no class over ~150 lines, no function over ~60, no import circle.

Read from the source with `ast` (nothing is imported), over the packages that ship:
mirrord_tun/, agent/ and netns/.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"mirrord_tun": "mirrord_tun", "agent": "mirrord_tun.agent", "netns": "mirrord_tun.netns"}
MAX_CLASS, MAX_FUNCTION = 155, 60
# Tables, not logic: one entry per BPF instruction.
TABLES = {"agent/bpf.py:program"}


def _modules() -> dict[str, Path]:
    mods = {}
    for directory, package in PACKAGES.items():
        for path in sorted((ROOT / directory).rglob("*.py")):
            parts = list(path.relative_to(ROOT / directory).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            mods[".".join([package, *parts])] = path
    return mods


MODULES = _modules()


def test_no_class_or_function_is_too_long() -> None:
    over = []
    for path in MODULES.values():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            where = f"{path.relative_to(ROOT)}:{node.name}"
            limit = MAX_CLASS if isinstance(node, ast.ClassDef) else MAX_FUNCTION
            size = (node.end_lineno or node.lineno) - node.lineno + 1
            if size > limit and where not in TABLES:
                over.append(f"{where} has {size} lines (at most {limit})")
    assert not over, "\n".join(over)


def _imports_at_load(path: Path) -> set[str]:
    """What a module imports when it is loaded: not inside functions, not for type checkers only."""
    found: set[str] = set()
    todo: list[ast.AST] = list(ast.parse(path.read_text()).body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
        todo.extend(ast.iter_child_nodes(node))
    return found & MODULES.keys()


def test_no_import_circles() -> None:
    graph = {name: _imports_at_load(path) - {name} for name, path in MODULES.items()}
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        for dep in sorted(graph[name]):
            assert dep not in path, "import circle: " + " -> ".join(path[path.index(dep):] + [dep])
            if dep not in done:
                visit(dep, path + [dep])
        done.add(name)

    for name in sorted(graph):
        visit(name, [name])
