"""The walls of the house, read from the code's own imports (every import, lazy ones inside functions too):
config and the event model import nothing of codi2; a store knows nothing of watching; the watcher knows
nothing of stores; provisioning never imports the data path."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CODI2 = Path(__file__).resolve().parent.parent / "codi2"


def _module(path: Path) -> str:
    parts = path.relative_to(CODI2.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every codi2 module `path` imports, at the top or inside a function."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("codi2"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("codi2"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


MODULES = {_module(p): _imports(p) for p in sorted(CODI2.rglob("*.py"))}


def _in(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


DATA_PATH = ("codi2.watch", "codi2.pipeline", "codi2.journal", "codi2.ship", "codi2.stores", "codi2.daemon")
WALLS = [
    # (who, what it must never import, why)
    (("codi2.config",), ("codi2",), "config is the root every module may import"),
    (("codi2.trail.events",), ("codi2",), "the event model is shared by every stage and the CLI"),
    (
        ("codi2.stores",),
        ("codi2.watch", "codi2.pipeline", "codi2.ship", "codi2.daemon", "codi2.cli"),
        "a store knows nothing of watching",
    ),
    (
        ("codi2.watch",),
        ("codi2.stores", "codi2.journal", "codi2.ship", "codi2.pipeline", "codi2.daemon", "codi2.cli"),
        "the watcher knows nothing of stores",
    ),
    (("codi2.provisioning",), (*DATA_PATH, "codi2.trail"), "provisioning never imports the data path"),
    (("codi2.trail",), (*DATA_PATH[:-2], "codi2.daemon", "codi2.cli"), "the trail model is below the stages"),
]


@pytest.mark.parametrize(("who", "never", "why"), WALLS, ids=[w[2] for w in WALLS])
def test_wall(who: tuple[str, ...], never: tuple[str, ...], why: str) -> None:
    crossing = {
        module: sorted(i for i in imports if _in(i, never) and not _in(i, who))
        for module, imports in MODULES.items()
        if _in(module, who)
    }
    assert not {m: i for m, i in crossing.items() if i}, why
