"""The package's imports point one way: no module imports, at load time, one that (transitively) imports it."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "cepe_rag"
# Lower layers never import higher ones (docs/architecture.md).
FOUNDATION = {"cepe_rag.types", "cepe_rag.files", "cepe_rag.settings", "cepe_rag.models", "cepe_rag.padding",
              "cepe_rag.token_forms", "cepe_rag.lazy"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _cepe_imports(nodes) -> set[str]:
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cepe_rag"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("cepe_rag"))
    return found


def load_time_imports(path: Path) -> set[str]:
    """cepe_rag modules imported at module level (not inside functions, not under TYPE_CHECKING)."""
    return _cepe_imports(ast.parse(path.read_text()).body)


def function_imports(path: Path) -> set[str]:
    """cepe_rag modules imported inside functions (run when the function runs)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found |= _cepe_imports(ast.walk(node))
    return found


def all_imports(path: Path) -> set[str]:
    """Every cepe_rag module it imports, at load time or inside a function; only TYPE_CHECKING blocks are left out."""
    tree = ast.parse(path.read_text())
    skipped = {id(inner) for node in ast.walk(tree) if _is_type_checking(node) for inner in ast.walk(node)}
    return _cepe_imports(node for node in ast.walk(tree) if id(node) not in skipped)


def import_graph(imports=load_time_imports) -> dict[str, set[str]]:
    return {module_name(path): imports(path) for path in PACKAGE.rglob("*.py")}


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


# The floors of docs/architecture.md's diagram, top to bottom: a module imports (at load time or inside a function) only
# from its own room or from rooms on lower floors, never from a room beside it or above it.
FLOORS = [
    ["cepe_rag.cli"],
    ["cepe_rag.serving", "cepe_rag.integrations"],
    ["cepe_rag.training", "cepe_rag.bench"],
    ["cepe_rag.eval"],
    ["cepe_rag.pipelines"],
    ["cepe_rag.retrieval", "cepe_rag.readers"],
    ["cepe_rag.cepe"],
    ["cepe_rag.indexes"],
    ["cepe_rag.documents"],
    sorted(FOUNDATION),
]
ONE_ROOM = {"cepe_rag.__main__": "cepe_rag.cli", **{module: "foundation" for module in FOUNDATION}}


def room_of(module: str) -> tuple[int, str]:
    module = ONE_ROOM.get(module, module)  # `python -m cepe_rag` is the command line; the foundation is one room
    if module == "foundation":
        return len(FLOORS) - 1, module
    for floor, rooms in enumerate(FLOORS):
        for room in rooms:
            if module == room or module.startswith(room + "."):
                return floor, room
    raise AssertionError(f"{module} is on no floor: add it to docs/architecture.md and FLOORS")


def test_imports_point_down_the_diagram():
    graph = import_graph(all_imports)
    wrong = []
    for module, targets in graph.items():
        if module == "cepe_rag":
            continue
        floor, room = room_of(module)
        for target in targets - {"cepe_rag"}:
            target_floor, target_room = room_of(target)
            if target_floor < floor or (target_floor == floor and target_room != room):
                wrong.append(f"{module} -> {target}")
    assert not wrong, wrong


def test_the_diagram_names_every_room():
    diagram = (PACKAGE.parent / "docs" / "architecture.md").read_text().split("```")[1]
    for rooms in FLOORS[:-1]:
        for room in rooms:
            name = room.removeprefix("cepe_rag.")
            assert name in diagram, f"{name} is not in docs/architecture.md's diagram"


# Imports inside functions hide a module's dependencies; they are kept for optional dependencies only (Ray, installed
# by the `ray` extra, is imported only by the module that uses it).
OPTIONAL = {"cepe_rag.pipelines.ray_indexing"}


def test_package_imports_inside_functions_are_few_and_for_optional_dependencies():
    inside = {(module, target) for module, targets in import_graph(function_imports).items() for target in targets}
    assert len(inside) <= 5, sorted(inside)
    assert {target for _, target in inside} <= OPTIONAL, sorted(inside)
