"""The layout's promises: one registry, layers that point down, no cycles, lean archives."""
from __future__ import annotations

import ast
import zipfile
from pathlib import Path

import pytest

from cxrserve import families
from cxrserve.packaging.closure import _imports

PACKAGE = Path(__file__).resolve().parents[1] / "cxrserve"

#: Which layers a module of each layer may import (besides itself and the package root).
ALLOWED = {
    "core": {"core"},
    "models": {"core", "models"},
    "family-serving": {"core", "models", "registry", "family-serving"},
    "registry": {"core", "registry", "family-serving"},
    "synthetic": {"core", "synthetic"},
    "training": {"core", "models", "registry", "family-serving", "synthetic", "training"},
    "packaging": {"core", "models", "registry", "family-serving", "synthetic", "training", "packaging"},
    # a family's training tasks and tools (importers, pool builders, their CLI)
    "family-offline": {"core", "models", "registry", "family-serving", "synthetic", "training", "packaging",
                       "family-offline"},
    "tools": {"core", "models", "registry", "family-serving", "synthetic", "training", "packaging",
              "family-offline", "tools"},
}
#: What an archive may ship: the serving layers only.
SERVING_LAYERS = {"core", "models", "registry", "family-serving"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts
            and "tests" not in p.relative_to(PACKAGE).parts}


def serving_modules_of_families() -> set[str]:
    """Modules of family folders that a served pipeline reaches (the family's serving layer)."""
    from cxrserve.packaging.export import serving_modules

    reached: set[str] = set()
    for _, served in families.served().values():
        reached.update(serving_modules(served.pipeline))
    return reached


def layer(name: str, family_serving: set[str]) -> str:
    parts = name.split(".")
    if name == "cxrserve":
        return "root"
    top = parts[1]
    if top == "families":
        if len(parts) == 2:
            return "registry"
        if len(parts) == 3 or name in family_serving:  # a family's declaration, or what serving reaches
            return "family-serving"
        return "tools" if parts[3] == "bench" else "family-offline"  # a family's bench extension is a tool
    return {"core": "core", "models": "models", "training": "training", "packaging": "packaging",
            "synthetic": "synthetic", "tools": "tools"}.get(top, "tools" if top in ("__main__",) else top)


def imported_modules(path: Path, name: str, known: dict[str, Path]) -> set[str]:
    out = set()
    for target in _imports(path, name):
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name:
            out.add(target)
    return out


def test_every_import_points_down_a_layer():
    known = all_modules()
    family_serving = serving_modules_of_families()
    wrong = []
    for name, path in known.items():
        mine = layer(name, family_serving)
        for target in imported_modules(path, name, known):
            theirs = layer(target, family_serving)
            if theirs != "root" and theirs not in ALLOWED.get(mine, set()):
                wrong.append(f"{name} ({mine}) imports {target} ({theirs})")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    """Not even through imports inside functions: every module's imports form a DAG."""
    known = all_modules()
    graph = {name: imported_modules(path, name, known) for name, path in known.items()}
    # a package's __init__ importing its own submodules (re-exports) is not a cycle of ideas
    graph = {n: {t for t in ts if not t.startswith(n + ".")} for n, ts in graph.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]) if nxt in stack else f"{node} -> {nxt}")
            elif state.get(nxt) is None:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in graph:
        if state.get(node) is None:
            visit(node, [node])
    assert not cycles, "\n".join(cycles)


def test_family_names_live_only_in_their_folders():
    """Outside its folder no code names a family's served models or tasks (the registry is read instead)."""
    names = set()
    for family in families.families().values():
        names.update(s.name for s in family.served)
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] == "families" and len(rel.parts) > 2 or "__pycache__" in rel.parts:
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
                offenders.append(f"{rel}:{node.lineno} {node.value!r}")
    assert not offenders, "\n".join(offenders)


@pytest.mark.parametrize("name", sorted(families.served()))
def test_archive_ships_only_what_serves(model_store, name):
    """``unzip -l`` of an archive lists serving modules only: no bench, phantoms, training, viewer, CLI."""
    family_serving = serving_modules_of_families()
    with zipfile.ZipFile(model_store / f"{name}.mar") as zf:
        modules = [n for n in zf.namelist() if n.startswith("cxrserve/") and n.endswith(".py")]
    assert modules, "the archive ships no package"
    bad = []
    for entry in modules:
        mod = entry[: -len(".py")].replace("/", ".").removesuffix(".__init__")
        if layer(mod, family_serving) not in SERVING_LAYERS | {"root"}:
            bad.append(entry)
    assert not bad, f"{name}.mar ships non-serving modules: {bad}"
    family, served = families.get_served(name)
    own = served.pipeline.partition(":")[0].replace(".", "/") + ".py"
    assert own in modules
    shipped = {family.package} | {families.get_served(n)[0].package for n in families.composed(name)}
    others = {f.package for f in families.families().values()} - shipped
    assert not [m for m in modules if any(m.startswith(o.replace(".", "/") + "/") for o in others)], \
        "an archive carries another family's code"


def test_archive_digest_ignores_code_it_does_not_ship(tmp_path):
    """Editing a tool (bench) leaves every archive's inputs unchanged; editing the core changes them."""
    from cxrserve.packaging.export import archive_files

    for _, served in families.served().values():
        files = {str(p) for p in archive_files(served.pipeline).values()}
        assert not any("/tools/" in f or "/training/" in f or "/synthetic/" in f for f in files)
        assert any(f.endswith("core/pipeline.py") for f in files)
