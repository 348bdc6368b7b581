"""The package's imports point one way: no module imports, at load time, one that (transitively) imports it."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "cepe_rag"
# Lower layers never import higher ones (docs/architecture.md).
FOUNDATION = {"cepe_rag.types", "cepe_rag.files", "cepe_rag.settings", "cepe_rag.models", "cepe_rag.padding",
              "cepe_rag.lazy"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def load_time_imports(path: Path) -> set[str]:
    """cepe_rag modules imported at module level (not inside functions, not under TYPE_CHECKING)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cepe_rag"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("cepe_rag"))
    return found


def import_graph() -> dict[str, set[str]]:
    return {module_name(path): load_time_imports(path) for path in PACKAGE.rglob("*.py")}


def test_no_import_cycles():
    graph = import_graph()
    state: dict[str, str] = {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "active"
        for target in graph.get(module, ()):
            assert state.get(target) != "active", " -> ".join(trail + [module, target])
            if target not in state:
                visit(target, trail + [module])
        state[module] = "done"

    for module in graph:
        if module not in state:
            visit(module, [])


def test_the_foundation_imports_nothing_above_it():
    graph = import_graph()
    for module in FOUNDATION:
        assert graph[module] <= FOUNDATION, (module, graph[module] - FOUNDATION)
