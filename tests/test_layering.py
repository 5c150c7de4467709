"""The package's modules import only what sits below them in the pipeline: no import circle anywhere.

Every `import` counts, also one inside a function (a lazy import is still a dependency: it
only hides a circle until the day the two modules load in the other order).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "evomerge"


def _modules() -> dict[str, tuple[Path, bool]]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the evomerge modules it imports (at the top or inside a function)."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, (path, is_package) in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                if node.level:
                    anchor = anchor[:len(anchor) - (node.level - 1)]
                    target = ".".join(anchor + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                targets = [f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules:     # `evomerge.x.y` where y is a name in module x
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_circle_finder_finds_a_circle() -> None:
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_a_module_that_imports_it_back() -> None:
    graph = import_graph()
    assert {"evomerge.search", "evomerge.storage", "evomerge.export.run"} <= graph.keys()
    assert "evomerge.storage" in graph["evomerge.search"]             # lazy imports are read too
    found = circles(graph)
    detail = [[f"{a} -> {', '.join(sorted(graph[a] & set(c)))}" for a in c] for c in found]
    assert not found, detail


def test_the_pipeline_reads_downwards() -> None:
    """The stages named in STYLE.md import only stages below them."""
    graph = import_graph()
    order = ["evomerge.errors", "evomerge.methods", "evomerge.sources", "evomerge.config", "evomerge.kernel",
             "evomerge.storage", "evomerge.search", "evomerge.demo", "evomerge.compare", "evomerge.cli"]
    for i, stage in enumerate(order):
        above = set(order[i + 1:])
        for module in (m for m in graph if m == stage or m.startswith(stage + ".")):    # a package's modules too
            assert not (graph[module] & above), (module, sorted(graph[module] & above))
    assert not graph["evomerge.export.run"] & {"evomerge.search", "evomerge.demo", "evomerge.compare"}
    assert not graph["evomerge.evaluate.tasks"] & {"evomerge.evaluate.harness"}


def test_the_kernel_reads_plans_not_recipes() -> None:
    """The kernel's modules see a recipe only as the MergePlan it resolves to (plan.py)."""
    graph = import_graph()
    kernel = [m for m in graph if m == "evomerge.kernel" or m.startswith("evomerge.kernel.")]
    assert len(kernel) >= 4
    for module in kernel:
        assert "evomerge.recipe" not in graph[module], module
    assert "evomerge.recipe" not in graph["evomerge.plan"]


def test_no_module_holds_two_things() -> None:
    """A file past 450 lines holds two things (STYLE.md): none of the package's does."""
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 450}
    assert not long, long


@pytest.mark.slow     # a subprocess
def test_importing_evomerge_leaves_the_allocator_alone(tmp_path) -> None:
    """The kernel raises glibc's mmap threshold for its chunk temporaries: when the first merger on the CPU is
    made, never as a side effect of importing the package (a library imported by someone else's program)."""
    import subprocess
    import sys

    from modelfactory import make_family

    base, sources = make_family(tmp_path / "fam", k=2)
    probe = ("import sys\n"
             "import evomerge.kernel as k, evomerge.search, evomerge.cli, evomerge.export.run\n"
             "from evomerge.sources import open_sources\n"
             "print(k.memory.keep_chunk_temporaries_on_the_heap.cache_info().currsize)\n"
             "k.ResidentMerger(open_sources(sys.argv[1], sys.argv[2:]), build_model=False)\n"
             "print(k.memory.keep_chunk_temporaries_on_the_heap.cache_info().currsize)\n")
    out = subprocess.run([sys.executable, "-c", probe, str(base), *map(str, sources)], capture_output=True,
                         text=True, check=True, cwd=PACKAGE.parent).stdout.split()
    assert out == ["0", "1"]
