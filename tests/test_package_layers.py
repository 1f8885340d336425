"""The layering of ``pipeline``'s packages, read from the source (every import, also those
inside functions): a package imports only packages of lower layers, so the tree has no
cycles; and docs/ARCHITECTURE.md names every module."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PIPELINE = REPO / "pipeline"
# The top-level modules (settings, db, models, states, ...) are layer 0.
LAYERS: dict[str, int] = {
    "imaging": 1,
    "triage": 1,
    "viewer": 1,
    "store": 2,
    "queue": 2,
    "simulation": 2,
    "classifier": 3,
    "ingest": 4,
    "results": 4,
    "training": 4,
    "monitoring": 5,
    "service": 5,
    "cli": 6,
}


def _package_of(module: str) -> str | None:
    """``pipeline.x.y`` -> ``x`` for a sub-package, ``""`` for a top-level module."""
    parts = module.split(".")
    if parts[0] != "pipeline" or len(parts) < 2:
        return None
    return parts[1] if (PIPELINE / parts[1]).is_dir() else ""


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            if node.module == "pipeline":
                found |= {f"pipeline.{a.name}" for a in node.names}
    return found


def _edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = defaultdict(set)
    for path in PIPELINE.rglob("*.py"):
        rel = path.relative_to(PIPELINE).parts
        source = rel[0] if len(rel) > 1 else ""
        for module in _imports(path):
            target = _package_of(module)
            if target is not None and target != source:
                edges[source].add(target)
    return edges


def test_every_package_has_a_layer() -> None:
    packages = {p.name for p in PIPELINE.iterdir() if (p / "__init__.py").exists()}
    assert packages == set(LAYERS)


def test_a_package_imports_only_lower_layers() -> None:
    wrong = [
        f"pipeline.{src or '<top>'} imports pipeline.{dst or '<top>'}"
        for src, targets in sorted(_edges().items())
        for dst in sorted(targets)
        if LAYERS.get(dst, 0) >= LAYERS.get(src, 0)
    ]
    assert wrong == []


def test_the_layering_check_sees_a_violation(tmp_path: Path) -> None:
    # the checker itself: an upward import is found, a downward one is not
    up = tmp_path / "up.py"
    up.write_text("def f():\n    from pipeline.cli.main import main\n")
    down = tmp_path / "down.py"
    down.write_text("from pipeline import settings\nimport pipeline.imaging.decode\n")
    assert _imports(up) == {"pipeline.cli.main"}
    assert {_package_of(m) for m in _imports(down)} - {None} == {"", "imaging"}


def test_the_architecture_page_names_every_package_and_module() -> None:
    page = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    missing = []
    for path in sorted(PIPELINE.rglob("*.py")):
        rel = path.relative_to(REPO)
        if path.name == "__init__.py":
            name = f"`{rel.parent.as_posix()}/`"
        elif path.name == "__main__.py":
            continue
        else:
            name = f"`{path.stem}`"
        if name not in page:
            missing.append(str(rel))
    for package in ("worker", "dashboard"):
        missing += [
            str(p.relative_to(REPO))
            for p in sorted((REPO / package).glob("*.py"))
            if p.name != "__init__.py" and f"`{p.stem}`" not in page
        ]
    assert missing == []
