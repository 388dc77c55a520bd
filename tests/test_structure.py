"""The package's import structure (issue #22): the modules of ``redis_batcher`` import one
another without cycles, and none imports another inside a function to dodge one.

Every import counts: at the top of a module, under ``if TYPE_CHECKING:``, and inside a
function or method."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "redis_batcher"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE

# imports inside a function body that are wanted there, each with its reason
LOCAL_IMPORTS_ALLOWED = {
    ("cli_demo", "demo"): "redis_batcher.demo makes its batcher (and reads $REDIS_URL) when imported",
}


def module_names() -> dict[str, Path]:
    return {path.stem: path for path in sorted(ROOT.glob("*.py"))}


def imported(module: str, node: ast.Import | ast.ImportFrom, known: set[str]) -> set[str]:
    """The package's own modules that ``node`` (in ``module``) imports."""
    found: set[str] = set()
    if isinstance(node, ast.Import):
        for alias in node.names:
            parts = alias.name.split(".")
            if parts[0] == PACKAGE and len(parts) > 1 and parts[1] in known:
                found.add(parts[1])
        return found
    if node.level == 0:
        parts = (node.module or "").split(".")
        if parts[0] != PACKAGE:
            return found
        rest = parts[1:]
    elif node.level == 1:
        rest = (node.module or "").split(".") if node.module else []
    else:  # no subpackages: a relative import from above the package
        return found
    if rest:
        if rest[0] in known:
            found.add(rest[0])
        return found
    # "from . import ops": each name is a module of the package (or something of __init__)
    for alias in node.names:
        found.add(alias.name if alias.name in known else "__init__")
    return found


class Imports(ast.NodeVisitor):
    def __init__(self, module: str, known: set[str]) -> None:
        self.module = module
        self.known = known
        self.depth = 0  # functions the visitor is inside
        self.all: set[str] = set()
        self.local: set[str] = set()

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    def visit_Lambda(self, node: ast.Lambda) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    def _imports(self, node: ast.Import | ast.ImportFrom) -> None:
        names = imported(self.module, node, self.known) - {self.module}
        self.all |= names
        if self.depth:
            self.local |= names

    def visit_Import(self, node: ast.Import) -> None:
        self._imports(node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        self._imports(node)


def graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(every import, imports inside functions), as module -> the package's modules it imports."""
    modules = module_names()
    known = set(modules)
    edges: dict[str, set[str]] = {}
    local: dict[str, set[str]] = {}
    for name, path in modules.items():
        visitor = Imports(name, known)
        visitor.visit(ast.parse(path.read_text(encoding="utf-8"), str(path)))
        edges[name] = visitor.all
        local[name] = visitor.local
    return edges, local


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), plus self-loops."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
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
            if len(component) > 1 or v in edges.get(v, ()):
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_graph_is_read() -> None:
    edges, _ = graph()
    assert {"batcher", "executor", "ops", "processor", "jobs"} <= set(edges)
    assert "ops" in edges["executor"] and "executor" in edges["batcher"]


def test_the_package_imports_no_module_in_a_circle() -> None:
    edges, _ = graph()
    assert cycles(edges) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_imports_another_inside_a_function() -> None:
    _, local = graph()
    found = {(module, other) for module, others in local.items() for other in others}
    assert found == set(LOCAL_IMPORTS_ALLOWED)


def test_the_definitions_and_the_ops_hold_no_client_code() -> None:
    """The client-free layer imports neither the executors nor what is built on them."""
    edges, _ = graph()
    io_modules = {"executor", "executor_async", "batcher", "asyncio", "processor", "jobs", "jobs_async"}
    for low in (
        "definition",
        "calls",
        "ops",
        "dead_ops",
        "pause_ops",
        "layout_ops",
        "options",
        "keys",
        "models",
        "codec",
        "executor_core",
        "delivery",
    ):
        assert not edges[low] & io_modules, (low, edges[low] & io_modules)


MAX_MODULE_LINES = 600


def test_no_module_outgrows_what_a_reader_takes_in_at_once() -> None:
    """Modules stay small and named for their role: one over ~600 lines is split by role."""
    paths = [*ROOT.glob("*.py"), *ROOT.glob("*/*.py")]
    sizes = {str(p.relative_to(ROOT)): len(p.read_text(encoding="utf-8").splitlines()) for p in paths}
    too_big = {name: n for name, n in sizes.items() if n > MAX_MODULE_LINES}
    assert not too_big, too_big
