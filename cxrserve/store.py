"""Build the model store: phantoms -> demo training -> export -> ``.mar`` archives.

``cxrserve store build`` (what ``make store`` runs) follows ``training/demo.yaml``
and ``export/archives.yaml``. Every step is skipped when its output already exists,
so an interrupted build resumes and a second run is instant. Real weights replace the
demo ones by pointing ``--checkpoint NAME=PATH`` at a checkpoint trained with
``cxrserve train`` (the card then says what data it came from).
"""
from __future__ import annotations

import hashlib
import logging
import shutil
import time
from pathlib import Path
from typing import Iterable

import torch
import yaml

from .export import ArchiveSpec, build_archive, export_component

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent


def _load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text()) or {}


def resolve_model_config(config: dict) -> dict:
    """``deviceType: auto`` -> ``gpu`` when this machine has CUDA, else ``cpu``."""
    config = dict(config)
    if config.get("deviceType", "auto") == "auto":
        config["deviceType"] = "gpu" if torch.cuda.is_available() else "cpu"
    return config


def _digest(sources: list[Path], files: list[Path], text: str) -> str:
    """Content hash of source files, (size, mtime) of large artefacts, and extra text."""
    h = hashlib.sha256(text.encode())
    for path in sources:
        h.update(str(path.name).encode() + path.read_bytes())
    for path in files:
        st = path.stat()
        h.update(f"{path.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


class StoreBuilder:
    def __init__(self, store: str | Path = "model_store", work: str | Path = "build", *,
                 recipe: str | Path | None = None, archives: str | Path | None = None,
                 checkpoints: dict[str, str] | None = None, progress: bool = True, device: str = "auto"):
        self.store = Path(store)
        self.work = Path(work)
        self.recipe = _load_yaml(Path(recipe or REPO / "training" / "demo.yaml"))
        self.archives_path = Path(archives or REPO / "export" / "archives.yaml")
        self.archives = _load_yaml(self.archives_path)
        self.given = {k: Path(v) for k, v in (checkpoints or {}).items()}
        self.progress = progress
        self.device = device

    # ----------------------------------------------------------------- steps
    def phantom_set(self, name: str) -> Path:
        """Write phantom set ``name`` once: ``train``/``val`` or one under ``phantoms.sets``.

        A set's ``options`` go to :func:`cxrserve.phantoms.write_dataset` (kinds,
        studies_per_patient, min_extent, ...); the recipe's ``height``/``width`` apply to all.
        """
        from .phantoms import write_dataset

        spec = self.recipe.get("phantoms", {})
        cfg = spec.get(name) if name in ("train", "val") else spec.get("sets", {}).get(name)
        if cfg is None:
            raise KeyError(f"phantom set {name!r} is not in the recipe")
        root = self.work / "phantoms" / name
        if not (root / "labels.csv").exists():
            t = time.time()
            tmp = root.with_name(root.name + ".partial")
            shutil.rmtree(tmp, ignore_errors=True)
            options = {**spec.get("options", {}), **cfg.get("options", {})}
            write_dataset(tmp, cfg.get("n", 200), seed=cfg.get("seed", 0), height=spec.get("height", 384),
                          width=spec.get("width", 384), progress=self.progress, **options)
            tmp.replace(root)
            log.info("phantoms %s: %d images in %.0f s", name, cfg.get("n", 200), time.time() - t)
        return root

    def phantoms(self) -> dict[str, Path]:
        return {part: self.phantom_set(part) for part in ("train", "val")}

    def checkpoint(self, name: str) -> Path:
        """Train component ``name`` on phantoms unless a checkpoint was given or exists."""
        from .tasks import get_task
        from .tasks.common import load_records

        if name in self.given:
            return self.given[name]
        cfg = dict(self.recipe["components"][name])
        out = self.work / "checkpoints" / name
        best = out / "best.ckpt"
        if best.exists():
            return best
        task = get_task(cfg.pop("task"))
        depends = {arg: self.checkpoint(dep) for arg, dep in cfg.pop("depends", {}).items()}
        records = load_records([self.phantom_set(part) for part in cfg.pop("data", ["train", "val"])])
        log.info("training demo component %s", name)
        task.train(records, out_dir=out, demo=True, version="0.1.0-demo", progress=self.progress,
                   device=self.device, resume=True, **depends, **cfg)
        return best

    def formats(self, component: str) -> tuple[str, ...]:
        """Export formats a component needs across the archives that ship it."""
        from .pipeline import PIPELINES
        from . import pipelines  # noqa: F401

        needed: set[str] = set()
        for name, spec in self.archives.items():
            if component not in spec["components"]:
                continue
            needed.update(spec.get("export_formats", []))
            config = _load_yaml(self.archives_path.parent / "model-config" / f"{name}.yaml")
            needed.add(config.get("handler", {}).get("backend", "torchscript"))
            pipeline = PIPELINES.get(spec.get("pipeline", name))
            if pipeline is not None and component in pipeline.autograd_components:
                needed.add("torchscript")
        return tuple(f for f in ("torchscript", "onnx") if f in needed) or ("torchscript",)

    def component(self, name: str) -> Path:
        ckpt = self.checkpoint(name)
        out = self.work / "components" / name
        formats = self.formats(name)
        fresh = (out / "metadata.json").exists() and (out / "metadata.json").stat().st_mtime >= ckpt.stat().st_mtime
        if fresh and all((out / f).exists() for f in (("model.pt",) if "torchscript" in formats else ())
                                                   + (("model.onnx",) if "onnx" in formats else ())):
            return out
        shutil.rmtree(out, ignore_errors=True)
        export_component(ckpt, out, formats=formats)
        self.post_export(name, out)
        return out

    def post_export(self, name: str, folder: Path) -> None:
        """Task-specific artefacts that must travel with a component (reference pools, ...)."""
        from .tasks import get_task

        cfg = self.recipe["components"].get(name, {})
        task = get_task(cfg.get("task", name)) if cfg else None
        hook = getattr(task, "post_export", None)
        if hook is not None:
            hook(folder, self)

    def archive(self, name: str) -> Path:
        """Build ``<store>/<name>.mar`` unless one from the same inputs is already there.

        The inputs are the package sources (the archive ships them), the handler, the
        model config and every component file, hashed into a digest kept beside the
        store, so editing code rebuilds the archives that carry it.
        """
        spec = self.archives[name]
        mar = self.store / f"{name}.mar"
        components = {c: self.component(c) for c in spec["components"]}
        config_path = self.archives_path.parent / "model-config" / f"{name}.yaml"
        model_config = resolve_model_config(_load_yaml(config_path))
        handler = REPO / spec["handler"]
        digest = _digest([*sorted((REPO / "cxrserve").rglob("*.py")), handler],
                         [p for folder in components.values() for p in sorted(folder.rglob("*")) if p.is_file()],
                         repr(sorted(model_config.items())) + repr(spec))
        stamp = self.work / "archives" / f"{name}.digest"
        if mar.exists() and stamp.exists() and stamp.read_text() == digest:
            return mar
        path = build_archive(
            ArchiveSpec(name=name, pipeline=spec.get("pipeline", name), handler=handler,
                        components=components, model_config=model_config, version=spec.get("version", "0.1.0")),
            self.store,
        )
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.write_text(digest)
        return path

    def build(self, only: Iterable[str] | None = None) -> list[Path]:
        names = list(only or self.archives)
        unknown = [n for n in names if n not in self.archives]
        if unknown:
            raise KeyError(f"unknown archive(s) {unknown}; known: {sorted(self.archives)}")
        return [self.archive(n) for n in names]
