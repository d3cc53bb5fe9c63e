"""No function in the package is over 80 lines (from `def` to its last line,
docstring included): a longer one is split into steps that each have a name."""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
LIMIT = 80


def long_functions(root: pathlib.Path = ROOT, limit: int = LIMIT) -> list[str]:
    out = []
    for path in sorted(p for pkg in ("graphs", "passes", "runtime", "tools") for p in (root / pkg).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    out.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({lines} lines)")
    return out


def test_no_function_over_80_lines():
    assert long_functions() == []


def test_the_scan_counts_lines(tmp_path):
    (tmp_path / "tools").mkdir()
    body = "".join(f"    x{i} = {i}\n" for i in range(LIMIT))
    (tmp_path / "tools" / "m.py").write_text(f"def short():\n    pass\n\n\ndef long():\n{body}")
    assert long_functions(tmp_path) == [f"tools/m.py:5 long ({LIMIT + 1} lines)"]
