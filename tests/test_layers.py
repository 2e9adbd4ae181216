"""The layers, read from the import graph: the foundation at the bottom, teachers and student on it, the jobs on top.

    pipeline/data/   shards, index, images, stores, the training loader, config loading, errors: imports no
                     other layer, so a store or a shard can be read without models or Ray
    teachers/        frozen teachers: import only themselves and the foundation
    student/         the student and its trainer: import only themselves and the foundation (never a teacher:
                     online targets are built by the CLI and passed into `train`)
    pipeline/*       the CLI and the jobs (precompute, verify, status, preview, estimate, demo, ...): anything

Every import counts, at module level or inside a function, so an import placed in a function cannot hide an
arrow that runs the wrong way. And the whole graph, function-level imports included, has no cycle, so no import
is put in a function to dodge one. Imports under `if TYPE_CHECKING:` never run and are left out of the cycle check
(they still obey the layers).
"""

from __future__ import annotations

import ast
import shutil
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "teachers", "student")
FOUNDATION = "pipeline.data"


@dataclass(frozen=True)
class Edge:
    importer: str
    imported: str
    line: int
    type_checking: bool


def layer_of(module: str) -> str:
    """'foundation', 'teachers', 'student' or 'jobs'. The empty `pipeline` package file counts as foundation: every
    import of pipeline.data runs it."""
    if module == "pipeline" or module == FOUNDATION or module.startswith(FOUNDATION + "."):
        return "foundation"
    top = module.split(".")[0]
    return {"teachers": "teachers", "student": "student"}.get(top, "jobs")


ALLOWED = {
    "foundation": {"foundation"},
    "teachers": {"foundation", "teachers"},
    "student": {"foundation", "student"},
    "jobs": {"foundation", "teachers", "student", "jobs"},
}


def _modules(root: Path) -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def import_edges(root: Path) -> list[Edge]:
    """Every import of a project module by a project module, at any depth of the file."""
    modules = _modules(root)
    edges = []

    def resolve(name: str) -> str | None:
        # `from pipeline.data import store` imports the module pipeline.data.store when there is one.
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    for importer, path in modules.items():
        is_package = path.name == "__init__.py"

        def visit(node: ast.AST, type_checking: bool) -> None:
            for child in ast.iter_child_nodes(node):
                guarded = type_checking or (isinstance(child, ast.If) and _is_type_checking(child.test))
                targets = []
                if isinstance(child, ast.Import):
                    targets = [alias.name for alias in child.names]
                elif isinstance(child, ast.ImportFrom):
                    base = child.module or ""
                    if child.level:
                        anchor = importer.split(".") if is_package else importer.split(".")[:-1]
                        anchor = anchor[: len(anchor) - (child.level - 1)]
                        base = ".".join([*anchor, base] if base else anchor)
                    targets = [f"{base}.{alias.name}" for alias in child.names]
                for target in targets:
                    if target.split(".")[0] in PACKAGES:
                        resolved = resolve(target)
                        if resolved and resolved != importer:
                            edges.append(Edge(importer, resolved, child.lineno, guarded))
                visit(child, guarded)

        visit(ast.parse(path.read_text(), filename=str(path)), False)
    return edges


def layer_violations(edges: list[Edge]) -> list[str]:
    return [f"{e.importer} (line {e.line}, {layer_of(e.importer)}) imports {e.imported} ({layer_of(e.imported)})"
            for e in edges if layer_of(e.imported) not in ALLOWED[layer_of(e.importer)]]


def import_cycles(edges: list[Edge]) -> list[list[str]]:
    """Each cycle of the graph of imports that run (TYPE_CHECKING ones left out), found by depth-first search."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        if not e.type_checking:
            graph.setdefault(e.importer, set()).add(e.imported)
    cycles, state = [], {}

    def walk(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append([*stack[stack.index(nxt):], nxt])
            elif nxt not in state:
                walk(nxt, [*stack, nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            walk(node, [node])
    return cycles


def test_the_layers_hold_in_this_repository():
    edges = import_edges(REPO)
    assert len(edges) > 50, "the import graph is suspiciously small: did the packages move?"
    assert layer_violations(edges) == []
    assert import_cycles(edges) == []


def _copy_packages(tmp_path: Path) -> Path:
    for package in PACKAGES:
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def _new(found: list, before: list) -> list:
    """What the edit added: each test shows its own problem even while the repository has another."""
    return [item for item in found if item not in before]


def _add_function(path: Path, body: str) -> None:
    path.write_text(path.read_text() + f"\n\ndef _added_for_the_test():\n    {body}\n")


def test_a_foundation_module_importing_a_teacher_is_refused(tmp_path):
    root = _copy_packages(tmp_path)
    store = root / "pipeline" / "data" / "store.py"
    store.write_text(store.read_text() + "\nimport teachers  # the forbidden arrow\n")

    problems = _new(layer_violations(import_edges(root)), layer_violations(import_edges(REPO)))

    assert len(problems) == 1 and problems[0].startswith("pipeline.data.store (line")
    assert problems[0].endswith("imports teachers (teachers)")


def test_an_upward_import_hidden_in_a_function_is_refused(tmp_path):
    root = _copy_packages(tmp_path)
    # The trainer reaching the jobs layer from inside a function: the shape this test exists to stop.
    _add_function(root / "student" / "trainer.py", "from pipeline.online_targets import OnlineTargets")

    problems = _new(layer_violations(import_edges(root)), layer_violations(import_edges(REPO)))

    assert len(problems) == 1 and problems[0].startswith("student.trainer (line")
    assert problems[0].endswith("imports pipeline.online_targets (jobs)")


def test_a_cycle_dodged_by_a_function_level_import_is_found(tmp_path):
    root = _copy_packages(tmp_path)
    # Same layer, so no layer rule breaks; the images module reaching back up to the index makes a cycle that
    # only runs because the import waits inside a function.
    _add_function(root / "pipeline" / "data" / "images.py", "from pipeline.data.index import build_index")

    edges = import_edges(root)

    assert _new(layer_violations(edges), layer_violations(import_edges(REPO))) == []
    cycles = _new(import_cycles(edges), import_cycles(import_edges(REPO)))
    # Where the search enters a cycle depends on the rest of the graph: compare cycles from their first module.
    assert [_from_first(c) for c in cycles] == [
        ["pipeline.data.images", "pipeline.data.index", "pipeline.data.shards", "pipeline.data.images"]]


def _from_first(cycle: list[str]) -> list[str]:
    """A cycle [a, b, c, a] rotated to start at its alphabetically first module."""
    body = cycle[:-1]
    start = body.index(min(body))
    body = body[start:] + body[:start]
    return [*body, body[0]]
