"""The layout's promises: one registry, layers that point down, no cycles, lean archives."""
from __future__ import annotations

import ast
import dataclasses
import json
import re
import zipfile
from pathlib import Path

import pytest

from cxrserve import families
from cxrserve.packaging.closure import _imports

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "cxrserve"

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


# --------------------------------------------------------------------------- family names
#: The shared layers, which read the families through the registry and name none of them.
SHARED = ("core", "packaging", "tools")
SOURCE_SUFFIXES = (".py", ".js", ".html")
#: Fields every answer has, whatever the family (the core's common response and error body).
COMMON_SCHEMAS = (REPO / "docs" / "schemas" / "common.schema.json", REPO / "docs" / "schemas" / "error.schema.json")
#: Card placeholders: ``{path}`` or ``{path:fmt}``; ``{{`` is a brace.
PLACEHOLDER = re.compile(r"\{([^{}:]+)(?::[^{}]*)?\}")
#: JavaScript: comments (dropped), string literals, then identifiers with the character before them.
JS_TOKEN = re.compile(r"//[^\n]*|/\*.*?\*/|(\"(?:\\.|[^\"\\])*\"|'(?:\\.|[^'\\])*'|`(?:\\.|[^`\\])*`)|([.\w$])?([A-Za-z_$][\w$]*)",
                      re.S)


def _schema_names(node) -> set[str]:
    out: set[str] = set()
    if isinstance(node, dict):
        out.update(node.get("properties", {}) if isinstance(node.get("properties"), dict) else ())
        for value in node.values():
            out |= _schema_names(value)
    elif isinstance(node, list):
        for value in node:
            out |= _schema_names(value)
    return out


def family_vocabulary() -> tuple[set[str], set[str], set[str]]:
    """(served names, section keys, response fields) that belong to the families.

    Fields: every top-level field a family's declarations read from an answer (report items,
    pictures, card lines, headline paths) and its picture options and flags, less the common
    response's fields (docs/schemas), the request inputs (``prior``: the client's API) and the
    words of the declaration types themselves (``label`` is a ``CardLine`` field too).
    """
    from cxrserve.core import family as declared

    names = set(families.served())
    keys = {s.key for _, s in families.served().values() if not s.compose}
    fields: set[str] = set()

    def path(text: str) -> None:  # the answer's own field (``change`` of ``change.direction``)
        if text:
            fields.add(text.split(".")[0])

    for name, (family, served) in families.served().items():
        for item in (families.report(name).items if families.report(name) else ()):
            path(item.field)
            path(getattr(item, "when", ""))
        for picture in families.pictures(name):
            fields.update((picture.field, picture.option))
        for line in families.card(name):
            for text in (line.text.replace("{{", "").replace("}}", ""), ):
                for found in PLACEHOLDER.findall(text) if line.kind != "bars" else [text]:
                    path(found)
            path(line.when)
            if line.kind == "tag":
                path(line.label)
        for headline in served.headline:
            path(headline)
        fields.update(flag.option for flag in family.shows().flags)
    common = set().union(*(_schema_names(json.loads(p.read_text())) for p in COMMON_SCHEMAS))
    vocabulary = {f.name for cls in vars(declared).values() if dataclasses.is_dataclass(cls)
                  for f in dataclasses.fields(cls)}
    return names, keys, fields - common - set(families.viewer_inputs()) - vocabulary


def _hits(text: str, names: set[str], keys: set[str], fields: set[str], *, words: bool) -> list[str]:
    """What of the vocabulary one string of code names: a served name or a section key anywhere
    in it (``sc-triage`` names triage), a field as the whole string or a dotted part of it
    (``words``: as any word, for page text)."""
    found = [n for n in names if re.search(rf"(?<![\w-]){re.escape(n)}(?![\w-])", text)]
    found += [k for k in keys if re.search(rf"(?<![A-Za-z0-9]){re.escape(k)}(?![A-Za-z0-9])", text, re.I)]
    parts = set(re.findall(r"[\w-]+", text)) if words else set(text.split("."))
    return found + sorted(parts & fields)


def _python_strings(path: Path):
    """``(line, text)`` of every string constant that is code, not a docstring."""
    tree = ast.parse(path.read_text())
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            yield node.lineno, node.value


def family_names_in(root: Path) -> list[str]:
    """Every place under ``root``'s shared layers where code names a family, a served model or a
    field a family declares: strings in Python (docstrings and comments are documentation),
    strings and identifiers in JavaScript (comments dropped), and the text of HTML pages."""
    names, keys, fields = family_vocabulary()
    offenders = []
    for folder in SHARED:
        for path in sorted((root / folder).rglob("*")):
            if path.suffix not in SOURCE_SUFFIXES or "__pycache__" in path.parts:
                continue
            rel = path.relative_to(root)
            if path.suffix == ".py":
                for line, text in _python_strings(path):
                    offenders += [f"{rel}:{line} {hit!r} in {text[:50]!r}" for hit in
                                  _hits(text, names, keys, fields, words=False)]
            elif path.suffix == ".js":
                source = path.read_text()
                for match in JS_TOKEN.finditer(source):
                    string, before, identifier = match.groups()
                    line = source.count("\n", 0, match.start()) + 1
                    if string:
                        hits = _hits(string[1:-1], names, keys, fields, words=string[0] == "`")
                    elif identifier:  # a property (``r.risk``) may name a field; any identifier a key
                        hits = [identifier] if identifier in keys or (before == "." and identifier in fields) else []
                    else:
                        continue
                    offenders += [f"{rel}:{line} {hit!r}" for hit in hits]
            else:
                text = re.sub(r"<!--.*?-->", "", path.read_text(), flags=re.S)
                for number, line in enumerate(text.splitlines(), 1):
                    offenders += [f"{rel}:{number} {hit!r}" for hit in _hits(line, names, keys, fields, words=True)]
    return offenders


def test_family_names_live_only_in_their_folders():
    """Outside the family folders and the registry, the shared layers (core, packaging, tools)
    name no family's served model, section key or declared response field: the SR writer,
    batch, the client, the viewer and bench read the families' declarations instead."""
    offenders = family_names_in(PACKAGE)
    assert not offenders, "\n".join(offenders)


def test_the_name_guard_finds_what_it_looks_for(tmp_path):
    """The guard sees a served name in Python, a field read in JavaScript and a key in a page."""
    names, keys, fields = family_vocabulary()
    name, key, field = sorted(names)[0], sorted(keys)[0], sorted(fields)[0]
    (tmp_path / "tools").mkdir()
    (tmp_path / "tools" / "a.py").write_text(f'"""{name} in a docstring is documentation."""\nMODEL = "{name}"\n')
    (tmp_path / "tools" / "b.js").write_text(f"// {field} in a comment\nconst v = r.{field};\n")
    (tmp_path / "tools" / "c.html").write_text(f"<p>{key.upper()} score</p><!-- {name} -->\n")
    found = family_names_in(tmp_path)
    own = families.get_served(name)[1].key  # a served name names its section key too
    assert found == [f"tools/a.py:2 {name!r} in {name!r}", f"tools/a.py:2 {own!r} in {name!r}",
                     f"tools/b.js:2 {field!r}", f"tools/c.html:1 {key!r}"]


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
