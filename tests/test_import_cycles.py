"""No import circles among medseg's modules, imports inside functions included.

The package's sources are parsed (``ast``): every ``import medseg.x``, ``from medseg.x import y``
(``y`` counts when it is itself a module), relative import and ``importlib.import_module("medseg.x")``
with a literal name is an edge, wherever it sits in the file; ``from medseg.pkg import name`` of a name that is no module is an
edge to the package (its ``__init__``). The implicit import of a package's ``__init__`` before a
submodule is left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "medseg"

#: Cycles left in files other helpers of issue 21 own, for the coordinator to empty after merging:
#: each entry is the sorted tuple of a cycle's modules, with the owner named.
ALLOWED: dict[tuple[str, ...], str] = {
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The medseg modules ``module`` imports anywhere in its file."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    tree = ast.parse(path.read_text(), str(path))
    # ``if TYPE_CHECKING:`` blocks never run: names for annotations only are no import.
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and getattr(block.test, "id", getattr(block.test, "attr", None)) == "TYPE_CHECKING"
                   for stmt in block.body for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # each imported name: the submodule of that name, else the module it is read from
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names = [node.args[0].value]
        for name in names:
            if name == "medseg" or name.startswith("medseg."):
                target = _resolve(name, modules)
                if target and target != module and target != "medseg":
                    found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: imports_of(m, p, modules) for m, p in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[tuple[str, ...]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[tuple[str, ...]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(tuple(sorted(comp)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def test_the_checker_finds_a_circle_inside_a_function():
    graph = {"medseg.a": {"medseg.b"}, "medseg.b": {"medseg.c"}, "medseg.c": {"medseg.a"}, "medseg.d": {"medseg.a"}}
    assert cycles(graph) == [("medseg.a", "medseg.b", "medseg.c")]
    source = "def f():\n    from medseg.transforms import pipeline\n    import importlib\n" \
             "    importlib.import_module('medseg.data.plan')\n"
    tree_path = ROOT / "transforms" / "registry.py"
    modules = {"medseg.transforms.registry": tree_path, "medseg.transforms.pipeline": tree_path,
               "medseg.data.plan": tree_path, "medseg.transforms": tree_path}
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe.py"
        probe.write_text(source)
        assert imports_of("medseg.transforms.probe", probe, modules) == {"medseg.transforms.pipeline",
                                                                          "medseg.data.plan"}
        # An import for annotations only (never run) is no edge; one beside it still is.
        probe.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from medseg.data import plan\n"
                         "import medseg.transforms.pipeline\n")
        assert imports_of("medseg.transforms.probe", probe, modules) == {"medseg.transforms.pipeline"}


def test_no_import_cycles():
    found = cycles(import_graph())
    unexpected = [c for c in found if c not in ALLOWED]
    assert not unexpected, "import circles: " + "; ".join(" <-> ".join(c) for c in unexpected)
    stale = [c for c in ALLOWED if c not in found]
    assert not stale, f"allowed cycles that are gone (remove them from ALLOWED): {stale}"


def test_no_module_over_500_lines_and_no_function_over_80():
    """Issue 21's size rule, for every module of the package: a newcomer reads one rule at a time."""
    long_modules = {str(p.relative_to(ROOT.parent)): n for p in ROOT.rglob("*.py")
                    if (n := len(p.read_text().splitlines())) > 500}
    long_functions = []
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                long_functions.append(f"{path.relative_to(ROOT.parent)}:{node.lineno} {node.name}")
    assert not long_modules, long_modules
    assert not long_functions, long_functions
