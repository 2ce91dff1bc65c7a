"""The package's shape: no import cycle among jepa_cache modules (function-level imports included), and no
module, function or line over the sizes that keep each file about one job."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "jepa_cache"


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the jepa_cache modules it imports anywhere in its body (absolute or relative)."""
    modules = {p.stem for p in package.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in sorted(package.glob("*.py")):
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[1] for a in node.names if a.name.startswith(f"{package.name}.")]
            elif isinstance(node, ast.ImportFrom):
                if node.level == 1 or (node.level == 0 and (node.module or "").split(".")[0] == package.name):
                    parts = (node.module or "").split(".")[0 if node.level else 1:]
                    names = [parts[0]] if parts and parts[0] else [a.name for a in node.names]
            found |= {n for n in names if n in modules and n != path.stem}
        graph[path.stem] = found
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_no_import_cycle_among_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_sees_function_level_and_relative_imports(tmp_path):
    pkg = tmp_path / "jepa_cache"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import x\n")
    (pkg / "b.py").write_text("def f():\n    from jepa_cache import c\n")
    (pkg / "c.py").write_text("import jepa_cache.a\n")
    graph = import_graph(pkg)
    assert graph == {"__init__": set(), "a": {"b"}, "b": {"c"}, "c": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    (pkg / "c.py").write_text("import os\n")
    assert find_cycle(import_graph(pkg)) is None


MAX_MODULE_LINES, MAX_FUNCTION_LINES, MAX_LINE_CHARS = 400, 60, 120  # issue 14: one room, one job


def size_problems(package: Path = PACKAGE) -> list[str]:
    """Modules, functions and lines over the limits, as `file: what`."""
    problems = []
    for path in sorted(package.glob("*.py")):
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        if len(lines) > MAX_MODULE_LINES:
            problems.append(f"{path.name}: {len(lines)} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    problems.append(f"{path.name}: {node.name} is {length} lines")
        problems += [f"{path.name}:{i}: {len(line)} characters" for i, line in enumerate(lines, 1)
                     if len(line) > MAX_LINE_CHARS]
    return problems


def test_modules_functions_and_lines_stay_small():
    problems = size_problems()
    assert not problems, "split these by job (README: Where things are):\n" + "\n".join(problems)


def test_the_size_check_sees_each_kind_of_excess(tmp_path):
    pkg = tmp_path / "jepa_cache"
    pkg.mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (pkg / "long_function.py").write_text(f"def f():\n{body}\n")
    (pkg / "long_module.py").write_text("x = 1\n" * (MAX_MODULE_LINES + 1))
    (pkg / "long_line.py").write_text("x = '" + "a" * MAX_LINE_CHARS + "'\n")
    (pkg / "fine.py").write_text("def f():\n    return 1\n")
    assert size_problems(pkg) == [
        "long_function.py: f is 61 lines",
        "long_line.py:1: 126 characters",
        f"long_module.py: {MAX_MODULE_LINES + 1} lines",
    ]
