"""The package's layout: no import cycles, hidden or not, and every module importable first.

An import inside a function is how a cycle hides (it works until someone moves it to the
top); the static check below counts those imports too, so a cycle fails here however it is
spelt. The dynamic check imports each module first in a clean ``sys.modules``, then all of
them in random orders.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "adapterkit"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path, name: str, modules: set[str]) -> set[str]:
    """Every adapterkit module ``name`` imports, at any depth (functions included), except under TYPE_CHECKING."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            # `from pkg import mod` runs pkg's __init__ too: both are dependencies.
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {m for m in found if m in modules and m != name}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strongconnect(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return out


def test_the_import_graph_has_no_cycle_even_through_imports_inside_functions():
    modules = _modules()
    graph = {name: _imports(path, name, set(modules)) for name, path in modules.items()}
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle_hidden_in_a_function(tmp_path):
    a = tmp_path / "a.py"
    a.write_text("import adapterkit.b\n")
    b = tmp_path / "b.py"
    b.write_text("def f():\n    from adapterkit import a\n")
    graph = {"adapterkit.a": {"adapterkit.b"}, "adapterkit.b": set()}
    graph["adapterkit.b"] = _imports(b, "adapterkit.b", {"adapterkit.a", "adapterkit.b"})
    assert _cycles(graph) == [["adapterkit.a", "adapterkit.b"]]


def test_every_module_imports_first_and_in_any_order():
    names = sorted(_modules())
    script = textwrap.dedent(
        """
        import importlib, random, sys

        names = sys.argv[1:]

        def purge():
            for key in [k for k in sys.modules if k == "adapterkit" or k.startswith("adapterkit.")]:
                del sys.modules[key]

        failed = []
        for name in names:                       # each module first, in a clean package
            purge()
            try:
                importlib.import_module(name)
            except Exception as err:
                failed.append(f"{name} first: {type(err).__name__}: {err}")
        for seed in range(3):                    # then all of them, shuffled
            purge()
            order = list(names)
            random.Random(seed).shuffle(order)
            for name in order:
                try:
                    importlib.import_module(name)
                except Exception as err:
                    failed.append(f"seed {seed}, {name}: {type(err).__name__}: {err}")
        print("\\n".join(failed))
        sys.exit(1 if failed else 0)
        """
    )
    done = subprocess.run([sys.executable, "-c", script, *names], capture_output=True, text=True, timeout=600,
                          cwd=PACKAGE.parent)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
