"""Which modules an archive must carry: the static import closure of what it serves.

Reads source with :mod:`ast` (no importing, so nothing runs and torch is not loaded),
follows every ``import`` and ``from ... import`` of the given packages' modules,
including imports inside functions, and returns the set of module files reached. An
archive built from it carries the serving core, the family it serves and the
architectures they use, and nothing else: a module that serving never imports
(training, bench, phantoms, the CLI) is not in it, and editing one changes no archive.
"""
from __future__ import annotations

import ast
import importlib.util
from pathlib import Path
from typing import Iterable


def _module_file(name: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin in (None, "built-in", "frozen") or not str(spec.origin).endswith(".py"):
        return None
    return Path(spec.origin)


def _imports(path: Path, module: str) -> set[str]:
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            found.add(stem)
            found.update(f"{stem}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return found


def import_closure(roots: Iterable[str], packages: Iterable[str]) -> dict[str, Path]:
    """Module name -> file for ``roots`` and everything they import inside ``packages``.

    Parent packages of every module are included (their ``__init__`` runs on import).
    """
    prefixes = tuple(packages)

    def inside(name: str) -> bool:
        return any(name == p or name.startswith(p + ".") for p in prefixes)

    seen: dict[str, Path] = {}
    todo = [r for r in roots]
    while todo:
        name = todo.pop()
        if name in seen or not inside(name):
            continue
        path = _module_file(name)
        if path is None:
            continue
        seen[name] = path
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))
        todo.extend(n for n in _imports(path, name) if inside(n) and n not in seen)
    return dict(sorted(seen.items()))
