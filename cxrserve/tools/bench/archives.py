"""Archive variants for the benchmark: unpacked once, other backends, other model configs."""
from __future__ import annotations

import json
import logging
import shutil
import warnings
from pathlib import Path


log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- archives
def _stamp(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}-{st.st_mtime_ns}"


def unpacked_archive(mar: Path, cache: Path) -> Path:
    """``mar`` extracted once into ``cache`` (reused while the archive is unchanged)."""
    from cxrserve.core.files import unpack_archive

    target = cache / "unpacked" / f"{mar.stem}-{_stamp(mar)}"
    if not (target / ".complete").exists():
        shutil.rmtree(target, ignore_errors=True)
        unpack_archive(mar, target)
        (target / ".complete").write_text("")
    return target


def pipeline_parts(model_dir: Path) -> tuple[str, list[str]]:
    """``(served name, component folders incl. the gate)`` of an unpacked archive."""
    from cxrserve.core.family import import_object
    from cxrserve.core.pipeline import GATE_COMPONENT

    spec = json.loads((model_dir / "pipeline.json").read_text())
    parts = list(import_object(spec["pipeline_class"]).components)
    if GATE_COMPONENT not in parts and (model_dir / GATE_COMPONENT / "metadata.json").exists():
        parts.append(GATE_COMPONENT)
    return spec["name"], parts


def with_backend(model_dir: Path, backend: str, checkpoints: dict[str, Path], cache: Path) -> Path:
    """An unpacked archive in which every component has ``backend``'s file.

    The default store ships only the format its model-config names; the other one is
    exported from the component's checkpoint (with the usual parity check) into a
    cached copy of the archive folder.
    """
    from cxrserve.core.family import import_object
    from cxrserve.core.runtime import BACKEND_FILES
    from cxrserve.packaging.export import export_component

    name, parts = pipeline_parts(model_dir)
    spec = json.loads((model_dir / "pipeline.json").read_text())
    autograd = set(import_object(spec["pipeline_class"]).autograd_components)
    missing = [p for p in parts if p not in autograd and not (model_dir / p / BACKEND_FILES[backend]).exists()]
    if not missing:
        return model_dir
    target = cache / "backends" / f"{model_dir.name}-{backend}"
    if (target / ".complete").exists():
        return target
    for part in missing:
        if part not in checkpoints or not Path(checkpoints[part]).exists():
            raise FileNotFoundError(f"{name}: component {part} has no {BACKEND_FILES[backend]} and no checkpoint "
                                    f"to export it from ({checkpoints.get(part)})")
    shutil.rmtree(target, ignore_errors=True)
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(model_dir, tmp)
    for part in missing:
        log.info("exporting %s/%s to %s for the benchmark", name, part, backend)
        keep = {f: (tmp / part / f).read_bytes() for f in ("metadata.json", "parity.json") if (tmp / part / f).exists()}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notices
            export_component(checkpoints[part], tmp / part, formats=(backend,))
        for f, data in keep.items():  # the archive's own card and parity report stay
            (tmp / part / f).write_bytes(data)
    tmp.replace(target)
    (target / ".complete").write_text("")
    return target


def variant_archive(mar: Path, cache: Path, name: str, changes: dict, handler_changes: dict | None = None) -> Path:
    """A copy of ``mar`` whose ``model-config.yaml`` has ``changes`` (batchSize, workers, ...).

    TorchServe takes batch size and workers from the archive's own model-config (a
    ``models=`` entry in config.properties does not override it), so a served variant
    needs its own archive. Entries are copied uncompressed, as the store writes them.
    """
    import zipfile

    import yaml

    import hashlib

    key = hashlib.sha256(json.dumps([changes, handler_changes], sort_keys=True).encode()).hexdigest()[:8]
    target = cache / "variants" / f"{name}-{_stamp(mar)}-{key}.mar"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".partial")
    with zipfile.ZipFile(mar) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as dst:
        manifest = json.loads(src.read("MAR-INF/MANIFEST.json"))
        config_name = manifest["model"].get("configFile", "model-config.yaml")
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename == config_name:
                config = yaml.safe_load(data) or {}
                config.update(changes)
                config["handler"] = {**config.get("handler", {}), **(handler_changes or {})}
                data = yaml.safe_dump(config, sort_keys=False).encode()
            elif info.filename == "MAR-INF/MANIFEST.json":
                manifest["model"]["modelName"] = name
                data = json.dumps(manifest, indent=2).encode()
            dst.writestr(info.filename, data)
    tmp.replace(target)
    return target


def model_config(model_dir: Path) -> dict:
    """The model-config.yaml an unpacked archive was built with."""
    import yaml

    path = model_dir / "model-config.yaml"
    return yaml.safe_load(path.read_text()) if path.exists() else {}
