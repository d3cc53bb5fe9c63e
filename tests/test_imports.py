"""The package's module-level imports, read from the source (AST, nothing is
imported): no circle, and no arrow up the layers tools -> passes -> runtime ->
graphs. Imports inside functions are left out: they run when called, after
every module has loaded (the package uses them to keep an import light)."""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("graphs", "passes", "runtime", "tools")
LAYER = {"graphs": 0, "runtime": 1, "passes": 2, "tools": 3}


def module_name(path: pathlib.Path) -> str:
    parts = ["passlab", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, pathlib.Path]:
    files = [ROOT / "__init__.py"] + [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]
    return {module_name(p): p for p in files}


def top_level_imports(tree: ast.Module):
    """Import statements run at import time: module level, and inside module-level
    if/try/with blocks; not inside functions or classes' methods."""
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.If, ast.Try, ast.With, ast.ClassDef)) or type(node).__name__ == "TryStar":
            for field in ("body", "orelse", "finalbody", "handlers"):
                for child in getattr(node, field, []):
                    todo.extend(child.body if isinstance(child, ast.ExceptHandler) else [child])


def edges(name: str, path: pathlib.Path, known: set[str]) -> set[str]:
    """The package modules `name` imports at import time (`from X import y`
    counts as X.y where that is a module, else X)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in top_level_imports(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[:len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        out.update(t for t in targets if t in known and t != name)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: edges(name, path, set(mods)) for name, path in mods.items()}


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    """One import circle of `g` (as a path that ends where it starts), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(g.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None
    for n in sorted(g):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_the_scan_sees_the_package():
    g = graph()
    assert "passlab.runtime.codegen.loading" in g and "passlab.tools.cli" in g
    assert "passlab.runtime.codegen.exprs" in g["passlab.runtime.codegen.cpp"]


def test_the_scan_finds_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circle():
    cycle = find_cycle(graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYER[parts[1]] if len(parts) > 1 else len(LAYER)


@pytest.mark.parametrize("pkg", PACKAGES)
def test_imports_point_down(pkg):
    up = sorted(f"{a} -> {b}" for a, bs in graph().items() if a.startswith(f"passlab.{pkg}") for b in bs
                if layer(b) > LAYER[pkg])
    assert not up, "imports up the layers: " + ", ".join(up)
