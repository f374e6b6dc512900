"""bench/ keeps its layers: benchmarks share the harness modules, never each other's internals.

The benchmark scripts (``python -m bench.<name>``) import only the shared modules
(``SHARED``) and the worker-side apps their workers run (``WORKER_APPS``); the shared
modules import only each other; no bench module uses another's underscore names; and
there is no import cycle among bench modules, function-level imports included (that is
where the last one hid). Static: the files are parsed, never imported (importing a
benchmark's app would build mcpq's Celery app).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"
SHARED = {"environment", "harness", "cpu", "runner", "stats"}
WORKER_APPS = {"app", "baselines"}


@dataclass(frozen=True)
class Use:
    """One use of another bench module: ``module`` imported, or ``name`` taken from it."""

    module: str
    name: str | None
    line: int


def _bench_target(dotted: str) -> str | None:
    """``bench.latency`` -> ``latency``; None for anything outside bench's modules."""
    parts = dotted.split(".")
    return parts[1] if len(parts) >= 2 and parts[0] == "bench" else None


def uses(source: str, modules: set[str]) -> list[Use]:
    """Every bench module ``source`` imports, at any depth, and every name it takes from one:
    imported names, and attributes read through a module alias (``lat._x``)."""
    tree = ast.parse(source)
    out: list[Use] = []
    aliases: dict[str, str] = {}  # local name -> bench module, for attribute reads
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _bench_target(alias.name)
                if target is None:
                    continue
                out.append(Use(target, None, node.lineno))
                if alias.asname:
                    aliases[alias.asname] = target
        elif isinstance(node, ast.ImportFrom):
            relative = f"bench.{node.module}" if node.module else "bench"
            base = relative if node.level else node.module or ""  # a relative import is inside bench
            if base == "bench":  # from bench import latency [as lat]
                for alias in node.names:
                    if alias.name in modules:
                        out.append(Use(alias.name, None, node.lineno))
                        aliases[alias.asname or alias.name] = alias.name
                continue
            target = _bench_target(base)
            if target is None:
                continue
            out.append(Use(target, None, node.lineno))
            out += [Use(target, alias.name, node.lineno) for alias in node.names]
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        value = node.value
        if isinstance(value, ast.Name) and value.id in aliases:
            out.append(Use(aliases[value.id], node.attr, node.lineno))
        elif (  # bench.latency._x after ``import bench.latency``
            isinstance(value, ast.Attribute)
            and isinstance(value.value, ast.Name)
            and value.value.id == "bench"
            and value.attr in modules
        ):
            out.append(Use(value.attr, node.attr, node.lineno))
    return out


def _modules() -> dict[str, list[Use]]:
    names = {p.stem for p in BENCH.glob("*.py") if p.stem != "__init__"}
    return {
        name: [u for u in uses((BENCH / f"{name}.py").read_text(), names) if u.module != name]
        for name in sorted(names)
    }


def test_the_checker_sees_module_aliases_and_private_names() -> None:
    source = (
        "from bench import latency as lat\n"
        "import bench.soak\n"
        "def f():\n"
        "    from bench.runner import _interrupt\n"
        "    return lat._git_state(), bench.soak._probe\n"
    )
    found = {(u.module, u.name) for u in uses(source, {"latency", "soak", "runner"})}
    assert {("latency", None), ("soak", None), ("runner", None)} <= found
    assert {("latency", "_git_state"), ("soak", "_probe"), ("runner", "_interrupt")} <= found


def test_bench_modules_are_all_known() -> None:
    # A new bench module is either a shared one, a worker app or a benchmark script; the
    # lists above say which (benchmarks are everything else).
    graph = _modules()
    assert set(graph) >= SHARED | WORKER_APPS
    assert {"latency", "throughput", "soak", "startup"} <= set(graph) - SHARED - WORKER_APPS
    assert any(u.module == "harness" for u in graph["latency"])  # the parse found something


def test_no_bench_module_uses_another_ones_private_names() -> None:
    bad = [
        f"bench/{name}.py:{u.line} uses bench.{u.module}.{u.name}"
        for name, found in _modules().items()
        for u in found
        if u.name is not None and u.name.startswith("_") and not u.name.startswith("__")
    ]
    assert not bad, "\n".join(bad)


def test_benchmarks_import_only_the_shared_modules_and_worker_apps() -> None:
    bad = []
    for name, found in _modules().items():
        allowed = SHARED if name in SHARED else SHARED | WORKER_APPS
        wrong = [u for u in found if u.name is None and u.module not in allowed]
        bad += [f"bench/{name}.py:{u.line} imports bench.{u.module}" for u in wrong]
    assert not bad, "\n".join(bad)


def test_no_import_cycle_among_bench_modules() -> None:
    graph = {name: sorted({u.module for u in found}) for name, found in _modules().items()}
    cycles: list[list[str]] = []
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            cycles.append([*path[path.index(node) :], node])
            return
        if node in done:
            return
        for nxt in graph.get(node, []):
            visit(nxt, [*path, node])
        done.add(node)

    for name in graph:
        visit(name, [])
    assert not cycles, "\n".join(" -> ".join(f"bench.{m}" for m in c) for c in cycles)
