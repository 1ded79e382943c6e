"""The project's packages import each other without circles: every import, at module level or
inside a function, of lvspec/, pipeline/ and jobs/, read from the source (nothing is imported)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lvspec", "pipeline", "jobs")


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            found[".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports. `from pkg import sub` names the submodule (the
    package's own __init__ is not an edge then), `from mod import name` the module."""
    mods = modules()
    graph = {name: set() for name in mods}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
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


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_the_project():
    graph = import_graph()
    assert {"lvspec.engine", "pipeline.caption", "pipeline.peers", "pipeline.replica", "jobs.caption"} <= set(graph)
    assert "pipeline.replica" in graph["pipeline.peers"] and "lvspec.families" in graph["lvspec.cycle"] and "lvspec.cycle" in graph["lvspec.engine"]
    assert cycles(graph) == []


def imported_roots(package: str) -> dict[str, set[str]]:
    """Top-level name -> the modules of `package` that import it (anywhere in the module)."""
    found: dict[str, set[str]] = {}
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(path.name)
    return found


# What each package may not import (README, "Layout"): the engine knows no Ray, storage or job; the
# pipeline no entry point, benchmark or toy world; nothing but tests imports a benchmark.
FORBIDDEN = {"lvspec": {"pipeline", "jobs", "bench", "toyworld", "ray", "pyarrow", "fsspec", "s3fs", "decord",
                        "omegaconf"},
             "pipeline": {"jobs", "bench", "toyworld"},
             "jobs": {"bench", "toyworld"},
             "toyworld": {"jobs", "bench"},
             "infra": {"lvspec", "pipeline", "jobs", "bench", "toyworld"}}


def test_each_package_imports_only_what_its_layer_may():
    assert "torch" in imported_roots("lvspec") and "ray" in imported_roots("pipeline")  # the scan sees imports
    broken = {pkg: {name: sorted(by) for name, by in imported_roots(pkg).items() if name in banned}
              for pkg, banned in FORBIDDEN.items()}
    assert not any(broken.values()), broken
