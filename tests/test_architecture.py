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


# The floors of docs/architecture.md's diagram, top to bottom: a module imports (at load time) only from its own room or
# from rooms on lower floors, never from a room beside it or above it.
FLOORS = [
    ["cepe_rag.cli", "cepe_rag.serving", "cepe_rag.integrations"],
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
    graph = import_graph()
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
