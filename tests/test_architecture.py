"""The layout rules of scripts/: no import circle, no private names imported across modules, short modules."""

from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
MAX_LINES = 400
LONGER = {}  # module -> why it may exceed MAX_LINES


def module_name(path: Path) -> str:
    """scripts/generation/mar.py -> scripts.generation.mar (a package's __init__ -> the package)."""
    parts = path.relative_to(SCRIPTS.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """(imported scripts module, names taken from it) for every import in the file, lazy ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "scripts":
            names = [a.name for a in node.names]
            submodules = [f"{node.module}.{n}" for n in names if (SCRIPTS.parent / f"{node.module}.{n}".replace(".", "/")).with_suffix(".py").is_file()]
            found += [(m, []) for m in submodules] or [(node.module, names)]
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.split(".")[0] == "scripts"]
    return found


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(SCRIPTS.rglob("*.py"))}


def test_no_import_circle() -> None:
    graph = {name: {m for m, _ in imports(path) if m != name} for name, path in modules().items()}
    try:
        TopologicalSorter(graph).prepare()
    except CycleError as err:
        raise AssertionError(f"import circle among scripts modules: {' -> '.join(err.args[1])}") from None


def test_no_private_imports_across_modules() -> None:
    bad = [f"{name} imports {n} from {m}" for name, path in modules().items() for m, names in imports(path)
           for n in names if n.startswith("_") and n != "__future__"]
    assert not bad, bad


def test_modules_are_short() -> None:
    long = {name: n for name, path in modules().items()
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES and name not in LONGER}
    assert not long, f"modules over {MAX_LINES} lines (split them, or say why in LONGER): {long}"
