"""The package's structure: no import cycle among hf_dograph's modules, no module over 500 lines.

Imports are read from the source with `ast` (nothing is imported), in every scope: module level, inside
functions, under `if TYPE_CHECKING:`. A lazy import hides a cycle from Python but not from a reader, so
it counts. `from .pkg import name` is an arrow to the submodule `pkg.name` when there is one, else to the
package's `__init__.py`; an import of `pkg.sub` is not an arrow to `pkg` as well (every submodule would
then close a loop with a package face that re-exports it).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "hf_dograph"
MAX_LINES = 500

#: Cycles that other work in progress owns, each with who removes it. An entry that no longer matches a
#: cycle of the code fails the test too, so that the list only shrinks.
KNOWN_CYCLES: dict[frozenset[str], str] = {}  # none: every arrow runs one way


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every .py under hf_dograph/ (a package is its __init__.py)."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _imported_modules(node: ast.AST, module: str, is_package: bool, modules: dict[str, Path]) -> set[str]:
    """The hf_dograph modules that one import statement of `module` loads."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name in modules}
    if not isinstance(node, ast.ImportFrom):
        return set()
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        base_parts = package[: len(package) - node.level + 1]
        base = ".".join(base_parts + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    if base not in modules:
        return set()
    return {f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names}


def import_graph() -> dict[str, dict[str, int]]:
    """module -> {imported module: line of the first import of it}, within hf_dograph."""
    modules = module_files()
    graph: dict[str, dict[str, int]] = {}
    for module, path in modules.items():
        arrows: dict[str, int] = {}
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            for target in _imported_modules(node, module, path.name == "__init__.py", modules):
                if target != module:
                    arrows[target] = min(arrows.get(target, node.lineno), node.lineno)
        graph[module] = arrows
    return graph


def strongly_connected(graph: dict[str, dict[str, int]]) -> list[set[str]]:
    """Tarjan's strongly connected components with more than one module: the import cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def describe(component: set[str], graph: dict[str, dict[str, int]]) -> str:
    modules = module_files()
    arrows = [
        f"    {a} -> {b}  ({modules[a].relative_to(PACKAGE.parent)}:{line})"
        for a in sorted(component) for b, line in sorted(graph[a].items()) if b in component
    ]
    return "cycle of " + ", ".join(sorted(component)) + ":\n" + "\n".join(arrows)


def test_no_import_cycles_between_hf_dograph_modules():
    graph = import_graph()
    cycles = strongly_connected(graph)
    unexpected = [c for c in cycles if frozenset(c) not in KNOWN_CYCLES]
    assert not unexpected, "import cycles (make the arrows run one way):\n" + "\n".join(
        describe(c, graph) for c in unexpected)
    stale = [sorted(c) for c in KNOWN_CYCLES if set(c) not in cycles]
    assert not stale, f"these cycles are gone: remove them from KNOWN_CYCLES: {stale}"


def test_the_cycle_finder_sees_lazy_and_type_checking_imports():
    """The reader itself: a function-level import and a TYPE_CHECKING import each close a cycle."""
    graph = {"a": {"b": 1}, "b": {"c": 3}, "c": {"a": 7}, "d": {"a": 1}}
    assert strongly_connected(graph) == [{"a", "b", "c"}]
    source = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..factored import Engine\n" \
             "def f():\n    from . import record\n    from .base import X\n"
    modules = {name: Path() for name in ("p", "p.factored", "p.layers", "p.layers.record", "p.layers.base")}
    found = set()
    for node in ast.walk(ast.parse(source)):
        found |= _imported_modules(node, "p.layers.generic", False, modules)
    assert found == {"p.factored", "p.layers.record", "p.layers.base"}


def test_no_module_over_500_lines():
    lengths = {str(p.relative_to(PACKAGE.parent)): len(p.read_text(encoding="utf-8").splitlines())
               for p in module_files().values()}
    long = {path: n for path, n in lengths.items() if n > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split where a second job hides inside): {long}"


def test_public_names_stay_where_users_import_them():
    """The documented entry points survive the moves (README: drop-in use; lm-eval scores from the card)."""
    import hf_dograph
    from hf_dograph import card, evaluation
    from hf_dograph.card import lm_eval_scores

    assert hf_dograph.DoGraphTrainer.__name__ == "DoGraphTrainer"
    assert hf_dograph.DoGraphConfig.__name__ == "DoGraphConfig"
    assert issubclass(hf_dograph.DoGraphTrainer, card.DoGraphCardMixin)
    assert lm_eval_scores is evaluation.lm_eval_scores and card.eval_command is evaluation.eval_command


def test_objective_params_come_from_the_settings():
    """Objectives take their own parameters (config imports objectives, never the reverse): every one of them
    is a setting of the same name, carried over by `from_settings`."""
    import dataclasses

    from hf_dograph.config import DoGraphSettings
    from hf_dograph.objectives import ObjectiveParams

    settings = DoGraphSettings(objective="robust", graph_lambda=0.5, robust_temperature=2.0, uniform_mix=0.1)
    params = ObjectiveParams.from_settings(settings)
    for f in dataclasses.fields(ObjectiveParams):
        assert getattr(params, f.name) == getattr(settings, f.name), f.name
